//! The control socket: `control.sock` in the runtime directory, root only.
//!
//! Why two locks: the socket file is mode 0600 (the kernel refuses `connect` from
//! other users), and every accepted connection's peer is checked again with
//! SO_PEERCRED, so a socket whose mode was loosened by mistake still answers only
//! root. The protocol is one JSON request per line and one JSON response per line,
//! easy to drive from scripts (`socat`) and from `vmbalancer status` / `advise`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::status::StatusDoc;

/// Longest request line accepted.
const MAX_LINE_BYTES: usize = 64 * 1024;

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
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusDoc>),
    Advice { nodes: String },
    Error { error: String },
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

/// Why a peer may not talk to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("permission denied: uid {0} is not root")]
    NotRoot(u32),
    #[error("permission denied: peer credentials unknown")]
    UnknownPeer,
}

/// Whether a peer may talk to the daemon: root only.
pub fn authorize(peer_uid: Option<u32>) -> Result<(), Denied> {
    match peer_uid {
        Some(0) => Ok(()),
        Some(uid) => Err(Denied::NotRoot(uid)),
        None => Err(Denied::UnknownPeer),
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
}

/// Binds the socket with mode 0600, creating the runtime directory (0700) if needed.
/// A stale socket file of a dead daemon is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves connections until `stop` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    handler: Arc<dyn Handler>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    tokio::spawn(async move { connection(stream, h).await });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, handler: Arc<dyn Handler>) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    if let Err(why) = authorize(uid) {
        tracing::info!(?uid, "control connection refused");
        let error = why.to_string();
        let _ = write_response(&mut write, &Response::Error { error }).await;
        return;
    }
    let mut lines = tokio::io::BufReader::new(read).lines();
    loop {
        let line = match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => return,
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = if line.len() > MAX_LINE_BYTES {
            Response::Error {
                error: "request too long".into(),
            }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let h = handler.clone();
                    tokio::task::spawn_blocking(move || h.handle(req))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            error: format!("handler failed: {e}"),
                        })
                }
                Err(e) => Response::Error {
                    error: format!("bad request: {e}"),
                },
            }
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
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
    #[error("permission denied on {0}: the control socket is root-only")]
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
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| ClientError::BadResponse(format!("{e}: {reply:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_is_authorized() {
        assert!(authorize(Some(0)).is_ok());
        assert_eq!(authorize(Some(1000)), Err(Denied::NotRoot(1000)));
        assert!(
            authorize(Some(1000))
                .unwrap_err()
                .to_string()
                .contains("uid 1000")
        );
        assert!(authorize(Some(65534)).is_err());
        assert!(authorize(None).is_err());
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
        let listener = rt.block_on(async { bind(&path) }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handler: Arc<dyn Handler> = Arc::new(|r: Request| match r {
            Request::Status => Response::Status(Box::default()),
            Request::Advise { cpus, .. } => Response::Advice {
                nodes: format!("0-{}", cpus - 1),
            },
        });
        rt.spawn(serve(listener, handler, async {
            let _ = rx.await;
        }));
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
        // A second daemon must not steal a live socket.
        assert!(matches!(
            rt.block_on(async { bind(&path) }),
            Err(ControlError::InUse(_))
        ));
        tx.send(()).unwrap();
        drop(rt);
        // Now stale: a new bind replaces it.
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert!(rt.block_on(async { bind(&path) }).is_ok());
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
