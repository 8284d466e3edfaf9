//! The eBPF telemetry against ground truth on the lab's 4 emulated nodes: what the
//! host tests (`ebpf_migrate`, `ebpf_telemetry`) check on a one-node machine, plus
//! what only a multi-node kernel has (cross-node migrations, run time on each node,
//! NUMA hinting faults of the kernel's automatic balancing).
//!
//! The harness loads the programs itself (`balancer::telemetry`, the library the
//! daemon uses) and tracks one worker thread of its own as a "VM" whose pid is the
//! harness's. The worker measures each truth itself, while it does the work:
//! - **migrations**: it moves itself round the first CPU of every node by changing
//!   its affinity, and counts the CPU changes `sched_getcpu` shows (each one a
//!   cross-node move): the programs must count exactly those;
//! - **run time per node**: pinned to one CPU of each node in turn, it spins for
//!   [`SPIN_CPU_NS`] of its own CPU clock (`CLOCK_THREAD_CPUTIME_ID`), which is the
//!   scheduler's `sum_exec_runtime` the programs account at each switch-out, and
//!   charges all of the step's CPU time to the node it ran on: each node's eBPF
//!   figure must be within the scenario's tolerance of the worker's;
//! - **page faults per region**: it maps [`FAULT_PAGES`] fresh 4 KiB pages (no huge
//!   pages) and writes one byte to each: the programs must count one fault per page
//!   in the 2 MiB regions the mapping covers;
//! - **NUMA hinting faults**: with automatic NUMA balancing on, running on node 0,
//!   it reads [`HINT_PAGES`] pages it allocated on node 1 until the kernel has
//!   hint-faulted them for a while. The kernel's own counters (`/proc/vmstat`
//!   `numa_hint_faults`, `numa_pages_migrated`) are host-wide: nothing else runs in
//!   this scenario, so the worker's share must be (almost) all of them.
//!
//! - **wakes**: the programs' wake channel is armed before the migrations and
//!   before the spins (each crosses nodes): each must send exactly one
//!   `CROSS_NODE` wake naming the worker and two different nodes, however many
//!   moves follow (the switch); before the hinting faults, one `REMOTE_FAULTS` wake
//!   naming the worker.
//!
//! Counters are read only while the worker is blocked: run time is accounted when a
//! thread is switched out.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use balancer::telemetry::{
    Feature, RegionKind, Telemetry, ThreadTelemetry, TrackedThread, WakeChannel, WakeEvent,
    wake_kind,
};
use vmbalancer_tests::anon::{self, current_cpu, thread_cpu_ns};
use vmbalancer_tests::lab::scenario::Assertion;
use vmbalancer_tests::lab::truth::{NodeInfo, read_vmstat};

use crate::checks::Outcome;

/// Affinity changes in the migration check.
const MOVES: usize = 40;
/// CPU time spun on each node.
const SPIN_CPU_NS: u64 = 200_000_000;
/// Pages touched in the page fault check (8 MiB).
const FAULT_PAGES: usize = 2048;
/// Pages read in the hinting fault check (32 MiB).
const HINT_PAGES: usize = 8192;
/// How long the worker reads them at most, and how many hinting faults end it early.
const HINT_LIMIT: Duration = Duration::from_secs(40);
const HINT_ENOUGH: u64 = 12_000;
const PAGE: usize = 4096;
const NUMA_BALANCING: &str = "/proc/sys/kernel/numa_balancing";

fn pin_self(cpu: u32) -> anyhow::Result<()> {
    anon::pin_self(cpu).with_context(|| format!("pinning the worker to CPU {cpu}"))
}

/// A fresh mapping of `pages` 4 KiB pages, huge pages refused. Leaked on purpose:
/// its range must not be reused while the maps are read.
fn fresh_pages(pages: usize) -> anyhow::Result<*mut u8> {
    anon::map(pages * PAGE, Some(libc::MADV_NOHUGEPAGE)).context("mapping fresh pages")
}

/// One step the worker is told to do; it answers with what it measured.
enum Step {
    Migrate,
    Spin,
    Touch,
    Hint,
    Exit,
}

/// What the worker measured of one step.
#[derive(Debug, Default)]
struct Truth {
    cpu_changes: u64,
    cross_node_changes: u64,
    spun_ns_by_node: Vec<u64>,
    touched: Option<(u64, u64)>,
    error: Option<String>,
}

fn node_of(nodes: &[NodeInfo], cpu: u32) -> Option<usize> {
    nodes.iter().position(|n| n.cpus.contains(&cpu))
}

fn worker_step(step: &Step, nodes: &[NodeInfo], firsts: &[u32]) -> anyhow::Result<Truth> {
    // Where and when the step began, for the run-time check.
    let (entered_node, entered_ns) = (node_of(nodes, current_cpu()), thread_cpu_ns());
    let mut t = Truth {
        spun_ns_by_node: vec![0; nodes.len()],
        ..Truth::default()
    };
    match step {
        Step::Migrate => {
            let mut cpu = current_cpu();
            for i in 0..MOVES {
                let target = firsts[(i + 1) % firsts.len()];
                pin_self(target)?;
                let now = current_cpu();
                if now != target {
                    bail!("pinned to CPU {target}, running on {now}");
                }
                if now != cpu {
                    t.cpu_changes += 1;
                    if node_of(nodes, now) != node_of(nodes, cpu) {
                        t.cross_node_changes += 1;
                    }
                }
                cpu = now;
            }
        }
        Step::Spin => {
            // All of the step's CPU time is charged to the node it ran on, not only
            // the spins: under a loaded emulator, the few instructions before the
            // first spin took milliseconds once.
            let (mut here, mut mark) = (entered_node, entered_ns);
            for (i, &cpu) in firsts.iter().enumerate() {
                pin_self(cpu)?;
                let now = thread_cpu_ns();
                if let Some(n) = here {
                    t.spun_ns_by_node[n] += now - mark;
                }
                (here, mark) = (Some(i), now);
                let mut x = 0u64;
                while thread_cpu_ns() - now < SPIN_CPU_NS {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            }
            if let Some(n) = here {
                t.spun_ns_by_node[n] += thread_cpu_ns() - mark;
            }
        }
        Step::Touch => {
            // Home to node 0 first, where the hinting step runs: its own pin then
            // moves nothing, and the wake armed before it is left for its faults.
            pin_self(firsts[0])?;
            let p = fresh_pages(FAULT_PAGES)?;
            for i in 0..FAULT_PAGES {
                // SAFETY: inside our mapping.
                unsafe { std::ptr::write_volatile(p.add(i * PAGE), 1) };
            }
            t.touched = Some((p as u64, (FAULT_PAGES * PAGE) as u64));
        }
        Step::Hint => {
            pin_self(firsts[0])?;
            // Allocated on node 1 by the thread's policy (a policy on the mapping
            // itself would keep automatic balancing off it), then back to default.
            let mut mask = [0u64; 1];
            mask[0] = 1 << nodes[1].id;
            // SAFETY: a valid node mask of 64 bits.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_set_mempolicy,
                    2, /* MPOL_BIND */
                    mask.as_ptr(),
                    64,
                )
            };
            if r != 0 {
                bail!("set_mempolicy: {}", std::io::Error::last_os_error());
            }
            let p = fresh_pages(HINT_PAGES)?;
            for i in 0..HINT_PAGES {
                // SAFETY: inside our mapping.
                unsafe { std::ptr::write_volatile(p.add(i * PAGE), 1) };
            }
            // SAFETY: MPOL_DEFAULT takes no mask.
            unsafe { libc::syscall(libc::SYS_set_mempolicy, 0, std::ptr::null::<u64>(), 0) };
            let start = Instant::now();
            let faults0 = vmstat("numa_hint_faults")?;
            let mut sum = 0u64;
            while start.elapsed() < HINT_LIMIT
                && vmstat("numa_hint_faults")?.saturating_sub(faults0) < HINT_ENOUGH
            {
                for i in 0..HINT_PAGES {
                    // SAFETY: inside our mapping.
                    sum = sum.wrapping_add(u64::from(unsafe {
                        std::ptr::read_volatile(p.add(i * PAGE))
                    }));
                }
            }
            std::hint::black_box(sum);
        }
        Step::Exit => {}
    }
    Ok(t)
}

fn vmstat(name: &str) -> anyhow::Result<u64> {
    read_vmstat(Path::new("/"))?
        .get(name)
        .copied()
        .with_context(|| format!("/proc/vmstat has no {name}"))
}

/// Waits until thread `tid` of this process sleeps, so its last switch-out (and
/// the run time it accounts) happened.
fn wait_blocked(tid: u32) -> anyhow::Result<()> {
    anon::wait_blocked(tid, Duration::from_secs(10)).map_err(anyhow::Error::msg)
}

/// The worker: runs each step it is sent and answers with its truth.
struct Worker {
    tid: u32,
    steps: mpsc::Sender<Step>,
    truths: mpsc::Receiver<Truth>,
}

impl Worker {
    fn start(nodes: &[NodeInfo]) -> anyhow::Result<Worker> {
        let firsts: Vec<u32> = nodes
            .iter()
            .map(|n| n.cpus.first().copied().context("a node without CPUs"))
            .collect::<anyhow::Result<_>>()?;
        let nodes = nodes.to_vec();
        let (step_tx, step_rx) = mpsc::channel::<Step>();
        let (truth_tx, truth_rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ebpf-truth".into())
            .spawn(move || {
                let _ = pin_self(firsts[0]);
                // SAFETY: no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
                while let Ok(step) = step_rx.recv() {
                    if matches!(step, Step::Exit) {
                        break;
                    }
                    let truth = worker_step(&step, &nodes, &firsts).unwrap_or_else(|e| Truth {
                        error: Some(format!("{e:#}")),
                        ..Truth::default()
                    });
                    if truth_tx.send(truth).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the worker")?;
        let tid = tid_rx.recv().context("the worker did not start")?;
        Ok(Worker {
            tid,
            steps: step_tx,
            truths: truth_rx,
        })
    }

    /// Runs one step; returns its truth once the worker is blocked again.
    fn run(&self, step: Step) -> anyhow::Result<Truth> {
        self.steps.send(step).context("the worker exited")?;
        let truth = self.truths.recv().context("the worker exited")?;
        if let Some(e) = &truth.error {
            bail!("{e}");
        }
        wait_blocked(self.tid)?;
        Ok(truth)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.steps.send(Step::Exit);
    }
}

fn within(got: u64, want: u64, pct: f64) -> bool {
    (got as f64 - want as f64).abs() <= want as f64 * pct / 100.0
}

fn outcome(name: String, ok: bool, detail: String) -> Outcome {
    Outcome {
        name,
        ok,
        allowed_failure: false,
        detail,
    }
}

/// Runs an `ebpf_truth` assertion: one outcome per check.
pub fn check(a: &Assertion, nodes: &[NodeInfo]) -> Vec<Outcome> {
    let Assertion::EbpfTruth {
        max_error_pct,
        hinting_faults,
    } = a
    else {
        return Vec::new();
    };
    match check_inner(nodes, *max_error_pct, *hinting_faults) {
        Ok(v) => v,
        Err(e) => vec![outcome(a.label(), false, format!("{e:#}"))],
    }
}

fn check_inner(nodes: &[NodeInfo], pct: f64, hinting: bool) -> anyhow::Result<Vec<Outcome>> {
    if nodes.len() < 2 {
        bail!("needs at least 2 nodes, the guest has {}", nodes.len());
    }
    let mut telemetry = Telemetry::load().context("loading the eBPF programs")?;
    let worker = Worker::start(nodes)?;
    wait_blocked(worker.tid)?;
    let vm_pid = std::process::id();
    telemetry
        .track(
            worker.tid,
            TrackedThread {
                vm_pid,
                vcpu_index: 0,
            },
        )
        .context("tracking the worker")?;
    let read = |t: &Telemetry| -> anyhow::Result<ThreadTelemetry> {
        t.read_thread(worker.tid)
            .context("reading the worker's counters")
    };
    let mut out = Vec::new();
    let mut wakes = telemetry
        .take_wake_channel()
        .context("the programs have no wake channel")?;

    // Migrations: every change the worker saw, and every one of them cross-node.
    arm(&mut wakes)?;
    let before = read(&telemetry)?;
    let truth = worker.run(Step::Migrate)?;
    let after = read(&telemetry)?;
    out.push(cross_node_wake(
        &mut wakes,
        worker.tid,
        vm_pid,
        nodes.len(),
        "migrations",
    ));
    let (moved, cross) = (
        after.migrations - before.migrations,
        after.cross_node_migrations - before.cross_node_migrations,
    );
    out.push(outcome(
        "eBPF migrations and cross-node migrations == the worker's CPU changes".into(),
        moved == truth.cpu_changes && cross == truth.cross_node_changes,
        format!(
            "worker saw {} CPU changes ({} across nodes); eBPF counted {moved} ({cross} \
             cross-node)",
            truth.cpu_changes, truth.cross_node_changes
        ),
    ));

    // Run time on each node.
    arm(&mut wakes)?;
    let before = read(&telemetry)?;
    let truth = worker.run(Step::Spin)?;
    let after = read(&telemetry)?;
    out.push(cross_node_wake(
        &mut wakes,
        worker.tid,
        vm_pid,
        nodes.len(),
        "spins",
    ));
    let got: Vec<u64> = nodes
        .iter()
        .map(|n| {
            let i = n.id as usize;
            after.on_cpu_ns_by_node.get(i).copied().unwrap_or(0)
                - before.on_cpu_ns_by_node.get(i).copied().unwrap_or(0)
        })
        .collect();
    let ok = telemetry.has(Feature::OnCpuTime)
        && got
            .iter()
            .zip(&truth.spun_ns_by_node)
            .all(|(&g, &w)| within(g, w, pct));
    let ms = |v: &[u64]| -> Vec<String> {
        v.iter()
            .map(|n| format!("{:.1}", *n as f64 / 1e6))
            .collect()
    };
    out.push(outcome(
        format!("eBPF on-CPU time per node within {pct} % of the worker's CPU clock"),
        ok,
        format!(
            "ms per node, worker {:?}, eBPF {:?}",
            ms(&truth.spun_ns_by_node),
            ms(&got)
        ),
    ));

    // Page faults in the regions of a fresh mapping.
    let truth = worker.run(Step::Touch)?;
    let (start, len) = truth.touched.context("the worker touched nothing")?;
    let regions = telemetry
        .hot_regions_by_vm()
        .context("reading the hot regions")?
        .remove(&vm_pid)
        .unwrap_or_default();
    let in_mapping: Vec<_> = regions
        .iter()
        .filter(|r| {
            r.kind == RegionKind::HostVirtual
                && r.start_addr < start + len
                && start < r.start_addr + r.len_bytes
        })
        .collect();
    let faults: u64 = in_mapping.iter().map(|r| r.faults_total).sum();
    out.push(outcome(
        "eBPF user page faults in the mapping's regions == pages touched".into(),
        telemetry.has(Feature::UserPageFaults) && faults == FAULT_PAGES as u64,
        format!(
            "worker touched {FAULT_PAGES} fresh pages ({} MiB); eBPF counted {faults} in {} \
             regions of 2 MiB",
            len >> 20,
            in_mapping.len()
        ),
    ));

    if hinting {
        arm(&mut wakes)?;
        out.push(hinting_check(&telemetry, &worker, nodes, pct)?);
        let got = wakes.drain();
        let remote: Vec<&WakeEvent> = got
            .iter()
            .filter(|w| w.kind == wake_kind::REMOTE_FAULTS)
            .collect();
        out.push(outcome(
            "one remote-faults wake for the hinting faults, naming the worker".into(),
            remote.len() == 1
                && remote[0].tid == worker.tid
                && remote[0].vm_pid == vm_pid
                && u64::from(remote[0].count) >= wake_kind::REMOTE_FAULTS_PER_WAKE,
            format!("wakes sent: {got:?}"),
        ));
    }
    Ok(out)
}

/// Empties the wake channel and lets the programs send the next wake.
fn arm(wakes: &mut WakeChannel) -> anyhow::Result<()> {
    wakes.drain();
    wakes.arm().context("arming the wake channel")
}

/// The wakes sent since the channel was armed: exactly one, a cross-node move of
/// the worker between two nodes of the guest, however many moves `step` made.
fn cross_node_wake(
    wakes: &mut WakeChannel,
    tid: u32,
    vm_pid: u32,
    nodes: usize,
    step: &str,
) -> Outcome {
    let got = wakes.drain();
    let ok = matches!(got.as_slice(), [w] if w.kind == wake_kind::CROSS_NODE
        && w.tid == tid
        && w.vm_pid == vm_pid
        && w.from_node != w.to_node
        && (w.from_node as usize) < nodes
        && (w.to_node as usize) < nodes);
    outcome(
        format!("one cross-node wake for the worker's {step}, however many moves"),
        ok,
        format!("wakes sent: {got:?}"),
    )
}

/// NUMA hinting faults with automatic balancing on, against `/proc/vmstat`.
fn hinting_check(
    telemetry: &Telemetry,
    worker: &Worker,
    nodes: &[NodeInfo],
    pct: f64,
) -> anyhow::Result<Outcome> {
    let name = format!(
        "eBPF NUMA hinting faults and pages migrated within {pct} % of /proc/vmstat (autoNUMA on)"
    );
    if !telemetry.has(Feature::NumaHintingFaults) {
        return Ok(outcome(
            name,
            false,
            "numa-hinting-faults is not active on this kernel".into(),
        ));
    }
    let was = std::fs::read_to_string(NUMA_BALANCING).context("reading numa_balancing")?;
    std::fs::write(NUMA_BALANCING, "1").context("turning automatic NUMA balancing on")?;
    let before = telemetry.read_thread(worker.tid)?;
    let (faults0, migrated0) = (vmstat("numa_hint_faults")?, vmstat("numa_pages_migrated")?);
    let run = worker.run(Step::Hint);
    let (faults1, migrated1) = (vmstat("numa_hint_faults")?, vmstat("numa_pages_migrated")?);
    let after = telemetry.read_thread(worker.tid);
    std::fs::write(NUMA_BALANCING, was.trim()).context("restoring numa_balancing")?;
    run?;
    let after = after?;
    let (faults, migrated) = (faults1 - faults0, migrated1 - migrated0);
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let ebpf_faults = sum(&after.numa_faults_by_mem_node) - sum(&before.numa_faults_by_mem_node);
    let ebpf_remote = after.numa_faults_remote - before.numa_faults_remote;
    let ebpf_migrated = after.numa_migrated_pages - before.numa_migrated_pages;
    // The host-wide counters include any other task's faults: the worker's may be
    // below them by the tolerance, never above.
    let close = |got: u64, all: u64| got <= all && within(got, all, pct);
    Ok(outcome(
        name,
        faults > 0
            && ebpf_remote > 0
            && close(ebpf_faults, faults)
            && close(ebpf_migrated, migrated),
        format!(
            "memory on node {}, worker on node {}: vmstat numa_hint_faults +{faults}, \
             numa_pages_migrated +{migrated}; eBPF faults {ebpf_faults} ({ebpf_remote} \
             remote), pages migrated {ebpf_migrated}",
            nodes[1].id, nodes[0].id
        ),
    ))
}
