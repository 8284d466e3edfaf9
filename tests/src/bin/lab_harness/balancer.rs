//! Starts and stops the balancer under test, and reports what it did.

use std::fs::File;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{Balancer, Scenario};

use crate::emit;

const NUMAD_LOG: &str = "/var/log/numad.log";
const NUMAD_PID: &str = "/var/run/numad.pid";
const VMBALANCER_LOG: &str = "/run/lab/vmbalancer.log";

/// A running balancer; `stop` ends it and reports its log.
pub struct Guard {
    kind: Balancer,
    child: Option<Child>,
    log_lines: usize,
}

pub fn start(kind: Balancer, scenario: &Scenario) -> anyhow::Result<Guard> {
    let mut child = None;
    match kind {
        Balancer::None => {}
        Balancer::Autonuma => std::fs::write("/proc/sys/kernel/numa_balancing", "1")
            .context("enabling kernel.numa_balancing")?,
        Balancer::Numad => {
            let _ = std::fs::remove_file(NUMAD_LOG);
            // numad daemonises and writes its pid file.
            let status = Command::new("numad")
                .args(&scenario.numad.args)
                .status()
                .context("starting numad")?;
            anyhow::ensure!(status.success(), "numad exited with {status}");
        }
        Balancer::Vmbalancer => {
            let mut args = scenario.vmbalancer.args.clone();
            if let Some(config) = &scenario.vmbalancer.config {
                std::fs::write("/run/lab/vmbalancer.toml", config)?;
                args.extend(["--config".into(), "/run/lab/vmbalancer.toml".into()]);
            }
            let out = File::create(VMBALANCER_LOG)?;
            child = Some(
                Command::new("vmbalancer")
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out)
                    .spawn()
                    .context("starting vmbalancer")?,
            );
        }
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!("balancer {} started", kind.name()),
    });
    Ok(Guard {
        kind,
        child,
        log_lines: scenario.vmbalancer.log_lines,
    })
}

fn report_log(source: &str, path: &str, max_lines: usize, keep: impl Fn(&str) -> bool) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    for l in &lines[lines.len().saturating_sub(max_lines)..] {
        emit(&Record::Event {
            source: source.into(),
            text: (*l).to_string(),
        });
    }
}

/// Where each thread of `pid` waits in the kernel (`wchan` and its kernel stack), for
/// runs that study a daemon that stopped making progress.
fn report_stacks(pid: u32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stack: Vec<String> = read("stack")
            .lines()
            .take(12)
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
            .collect();
        emit(&Record::Event {
            source: "harness".into(),
            text: format!(
                "thread {} {}: wchan {} stack {}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan").trim(),
                stack.join(" < ")
            ),
        });
    }
}

impl Guard {
    pub fn stop(&mut self) {
        match self.kind {
            Balancer::None => {}
            Balancer::Autonuma => {
                let _ = std::fs::write("/proc/sys/kernel/numa_balancing", "0");
            }
            Balancer::Numad => {
                if let Some(pid) = std::fs::read_to_string(NUMAD_PID)
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: signalling a pid numad itself recorded.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                report_log("numad", NUMAD_LOG, 60, |l| {
                    !l.contains("Nodes:") && !l.contains("Node ") && !l.trim().is_empty()
                });
            }
            Balancer::Vmbalancer => {
                if let Some(mut c) = self.child.take() {
                    match c.try_wait() {
                        Ok(Some(status)) => emit(&Record::Event {
                            source: "vmbalancer".into(),
                            text: format!("exited early: {status}"),
                        }),
                        _ => {
                            if self.log_lines > 60 {
                                report_stacks(c.id());
                            }
                            // SAFETY: signalling our own child.
                            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                            std::thread::sleep(std::time::Duration::from_secs(1));
                            let _ = c.kill();
                        }
                    }
                    let _ = c.wait();
                }
                report_log("vmbalancer", VMBALANCER_LOG, self.log_lines, |_| true);
            }
        }
    }
}
