//! sd_notify: tells systemd the daemon is ready, alive, and what it is doing.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named in
//! `$NOTIFY_SOCKET` (a path, or an abstract name when it starts with `@`). Without
//! `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op.
//!
//! Spoken here rather than through the `sd-notify` crate (0.5): its `notify()` only
//! sends to the socket named in the process environment, so the daemon and its tests
//! could no longer be handed a socket explicitly ([`Notifier::new`]) and tests would
//! again share one process-wide variable; and it connects to the variable's value as
//! a path, so an abstract `@name` socket (valid per sd_notify(3)) is not reached. The
//! protocol part is one `sendto` of `KEY=VALUE` lines; the tests below check both
//! address kinds and the watchdog test in `run/tests.rs` the datagrams the loop sends.
//!
//! The environment is read once, by the program's entry point ([`Notifier::from_env`]);
//! everything below it gets a [`Notifier`] for an explicit socket
//! ([`Notifier::new`]), so tests never share a process-wide variable.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Clone, Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Notifications to `socket`, written as in `$NOTIFY_SOCKET`: a path, or `@name`
    /// for an abstract socket. `None` or empty: every call is a no-op.
    pub fn new(socket: Option<&OsStr>) -> Self {
        let target = socket.and_then(|v| {
            let bytes = v.as_bytes();
            match bytes.first() {
                None => None,
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(_) => Some(Target::Path(v.into())),
            }
        });
        Self { target }
    }

    /// The socket systemd named in `$NOTIFY_SOCKET`, for the program's entry point.
    pub fn from_env() -> Self {
        Self::new(std::env::var_os("NOTIFY_SOCKET").as_deref())
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
        let n = Notifier::new(Some(path.as_os_str()));
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
        let n = Notifier::new(Some(OsStr::new(&format!("@{name}"))));
        n.status("x").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=x");
        assert!(!Notifier::new(None).enabled());
        assert!(!Notifier::new(Some(OsStr::new(""))).enabled());
        assert!(Notifier::new(None).ready("no-op").is_ok());
    }
}
