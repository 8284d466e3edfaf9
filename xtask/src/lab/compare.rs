//! The comparison table: one row per balancer, from each run's summary.
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

/// A markdown table comparing `rows`.
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else {
        return "(no runs)\n".into();
    };
    let cols = pick_columns(first.locality.len());
    let mut header = String::from("| balancer |");
    for &c in &cols {
        let _ = write!(header, " loc@{:.0}s |", first.locality[c].0);
    }
    header.push_str(" t->0.9 | t->0.95 | numa_pages_migrated | pgmigrate_success | CPU balance | touches/vCPU/s | work vs first |");
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
                Some((_, l)) => {
                    let _ = write!(line, " {l:.3} |");
                }
                None => line.push_str(" - |"),
            }
        }
        let _ = writeln!(
            out,
            "{line} {} | {} | {} | {} | {:.2} | {:.0} | {:.2} |",
            secs(r.time_to_090_s),
            secs(r.time_to_095_s),
            r.numa_pages_migrated,
            r.pgmigrate_success,
            r.cpu_balance,
            r.touches_per_vcpu_s,
            r.work_touches as f64 / base
        );
    }
    out
}

fn mib_per_node(bytes: &[u64]) -> String {
    let v: Vec<String> = bytes.iter().map(|b| format!("{:>3}", b >> 20)).collect();
    v.join("/")
}

/// Per VM: where its vCPUs ran most and its memory per node (MiB), at the first
/// and the last sample of one run.
pub fn before_after(balancer: &str, samples: &[Sample]) -> String {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return format!("{balancer}: no samples\n");
    };
    let mut out = format!(
        "{balancer}: before (t={:.0}s) -> after (t={:.0}s): vCPU node, MiB per node, locality\n",
        first.t_s, last.t_s
    );
    for (a, b) in first.vms.iter().zip(&last.vms) {
        let node = |n: Option<usize>| n.map_or("-".into(), |n| n.to_string());
        let _ = writeln!(
            out,
            "  {:<6} node {} [{}] {:>4.0}%  ->  node {} [{}] {:>4.0}%",
            a.name,
            node(a.main_node),
            mib_per_node(&a.bytes_per_node),
            a.locality * 100.0,
            node(b.main_node),
            mib_per_node(&b.bytes_per_node),
            b.locality * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, work: u64, loc: f64) -> Summary {
        Summary {
            balancer: name.into(),
            kernel: "6.1".into(),
            vms: 8,
            locality: (0..13).map(|i| (i as f64 * 5.0, loc)).collect(),
            time_to_090_s: (loc >= 0.9).then_some(10.0),
            time_to_095_s: None,
            numa_pages_migrated: 7,
            pgmigrate_success: 9,
            cpu_balance: 0.5,
            work_touches: work,
            touches_per_vcpu_s: 1000.0,
            run_s: 60.0,
        }
    }

    #[test]
    fn table_has_one_row_per_balancer_and_ratios() {
        let t = table(&[summary("none", 100, 0.25), summary("autonuma", 150, 0.95)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].contains("loc@0s") && lines[0].contains("loc@60s"));
        assert_eq!(lines[0].matches("loc@").count(), 7);
        assert!(lines[2].starts_with("| none |") && lines[2].ends_with("| 1.00 |"));
        assert!(lines[3].contains("| 10 s | never |") && lines[3].ends_with("| 1.50 |"));
        assert_eq!(lines[1].matches('|').count(), lines[0].matches('|').count());
    }
}
