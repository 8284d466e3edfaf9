//! The sysfs topology (node and CPU lists, SMT siblings, distances, node meminfo, huge
//! page pools), the host settings (KSM, NUMA balancing) and the eBPF CPU -> node table.
//! Input: a tree listing (see the crate doc) written as the root of `sys/` and `proc/`.
#![no_main]
use balancer::host::linux::HostPaths;
use balancer::host::linux::topology::{read_settings, read_topology, refresh_node_memory};
use balancer::telemetry::topology::cpu_nodes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = vmbalancer_fuzz::materialize(&vmbalancer_fuzz::text(data));
    let paths = HostPaths::under(&root);
    if let Ok(mut topology) = read_topology(&paths) {
        let _ = refresh_node_memory(&paths, &mut topology);
    }
    let _ = read_settings(&paths);
    let _ = cpu_nodes(&paths.sys);
});
