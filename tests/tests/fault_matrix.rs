//! The fault matrix (tests/results/fault-matrix.md): each fault produced for real on
//! this host against the daemon's loop, journal and Linux applier, with a child
//! process standing in for the VM. Each test checks what the daemon did (a clear
//! error, or it carries on), that the VM's CPU sets are never empty or foreign and
//! its original sets can be put back (and are, at the end), and that nothing the
//! journal held was lost (kept, or set aside byte for byte).
//!
//! Needs root (CPU affinity of another process, tmpfs mounts, cgroups, eBPF):
//! ignored unless asked for (`-- --include-ignored`), as the other host tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use balancer::daemon::Policy;
use balancer::daemon::config::Config;
use balancer::daemon::control::{self, Request, Response};
use balancer::daemon::journal::{Journal, Recovery};
use balancer::daemon::run::{Daemon, Shutdown};
use balancer::host::linux::actuate::{ApplierConfig, LinuxApplier, sys};
use balancer::host::linux::{EbpfTelemetry, TelemetrySource, TrackedVm};
use balancer::model::{ActionOutcome, CpuSet, Plan, PlannedAction, Snapshot};
use balancer::telemetry::Telemetry;
use vmbalancer_tests::actuate_target::Target;
use vmbalancer_tests::cgroup_v1::V1Group;
use vmbalancer_tests::fake_sys;
use vmbalancer_tests::fault::{self, Fixed, Script, affinities, page_nodes, set_cpus, vm_snapshot};
use vmbalancer_tests::require_root;

/// The stand-in VM with a mapping of `len` bytes.
fn target(len: u64) -> Target {
    Target::spawn(
        Path::new(env!("CARGO_BIN_EXE_actuate_target")),
        &[&len.to_string()],
    )
}

/// Sends a command line to the stand-in VM and reads its answer.
fn ask(t: &mut Target, cmd: &str) -> String {
    writeln!(t.child.stdin.as_mut().unwrap(), "{cmd}").unwrap();
    let mut line = String::new();
    BufReader::new(t.child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

fn end(mut t: Target) {
    drop(t.child.stdin.take());
    t.child.wait().unwrap();
}

/// Every online CPU; `None` (the test is skipped) on a 1-CPU host.
fn online() -> CpuSet {
    let all = CpuSet::parse_list(
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap()
            .trim(),
    )
    .unwrap();
    vmbalancer_tests::require(all.len() >= 2, "2 online CPUs");
    all
}

/// A fresh directory path (not created).
fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmb-fault-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The VM is unharmed: every thread may run on a non-empty set of online CPUs, and
/// on exactly `want` when given.
fn assert_vm_sets(pid: u32, online: &CpuSet, want: Option<&CpuSet>) {
    let sets = affinities(pid);
    assert!(!sets.is_empty());
    for (tid, set) in &sets {
        assert!(
            !set.is_empty() && set.is_subset(online),
            "thread {tid}: {set}"
        );
        if let Some(w) = want {
            assert_eq!(set, w, "thread {tid} of VM {pid}");
        }
    }
}

fn config(state: &Path) -> Config {
    Config {
        tick_ms: 100,
        probation_window_ms: 100,
        ..fault::config(state)
    }
}

/// The daemon as `vmbalancer run` builds it, on a fixed view of this host with the
/// stand-in VM(s), playing `actions` one per tick.
fn daemon_on(
    state: &Path,
    snap: Snapshot,
    actions: Vec<PlannedAction>,
) -> Daemon<Fixed, LinuxApplier, Script> {
    daemon_with(
        config(state),
        snap,
        Script::actions(actions),
        Shutdown::new(),
    )
}

/// The daemon with the real Linux applier, playing `policy`.
fn daemon_with<P: Policy>(
    cfg: Config,
    snap: Snapshot,
    policy: P,
    stop: Shutdown,
) -> Daemon<Fixed, LinuxApplier, P> {
    fault::daemon(
        cfg,
        snap,
        LinuxApplier::new(ApplierConfig::default()),
        policy,
        stop,
    )
}

/// The outcomes of the daemon's decisions so far, oldest first.
fn outcomes<O, A, P>(d: &Daemon<O, A, P>) -> Vec<ActionOutcome>
where
    O: balancer::host::Observer,
    A: balancer::daemon::Actuator,
    P: Policy,
{
    let shared = d.shared();
    let s = shared.lock().unwrap();
    s.status
        .decisions
        .iter()
        .map(|d| d.outcome.clone())
        .collect()
}

/// A tmpfs mounted for one test (`mount` options as given), unmounted on drop.
struct TmpMount(PathBuf);

impl TmpMount {
    fn new(dir: &Path, options: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(dir),
        );
        Self(dir.to_path_buf())
    }

    fn remount(&self, options: &str) {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,{options}")])
                .arg(&self.0),
        );
    }
}

impl Drop for TmpMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_ok(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

/// Files of the state directory whose name starts with `journal.json.` (set aside),
/// with their bytes.
fn set_aside(state: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal.json.") && !n.ends_with(".tmp"))
        .map(|n| (n.clone(), std::fs::read(state.join(&n)).unwrap()))
        .collect()
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity"]
fn fault_truncated_or_garbage_journal_at_start() {
    require_root();
    let all = online();
    let t = target(1 << 20);
    let state = temp("journal");
    let snap = vm_snapshot(t.pid, &t.tids, None);
    // A run moves the VM to CPU 1 and dies: a real journal holding the VM.
    let mut d = daemon_on(&state, snap.clone(), vec![set_cpus(t.pid, "1")]);
    assert_eq!(d.tick().applied, 1);
    drop(d);
    let one = CpuSet::parse_list("1").unwrap();
    assert_vm_sets(t.pid, &all, Some(&one));
    let good = std::fs::read(state.join("journal.json")).unwrap();
    let other_version = String::from_utf8(good.clone())
        .unwrap()
        .replacen("\"version\": 1", "\"version\": 7", 1)
        .into_bytes();
    assert_ne!(other_version, good);
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("garbage", (0..=255u8).rev().cycle().take(3000).collect()),
        ("another version", other_version),
    ];
    for (what, bytes) in &cases {
        std::fs::write(state.join("journal.json"), bytes).unwrap();
        let kept_before = set_aside(&state).len();
        // The daemon starts: the journal is set aside, it carries on without it.
        let mut d = daemon_on(&state, snap.clone(), vec![]);
        assert!(d.journal().unwrap().entries().is_empty(), "{what}");
        assert!(d.recover().unwrap().is_empty(), "{what}");
        d.tick();
        // Nothing lost: the bytes are kept under a new name, none overwritten.
        let aside = set_aside(&state);
        assert_eq!(aside.len(), kept_before + 1, "{what}: {:?}", aside.keys());
        assert!(aside.values().any(|b| b == bytes), "{what}");
        // The VM keeps the valid set the dead run gave it.
        assert_vm_sets(t.pid, &all, Some(&one));
        drop(d);
        std::fs::remove_file(state.join("journal.json")).ok();
    }
    let names: Vec<String> = set_aside(&state).into_keys().collect();
    eprintln!(
        "figure: {} bad journals started on, set aside {names:?}",
        cases.len()
    );
    assert_eq!(
        names,
        [
            "journal.json.corrupt",
            "journal.json.corrupt.1",
            "journal.json.corrupt.2",
            "journal.json.old"
        ]
    );
    // The intact journal still puts the VM back.
    std::fs::write(state.join("journal.json"), &good).unwrap();
    let mut d = daemon_on(&state, snap, vec![]);
    assert_eq!(d.recover().unwrap()[0].1, Recovery::Keep);
    d.finish();
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    end(t);
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
#[ignore = "needs root: mounts a tmpfs and sets another process's CPU affinity"]
fn fault_state_dir_read_only() {
    require_root();
    let all = online();
    let t = target(1 << 20);
    let state = temp("ro");
    let mount = TmpMount::new(&state, "size=1m,mode=0700");
    let snap = vm_snapshot(t.pid, &t.tids, None);
    // A run holds the VM on CPU 1 and dies with a move to CPU 0 in flight.
    let mut d = daemon_on(&state, snap.clone(), vec![set_cpus(t.pid, "1")]);
    d.tick();
    drop(d);
    let mut j = Journal::open(&state).unwrap();
    j.begin(&set_cpus(t.pid, "0"), 1).unwrap();
    drop(j);
    let on_disk = std::fs::read(state.join("journal.json")).unwrap();
    mount.remount("ro");

    // The daemon starts on the read-only state directory: it reads the journal and
    // recovers the VM, though it cannot record that it did.
    let mut d = daemon_on(&state, snap.clone(), vec![set_cpus(t.pid, "1")]);
    let done = d.recover().unwrap();
    assert!(matches!(done[0].1, Recovery::Finish(_)), "{done:?}");
    let zero = CpuSet::parse_list("0").unwrap();
    assert_vm_sets(t.pid, &all, Some(&zero));
    assert!(d.journal().unwrap().entries()[&t.pid].in_flight.is_some());
    // A new move is refused: no journal, no change.
    assert_eq!(d.tick().applied, 0);
    match &outcomes(&d)[..] {
        [ActionOutcome::Refused { why }] => assert!(why.contains("journal not writable"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_vm_sets(t.pid, &all, Some(&zero));
    eprintln!(
        "figure: read-only: recovered {}, moves refused 1",
        done.len()
    );
    // Stopping puts the VM back; the journal it cannot clear is kept as it was.
    d.finish();
    assert_vm_sets(t.pid, &all, Some(&all));
    assert_eq!(std::fs::read(state.join("journal.json")).unwrap(), on_disk);

    // A journal that must be set aside cannot be: the daemon refuses to start.
    mount.remount("rw");
    std::fs::write(state.join("journal.json"), b"{ half").unwrap();
    mount.remount("ro");
    let err = Journal::open(&state).unwrap_err().to_string();
    assert!(err.contains("journal.json"), "{err}");
    assert_eq!(
        std::fs::read(state.join("journal.json")).unwrap(),
        b"{ half"
    );

    // Writable again, with the kept journal: the next start finishes the move it
    // holds and its stop puts the VM back for good.
    mount.remount("rw");
    std::fs::write(state.join("journal.json"), &on_disk).unwrap();
    let mut d = daemon_on(&state, snap, vec![]);
    assert!(matches!(d.recover().unwrap()[0].1, Recovery::Finish(_)));
    d.finish();
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    end(t);
    drop(mount);
}

#[test]
#[ignore = "needs root: mounts a tmpfs and sets another process's CPU affinity"]
fn fault_state_dir_full() {
    require_root();
    let all = online();
    let (a, b) = (target(1 << 20), target(1 << 20));
    let state = temp("full");
    let mount = TmpMount::new(&state, "size=64k,mode=0700");
    let mut snap = vm_snapshot(a.pid, &a.tids, None);
    snap.vms.extend(vm_snapshot(b.pid, &b.tids, None).vms);
    let mut d = daemon_on(
        &state,
        snap.clone(),
        vec![
            set_cpus(a.pid, "1"),
            set_cpus(a.pid, "0"),
            set_cpus(b.pid, "1"),
        ],
    );
    // VM a is held on CPU 1.
    assert_eq!(d.tick().applied, 1);
    let one = CpuSet::parse_list("1").unwrap();
    assert_vm_sets(a.pid, &all, Some(&one));
    // The file system fills up: the next move of a is refused before it changes
    // anything.
    let filler = state.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    assert_eq!(d.tick().applied, 0);
    match &outcomes(&d)[1..] {
        [ActionOutcome::Refused { why }] => assert!(why.contains("journal not writable"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_vm_sets(a.pid, &all, Some(&one));
    assert!(d.journal().unwrap().entries()[&a.pid].in_flight.is_none());
    // Room again: VM b moves and is journaled, and the refused move of a is not.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(d.tick().applied, 1);
    assert_vm_sets(b.pid, &all, Some(&one));
    drop(d); // killed
    let j = Journal::open(&state).unwrap();
    assert_eq!(j.entries().len(), 2);
    assert!(j.entries().values().all(|e| e.in_flight.is_none()));
    drop(j);
    // The next start does not "finish" the refused move; its stop puts both back.
    let mut d = daemon_on(&state, snap, vec![]);
    let done = d.recover().unwrap();
    assert!(
        done.iter().all(|(_, r, _)| *r == Recovery::Keep),
        "{done:?}"
    );
    eprintln!("figure: full: moves refused 1, journaled after 2, recovered {done:?}");
    assert_vm_sets(a.pid, &all, Some(&one));
    d.finish();
    assert_vm_sets(a.pid, &all, Some(&all));
    assert_vm_sets(b.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    end(a);
    end(b);
    drop(mount);
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity"]
fn fault_runtime_dir_missing() {
    require_root();
    let all = online();
    let t = target(1 << 20);
    let state = temp("runtime");
    let runtime = state.join("run-gone/vmbalancer");
    let snap = vm_snapshot(t.pid, &t.tids, None);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Missing at start: created (0700) and served.
    let cfg = Config {
        runtime_dir: runtime.clone(),
        ..config(&state)
    };
    let stop = Shutdown::new();
    let d = daemon_with(
        cfg.clone(),
        snap.clone(),
        Script::actions(vec![set_cpus(t.pid, "1")]),
        stop.clone(),
    );
    let shared = d.shared();
    let running = rt.spawn(balancer::daemon::run::run(d));
    let socket = cfg.control_socket_path();
    let one = CpuSet::parse_list("1").unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && affinities(t.pid).values().all(|s| *s == one)) {
        assert!(Instant::now() < until, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&runtime).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let r = control::request(&socket, &Request::Status, Duration::from_secs(5));
    assert!(matches!(r, Ok(Response::Status(_))), "{r:?}");

    // Removed while running: the daemon carries on ticking, and binds its socket
    // again (0700 directory, 0600 socket) within its check interval.
    std::fs::remove_dir_all(state.join("run-gone")).unwrap();
    let removed = Instant::now();
    let ticks = || shared.lock().unwrap().status.daemon.ticks;
    let before = ticks();
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks() >= before + 2, "{before} -> {}", ticks());
    while !socket.exists() {
        assert!(
            removed.elapsed() < Duration::from_secs(15),
            "the socket was not bound again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let back_ms = removed.elapsed().as_millis();
    let r = control::request(&socket, &Request::Status, Duration::from_secs(5));
    assert!(matches!(r, Ok(Response::Status(_))), "{r:?}");
    let mode = std::fs::metadata(&runtime).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    eprintln!(
        "figure: runtime dir gone: {} ticks in 500 ms, status answers again after {back_ms} ms",
        ticks() - before
    );
    assert!(!running.is_finished());
    stop.trigger();
    rt.block_on(running).unwrap().unwrap();
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());

    // Cannot be created (read-only parent): a clear error before any change.
    let ro = TmpMount::new(&state.join("ro-run"), "size=64k,ro");
    let cfg = Config {
        runtime_dir: state.join("ro-run/vmbalancer"),
        ..config(&state)
    };
    let d = daemon_with(
        cfg,
        snap,
        Script::actions(vec![set_cpus(t.pid, "1")]),
        Shutdown::new(),
    );
    let err = rt
        .block_on(balancer::daemon::run::run(d))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ro-run/vmbalancer"), "{err}");
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    drop(ro);
    end(t);
    std::fs::remove_dir_all(&state).unwrap();
}

/// Runs `fault_daemon` on the VM; true when it was SIGKILLed, false when it ended.
fn fault_daemon(state: &Path, sys_root: &Path, phase: &str, t: &Target, action: &str) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_fault_daemon"))
        .arg(state)
        .arg(sys_root)
        .args([
            phase,
            &t.pid.to_string(),
            &t.tids[0].to_string(),
            &t.tids[1].to_string(),
            action,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.signal() {
        Some(9) => {
            assert!(stderr.contains("SIGKILL at"), "{stderr}");
            true
        }
        _ => {
            assert!(out.status.success(), "{}: {stderr}", out.status);
            false
        }
    }
}

/// One crash of the move: where `fault_daemon` is killed, with what action, and what
/// must hold afterwards.
struct Kill<'a> {
    phase: &'a str,
    action: &'a str,
    sys_root: &'a Path,
    /// The journal still has the action in flight.
    in_flight: bool,
    /// The VM's CPU set right after the kill.
    after: &'a CpuSet,
    /// What the next start must decide.
    next_start: fn(&Recovery) -> bool,
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity and moves its pages"]
fn fault_sigkill_in_each_phase_of_a_move() {
    require_root();
    let all = online();
    let one = CpuSet::parse_list("1").unwrap();
    let real_sys = Path::new("/sys");
    let node1_sys = fake_sys::with_node1("kill", 8388608);
    let cases = [
        Kill {
            phase: "adopt",
            action: "cpus:1",
            sys_root: real_sys,
            in_flight: false,
            after: &all,
            next_start: |_| false,
        },
        Kill {
            phase: "begin",
            action: "cpus:1",
            sys_root: real_sys,
            in_flight: true,
            after: &all,
            next_start: |r| matches!(r, Recovery::Finish(_)),
        },
        Kill {
            phase: "applied",
            action: "cpus:1",
            sys_root: real_sys,
            in_flight: true,
            after: &one,
            next_start: |r| matches!(r, Recovery::Finish(_)),
        },
        Kill {
            phase: "moving",
            action: "mem",
            sys_root: &node1_sys,
            in_flight: true,
            after: &all,
            next_start: |r| matches!(r, Recovery::Revert(w) if w.mems && !w.cpus),
        },
        Kill {
            phase: "restore",
            action: "cpus:1",
            sys_root: real_sys,
            in_flight: false,
            after: &all,
            next_start: |r| *r == Recovery::Keep,
        },
    ];
    for Kill {
        phase,
        action,
        sys_root,
        in_flight,
        after,
        next_start,
    } in cases
    {
        let t = target(512 << 20);
        let state = temp(&format!("kill-{phase}"));
        let action = if action == "mem" {
            format!("mem:{}:{}", t.addr, t.len)
        } else {
            action.to_string()
        };
        assert!(
            fault_daemon(&state, sys_root, phase, &t, &action),
            "{phase}: not killed"
        );
        // Killed: the VM's sets are whole, the journal is whole and says what the
        // dead run was doing.
        assert_vm_sets(t.pid, &all, Some(after));
        let j = Journal::open(&state).unwrap();
        assert!(set_aside(&state).is_empty(), "{phase}");
        match j.entries().get(&t.pid) {
            None => assert_eq!(phase, "adopt"),
            Some(e) => {
                assert_eq!(e.original.threads[&t.pid], all, "{phase}");
                assert_eq!(e.in_flight.is_some(), in_flight, "{phase}");
            }
        }
        drop(j);
        if phase == "moving" {
            assert!(
                page_nodes(t.pid, t.addr, t.len).iter().all(|n| *n == 0),
                "moving: a page is not on node 0"
            );
        }
        // The next start recovers and its stop puts the VM back.
        let mut d = daemon_on(&state, vm_snapshot(t.pid, &t.tids, None), vec![]);
        let done = d.recover().unwrap();
        match &done[..] {
            [] => assert_eq!(phase, "adopt"),
            [(_, r, out)] => {
                assert!(next_start(r), "{phase}: {r:?}");
                assert!(
                    matches!(out, ActionOutcome::Done { .. }),
                    "{phase}: {out:?}"
                );
            }
            more => panic!("{phase}: {more:?}"),
        }
        assert_vm_sets(t.pid, &all, None);
        eprintln!("figure: killed at {phase}: next start {done:?}");
        d.finish();
        assert_vm_sets(t.pid, &all, Some(&all));
        assert!(Journal::open(&state).unwrap().entries().is_empty());
        end(t);
        std::fs::remove_dir_all(&state).unwrap();
    }

    // Killed again in the middle of the recovery of a move killed before it applied.
    let t = target(1 << 20);
    let state = temp("kill-recovery");
    assert!(fault_daemon(&state, real_sys, "begin", &t, "cpus:1"));
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(fault_daemon(&state, real_sys, "applied", &t, "none"));
    assert_vm_sets(t.pid, &all, Some(&one));
    assert!(
        Journal::open(&state).unwrap().entries()[&t.pid]
            .in_flight
            .is_some()
    );
    // Not killed: it recovers, and its stop puts the VM back.
    assert!(!fault_daemon(&state, real_sys, "never", &t, "none"));
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    end(t);
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::remove_dir_all(&node1_sys).unwrap();
}

/// Plays a script, and removes a cgroup when it plans its second tick: after the
/// daemon observed the VM in it and adopted it, before the move is applied.
struct RemoveGroup {
    script: Script,
    group: Option<V1Group>,
    ticks: u32,
}

impl Policy for RemoveGroup {
    fn plan(&mut self, s: &Snapshot) -> Plan {
        self.ticks += 1;
        if self.ticks == 2 {
            self.group.take();
        }
        self.script.plan(s)
    }
    fn feedback(&mut self, _a: &PlannedAction, _o: &ActionOutcome) {}
}

#[test]
#[ignore = "needs root: creates and removes cgroup v1 cpuset groups"]
fn fault_cgroup_removed_under_a_move() {
    require_root();
    let all = online();
    let root = Path::new("/sys/fs/cgroup/cpuset");
    vmbalancer_tests::require(
        root.join("cpuset.cpus").exists(),
        "a cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset",
    );
    let mems = std::fs::read_to_string(root.join("cpuset.mems")).unwrap();
    let t = target(1 << 20);
    let name = format!("vmb-fault-{}", std::process::id());
    let group = V1Group::create(root, &name, &all.to_string(), &mems, &t.tids);
    let state = temp("cgroup");
    let snap = vm_snapshot(t.pid, &t.tids, Some(format!("/{name}")));
    let policy = RemoveGroup {
        script: Script::actions(vec![set_cpus(t.pid, "1"), set_cpus(t.pid, "0")]),
        group: Some(group),
        ticks: 0,
    };
    let mut d = daemon_with(config(&state), snap, policy, Shutdown::new());
    // Tick 1: the VM is adopted with its groups and moved through them.
    d.tick();
    let read = |p: &str| std::fs::read_to_string(root.join(&name).join(p)).unwrap();
    assert_eq!(read("vcpu0/cpuset.cpus").trim(), "1");
    // Tick 2: the group is gone when the move comes; the threads move instead.
    d.tick();
    assert!(!root.join(&name).exists());
    let out = outcomes(&d);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out.iter()
            .all(|o| *o == ActionOutcome::Done { moved_bytes: 0 }),
        "{out:?}"
    );
    let zero = CpuSet::parse_list("0").unwrap();
    assert_vm_sets(t.pid, &all, Some(&zero));
    assert!(d.journal().unwrap().entries()[&t.pid].in_flight.is_none());
    // Stop: the recorded groups are gone, so the threads get their sets back.
    d.finish();
    let gone = balancer::daemon::Actuator::counters(d.actuator()).cgroups_gone;
    eprintln!("figure: cgroup removed: outcomes {out:?}, cgroup writes that found no group {gone}");
    assert_vm_sets(t.pid, &all, Some(&all));
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    end(t);
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
#[ignore = "needs root: the Linux applier sets another process's CPU affinity"]
fn fault_vm_threads_churning() {
    require_root();
    let all = online();
    let mut t = target(1 << 20);
    let state = temp("churn");
    let snap = vm_snapshot(t.pid, &t.tids, None);
    assert_eq!(ask(&mut t, "churn"), "churning");
    let moves: Vec<PlannedAction> = ["1", "0", "1", "0", "1"]
        .iter()
        .map(|c| set_cpus(t.pid, c))
        .collect();
    let mut d = daemon_on(&state, snap.clone(), moves);
    for _ in 0..5 {
        assert_eq!(d.tick().applied, 1);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Threads came and went under every move: each move still ended done.
    let out = outcomes(&d);
    assert_eq!(out.len(), 5);
    assert!(
        out.iter()
            .all(|o| *o == ActionOutcome::Done { moved_bytes: 0 }),
        "{out:?}"
    );
    let started: u64 = ask(&mut t, "calm")
        .strip_prefix("calm ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(started > 0);
    let gone = balancer::daemon::Actuator::counters(d.actuator()).threads_gone;
    eprintln!("figure: churn: {started} threads started during 5 moves, threads_gone {gone}");
    let one = CpuSet::parse_list("1").unwrap();
    assert_vm_sets(t.pid, &all, Some(&one));
    // A thread born after the moves inherits the daemon's set.
    let born: u32 = ask(&mut t, "spawn").parse().unwrap();
    assert_eq!(sys::get_affinity(born).unwrap(), one);
    drop(d); // killed

    // A thread of another process that reused the id of a recorded VM thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let release = Arc::new(AtomicBool::new(false));
    let r = release.clone();
    let other = std::thread::spawn(move || {
        tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
        while !r.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let foreign = rx.recv().unwrap();
    let zero = CpuSet::parse_list("0").unwrap();
    sys::set_affinity(foreign, &zero).unwrap();
    let mut j = Journal::open(&state).unwrap();
    let mut o = j.entries()[&t.pid].original.clone();
    o.threads.insert(foreign, all.clone());
    j.forget(t.pid).unwrap();
    j.adopt(o).unwrap();
    drop(j);

    // The next start and its stop: every thread of the VM, the one born since
    // included, gets its set back; the other process's thread is left alone.
    let mut d = daemon_on(&state, snap, vec![]);
    d.recover().unwrap();
    d.finish();
    assert_vm_sets(t.pid, &all, Some(&all));
    assert_eq!(sys::get_affinity(foreign).unwrap(), zero);
    assert!(Journal::open(&state).unwrap().entries().is_empty());
    release.store(true, Ordering::Relaxed);
    other.join().unwrap();
    end(t);
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
#[ignore = "needs root: loads the eBPF programs"]
fn fault_bpf_map_full() {
    require_root();
    let telemetry = Telemetry::load().expect("the eBPF programs load on this host");
    let mut source = EbpfTelemetry::new(telemetry);
    // A vCPU of this process's "VM" that runs.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let spinner = std::thread::spawn(move || {
        tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
        vmbalancer_tests::fault::spin_until(&s);
    });
    let vcpu = rx.recv().unwrap();
    let me = TrackedVm {
        pid: std::process::id(),
        vcpus: vec![(0, vcpu)],
        other_threads: vec![],
    };
    // Another "VM" with as many threads as the map holds (ids no thread has).
    let capacity = balancer_common::MAX_TRACKED_THREADS;
    let crowd = TrackedVm {
        pid: 4_000_000_000,
        vcpus: vec![],
        other_threads: (0..capacity).map(|i| 4_100_000_000 + i).collect(),
    };
    source.track(std::slice::from_ref(&crowd));
    assert_eq!(source.untracked_threads(), 0);
    // Full: the VM's vCPU cannot be tracked. Its telemetry is missing, nothing fails.
    source.track(&[crowd.clone(), me.clone()]);
    assert_eq!(source.untracked_threads(), 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vcpu_run_ns(&mut source, vcpu), 0);
    source.track(&[crowd, me.clone()]);
    assert_eq!(source.untracked_threads(), 1, "retried every pass");
    eprintln!("figure: map full: {capacity} tracked, 1 refused and retried");
    // The crowd exits: the vCPU is tracked at the next pass and counted.
    source.track(std::slice::from_ref(&me));
    assert_eq!(source.untracked_threads(), 0);
    std::thread::sleep(Duration::from_millis(300));
    let counted = vcpu_run_ns(&mut source, vcpu);
    assert!(counted > 0);
    eprintln!("figure: map full: with room again, {counted} ns counted");
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
}

/// The run time the programs counted for `vcpu`, as the observer fills it in.
fn vcpu_run_ns(source: &mut EbpfTelemetry, vcpu: u32) -> u64 {
    let mut s = vm_snapshot(std::process::id(), &[vcpu], None);
    s.now_ns = vmbalancer_tests::clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
    source.fill(&mut s, &Default::default());
    s.vms[0].vcpus[0].telemetry.run_ns_per_node.iter().sum()
}

#[test]
#[ignore = "needs root: loads the eBPF programs and unmounts tracefs in a mount namespace"]
fn fault_tracefs_unmounted_while_running() {
    require_root();
    let host_tracefs = Path::new("/sys/kernel/tracing/trace").exists();
    let out = Command::new(env!("CARGO_BIN_EXE_fault_daemon"))
        .arg("tracefs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stdout}{stderr}", out.status);
    let counted = |what: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(what))
            .unwrap_or_else(|| panic!("no {what:?} in {stdout}"))
            .trim()
            .parse()
            .unwrap()
    };
    // The programs keep counting once tracefs is gone, and load again without it.
    let (before, after) = (counted("before "), counted("after "));
    assert!(before > 0, "{stdout}");
    assert!(after > before, "{stdout}");
    assert!(
        stdout.contains("unmounted") && stdout.contains("reloaded"),
        "{stdout}"
    );
    // Only the helper's namespace lost it.
    assert_eq!(
        Path::new("/sys/kernel/tracing/trace").exists(),
        host_tracefs
    );
    eprintln!("figure: tracefs: {before} ns before, {after} ns after the unmount");
}

/// Writes a configuration file for the real daemon: its state and runtime under
/// `dir`, managing no VM of this host (a name no VM has), `extra` appended.
fn daemon_config(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "state_dir = {:?}\nruntime_dir = {:?}\ninclude_vms = [\"vmb-fault-no-such-vm\"]\n\
             write_heat_sampling = false\n{extra}",
            dir.join("state"),
            dir.join("run"),
        ),
    )
    .unwrap();
    file
}

#[test]
#[ignore = "needs root: runs the daemon, which loads the eBPF programs"]
fn fault_bad_configuration_values() {
    require_root();
    let dir = temp("config");
    let cli = Path::new(env!("CARGO_BIN_EXE_vmbalancer_cli"));
    // At start: refused, naming the key, before the state or runtime directory
    // exists.
    for (extra, key) in [
        ("tick_ms = 5\n", "tick_ms"),
        ("migration_threads = 0\n", "migration_threads"),
        ("target_locality_pct = 150\n", "target_locality_pct"),
        ("migration_nice = -40\n", "migration_nice"),
        ("reserved_cpus = \"3-1\"\n", "reserved_cpus"),
        (
            "prometheus_listen = \"0.0.0.0:9767\"\n",
            "prometheus_listen",
        ),
        ("status_group = \"root\"\n", "status_group"),
        ("tick_msec = 500\n", "tick_msec"),
        ("probation_window_ms = \"soon\"\n", "probation_window_ms"),
        ("[[[ not toml\n", "config.toml"),
    ] {
        let file = daemon_config(&dir, extra);
        let out = Command::new(cli)
            .args(["run", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: {stderr}");
        assert!(stderr.contains(key), "{extra}: {stderr}");
        assert!(!dir.join("state").exists(), "{extra}");
        assert!(!dir.join("run").exists(), "{extra}");
    }
    // A bad flag likewise.
    let file = daemon_config(&dir, "");
    let out = Command::new(cli)
        .args(["run", "--tick-ms", "5", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tick_ms"));
    assert!(!dir.join("state").exists());

    // While running, SIGHUP reloads: a bad file is refused with the key named and
    // the daemon goes on with the configuration it has; a good file then takes effect
    // at the next tick.
    let file = daemon_config(&dir, "tick_ms = 200\nprobation_window_ms = 1000\n");
    let log = dir.join("daemon.log");
    let mut child = Command::new(cli)
        .args(["run", "--config"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let socket = dir.join("run/control.sock");
    let status = || match control::request(&socket, &Request::Status, Duration::from_secs(5)) {
        Ok(Response::Status(doc)) => Some(doc),
        _ => None,
    };
    let wait_for = |what: &str, done: &dyn Fn(&balancer::daemon::status::StatusDoc) -> bool| {
        let until = Instant::now() + Duration::from_secs(30);
        while !status().is_some_and(|s| done(&s)) {
            assert!(Instant::now() < until, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("the daemon did not start", &|s| s.daemon.ticks >= 2);
    daemon_config(&dir, "tick_ms = 5\nmigration_threads = 0\n");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("the bad reload was not reported", &|s| {
        s.daemon.reload_failures == 1
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the daemon"
    );
    let doc = status().expect("the daemon answers after SIGHUP");
    assert_eq!(doc.daemon.tick_ms, 200);
    assert!(
        doc.daemon
            .last_reload_error
            .as_deref()
            .is_some_and(|e| e.contains("tick_ms")),
        "{:?}",
        doc.daemon.last_reload_error
    );
    let ticks = doc.daemon.ticks;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        status().unwrap().daemon.ticks > ticks,
        "the daemon stopped ticking"
    );
    // `vmbalancer reload` (the unit's ExecReload) waits for the answer: a bad file
    // fails the command with the key named, a good one says what changed.
    let reload = || {
        let out = Command::new(cli)
            .args(["reload", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = reload();
    assert!(!ok && text.contains("tick_ms"), "{text}");
    daemon_config(&dir, "tick_ms = 300\nprobation_window_ms = 1000\n");
    let (ok, text) = reload();
    assert!(ok && text.contains("changed: tick_ms"), "{text}");
    let doc = status().unwrap();
    assert_eq!(
        (
            doc.daemon.tick_ms,
            doc.daemon.reloads,
            doc.daemon.reload_failures
        ),
        (300, 1, 2)
    );
    assert_eq!(doc.daemon.last_reload_error, None);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{st}: {log}");
    assert!(log.contains("SIGHUP"), "{log}");
    assert!(log.contains("configuration not reloaded"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    eprintln!(
        "figure: config: 11 bad starts refused; a running daemon refused a bad reload and took a good one"
    );
    assert!(
        Journal::open(&dir.join("state"))
            .unwrap()
            .entries()
            .is_empty()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
