//! Runs shell commands with a time limit, keeping the tail of their output.

use std::fs::File;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `sh -c script` (as `uid`, with the same gid and no supplementary groups,
/// when given); returns its exit code (`None` if killed at the time limit or it
/// could not start) and the last lines of its combined output.
pub fn run_shell(script: &str, timeout_s: f64, uid: Option<u32>) -> (Option<i32>, String) {
    let log = "/run/lab-command.log";
    let spawn = || -> std::io::Result<std::process::Child> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("sh");
        if let Some(u) = uid {
            use std::os::unix::process::CommandExt;
            // std drops supplementary groups when it changes the uid.
            cmd.uid(u).gid(u);
        }
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
    };
    let mut child = match spawn() {
        Ok(c) => c,
        Err(e) => return (None, format!("cannot start: {e}")),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => break None,
        }
    };
    (status, tail(log, 12))
}

/// The last `lines` lines of a file, joined with ` | `.
pub fn tail(path: &str, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}
