//! `/proc/PID/cgroup` (cgroup v1 and v2 lines), then the libvirt layout read from the
//! cpuset group's path.
#![no_main]
use balancer::host::linux::cgroup::{
    machine_scope_name, parse_proc_cgroup, split_libvirt_path, vm_group,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(cg)) = parse_proc_cgroup(&vmbalancer_fuzz::text(data)) {
        let _ = split_libvirt_path(&cg.path);
        let _ = machine_scope_name(&cg.path);
        let _ = vm_group(&cg.path);
    }
});
