//! libvirt's status file of a running domain (`/run/libvirt/qemu/NAME.xml`): the
//! operator's placement (vcpupin, emulatorpin, numatune, placement='auto').
#![no_main]
use balancer::host::linux::libvirt::parse_intent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(intent) = parse_intent(&vmbalancer_fuzz::text(data)) {
        let _ = intent.evidence();
    }
});
