//! `/proc/meminfo` and `devices/system/node/nodeN/meminfo`.
#![no_main]
use balancer::host::linux::topology::parse_meminfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = vmbalancer_fuzz::text(data);
    let _ = parse_meminfo(&text, None);
    let _ = parse_meminfo(&text, Some(0));
    let _ = parse_meminfo(&text, Some(1));
});
