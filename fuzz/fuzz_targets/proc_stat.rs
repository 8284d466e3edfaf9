//! `/proc/PID/stat` and `/proc/PID/task/TID/stat`.
#![no_main]
use balancer::host::linux::procfs::parse_stat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(stat) = parse_stat(&vmbalancer_fuzz::text(data)) {
        let _ = stat.cpu_ticks();
    }
});
