use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::host::linux::discovery::parse_qemu_cmdline;

fn sockets(s: &str) -> Vec<QmpSocket> {
    let argv: Vec<String> = s.split_whitespace().map(str::to_string).collect();
    parse_qemu_cmdline(&argv).qmp_sockets
}

fn sock(path: &str) -> QmpSocket {
    QmpSocket {
        path: path.into(),
        abstract_ns: false,
    }
}

#[test]
fn every_spelling_of_a_monitor_socket() {
    // Today's spelling, the older flags, and the pretty variant.
    assert_eq!(
        sockets("qemu-system-x86_64 -qmp unix:/run/vm1.qmp,server=on,wait=off"),
        vec![sock("/run/vm1.qmp")]
    );
    assert_eq!(
        sockets("qemu-system-x86_64 -qmp unix:/tmp/q.sock,server,nowait"),
        vec![sock("/tmp/q.sock")]
    );
    assert_eq!(
        sockets("q -qmp-pretty unix:rel/q.sock,server=yes"),
        vec![sock("rel/q.sock")]
    );
    // A chardev used by a control-mode monitor, in either order.
    let chardev = "-chardev socket,id=mon0,path=/var/run/vm.mon,server=on,wait=off";
    let mon = "-mon chardev=mon0,mode=control,pretty=on";
    assert_eq!(
        sockets(&format!("q {chardev} {mon}")),
        vec![sock("/var/run/vm.mon")]
    );
    assert_eq!(
        sockets(&format!("q {mon} {chardev}")),
        vec![sock("/var/run/vm.mon")]
    );
    assert_eq!(
        sockets("q -chardev socket,id=m,path=/x,server -mon chardev=m,mode=control"),
        vec![sock("/x")]
    );
    // Abstract namespace.
    assert_eq!(
        sockets(
            "q -chardev socket,id=m,path=vmq,abstract=on,server=on -mon chardev=m,mode=control"
        ),
        vec![QmpSocket {
            path: "vmq".into(),
            abstract_ns: true
        }]
    );
    // Both kinds at once: -qmp first, no duplicates.
    assert_eq!(
        sockets(
            "q -chardev socket,id=m,path=/b,server=on -mon chardev=m,mode=control -qmp unix:/a,server=on"
        ),
        vec![sock("/a"), sock("/b")]
    );
}

#[test]
fn monitors_that_cannot_be_asked() {
    for s in [
        // qemu connects out: not a server.
        "q -qmp unix:/tmp/q.sock",
        "q -qmp unix:/tmp/q.sock,server=off",
        // TCP, stdio.
        "q -qmp tcp:localhost:4444,server=on,wait=off",
        "q -qmp stdio",
        // The human monitor (readline is the default mode).
        "q -chardev socket,id=m,path=/x,server=on -mon chardev=m",
        "q -chardev socket,id=m,path=/x,server=on -mon chardev=m,mode=readline",
        // libvirt passes the socket as a file descriptor.
        "q -chardev socket,id=charmonitor,fd=23,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control",
        // A control monitor on a chardev that is not defined, or not a socket.
        "q -mon chardev=nope,mode=control",
        "q -chardev file,id=f,path=/x -mon chardev=f,mode=control",
        "q -qmp unix:,server=on",
        "q -qmp",
    ] {
        assert_eq!(sockets(s), vec![], "{s}");
    }
}

#[test]
fn resolves_through_the_process_root_and_cwd() {
    let proc = Path::new("/proc");
    assert_eq!(
        resolve(proc, 42, &sock("/run/q.sock")),
        PathBuf::from("/proc/42/root/run/q.sock")
    );
    assert_eq!(
        resolve(proc, 42, &sock("q.sock")),
        PathBuf::from("/proc/42/cwd/q.sock")
    );
    let long = format!("/{}", "d/".repeat(60));
    assert_eq!(resolve(proc, 42, &sock(&long)), PathBuf::from(&long));
}

#[test]
fn parses_query_cpus_fast_replies() {
    let reply: Value = serde_json::from_str(
        r#"{"return": [
            {"thread-id": 2001, "props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "qom-path": "/machine/unattached/device[1]", "cpu-index": 1, "target": "x86_64"},
            {"thread-id": 2000, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}
        ], "id": 2}"#,
    )
    .unwrap();
    assert_eq!(
        parse_cpus_fast(&reply).unwrap(),
        vec![
            QmpVcpu {
                index: 0,
                tid: 2000
            },
            QmpVcpu {
                index: 1,
                tid: 2001
            }
        ]
    );
    let incomplete = |s: &str| CpuListError::Incomplete(s.to_string());
    for (bad, expect) in [
        (r#"{"return": []}"#, CpuListError::Empty),
        (
            r#"{"return": {}}"#,
            CpuListError::NoList(r#"{"return":{}}"#.into()),
        ),
        (
            r#"{"return": [{"cpu-index": 0}]}"#,
            incomplete(r#"{"cpu-index":0}"#),
        ),
        (
            r#"{"return": [{"cpu-index": 0, "thread-id": -1}]}"#,
            incomplete(r#"{"cpu-index":0,"thread-id":-1}"#),
        ),
        (
            r#"{"return": [{"cpu-index": 0, "thread-id": 0}]}"#,
            CpuListError::ZeroThread { index: 0 },
        ),
        (
            r#"{"return": [{"cpu-index": 0, "thread-id": 5000000000}]}"#,
            incomplete(r#"{"cpu-index":0,"thread-id":5000000000}"#),
        ),
        (
            r#"{"return": [{"cpu-index": 0, "thread-id": 7}, {"cpu-index": 1, "thread-id": 7}]}"#,
            CpuListError::Repeated { index: 1, tid: 7 },
        ),
        (
            r#"{"return": [{"cpu-index": 0, "thread-id": 7}, {"cpu-index": 0, "thread-id": 8}]}"#,
            CpuListError::Repeated { index: 0, tid: 8 },
        ),
        (
            r#"{"error": {"class": "GenericError", "desc": "x"}}"#,
            CpuListError::NoList(r#"{"error":{"class":"GenericError","desc":"x"}}"#.into()),
        ),
    ] {
        let v: Value = serde_json::from_str(bad).unwrap();
        assert_eq!(parse_cpus_fast(&v), Err(expect), "{bad}");
    }
    assert_eq!(
        CpuListError::Repeated { index: 1, tid: 7 }.to_string(),
        "CPU 1 or thread 7 listed twice"
    );
}

/// How the test monitor behaves once a client connects.
#[derive(Clone, Copy)]
enum Monitor {
    /// A well-behaved qemu (compact or pretty JSON), with an event before a reply.
    Good { pretty: bool },
    /// Greets, then never answers.
    SilentAfterGreeting,
    /// Accepts and says nothing.
    Mute,
    /// Something that is not a QMP monitor.
    Garbage,
    /// Greets, then hangs up.
    HangsUp,
    /// An old qemu without query-cpus-fast.
    NoCommand,
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

/// A one-connection monitor in a thread; returns the socket path and the lines the
/// client sent.
fn serve(dir: &Path, name: &str, how: Monitor) -> (PathBuf, mpsc::Receiver<String>) {
    let path = dir.join(name);
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut lines = BufReader::new(conn);
        let send = |w: &mut UnixStream, v: &str, pretty: bool| {
            let text = if pretty {
                serde_json::to_string_pretty(&serde_json::from_str::<Value>(v).unwrap()).unwrap()
            } else {
                v.to_string()
            };
            let _ = w.write_all(format!("{text}\r\n").as_bytes());
        };
        match how {
            Monitor::Mute => {
                thread::sleep(Duration::from_secs(2));
                return;
            }
            Monitor::Garbage => {
                let _ = w.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                thread::sleep(Duration::from_secs(1));
                return;
            }
            _ => send(
                &mut w,
                GREETING,
                matches!(how, Monitor::Good { pretty: true }),
            ),
        }
        if matches!(how, Monitor::HangsUp) {
            return;
        }
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(line.trim().to_string());
            let msg: Value = serde_json::from_str(&line).unwrap();
            line.clear();
            let id = msg["id"].clone();
            let pretty = matches!(how, Monitor::Good { pretty: true });
            match (how, msg["execute"].as_str()) {
                (Monitor::SilentAfterGreeting, Some("query-cpus-fast")) => {
                    thread::sleep(Duration::from_secs(2));
                    return;
                }
                (Monitor::NoCommand, Some("query-cpus-fast")) => send(
                    &mut w,
                    &format!(
                        r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "The command query-cpus-fast has not been found"}}}}"#
                    ),
                    false,
                ),
                (_, Some("qmp_capabilities")) => send(
                    &mut w,
                    &format!(r#"{{"return": {{}}, "id": {id}}}"#),
                    pretty,
                ),
                (_, Some("query-cpus-fast")) => {
                    send(
                        &mut w,
                        r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RTC_CHANGE", "data": {"offset": 0}}"#,
                        pretty,
                    );
                    send(
                        &mut w,
                        &format!(
                            r#"{{"return": [{{"thread-id": 501, "cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "target": "x86_64", "props": {{"socket-id": 0}}}}, {{"thread-id": 502, "cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "target": "x86_64", "props": {{"socket-id": 0}}}}], "id": {id}}}"#
                        ),
                        pretty,
                    )
                }
                _ => send(
                    &mut w,
                    r#"{"error": {"class": "GenericError", "desc": "no"}}"#,
                    false,
                ),
            }
        }
    });
    (path, rx)
}

fn ask(path: &Path, timeout_ms: u64) -> Result<Vec<QmpVcpu>, QmpError> {
    let stream = connect(path, false)?;
    converse(Deadline::new(stream, Duration::from_millis(timeout_ms)))
}

fn tempdir() -> tempdir_lite::Dir {
    tempdir_lite::Dir::new()
}

/// A scratch directory removed on drop (std only).
mod tempdir_lite {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmb-qmp-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn asks_a_good_monitor_only_queries() {
    for pretty in [false, true] {
        let dir = tempdir();
        let (path, sent) = serve(&dir.0, "good.sock", Monitor::Good { pretty });
        let vcpus = ask(&path, 2000).unwrap();
        assert_eq!(
            vcpus,
            vec![
                QmpVcpu { index: 0, tid: 501 },
                QmpVcpu { index: 1, tid: 502 }
            ]
        );
        let sent: Vec<Value> = sent
            .iter()
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        let commands: Vec<&str> = sent.iter().filter_map(|m| m["execute"].as_str()).collect();
        assert_eq!(commands, vec!["qmp_capabilities", "query-cpus-fast"]);
        // Nothing but `execute` and `id`: no arguments, nothing that changes qemu.
        assert!(sent.iter().all(|m| m.as_object().unwrap().len() == 2));
    }
}

#[test]
fn gives_up_on_monitors_that_do_not_answer() {
    let dir = tempdir();
    // Greets, then says nothing: silent, within the deadline.
    let (path, _) = serve(&dir.0, "silent.sock", Monitor::SilentAfterGreeting);
    let t = Instant::now();
    assert!(matches!(ask(&path, 300), Err(QmpError::Silent(_))));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // Accepts, never greets: as when another client holds the monitor.
    let (path, _) = serve(&dir.0, "mute.sock", Monitor::Mute);
    let t = Instant::now();
    assert!(matches!(ask(&path, 300), Err(QmpError::Busy)));
    assert!(t.elapsed() < Duration::from_millis(1500));
    // Not QMP at all.
    let (path, _) = serve(&dir.0, "garbage.sock", Monitor::Garbage);
    let e = ask(&path, 1000).unwrap_err();
    assert!(matches!(e, QmpError::Garbage(_)), "{e}");
    // Hangs up after the greeting.
    let (path, _) = serve(&dir.0, "hangup.sock", Monitor::HangsUp);
    assert!(matches!(ask(&path, 1000), Err(QmpError::Closed)));
    // An old qemu: the refusal with qemu's words.
    let (path, _) = serve(&dir.0, "old.sock", Monitor::NoCommand);
    let e = ask(&path, 1000).unwrap_err();
    assert!(e.to_string().contains("CommandNotFound"), "{e}");
    // Nobody listening.
    assert!(matches!(
        ask(&dir.0.join("none.sock"), 300),
        Err(QmpError::Connect { .. })
    ));
}

#[test]
fn a_monitor_held_by_another_client_is_busy_not_waited_for() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let dir = tempdir();
    let path = dir.0.join("held.sock");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    // qemu listens with a backlog of 1 and stops accepting while a client holds
    // the monitor; here nobody accepts, and the queue fills.
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let _holder = UnixStream::connect(&path).unwrap();
    let t = Instant::now();
    let e = ask(&path, 200);
    assert!(matches!(e, Err(QmpError::Busy)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn query_vcpus_goes_through_the_process_root() {
    // This process's own root: the path the observer would use for a qemu.
    let dir = tempdir();
    let (path, _) = serve(&dir.0, "own.sock", Monitor::Good { pretty: false });
    let s = QmpSocket {
        path: path.display().to_string(),
        abstract_ns: false,
    };
    let got = query_vcpus(
        Path::new("/proc"),
        std::process::id(),
        &s,
        Duration::from_secs(2),
    );
    assert_eq!(got.unwrap().len(), 2);
}
