//! sd_notify: tells systemd the daemon is ready, alive, and what it is doing.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named in
//! `$NOTIFY_SOCKET` (a path, or an abstract name when it starts with `@`). It is small
//! enough to speak directly instead of pulling in a crate. Without `$NOTIFY_SOCKET`
//! (not started by systemd) every call is a no-op.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
            match bytes.first() {
                None => None,
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(_) => Some(Target::Path(v.into())),
            }
        });
        Self { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends raw `KEY=VALUE` lines.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        match target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(message.as_bytes(), &addr)?
            }
        };
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is set for this
/// process (`$WATCHDOG_PID` absent or ours), as systemd recommends.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_and_watchdog_datagrams() {
        let dir = std::env::temp_dir().join(format!("vmb-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The environment is process-wide: only this test sets NOTIFY_SOCKET, and it
        // is read once here.
        // SAFETY: no other test reads or writes NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let n = Notifier::from_env();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(n.enabled());
        n.ready("balancing 3 VMs\nok").unwrap();
        n.watchdog().unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "READY=1\nSTATUS=balancing 3 VMs ok"
        );
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn abstract_socket_names_work() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmb-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier {
            target: Some(Target::Abstract(name.into_bytes())),
        };
        n.status("x").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=x");
        assert!(!Notifier { target: None }.enabled());
    }
}
