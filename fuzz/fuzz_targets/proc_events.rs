//! Netlink process-event datagrams (the kernel's proc connector).
#![no_main]
use balancer::host::linux::proc_events::parse_datagram;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut events = Vec::new();
    parse_datagram(data, &mut events);
});
