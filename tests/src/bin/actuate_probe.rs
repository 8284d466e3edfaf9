//! Checks the Linux applier's memory moves on a host with several NUMA nodes (the
//! lab guest): hot-first batched move_pages under a rate limit, a whole move with
//! migrate_pages, cgroup v2 `cpuset.mems` widened during a move and narrowed only
//! after a complete one, a refusal for a full node, and a stop at a batch boundary.
//!
//! Usage: `actuate_probe PATH_TO_actuate_target [CGROUP_ROOT]` (the folder holding
//! a cgroup v2 mount with the cpuset controller, or a v1 `cpuset/` hierarchy). Prints one
//! `PASS name ...` or `FAIL name: why` line per check and exits non-zero on failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use balancer::host::Applier;
use balancer::host::linux::actuate::cgroup::CpusetFs;
use balancer::host::linux::actuate::{ApplierConfig, LinuxApplier, sys};
use balancer::host::linux::{HostPaths, topology::read_topology};
use balancer::model::{
    Action, ActionOutcome, MemoryBacking, PlannedAction, Reason, Snapshot, Topology, Vm, VmMemory,
};
use vmbalancer_tests::actuate_target::Target;

const MIB: u64 = 1 << 20;

fn spawn_target(exe: &Path, len: u64, huge: bool) -> Target {
    Target::spawn(
        exe,
        &[&len.to_string(), if huge { "huge" } else { "small" }],
    )
}

/// Pages of `[addr, addr+len)` per node id (index = node, last = not present).
fn pages_per_node(pid: u32, addr: u64, len: u64, nodes: usize) -> Vec<u64> {
    let page = sys::page_size_bytes();
    let pages: Vec<u64> = (0..len / page).map(|i| addr + i * page).collect();
    let mut out = vec![0u64; nodes + 1];
    for chunk in pages.chunks(512) {
        let mut st = vec![0i32; chunk.len()];
        sys::move_pages(pid, chunk, None, &mut st).unwrap();
        for s in st {
            if s >= 0 && (s as usize) < nodes {
                out[s as usize] += 1;
            } else {
                out[nodes] += 1;
            }
        }
    }
    out
}

fn snapshot(topo: &Topology, t: &Target, cgroup: Option<String>) -> Snapshot {
    let n = topo.nodes.len();
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    let page = sys::page_size_bytes();
    Snapshot {
        topology: topo.clone(),
        vms: vec![Vm {
            pid: t.pid,
            name: "probe".into(),
            cgroup,
            memory: VmMemory {
                bytes_per_node: per[..n].iter().map(|p| p * page).collect(),
                ..Default::default()
            },
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn migrate(vm: u32, from: u32, to: u32, regions: Vec<(u64, u64)>, max_bytes: u64) -> PlannedAction {
    PlannedAction {
        vm,
        action: Action::MigrateMemory {
            from,
            to,
            regions,
            max_bytes,
            within: None,
        },
        reason: Reason::Locality {
            locality_pct: 0.0,
            target_pct: 90.0,
        },
    }
}

struct Report {
    failed: bool,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        if ok {
            println!("PASS {name} {detail}");
        } else {
            println!("FAIL {name}: {detail}");
            self.failed = true;
        }
    }
}

/// The VM's cpuset group (v1 or v2, whichever `root` has) around memory moves.
fn cgroup_checks(r: &mut Report, topo: &Topology, t: &Target, root: &Path) {
    let n = topo.nodes.len();
    let page = sys::page_size_bytes();
    let len = t.len;
    let Some(fs) = CpusetFs::detect(root) else {
        r.check(
            "cgroup-setup",
            false,
            format!("no cpuset under {}", root.display()),
        );
        return;
    };
    let v = if fs.is_v2() { "v2" } else { "v1" };
    let group = fs.dir("vmb-probe");
    let _ = std::fs::create_dir(&group);
    let w = |f: &str, val: &str| std::fs::write(group.join(f), val);
    let read = |f: &str| {
        std::fs::read_to_string(group.join(f))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let all_cpus = topo.all_cpus().to_string();
    let mut ok = w("cpuset.cpus", &all_cpus).is_ok() && w("cpuset.mems", "0-3").is_ok();
    if !fs.is_v2() {
        ok &= w("cpuset.memory_migrate", "1").is_ok();
    }
    // A mems change moves everything at once (v2 always, v1 with memory_migrate=1):
    // the behaviour the applier avoids while it moves pages itself.
    ok &= w("cgroup.procs", &t.pid.to_string()).is_ok() && w("cpuset.mems", "3").is_ok();
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    r.check(
        &format!("{v}-mems-change-migrates-all"),
        ok && per[3] == len / page,
        format!("per node {per:?}"),
    );
    let mut a = LinuxApplier::new(ApplierConfig {
        cgroup_root: root.to_path_buf(),
        headroom_bytes: 0,
        ..ApplierConfig::default()
    });
    let rel = Some("/vmb-probe".to_string());
    // Hot region only: mems stays widened to 0+3 and nothing else moves.
    let snap = snapshot(topo, t, rel.clone());
    let out = a.apply(
        &snap,
        &migrate(t.pid, 3, 0, vec![(t.addr, len / 4)], len / 4),
    );
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    let hot_on_0 = pages_per_node(t.pid, t.addr, len / 4, n)[0];
    // Huge pages move whole: up to one 2 MiB page past the region's end follows.
    let spill = per[0] - hot_on_0;
    let flag_back = fs.is_v2() || read("cpuset.memory_migrate") == "1";
    r.check(
        &format!("{v}-widened-during-move"),
        read("cpuset.mems") == "0,3"
            && hot_on_0 == len / 4 / page
            && spill < 2 * MIB / page
            && flag_back
            && matches!(out, ActionOutcome::Done { .. }),
        format!(
            "mems {:?}, memory_migrate restored {flag_back}, {out:?}, per node {per:?}",
            read("cpuset.mems")
        ),
    );
    // Whole move of the rest: on v1 narrowed to the target afterwards; on v2 left
    // widened (a v2 mems write would migrate the VM from a kernel workqueue).
    let snap = snapshot(topo, t, rel);
    let out = a.apply(&snap, &migrate(t.pid, 3, 0, vec![], u64::MAX));
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    let want = if fs.is_v2() { "0,3" } else { "0" };
    r.check(
        &format!("{v}-mems-after-complete-move"),
        read("cpuset.mems") == want && per[0] == len / page,
        format!("mems {:?}, {out:?}, per node {per:?}", read("cpuset.mems")),
    );
    let _ = std::fs::write(fs.mount().join("cgroup.procs"), t.pid.to_string());
    let _ = std::fs::remove_dir(&group);
}

/// cgroup v2 group with inherited (empty) `cpuset.mems`: a move must not turn it into
/// `{target}` (which would migrate every page of the VM there at once).
fn inherited_mems_check(r: &mut Report, topo: &Topology, exe: &Path, root: &Path) {
    let Some(fs) = CpusetFs::detect(root).filter(|f| f.is_v2()) else {
        return;
    };
    let n = topo.nodes.len();
    let page = sys::page_size_bytes();
    let len = 8 * MIB;
    let t = spawn_target(exe, len, false);
    let mut a = LinuxApplier::new(ApplierConfig {
        headroom_bytes: 0,
        ..ApplierConfig::default()
    });
    // Half of it to node 2 first, as a plain process.
    let snap = snapshot(topo, &t, None);
    a.apply(
        &snap,
        &migrate(t.pid, 0, 2, vec![(t.addr, len / 2)], len / 2),
    );
    let group = fs.dir("vmb-inherit");
    let _ = std::fs::create_dir(&group);
    let joined = std::fs::write(group.join("cgroup.procs"), t.pid.to_string()).is_ok();
    let before = pages_per_node(t.pid, t.addr, t.len, n);
    let snap = snapshot(topo, &t, Some("/vmb-inherit".into()));
    let out = a.apply(&snap, &migrate(t.pid, 0, 1, vec![], u64::MAX));
    let after = pages_per_node(t.pid, t.addr, t.len, n);
    let mems = std::fs::read_to_string(group.join("cpuset.mems")).unwrap_or_default();
    r.check(
        "v2-inherited-mems-kept-other-nodes",
        joined
            && std::fs::read_to_string(group.join("cpuset.mems")).is_ok()
            && before[2] >= len / 2 / page
            && after[2] == before[2]
            && after[0] == 0
            && after[1] == before[0]
            // Never narrowed on v2: the inherited set stays as it was.
            && mems.trim().is_empty(),
        format!(
            "before {before:?}, after {after:?}, mems {:?}, {out:?}",
            mems.trim()
        ),
    );
    let _ = std::fs::write(fs.mount().join("cgroup.procs"), t.pid.to_string());
    let _ = std::fs::remove_dir(&group);
    let mut t = t;
    drop(t.child.stdin.take());
    let _ = t.child.wait();
}

/// libvirt's cgroup v2 layout (`libvirt/vcpuN` and `libvirt/emulator`, threaded):
/// CPU sets written per vCPU group, read back from the threads, restored as
/// inherited.
fn libvirt_v2_cpus_check(r: &mut Report, topo: &Topology, exe: &Path, root: &Path) {
    use balancer::host::linux::actuate::RestoreWhat;
    use balancer::model::{CpuSet, Vcpu};
    let Some(fs) = CpusetFs::detect(root).filter(|f| f.is_v2()) else {
        return;
    };
    let t = spawn_target(exe, MIB, false);
    let vm_dir = fs.dir("vmb-lv");
    let lv = vm_dir.join("libvirt");
    let w = |d: &Path, f: &str, v: &str| std::fs::write(d.join(f), v).is_ok();
    let mut ok = std::fs::create_dir_all(&lv).is_ok()
        && w(&vm_dir, "cgroup.subtree_control", "+cpuset")
        && w(&lv, "cgroup.subtree_control", "+cpuset");
    for g in ["emulator", "vcpu0", "vcpu1"] {
        ok &= std::fs::create_dir_all(lv.join(g)).is_ok()
            && w(&lv.join(g), "cgroup.type", "threaded");
    }
    ok &= w(&lv.join("emulator"), "cgroup.procs", &t.pid.to_string())
        && w(&lv.join("vcpu0"), "cgroup.threads", &t.tids[0].to_string())
        && w(&lv.join("vcpu1"), "cgroup.threads", &t.tids[1].to_string());
    let mut snap = snapshot(topo, &t, Some("/vmb-lv".into()));
    snap.vms[0].vcpus = (0..2)
        .map(|i| Vcpu {
            index: i,
            tid: t.tids[i as usize],
            ..Default::default()
        })
        .collect();
    let mut a = LinuxApplier::new(ApplierConfig::default());
    let aff = |tid: u32| {
        sys::get_affinity(tid)
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    let read = |g: &str| {
        std::fs::read_to_string(lv.join(g).join("cpuset.cpus"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let set = |vcpus: Option<Vec<u32>>, cpus: &str| PlannedAction {
        vm: t.pid,
        action: Action::SetCpus {
            vcpus,
            cpus: CpuSet::parse_list(cpus).unwrap(),
        },
        reason: Reason::InitialPlacement { node: 0 },
    };
    let out1 = a.apply(&snap, &set(Some(vec![1]), "1"));
    let one = (read("vcpu1"), read("vcpu0"), aff(t.tids[1]), aff(t.tids[0]));
    let out2 = a.apply(&snap, &set(None, "2-3"));
    let all = (
        read("vcpu0"),
        read("vcpu1"),
        read("emulator"),
        aff(t.tids[0]),
    );
    let o = a.originals()[&t.pid].clone();
    let out3 = a.restore(
        &o,
        RestoreWhat {
            cpus: true,
            mems: false,
        },
    );
    let back = (read("vcpu1"), aff(t.tids[1]));
    let every = topo.all_cpus().to_string();
    r.check(
        "v2-libvirt-vcpu-groups",
        ok && out1 == ActionOutcome::Done { moved_bytes: 0 }
            && one == ("1".into(), String::new(), "1".into(), every.clone())
            && out2 == ActionOutcome::Done { moved_bytes: 0 }
            && all == ("2-3".into(), "2-3".into(), "2-3".into(), "2-3".into())
            && out3 == ActionOutcome::Done { moved_bytes: 0 }
            // Put back as inherited, or as the parent's set where the kernel refuses
            // to empty a group with tasks.
            && (back.0.is_empty() || back.0 == every)
            && back.1 == every,
        format!("setup {ok}, {out1:?} {one:?}, {out2:?} {all:?}, {out3:?} {back:?}"),
    );
    let _ = std::fs::write(fs.mount().join("cgroup.procs"), t.pid.to_string());
    for g in ["emulator", "vcpu0", "vcpu1"] {
        let _ = std::fs::remove_dir(lv.join(g));
    }
    let _ = std::fs::remove_dir(&lv);
    let _ = std::fs::remove_dir(&vm_dir);
    let mut t = t;
    drop(t.child.stdin.take());
    let _ = t.child.wait();
}

fn set_hugepages(node: u32, n: u64) -> bool {
    std::fs::write(
        format!("/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/nr_hugepages"),
        n.to_string(),
    )
    .is_ok()
}

fn hugetlb_checks(r: &mut Report, topo: &Topology, exe: &Path) {
    let n = topo.nodes.len();
    let huge = 2 * MIB;
    let ok = set_hugepages(0, 8) && set_hugepages(1, 8) && set_hugepages(2, 0);
    let len = 8 * MIB;
    let t = spawn_target(exe, len, true);
    let mut topo = topo.clone();
    for node in topo.nodes.iter_mut() {
        let free = std::fs::read_to_string(format!(
            "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/free_hugepages",
            node.id
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
        node.memory.hugepages = vec![balancer::model::HugePagePool {
            page_size_bytes: huge,
            total_pages: free,
            free_pages: free,
        }];
    }
    let mut snap = snapshot(&topo, &t, None);
    snap.vms[0].memory.backing = MemoryBacking::HugeTlb {
        page_size_bytes: huge,
    };
    let start = pages_per_node(t.pid, t.addr, t.len, n);
    let mut a = LinuxApplier::new(ApplierConfig {
        headroom_bytes: 0,
        ..ApplierConfig::default()
    });
    // The hot region starts inside the first huge page: that page moves whole.
    let region = (t.addr + 4096, 2 * huge);
    let out = a.apply(&snap, &migrate(t.pid, 0, 1, vec![region], 4 * MIB));
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    let small = huge / sys::page_size_bytes();
    r.check(
        "hugetlb-moved-by-huge-page",
        ok && start[0] == len / sys::page_size_bytes()
            && per[1] == 2 * small
            && out
                == ActionOutcome::Done {
                    moved_bytes: 4 * MIB,
                },
        format!("start {start:?}, {out:?}, per node {per:?}"),
    );
    let out = a.apply(&snap, &migrate(t.pid, 0, 2, vec![], len));
    r.check(
        "hugetlb-no-free-huge-pages-refused",
        matches!(&out, ActionOutcome::Refused { why } if why.contains("free huge pages")),
        format!("{out:?}"),
    );
    let mut t = t;
    drop(t.child.stdin.take());
    let _ = t.child.wait();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let target_exe = PathBuf::from(
        args.next()
            .expect("usage: actuate_probe TARGET [CGROUP_ROOT]"),
    );
    let cg2 = args.next().map(PathBuf::from);
    let topo = read_topology(&HostPaths::system()).expect("read nodes");
    let n = topo.nodes.len();
    let mut r = Report { failed: false };
    if n < 4 {
        println!("FAIL setup: needs 4 NUMA nodes, found {n}");
        std::process::exit(1);
    }
    // First touch on node 0: the probe (and so the target) runs on node 0's CPUs.
    sys::set_affinity(std::process::id(), &topo.nodes[0].cpus).unwrap();
    let page = sys::page_size_bytes();
    let len = 32 * MIB;
    let t = spawn_target(&target_exe, len, false);
    let start = pages_per_node(t.pid, t.addr, t.len, n);
    r.check(
        "first-touch",
        start[0] == len / page,
        format!("pages per node {start:?}"),
    );

    // 1. Hot quarter first, batched, rate-limited to 32 MiB/s.
    let rate = 32 * MIB;
    let mut a = LinuxApplier::new(ApplierConfig {
        rate_limit_bytes_per_s: rate,
        batch_pages: 256,
        headroom_bytes: 64 * MIB,
        cgroup_root: cg2.clone().unwrap_or_else(|| "/nonexistent".into()),
        ..ApplierConfig::default()
    });
    let hot = (t.addr, len / 4);
    let snap = snapshot(&topo, &t, None);
    let t0 = Instant::now();
    let out = a.apply(&snap, &migrate(t.pid, 0, 1, vec![hot], len / 4));
    let took = t0.elapsed();
    let after = pages_per_node(t.pid, t.addr, t.len, n);
    let hot_on_1 = pages_per_node(t.pid, hot.0, hot.1, n)[1];
    r.check(
        "batched-hot-first",
        out == ActionOutcome::Done {
            moved_bytes: len / 4,
        } && hot_on_1 == len / 4 / page
            && after[1] - hot_on_1 < 2 * MIB / page,
        format!("outcome {out:?}, hot pages on node 1: {hot_on_1}, per node {after:?}"),
    );
    // 8 MiB at 32 MiB/s: each of the applier's threads may start one batch before
    // the budget is charged, so the last batches may start that much early.
    let threads = ApplierConfig::default().migration_threads as u64;
    let min = Duration::from_secs_f64((len / 4 - threads * 256 * page) as f64 / rate as f64);
    r.check(
        "rate-limit",
        took >= min,
        format!(
            "{took:?} for {} MiB at {} MiB/s (min {min:?})",
            len / 4 / MIB,
            rate / MIB
        ),
    );

    // 2. Whole move of what is left on node 0 (no regions named: every mapping).
    let mut whole = LinuxApplier::new(ApplierConfig {
        batch_pages: 8192,
        headroom_bytes: 64 * MIB,
        cgroup_root: cg2.clone().unwrap_or_else(|| "/nonexistent".into()),
        ..ApplierConfig::default()
    });
    let before = pages_per_node(t.pid, t.addr, t.len, n);
    let snap = snapshot(&topo, &t, None);
    let out = whole.apply(&snap, &migrate(t.pid, 0, 2, vec![], u64::MAX));
    let after = pages_per_node(t.pid, t.addr, t.len, n);
    r.check(
        "whole-move-rest",
        after[0] == 0
            && after[2] == before[0]
            && after[1] == before[1]
            && matches!(out, ActionOutcome::Done { .. }),
        format!("outcome {out:?}, per node {after:?}"),
    );

    // 3. A full node: refused with the reason, nothing moves.
    let mut tight = LinuxApplier::new(ApplierConfig {
        headroom_bytes: 1 << 50,
        ..ApplierConfig::default()
    });
    let out = tight.apply(&snap, &migrate(t.pid, 2, 3, vec![], u64::MAX));
    let same = pages_per_node(t.pid, t.addr, t.len, n) == after;
    r.check(
        "full-node-refused",
        matches!(&out, ActionOutcome::Refused { why } if why.contains("headroom")) && same,
        format!("{out:?}"),
    );

    // 4. Stop at a batch boundary: a slow move cancelled after 200 ms.
    let flag = Arc::new(AtomicBool::new(false));
    let mut slow = LinuxApplier::new(ApplierConfig {
        rate_limit_bytes_per_s: 4 * MIB,
        batch_pages: 64,
        headroom_bytes: 0,
        ..ApplierConfig::default()
    })
    .with_cancel(flag.clone());
    let f2 = flag.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        f2.store(true, Ordering::Relaxed);
    });
    let snap = snapshot(&topo, &t, None);
    let out = slow.apply(
        &snap,
        &migrate(t.pid, 2, 3, vec![(t.addr, t.len)], u64::MAX),
    );
    stopper.join().unwrap();
    let per = pages_per_node(t.pid, t.addr, t.len, n);
    let moved_ok = matches!(&out, ActionOutcome::Partial { moved_bytes, why, .. }
        if why.contains("batch boundary") && *moved_bytes == per[3] * page && per[3] > 0);
    r.check(
        "cancel-at-batch-boundary",
        moved_ok && per[2] > 0,
        format!("{out:?}, per node {per:?}"),
    );

    // 5. cpuset.mems widened during the move, narrowed after a complete one.
    if let Some(root) = &cg2 {
        cgroup_checks(&mut r, &topo, &t, root);
        inherited_mems_check(&mut r, &topo, &target_exe, root);
        libvirt_v2_cpus_check(&mut r, &topo, &target_exe, root);
    }

    // 6. hugetlbfs-backed memory: moved by huge page, refused without free ones.
    hugetlb_checks(&mut r, &topo, &target_exe);

    let mut t = t;
    drop(t.child.stdin.take());
    let _ = t.child.wait();
    // The target is gone: quiet.
    let snap = Snapshot {
        topology: topo.clone(),
        ..Default::default()
    };
    let out = a.apply(&snap, &migrate(t.pid, 0, 1, vec![], MIB));
    r.check("vm-gone", out == ActionOutcome::VmGone, format!("{out:?}"));
    std::process::exit(if r.failed { 1 } else { 0 });
}
