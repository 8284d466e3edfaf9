//! The comparison table: one row per balancer, from each run's summary.
//!
//! Locality is shown two ways in every column: page-weighted (the share of each VM's
//! memory on its vCPUs' node) and access-weighted (the estimated share of its memory
//! accesses that are local, from the fake VMs' known hot/cold access split; defined in
//! `vmbalancer_tests::lab::access`). A balancer that moves the hot set first is ahead
//! on the second long before the first. Beside them: the hot set's own locality and
//! the estimated off-node accesses per second at the last sample, the time each
//! measure first reached 0.95, and the reaction time (first CPU move after t = 0).
//! The legend under the table says how each is measured.
//!
//! Work done is also shown relative to the first balancer in the same table
//! (normally `none`), measured in the same way in the same guest configuration.

use std::fmt::Write;

use super::results::{Sample, Summary};

/// At most this many locality columns; times in between are still used for the
/// time-to-target columns.
const MAX_LOCALITY_COLUMNS: usize = 7;

fn pick_columns(n: usize) -> Vec<usize> {
    if n <= MAX_LOCALITY_COLUMNS {
        return (0..n).collect();
    }
    let mut out: Vec<usize> = (0..MAX_LOCALITY_COLUMNS)
        .map(|i| i * (n - 1) / (MAX_LOCALITY_COLUMNS - 1))
        .collect();
    out.dedup();
    out
}

fn secs(v: Option<f64>) -> String {
    v.map_or("never".into(), |s| format!("{s:.0} s"))
}

/// The value of a `(t_s, value)` series at `t_s`, if that sample has one.
fn at(series: &[(f64, f64)], t_s: f64) -> Option<f64> {
    series
        .iter()
        .find(|&&(t, _)| (t - t_s).abs() < 1e-6)
        .map(|&(_, v)| v)
}

fn fraction(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// A rate with a k/M suffix.
fn per_s(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

/// The reaction time: the first CPU move seen in vCPU affinities, with vmbalancer's
/// own record of it when there is one.
fn first_move(r: &Summary) -> String {
    let seen = r
        .first_cpu_move_affinity_s
        .map_or("none seen".into(), |s| format!("{s:.1} s"));
    match r.first_cpu_move_status_s {
        Some(s) => format!("{seen} (status {s:.1} s)"),
        None => seen,
    }
}

/// The balancer process's CPU time over the run as a share of one CPU.
fn cpu_share(r: &Summary) -> String {
    match r.balancer_cpu_s {
        Some(s) if r.run_s > 0.0 => format!("{:.1} % ({s:.1} s)", s / r.run_s * 100.0),
        _ => "-".into(),
    }
}

/// What the columns mean, printed under the table.
pub const LEGEND: &str = "\
pages/access: page-weighted / access-weighted mean locality (access: each VM's hot-set and \
cold-part locality weighted by its known hot/cold access split, VMs weighted by their touches). \
hot: the hot set's locality. off-node acc/s: estimated off-node accesses per second over all \
VMs at the last sample, touch counters x the remote share of accesses (an estimate from the \
known access split, not a hardware counter). t->0.95: first sample at or above 0.95. \
1st CPU move: first change of a vCPU thread's allowed CPUs after the balancer started \
(250 ms polling; autoNUMA moves tasks within their allowed CPUs, which this cannot see), \
with vmbalancer's first applied SetCpus decision from its status in parentheses. \
tick late while moving: vmbalancer only, the most one of its ticks started after it was due \
while its memory moves ran (from its status at the end). \
balancer CPU: user + system time of the balancer's own process (every thread, the page \
movers' system calls included) over the run, as a share of one CPU, for vmbalancer and \
numad; autoNUMA's work runs in the VMs' own threads and kernel workers and is not shown.\n";

/// A markdown table comparing `rows`.
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else {
        return "(no runs)\n".into();
    };
    let cols = pick_columns(first.locality.len());
    let mut header = String::from("| balancer |");
    for &c in &cols {
        let _ = write!(header, " loc@{:.0}s pages/access |", first.locality[c].0);
    }
    header.push_str(
        " hot@end | off-node acc/s@end (est.) | t->0.9 pages | t->0.95 pages | t->0.95 access \
         | t->0.95 hot | 1st CPU move | tick late while moving | balancer CPU | numa_pages_migrated | pgmigrate_success | CPU balance \
         | touches/vCPU/s | work vs first |",
    );
    let sep: String = header
        .split('|')
        .skip(1)
        .filter(|s| !s.is_empty())
        .map(|_| "---|")
        .collect();
    let _ = writeln!(out, "{header}\n|{sep}");
    let base = first.work_touches.max(1) as f64;
    for r in rows {
        let mut line = format!("| {} |", r.balancer);
        for &c in &cols {
            match r.locality.get(c) {
                Some(&(t, l)) => {
                    let _ = write!(line, " {l:.3}/{} |", fraction(at(&r.access_locality, t)));
                }
                None => line.push_str(" - |"),
            }
        }
        let _ = writeln!(
            out,
            "{line} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.2} |",
            fraction(r.hot_locality.last().map(|&(_, v)| v)),
            per_s(r.offnode_accesses_per_s.last().map(|&(_, v)| v)),
            secs(r.time_to_090_s),
            secs(r.time_to_095_s),
            secs(r.access_time_to_095_s),
            secs(r.hot_time_to_095_s),
            first_move(r),
            r.tick_late_moving_s
                .map_or("-".into(), |s| format!("{:.0} ms", s * 1000.0)),
            cpu_share(r),
            r.numa_pages_migrated,
            r.pgmigrate_success,
            r.cpu_balance,
            r.touches_per_vcpu_s,
            r.work_touches as f64 / base
        );
    }
    out.push('\n');
    out.push_str(LEGEND);
    out
}

fn mib_per_node(bytes: &[u64]) -> String {
    let v: Vec<String> = bytes.iter().map(|b| format!("{:>3}", b >> 20)).collect();
    v.join("/")
}

/// Where a VM or a guest cell stood at one sample: the node its vCPUs ran on most,
/// its memory per node (MiB), its page locality and its access-weighted locality.
fn placement(
    main_node: Option<usize>,
    bytes_per_node: &[u64],
    locality: f64,
    access_locality: Option<f64>,
) -> String {
    let node = main_node.map_or("-".into(), |n| n.to_string());
    let acc = access_locality.map_or("  -".into(), |v| format!("{:>3.0}", v * 100.0));
    format!(
        "node {node} [{}] {:>4.0}% acc {acc}%",
        mib_per_node(bytes_per_node),
        locality * 100.0
    )
}

/// Per VM: where its vCPUs ran most and its memory per node (MiB), at the first
/// and the last sample of one run.
pub fn before_after(balancer: &str, samples: &[Sample]) -> String {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return format!("{balancer}: no samples\n");
    };
    let mut out = format!(
        "{balancer}: before (t={:.0}s) -> after (t={:.0}s): vCPU node, MiB per node, locality \
         (pages, access-weighted)\n",
        first.t_s, last.t_s
    );
    for (a, b) in first.vms.iter().zip(&last.vms) {
        let (before, after) = (
            placement(
                a.main_node,
                &a.bytes_per_node,
                a.locality,
                a.access_locality,
            ),
            placement(
                b.main_node,
                &b.bytes_per_node,
                b.locality,
                b.access_locality,
            ),
        );
        let _ = writeln!(out, "  {:<6} {before}  ->  {after}", a.name);
        // A VM with guest NUMA cells: each cell against its own vCPUs' node.
        for (ca, cb) in a.cells.iter().zip(&b.cells) {
            let (before, after) = (
                placement(
                    ca.main_node,
                    &ca.bytes_per_node,
                    ca.locality,
                    ca.access_locality,
                ),
                placement(
                    cb.main_node,
                    &cb.bytes_per_node,
                    cb.locality,
                    cb.access_locality,
                ),
            );
            let _ = writeln!(out, "    cell {} {before}  ->  {after}", ca.id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_after_shows_each_guest_cell() {
        use lab_protocol::{CellTruth, VmTruth};
        let cell = |id, node, mib: [u64; 4], loc| CellTruth {
            id,
            bytes_per_node: mib.iter().map(|m| m << 20).collect(),
            main_node: Some(node),
            locality: loc,
            access_locality: None,
        };
        let sample = |t_s, cells: Vec<CellTruth>| Sample {
            t_s,
            locality_mean: 0.0,
            locality_min: 0.0,
            vcpu_load_per_node: vec![0.0; 4],
            vms: vec![VmTruth {
                name: "wide".into(),
                pid: 1,
                bytes_per_node: vec![256 << 20; 4],
                vcpu_ticks_per_node: vec![0; 4],
                vcpu_nodes: vec![],
                main_node: Some(0),
                locality: 0.25,
                touches_per_vcpu_s: 0.0,
                hot_locality: None,
                cold_locality: None,
                pages_moved: None,
                queried_present_share: None,
                access_locality: None,
                offnode_accesses_per_s: None,
                cells,
            }],
            access_locality_mean: None,
            hot_locality_mean: None,
            offnode_accesses_per_s: None,
        };
        let text = before_after(
            "vmbalancer",
            &[
                sample(0.0, vec![cell(1, 2, [128; 4], 0.25)]),
                sample(60.0, vec![cell(1, 3, [0, 0, 0, 512], 1.0)]),
            ],
        );
        assert!(
            text.contains(
                "cell 1 node 2 [128/128/128/128]   25% acc   -%  ->  node 3 [  0/  0/  0/512]  100%"
            ),
            "{text}"
        );
    }

    fn summary(name: &str, work: u64, loc: f64) -> Summary {
        let series: Vec<(f64, f64)> = (0..13).map(|i| (i as f64 * 5.0, loc)).collect();
        Summary {
            balancer: name.into(),
            kernel: "6.1".into(),
            vms: 8,
            locality: series.clone(),
            time_to_090_s: (loc >= 0.9).then_some(10.0),
            time_to_095_s: None,
            numa_pages_migrated: 7,
            pgmigrate_success: 9,
            cpu_balance: 0.5,
            work_touches: work,
            touches_per_vcpu_s: 1000.0,
            run_s: 60.0,
            access_locality: series
                .iter()
                .map(|&(t, l)| (t, (l + 0.02).min(1.0)))
                .collect(),
            hot_locality: series
                .iter()
                .map(|&(t, l)| (t, (l + 0.04).min(1.0)))
                .collect(),
            offnode_accesses_per_s: series.iter().map(|&(t, l)| (t, (1.0 - l) * 2e6)).collect(),
            access_time_to_095_s: (loc >= 0.93).then_some(5.0),
            hot_time_to_095_s: (loc >= 0.91).then_some(5.0),
            first_cpu_move_affinity_s: (loc >= 0.9).then_some(2.25),
            first_cpu_move_status_s: (loc >= 0.9).then_some(2.0),
            tick_late_moving_s: (loc >= 0.9).then_some(0.08),
            balancer_cpu_s: (loc >= 0.9).then_some(1.2),
        }
    }

    #[test]
    fn table_has_one_row_per_balancer_and_ratios() {
        let t = table(&[summary("none", 100, 0.25), summary("autonuma", 150, 0.95)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines[0].contains("loc@0s pages/access") && lines[0].contains("loc@60s"));
        assert_eq!(lines[0].matches("loc@").count(), 7);
        assert!(lines[2].starts_with("| none | 0.250/0.270 |") && lines[2].ends_with("| 1.00 |"));
        // hot, off-node rate, t->0.9, t->0.95 pages/access/hot, reaction time.
        assert!(
            lines[2].contains("| 0.290 | 1.50M | never | never | never | never | none seen |"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3]
                .contains("| 0.990 | 100.0k | 10 s | never | 5 s | 5 s | 2.2 s (status 2.0 s) |"),
            "{}",
            lines[3]
        );
        assert!(lines[3].ends_with("| 1.50 |"));
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
        assert_eq!(lines[2].matches('|').count(), lines[0].matches('|').count());
        assert!(lines[5].starts_with("pages/access:"));
    }

    #[test]
    fn an_older_guest_without_access_weighted_values_shows_dashes() {
        let mut old = summary("none", 100, 0.25);
        old.access_locality.clear();
        old.hot_locality.clear();
        old.offnode_accesses_per_s.clear();
        let t = table(&[old]);
        let row = t.lines().nth(2).unwrap();
        assert!(row.starts_with("| none | 0.250/- |"), "{row}");
        assert!(row.contains("| - | - | never |"), "{row}");
    }

    #[test]
    fn rates_are_short() {
        // (rate, shown)
        for (v, want) in [
            (None, "-"),
            (Some(12.4), "12"),
            (Some(56_250.0), "56.2k"),
            (Some(3_250_000.0), "3.25M"),
        ] {
            assert_eq!(per_s(v), want);
        }
    }
}
