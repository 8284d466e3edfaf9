//! The control socket: `control.sock` in the runtime directory.
//!
//! Who may call: root for everything; the members of the configured `status_group`
//! (off by default) for the read-only requests; nobody else. `status` and `advise` are
//! both read-only: they read the last snapshot and change nothing (advice is a pure
//! computation, libvirt acts on it itself), so a monitoring user may run them. A request
//! that changes the daemon's state must answer [`Access::Root`] in
//! [`Request::access`], which every new request has to state (the match is exhaustive).
//!
//! Why two locks: the socket file is mode 0600 root:root, or 0660 root:GROUP in a 0750
//! root:GROUP directory when `status_group` is set, so the kernel refuses `connect`
//! from other users; and every accepted connection's peer is checked again with
//! SO_PEERCRED (uid, gid) and SO_PEERGROUPS (supplementary groups) by the pure
//! [`authorize`], so a socket whose mode was loosened by mistake still answers only
//! those. A refused peer gets one error line saying why before the connection closes.
//!
//! The protocol is one JSON request per line and one JSON response per line, easy to
//! drive from scripts (`socat`) and from `vmbalancer status` / `advise`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::status::StatusDoc;

/// Longest request line accepted.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Longest response line the client reads.
const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// A request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// numad-style advice: `cpus` CPUs and `mem_mb` MiB.
    Advise {
        cpus: u32,
        mem_mb: u64,
    },
    /// Read the configuration again and say what took effect (root only).
    Reload,
}

/// What a request needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads the daemon's state only: root or the `status_group`.
    ReadOnly,
    /// Changes something: root only.
    Root,
}

impl Request {
    /// What this request needs from its caller (see the module doc).
    pub fn access(&self) -> Access {
        match self {
            Request::Status | Request::Advise { .. } => Access::ReadOnly,
            Request::Reload => Access::Root,
        }
    }

    /// Parses one request line as the daemon reads it: bounded length, JSON.
    pub fn parse_line(line: &str) -> Result<Self, String> {
        if line.len() > MAX_LINE_BYTES {
            return Err(format!("request too long (over {MAX_LINE_BYTES} bytes)"));
        }
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
    }
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusDoc>),
    Advice {
        nodes: String,
    },
    /// A reload took effect: the keys changed now and those waiting for a restart.
    Reloaded {
        changed: Vec<String>,
        needs_restart: Vec<String>,
    },
    Error {
        error: String,
    },
}

/// Answers requests; implemented by the daemon over its shared state.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

impl<F: Fn(Request) -> Response + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: Request) -> Response {
        self(request)
    }
}

/// The credentials the kernel gives for a connected peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (SO_PEERGROUPS); empty when the kernel cannot tell.
    pub groups: Vec<u32>,
}

/// What a connected peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Root,
    /// A member of the `status_group`: read-only requests.
    Reader,
}

/// Whether a peer may talk to the daemon at all, given the `status_group` gid (if
/// any). Pure: the socket code feeds it the kernel's answer.
pub fn authorize(peer: Option<&Peer>, status_gid: Option<u32>) -> Result<Caller, String> {
    let Some(peer) = peer else {
        return Err("permission denied: peer credentials unknown".into());
    };
    if peer.uid == 0 {
        return Ok(Caller::Root);
    }
    match status_gid {
        Some(g) if peer.gid == g || peer.groups.contains(&g) => Ok(Caller::Reader),
        Some(g) => Err(format!(
            "permission denied: uid {} is neither root nor in the status group (gid {g})",
            peer.uid
        )),
        None => Err(format!(
            "permission denied: uid {} is not root (no status_group is configured)",
            peer.uid
        )),
    }
}

/// Whether `caller` may make `request`.
pub fn permit(caller: Caller, request: &Request) -> Result<(), String> {
    match (caller, request.access()) {
        (Caller::Root, _) | (Caller::Reader, Access::ReadOnly) => Ok(()),
        (Caller::Reader, Access::Root) => Err(format!(
            "permission denied: {request:?} needs root; the status group may only read"
        )),
    }
}

/// Who may connect, besides root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// The `status_group`'s gid and name.
    pub status_group: Option<(u32, String)>,
}

impl SocketAccess {
    fn gid(&self) -> Option<u32> {
        self.status_group.as_ref().map(|(g, _)| *g)
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("another vmbalancer daemon answers on {0}")]
    InUse(std::path::PathBuf),
    #[error(
        "control socket {path}: giving it to status_group {group:?}: {source} (the daemon \
         needs CAP_CHOWN, or run the unit with Group={group} and RuntimeDirectoryMode=0750)"
    )]
    Group {
        path: std::path::PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// Binds the socket with mode 0600 (0660 and the status group's, in a 0750 directory of
/// that group, when `access` names one), creating the runtime directory (0700) if
/// needed. A stale socket file of a dead daemon is replaced; a live one is an error.
pub fn bind(path: &Path, access: &SocketAccess) -> Result<tokio::net::UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    match (&access.status_group, dir) {
        (Some((gid, name)), Some(dir)) => {
            for (p, mode) in [(dir, 0o750), (path, 0o660)] {
                give_group(p, *gid, name)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| ControlError::Io {
                        path: p.to_path_buf(),
                        source,
                    },
                )?;
            }
        }
        _ => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?,
    }
    Ok(listener)
}

/// Makes `gid` the group of `path`, unless it already is (systemd's `Group=` with
/// `RuntimeDirectoryMode=0750` gives that without CAP_CHOWN).
fn give_group(path: &Path, gid: u32, name: &str) -> Result<(), ControlError> {
    let meta = std::fs::metadata(path).map_err(|source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.gid() == gid {
        return Ok(());
    }
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
        ControlError::Group {
            path: path.to_path_buf(),
            group: name.to_string(),
            source: std::io::Error::from(e),
        }
    })
}

/// The peer's credentials: SO_PEERCRED, plus SO_PEERGROUPS (Linux 4.13).
fn peer_of(stream: &tokio::net::UnixStream) -> Option<Peer> {
    let cred = stream.peer_cred().ok()?;
    Some(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups: peer_groups(stream).unwrap_or_default(),
    })
}

/// SO_PEERGROUPS: the supplementary groups the peer had when it connected. Neither
/// tokio nor nix offer it, hence the raw call.
fn peer_groups(stream: &impl std::os::fd::AsRawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable gid_t; the kernel writes at most
        // `len` bytes and stores the size it used (or needs, with ERANGE) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // NGROUPS_MAX is 65536: a larger answer is not the kernel's.
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65_536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// How often [`serve`] checks that its socket file is still there.
const SOCKET_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Serves requests on `listener` (bound at `path`) until `stop` resolves. A socket
/// file removed while running (the runtime directory cleaned by hand or by a tool)
/// is bound again within [`SOCKET_CHECK_EVERY`], so `status` never stays unreachable
/// until a restart; if another daemon took the path meanwhile, it is left to it.
pub async fn serve(
    mut listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    access: SocketAccess,
    handler: Arc<dyn Handler>,
    stop: impl std::future::Future<Output = ()>,
) {
    let status_gid = access.gid();
    let inode = |p: &Path| std::fs::symlink_metadata(p).ok().map(|m| m.ino());
    let mut bound = inode(&path);
    let mut check = tokio::time::interval(SOCKET_CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = check.tick() => {
                if bound.is_none() || inode(&path) == bound {
                    continue;
                }
                match bind(&path, &access) {
                    Ok(l) => {
                        tracing::warn!(path = %path.display(), "the control socket was removed: bound it again");
                        listener = l;
                        bound = inode(&path);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the control socket was removed and cannot be bound again");
                        bound = None;
                    }
                }
            }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    tokio::spawn(async move { connection(stream, status_gid, h).await });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(
    stream: tokio::net::UnixStream,
    status_gid: Option<u32>,
    handler: Arc<dyn Handler>,
) {
    let peer = peer_of(&stream);
    let (read, mut write) = stream.into_split();
    let caller = match authorize(peer.as_ref(), status_gid) {
        Ok(c) => c,
        Err(why) => {
            tracing::info!(uid = peer.map(|p| p.uid), "control connection refused");
            let _ = write_response(&mut write, &Response::Error { error: why }).await;
            return;
        }
    };
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let line =
            match tokio::time::timeout(Duration::from_secs(30), read_line_bounded(&mut reader))
                .await
            {
                Ok(Ok(Some(l))) => l,
                Ok(Err(error)) => {
                    // An endless line: say why, then close (the rest cannot be framed).
                    let _ = write_response(&mut write, &Response::Error { error }).await;
                    return;
                }
                _ => return,
            };
        if line.trim().is_empty() {
            continue;
        }
        let response = match Request::parse_line(&line).and_then(|req| {
            permit(caller, &req)?;
            Ok(req)
        }) {
            Ok(req) => {
                let h = handler.clone();
                tokio::task::spawn_blocking(move || h.handle(req))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        error: format!("handler failed: {e}"),
                    })
            }
            Err(error) => Response::Error { error },
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// Reads one line of at most [`MAX_LINE_BYTES`] without buffering more: `None` at the
/// end of the stream, an error for a longer line (memory stays bounded whatever the
/// peer sends).
async fn read_line_bounded(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> Result<Option<String>, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let n = reader
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE_BYTES {
        return Err(format!("request too long (over {MAX_LINE_BYTES} bytes)"));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| "bad request: not UTF-8".to_string())
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the vmbalancer daemon is not running (no control socket at {0})")]
    NotRunning(std::path::PathBuf),
    #[error(
        "permission denied on {0}: the control socket answers root, and the status_group \
         of the configuration (if one is set) for status and advise"
    )]
    Denied(std::path::PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("bad response from the daemon: {0}")]
    BadResponse(String),
}

/// Sends one request and reads one response (blocking; for the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    use std::io::ErrorKind;
    let io = |source: std::io::Error| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(path.to_path_buf())
        }
        ErrorKind::PermissionDenied => ClientError::Denied(path.to_path_buf()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    // A status document is a few KiB; the bound keeps a wrong peer from filling memory.
    BufReader::new(&stream)
        .take(MAX_RESPONSE_BYTES)
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| ClientError::BadResponse(format!("{e}: {reply:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_always_and_the_status_group_for_reading() {
        for group in [None, Some(1234)] {
            assert_eq!(authorize(Some(&peer(0, 0, &[])), group), Ok(Caller::Root));
            assert!(authorize(None, group).unwrap_err().contains("unknown"));
        }
        // No status group: every other uid is refused, naming it.
        let e = authorize(Some(&peer(1000, 1234, &[])), None).unwrap_err();
        assert!(
            e.contains("uid 1000") && e.contains("no status_group"),
            "{e}"
        );
        // Member by primary or by supplementary group.
        let g = Some(1234);
        assert_eq!(
            authorize(Some(&peer(1000, 1234, &[])), g),
            Ok(Caller::Reader)
        );
        assert_eq!(
            authorize(Some(&peer(1000, 100, &[5, 1234])), g),
            Ok(Caller::Reader)
        );
        let e = authorize(Some(&peer(65534, 65534, &[5])), g).unwrap_err();
        assert!(e.contains("uid 65534") && e.contains("gid 1234"), "{e}");
    }

    #[test]
    fn readers_may_only_read() {
        let status = Request::Status;
        let advise = Request::Advise { cpus: 1, mem_mb: 1 };
        for r in [&status, &advise] {
            assert_eq!(r.access(), Access::ReadOnly);
            assert_eq!(permit(Caller::Reader, r), Ok(()));
            assert_eq!(permit(Caller::Root, r), Ok(()));
        }
        // Reloading changes what the daemon does: root only.
        let reload = Request::Reload;
        assert_eq!(reload.access(), Access::Root);
        assert_eq!(permit(Caller::Root, &reload), Ok(()));
        let e = permit(Caller::Reader, &reload).unwrap_err();
        assert!(e.contains("needs root"), "{e}");
        assert_eq!(
            Request::parse_line(r#"{"cmd":"reload"}"#),
            Ok(Request::Reload)
        );
    }

    #[test]
    fn request_lines_are_bounded_and_errors_say_why() {
        assert_eq!(
            Request::parse_line(r#"{"cmd":"status"}"#),
            Ok(Request::Status)
        );
        let long = format!(r#"{{"cmd":"status","x":"{}"}}"#, "a".repeat(MAX_LINE_BYTES));
        assert!(Request::parse_line(&long).unwrap_err().contains("too long"));
        let e = Request::parse_line(r#"{"cmd":"reboot"}"#).unwrap_err();
        assert!(e.starts_with("bad request: unknown variant"), "{e}");
        let e = Request::parse_line(r#"{"cmd":"advise","cpus":-1,"mem_mb":1}"#).unwrap_err();
        assert!(e.starts_with("bad request"), "{e}");
    }

    #[test]
    fn bounded_line_reader_stops_an_endless_line() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut input: &[u8] = b"{\"cmd\":\"status\"}\nlast";
            assert_eq!(
                read_line_bounded(&mut input).await,
                Ok(Some(r#"{"cmd":"status"}"#.to_string()))
            );
            assert_eq!(read_line_bounded(&mut input).await, Ok(Some("last".into())));
            assert_eq!(read_line_bounded(&mut input).await, Ok(None));
            let endless = vec![b'x'; MAX_LINE_BYTES * 3];
            let mut input: &[u8] = &endless;
            let e = read_line_bounded(&mut input).await.unwrap_err();
            assert!(e.contains("too long"), "{e}");
            // Nothing past the bound was consumed.
            assert_eq!(input.len(), MAX_LINE_BYTES * 3 - MAX_LINE_BYTES - 1);
            let mut input: &[u8] = b"\xff\xfe\n";
            assert!(
                read_line_bounded(&mut input)
                    .await
                    .unwrap_err()
                    .contains("UTF-8")
            );
        });
    }

    #[test]
    fn protocol_lines() {
        assert_eq!(
            serde_json::to_string(&Request::Advise {
                cpus: 2,
                mem_mb: 1024
            })
            .unwrap(),
            r#"{"cmd":"advise","cpus":2,"mem_mb":1024}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            serde_json::to_string(&Response::Advice {
                nodes: "0-1".into()
            })
            .unwrap(),
            r#"{"result":"advice","nodes":"0-1"}"#
        );
    }

    #[test]
    fn socket_is_0600_and_answers_root() {
        let dir = std::env::temp_dir().join(format!("vmb-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("control.sock");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(async { bind(&path, &SocketAccess::default()) })
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handler: Arc<dyn Handler> = Arc::new(|r: Request| match r {
            Request::Status => Response::Status(Box::default()),
            Request::Advise { cpus, .. } => Response::Advice {
                nodes: format!("0-{}", cpus - 1),
            },
            Request::Reload => Response::Error {
                error: "not here".into(),
            },
        });
        rt.spawn(serve(
            listener,
            path.clone(),
            SocketAccess::default(),
            handler,
            async {
                let _ = rx.await;
            },
        ));
        let r = request(
            &path,
            &Request::Advise { cpus: 2, mem_mb: 1 },
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            r,
            Response::Advice {
                nodes: "0-1".into()
            }
        );
        assert!(matches!(
            request(&path, &Request::Status, Duration::from_secs(5)).unwrap(),
            Response::Status(_)
        ));
        // Removed while running (a cleaned runtime directory): bound again.
        std::fs::remove_dir_all(&dir).unwrap();
        let back = std::time::Instant::now();
        while !path.exists() && back.elapsed() < SOCKET_CHECK_EVERY * 3 {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            matches!(
                request(&path, &Request::Status, Duration::from_secs(5)).unwrap(),
                Response::Status(_)
            ),
            "the socket answers again after {:?}",
            back.elapsed()
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second daemon must not steal a live socket.
        assert!(matches!(
            rt.block_on(async { bind(&path, &SocketAccess::default()) }),
            Err(ControlError::InUse(_))
        ));
        tx.send(()).unwrap();
        drop(rt);
        // Now stale: a new bind replaces it.
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert!(
            rt.block_on(async { bind(&path, &SocketAccess::default()) })
                .is_ok()
        );
        drop(rt);
        assert!(matches!(
            request(
                &dir.join("nope.sock"),
                &Request::Status,
                Duration::from_secs(1)
            ),
            Err(ClientError::NotRunning(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
