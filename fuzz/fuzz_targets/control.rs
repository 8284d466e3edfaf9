//! The control-socket protocol: request lines as the daemon reads them, response lines
//! as the CLI reads them.
#![no_main]
use balancer::daemon::control::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(request) = Request::parse_line(line) {
            let _ = request.access();
        }
    }
    let _ = serde_json::from_slice::<Response>(data);
});
