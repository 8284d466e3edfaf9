//! The control socket refuses non-root users, for real: a forked child drops to uid
//! 65534 and tries to talk to the daemon's socket (needs root to setuid). With a
//! `status_group`, members (by primary or supplementary group) may read, others not.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use balancer::daemon::control::{self, Handler, Request, Response};

/// Exit codes of the child.
const REFUSED_BY_MODE: i32 = 10;
const REFUSED_BY_PEERCRED: i32 = 11;
const ANSWERED: i32 = 12;
const OTHER: i32 = 13;

/// Forks; the child becomes uid/gid 65534, connects and sends a status request.
fn as_nobody(path: &Path) -> i32 {
    as_user(path, 65534, &[])
}

/// Forks; the child becomes uid 65534 with group `gid` and supplementary `groups`,
/// connects and sends a status request.
fn as_user(path: &Path, gid: u32, groups: &[u32]) -> i32 {
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    // SAFETY: the child only makes syscalls and std calls that do not depend on other
    // threads of the parent, then _exits.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| {
                let nobody = nix::unistd::Uid::from_raw(65534);
                if nix::unistd::setgroups(&groups).is_err()
                    || nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)).is_err()
                    || nix::unistd::setuid(nobody).is_err()
                {
                    return OTHER;
                }
                let mut s = match UnixStream::connect(path) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        return REFUSED_BY_MODE;
                    }
                    Err(_) => return OTHER,
                };
                let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                match serde_json::from_str::<Response>(&line) {
                    Ok(Response::Error { error })
                        if error.contains("uid 65534") && error.contains("permission denied") =>
                    {
                        REFUSED_BY_PEERCRED
                    }
                    Ok(Response::Status(_)) => ANSWERED,
                    _ => OTHER,
                }
            })();
            // SAFETY: leaves the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child ended with {other:?}"),
            }
        }
    }
}

/// A control socket at `path`, bound with `access` and answering every request
/// with an empty status, served on its own runtime until dropped.
struct Served {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Served {
    fn start(path: &Path, access: control::SocketAccess) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(async { control::bind(path, &access) }).unwrap();
        let handler: Arc<dyn Handler> = Arc::new(|_r: Request| Response::Status(Box::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(control::serve(
            listener,
            path.to_path_buf(),
            access,
            handler,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            stop: Some(tx),
            rt: Some(rt),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        drop(self.rt.take());
    }
}

/// A fresh directory for a socket, traversable by everyone (mode 0755), so only the
/// modes the daemon sets below it protect the socket.
fn open_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
#[ignore = "needs root: a forked child switches to uid 65534"]
fn non_root_is_refused_by_mode_and_by_peer_credentials() {
    vmbalancer_tests::require_root();
    let dir = open_dir("vmb-ctl");
    let path = dir.join("control.sock");
    let served = Served::start(&path, control::SocketAccess::default());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Root is answered.
    let r = control::request(&path, &Request::Status, std::time::Duration::from_secs(5));
    assert!(matches!(r, Ok(Response::Status(_))), "{r:?}");

    // Mode 0600: the kernel refuses the connection.
    assert_eq!(as_nobody(&path), REFUSED_BY_MODE);

    // Loosened by mistake: the peer credential check still refuses.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(as_nobody(&path), REFUSED_BY_PEERCRED);

    drop(served);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[ignore = "needs root: forked children switch to uid 65534 and chosen groups"]
fn status_group_members_may_read_and_others_may_not() {
    vmbalancer_tests::require_root();
    use std::os::unix::fs::MetadataExt;
    let dir = open_dir("vmb-ctl-group");
    let path = dir.join("run").join("control.sock");
    // The status group: gid 65534 (nogroup on Debian; any gid works for the kernel).
    const GROUP: u32 = 65534;
    const OTHER_GID: u32 = 65533;

    let served = Served::start(
        &path,
        control::SocketAccess {
            status_group: Some((GROUP, "nogroup".into())),
        },
    );
    let sock = std::fs::metadata(&path).unwrap();
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, GROUP));
    let run = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!((run.mode() & 0o777, run.gid()), (0o750, GROUP));

    // A member by its primary group, and one by a supplementary group (SO_PEERGROUPS).
    assert_eq!(as_user(&path, GROUP, &[]), ANSWERED);
    assert_eq!(as_user(&path, OTHER_GID, &[GROUP]), ANSWERED);
    // Not a member: the directory (0750) and the socket (0660) refuse it.
    assert_eq!(as_user(&path, OTHER_GID, &[]), REFUSED_BY_MODE);
    // Modes loosened by mistake: the credential check still refuses it.
    for p in [path.parent().unwrap(), &path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    assert_eq!(as_user(&path, OTHER_GID, &[]), REFUSED_BY_PEERCRED);
    assert_eq!(as_user(&path, GROUP, &[]), ANSWERED);

    drop(served);
    std::fs::remove_dir_all(dir).unwrap();
}
