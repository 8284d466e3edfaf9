//! cgroup v1 and v2 cpuset files of a task's group, found from its `/proc/PID/cgroup`.
//! Input: a tree listing (see the crate doc) of the cgroup mount, whose file `self.cgroup`
//! (if any) is the task's `/proc/PID/cgroup`.
#![no_main]
use balancer::host::linux::HostPaths;
use balancer::host::linux::cgroup::{exists, parse_proc_cgroup, read_cpuset};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = vmbalancer_fuzz::materialize(&vmbalancer_fuzz::text(data));
    let Ok(text) = std::fs::read_to_string(root.join("self.cgroup")) else {
        return;
    };
    let Ok(Some(cg)) = parse_proc_cgroup(&text) else {
        return;
    };
    let paths = HostPaths {
        proc: root.join("proc"),
        sys: root.join("sys"),
        cgroup: root.clone(),
        libvirt: root.join("run/libvirt/qemu"),
    };
    let _ = exists(&paths, &cg);
    let _ = read_cpuset(&paths, &cg);
});
