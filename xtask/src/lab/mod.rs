//! `cargo xtask lab`: boots a real 4-node NUMA kernel under QEMU and runs
//! scenarios from `tests/scenarios/` in it.
//!
//! This machine kind has one NUMA node; the lab guest gives vmbalancer a real
//! multi-node kernel (cpusets, migrate_pages, numa_maps, NUMA hinting faults,
//! eBPF) in CI. Modules: [`kernel`] fetches and caches the guest kernel, [`host`]
//! installs host packages and builds the guest binaries, [`initramfs`] packs the
//! guest, [`qemu`] boots it and streams the console, [`results`] parses the
//! harness's result lines, [`compare`] prints the comparison table and
//! [`capture`] writes captured trees to `tests/fixtures/`; [`stack`] builds the
//! Debian/systemd/libvirt guest of `guest = "stack"` scenarios.
//!
//! Usage:
//! - `cargo xtask lab boot` / `cargo xtask lab S1 S2 --kernel 6.12`
//! - `cargo xtask lab --list`, `cargo xtask lab --shell`
//! - `cargo xtask lab --compare scattered --balancers none,autonuma,numad [--out FILE]`
//! - `cargo xtask lab capture [SCENARIO] [--capture-at-s S] [--capture-vms N]`
//! - `cargo xtask lab demo`
//! - `cargo xtask lab bench-mover [--out FILE]` (the page mover against `migratepages`)
//! - `cargo xtask lab ci` (what CI runs: [`CI_SCENARIOS`])

mod bench_mover;
mod capture;
mod compare;
mod host;
mod initramfs;
mod kernel;
mod qemu;
mod results;
mod runner;
mod scenarios;
mod stack;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use kernel::KernelGen;

/// Arguments of `cargo xtask lab`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run (names of tests/scenarios/*.toml), or `capture` / `demo` / `ci`.
    pub scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Guest kernel generation (Debian bookworm 6.1 or trixie 6.12).
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: KernelGen,
    /// Boot to an interactive shell on this terminal instead of running a scenario.
    #[arg(long)]
    pub shell: bool,
    /// Run SCENARIO once per balancer and print one comparison table.
    #[arg(long, value_name = "SCENARIO")]
    pub compare: Option<String>,
    /// Balancers for --compare / demo (default: the scenario's `compare` list).
    #[arg(long, value_delimiter = ',')]
    pub balancers: Vec<String>,
    /// Override the scenario's balancer for a single run.
    #[arg(long)]
    pub balancer: Option<String>,
    /// Override the scenario's host-side timeout (seconds).
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Also write the comparison (markdown, with the command) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// capture: seconds after t = 0 at which the files are captured.
    #[arg(long, default_value_t = 20.0)]
    pub capture_at_s: f64,
    /// capture: how many VMs' /proc trees to keep.
    #[arg(long, default_value_t = 3)]
    pub capture_vms: usize,
    /// Show every console line (kernel messages included); default hides the
    /// kernel's boot log.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Paths the lab works with.
pub struct Paths {
    pub workspace: PathBuf,
    pub target: PathBuf,
    pub scenarios: PathBuf,
    pub fixtures: PathBuf,
}

impl Paths {
    pub fn discover() -> Self {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        Self {
            scenarios: workspace.join("tests/scenarios"),
            fixtures: workspace.join("tests/fixtures"),
            workspace,
            target,
        }
    }
}

use runner::{Lab, compare_runs, run_with};
use scenarios::{list, load_scenario};

/// Scenarios CI runs on each kernel generation (`cargo xtask lab ci`), each once
/// under its own balancer: those whose subject has no counterpart under none,
/// autonuma or numad (a dry run, trace's own report, a SIGKILLed and restarted
/// daemon, a systemd-style start, numad's `-R` reserved CPUs, the daemon's reaction
/// to a new VM;
/// the stack guest's libvirt domains balanced by the packaged daemon under
/// systemd, on 4 KiB pages, on 2 MiB huge pages preallocated on the wrong node, and
/// the cheapest VM to move off an overloaded node (the busybox `cheapest-move`, the
/// same case with the fake VM, runs on demand); a wide VM in guest NUMA cells with
/// the fake VM (`stack-cells`, the same case with a libvirt domain, met its bars in 5
/// of its last 6 runs, half of them without margin, and runs on demand until it holds
/// them with one).
pub const CI_SCENARIOS: &[(KernelGen, &[&str])] = &[
    (
        KernelGen::V6_1,
        &[
            "boot",
            "dry-run",
            "trace-truth",
            "crash",
            "daemon-unit",
            "reserved",
            "stack-scattered",
            "stack-lifecycle",
            "stack-hugetlb",
            "guest-cells",
            "stack-cheapest-move",
            "reaction",
        ],
    ),
    (KernelGen::V6_12, &["boot", "trace-truth"]),
];

/// Scenarios CI runs as comparisons on 6.1: under each balancer of the scenario's
/// `compare` list and then its own (vmbalancer), whose assertions must hold; the
/// tables go to `target/lab/compare/NAME.md`. These are the scenarios where the
/// baselines meet the same workload and have something to show (where memory ends
/// up, how much of it moved, what a spike or a full node does to it).
pub const CI_COMPARISONS: &[&str] = &[
    "scattered",
    "squeezed",
    "burst",
    "burst-lasting",
    "full-node",
];

/// The lab's CI step: every scenario of [`CI_SCENARIOS`] on its kernel and every
/// comparison of [`CI_COMPARISONS`]. Fails if any fails. Callable from other xtask
/// steps as `crate::lab::ci()`.
pub fn ci() -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let mut passed = 0;
    for (generation, names) in CI_SCENARIOS {
        let lab = Lab::prepare(*generation, false, None)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        run_with(&lab, &names, None)?;
        passed += names.len();
    }
    let lab = Lab::prepare(KernelGen::V6_1, false, None)?;
    let mut failed = Vec::new();
    for name in CI_COMPARISONS {
        let s = scenarios::load_scenario(&lab.paths, name)?;
        let mut balancers = s.compare.clone();
        if !balancers.contains(&s.balancer) {
            balancers.push(s.balancer.clone());
        }
        let out = lab
            .paths
            .target
            .join("lab/compare")
            .join(format!("{name}.md"));
        match compare_runs(&lab, name, &balancers, Some(&out), false) {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("lab: {e:#}");
                failed.push(*name);
            }
        }
    }
    eprintln!(
        "lab: CI scenarios done in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    // The plain closing line test reports understand.
    println!("lab: {passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        bail!("lab comparison(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let paths = Paths::discover();
    if args.list {
        return list(&paths);
    }
    let first = args.scenarios.first().map(String::as_str);
    if first.is_none() && args.compare.is_none() && !args.shell {
        bail!("name a scenario (see --list), or use --compare, --shell, `capture` or `demo`");
    }
    if first == Some("ci") {
        return ci();
    }
    let lab = Lab::prepare(args.kernel, args.verbose, args.timeout_s)?;
    if args.shell {
        return lab.shell();
    }
    if let Some(name) = &args.compare {
        return compare_runs(&lab, name, &args.balancers, args.out.as_deref(), false);
    }
    match first {
        Some("capture") => {
            let name = args.scenarios.get(1).map_or("scattered", String::as_str);
            let s = load_scenario(&lab.paths, name)?;
            let extra = format!(
                "--capture-at-s {} --capture-vms {} {}",
                args.capture_at_s,
                args.capture_vms,
                args.balancer
                    .as_ref()
                    .map_or(String::new(), |b| format!("--balancer {b}"))
            );
            let r = lab.run_scenario(&s, &extra, &format!("capture-{name}"))?;
            let dir = lab
                .paths
                .fixtures
                .join(format!("lab-{name}-{}", lab.kernel_gen.label()));
            capture::write_tree(&dir, &r.captures)?;
            eprintln!(
                "lab: captured {} files into {}",
                r.captures.len(),
                dir.display()
            );
            Ok(())
        }
        Some("bench-mover") => bench_mover::run(&lab, args.out.as_deref()),
        Some("demo") => {
            println!(
                "vmbalancer lab demo: fake VMs scattered over 4 NUMA nodes, one boot per balancer."
            );
            compare_runs(&lab, "demo", &args.balancers, args.out.as_deref(), true)
        }
        _ => run_with(&lab, &args.scenarios, args.balancer.as_deref()),
    }
}
