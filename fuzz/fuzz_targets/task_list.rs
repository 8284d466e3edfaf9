//! Process and thread lists: the entries of `/proc` and `/proc/PID/task`, whose names
//! are read as ids. Input: a tree listing (see the crate doc) written as `/proc`.
#![no_main]
use balancer::host::linux::procfs::{list_pids, list_tasks};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let proc = vmbalancer_fuzz::materialize(&vmbalancer_fuzz::text(data));
    if let Ok(pids) = list_pids(&proc) {
        for pid in pids {
            let _ = list_tasks(&proc, pid);
        }
    }
});
