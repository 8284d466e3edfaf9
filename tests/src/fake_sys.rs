//! Made-up bits of sysfs for tests on a one-node host:
//! - [`with_node1`]: what the Linux applier checks before a memory move, with a node
//!   1 that has the free memory a test asks for. A move to node 1 then passes (or
//!   fails) the applier's own checks, and the kernel refuses its pages: the refusal
//!   and accounting paths run without a second node;
//! - [`one_node_per_cpu`]: a node per online CPU, for the eBPF programs' CPU-to-node
//!   table (`telemetry::LoadOptions::sys_root`): moving a thread between two CPUs is
//!   then a cross-node move to them.

use std::path::PathBuf;

/// Builds the copy under the temporary directory (named after `name` and this
/// process) and returns its root, to pass as the applier's `sys_root`.
pub fn with_node1(name: &str, node1_free_kb: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("vmb-sys-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cpu = root.join("devices/system/cpu");
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::copy("/sys/devices/system/cpu/online", cpu.join("online")).unwrap();
    let n1 = root.join("devices/system/node/node1");
    std::fs::create_dir_all(&n1).unwrap();
    std::fs::write(
        n1.join("meminfo"),
        format!("Node 1 MemTotal: 8388608 kB\nNode 1 MemFree: {node1_free_kb} kB\n"),
    )
    .unwrap();
    root
}

/// A tree where each CPU this process may run on is its own node
/// (`node<cpu>/cpulist`), under the temporary directory (named after `name` and this
/// process); its root and those CPUs.
pub fn one_node_per_cpu(name: &str) -> (PathBuf, Vec<usize>) {
    let root = std::env::temp_dir().join(format!("vmb-sys-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cpu = root.join("devices/system/cpu");
    std::fs::create_dir_all(&cpu).unwrap();
    for f in ["online", "possible"] {
        std::fs::copy(format!("/sys/devices/system/cpu/{f}"), cpu.join(f)).unwrap();
    }
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    for c in &cpus {
        let node = root.join(format!("devices/system/node/node{c}"));
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("cpulist"), format!("{c}\n")).unwrap();
    }
    let ids: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    std::fs::write(
        root.join("devices/system/node/online"),
        ids.join(",") + "\n",
    )
    .unwrap();
    (root, cpus)
}
