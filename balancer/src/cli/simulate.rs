//! `vmbalancer simulate`: runs vmbalancer (the daemon's tick with its engine) and the
//! baseline policies on the simulated world over committed scenarios, and prints one
//! row per policy. Also `--calibrate` (fits the performance model on seed 004 and
//! prints held-out predictions) and `--bench` (times one engine decision at several
//! host sizes).

use anyhow::{Context, bail};

use crate::engine::EngineConfig;
use crate::sim::perf::PerfParams;
use crate::sim::policies::{self, NAMES};
use crate::sim::run::{RunResult, run_all};
use crate::sim::scenario::{BUILTIN, Scenario};
use crate::sim::{bench, calibrate};

/// Arguments of `vmbalancer simulate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenario name (built in: seed-40vm, seed-20vm-squeezed, bursty, burst-once,
    /// bursty-long, memory-heavy, big-vm, overcommit, arrivals; or `all`) or a
    /// scenario TOML file.
    /// Repeatable.
    #[arg(long, value_name = "NAME|FILE")]
    pub scenario: Vec<String>,
    /// Policies to run, comma separated (none, manual, vmbalanced, numad, oracle,
    /// vmbalancer). Default: all.
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Engine configuration (TOML, the `[engine]` table's fields) for the vmbalancer policy.
    #[arg(long, value_name = "FILE")]
    pub engine_config: Option<std::path::PathBuf>,
    /// Fit the performance model on seed 004 and print the held-out predictions.
    #[arg(long)]
    pub calibrate: bool,
    /// Time one engine decision at 10/100/1000 VMs x 2/4/8 nodes.
    #[arg(long)]
    pub bench: bool,
    /// Decisions timed per size with `--bench`.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    if args.bench {
        return bench_main(&args);
    }
    if args.calibrate {
        let s40 = Scenario::load("seed-40vm")?;
        let s20 = Scenario::load("seed-20vm-squeezed")?;
        let c = calibrate::calibrate(&s40, &s20);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&c)?);
        } else {
            println!("fitted parameters: {:?}", c.params);
            println!(
                "mean largest per-node memory share, no balancer: {:.3} (seed numa_maps: {:.2})",
                c.largest_share_none,
                calibrate::SEED_LARGEST_SHARE
            );
            println!("| figure | seed 004 | model | error | |");
            println!("|---|---:|---:|---:|---|");
            for r in &c.rows {
                println!(
                    "| {} | {:.1} | {:.1} | {:+.1} % | {} |",
                    r.figure,
                    r.measured,
                    r.model,
                    r.error_pct,
                    if r.fitted { "fitted" } else { "predicted" }
                );
            }
        }
        return Ok(());
    }
    let cfg = match &args.engine_config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => EngineConfig::default(),
    };
    if args.scenario.is_empty() {
        bail!("give --scenario NAME|FILE (or `all`), --calibrate or --bench");
    }
    let names: Vec<String> = if args.scenario.iter().any(|s| s == "all") {
        BUILTIN.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        args.scenario.clone()
    };
    let pols: Vec<String> = if args.policy.is_empty() {
        NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        args.policy.clone()
    };
    for p in &pols {
        if !NAMES.contains(&p.as_str()) {
            bail!("unknown policy {p:?}; known: {}", NAMES.join(", "));
        }
    }
    let params = PerfParams::default();
    let mut all: Vec<RunResult> = Vec::new();
    for name in &names {
        let s = Scenario::load(name)?;
        let mut ps: Vec<Box<dyn policies::Policy>> = pols
            .iter()
            .filter_map(|p| policies::by_name(p, &s, &cfg))
            .collect();
        let rows = run_all(&s, &params, &mut ps);
        if !args.json {
            print_table(&s, &rows);
        }
        all.extend(rows);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

fn print_table(s: &Scenario, rows: &[RunResult]) {
    println!("\n### {} ({} s): {}\n", s.name, s.duration_s, s.description);
    println!(
        "| policy | throughput MB/s | % of oracle | remote % | off-node M/s | GiB migrated | moves | reverts | t95 s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {} | {:.1} | {:.1} | {:.2} | {} | {} | {} |",
            r.policy,
            r.throughput_mb_s,
            r.pct_of_oracle
                .map(|p| format!("{p:.1}"))
                .unwrap_or("-".into()),
            r.remote_pct,
            r.offnode_m_s,
            r.migrated_gib,
            r.moves,
            r.reverts,
            r.time_to_95_s
        );
    }
}

fn bench_main(args: &Args) -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    for vms in [10, 100, 1000] {
        for nodes in [2, 4, 8] {
            sizes.push((vms, nodes));
        }
    }
    let rows = bench::run(&sizes, args.iterations.max(1));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| VMs | nodes | decisions | median ms | p90 ms | actions planned | steady-state median ms | recurring-burst median ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {} | {:.3} | {:.3} |",
            r.vms,
            r.nodes,
            r.iterations,
            r.median_us / 1000.0,
            r.p90_us / 1000.0,
            r.actions,
            r.steady_median_us / 1000.0,
            r.recurring_median_us / 1000.0
        );
    }
    Ok(())
}
