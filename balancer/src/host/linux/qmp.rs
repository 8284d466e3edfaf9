//! vCPU thread ids from qemu's QMP monitor, for a qemu whose threads are not named.
//!
//! Without `-name ...,debug-threads=on` every thread of qemu is named like the
//! process, and nothing in `/proc` tells a vCPU thread from an I/O worker. qemu itself
//! knows: QMP's `query-cpus-fast` (qemu 2.12 and later) lists each CPU's `cpu-index`
//! and the host `thread-id` running it, without interrupting the guest. (The older
//! `query-cpus` kicked every vCPU out of the guest to answer and is gone since qemu
//! 6.0; it is never sent.)
//!
//! The monitor is found on the command line: `-qmp unix:PATH,server=on,wait=off` (or
//! the older `server,nowait`), `-qmp-pretty`, or `-chardev socket,id=ID,path=PATH,
//! server=on` with `-mon chardev=ID,mode=control`. A socket qemu connects out from
//! (no `server`) or passes as a file descriptor (libvirt's `fd=`) cannot be used.
//!
//! A monitor serves one client at a time and belongs to whoever manages the VM, so
//! the exchange is short and read-only: connect without blocking, read the greeting,
//! `qmp_capabilities`, `query-cpus-fast`, close; every read has a deadline, and a
//! monitor that is busy (another client holds it, so qemu never greets) or silent or
//! says something else is given up on, with the reason. Only those two commands are
//! ever sent. The observer keeps the answer for the life of the process (vCPU threads
//! do not change while a VM runs) and asks again when a listed thread is gone.
//!
//! Hand-written on serde_json rather than a QMP crate: three messages are exchanged,
//! and the crates made for QMP generate the whole QAPI schema (hundreds of types) for
//! it, with their own async runtime choices; the framing here is serde_json's stream
//! reader, which takes both the compact and the pretty (`pretty=on`) forms.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::discovery::split_keyval;

/// A QMP monitor listening on a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpSocket {
    /// The path as qemu was given it (relative to qemu's working directory when not
    /// absolute), or the name in the abstract namespace.
    pub path: String,
    /// `abstract=on`: a name in the abstract namespace, not a file.
    pub abstract_ns: bool,
}

impl std::fmt::Display for QmpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.abstract_ns {
            write!(f, "@{}", self.path)
        } else {
            f.write_str(&self.path)
        }
    }
}

/// Collects the monitor options of one command line (`-qmp`, `-chardev`, `-mon`)
/// while it is read, in any order.
#[derive(Clone, Debug, Default)]
pub struct MonitorOptions {
    direct: Vec<QmpSocket>,
    chardevs: Vec<(String, QmpSocket)>,
    control_mons: Vec<String>,
}

fn is_on(v: &str) -> bool {
    matches!(v, "on" | "yes" | "true")
}

/// The listening unix socket of chardev options `opts` (after the backend), if it
/// is one: a `path` (or `unix:` path), and `server` on.
fn listening_socket(path: Option<String>, opts: &[(Option<String>, String)]) -> Option<QmpSocket> {
    let mut server = false;
    let mut abstract_ns = false;
    let mut path = path;
    for (k, v) in opts {
        match (k.as_deref(), v.as_str()) {
            (None, "server") => server = true,
            (Some("server"), v) => server = is_on(v),
            (Some("abstract"), v) => abstract_ns = is_on(v),
            (Some("path"), v) => path = Some(v.to_string()),
            _ => {}
        }
    }
    let path = path.filter(|p| !p.is_empty())?;
    server.then_some(QmpSocket { path, abstract_ns })
}

impl MonitorOptions {
    /// `-qmp unix:PATH[,server[=on]][,wait=off|,nowait]`.
    pub fn qmp(&mut self, val: &str) {
        let kv = split_keyval(val);
        let Some((None, first)) = kv.first() else {
            return;
        };
        if let Some(path) = first.strip_prefix("unix:")
            && let Some(s) = listening_socket(Some(path.to_string()), &kv[1..])
        {
            self.direct.push(s);
        }
    }

    /// `-chardev socket,id=ID,path=PATH,server=on[,wait=off]`.
    pub fn chardev(&mut self, val: &str) {
        let kv = split_keyval(val);
        if kv.first().map(|(k, v)| (k.as_deref(), v.as_str())) != Some((None, "socket")) {
            return;
        }
        let id = kv
            .iter()
            .find(|(k, _)| k.as_deref() == Some("id"))
            .map(|(_, v)| v.clone());
        if let (Some(id), Some(s)) = (id, listening_socket(None, &kv[1..])) {
            self.chardevs.push((id, s));
        }
    }

    /// `-mon chardev=ID,mode=control` (the default mode, `readline`, is the human
    /// monitor).
    pub fn mon(&mut self, val: &str) {
        let kv = split_keyval(val);
        let get = |key: &str| {
            kv.iter()
                .find(|(k, _)| k.as_deref() == Some(key))
                .map(|(_, v)| v.as_str())
        };
        if get("mode") == Some("control")
            && let Some(id) = get("chardev")
        {
            self.control_mons.push(id.to_string());
        }
    }

    /// The QMP sockets: `-qmp` ones first, then chardevs used by a control monitor.
    pub fn sockets(&self) -> Vec<QmpSocket> {
        let mut out = self.direct.clone();
        for id in &self.control_mons {
            if let Some((_, s)) = self.chardevs.iter().find(|(c, _)| c == id)
                && !out.contains(s)
            {
                out.push(s.clone());
            }
        }
        out
    }
}

/// One vCPU as the monitor reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QmpVcpu {
    pub index: u32,
    pub tid: u32,
}

/// Why the monitor did not give the vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {socket}: {source}")]
    Connect { socket: String, source: io::Error },
    #[error("the monitor is busy (another client holds it)")]
    Busy,
    #[error("the monitor said nothing within {0:?}")]
    Silent(Duration),
    #[error("the monitor closed the connection")]
    Closed,
    #[error("the monitor sent something else than QMP: {0}")]
    Garbage(#[from] NotQmp),
    #[error("the monitor's vCPU list cannot be used: {0}")]
    BadCpuList(#[from] CpuListError),
    #[error("qemu refused {command}: {class}: {desc}")]
    Refused {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("talking to the monitor: {0}")]
    Io(#[from] io::Error),
}

/// What the monitor sent instead of QMP. Excerpts of the message are cut to 120
/// characters.
#[derive(Debug, thiserror::Error)]
pub enum NotQmp {
    #[error("expected the QMP greeting, got {0}")]
    NoGreeting(String),
    #[error("expected the reply to {command}, got {got}")]
    NotTheReply { command: &'static str, got: String },
    #[error("expected a JSON object, got {0}")]
    NotAnObject(String),
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("no complete message in {MAX_REPLY_BYTES} bytes")]
    TooLong,
    #[error("cannot encode the command {command}: {source}")]
    Encode {
        command: &'static str,
        source: serde_json::Error,
    },
}

/// Why a `query-cpus-fast` reply cannot be trusted. Excerpts are cut to 120
/// characters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("no list in the reply {0}")]
    NoList(String),
    #[error("a CPU without cpu-index or thread-id: {0}")]
    Incomplete(String),
    #[error("CPU {index} has thread-id 0")]
    ZeroThread { index: u32 },
    #[error("CPU {index} or thread {tid} listed twice")]
    Repeated { index: u32, tid: u32 },
    #[error("the reply lists no CPU")]
    Empty,
}

/// Most bytes read from a monitor in one exchange (a greeting and two replies are a
/// few KiB even for hundreds of vCPUs).
const MAX_REPLY_BYTES: u64 = 4 << 20;

/// The path to connect to for `socket` of process `pid`, seen from this process:
/// through the process's own root and working directory (`/proc/PID/root`,
/// `/proc/PID/cwd`), so a socket in its private `/tmp` or another mount namespace is
/// found; the plain path when that is too long for a socket address.
pub fn resolve(proc: &Path, pid: u32, socket: &QmpSocket) -> PathBuf {
    let p = Path::new(&socket.path);
    let through = if p.is_absolute() {
        proc.join(pid.to_string())
            .join("root")
            .join(p.strip_prefix("/").unwrap_or(p))
    } else {
        proc.join(pid.to_string()).join("cwd").join(p)
    };
    // sun_path holds 108 bytes with the terminating NUL.
    if through.as_os_str().len() < 108 {
        through
    } else {
        p.to_path_buf()
    }
}

/// Connects to the monitor without waiting for a full listen queue (`EAGAIN`: busy).
fn connect(path: &Path, abstract_ns: bool) -> Result<UnixStream, QmpError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let err = |e: nix::Error| QmpError::Connect {
        socket: path.display().to_string(),
        source: io::Error::from(e),
    };
    let addr = if abstract_ns {
        UnixAddr::new_abstract(path.as_os_str().as_encoded_bytes()).map_err(err)?
    } else {
        UnixAddr::new(path).map_err(err)?
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => {}
        Err(nix::Error::EAGAIN) => return Err(QmpError::Busy),
        Err(e) => return Err(err(e)),
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Asks the monitor of process `pid` at `socket` for its vCPU threads, within
/// `timeout` in all.
pub fn query_vcpus(
    proc: &Path,
    pid: u32,
    socket: &QmpSocket,
    timeout: Duration,
) -> Result<Vec<QmpVcpu>, QmpError> {
    if socket.abstract_ns {
        let stream = connect(Path::new(&socket.path), true)?;
        return converse(Deadline::new(stream, timeout));
    }
    // Through the process's root first (its private /tmp, its mount namespace); the
    // plain path when that cannot be reached (e.g. /proc/PID/root refused).
    let through = resolve(proc, pid, socket);
    let stream = match connect(&through, false) {
        Err(QmpError::Connect { .. }) if through.as_path() != Path::new(&socket.path) => {
            connect(Path::new(&socket.path), false)?
        }
        other => other?,
    };
    converse(Deadline::new(stream, timeout))
}

/// A stream whose reads and writes all end by one deadline.
pub struct Deadline {
    stream: UnixStream,
    until: Instant,
    timeout: Duration,
}

impl Deadline {
    pub fn new(stream: UnixStream, timeout: Duration) -> Self {
        Self {
            stream,
            until: Instant::now() + timeout,
            timeout,
        }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Something with a time limit, for the error a timed-out read turns into.
pub trait TimeLimit {
    fn limit(&self) -> Duration;
}

impl TimeLimit for Deadline {
    fn limit(&self) -> Duration {
        self.timeout
    }
}

/// The exchange itself, over any byte stream (the tests and the fuzz target feed it
/// recorded bytes): greeting, `qmp_capabilities`, `query-cpus-fast`.
pub fn converse<S: Read + Write + TimeLimit>(mut s: S) -> Result<Vec<QmpVcpu>, QmpError> {
    let limit = s.limit();
    let mut input = Vec::new();
    let greeting = next_message(&mut s, &mut input, limit, true)?;
    if greeting.get("QMP").is_none() {
        return Err(NotQmp::NoGreeting(short(&greeting)).into());
    }
    let mut out = Vec::new();
    for (id, command) in [(1, "qmp_capabilities"), (2, "query-cpus-fast")] {
        out.clear();
        let msg = serde_json::json!({"execute": command, "id": id});
        serde_json::to_writer(&mut out, &msg)
            .map_err(|source| NotQmp::Encode { command, source })?;
        out.extend_from_slice(b"\r\n");
        s.write_all(&out).map_err(|e| timed_out(e, limit))?;
        // Events may come before the reply; the reply carries the id.
        let reply = loop {
            let m = next_message(&mut s, &mut input, limit, false)?;
            if m.get("event").is_some() {
                continue;
            }
            if m.get("id").and_then(Value::as_i64) == Some(id) {
                break m;
            }
            return Err(NotQmp::NotTheReply {
                command,
                got: short(&m),
            }
            .into());
        };
        if let Some(e) = reply.get("error") {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(QmpError::Refused {
                command,
                class: text("class"),
                desc: text("desc"),
            });
        }
        if id == 2 {
            return Ok(parse_cpus_fast(&reply)?);
        }
    }
    unreachable!("the loop returns on its last command")
}

/// Reads the next JSON message, keeping bytes read past it in `buf` for the next call.
fn next_message<S: Read>(
    s: &mut S,
    buf: &mut Vec<u8>,
    limit: Duration,
    first: bool,
) -> Result<Value, QmpError> {
    let mut total = buf.len() as u64;
    loop {
        // One complete message in what was read so far?
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let used = it.byte_offset();
                buf.drain(..used);
                return match v {
                    Value::Object(_) => Ok(v),
                    other => Err(NotQmp::NotAnObject(short(&other)).into()),
                };
            }
            Some(Err(e)) if !e.is_eof() => {
                return Err(NotQmp::NotJson(e).into());
            }
            _ => {}
        }
        if total >= MAX_REPLY_BYTES {
            return Err(NotQmp::TooLong.into());
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk) {
            Ok(0) => return Err(QmpError::Closed),
            Ok(n) => {
                total += n as u64;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // No greeting at all: another client holds the monitor (qemu greets a
            // client only once it accepts it) or qemu is stuck.
            Err(e) if first && buf.iter().all(u8::is_ascii_whitespace) && is_timeout(&e) => {
                return Err(QmpError::Busy);
            }
            Err(e) => return Err(timed_out(e, limit)),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn timed_out(e: io::Error, limit: Duration) -> QmpError {
    match e.kind() {
        _ if is_timeout(&e) => QmpError::Silent(limit),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// The vCPUs of a `query-cpus-fast` reply: `{"return": [{"cpu-index": N,
/// "thread-id": T, ...}, ...]}`. Every entry must have both, and no index or thread
/// may repeat: a reply that cannot be trusted whole is not used at all.
pub fn parse_cpus_fast(reply: &Value) -> Result<Vec<QmpVcpu>, CpuListError> {
    let list = reply
        .get("return")
        .and_then(Value::as_array)
        .ok_or_else(|| CpuListError::NoList(short(reply)))?;
    let mut out: Vec<QmpVcpu> = Vec::with_capacity(list.len());
    for cpu in list {
        let num = |k: &str| {
            cpu.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        let (Some(index), Some(tid)) = (num("cpu-index"), num("thread-id")) else {
            return Err(CpuListError::Incomplete(short(cpu)));
        };
        if tid == 0 {
            return Err(CpuListError::ZeroThread { index });
        }
        if out.iter().any(|v| v.index == index || v.tid == tid) {
            return Err(CpuListError::Repeated { index, tid });
        }
        out.push(QmpVcpu { index, tid });
    }
    if out.is_empty() {
        return Err(CpuListError::Empty);
    }
    out.sort_by_key(|v| v.index);
    Ok(out)
}

#[cfg(test)]
mod tests;
