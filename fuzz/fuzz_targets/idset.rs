//! Kernel id lists (`0-3,8`): sysfs `online`, `cpulist`, `thread_siblings_list`, and the
//! cgroup v1/v2 `cpuset.cpus`/`cpuset.mems` files and their effective variants.
#![no_main]
use balancer::model::IdSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = IdSet::parse_list(&vmbalancer_fuzz::text(data)) {
        // What the daemon does with a parsed set: prints it back into cgroup files.
        let printed = set.to_string();
        assert_eq!(IdSet::parse_list(&printed).ok(), Some(set), "{printed}");
    }
});
