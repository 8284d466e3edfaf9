//! `/proc/PID/numa_maps`.
#![no_main]
use balancer::host::linux::numa_maps::parse_numa_maps;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mappings) = parse_numa_maps(&vmbalancer_fuzz::text(data)) {
        for m in &mappings {
            let _ = (m.bytes_per_node(), m.is_memfd());
        }
    }
});
