//! Host integration test of the on-CPU time (`sched:sched_switch`) and user page
//! fault (`exceptions:page_fault_user`) programs, through `balancer::telemetry`:
//! a tracked thread spins and then touches fresh memory page by page; the eBPF
//! on-CPU time must match the thread's own CPU clock, and the faults counted in the
//! hot regions of its "VM" (this process) must match the pages it touched. An
//! untracked thread doing the same leaves no trace. Also prints the features active
//! on this kernel and the measured cost per event of each program.
//!
//! Needs root: ignored unless asked for (`-- --include-ignored`); CI runs it as root.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use balancer::telemetry::{
    Feature, FeatureState, LoadOptions, RegionKind, Telemetry, TrackedThread, topology,
};
use vmbalancer_tests::anon::thread_cpu_ns;

const PAGES: usize = 8192;
const PAGE: usize = 4096;
const SPIN: Duration = Duration::from_millis(200);

fn pin_self(cpu: u32) {
    vmbalancer_tests::anon::pin_self(cpu).unwrap();
}

/// What a worker did, measured by itself.
struct Work {
    cpu_ns: u64,
    region_start: usize,
    region_len: usize,
}

/// Spins for [`SPIN`], then maps [`PAGES`] fresh pages (no huge pages, so one fault
/// per page) and writes one byte to each. Sends its own CPU time for the whole window
/// and the mapping, then stays alive, blocked, until told to exit: the last time
/// slice is accounted at a switch-out, and a thread's exit wakes `join()` before its
/// final switch-out.
fn work(
    cpu: u32,
    tid_tx: mpsc::Sender<u32>,
    go: mpsc::Receiver<()>,
    done: mpsc::Sender<Work>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        pin_self(cpu);
        // SAFETY: no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        go.recv().unwrap();
        let start = thread_cpu_ns();
        let until = Instant::now() + SPIN;
        let mut x = 0u64;
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let len = PAGES * PAGE;
        let p = vmbalancer_tests::anon::map(len, Some(libc::MADV_NOHUGEPAGE)).unwrap();
        for i in 0..PAGES {
            // SAFETY: inside our mapping.
            unsafe { std::ptr::write_volatile(p.add(i * PAGE), 1) };
        }
        let cpu_ns = thread_cpu_ns() - start;
        // The mapping is leaked on purpose: unmapping it could let a later mapping of
        // this process reuse the range while the test still reads the map.
        done.send(Work {
            cpu_ns,
            region_start: p as usize,
            region_len: len,
        })
        .unwrap();
        let _ = go.recv();
    })
}

/// Waits until thread `tid` of this process sleeps (so its last switch-out happened).
fn wait_until_blocked(tid: u32) {
    vmbalancer_tests::anon::wait_blocked(tid, Duration::from_secs(4)).unwrap();
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn on_cpu_time_and_page_faults_of_a_tracked_thread() {
    on_cpu_time_and_page_faults_on(&[], "tp_btf");
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn on_cpu_time_on_the_raw_tracepoint() {
    on_cpu_time_and_page_faults_on(&["tp_btf"], "raw_tp");
}

/// The classic tracepoint path; user page faults have only a raw tracepoint path,
/// so this run checks on-CPU time alone.
#[test]
#[ignore = "needs root: loads eBPF programs"]
fn on_cpu_time_on_the_classic_tracepoint() {
    on_cpu_time_and_page_faults_on(&["tp_btf", "raw_tp"], "tracepoint");
}

/// Loads the programs without the path kinds in `skip`; on-CPU time must run on a
/// path of kind `expected`. Page faults are checked when their feature is active.
fn on_cpu_time_and_page_faults_on(skip: &[&str], expected: &str) {
    vmbalancer_tests::require_root();
    let opts = LoadOptions {
        skip_paths: skip.iter().map(|s| s.to_string()).collect(),
        ..LoadOptions::default()
    };
    let mut telemetry = match Telemetry::load_with(&opts) {
        Ok(t) => t,
        Err(e) => panic!("loading eBPF telemetry failed: {e}"),
    };
    for (feature, state) in telemetry.features() {
        eprintln!("ebpf_telemetry: feature {:<22} {state:?}", feature.name());
    }
    let on_cpu_path = telemetry
        .feature_paths()
        .iter()
        .find(|p| p.feature == Feature::OnCpuTime)
        .and_then(|p| p.active.clone())
        .unwrap_or_default();
    assert!(
        on_cpu_path.starts_with(expected),
        "on-CPU time runs on `{on_cpu_path}`, not a {expected} path"
    );
    let faults = telemetry.has(Feature::UserPageFaults);
    let required: &[Feature] = if skip.contains(&"raw_tp") {
        &[Feature::Migrations, Feature::OnCpuTime]
    } else {
        &[
            Feature::Migrations,
            Feature::OnCpuTime,
            Feature::UserPageFaults,
        ]
    };
    for &f in required {
        assert_eq!(
            telemetry
                .features()
                .iter()
                .find(|(x, _)| *x == f)
                .map(|(_, s)| s),
            Some(&FeatureState::Active),
            "{} must be active on this kernel",
            f.name()
        );
    }

    assert!(
        telemetry.logs_connected(),
        "aya-log channel must be connected"
    );
    telemetry.flush_logs();

    let nodes = topology::cpu_nodes(std::path::Path::new("/sys")).unwrap();
    let cpu = nodes[0].0;
    let node = nodes[0].1 as usize;
    let vm_pid = std::process::id();

    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let tracked = work(cpu, tid_tx, go_rx, done_tx);
    let tid = tid_rx.recv().unwrap();
    let (tid_tx2, tid_rx2) = mpsc::channel();
    let (go_tx2, go_rx2) = mpsc::channel();
    let (done_tx2, done_rx2) = mpsc::channel();
    let untracked = work(cpu, tid_tx2, go_rx2, done_tx2);
    let untracked_tid = tid_rx2.recv().unwrap();

    telemetry
        .track(
            tid,
            TrackedThread {
                vm_pid,
                vcpu_index: 0,
            },
        )
        .unwrap();
    // Both threads are blocked in recv(): counting starts from the run time the
    // tracked one had when it was tracked.
    go_tx.send(()).unwrap();
    go_tx2.send(()).unwrap();
    let w = done_rx.recv().unwrap();
    let u = done_rx2.recv().unwrap();
    wait_until_blocked(tid);

    let t = telemetry.read_thread(tid).unwrap();
    eprintln!(
        "ebpf_telemetry: thread CPU clock {} us, eBPF on-CPU {} us (by node {:?})",
        w.cpu_ns / 1000,
        t.on_cpu_total_ns / 1000,
        t.on_cpu_ns_by_node
    );
    // Tolerance: eBPF counts the thread's run time (the scheduler's
    // sum_exec_runtime, which its CPU clock reads too) from when it was tracked to
    // its switch-out when it blocks again, a little more than the thread's own clock
    // readings enclose (the wake-up path, the clock calls, the send): allow 5 ms
    // above. Below, the two differ only by accounting granularity: allow 2%.
    assert!(
        t.on_cpu_total_ns + w.cpu_ns / 50 >= w.cpu_ns,
        "eBPF on-CPU time {} ns is below the thread's CPU time {} ns",
        t.on_cpu_total_ns,
        w.cpu_ns
    );
    assert!(
        t.on_cpu_total_ns <= w.cpu_ns + 5_000_000,
        "eBPF on-CPU time {} ns exceeds the thread's CPU time {} ns by more than 5 ms",
        t.on_cpu_total_ns,
        w.cpu_ns
    );
    assert_eq!(
        t.on_cpu_ns_by_node[node], t.on_cpu_total_ns,
        "pinned to CPU {cpu}: all time on node {node}"
    );
    let other = telemetry.read_thread(untracked_tid).unwrap();
    assert_eq!(
        other.on_cpu_total_ns, 0,
        "the untracked thread's time was counted"
    );

    if faults {
        let in_range = |start: usize, len: usize| {
            let end = (start + len) as u64;
            telemetry
                .hot_regions_by_vm()
                .unwrap()
                .remove(&vm_pid)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.kind == RegionKind::HostVirtual)
                .filter(|r| r.start_addr < end && r.start_addr + r.len_bytes > start as u64)
                .collect::<Vec<_>>()
        };
        let regions = in_range(w.region_start, w.region_len);
        let faults: u64 = regions.iter().map(|r| r.faults_total).sum();
        let on_node: u64 = regions.iter().map(|r| r.faults_by_node[node]).sum();
        eprintln!(
            "ebpf_telemetry: touched {PAGES} pages, eBPF counted {faults} faults in {} regions",
            regions.len()
        );
        // Tolerance: none below (every first touch of an anonymous page faults); above,
        // the 2 MiB regions at both ends may hold a few other pages of this thread.
        assert!(
            faults >= PAGES as u64 && faults <= PAGES as u64 + 64,
            "counted {faults} faults for {PAGES} touched pages"
        );
        assert_eq!(on_node, faults, "all faults on the node of CPU {cpu}");
        assert!(
            regions.len() >= PAGES * PAGE / (2 << 20),
            "one region per 2 MiB"
        );
        assert!(
            in_range(u.region_start, u.region_len).is_empty(),
            "the untracked thread's faults were counted"
        );
    }

    telemetry.untrack(tid).unwrap();
    telemetry.forget_vm(vm_pid).unwrap();
    assert!(!telemetry.hot_regions_by_vm().unwrap().contains_key(&vm_pid));
    assert_eq!(telemetry.read_thread(tid).unwrap().on_cpu_total_ns, 0);

    for c in telemetry.cost().unwrap() {
        eprintln!(
            "ebpf_telemetry: cost {:<20} {:>9} runs {:>8.0} ns/event",
            c.program,
            c.run_count,
            c.ns_per_event()
        );
    }

    go_tx.send(()).unwrap();
    go_tx2.send(()).unwrap();
    tracked.join().unwrap();
    untracked.join().unwrap();
}
