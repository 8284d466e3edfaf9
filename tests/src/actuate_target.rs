//! The `actuate_target` test program as tests see it: a process with two threads and
//! one anonymous mapping, started and waited for until it prints its ready line
//! `PID TID0 TID1 ADDR LEN`. The host integration tests and the in-guest probe act on
//! it as they would on a VM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `actuate_target`.
pub struct Target {
    pub child: Child,
    pub pid: u32,
    /// Its two worker threads.
    pub tids: [u32; 2],
    /// Start and length of its mapping.
    pub addr: u64,
    pub len: u64,
}

impl Target {
    /// Starts `exe` with `args` (mapping bytes, then `huge` or `small`; both optional)
    /// and reads its ready line. Panics with the reason when it cannot: this is test
    /// scaffolding.
    pub fn spawn(exe: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", exe.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading the ready line");
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|x| x.parse().expect("a number in the ready line"))
            .collect();
        assert!(f.len() >= 5, "short ready line {line:?}");
        Self {
            child,
            pid: f[0] as u32,
            tids: [f[1] as u32, f[2] as u32],
            addr: f[3],
            len: f[4],
        }
    }
}
