//! The Linux observer and `vmbalancer trace` on fixture trees: the hand-made 2-node
//! (cgroup v1, libvirt layouts old and new) and 4-node (cgroup v2) hosts written by
//! `tests/fixtures/make_handmade.py`, and the same trees corrupted in the ways a live
//! host corrupts them (truncated lines, missing fields, huge numbers, processes that
//! exit between two reads).

use std::path::{Path, PathBuf};
use std::process::Command;

use balancer::host::Observer;
use balancer::host::linux::{HostError, HostPaths, LinuxObserver, ObserverConfig};
use balancer::model::{MemoryBacking, Pinning, Snapshot};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn observe(root: &Path) -> Result<(LinuxObserver, Snapshot), HostError> {
    let mut o = LinuxObserver::new(HostPaths::under(root), ObserverConfig::default())?;
    let s = o.observe()?;
    Ok((o, s))
}

/// Copies a fixture tree to a fresh scratch directory, symlinks included.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("vmb-fixture-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_tree(&fixture(name), &dst);
    dst
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&s).unwrap(), &d).unwrap();
        } else if ft.is_dir() {
            copy_tree(&s, &d);
        } else {
            std::fs::copy(&s, &d).unwrap();
        }
    }
}

#[test]
fn two_node_topology_and_settings() {
    let (_, s) = observe(&fixture("handmade-2node")).unwrap();
    let t = &s.topology;
    assert_eq!(t.nodes.len(), 2);
    assert_eq!(t.nodes[0].cpus.to_string(), "0-1,4-5");
    assert_eq!(t.nodes[1].cpus.to_string(), "2-3,6-7");
    assert_eq!(t.nodes[1].smt_siblings[0].to_string(), "2,6");
    assert_eq!(t.distance, vec![vec![10, 21], vec![21, 10]]);
    assert_eq!(t.nodes[0].memory.total_bytes, 16 * GIB);
    assert_eq!(t.nodes[1].memory.free_bytes, 9 * GIB);
    assert_eq!(t.nodes[0].memory.file_bytes, 2 * GIB);
    let pools = &t.nodes[1].memory.hugepages;
    assert_eq!(pools.len(), 2);
    assert_eq!(
        (
            pools[0].page_size_bytes,
            pools[0].total_pages,
            pools[0].free_pages
        ),
        (2 * MIB, 1024, 0)
    );
    assert_eq!(pools[1].page_size_bytes, GIB);
    assert!(s.settings.numa_balancing);
    assert!(s.settings.ksm.running && s.settings.ksm.merge_across_nodes);
    assert_eq!(s.settings.ksm.pages_sharing, 5120);
}

#[test]
fn two_node_vms() {
    let (o, s) = observe(&fixture("handmade-2node")).unwrap();
    let pids: Vec<u32> = s.vms.iter().map(|v| v.pid).collect();
    assert_eq!(
        pids,
        vec![2001, 3001],
        "systemd, bash and the exited qemu are not VMs"
    );
    assert!(
        o.counters().vanished_mid_read >= 1,
        "pid 4001 exited mid-read"
    );

    let db = &s.vms[0];
    assert_eq!(db.name, "db");
    let tids: Vec<(u32, u32)> = db.vcpus.iter().map(|v| (v.index, v.tid)).collect();
    assert_eq!(tids, vec![(0, 2003), (1, 2004)]);
    assert_eq!(db.other_threads, vec![2001, 2002]);
    assert_eq!(db.memory.configured_bytes, 2 * GIB);
    assert_eq!(
        db.memory.bytes_per_node,
        vec![0, 2 * GIB],
        "hugetlb pages counted at 2 MiB each"
    );
    assert_eq!(
        db.memory.backing,
        MemoryBacking::HugeTlb {
            page_size_bytes: 2 * MIB
        }
    );
    assert_eq!(db.memory.guest_ranges, vec![(0x7f3c40000000, 2 * GIB)]);
    // Heap (1500+500), binary (1031), 16 MiB anon (4096), stack (40) pages of 4 KiB.
    let overhead: u64 = db.memory.overhead_bytes_per_node.iter().sum();
    assert_eq!(overhead, (2000 + 1031 + 4096 + 40) * 4096);
    assert_eq!(db.pinning, Pinning::None);
    assert_eq!(
        db.cgroup.as_deref(),
        Some("/machine.slice/machine-qemu\\x2d1\\x2ddb.scope")
    );
    assert_eq!(db.vcpus[0].last_cpu, Some(0));
    assert_eq!(db.vcpus[0].affinity.to_string(), "0-7");

    let web = &s.vms[1];
    assert_eq!(web.name, "web");
    assert_eq!(web.memory.configured_bytes, GIB);
    assert_eq!(web.memory.bytes_per_node, vec![256 * MIB, 768 * MIB]);
    assert_eq!(web.memory.backing, MemoryBacking::Anonymous);
    let Pinning::Operator { why } = &web.pinning else {
        panic!("web is pinned: {:?}", web.pinning)
    };
    assert!(why.contains("CPUs 6-7"), "{why}");
    assert_eq!(
        web.cgroup.as_deref(),
        Some("/machine.slice/machine-qemu\\x2d2\\x2dweb.scope")
    );
    assert_eq!(web.other_threads, vec![3001, 3007]);
}

#[test]
fn four_node_v2_memory_only_node_and_bindings() {
    let (o, s) = observe(&fixture("handmade-4node")).unwrap();
    let t = &s.topology;
    assert_eq!(t.nodes.len(), 4);
    assert!(t.nodes[3].cpus.is_empty(), "node 3 is memory-only");
    assert_eq!(t.distance[0], vec![10, 21, 31, 21]);
    assert_eq!(t.distance[3][1], 31);
    assert_eq!(t.nodes[3].memory.hugepages[1].free_pages, 4);

    let pids: Vec<u32> = s.vms.iter().map(|v| v.pid).collect();
    assert_eq!(pids, vec![5001, 6001], "7001 has a malformed numa_maps");
    assert_eq!(o.counters().vms_skipped, 1);

    let big = &s.vms[0];
    assert_eq!(big.vcpus.len(), 6);
    assert_eq!(big.cells.len(), 2);
    assert_eq!(big.cells[1].vcpus, vec![3, 4, 5]);
    assert_eq!(big.cells[1].host_nodes.as_ref().unwrap().to_string(), "1");
    assert_eq!(big.memory.backing, MemoryBacking::Memfd);
    assert_eq!(big.memory.bytes_per_node, vec![GIB, 512 * MIB, 0, 0]);
    assert_eq!(big.memory.overhead_bytes_per_node[2], 16 * MIB);
    assert!(matches!(&big.pinning, Pinning::Operator { why } if why.contains("policy=bind")));

    let small = &s.vms[1];
    assert_eq!(
        small.name, "small-vm",
        "named from the libvirt machine scope"
    );
    assert_eq!(small.mems_allowed.to_string(), "2");
    assert!(matches!(&small.pinning, Pinning::Operator { why } if why.contains("cpuset.mems")));
    assert_eq!(small.memory.bytes_per_node, vec![0, 0, 512 * MIB, 0]);
}

fn trace_json(root: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbalancer_cli"))
        .args(["trace", "--once", "--json", "--interval", "0", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .expect("run vmbalancer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object per interval");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn trace_json_warns_in_plain_words() {
    let r = trace_json(&fixture("handmade-2node"), &[]);
    assert_eq!(r["schema"], 1);
    assert_eq!(r["telemetry"]["available"], false);
    assert!(r["telemetry"]["reason"].as_str().unwrap().len() > 5);
    let kinds: Vec<&str> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "memory_remote_from_vcpus",
            "autonuma_with_pinning",
            "ksm_across_nodes"
        ]
    );
    assert_eq!(r["warnings"][0]["vm"], 2001);
    let db = &r["vms"][0];
    assert_eq!(db["locality_pct"], 0.0);
    assert_eq!(db["memory_bytes_per_node"][1], 2 * GIB);
    assert!(
        db["remote_fault_pct"].is_null(),
        "telemetry-only fields are null"
    );
    assert_eq!(r["vms"][1]["locality_pct"], 75.0);
    assert_eq!(r["nodes"][1]["vm_bytes"], 2 * GIB + 768 * MIB);

    let r = trace_json(
        &fixture("handmade-4node"),
        &["--vm", "small-vm", "--vm", "5001"],
    );
    assert_eq!(r["vms"].as_array().unwrap().len(), 2);
    let r = trace_json(&fixture("handmade-4node"), &["--vm", "6001"]);
    assert_eq!(r["vms"].as_array().unwrap().len(), 1);
    let r = trace_json(&fixture("handmade-4node"), &[]);
    let kinds: Vec<&str> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["vm_wider_than_node"]);
}

#[test]
fn trace_table_says_telemetry_is_unavailable() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbalancer_cli"))
        .args(["trace", "--once", "--interval", "0", "--root"])
        .arg(fixture("handmade-2node"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("eBPF telemetry: unavailable ("), "{text}");
    assert!(text.contains("Node 1"), "{text}");
    assert!(
        text.contains(
            "VM db runs 2 of its 2 vCPUs on node 0 (100% of their CPU use) but 100% of its memory"
        ),
        "{text}"
    );
    // The seed 002 case in words: page size, where the pages are, where the vCPUs
    // run, and whether that node has free huge pages of that size.
    assert!(
        text.contains(
            "Its guest RAM is on hugetlbfs in 2 MiB huge pages: 1024 of them on node 1, 0 on \
             node 0 where its vCPUs run. Node 0 has only 0 free 2 MiB huge pages where 1024 \
             are needed"
        ),
        "{text}"
    );
}

#[test]
fn malformed_vm_files_skip_that_vm_only() {
    let root = scratch_copy("handmade-2node", "vmfiles");
    // Truncated stat of one VM, huge number in another's numa_maps.
    std::fs::write(root.join("proc/2001/stat"), "2001 (qemu-system-x86) S 1 2").unwrap();
    let numa = std::fs::read_to_string(root.join("proc/3001/numa_maps")).unwrap();
    std::fs::write(
        root.join("proc/3001/numa_maps"),
        numa.replace("N0=65536", "N0=999999999999999999999999"),
    )
    .unwrap();
    let (o, s) = observe(&root).unwrap();
    assert!(s.vms.is_empty());
    assert_eq!(o.counters().vms_skipped, 2);
    let _ = std::fs::remove_dir_all(root);

    // Missing fields in status; a cmdline that is garbage is still a VM (named by comm
    // or scope), not a failure.
    let root = scratch_copy("handmade-2node", "status");
    std::fs::write(root.join("proc/2001/status"), "Name:\tqemu\n").unwrap();
    std::fs::write(root.join("proc/3001/cmdline"), b"\xff\xfe-m\0-m\0").unwrap();
    let (_, s) = observe(&root).unwrap();
    let pids: Vec<u32> = s.vms.iter().map(|v| v.pid).collect();
    assert_eq!(pids, vec![3001]);
    assert_eq!(s.vms[0].name, "web", "from the libvirt scope");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn vanishing_process_and_thread_between_reads() {
    let root = scratch_copy("handmade-2node", "vanish");
    let mut o = LinuxObserver::new(HostPaths::under(&root), ObserverConfig::default()).unwrap();
    assert_eq!(o.observe().unwrap().vms.len(), 2);
    // A vCPU thread exits, then the whole of another VM.
    std::fs::remove_dir_all(root.join("proc/3001/task/3006")).unwrap();
    std::fs::remove_dir_all(root.join("proc/2001")).unwrap();
    let s = o.observe().unwrap();
    assert_eq!(s.vms.len(), 1);
    assert_eq!(s.vms[0].vcpus.len(), 1);
    assert_eq!(o.counters().vms_exited, 1);
    // pid reuse: same pid, another start time, is not the same VM.
    let stat = std::fs::read_to_string(root.join("proc/3001/stat")).unwrap();
    std::fs::write(
        root.join("proc/3001/stat"),
        stat.replace(" 7000 ", " 7100 "),
    )
    .unwrap();
    let s = o.observe().unwrap();
    assert!(s.vms.is_empty(), "the old VM is gone");
    let s = o.observe().unwrap();
    assert_eq!(
        s.vms.len(),
        1,
        "the new process is found by the next rescan"
    );
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn malformed_host_files_are_clear_errors() {
    let root = scratch_copy("handmade-2node", "host");
    std::fs::write(
        root.join("sys/devices/system/node/node1/meminfo"),
        "Node 1 MemTotal: 99999999999999999999999 kB\nNode 1 MemFree: 1 kB\n",
    )
    .unwrap();
    let err = observe(&root).unwrap_err().to_string();
    assert!(
        err.contains("node1/meminfo") && err.contains("MemTotal"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(root);

    let root = scratch_copy("handmade-2node", "dist");
    std::fs::write(root.join("sys/devices/system/node/node0/distance"), "10\n").unwrap();
    let err = observe(&root).unwrap_err().to_string();
    assert!(err.contains("distance"), "{err}");
    let _ = std::fs::remove_dir_all(root);

    let root = scratch_copy("handmade-2node", "online");
    std::fs::write(root.join("sys/devices/system/cpu/online"), "0-\n").unwrap();
    let err = observe(&root).unwrap_err().to_string();
    assert!(err.contains("cpu/online"), "{err}");
    let _ = std::fs::remove_dir_all(root);
}

/// Checks a captured tree against the `expected.json` written when it was captured:
/// same VMs, same vCPU threads, guest bytes per node within 2 %.
fn check_against_expected(root: &Path) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    let (_, s) = observe(root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    let want = expected["vms"].as_array().unwrap();
    assert_eq!(s.vms.len(), want.len(), "{}: VM count", root.display());
    for (vm, w) in s.vms.iter().zip(want) {
        assert_eq!(vm.pid as u64, w["pid"].as_u64().unwrap());
        assert_eq!(vm.name, w["name"].as_str().unwrap());
        let vcpus: Vec<[u32; 2]> = vm.vcpus.iter().map(|v| [v.index, v.tid]).collect();
        let want_vcpus: Vec<[u32; 2]> = serde_json::from_value(w["vcpus"].clone()).unwrap();
        assert_eq!(
            vcpus,
            want_vcpus,
            "{}: vCPUs of {}",
            root.display(),
            vm.name
        );
        let want_bytes: Vec<u64> = serde_json::from_value(w["bytes_per_node"].clone()).unwrap();
        assert_eq!(vm.memory.bytes_per_node.len(), want_bytes.len());
        for (got, want) in vm.memory.bytes_per_node.iter().zip(&want_bytes) {
            let tol = (*want as f64 * 0.02) as u64 + (1 << 21);
            assert!(
                got.abs_diff(*want) <= tol,
                "{}: {} bytes {got} vs {want}",
                root.display(),
                vm.name
            );
        }
    }
}

#[test]
fn capture_tool_reproduces_a_tree() {
    let out = std::env::temp_dir().join(format!("vmb-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let st = Command::new(env!("CARGO_BIN_EXE_capture_fixture"))
        .arg(&out)
        .arg("--from")
        .arg(fixture("handmade-4node"))
        .status()
        .unwrap();
    assert!(st.success());
    check_against_expected(&out);
    let (_, s) = observe(&out).unwrap();
    assert_eq!(s.vms.len(), 2);
    let _ = std::fs::remove_dir_all(&out);
}

/// Every tree captured in the lab (`tests/fixtures/lab-*`) parses and matches what the
/// observer saw when it was captured.
#[test]
fn lab_captured_trees_match_their_expectations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let lab = p.file_name().unwrap().to_string_lossy().starts_with("lab-");
        if lab && p.join("expected.json").exists() {
            check_against_expected(&p);
        }
    }
}

/// A tree laid out like the lab's captures: cgroups under `sys/fs/cgroup`, no `maps`,
/// no per-thread `status`. Same VMs, threads and memory; unknown affinities are empty.
#[test]
fn lab_layout_without_maps_or_thread_status() {
    let root = scratch_copy("handmade-2node", "lablayout");
    std::fs::create_dir_all(root.join("sys/fs")).unwrap();
    std::fs::rename(root.join("cgroup"), root.join("sys/fs/cgroup")).unwrap();
    for pid in [2001, 3001] {
        std::fs::remove_file(root.join(format!("proc/{pid}/maps"))).unwrap();
        for e in std::fs::read_dir(root.join(format!("proc/{pid}/task"))).unwrap() {
            std::fs::remove_file(e.unwrap().path().join("status")).unwrap();
        }
    }
    let (_, s) = observe(&root).unwrap();
    assert_eq!(s.vms.len(), 2);
    let db = &s.vms[0];
    assert_eq!(db.vcpus.len(), 2);
    assert!(db.vcpus[0].affinity.is_empty());
    assert_eq!(db.memory.bytes_per_node, vec![0, 2 * GIB]);
    assert_eq!(
        db.cgroup.as_deref(),
        Some("/machine.slice/machine-qemu\\x2d1\\x2ddb.scope")
    );
    assert_eq!(s.vms[1].memory.bytes_per_node, vec![256 * MIB, 768 * MIB]);
    let _ = std::fs::remove_dir_all(root);
}

/// libvirt's status file of a domain, as `run/libvirt/qemu/NAME.xml` of a tree.
fn write_domain_status(root: &Path, name: &str, pid: u32, extra: &str) {
    let dir = root.join("run/libvirt/qemu");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.xml")),
        format!(
            "<domstatus state='running' pid='{pid}'>\n  <domain type='kvm' id='2'>\n    \
             <name>{name}</name>\n    <vcpu placement='static'>2</vcpu>\n{extra}  </domain>\n\
             </domstatus>\n"
        ),
    )
    .unwrap();
}

#[test]
fn libvirt_domain_xml_decides_pinning_not_thread_affinity() {
    let root = scratch_copy("handmade-2node", "libvirt-xml");
    let web = |root: &Path| {
        let (_, s) = observe(root).unwrap();
        s.vms.into_iter().find(|v| v.name == "web").unwrap().pinning
    };
    // No status file: the narrowed threads are the only evidence.
    assert!(matches!(web(&root), Pinning::Operator { .. }));
    // The domain XML pins nothing: the narrowed affinity is some tool's, not the
    // operator's.
    write_domain_status(&root, "web", 3001, "");
    assert_eq!(web(&root), Pinning::None);
    // The operator's vcpupin, in words.
    write_domain_status(
        &root,
        "web",
        3001,
        "    <cputune>\n      <vcpupin vcpu='0' cpuset='6'/>\n      <vcpupin vcpu='1' cpuset='7'/>\n    </cputune>\n",
    );
    let Pinning::Operator { why } = web(&root) else {
        panic!("vcpupin is the operator's")
    };
    assert!(why.contains("vcpupin 0->6 1->7"), "{why}");
    // A file left by an earlier process of the same name is not this VM's.
    write_domain_status(&root, "web", 99999, "");
    assert!(matches!(web(&root), Pinning::Operator { why } if why.contains("CPUs 6-7")));
    // Unparsable XML: judged from the threads, never guessed free.
    std::fs::write(root.join("run/libvirt/qemu/web.xml"), "<domstatus").unwrap();
    assert!(matches!(web(&root), Pinning::Operator { .. }));
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn trace_does_not_call_a_vm_the_daemon_placed_operator_pinned() {
    let root = scratch_copy("handmade-2node", "held");
    let pinning = |extra: &[&str]| {
        let r = trace_json(&root, extra);
        let web = r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "web")
            .unwrap()
            .clone();
        web["pinning"].as_str().unwrap().to_string()
    };
    assert_eq!(pinning(&[]), "operator");
    // The daemon's journal holds web (same pid and start time): its CPU sets are the
    // daemon's doing.
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let journal = |start: u64| {
        format!(
            "{{\"version\":1,\"entries\":{{\"3001\":{{\"original\":{{\"vm\":3001,\
             \"start_time_ticks\":{start},\"threads\":{{}},\"groups\":[]}},\"in_flight\":null}}}}}}"
        )
    };
    std::fs::write(state.join("journal.json"), journal(7000)).unwrap();
    let dir = state.to_str().unwrap();
    assert_eq!(pinning(&["--state-dir", dir]), "none");
    // A journal of another process with the same pid does not count.
    std::fs::write(state.join("journal.json"), journal(1)).unwrap();
    assert_eq!(pinning(&["--state-dir", dir]), "operator");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_quiet_vm_is_reported_as_last_read_until_it_runs_or_changes() {
    let root = scratch_copy("handmade-2node", "quiet");
    // VM 3001 has three quarters of its memory on its vCPUs' node: local enough at
    // this target, so nothing is pending on it. VM 2001's memory is away.
    let config = ObserverConfig {
        locality_target_pct: 70,
        ..ObserverConfig::default()
    };
    let mut o = LinuxObserver::new(HostPaths::under(&root), config).unwrap();
    let vm = |s: &Snapshot, pid: u32| s.vms.iter().find(|v| v.pid == pid).cloned().unwrap();
    let first = o.observe().unwrap();
    assert_eq!(o.counters().quiet_reads, 0, "first sight is a full read");
    // Idle since: reported as last read, from its process `stat` alone.
    let second = o.observe().unwrap();
    assert_eq!(o.counters().quiet_reads, 1, "only 3001 is quiet");
    assert_eq!(vm(&second, 3001).vcpus.len(), vm(&first, 3001).vcpus.len());
    assert_eq!(vm(&second, 3001).memory, vm(&first, 3001).memory);
    // A vCPU exits while it is quiet: seen at the next full read, not before.
    std::fs::remove_dir_all(root.join("proc/3001/task/3006")).unwrap();
    let stat_path = root.join("proc/3001/stat");
    let stat = std::fs::read_to_string(&stat_path).unwrap();
    // It runs: one second of CPU time since the last tick.
    std::fs::write(&stat_path, stat.replace(" 400 100 ", " 500 100 ")).unwrap();
    let woke = o.observe().unwrap();
    assert_eq!(
        o.counters().quiet_reads,
        1,
        "a VM that runs is read in full"
    );
    assert_eq!(vm(&woke, 3001).vcpus.len(), 1, "the exited vCPU is gone");
    assert!(vm(&woke, 3001).threads_cpu_demand > 0.05);
    // Idle again: quiet again. Then a thread is born: read in full.
    o.observe().unwrap();
    assert_eq!(o.counters().quiet_reads, 2);
    let stat = std::fs::read_to_string(&stat_path).unwrap();
    let mut fields: Vec<&str> = stat.split(' ').collect();
    assert_eq!(fields[19], "1", "num_threads");
    fields[19] = "2";
    std::fs::write(&stat_path, fields.join(" ")).unwrap();
    o.observe().unwrap();
    assert_eq!(
        o.counters().quiet_reads,
        2,
        "a new thread means a full read"
    );
    let _ = std::fs::remove_dir_all(root);
}
