//! `cargo xtask lab`: boots a real 4-node NUMA kernel under QEMU and runs
//! scenarios from `tests/scenarios/` in it.
//!
//! This machine kind has one NUMA node; the lab guest gives vmbalancer a real
//! multi-node kernel (cpusets, migrate_pages, numa_maps, NUMA hinting faults,
//! eBPF) in CI. Modules: [`kernel`] fetches and caches the guest kernel, [`host`]
//! installs host packages and builds the guest binaries, [`initramfs`] packs the
//! guest, [`qemu`] boots it and streams the console, [`results`] parses the
//! harness's result lines, [`compare`] prints the comparison table and
//! [`capture`] writes captured trees to `tests/fixtures/`.
//!
//! Usage:
//! - `cargo xtask lab boot` / `cargo xtask lab S1 S2 --kernel 6.12`
//! - `cargo xtask lab --list`, `cargo xtask lab --shell`
//! - `cargo xtask lab --compare scattered --balancers none,autonuma,numad [--out FILE]`
//! - `cargo xtask lab capture [SCENARIO] [--capture-at-s S] [--capture-vms N]`
//! - `cargo xtask lab demo`
//! - `cargo xtask lab ci` (what CI runs: [`CI_SCENARIOS`])

mod capture;
mod compare;
mod host;
mod initramfs;
mod kernel;
mod qemu;
mod results;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

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

/// What the host needs to know of a scenario (the guest parses the full format).
pub struct ScenarioFile {
    name: String,
    text: String,
    description: String,
    timeout_s: u64,
    compare: Vec<String>,
}

fn load_scenario(paths: &Paths, name: &str) -> anyhow::Result<ScenarioFile> {
    let path = paths.scenarios.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no scenario {name:?} ({}); try --list", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let num = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
    };
    let compare = value
        .get("compare")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_else(|| vec!["none".into(), "autonuma".into(), "numad".into()]);
    Ok(ScenarioFile {
        name: name.to_string(),
        description: value
            .get("description")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        timeout_s: num("timeout_s").unwrap_or(300.0) as u64,
        compare,
        text,
    })
}

fn list(paths: &Paths) -> anyhow::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(&paths.scenarios)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(String::from)
        })
        .collect();
    names.sort();
    for n in names {
        let s = load_scenario(paths, &n)?;
        println!("{n:<20} {}", s.description);
    }
    Ok(())
}

/// Everything prepared once per `cargo xtask lab` invocation.
pub struct Lab {
    paths: Paths,
    kernel_gen: KernelGen,
    kernel: PathBuf,
    base: PathBuf,
    work: PathBuf,
    verbose: bool,
    timeout_override: Option<u64>,
}

/// One finished guest run.
pub struct RunResult {
    pub ok: bool,
    pub summary: Option<results::Summary>,
    pub captures: Vec<(String, String)>,
    pub samples: Vec<results::Sample>,
    pub boot_s: f64,
    pub init_s: Option<f64>,
}

impl Lab {
    /// Installs packages, fetches the kernel, builds binaries and the base initramfs.
    pub fn prepare(
        kernel_gen: KernelGen,
        verbose: bool,
        timeout_override: Option<u64>,
    ) -> anyhow::Result<Self> {
        let paths = Paths::discover();
        host::ensure_packages()?;
        let kernel = kernel::ensure(&paths.target, kernel_gen)?;
        let bins = host::build_binaries(&paths.workspace, &paths.target)?;
        let work = paths.target.join("lab").join("work");
        std::fs::create_dir_all(&work)?;
        let base = initramfs::build_base(&work, &bins)?;
        Ok(Self {
            paths,
            kernel_gen,
            kernel,
            base,
            work,
            verbose,
            timeout_override,
        })
    }

    fn initrd(
        &self,
        s: &ScenarioFile,
        harness_args: &str,
        shell: bool,
        tag: &str,
    ) -> anyhow::Result<PathBuf> {
        initramfs::build_initrd(
            &self.work,
            &self.base,
            &initramfs::RunFiles {
                scenario_toml: &s.text,
                harness_args,
                shell,
            },
            tag,
        )
    }

    /// Boots the guest once for scenario `s` with extra harness arguments.
    pub fn run_scenario(
        &self,
        s: &ScenarioFile,
        extra: &str,
        tag: &str,
    ) -> anyhow::Result<RunResult> {
        let args = format!(
            "--scenario /lab/scenario.toml --name {} --kernel {} {extra}",
            s.name,
            self.kernel_gen.label()
        );
        let initrd = self.initrd(s, &args, false, tag)?;
        let timeout = Duration::from_secs(self.timeout_override.unwrap_or(s.timeout_s));
        eprintln!(
            "lab: booting kernel {} ({}) for scenario {} ({tag}), timeout {} s",
            self.kernel_gen.label(),
            self.kernel.display(),
            s.name,
            timeout.as_secs()
        );
        let verbose = self.verbose;
        let seen_init = std::cell::Cell::new(false);
        let echo = |line: &str| -> Option<String> {
            if line.contains("@@VMBLAB-INIT@@") {
                seen_init.set(true);
            }
            if !verbose && !seen_init.get() && !line.starts_with("qemu:") {
                return None; // the kernel's boot log
            }
            results::render(line)
        };
        let boot = qemu::run(
            qemu::command(&self.kernel, &initrd, ""),
            timeout,
            "[guest] ",
            &echo,
        )
        .with_context(|| format!("scenario {} on kernel {}", s.name, self.kernel_gen.label()))?;
        let console = self
            .work
            .join(format!("console-{tag}-{}.log", self.kernel_gen.label()));
        std::fs::write(&console, boot.lines.join("\n"))
            .with_context(|| format!("writing {}", console.display()))?;
        eprintln!("lab: full console log in {}", console.display());
        let mut ok = None;
        let mut summary = None;
        let mut captures = Vec::new();
        let mut samples = Vec::new();
        for line in &boot.lines {
            match results::parse(line) {
                Some(results::Record::Done { ok: o, .. }) => ok = Some(o),
                Some(results::Record::Summary(s)) => summary = Some(s),
                Some(results::Record::Capture { path, data }) => captures.push((path, data)),
                Some(results::Record::Sample(s)) => samples.push(s),
                _ => {}
            }
        }
        let r = RunResult {
            ok: ok.unwrap_or(false),
            summary,
            captures,
            samples,
            boot_s: boot.elapsed.as_secs_f64(),
            init_s: boot.init_after.map(|d| d.as_secs_f64()),
        };
        eprintln!(
            "lab: {} on kernel {}: guest ran {:.1} s (init reached after {}), verdict {}",
            s.name,
            self.kernel_gen.label(),
            r.boot_s,
            r.init_s.map_or("never".into(), |s| format!("{s:.1} s")),
            if r.ok { "PASS" } else { "FAIL" }
        );
        if ok.is_none() {
            bail!(
                "the guest powered off without a verdict for {} (see the console above)",
                s.name
            );
        }
        Ok(r)
    }

    pub fn shell(&self) -> anyhow::Result<()> {
        let s = ScenarioFile {
            name: "shell".into(),
            text: std::fs::read_to_string(self.paths.scenarios.join("boot.toml"))
                .unwrap_or_default(),
            description: String::new(),
            timeout_s: 0,
            compare: Vec::new(),
        };
        let initrd = self.initrd(
            &s,
            "--scenario /lab/scenario.toml --name boot",
            true,
            "shell",
        )?;
        qemu::interactive(qemu::command(&self.kernel, &initrd, ""))
    }
}

/// Scenarios CI runs on each kernel generation (`cargo xtask lab ci`). Add the
/// vmbalancer scenarios to the 6.1 list as they appear.
pub const CI_SCENARIOS: &[(KernelGen, &[&str])] = &[
    (KernelGen::V6_1, &["boot", "placement"]),
    (KernelGen::V6_12, &["boot"]),
];

/// The lab's CI step: every scenario of [`CI_SCENARIOS`] on its kernel. Fails if
/// any fails. Callable from other xtask steps as `crate::lab::ci()`.
pub fn ci() -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    for (generation, names) in CI_SCENARIOS {
        let lab = Lab::prepare(*generation, false, None)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        run_with(&lab, &names, None)?;
    }
    eprintln!(
        "lab: CI scenarios passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_with(lab: &Lab, names: &[String], balancer: Option<&str>) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for name in names {
        let s = load_scenario(&lab.paths, name)?;
        let extra = balancer.map_or(String::new(), |b| format!("--balancer {b}"));
        let r = lab.run_scenario(&s, &extra, name)?;
        if !r.ok {
            failed.push(name.clone());
        }
    }
    if !failed.is_empty() {
        bail!("lab scenario(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

fn compare_runs(
    lab: &Lab,
    name: &str,
    balancers: &[String],
    out: Option<&Path>,
    show_before_after: bool,
) -> anyhow::Result<()> {
    let s = load_scenario(&lab.paths, name)?;
    let balancers = if balancers.is_empty() {
        s.compare.clone()
    } else {
        balancers.to_vec()
    };
    let mut rows = Vec::new();
    let mut timings = Vec::new();
    let mut before_after = Vec::new();
    for b in &balancers {
        let r = lab.run_scenario(&s, &format!("--balancer {b}"), &format!("{name}-{b}"))?;
        timings.push(format!(
            "{b}: guest ran {:.0} s (init after {})",
            r.boot_s,
            r.init_s.map_or("?".into(), |t| format!("{t:.1} s"))
        ));
        if show_before_after {
            let text = compare::before_after(b, &r.samples);
            println!("\n{text}");
            before_after.push(text);
        }
        let summary = r
            .summary
            .with_context(|| format!("the {b} run of {name} reported no summary"))?;
        rows.push(summary);
    }
    let table = compare::table(&rows);
    println!(
        "\nScenario {name} ({}), kernel {}:\n\n{table}",
        s.description,
        lab.kernel_gen.label()
    );
    println!("Boot timings: {}", timings.join("; "));
    if let Some(out) = out {
        let cmd = if show_before_after {
            format!("cargo xtask lab demo --kernel {}", lab.kernel_gen.label())
        } else {
            format!(
                "cargo xtask lab --compare {name} --balancers {} --kernel {}",
                balancers.join(","),
                lab.kernel_gen.label()
            )
        };
        let text = format!(
            "# Lab comparison: scenario `{name}`\n\nCommand:\n\n    {cmd}\n\nScenario: {}\n\
             Guest: kernel {} (Debian), QEMU TCG, 4 nodes x 2 CPUs x 2 GiB, SLIT 10/21/31.\n\n{table}\n\
             Columns: `loc@Ts` is the page-weighted mean over VMs of the share of each VM's memory on the\n\
             node where its vCPUs ran most in the preceding interval; `t->0.9` is the first sample at which\n\
             that mean reached 0.9; pages migrated are /proc/vmstat deltas over the run; CPU balance is\n\
             least/most loaded node by vCPU time (1 = even), averaged over samples; work is memory touches\n\
             by the fake VMs' vCPUs, and `work vs first` the ratio to the first row of the same command.\n\n\
             Boot timings: {}\n",
            s.description,
            lab.kernel_gen.label(),
            timings.join("; ")
        );
        let text = if before_after.is_empty() {
            text
        } else {
            format!(
                "{text}\nBefore and after, per VM:\n\n```\n{}```\n",
                before_after.join("\n")
            )
        };
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("lab: wrote {}", out.display());
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
        Some("demo") => {
            println!(
                "vmbalancer lab demo: fake VMs scattered over 4 NUMA nodes, one boot per balancer."
            );
            compare_runs(&lab, "demo", &args.balancers, args.out.as_deref(), true)
        }
        _ => run_with(&lab, &args.scenarios, args.balancer.as_deref()),
    }
}
