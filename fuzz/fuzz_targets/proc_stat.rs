//! `/proc/PID/stat`, `/proc/PID/task/TID/stat` and `task/TID/schedstat`: the same
//! input goes to both parsers (one target, one corpus of per-task files).
#![no_main]
use balancer::host::linux::procfs::{parse_schedstat, parse_stat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = vmbalancer_fuzz::text(data);
    if let Ok(stat) = parse_stat(&text) {
        let _ = stat.cpu_ticks();
    }
    if let Ok(s) = parse_schedstat(&text) {
        let _ = s.wanted_ns();
    }
});
