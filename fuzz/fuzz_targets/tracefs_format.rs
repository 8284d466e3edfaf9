//! tracefs `events/SYSTEM/EVENT/format` files, and the field lookups the loader does.
#![no_main]
use balancer::telemetry::tracefs::TracepointFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(format) = TracepointFormat::parse(&vmbalancer_fuzz::text(data)) {
        for (name, size) in [("pid", 4), ("comm", 16), ("dest_cpu", 4), ("gfn", 8)] {
            let _ = format.field(name);
            let _ = format.offset_of(name, size);
        }
    }
});
