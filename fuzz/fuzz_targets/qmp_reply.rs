//! What a QMP monitor sends: the greeting, replies and events, read as the stream the
//! observer talks to (`qmp::converse`), then the `query-cpus-fast` reply parser alone.
#![no_main]
use std::io::{Read, Write};
use std::time::Duration;

use balancer::host::linux::qmp::{TimeLimit, converse, parse_cpus_fast};
use libfuzzer_sys::fuzz_target;

/// The monitor's bytes in, the client's commands out (dropped).
struct Monitor<'a>(&'a [u8]);

impl Read for Monitor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Monitor<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TimeLimit for Monitor<'_> {
    fn limit(&self) -> Duration {
        Duration::from_millis(1)
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = converse(Monitor(data));
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = parse_cpus_fast(&v);
    }
});
