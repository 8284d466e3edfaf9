//! Host integration test of the first eBPF program, `sched:sched_migrate_task`: load
//! and attach through `balancer::telemetry`, move a tracked thread between CPUs by
//! flipping its affinity, and check that the per-thread count matches the moves that
//! happened, while an untracked thread doing the same is not counted.
//!
//! Needs root (ignored unless asked for, `-- --include-ignored`; CI runs it as root)
//! and at least two CPUs; skips with a message without them.

use std::sync::mpsc;

use balancer::telemetry::{Feature, LoadOptions, Telemetry, TrackedThread, topology};
use vmbalancer_tests::anon::current_cpu;

const FLIPS: u32 = 200;

fn allowed_cpus() -> Vec<u32> {
    // SAFETY: a zeroed cpu_set_t is valid; the size matches.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as u32)
            .filter(|&c| libc::CPU_ISSET(c as usize, &set))
            .collect()
    }
}

fn pin_self(cpu: u32) {
    if let Err(e) = vmbalancer_tests::anon::pin_self(cpu) {
        panic!("sched_setaffinity({cpu}) failed: {e}");
    }
}

fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// A thread that reports its tid, waits for "go", pins itself to `a`, reports, then
/// flips between `a` and `b` `FLIPS` times and returns how often its CPU changed.
fn flipper(
    a: u32,
    b: u32,
    tid_tx: mpsc::Sender<u32>,
    go_rx: mpsc::Receiver<()>,
    pinned_tx: mpsc::Sender<()>,
    start_rx: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        go_rx.recv().unwrap();
        pin_self(a);
        pinned_tx.send(()).unwrap();
        start_rx.recv().unwrap();
        let mut changes = 0;
        let mut last = current_cpu();
        for i in 0..FLIPS {
            let target = if i % 2 == 0 { b } else { a };
            pin_self(target);
            // sched_setaffinity returns once the thread runs on an allowed CPU.
            let now = current_cpu();
            if now != last {
                changes += 1;
            }
            last = now;
        }
        changes
    })
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn migrations_of_a_tracked_thread_are_counted() {
    migrations_counted_on(&[], "tp_btf");
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn migrations_are_counted_on_the_raw_tracepoint() {
    migrations_counted_on(&["tp_btf"], "raw_tp");
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn migrations_are_counted_on_the_classic_tracepoint() {
    migrations_counted_on(&["tp_btf", "raw_tp"], "tracepoint");
}

/// Loads the programs without the path kinds in `skip` and checks the migration
/// counts of the path the loader took, which must be of kind `expected`.
fn migrations_counted_on(skip: &[&str], expected: &str) {
    vmbalancer_tests::require_root();
    let cpus = allowed_cpus();
    vmbalancer_tests::require(
        cpus.len() >= 2,
        format!("two CPUs (this process may use {cpus:?})"),
    );
    let (a, b) = (cpus[0], cpus[1]);
    let opts = LoadOptions {
        skip_paths: skip.iter().map(|s| s.to_string()).collect(),
        ..LoadOptions::default()
    };
    let mut telemetry = match Telemetry::load_with(&opts) {
        Ok(t) => t,
        Err(e) => panic!("loading eBPF telemetry failed: {e}"),
    };
    let path = telemetry
        .feature_paths()
        .iter()
        .find(|p| p.feature == Feature::Migrations)
        .and_then(|p| p.active.clone())
        .expect("migrations are required");
    eprintln!("ebpf_migrate: migrations on {path}");
    assert!(
        path.starts_with(expected),
        "{path} is not a {expected} path"
    );

    let spawn = || {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let (pinned_tx, pinned_rx) = mpsc::channel();
        let (start_tx, start_rx) = mpsc::channel();
        let handle = flipper(a, b, tid_tx, go_rx, pinned_tx, start_rx);
        let tid = tid_rx.recv().unwrap();
        (tid, go_tx, pinned_rx, start_tx, handle)
    };
    let (tracked_tid, go1, pinned1, start1, tracked) = spawn();
    let (untracked_tid, go2, pinned2, start2, untracked) = spawn();

    telemetry
        .track(
            tracked_tid,
            TrackedThread {
                vm_pid: std::process::id(),
                vcpu_index: 0,
            },
        )
        .expect("track");
    go1.send(()).unwrap();
    go2.send(()).unwrap();
    pinned1.recv().unwrap();
    pinned2.recv().unwrap();
    // Baseline after both threads are pinned to one CPU: whatever moved them before
    // (the first pin, wake-up placement) is not part of the measurement.
    let before = telemetry.read_thread(tracked_tid).expect("read before");
    start1.send(()).unwrap();
    start2.send(()).unwrap();
    let changes = tracked.join().unwrap();
    let untracked_changes = untracked.join().unwrap();
    let after = telemetry.read_thread(tracked_tid).expect("read after");
    let counted = after.migrations - before.migrations;
    let cross = after.cross_node_migrations - before.cross_node_migrations;
    eprintln!(
        "ebpf_migrate: tracked thread changed CPU {changes} times, eBPF counted {counted} \
         ({cross} cross-node); untracked thread changed CPU {untracked_changes} times"
    );

    // Tolerance: none below, one above. During the measured window the thread is
    // always pinned to a single CPU, so the scheduler cannot move it on its own and
    // every CPU change we observed is exactly one `sched_migrate_task`. One extra event
    // is allowed for a change that happens after the thread's last `sched_getcpu()` and
    // before the affinity call returns (a move the thread cannot see).
    assert!(
        changes >= FLIPS / 2,
        "the thread barely moved: {changes} changes"
    );
    assert!(
        counted >= u64::from(changes) && counted <= u64::from(changes) + 1,
        "counted {counted} migrations, observed {changes} CPU changes"
    );
    let nodes = topology::cpu_nodes(std::path::Path::new("/sys")).expect("topology");
    let node_of = |c: u32| nodes.iter().find(|(cpu, _)| *cpu == c).map(|(_, n)| *n);
    if node_of(a) == node_of(b) {
        assert_eq!(
            cross, 0,
            "CPUs {a} and {b} share a node: no cross-node moves"
        );
    } else {
        assert_eq!(cross, counted, "CPUs {a} and {b} are on different nodes");
    }

    assert!(untracked_changes >= FLIPS / 2);
    let other = telemetry
        .read_thread(untracked_tid)
        .expect("read untracked");
    assert_eq!(other.migrations, 0, "an untracked thread was counted");
    assert!(!telemetry.tracked().unwrap().contains(&untracked_tid));

    telemetry.untrack(tracked_tid).expect("untrack");
    assert_eq!(telemetry.read_thread(tracked_tid).unwrap().migrations, 0);
    assert!(!telemetry.tracked().unwrap().contains(&tracked_tid));

    for cost in telemetry.cost().expect("cost") {
        eprintln!(
            "ebpf_migrate: program {} ran {} times, {:.0} ns/event",
            cost.program,
            cost.run_count,
            cost.ns_per_event()
        );
    }
}
