//! `/proc/PID/cmdline`: the NUL-separated argv, then QEMU's options read from it
//! (memory backends, guest cells, QMP monitor sockets, confidential-guest objects).
#![no_main]
use balancer::host::linux::discovery::{is_qemu, parse_qemu_cmdline};
use balancer::host::linux::procfs::parse_cmdline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let argv = parse_cmdline(data);
    let _ = is_qemu("qemu-kvm", None, argv.first().map(String::as_str));
    let config = parse_qemu_cmdline(&argv);
    let _ = config.ram_backends();
    let _ = config.backing();
    let _ = config.strict_memory_binding();
    for s in &config.qmp_sockets {
        let _ = s.to_string();
    }
    if let Some(n) = &config.not_movable {
        let _ = n.to_string();
    }
});
