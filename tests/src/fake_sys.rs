//! A copy of the bits of sysfs the Linux applier checks before a memory move, with a
//! node 1 that has the free memory a test asks for. On a one-node host a move to
//! node 1 then passes (or fails) the applier's own checks, and the kernel refuses
//! its pages: the refusal and accounting paths run without a second node.

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
