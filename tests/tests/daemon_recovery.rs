//! The tick loop with the real Linux applier on a real process (needs root): an
//! action applied and journaled, a crash with an action in flight, and the next
//! start finishing or reverting it; restore on exit, also when the running daemon gets
//! SIGTERM (what `systemctl stop` and removing the package send).

use std::path::{Path, PathBuf};
use std::process::Child;

use balancer::daemon::journal::{Journal, Recovery};
use balancer::daemon::run::{Daemon, Shutdown};
use balancer::host::linux::actuate::{ApplierConfig, LinuxApplier, sys};
use balancer::host::linux::{HostPaths, topology::read_topology};
use balancer::model::{ActionOutcome, PlannedAction, Snapshot, Vcpu, Vm};
use vmbalancer_tests::actuate_target::Target;
use vmbalancer_tests::fault::{self, Fixed, Script, set_cpus};

/// The test program with a 1 MiB mapping: (process, pid, its two threads).
fn spawn() -> (Child, u32, [u32; 2]) {
    let t = Target::spawn(
        Path::new(env!("CARGO_BIN_EXE_actuate_target")),
        &[&(1u64 << 20).to_string()],
    );
    (t.child, t.pid, t.tids)
}

fn affinity(tids: [u32; 2]) -> Vec<String> {
    tids.iter()
        .map(|t| sys::get_affinity(*t).unwrap().to_string())
        .collect()
}

/// Root, two CPUs, the test program and an empty state directory: (every online CPU,
/// the process, its pid, its threads, the state directory).
fn setup(name: &str) -> (String, Child, u32, [u32; 2], PathBuf) {
    vmbalancer_tests::require_root();
    let online = read_topology(&HostPaths::system()).unwrap().all_cpus();
    vmbalancer_tests::require(online.len() >= 2, "2 online CPUs");
    let (child, pid, tids) = spawn();
    let state = std::env::temp_dir().join(format!("vmb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    (online.to_string(), child, pid, tids, state)
}

/// This host with the test program as its one VM (its two threads are the vCPUs).
fn target_snapshot(pid: u32, tids: [u32; 2]) -> Snapshot {
    Snapshot {
        topology: read_topology(&HostPaths::system()).unwrap(),
        vms: vec![Vm {
            pid,
            name: "recovery-target".into(),
            vcpus: (0..2)
                .map(|i| Vcpu {
                    index: i,
                    tid: tids[i as usize],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The daemon with the real Linux applier on `snap`, playing `actions` one a tick.
fn daemon(
    state: &Path,
    snap: &Snapshot,
    actions: Vec<PlannedAction>,
) -> Daemon<Fixed, LinuxApplier, Script> {
    fault::daemon(
        fault::config(state),
        snap.clone(),
        LinuxApplier::new(ApplierConfig::default()),
        Script::actions(actions),
        Shutdown::new(),
    )
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity"]
fn crash_with_action_in_flight_is_finished_or_reverted_on_restart() {
    let (all, mut child, pid, tids, state) = setup("recovery");
    let snap = target_snapshot(pid, tids);

    // Run 1: one action applied, read back, journaled with the original sets.
    let mut d = daemon(&state, &snap, vec![set_cpus(pid, "1")]);
    let r = d.tick();
    assert_eq!(r.applied, 1);
    assert_eq!(affinity(tids), vec!["1", "1"]);
    // Crash (no finish): the journal survives with the originals.
    drop(d);
    let mut j = Journal::open(&state).unwrap();
    assert_eq!(
        j.entries()[&pid].original.threads[&tids[0]].to_string(),
        all
    );
    // ... and, as if killed mid-action, with a move to CPU 0 in flight.
    j.begin(&set_cpus(pid, "0"), 1).unwrap();
    drop(j);

    // Run 2: recovery finishes the valid move.
    let mut d = daemon(&state, &snap, vec![]);
    let done = d.recover().unwrap();
    assert_eq!(done.len(), 1);
    assert!(matches!(done[0].1, Recovery::Finish(_)));
    assert_eq!(done[0].2, ActionOutcome::Done { moved_bytes: 0 });
    assert_eq!(affinity(tids), vec!["0", "0"]);
    drop(d);

    // Run 3: a move in flight onto CPUs that are not online is reverted instead.
    let mut j = Journal::open(&state).unwrap();
    j.begin(&set_cpus(pid, "4000"), 1).unwrap();
    drop(j);
    let mut d = daemon(&state, &snap, vec![]);
    let done = d.recover().unwrap();
    assert!(matches!(done[0].1, Recovery::Revert(_)), "{done:?}");
    assert_eq!(affinity(tids), vec![all.clone(), all.clone()]);
    assert!(d.journal().unwrap().entries()[&pid].in_flight.is_none());

    // Restore on exit puts back the originals and clears the journal.
    let mut d = daemon(&state, &snap, vec![set_cpus(pid, "1")]);
    d.recover().unwrap();
    d.tick();
    assert_eq!(affinity(tids), vec!["1", "1"]);
    d.finish();
    assert_eq!(affinity(tids), vec![all.clone(), all]);
    assert!(Journal::open(&state).unwrap().entries().is_empty());

    // The VM exits: the next start forgets it quietly.
    let mut j = Journal::open(&state).unwrap();
    j.adopt(balancer::host::linux::actuate::OriginalSets {
        vm: pid,
        start_time_ticks: balancer::host::linux::actuate::process_start_ticks(
            Path::new("/proc"),
            pid,
        )
        .unwrap(),
        threads: Default::default(),
        groups: vec![],
    })
    .unwrap();
    j.begin(&set_cpus(pid, "0"), 1).unwrap();
    drop(j);
    drop(child.stdin.take());
    child.wait().unwrap();
    let mut d = daemon(&state, &snap, vec![]);
    let done = d.recover().unwrap();
    assert_eq!(done[0].1, Recovery::Forget);
    assert!(d.journal().unwrap().entries().is_empty());
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity"]
fn sigterm_restores_the_cpu_sets_the_daemon_changed() {
    let (all, mut child, pid, tids, state) = setup("sigterm");
    let d = daemon(
        &state,
        &target_snapshot(pid, tids),
        vec![set_cpus(pid, "1")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let running = rt.spawn(balancer::daemon::run::run(d));
    let moved = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        affinity(tids) == ["1", "1"]
    });
    assert!(
        moved,
        "the daemon did not move the VM: {:?}",
        affinity(tids)
    );
    // The daemon's own SIGTERM handler is installed by now (it ticked): the signal
    // stops it instead of this test process.
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    rt.block_on(running).unwrap().unwrap();
    assert_eq!(affinity(tids), vec![all.clone(), all]);
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    drop(child.stdin.take());
    child.wait().unwrap();
    std::fs::remove_dir_all(&state).unwrap();
}
