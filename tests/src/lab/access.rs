//! Access-weighted locality: what a VM feels, not where its pages lie.
//!
//! Page-weighted locality (the share of a VM's memory on the node its vCPUs run on)
//! treats a cold page like a hot one. A balancer that moves the hot set first may
//! leave cold pages remote for a long time and still give the VM almost only local
//! accesses; another that moves pages in address order may look equally far along by
//! pages while the VM still reaches across nodes for most of its work. So the lab
//! also reports the share of ACCESSES that are local, estimated from what the fake VM
//! is known to do:
//!
//! - The fake VM (`fake_qemu`) sends `hot_access_pct` % of its touches to the hot set
//!   (`scenario::hot_pages`) and the rest uniformly over ALL of guest RAM, the hot set
//!   included. So the share of touches that land on hot-set pages is
//!   `p + (1 - p) x f` ([`hot_access_share`], `p` = hot_access_pct / 100, `f` =
//!   hot_fraction), slightly more than `p`; the cold part gets the rest. Using `p`
//!   alone would count the uniform touches that hit the hot set as cold.
//! - Within each part touches are uniform over its pages, so the local share of a
//!   part's touches is that part's locality (pages on the VM's main node, from the
//!   harness's per-page query). Per VM: `share x hot + (1 - share) x cold`
//!   ([`vm_access_locality`]).
//! - Over VMs, a VM weighs by its accesses: its vCPUs' touches in the interval, from
//!   the progress files; equally when no VM reported touches (e.g. before the first
//!   progress write) ([`mean_by_accesses`]). The hot-set mean uses the same weights.
//! - Off-node accesses per second ([`offnode_accesses_per_s`]): the VM's touch rate
//!   (all vCPUs) times `1 - access locality`. An ESTIMATE from the known access split
//!   and the measured page placement, not a hardware counter: the lab guest has no
//!   NUMA memory-access counters, and a touch is one write of the fake VM's loop, not
//!   a cache miss.
//!
//! Limits: "local" means on the VM's main node (where its vCPUs ran most in the
//! interval), as for page-weighted locality; a VM whose vCPUs are split over nodes is
//! judged against one of them. Guest RAM only: the process's other memory (stacks,
//! heap) is in page-weighted locality but has no known access split.
//!
//! Reaction times ([`first_cpu_move_in_status`], [`time_to`](super::metrics::time_to)
//! on these series) are measured from the balancer's start (t = 0), when every lab
//! scenario's VMs are already placed badly: the imbalance begins then.

use serde_json::Value;

/// Share (0..1) of a fake VM's touches that land on hot-set pages, given its
/// `hot_access_pct` (0..100) and `hot_fraction` (0..1): the hot touches plus the
/// uniform ones that fall in the hot set.
pub fn hot_access_share(hot_access_pct: f64, hot_fraction: f64) -> f64 {
    let p = (hot_access_pct / 100.0).clamp(0.0, 1.0);
    let f = hot_fraction.clamp(0.0, 1.0);
    p + (1.0 - p) * f
}

/// A VM's access-weighted locality: `hot_share` of its touches see the hot set's
/// locality, the rest the cold part's.
pub fn vm_access_locality(hot_share: f64, hot_locality: f64, cold_locality: f64) -> f64 {
    hot_share * hot_locality + (1.0 - hot_share) * cold_locality
}

/// Estimated off-node accesses per second of a VM touching `touches_per_s` with
/// `access_locality` of them local.
pub fn offnode_accesses_per_s(touches_per_s: f64, access_locality: f64) -> f64 {
    touches_per_s.max(0.0) * (1.0 - access_locality).clamp(0.0, 1.0)
}

/// Mean of `(value, touches)` pairs weighted by touches; equal weights when no pair
/// has touches. `None` for no pairs.
pub fn mean_by_accesses(values: &[(f64, u64)]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let total: u64 = values.iter().map(|&(_, t)| t).sum();
    Some(if total == 0 {
        values.iter().map(|&(v, _)| v).sum::<f64>() / values.len() as f64
    } else {
        values.iter().map(|&(v, t)| v * t as f64).sum::<f64>() / total as f64
    })
}

/// Seconds from `t0_ns` (CLOCK_MONOTONIC at the balancer's start) to the first CPU
/// move (`SetCpus` action applied: outcome `Done` or `Partial`) among the decisions of a
/// `vmbalancer status --json`
/// document (their `at_ns` is the daemon's CLOCK_MONOTONIC). Status keeps only the
/// last decisions, so in a long run this is the first one still listed.
pub fn first_cpu_move_in_status(status: &Value, t0_ns: u64) -> Option<f64> {
    first_cpu_move(status, None, t0_ns)
}

/// Seconds from `since_ns` (CLOCK_MONOTONIC) to vmbalancer's first applied CPU
/// move at or after it, of VM `pid` only when given, from `status --json`.
pub fn first_cpu_move(status: &Value, pid: Option<u32>, since_ns: u64) -> Option<f64> {
    status
        .get("decisions")?
        .as_array()?
        .iter()
        .filter(|d| d.pointer("/action/SetCpus").is_some())
        .filter(|d| pid.is_none_or(|p| d.get("vm").and_then(Value::as_u64) == Some(u64::from(p))))
        .filter(|d| {
            d.get("outcome")
                .and_then(Value::as_object)
                .is_some_and(|o| o.contains_key("Done") || o.contains_key("Partial"))
        })
        .filter_map(|d| d.get("at_ns")?.as_u64())
        .filter(|&at| at >= since_ns)
        .min()
        .map(|at| (at - since_ns) as f64 / 1e9)
}

/// Every `stride`-th page is queried when a VM's guest RAM has more than
/// `max_pages` pages (per-page truth for locality only; exact counts of pages moved
/// query every page).
pub fn query_stride(pages: usize, max_pages: usize) -> usize {
    pages.div_ceil(max_pages.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn hot_share_table() {
        // (hot_access_pct, hot_fraction, share of touches on hot-set pages)
        let cases = [
            (95.0, 0.25, 0.9625),
            (100.0, 0.25, 1.0),
            (0.0, 0.25, 0.25), // all uniform: the hot set gets its size's share
            (50.0, 0.0, 0.5),
            (50.0, 1.0, 1.0),
            (150.0, 0.5, 1.0), // clamped
        ];
        for (pct, f, want) in cases {
            assert!(close(hot_access_share(pct, f), want), "{pct} {f}");
        }
    }

    #[test]
    fn vm_access_locality_table() {
        // (hot share, hot locality, cold locality, access-weighted)
        let cases = [
            // Scattered start: every part 25 % local.
            (0.9625, 0.25, 0.25, 0.25),
            // Hot set home, cold part still scattered: the VM feels 97 % local
            // while only 44 % of its pages are.
            (0.9625, 1.0, 0.25, 0.971_875),
            // Cold part home first: pages look better than accesses.
            (0.9625, 0.25, 1.0, 0.278_125),
            (1.0, 0.5, 0.0, 0.5),
            (0.0, 0.5, 0.75, 0.75),
        ];
        for (share, hot, cold, want) in cases {
            let got = vm_access_locality(share, hot, cold);
            assert!(close(got, want), "{share} {hot} {cold}: {got}");
        }
    }

    #[test]
    fn offnode_rate_table() {
        // (touches/s, access locality, off-node accesses/s)
        let cases = [
            (1000.0, 0.25, 750.0),
            (1000.0, 1.0, 0.0),
            (0.0, 0.0, 0.0),
            (1000.0, 1.2, 0.0), // clamped
            (-5.0, 0.5, 0.0),   // counters reset: no negative rate
            (2e6, 0.971_875, 56_250.0),
        ];
        for (rate, loc, want) in cases {
            let got = offnode_accesses_per_s(rate, loc);
            assert!(close(got, want), "{rate} {loc}: {got}");
        }
    }

    /// (value, touches)
    type Weighted = (f64, u64);

    #[test]
    fn mean_by_accesses_table() {
        // (values with touches, mean)
        let cases: [(&[Weighted], Option<f64>); 5] = [
            (&[], None),
            (&[(0.5, 10)], Some(0.5)),
            // A VM doing 3x the work weighs 3x.
            (&[(1.0, 300), (0.0, 100)], Some(0.75)),
            // No touches anywhere: equal weights.
            (&[(1.0, 0), (0.0, 0)], Some(0.5)),
            // An idle VM does not count once others touch memory.
            (&[(1.0, 0), (0.2, 50)], Some(0.2)),
        ];
        for (values, want) in cases {
            let got = mean_by_accesses(values);
            assert_eq!(
                got.map(|g| (g * 1e9).round()),
                want.map(|w| (w * 1e9).round())
            );
        }
    }

    #[test]
    fn first_cpu_move_from_status() {
        let status: Value = serde_json::from_str(
            r#"{"decisions": [
                {"at_ns": 9000000000, "vm": 1, "action": {"MigrateMemory": {"from": 0, "to": 1}},
                 "reason": "x", "outcome": "VmGone"},
                {"at_ns": 6000000000, "vm": 4, "action": {"SetCpus": {"vcpus": null, "cpus": [3]}},
                 "reason": "x", "outcome": {"Refused": {"why": "busy"}}},
                {"at_ns": 7500000000, "vm": 2, "action": {"SetCpus": {"vcpus": null, "cpus": [0, 1]}},
                 "reason": "x", "outcome": {"Done": {"moved_bytes": 0}}},
                {"at_ns": 8000000000, "vm": 3, "action": {"SetCpus": {"vcpus": null, "cpus": [2]}},
                 "reason": "x", "outcome": {"Done": {"moved_bytes": 0}}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(first_cpu_move_in_status(&status, 5_000_000_000), Some(2.5));
        let memory_only: Value = serde_json::from_str(
            r#"{"decisions": [{"at_ns": 1, "action": {"MigrateMemory": {}}}]}"#,
        )
        .unwrap();
        assert_eq!(first_cpu_move_in_status(&memory_only, 0), None);
        assert_eq!(first_cpu_move(&status, Some(3), 5_000_000_000), Some(3.0));
        assert_eq!(first_cpu_move(&status, Some(4), 5_000_000_000), None);
        assert_eq!(first_cpu_move(&status, Some(3), 8_500_000_000), None);
        assert_eq!(first_cpu_move_in_status(&Value::Null, 0), None);
    }

    #[test]
    fn stride_table() {
        // (pages, max pages queried, stride)
        for (pages, max, want) in [
            (16_384, 8192, 2),
            (98_304, 8192, 12),
            (100, 8192, 1),
            (8193, 8192, 2),
            (0, 8192, 1),
            (10, 0, 10),
        ] {
            assert_eq!(query_stride(pages, max), want, "{pages} {max}");
        }
    }
}
