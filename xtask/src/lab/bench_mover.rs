//! `cargo xtask lab bench-mover`: one guest run of the harness's mover benchmark
//! (`lab-harness --bench-mover`), printed as one table per layout with each
//! method's pages per second and its ratio to numactl's `migratepages` measured in
//! the same run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use super::results::MoverBench;
use super::runner::Lab;
use super::scenarios::load_scenario;

/// The method every other is compared with.
const BASELINE: &str = "migratepages";

pub fn run(lab: &Lab, out: Option<&Path>) -> anyhow::Result<()> {
    let s = load_scenario(&lab.paths, "bench-mover")?;
    let r = lab.run_scenario(&s, "--bench-mover", "bench-mover")?;
    if r.bench.is_empty() {
        bail!("the guest reported no mover benchmark rows");
    }
    let table = table(&r.bench);
    println!(
        "\nMover benchmark, kernel {}:\n\n{table}",
        lab.kernel_gen.label()
    );
    if let Some(out) = out {
        let text = format!(
            "# Mover benchmark\n\nCommand:\n\n    cargo xtask lab bench-mover --kernel {}\n\n\
             Guest: kernel {} (Debian), QEMU TCG, 4 nodes x 2 CPUs x 2 GiB. Fake VMs with 2 \
             busy vCPUs each; every method moves each VM's guest RAM to another node, VM \
             after VM (see tests/src/bin/lab_harness/bench_mover.rs).\n\n{table}\n\
             Columns: pages are the kernel's pgmigrate_success delta (base pages); `vs {BASELINE}` \
             is pages/s over {BASELINE}'s pages/s for the same layout in the same run; `on target` \
             is the share of guest RAM on the target nodes afterwards; calls are syscalls that \
             moved pages (processes for {BASELINE}).\n",
            lab.kernel_gen.label(),
            lab.kernel_gen.label(),
        );
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("lab: wrote {}", out.display());
    }
    if !r.ok {
        bail!("the mover benchmark left pages behind (see the checks above)");
    }
    Ok(())
}

fn pages_per_s(b: &MoverBench) -> f64 {
    b.pages as f64 / b.seconds.max(1e-9)
}

/// One markdown table: a row per layout and method, in the order measured.
pub fn table(rows: &[MoverBench]) -> String {
    let mut t = format!(
        "| layout | method | pages | seconds | pages/s | MB/s | vs {BASELINE} | on target | calls |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for b in rows {
        let base = rows
            .iter()
            .find(|x| x.layout == b.layout && x.method == BASELINE)
            .map(pages_per_s);
        let ratio = base
            .filter(|&p| p > 0.0)
            .map_or("-".into(), |p| format!("{:.2}", pages_per_s(b) / p));
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {ratio} | {:.3} | {} |",
            b.layout,
            b.method,
            b.pages,
            b.seconds,
            pages_per_s(b),
            pages_per_s(b) * 4096.0 / 1e6,
            b.on_target,
            b.calls
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(layout: &str, method: &str, pages: u64, seconds: f64) -> MoverBench {
        MoverBench {
            layout: layout.into(),
            method: method.into(),
            pages,
            seconds,
            on_target: 1.0,
            calls: 1,
        }
    }

    #[test]
    fn ratios_are_against_the_same_layouts_baseline() {
        let t = table(&[
            row("4k 256M x1", "migratepages", 65536, 1.0),
            row("4k 256M x1", "vmbalancer", 65536, 2.0),
            row("thp 256M x1", "migratepages", 65536, 0.5),
            row("thp 256M x1", "vmbalancer", 65536, 0.5),
            row("thp 1G x1", "vmbalancer", 1, 1.0),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[3].contains("| 0.50 |"), "{}", lines[3]);
        assert!(lines[5].contains("| 1.00 |"), "{}", lines[5]);
        // No baseline in that layout: no ratio.
        assert!(lines[6].contains("| - |"), "{}", lines[6]);
    }
}
