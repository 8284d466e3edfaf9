//! The Linux applier on this machine, for real (needs root): CPU affinity of a child
//! process with two threads, move_pages on its memory, refusals, a process that
//! exits, and a cgroup v1 cpuset group made for the test.

use std::io::{BufRead, BufReader, Write};

use std::path::Path;
use vmbalancer_tests::actuate_target::Target;
use vmbalancer_tests::cgroup_v1::V1Group;
use vmbalancer_tests::fake_sys;
use vmbalancer_tests::require_root;

use balancer::host::Applier;
use balancer::host::linux::actuate::{ApplierConfig, LinuxApplier, RestoreWhat, sys};
use balancer::model::{
    Action, ActionOutcome, CpuSet, OperatorPins, PlannedAction, Reason, Snapshot, Vcpu, Vm,
};

/// Starts the test program with its default mapping.
fn spawn_target() -> Target {
    Target::spawn(Path::new(env!("CARGO_BIN_EXE_actuate_target")), &[])
}

/// What these tests do with the test program.
trait TargetExt {
    /// The process as the applier sees a VM: its two threads are the vCPUs.
    fn vm(&self) -> Vm;
    /// Asks one worker thread to exit (a vCPU thread vanishing).
    fn stop_worker(&mut self);
    /// Ends the process and returns its pid.
    fn exit(self) -> u32;
}

impl TargetExt for Target {
    fn vm(&self) -> Vm {
        Vm {
            pid: self.pid,
            name: "actuate-target".into(),
            vcpus: (0..2)
                .map(|i| Vcpu {
                    index: i,
                    tid: self.tids[i as usize],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn stop_worker(&mut self) {
        writeln!(self.child.stdin.as_mut().unwrap(), "stop-worker").unwrap();
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "stopped");
    }

    fn exit(mut self) -> u32 {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
        self.pid
    }
}

fn host_snapshot(vms: Vec<Vm>) -> Snapshot {
    Snapshot {
        topology: balancer::host::linux::topology::read_topology(
            &balancer::host::linux::HostPaths::system(),
        )
        .unwrap(),
        vms,
        ..Default::default()
    }
}

fn act(vm: u32, action: Action) -> PlannedAction {
    PlannedAction {
        vm,
        action,
        reason: Reason::InitialPlacement { node: 0 },
    }
}

fn set_cpus(vcpus: Option<Vec<u32>>, cpus: &str) -> Action {
    Action::SetCpus {
        vcpus,
        cpus: CpuSet::parse_list(cpus).unwrap(),
    }
}

fn migrate(from: u32, to: u32, regions: Vec<(u64, u64)>, max_bytes: u64) -> Action {
    Action::MigrateMemory {
        from,
        to,
        regions,
        max_bytes,
        within: None,
    }
}

fn status_list(pid: u32, tid: u32) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
#[ignore = "needs root: sets the CPU affinity of another process"]
fn affinity_of_both_threads_is_set_read_back_and_restored() {
    require_root();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let t = spawn_target();
    let before = sys::get_affinity(t.tids[1]).unwrap();
    let snap = host_snapshot(vec![t.vm()]);
    let mut a = LinuxApplier::new(ApplierConfig::default());

    let out = a.apply(&snap, &act(t.pid, set_cpus(None, "1")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    for tid in t.tids {
        assert_eq!(sys::get_affinity(tid).unwrap().to_string(), "1");
        assert_eq!(status_list(t.pid, tid), "1");
    }
    // One vCPU only.
    let out = a.apply(&snap, &act(t.pid, set_cpus(Some(vec![0]), "0")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    assert_eq!(status_list(t.pid, t.tids[0]), "0");
    assert_eq!(status_list(t.pid, t.tids[1]), "1");

    // Refusals change nothing.
    for (action, why) in [
        (set_cpus(None, "64"), "not online"),
        (set_cpus(None, ""), "empty"),
        (set_cpus(Some(vec![7]), "0"), "vCPU 7"),
    ] {
        match a.apply(&snap, &act(t.pid, action)) {
            ActionOutcome::Refused { why: w } => assert!(w.contains(why), "{w}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(status_list(t.pid, t.tids[1]), "1");

    let o = a.originals()[&t.pid].clone();
    let out = a.restore(
        &o,
        RestoreWhat {
            cpus: true,
            mems: false,
        },
    );
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    assert_eq!(sys::get_affinity(t.tids[1]).unwrap(), before);
    assert_eq!(status_list(t.pid, t.tids[0]), online.trim());
    assert_eq!(a.counters().refused, 3);
    t.exit();
}

#[test]
#[ignore = "needs root: moves another process's pages"]
fn move_pages_to_node_0_succeeds_and_node_1_is_refused() {
    require_root();
    let t = spawn_target();
    let page = sys::page_size_bytes();
    let pages: Vec<u64> = (0..t.len / page).map(|i| t.addr + i * page).collect();
    // Query: every touched page is on node 0 (this host's only node).
    let mut status = vec![-1i32; pages.len()];
    sys::move_pages(t.pid, &pages, None, &mut status).unwrap();
    assert!(status.iter().all(|s| *s == 0), "{:?}", &status[..8]);
    // Move to node 0: succeeds, 0 failures, every status is the target node.
    let nodes = vec![0i32; pages.len()];
    let mut status = vec![-1i32; pages.len()];
    let not_moved = sys::move_pages(t.pid, &pages, Some(&nodes), &mut status).unwrap();
    assert_eq!(not_moved, 0);
    assert_eq!(status.iter().filter(|s| **s != 0).count(), 0);

    // Node 1 does not exist: the applier refuses before any syscall, with the reason.
    let snap = host_snapshot(vec![t.vm()]);
    let mut a = LinuxApplier::new(ApplierConfig::default());
    let region = vec![(t.addr, t.len)];
    match a.apply(&snap, &act(t.pid, migrate(0, 1, region.clone(), t.len))) {
        ActionOutcome::Refused { why } => assert!(why.contains("node 1 does not exist"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // And the kernel agrees, for the whole call.
    let nodes = vec![1i32; 4];
    let mut status = vec![0i32; 4];
    assert_eq!(
        sys::move_pages(t.pid, &pages[..4], Some(&nodes), &mut status),
        Err(nix::Error::ENODEV)
    );
    match a.apply(&snap, &act(t.pid, migrate(0, 0, region, t.len))) {
        ActionOutcome::Refused { why } => assert!(why.contains("both node 0"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    t.exit();
}

#[test]
#[ignore = "needs root: moves another process's pages"]
fn moves_need_free_memory_plus_headroom_and_count_failed_pages() {
    require_root();
    let t = spawn_target();
    let snap = host_snapshot(vec![t.vm()]);
    let region = vec![(t.addr, t.len)];

    // Node 1 "exists" with 100 MiB free; 16 MiB + 512 MiB headroom does not fit.
    let sys_root = fake_sys::with_node1("full", 100 << 10);
    let mut a = LinuxApplier::new(ApplierConfig {
        sys_root: sys_root.clone(),
        ..ApplierConfig::default()
    });
    match a.apply(&snap, &act(t.pid, migrate(0, 1, region.clone(), t.len))) {
        ActionOutcome::Refused { why } => {
            assert!(why.contains("node 1 has 104857600 bytes free"), "{why}");
            assert!(why.contains("headroom"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    std::fs::remove_dir_all(sys_root).unwrap();

    // Enough room on paper: the kernel refuses every page (no such node), the per-page
    // accounting says so and nothing moved.
    let sys_root = fake_sys::with_node1("roomy", 8 << 20);
    let mut a = LinuxApplier::new(ApplierConfig {
        sys_root: sys_root.clone(),
        headroom_bytes: 0,
        ..ApplierConfig::default()
    });
    match a.apply(&snap, &act(t.pid, migrate(0, 1, region, t.len))) {
        ActionOutcome::Refused { why } => assert!(why.contains("no page could move"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let page = sys::page_size_bytes();
    let mut status = vec![-1i32; 4];
    let pages: Vec<u64> = (0..4).map(|i| t.addr + i * page).collect();
    sys::move_pages(t.pid, &pages, None, &mut status).unwrap();
    assert_eq!(status, vec![0; 4], "pages stayed on node 0");
    std::fs::remove_dir_all(sys_root).unwrap();
    t.exit();
}

#[test]
#[ignore = "needs root: moves another process's pages"]
fn background_moves_all_end_and_are_handed_back() {
    require_root();
    let t = spawn_target();
    let snap = host_snapshot(vec![t.vm()]);
    // Node 1 "exists" with room; the kernel refuses every page (no such node), so
    // each move runs its batches on the mover threads and ends refused.
    let sys_root = fake_sys::with_node1("pool", 8 << 20);
    let mut a = LinuxApplier::new(ApplierConfig {
        sys_root: sys_root.clone(),
        headroom_bytes: 0,
        batch_pages: 64,
        ..ApplierConfig::default()
    });
    a.move_in_background();
    let half = t.len / 2;
    let moves = [
        migrate(0, 1, vec![], t.len),
        migrate(0, 1, vec![(t.addr, half)], half),
        migrate(0, 1, vec![(t.addr + half, half)], half),
    ];
    for m in &moves {
        assert_eq!(
            a.apply(&snap, &act(t.pid, m.clone())),
            ActionOutcome::Started
        );
    }
    let ended = a.ended_moves(Some(std::time::Duration::from_secs(30)));
    assert_eq!(ended.len(), moves.len(), "{ended:?}");
    for (done, out) in &ended {
        assert_eq!(done.vm, t.pid);
        assert!(
            moves.contains(&done.action),
            "not a move handed over: {done:?}"
        );
        match out {
            ActionOutcome::Refused { why } => assert!(why.contains("no page could move"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(a.progress_handle().lock().unwrap().is_empty());
    assert!(a.ended_moves(None).is_empty());
    std::fs::remove_dir_all(sys_root).unwrap();
    t.exit();
}

#[test]
#[ignore = "needs root: acts on other processes as the daemon does"]
fn exited_processes_and_vanished_threads_are_quiet() {
    require_root();
    let mut t = spawn_target();
    let vm = t.vm();
    let snap = host_snapshot(vec![vm.clone()]);
    let mut a = LinuxApplier::new(ApplierConfig::default());
    a.adopt(&vm).unwrap();
    // The worker thread (vCPU 1) ends: acting on it alone finds nothing to move.
    t.stop_worker();
    let out = a.apply(&snap, &act(vm.pid, set_cpus(Some(vec![1]), "0")));
    assert_eq!(out, ActionOutcome::VmGone);
    assert_eq!(a.counters().threads_gone, 1);
    // The whole VM still moves (its threads are listed afresh).
    let out = a.apply(&snap, &act(vm.pid, set_cpus(None, "0")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });

    let pid = t.exit();
    let gone_before = a.counters().vm_gone;
    for action in [
        set_cpus(None, "0"),
        migrate(0, 0, vec![], 1 << 20),
        migrate(0, 1, vec![], 1 << 20),
    ] {
        assert_eq!(a.apply(&snap, &act(pid, action)), ActionOutcome::VmGone);
    }
    assert_eq!(a.counters().vm_gone, gone_before + 3);
    // The syscall itself says ESRCH.
    let mut status = [0i32; 1];
    assert_eq!(
        sys::move_pages(pid, &[4096], None, &mut status),
        Err(nix::Error::ESRCH)
    );
    // Restoring a VM that exited is quiet too.
    let o = a.originals()[&pid].clone();
    let what = RestoreWhat {
        cpus: true,
        mems: false,
    };
    assert_eq!(a.restore(&o, what), ActionOutcome::VmGone);
}

/// The test program in a libvirt-like cgroup v1 cpuset group of its own (`vcpu0`,
/// `vcpu1`, `emulator`), on every CPU of the root cpuset: the group, those CPUs and
/// the VM. Needs root and at least 2 CPUs.
fn in_v1_group(t: &Target, test: &str) -> (V1Group, String, Vm) {
    require_root();
    let root = Path::new("/sys/fs/cgroup/cpuset");
    vmbalancer_tests::require(
        root.join("cpuset.cpus").exists(),
        "a cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset",
    );
    let all = std::fs::read_to_string(root.join("cpuset.cpus")).unwrap();
    let mems = std::fs::read_to_string(root.join("cpuset.mems")).unwrap();
    vmbalancer_tests::require(
        CpuSet::parse_list(&all).unwrap().len() >= 2,
        "2 CPUs in the root cpuset",
    );
    let name = format!("vmb-{test}-{}", std::process::id());
    let guard = V1Group::create(root, &name, &all, &mems, &t.tids);
    let mut vm = t.vm();
    vm.cgroup = Some(format!("/{name}"));
    (guard, all.trim().to_string(), vm)
}

#[test]
#[ignore = "needs root: creates and writes cgroup v1 cpuset groups"]
fn cgroup_v1_cpuset_groups_are_written_and_read_back() {
    let t = spawn_target();
    let (guard, all, vm) = in_v1_group(&t, "test");
    let root = Path::new("/sys/fs/cgroup/cpuset");
    let name = guard.dir.file_name().unwrap().to_owned();
    let snap = host_snapshot(vec![vm.clone()]);
    let mut a = LinuxApplier::new(ApplierConfig::default());
    assert!(!a.cpuset_fs().unwrap().is_v2());

    let out = a.apply(&snap, &act(vm.pid, set_cpus(Some(vec![1]), "1")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    let read = |p: &str| {
        std::fs::read_to_string(guard.dir.join(p))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("vcpu1/cpuset.cpus"), "1");
    assert_eq!(read("vcpu0/cpuset.cpus"), all);
    // The kernel applied the group's set to the thread.
    assert_eq!(status_list(vm.pid, t.tids[1]), "1");

    // Whole VM: all vCPU groups and the emulator group.
    let out = a.apply(&snap, &act(vm.pid, set_cpus(None, "0")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    for g in ["vcpu0", "vcpu1", "emulator"] {
        assert_eq!(read(&format!("{g}/cpuset.cpus")), "0");
    }
    assert_eq!(status_list(vm.pid, t.tids[0]), "0");

    // Restore: the recorded sets come back, children and parent.
    let o = a.originals()[&vm.pid].clone();
    assert_eq!(o.groups.len(), 4);
    let out = a.restore(
        &o,
        RestoreWhat {
            cpus: true,
            mems: true,
        },
    );
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    for g in ["vcpu0", "vcpu1", "emulator"] {
        assert_eq!(read(&format!("{g}/cpuset.cpus")), all);
    }
    assert_eq!(status_list(vm.pid, t.tids[1]), all);

    // The group vanishes under us (the VM is being torn down): quiet, no error.
    drop(guard);
    assert!(!root.join(&name).exists());
    let out = a.apply(&snap, &act(vm.pid, set_cpus(None, "1")));
    assert_eq!(
        out,
        ActionOutcome::Done { moved_bytes: 0 },
        "falls back to threads"
    );
    t.exit();
}

#[test]
#[ignore = "needs root: creates and writes cgroup v1 cpuset groups"]
fn letting_go_keeps_the_operators_vcpu_groups_and_puts_back_the_rest() {
    let t = spawn_target();
    let (guard, all, vm) = in_v1_group(&t, "letgo");
    let snap = host_snapshot(vec![vm.clone()]);
    let mut a = LinuxApplier::new(ApplierConfig::default());
    let read = |p: &str| {
        std::fs::read_to_string(guard.dir.join(p))
            .unwrap()
            .trim()
            .to_string()
    };
    // vmbalancer moves the whole VM to CPU 0.
    let out = a.apply(&snap, &act(vm.pid, set_cpus(None, "0")));
    assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
    assert_eq!(read("emulator/cpuset.cpus"), "0");
    // The operator pins vCPU 0 to CPU 1 (`virsh vcpupin`: libvirt writes its group),
    // and the daemon observes that pin only.
    std::fs::write(guard.dir.join("vcpu0/cpuset.cpus"), "1").unwrap();
    let pins = OperatorPins {
        vcpus: vec![0],
        ..OperatorPins::default()
    };
    let released = a.originals()[&vm.pid].released(&pins);
    // The operator's next `virsh vcpupin`, of vCPU 1, lands before the daemon lets go.
    std::fs::write(guard.dir.join("vcpu1/cpuset.cpus"), "1").unwrap();
    // Letting go puts back what is still the applier's (the emulator group, the
    // parent) and leaves both pinned vCPU groups and their threads alone.
    assert_eq!(a.release(&released), ActionOutcome::Done { moved_bytes: 0 });
    assert_eq!(read("emulator/cpuset.cpus"), all);
    for (i, g) in ["vcpu0", "vcpu1"].iter().enumerate() {
        assert_eq!(read(&format!("{g}/cpuset.cpus")), "1");
        assert_eq!(status_list(vm.pid, t.tids[i]), "1");
    }
    drop(guard);
    t.exit();
}
