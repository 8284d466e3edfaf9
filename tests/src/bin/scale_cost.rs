//! The daemon's steady-state cost against the number of VMs it watches.
//!
//! For each VM count, the program starts that many idle `mini_qemu` VMs (4 vCPU
//! threads each, small guest RAM, one in every `--large-every` with large RAM), then
//! the real `vmbalancer run` at its default configuration (only its state and
//! runtime directories moved to a scratch directory), lets it settle, and measures
//! over a window, from the daemon's own status:
//! - its CPU time (user + system) as a share of one core;
//! - its resident memory (largest seen);
//! - its tick durations, p50 and p99, every tick of the window (status is read four
//!   times a tick and each new tick's duration kept);
//! - the kernel-side cost of its eBPF programs (`kernel.bpf_stats_enabled`): ns per
//!   event and the share of one core they took, which the daemon's CPU time does
//!   not include.
//!
//! A last run holds the smallest count with every VM large: the work of a tick must
//! not grow with VM memory while nothing changes, so its ratio to the small run is
//! the figure to read.
//!
//! Ratios are against the first row, measured in the same run.
//!
//! Usage (root: the daemon loads eBPF programs and reads other processes' /proc):
//! `cargo build --release -p balancer -p vmbalancer-tests && ./target/release/scale_cost
//! [--counts 10,50,200] [--small-mib 16] [--large-mib 1024] [--large-every 50]
//! [--settle-s 30] [--measure-s 60]`. Results: `tests/results/scale-cost.md`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use balancer::daemon::control::{self, Request, Response};
use balancer::daemon::status::StatusDoc;

const VCPUS: u32 = 4;

#[derive(Clone, Debug)]
struct Opts {
    counts: Vec<usize>,
    small_mib: u64,
    large_mib: u64,
    large_every: usize,
    settle: Duration,
    measure: Duration,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        counts: vec![10, 50, 200],
        small_mib: 16,
        large_mib: 1024,
        large_every: 50,
        settle: Duration::from_secs(30),
        measure: Duration::from_secs(60),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || -> anyhow::Result<u64> {
            value
                .parse()
                .with_context(|| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--counts" => {
                o.counts = value
                    .split(',')
                    .map(|c| c.parse().with_context(|| format!("--counts: {c:?}")))
                    .collect::<anyhow::Result<_>>()?
            }
            "--small-mib" => o.small_mib = num()?,
            "--large-mib" => o.large_mib = num()?,
            "--large-every" => o.large_every = num()?.max(1) as usize,
            "--settle-s" => o.settle = Duration::from_secs(num()?),
            "--measure-s" => o.measure = Duration::from_secs(num()?),
            _ => bail!("unknown option {flag}"),
        }
    }
    if o.counts.is_empty() {
        bail!("--counts is empty");
    }
    Ok(o)
}

/// The VMs of one run, killed when dropped.
struct Vms(Vec<Child>);

impl Vms {
    fn start(exe: &Path, mem_mib: &[u64]) -> anyhow::Result<Self> {
        let mut vms = Vms(Vec::with_capacity(mem_mib.len()));
        for (i, mib) in mem_mib.iter().enumerate() {
            let mut c = Command::new(exe)
                .args([
                    "-name",
                    &format!("guest=scale{i},debug-threads=on"),
                    "-smp",
                    &VCPUS.to_string(),
                    "-m",
                    &mib.to_string(),
                    "-idle",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?;
            let mut line = String::new();
            BufReader::new(c.stdout.take().context("piped stdout")?).read_line(&mut line)?;
            vms.0.push(c);
            if !line.starts_with("ready") {
                bail!("mini_qemu {i} did not get ready: {line:?}");
            }
        }
        Ok(vms)
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// The daemon of one run, stopped (SIGTERM) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\nruntime_dir = {:?}\n",
                dir.join("state"),
                dir.join("run")
            ),
        )?;
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(Self {
            child,
            socket: dir.join("run/control.sock"),
            dir: dir.to_path_buf(),
        })
    }

    fn status(&self) -> Option<StatusDoc> {
        match control::request(&self.socket, &Request::Status, Duration::from_secs(5)) {
            Ok(Response::Status(doc)) => Some(*doc),
            _ => None,
        }
    }

    /// Status once the daemon ticks, the eBPF programs are loaded and it sees `vms`.
    fn wait_ready(&mut self, vms: usize) -> anyhow::Result<StatusDoc> {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "the daemon exited ({st}); its log: {}",
                    self.dir.join("daemon.log").display()
                );
            }
            if let Some(doc) = self.status()
                && doc.ebpf.is_some()
                && doc.vms.len() >= vms
            {
                return Ok(doc);
            }
            if Instant::now() > until {
                bail!("the daemon did not see {vms} VMs with eBPF loaded within 120 s");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
struct Row {
    label: String,
    vms: usize,
    vcpus: usize,
    guest_mib: u64,
    cpu_pct: f64,
    rss_mib: f64,
    ticks: usize,
    tick_p50_ms: f64,
    tick_p99_ms: f64,
    ebpf_ns_per_event: f64,
    ebpf_cpu_pct: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn run_one(
    opts: &Opts,
    label: &str,
    mem_mib: &[u64],
    bins: &Path,
    scratch: &Path,
) -> anyhow::Result<Row> {
    eprintln!("scale_cost: {label}: starting {} VMs", mem_mib.len());
    let vms = Vms::start(&bins.join("mini_qemu"), mem_mib)?;
    let mut daemon = Daemon::start(&bins.join("vmbalancer"), scratch)?;
    daemon.wait_ready(mem_mib.len())?;
    std::thread::sleep(opts.settle);
    let first = daemon.status().context("status at the window's start")?;
    let t0 = Instant::now();
    let mut last_tick = first.daemon.ticks;
    let mut tick_ms = Vec::new();
    let mut rss = first.daemon.rss_bytes;
    let mut last = first.clone();
    while t0.elapsed() < opts.measure {
        std::thread::sleep(Duration::from_millis(first.daemon.tick_ms / 4));
        let Some(doc) = daemon.status() else { continue };
        if doc.daemon.ticks != last_tick {
            tick_ms.push(doc.daemon.last_tick_ns as f64 / 1e6);
            last_tick = doc.daemon.ticks;
        }
        rss = rss.max(doc.daemon.rss_bytes);
        last = doc;
    }
    let wall_ns = t0.elapsed().as_nanos() as f64;
    tick_ms.sort_by(f64::total_cmp);
    let (e0, e1) = (
        first.ebpf.unwrap_or_default(),
        last.ebpf.unwrap_or_default(),
    );
    let events = e1.run_count.saturating_sub(e0.run_count) as f64;
    let ebpf_ns = e1.run_time_ns.saturating_sub(e0.run_time_ns) as f64;
    let row = Row {
        label: label.to_string(),
        vms: mem_mib.len(),
        vcpus: mem_mib.len() * VCPUS as usize,
        guest_mib: mem_mib.iter().sum(),
        cpu_pct: 100.0
            * last
                .daemon
                .cpu_time_ns
                .saturating_sub(first.daemon.cpu_time_ns) as f64
            / wall_ns,
        rss_mib: rss as f64 / f64::from(1 << 20),
        ticks: tick_ms.len(),
        tick_p50_ms: percentile(&tick_ms, 0.50),
        tick_p99_ms: percentile(&tick_ms, 0.99),
        ebpf_ns_per_event: if events > 0.0 {
            ebpf_ns / events
        } else {
            f64::NAN
        },
        ebpf_cpu_pct: 100.0 * ebpf_ns / wall_ns,
    };
    if last.vms.len() < mem_mib.len() {
        bail!(
            "{label}: the daemon saw {} of {} VMs at the end",
            last.vms.len(),
            mem_mib.len()
        );
    }
    drop(daemon);
    drop(vms);
    Ok(row)
}

fn main() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    let bins = std::env::current_exe()?
        .parent()
        .context("the program's directory")?
        .to_path_buf();
    for b in ["mini_qemu", "vmbalancer"] {
        if !bins.join(b).exists() {
            bail!(
                "{} missing: build with `cargo build --release -p balancer -p vmbalancer-tests`",
                bins.join(b).display()
            );
        }
    }
    let scratch = std::env::temp_dir().join(format!("vmb-scale-{}", std::process::id()));
    let mut rows = Vec::new();
    for &n in &opts.counts {
        let mem: Vec<u64> = (0..n)
            .map(|i| {
                if i % opts.large_every == 0 {
                    opts.large_mib
                } else {
                    opts.small_mib
                }
            })
            .collect();
        rows.push(run_one(&opts, &format!("{n} VMs"), &mem, &bins, &scratch)?);
    }
    let n0 = opts.counts[0];
    rows.push(run_one(
        &opts,
        &format!("{n0} VMs, all large"),
        &vec![opts.large_mib; n0],
        &bins,
        &scratch,
    )?);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "vmbalancer at its default configuration, idle mini_qemu VMs of {VCPUS} vCPUs \
         ({} MiB, one in {} of {} MiB), settle {} s, window {} s; kernel {}; load {}",
        opts.small_mib,
        opts.large_every,
        opts.large_mib,
        opts.settle.as_secs(),
        opts.measure.as_secs(),
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "| run | VMs | vCPUs | guest GiB | daemon CPU % of a core | x first | RSS MiB | x first | ticks | tick p50 ms | tick p99 ms | x first (p99) | eBPF ns/event | eBPF CPU % of a core |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let base = rows[0].clone();
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.3} |",
            r.label,
            r.vms,
            r.vcpus,
            r.guest_mib as f64 / 1024.0,
            r.cpu_pct,
            r.cpu_pct / base.cpu_pct,
            r.rss_mib,
            r.rss_mib / base.rss_mib,
            r.ticks,
            r.tick_p50_ms,
            r.tick_p99_ms,
            r.tick_p99_ms / base.tick_p99_ms,
            r.ebpf_ns_per_event,
            r.ebpf_cpu_pct,
        );
    }
    let biggest = rows
        .iter()
        .filter(|r| !r.label.contains("large"))
        .max_by_key(|r| r.vms)
        .cloned()
        .unwrap_or(base);
    println!();
    println!(
        "goals at the largest count ({} VMs): daemon CPU <= 2 % of a core: {:.2} ({}); \
         RSS <= 48 MiB: {:.1} ({}); tick p99 <= 100 ms: {:.2} ({})",
        biggest.vms,
        biggest.cpu_pct,
        verdict(biggest.cpu_pct <= 2.0),
        biggest.rss_mib,
        verdict(biggest.rss_mib <= 48.0),
        biggest.tick_p99_ms,
        verdict(biggest.tick_p99_ms <= 100.0),
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
