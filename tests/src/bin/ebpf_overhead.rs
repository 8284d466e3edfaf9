//! Measures what the eBPF telemetry costs the threads of the host: page faults,
//! context switches and CPU migrations, timed in the same run without programs
//! (`off`), with a do-nothing program on the same hooks (`floor`), with the
//! telemetry loaded while the measured threads are not tracked (`untracked`, what
//! most threads of a host see) and while they are (`tracked`, a VM's threads).
//!
//! Each round runs the four phases once, in an order that rotates from round to
//! round so that drift (the machine is shared) does not favour one phase; each
//! phase's time is divided by the `off` time of its own round, and the report gives
//! the median of those ratios with their interquartile range. Beside the wall clock
//! it prints the kernel's own run-time statistics (`kernel.bpf_stats_enabled`,
//! `run_time_ns / run_cnt`) of every program, per phase. Those statistics add two
//! clock reads around every run; the `floor` program (two instructions, `r0 = 0;
//! exit`) measures that share on each hook, so a program's own cost is its figure
//! minus the floor of its hook.
//!
//! The do-nothing program is loaded with two raw `bpf(2)` calls rather than from an
//! object file: it has no maps, no BTF and no relocations, and building a second
//! eBPF object for it would need the nightly toolchain only for two instructions.
//! Needs root.
//!
//! Usage: `cargo run -p vmbalancer-tests --bin ebpf_overhead [-- --rounds N]
//! [--skip-paths KIND,...]]`; `--skip-paths tp_btf` (or `tp_btf,raw_tp`) measures the
//! fallback paths (see `LoadOptions::skip_paths`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{Context, bail};
use balancer::telemetry::{LoadOptions, ProgramCost, Telemetry, TrackedThread};

const PAGES: usize = 16384;
const PAGE: usize = 4096;
const ROUND_TRIPS: usize = 20000;
const MIGRATIONS: usize = 2000;
/// Threads of other (fake) VMs in the tracked map during the telemetry phases, as on
/// a host that runs VMs: the map is not empty when the measured threads are looked up.
const OTHER_TRACKED: u32 = 256;

fn pin_self(cpu: usize) {
    // A refusal only leaves the thread where it was, as before.
    let _ = vmbalancer_tests::anon::pin_self(cpu as u32);
}

fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// Online CPUs of the machine (not of this thread's affinity, which the workloads
/// narrow).
fn online_cpus() -> usize {
    // SAFETY: no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// What one phase does with the measured threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Off,
    Floor,
    Untracked,
    Tracked,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Off, Phase::Floor, Phase::Untracked, Phase::Tracked];

    fn name(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Floor => "floor",
            Phase::Untracked => "untracked",
            Phase::Tracked => "tracked",
        }
    }
}

/// Tracks `tid` as a thread of this process when telemetry is given and `track` is set.
fn maybe_track(t: &mut Option<&mut Telemetry>, tid: u32) -> anyhow::Result<()> {
    if let Some(t) = t {
        t.track(
            tid,
            TrackedThread {
                vm_pid: std::process::id(),
                vcpu_index: 0,
            },
        )?;
    }
    Ok(())
}

/// ns per first-touch page fault of a fresh anonymous mapping (no huge pages).
fn page_faults(mut track: Option<&mut Telemetry>) -> anyhow::Result<f64> {
    maybe_track(&mut track, gettid())?;
    let len = PAGES * PAGE;
    let p = vmbalancer_tests::anon::map(len, Some(libc::MADV_NOHUGEPAGE))
        .map_err(|e| anyhow::anyhow!("mmap failed: {e}"))?;
    let start = Instant::now();
    for i in 0..PAGES {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(p.add(i * PAGE), 1) };
    }
    let ns = start.elapsed().as_nanos() as f64 / PAGES as f64;
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p.cast(), len) };
    Ok(ns)
}

/// ns per context switch: two threads pinned to one CPU pass a byte back and forth.
fn context_switches(mut track: Option<&mut Telemetry>) -> anyhow::Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || -> std::io::Result<()> {
        pin_self(0);
        tid_tx.send(gettid()).ok();
        let mut buf = [0u8; 1];
        for _ in 0..ROUND_TRIPS {
            b.read_exact(&mut buf)?;
            b.write_all(&buf)?;
        }
        Ok(())
    });
    pin_self(0);
    let peer_tid = tid_rx.recv()?;
    maybe_track(&mut track, gettid())?;
    maybe_track(&mut track, peer_tid)?;
    let mut buf = [1u8; 1];
    let start = Instant::now();
    for _ in 0..ROUND_TRIPS {
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
    }
    let ns = start.elapsed().as_nanos() as f64 / (2 * ROUND_TRIPS) as f64;
    peer.join()
        .map_err(|_| anyhow::anyhow!("peer panicked"))??;
    Ok(ns)
}

/// ns per CPU migration: the thread moves itself between the first two CPUs by
/// changing its affinity (each change runs `set_task_cpu()`, the hook of
/// `sched:sched_migrate_task`). `None` on a machine with one CPU.
fn migrations(mut track: Option<&mut Telemetry>) -> anyhow::Result<Option<f64>> {
    if online_cpus() < 2 {
        return Ok(None);
    }
    maybe_track(&mut track, gettid())?;
    let start = Instant::now();
    for i in 0..MIGRATIONS {
        pin_self(i % 2);
    }
    let ns = start.elapsed().as_nanos() as f64 / MIGRATIONS as f64;
    pin_self(0);
    Ok(Some(ns))
}

/// Per-event times of one phase of one round.
#[derive(Clone, Copy, Debug, Default)]
struct Times {
    page_fault_ns: f64,
    switch_ns: f64,
    migration_ns: Option<f64>,
}

fn workload(mut t: Option<&mut Telemetry>) -> anyhow::Result<Times> {
    // One telemetry handle, lent to each workload in turn.
    Ok(Times {
        page_fault_ns: page_faults(t.as_deref_mut())?,
        switch_ns: context_switches(t.as_deref_mut())?,
        migration_ns: migrations(t)?,
    })
}

/// A program that does nothing, attached to raw tracepoints: what the kernel's
/// run-time statistics cost per event on a hook.
mod floor {
    use super::*;
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info, bpf_prog_type};

    /// `r0 = 0; exit`, encoded as `struct bpf_insn` (opcode in the low byte).
    const NOOP: [u64; 2] = [0xb7, 0x95];

    fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
        // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn owned(fd: i64) -> OwnedFd {
        // SAFETY: a new descriptor the kernel just returned to us.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// The do-nothing program attached to one raw tracepoint until dropped.
    pub struct Floor {
        pub hook: &'static str,
        prog: OwnedFd,
        _link: OwnedFd,
    }

    impl Floor {
        pub fn attach(hook: &'static str) -> anyhow::Result<Self> {
            let license = c"GPL";
            // SAFETY: all-zero is the documented default of every bpf_attr field.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            // SAFETY: writing the fields of the BPF_PROG_LOAD member of the union.
            unsafe {
                let u = &mut attr.__bindgen_anon_3;
                u.prog_type = bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT as u32;
                u.insns = NOOP.as_ptr() as u64;
                u.insn_cnt = NOOP.len() as u32;
                u.license = license.as_ptr() as u64;
                for (d, s) in u.prog_name.iter_mut().zip(b"vmb_floor") {
                    *d = *s as libc::c_char;
                }
            }
            let prog = owned(
                sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).context("loading the floor program")?,
            );
            let name = std::ffi::CString::new(hook)?;
            // SAFETY: as above.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            attr.raw_tracepoint.name = name.as_ptr() as u64;
            attr.raw_tracepoint.prog_fd = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
            let link = owned(
                sys_bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr)
                    .with_context(|| format!("attaching the floor program to {hook}"))?,
            );
            Ok(Self {
                hook,
                prog,
                _link: link,
            })
        }

        /// (runs, run time ns) since loading.
        pub fn stats(&self) -> anyhow::Result<(u64, u64)> {
            // SAFETY: plain data, zero is valid.
            let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            attr.info.bpf_fd = std::os::fd::AsRawFd::as_raw_fd(&self.prog) as u32;
            attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
            attr.info.info = &mut info as *mut bpf_prog_info as u64;
            sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
                .context("reading the floor program's statistics")?;
            Ok((info.run_cnt, info.run_time_ns))
        }
    }
}

/// The hook a telemetry program runs on (where its floor is measured).
fn hook_of(program: &str) -> Option<&'static str> {
    match program {
        "sched_switch" | "sched_switch_btf" | "sched_switch_tp" => Some("sched_switch"),
        "page_fault_user" => Some("page_fault_user"),
        "sched_migrate_task" | "sched_migrate_task_btf" | "sched_migrate_task_raw" => {
            Some("sched_migrate_task")
        }
        _ => None,
    }
}

const FLOOR_HOOKS: [&str; 3] = ["sched_switch", "page_fault_user", "sched_migrate_task"];

/// Runs and run time of each program over one phase (a difference of two readings).
type Costs = BTreeMap<String, (u64, u64)>;

fn delta(before: &[ProgramCost], after: &[ProgramCost]) -> Costs {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.program == a.program);
            let (runs, ns) = b.map_or((0, 0), |b| (b.run_count, b.run_time_ns));
            (
                a.program.clone(),
                (
                    a.run_count.saturating_sub(runs),
                    a.run_time_ns.saturating_sub(ns),
                ),
            )
        })
        .collect()
}

/// Fake thread ids of other VMs: the top of the thread id space, where no thread of
/// this short run lives.
fn other_vm_threads() -> Vec<u32> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (1..=OTHER_TRACKED).map(|i| pid_max - i).collect()
}

/// One phase of one round: the times and, for the eBPF phases, the cost per program.
fn run_phase(phase: Phase, opts: &LoadOptions) -> anyhow::Result<(Times, Costs)> {
    match phase {
        Phase::Off => Ok((workload(None)?, Costs::new())),
        Phase::Floor => {
            let floors = FLOOR_HOOKS
                .iter()
                .map(|h| floor::Floor::attach(h))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let times = workload(None)?;
            let mut costs = Costs::new();
            for f in &floors {
                costs.insert(format!("floor@{}", f.hook), f.stats()?);
            }
            Ok((times, costs))
        }
        Phase::Untracked | Phase::Tracked => {
            let mut t = Telemetry::load_with(opts)?;
            let other_vm = TrackedThread {
                vm_pid: 1,
                vcpu_index: 0,
            };
            for tid in other_vm_threads() {
                t.track(tid, other_vm)?;
            }
            let before = t.cost()?;
            let times = if phase == Phase::Tracked {
                workload(Some(&mut t))?
            } else {
                workload(None)?
            };
            Ok((times, delta(&before, &t.cost()?)))
        }
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = match std::env::args().skip_while(|a| a != "--rounds").nth(1) {
        Some(n) => n.parse().context("--rounds N")?,
        None => 15,
    };
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let opts = LoadOptions {
        skip_paths: std::env::args()
            .skip_while(|a| a != "--skip-paths")
            .nth(1)
            .map(|list| list.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        ..LoadOptions::default()
    };
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ebpf_overhead loads eBPF programs: run it as root");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "ebpf_overhead: {rounds} rounds, kernel {}, {} CPUs, paths left out {:?}, load \
         average at start {}",
        release.trim(),
        online_cpus(),
        opts.skip_paths,
        load_average()
    );
    // Telemetry keeps kernel.bpf_stats_enabled on while loaded; the floor phase needs
    // it too.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling kernel.bpf_stats_enabled")?;

    let mut times: BTreeMap<Phase, Vec<Times>> = BTreeMap::new();
    // Per phase and program: per-round ns/event, and the sums over all rounds.
    let mut per_round: BTreeMap<(Phase, String), Vec<f64>> = BTreeMap::new();
    let mut totals: BTreeMap<(Phase, String), (u64, u64)> = BTreeMap::new();
    let mut active = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..Phase::ALL.len() {
            let phase = Phase::ALL[(round + k) % Phase::ALL.len()];
            let (t, costs) = run_phase(phase, &opts)?;
            times.entry(phase).or_default().push(t);
            for (program, (runs, ns)) in costs {
                if runs == 0 {
                    continue;
                }
                active.insert(program.clone(), ());
                per_round
                    .entry((phase, program.clone()))
                    .or_default()
                    .push(ns as f64 / runs as f64);
                let s = totals.entry((phase, program)).or_default();
                s.0 += runs;
                s.1 += ns;
            }
        }
    }
    println!("load average at end {}", load_average());

    let off = &times[&Phase::Off];
    println!();
    println!("slowdown per event: median ratio to the same round's `off` [interquartile range]");
    type Pick = fn(&Times) -> Option<f64>;
    let workloads: [(&str, Pick); 3] = [
        ("page fault", |t| Some(t.page_fault_ns)),
        ("context switch", |t| Some(t.switch_ns)),
        ("CPU migration", |t| t.migration_ns),
    ];
    for (name, pick) in workloads {
        let base: Vec<f64> = off.iter().filter_map(pick).collect();
        if base.is_empty() {
            continue;
        }
        print!("  {name:<15} off {:>6.0} ns", quantile(&base, 0.5));
        for phase in [Phase::Floor, Phase::Untracked, Phase::Tracked] {
            let ratios: Vec<f64> = times[&phase]
                .iter()
                .zip(off)
                .filter_map(|(t, o)| Some(pick(t)? / pick(o)?))
                .collect();
            print!(
                "  {} {:.3} [{:.3}-{:.3}]",
                phase.name(),
                quantile(&ratios, 0.5),
                quantile(&ratios, 0.25),
                quantile(&ratios, 0.75)
            );
        }
        println!();
    }

    println!();
    println!("kernel run-time statistics (kernel.bpf_stats_enabled), per program and phase:");
    println!("  median over rounds of run_time_ns/run_cnt; runs summed over all rounds");
    for phase in [Phase::Floor, Phase::Untracked, Phase::Tracked] {
        for program in active.keys() {
            let Some(v) = per_round.get(&(phase, program.clone())) else {
                continue;
            };
            let (runs, ns) = totals[&(phase, program.clone())];
            let floor = hook_of(program)
                .and_then(|h| per_round.get(&(Phase::Floor, format!("floor@{h}"))))
                .map(|f| format!("  (floor of its hook {:.0} ns)", quantile(f, 0.5)))
                .unwrap_or_default();
            println!(
                "  {:<10} {:<28} {:>10} runs {:>6.0} ns/event (all runs {:>4.0}){floor}",
                phase.name(),
                program,
                runs,
                quantile(v, 0.5),
                ns as f64 / runs as f64,
            );
        }
    }
    Ok(())
}
