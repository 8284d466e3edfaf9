//! Pure judgements on a run: which sample an assertion looks at, pages misplaced at
//! the start, hot-set-first ordering, nodes in use, and what vmbalancer's status and
//! journal documents say.
//!
//! Kept apart from the harness (which reads /proc and runs commands) so every
//! definition an assertion relies on is written down once and tested on synthetic
//! samples and documents.

use serde_json::Value;

use super::protocol::{Sample, VmTruth};
use super::scenario::{Measure, Which};

/// Bytes per page in [`misplaced_pages_at_start`] (the kernel's base page; the
/// migration counters count base pages).
pub const PAGE_BYTES: u64 = 4096;

/// A node is among a VM's end nodes when it had at least this share of the VM's vCPU
/// time in the last interval.
pub const END_NODE_MIN_SHARE: f64 = 0.2;

/// The first sample at or after `at_s`, or the last sample without `at_s`.
pub fn sample_at(samples: &[Sample], at_s: Option<f64>) -> Option<&Sample> {
    match at_s {
        None => samples.last(),
        Some(t) => samples.iter().find(|s| s.t_s >= t - 1e-9),
    }
}

/// The locality an assertion judges at a sample: `measure` as the mean over VMs
/// (page-weighted for pages, access-weighted means otherwise) or the worst VM.
/// `None` when the sample does not carry that measure (access-weighted and hot-set
/// locality need per-page truth, which an older guest did not send).
pub fn locality_at(s: &Sample, measure: Measure, which: Which) -> Option<f64> {
    let worst = |f: fn(&VmTruth) -> Option<f64>| {
        s.vms
            .iter()
            .map(f)
            .collect::<Option<Vec<f64>>>()
            .filter(|v| !v.is_empty())
            .map(|v| v.into_iter().fold(1.0, f64::min))
    };
    match (measure, which) {
        (Measure::Pages, Which::Mean) => Some(s.locality_mean),
        (Measure::Pages, Which::Min) => Some(s.locality_min),
        (Measure::Access, Which::Mean) => s.access_locality_mean,
        (Measure::Access, Which::Min) => worst(|v| v.access_locality),
        (Measure::Hot, Which::Mean) => s.hot_locality_mean,
        (Measure::Hot, Which::Min) => worst(|v| v.hot_locality),
    }
}

/// The first sample time at which `measure` (see [`locality_at`]) is at least `min`.
pub fn first_time_at_least(
    samples: &[Sample],
    measure: Measure,
    which: Which,
    min: f64,
) -> Option<f64> {
    samples
        .iter()
        .find(|s| locality_at(s, measure, which).is_some_and(|v| v >= min))
        .map(|s| s.t_s)
}

/// The nodes where a VM's vCPUs are at a sample: nodes with at least
/// [`END_NODE_MIN_SHARE`] of its vCPU time over the interval before it; when the
/// vCPUs did not run, the nodes they last ran on.
pub fn vcpu_home_nodes(vm: &VmTruth) -> Vec<usize> {
    let total: u64 = vm.vcpu_ticks_per_node.iter().sum();
    if total == 0 {
        let mut n = vm.vcpu_nodes.clone();
        n.sort_unstable();
        n.dedup();
        return n;
    }
    vm.vcpu_ticks_per_node
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t as f64 >= END_NODE_MIN_SHARE * total as f64)
        .map(|(n, _)| n)
        .collect()
}

/// Pages misplaced at the start: the fewest page moves that turn each VM's memory
/// layout at the first sample (t = 0) into its layout at the last sample, i.e. for
/// each node the pages that left it, `sum over nodes of max(0, start - end)`, in
/// [`PAGE_BYTES`] pages, summed over VMs (the process's own memory in numa_maps: guest
/// RAM, heap and stacks; shared program and library pages are not counted). A balancer that moves every page at most once moves
/// exactly these. Judged on memory, not on where vCPUs ran last: the last interval
/// may include the balancer's exit, when CPU sets are put back.
pub fn misplaced_pages_at_start(samples: &[Sample]) -> u64 {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return 0;
    };
    last.vms
        .iter()
        .filter_map(|end| {
            let start = first.vms.iter().find(|v| v.name == end.name)?;
            let left: u64 = start
                .bytes_per_node
                .iter()
                .enumerate()
                .map(|(n, &b)| b.saturating_sub(end.bytes_per_node.get(n).copied().unwrap_or(0)))
                .sum();
            Some(left / PAGE_BYTES)
        })
        .sum()
}

/// Pages of `vm` seen moving from the first sample at or after `after_s` (default:
/// the first sample) to the last; `None` without per-page truth for it.
pub fn vm_pages_moved(samples: &[Sample], vm: &str, after_s: Option<f64>) -> Option<u64> {
    let moved = |s: &Sample| s.vms.iter().find(|v| v.name == vm)?.pages_moved;
    let end = moved(samples.last()?)?;
    let start = moved(sample_at(samples, Some(after_s.unwrap_or(f64::MIN)))?)?;
    Some(end.saturating_sub(start))
}

/// vCPU nodes in use at a sample: nodes whose vCPU load was at least `min_load` CPUs.
pub fn nodes_used(sample: &Sample, min_load: f64) -> usize {
    sample
        .vcpu_load_per_node
        .iter()
        .filter(|&&l| l >= min_load)
        .count()
}

/// Hot-set-first for one VM, on the samples at or after `after_s`: from the first
/// sample whose cold-part locality is below `cold_max` (the VM's memory is not
/// home) to the first later sample at which it reaches `cold_max`, the hot set must
/// reach `hot_min` at some sample (the crossing sample included). Ok(detail) when
/// it did, Err(detail) when the cold part got there first, `None` when the cold part
/// never went from below `cold_max` to `cold_max` (nothing to judge).
pub fn hot_first_one(
    samples: &[Sample],
    vm: &str,
    after_s: Option<f64>,
    hot_min: f64,
    cold_max: f64,
) -> Option<Result<String, String>> {
    let from = after_s.unwrap_or(f64::MIN) - 1e-9;
    let series: Vec<(f64, f64, f64)> = samples
        .iter()
        .filter(|s| s.t_s >= from)
        .filter_map(|s| {
            let v = s.vms.iter().find(|v| v.name == vm)?;
            Some((s.t_s, v.hot_locality?, v.cold_locality?))
        })
        .collect();
    let below = series.iter().position(|&(_, _, c)| c < cold_max)?;
    let cold_at = below
        + series[below..]
            .iter()
            .position(|&(_, _, c)| c >= cold_max)?;
    let (t_cold, _, c) = series[cold_at];
    let hot_at = series[below..=cold_at]
        .iter()
        .find(|&&(_, h, _)| h >= hot_min)
        .map(|&(t, h, _)| (t, h));
    Some(match hot_at {
        Some((t_hot, h)) => Ok(format!(
            "{vm}: hot set {h:.2} at t={t_hot} s, cold part {c:.2} at t={t_cold} s"
        )),
        None => Err(format!(
            "{vm}: cold part reached {c:.2} at t={t_cold} s while the hot set was at {:.2}",
            series[cold_at].1
        )),
    })
}

/// Hot-set-first over a run: for `vm`, or for every VM with something to judge.
/// Returns (ok, detail).
pub fn hot_first(
    samples: &[Sample],
    vm: Option<&str>,
    after_s: Option<f64>,
    hot_min: f64,
    cold_max: f64,
) -> (bool, String) {
    let names: Vec<String> = match vm {
        Some(v) => vec![v.to_string()],
        None => samples
            .first()
            .map(|s| s.vms.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default(),
    };
    let judged: Vec<Result<String, String>> = names
        .iter()
        .filter_map(|n| hot_first_one(samples, n, after_s, hot_min, cold_max))
        .collect();
    if judged.is_empty() {
        let last: Vec<String> = samples
            .last()
            .map(|s| {
                s.vms
                    .iter()
                    .filter(|v| vm.is_none_or(|n| n == v.name))
                    .map(|v| {
                        format!(
                            "{} hot {:.2} cold {:.2}",
                            v.name,
                            v.hot_locality.unwrap_or(f64::NAN),
                            v.cold_locality.unwrap_or(f64::NAN)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return (
            false,
            format!(
                "no VM's cold part went from below {cold_max} to {cold_max}; at the end: {}",
                last.join(", ")
            ),
        );
    }
    let ok = judged.iter().all(Result::is_ok);
    let detail: Vec<String> = judged
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| e))
        .collect();
    (ok, detail.join("; "))
}

/// The variant name of an externally tagged enum value (`"X"` or `{"X": {...}}`).
fn variant(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(m) if m.len() == 1 => m.keys().next().map(String::as_str),
        _ => None,
    }
}

/// Decisions in a `vmbalancer status --json` document whose reason is `reason`.
pub fn count_decisions(status: &Value, reason: &str) -> u64 {
    status
        .get("decisions")
        .and_then(Value::as_array)
        .map_or(0, |d| {
            d.iter()
                .filter(|d| d.get("reason").and_then(variant) == Some(reason))
                .count() as u64
        })
}

/// Refusals in a status document whose JSON text contains `contains`: decisions
/// whose outcome is `Refused`, plus entries of a top-level `refusals` list.
pub fn count_refusals(status: &Value, contains: &str) -> u64 {
    let refused = status
        .get("decisions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("outcome").and_then(variant) == Some("Refused"));
    let listed = status
        .get("refusals")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    refused
        .chain(listed)
        .filter(|r| r.to_string().contains(contains))
        .count() as u64
}

/// VMs (journal keys) with an action still in flight in vmbalancer's journal.
pub fn journal_in_flight(journal: &Value) -> Vec<String> {
    journal
        .get("entries")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.get("in_flight").is_some_and(|f| !f.is_null()))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// VMs whose in-flight journal action is a memory move (`MigrateMemory`).
pub fn journal_migrating(journal: &Value) -> Vec<String> {
    journal
        .get("entries")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| {
                    e.pointer("/in_flight/action/action")
                        .and_then(variant)
                        .is_some_and(|a| a == "MigrateMemory")
                })
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, bytes: [u64; 4], ticks: [u64; 4]) -> VmTruth {
        VmTruth {
            name: name.into(),
            pid: 1,
            bytes_per_node: bytes.to_vec(),
            vcpu_ticks_per_node: ticks.to_vec(),
            vcpu_nodes: vec![],
            main_node: None,
            locality: 0.0,
            touches_per_vcpu_s: 0.0,
            hot_locality: None,
            cold_locality: None,
            pages_moved: None,
            access_locality: None,
            offnode_accesses_per_s: None,
        }
    }

    fn sample(t_s: f64, vms: Vec<VmTruth>) -> Sample {
        Sample {
            t_s,
            locality_mean: t_s / 100.0,
            locality_min: 0.0,
            vcpu_load_per_node: vec![0.0; 4],
            vms,
            access_locality_mean: None,
            hot_locality_mean: None,
            offnode_accesses_per_s: None,
        }
    }

    fn hc(t_s: f64, hot: f64, cold: f64) -> Sample {
        let mut v = vm("a", [0; 4], [0; 4]);
        v.hot_locality = Some(hot);
        v.cold_locality = Some(cold);
        sample(t_s, vec![v])
    }

    #[test]
    fn sample_at_picks_first_at_or_after() {
        let s: Vec<Sample> = [0.0, 5.0, 10.0, 15.0]
            .iter()
            .map(|&t| sample(t, vec![]))
            .collect();
        assert_eq!(sample_at(&s, None).unwrap().t_s, 15.0);
        assert_eq!(sample_at(&s, Some(5.0)).unwrap().t_s, 5.0);
        assert_eq!(sample_at(&s, Some(6.0)).unwrap().t_s, 10.0);
        assert!(sample_at(&s, Some(16.0)).is_none());
        assert!(sample_at(&[], None).is_none());
    }

    #[test]
    fn locality_measures_table() {
        let mut a = vm("a", [0; 4], [0; 4]);
        (a.hot_locality, a.access_locality) = (Some(1.0), Some(0.97));
        let mut b = vm("b", [0; 4], [0; 4]);
        (b.hot_locality, b.access_locality) = (Some(0.5), Some(0.6));
        let mut s = sample(10.0, vec![a, b.clone()]);
        s.locality_mean = 0.4;
        s.locality_min = 0.3;
        s.access_locality_mean = Some(0.785);
        s.hot_locality_mean = Some(0.75);
        // (measure, which, value)
        let cases = [
            (Measure::Pages, Which::Mean, Some(0.4)),
            (Measure::Pages, Which::Min, Some(0.3)),
            (Measure::Access, Which::Mean, Some(0.785)),
            (Measure::Access, Which::Min, Some(0.6)),
            (Measure::Hot, Which::Mean, Some(0.75)),
            (Measure::Hot, Which::Min, Some(0.5)),
        ];
        for (m, w, want) in cases {
            assert_eq!(locality_at(&s, m, w), want, "{m:?} {w:?}");
        }
        // An older guest's sample: no access-weighted values, nothing to judge.
        let old = sample(0.0, vec![vm("a", [0; 4], [0; 4])]);
        assert_eq!(locality_at(&old, Measure::Access, Which::Mean), None);
        assert_eq!(locality_at(&old, Measure::Hot, Which::Min), None);
        // One VM without it: the worst VM is unknown, not the best of the rest.
        let half = sample(0.0, vec![b, vm("c", [0; 4], [0; 4])]);
        assert_eq!(locality_at(&half, Measure::Access, Which::Min), None);

        let series: Vec<Sample> = [(0.0, 0.25), (5.0, 0.9), (10.0, 0.96), (15.0, 0.99)]
            .iter()
            .map(|&(t, v)| {
                let mut s = sample(t, vec![]);
                s.access_locality_mean = Some(v);
                s
            })
            .collect();
        let at = |min| first_time_at_least(&series, Measure::Access, Which::Mean, min);
        assert_eq!(at(0.95), Some(10.0));
        assert_eq!(at(0.25), Some(0.0));
        assert_eq!(at(0.999), None);
    }

    #[test]
    fn home_nodes_by_cpu_share() {
        assert_eq!(vcpu_home_nodes(&vm("a", [0; 4], [10, 0, 90, 0])), vec![2]);
        assert_eq!(
            vcpu_home_nodes(&vm("a", [0; 4], [50, 0, 50, 0])),
            vec![0, 2]
        );
        let mut idle = vm("a", [0; 4], [0; 4]);
        idle.vcpu_nodes = vec![3, 1, 3];
        assert_eq!(vcpu_home_nodes(&idle), vec![1, 3]);
    }

    #[test]
    fn misplaced_counts_the_fewest_moves_from_start_to_end_layout() {
        let mib = 1 << 20;
        let first = sample(
            0.0,
            vec![
                vm("a", [mib, mib, mib, mib], [1, 1, 1, 1]),
                vm("b", [4 * mib, 0, 0, 0], [1, 0, 0, 0]),
            ],
        );
        let last = sample(
            30.0,
            vec![
                vm("a", [4 * mib, 0, 0, 0], [0, 0, 9, 1]),
                vm("b", [4 * mib, 0, 0, 0], [5, 5, 0, 0]),
            ],
        );
        // a gathered on node 0: 3 MiB left nodes 1-3; b did not move.
        assert_eq!(misplaced_pages_at_start(&[first, last]), 3 * 256);
        assert_eq!(misplaced_pages_at_start(&[]), 0);
    }

    #[test]
    fn pages_moved_window() {
        let s: Vec<Sample> = [(0.0, 0), (5.0, 100), (10.0, 100), (15.0, 130)]
            .iter()
            .map(|&(t, m)| {
                let mut v = vm("a", [0; 4], [0; 4]);
                v.pages_moved = Some(m);
                sample(t, vec![v])
            })
            .collect();
        assert_eq!(vm_pages_moved(&s, "a", None), Some(130));
        assert_eq!(vm_pages_moved(&s, "a", Some(5.0)), Some(30));
        assert_eq!(vm_pages_moved(&s, "a", Some(7.0)), Some(30));
        assert_eq!(vm_pages_moved(&s, "b", None), None);
    }

    #[test]
    fn nodes_in_use() {
        let mut s = sample(0.0, vec![]);
        s.vcpu_load_per_node = vec![2.0, 0.4, 0.5, 1.0];
        assert_eq!(nodes_used(&s, 0.5), 3);
        assert_eq!(nodes_used(&s, 0.1), 4);
    }

    /// (hot, cold) locality per sample, and the expected judgement.
    type HotColdCase<'a> = (&'a [(f64, f64)], Option<bool>);

    #[test]
    fn hot_first_table() {
        // (series of (hot, cold), expected: None = nothing to judge, Some(ok))
        let cases: &[HotColdCase<'_>] = &[
            // hot set home first, then the cold part: ok.
            (
                &[(0.25, 0.25), (0.6, 0.3), (0.95, 0.35), (0.97, 0.55)],
                Some(true),
            ),
            // hot set reaches the bar at the same sample: ok (at or before).
            (&[(0.25, 0.25), (0.92, 0.5)], Some(true)),
            // cold part first: fail.
            (&[(0.25, 0.25), (0.5, 0.6), (0.95, 0.9)], Some(false)),
            // cold part never reaches 0.5: nothing to judge.
            (&[(0.25, 0.25), (1.0, 0.3)], None),
            // local all along: nothing to judge.
            (&[(1.0, 1.0), (1.0, 1.0)], None),
            // local, then the vCPUs move (memory now remote), then memory follows
            // hot first: judged from the move on.
            (
                &[(1.0, 1.0), (0.0, 0.0), (0.95, 0.2), (1.0, 0.7)],
                Some(true),
            ),
            // the same, cold first.
            (
                &[(1.0, 1.0), (0.0, 0.0), (0.3, 0.6), (1.0, 1.0)],
                Some(false),
            ),
        ];
        for (series, want) in cases {
            let s: Vec<Sample> = series
                .iter()
                .enumerate()
                .map(|(i, &(h, c))| hc(i as f64 * 5.0, h, c))
                .collect();
            let got = hot_first_one(&s, "a", None, 0.9, 0.5).map(|r| r.is_ok());
            assert_eq!(got, *want, "{series:?}");
        }
        let s = vec![hc(0.0, 0.25, 0.25), hc(5.0, 1.0, 0.3)];
        assert!(!hot_first(&s, None, None, 0.9, 0.5).0);
        let s = vec![hc(0.0, 0.25, 0.25), hc(5.0, 1.0, 0.6)];
        assert!(hot_first(&s, None, None, 0.9, 0.5).0);
        assert!(hot_first(&s, Some("a"), None, 0.9, 0.5).0);
        assert!(!hot_first(&s, Some("zz"), None, 0.9, 0.5).0);
        // An early crossing (cold first) is ignored when judging from after_s on.
        let s = vec![
            hc(0.0, 0.0, 0.0),
            hc(5.0, 0.3, 0.8),
            hc(10.0, 0.0, 0.0),
            hc(15.0, 0.95, 0.1),
            hc(20.0, 1.0, 0.9),
        ];
        assert!(!hot_first(&s, None, None, 0.9, 0.5).0);
        assert!(hot_first(&s, None, Some(8.0), 0.9, 0.5).0);
    }

    #[test]
    fn status_documents() {
        let status: Value = serde_json::from_str(
            r#"{"decisions": [
                {"at_ns": 1, "vm": 7, "action": {}, "reason": {"ProbationReverted": {"node": 1}},
                 "outcome": {"Done": {"moved_bytes": 0}}},
                {"at_ns": 2, "vm": 7, "action": {}, "reason": {"CpuImbalance": {"from": 0, "to": 1, "imbalance_pct": 50.0}},
                 "outcome": {"Refused": {"why": "node 2 lacks free memory"}}},
                {"at_ns": 3, "vm": 8, "action": {}, "reason": {"ProbationReverted": {"node": 0}},
                 "outcome": "VmGone"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(count_decisions(&status, "ProbationReverted"), 2);
        assert_eq!(count_decisions(&status, "Locality"), 0);
        assert_eq!(count_refusals(&status, "free memory"), 1);
        assert_eq!(count_refusals(&status, "ProbationReverted"), 0);
        let with_list: Value = serde_json::from_str(
            r#"{"refusals": [{"vm": 3, "why": {"TargetMemoryFull": {"node": 2}}}]}"#,
        )
        .unwrap();
        assert_eq!(count_refusals(&with_list, "TargetMemoryFull"), 1);
        assert_eq!(count_decisions(&Value::Null, "X"), 0);
    }

    #[test]
    fn journal_entries_in_flight() {
        let j: Value = serde_json::from_str(
            r#"{"version": 1, "entries": {
                "10": {"original": {}, "in_flight": null},
                "11": {"original": {}, "in_flight": {"action": {}, "started_ns": 5}},
                "13": {"original": {}, "in_flight": {"action": {"vm": 13,
                    "action": {"MigrateMemory": {"from": 0, "to": 1}}, "reason": "x"},
                    "started_ns": 6}},
                "12": {"original": {}}
            }}"#,
        )
        .unwrap();
        assert_eq!(
            journal_in_flight(&j),
            vec!["11".to_string(), "13".to_string()]
        );
        assert_eq!(journal_migrating(&j), vec!["13".to_string()]);
        assert!(journal_in_flight(&Value::Null).is_empty());
    }
}
