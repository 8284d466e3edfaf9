//! `/proc/PID/status` and `/proc/PID/task/TID/status`.
#![no_main]
use balancer::host::linux::procfs::parse_status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_status(&vmbalancer_fuzz::text(data));
});
