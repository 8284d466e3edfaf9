//! BTF blobs (`/sys/kernel/btf/vmlinux`) and the struct member lookups done in them.
#![no_main]
use balancer::telemetry::btf::Btf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data) {
        for (name, field) in [
            ("task_struct", "pid"),
            ("task_struct", "numa_preferred_nid"),
        ] {
            let _ = btf.member_offset(name, field);
        }
    }
});
