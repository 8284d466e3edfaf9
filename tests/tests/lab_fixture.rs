//! The captured lab tree (`cargo xtask lab capture scattered`) read back with the
//! lab's ground-truth readers: proves the capture is complete and the readers work
//! on a real 4-node kernel's files, not only on hand-written ones.

use std::path::{Path, PathBuf};

use vmbalancer_tests::lab::truth;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lab-scattered-6.1")
}

fn vm_pids(root: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    pids
}

#[test]
fn captured_topology_has_four_nodes_and_the_ring_slit() {
    let nodes = truth::read_nodes(&fixture()).unwrap();
    assert_eq!(nodes.len(), 4);
    assert_eq!(nodes[2].cpus, vec![4, 5]);
    assert_eq!(nodes[0].distances, vec![10, 21, 31, 21]);
    assert_eq!(nodes[1].distances, vec![21, 10, 21, 31]);
}

#[test]
fn captured_vms_look_like_qemu_and_hold_their_memory() {
    let root = fixture();
    let pids = vm_pids(&root);
    assert!(!pids.is_empty(), "no VM captured");
    for pid in pids {
        let dir = root.join(format!("proc/{pid}"));
        assert_eq!(
            std::fs::read_to_string(dir.join("comm")).unwrap().trim(),
            "qemu-kvm"
        );
        let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap();
        let args: Vec<&str> = cmdline.split('\0').collect();
        assert!(
            args.contains(&"-smp") && args.contains(&"-name"),
            "{args:?}"
        );
        let vcpus = truth::vcpu_threads(&root, pid).unwrap();
        assert_eq!(
            vcpus.iter().map(|&(_, i)| i).collect::<Vec<_>>(),
            vec![0, 1],
            "pid {pid}"
        );
        for (tid, _) in vcpus {
            let stat = truth::read_task_stat(&root, pid, tid).unwrap();
            assert!(stat.processor < 8);
        }
        let maps = truth::read_numa_maps(&root, pid).unwrap();
        let bytes = truth::numa_maps_bytes_per_node(&maps, 4).unwrap();
        let total: u64 = bytes.iter().sum();
        // 384 MiB of guest memory plus the binary, stacks and heap.
        assert!(
            (384 << 20..448 << 20).contains(&total),
            "{total} bytes: {bytes:?}"
        );
        // Scattered placement: every node holds a real share.
        assert!(bytes.iter().all(|&b| b > 32 << 20), "{bytes:?}");
        // The libvirt-style scope named in /proc/PID/cgroup was captured too.
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap();
        let rel = cgroup.trim().strip_prefix("0::/").unwrap();
        assert!(rel.starts_with("machine.slice/machine-qemu"), "{rel}");
        let procs =
            std::fs::read_to_string(root.join("sys/fs/cgroup").join(rel).join("cgroup.procs"))
                .unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    }
    let vmstat = truth::read_vmstat(&root).unwrap();
    assert!(vmstat.contains_key("numa_pages_migrated"));
}
