//! `/proc/PID/maps`.
#![no_main]
use balancer::host::linux::numa_maps::parse_maps;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_maps(&vmbalancer_fuzz::text(data)) {
        for e in &entries {
            let _ = (e.len_bytes(), e.is_writable(), e.is_anonymous());
        }
    }
});
