//! The configuration file (TOML), parsed and validated as at start and at reload.
#![no_main]
use balancer::daemon::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::from_toml(text, std::path::Path::new("fuzz.toml")) {
            let _ = config.prometheus_addr();
            let _ = config.control_socket_path();
        }
    }
});
