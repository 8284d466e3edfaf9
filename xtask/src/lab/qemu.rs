//! Boots the lab guest under QEMU (TCG) and streams its serial console.
//!
//! The guest has 4 NUMA nodes x 2 CPUs x 2 GiB with SLIT distances 10 (local),
//! 21 (adjacent nodes in a ring) and 31 (opposite nodes). TCG, not KVM: nested KVM
//! hangs on the machines this runs on, and TCG behaves identically everywhere.
//! Console lines are echoed with a prefix; result lines are parsed and handed back.
//! A guest that does not power off in time is killed with a clear message
//! ([`GuestHung`], which keeps what it printed).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The guest did not power off in time and was killed; `lines` is its console.
#[derive(Debug)]
pub struct GuestHung {
    pub timeout_s: u64,
    pub lines: Vec<String>,
    /// What made the lab kill it.
    pub kind: Hang,
}

/// Why a guest was killed before it powered off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hang {
    /// The scenario's timeout passed.
    Timeout,
    /// Its heartbeat stopped for [`SILENCE_LIMIT`] after its init ran.
    Silent,
    /// It did not reach its init within [`INIT_LIMIT`].
    NoInit,
}

/// The line the guest's init prints every 5 s from a shell loop of its own,
/// beside whatever the scenario does. It is not echoed and not kept.
pub const ALIVE_MARK: &str = "@@VMBLAB-ALIVE@@";

/// How long a guest that has reached its init may print nothing, heartbeat
/// included, before it is taken for stopped. A loop of `sleep 5; echo` is late by
/// seconds at most even when every guest CPU is busy moving memory; 90 s without
/// a line means no guest process was scheduled at all.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// How long a guest may take from qemu's start to its init's first line. The
/// busybox guest gets there in 10-60 s and the stack guest (firmware, systemd,
/// libvirt) in 30-120 s under emulation on a loaded machine; the stack guest prints
/// nothing on its console before its init, so silence cannot tell a slow boot from
/// a stopped one earlier. Seen once: a stack guest whose qemu went idle before init
/// and waited for the scenario's whole timeout (11 minutes).
pub const INIT_LIMIT: Duration = Duration::from_secs(300);

/// How long a stopped guest gets to answer the monitor's register dump and the
/// injected NMI (see [`run`]) before it is killed.
const DUMP_WAIT: Duration = Duration::from_secs(20);

/// What is typed into the console multiplexer of a stopped guest: switch to the
/// QEMU monitor (Ctrl-A c), dump every CPU's registers, then inject an NMI. The
/// guest's `unknown_nmi_panic` turns the NMI into a panic that prints the
/// backtraces of its CPUs (`panic_print`); `nokaslr` keeps the dumped addresses
/// comparable with the kernel's System.map. If even the monitor does not answer,
/// the emulator itself is stuck, not the guest kernel.
const STOPPED_DUMP: &[u8] = b"\x01cinfo registers -a\nnmi\n";

impl GuestHung {
    /// Whether the emulated machine stopped making progress, as opposed to a
    /// scenario that waited too long: the guest kernel reported a CPU stuck in the
    /// kernel (soft lockup) or an RCU stall, or its heartbeat stopped (every CPU
    /// stuck with interrupts off reports nothing: the emulated machine has no NMI
    /// watchdog).
    pub fn machine_stopped(&self) -> bool {
        self.kind != Hang::Timeout || stalled(&self.lines)
    }
}

/// Whether the guest kernel has reported a CPU that stopped: a soft lockup or a
/// self-detected RCU stall (none of these has ever recovered), or an RCU stall
/// detected on another CPU reported twice. That last one is what a vCPU that
/// stopped running leaves: the rest of the guest goes on, its heartbeat too, but
/// whatever waits for that CPU waits forever. A single report of it is not enough:
/// under emulation a starved vCPU's timer can fire 20 s late once, and the kernel
/// itself adds "(false positive?)" (seen once while a stack guest booted, in CI).
fn stalled<S: AsRef<str>>(lines: &[S]) -> bool {
    let mut detected = 0;
    for l in lines.iter().map(AsRef::as_ref) {
        match stall_report(l) {
            Some(StallReport::Stopped) => return true,
            Some(StallReport::OtherCpu) => detected += 1,
            None => {}
        }
    }
    detected >= 2
}

/// What a console line reports, for [`stalled`].
enum StallReport {
    /// A soft lockup or a self-detected RCU stall.
    Stopped,
    /// An RCU stall detected on another CPU.
    OtherCpu,
}

fn stall_report(line: &str) -> Option<StallReport> {
    if line.contains("soft lockup") || line.contains("rcu_preempt self-detected stall") {
        Some(StallReport::Stopped)
    } else if line.contains("rcu_preempt detected stalls") {
        Some(StallReport::OtherCpu)
    } else {
        None
    }
}

impl std::fmt::Display for GuestHung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the lab guest {} and was killed; last console line: {:?}",
            match self.kind {
                Hang::Silent => format!(
                    "printed nothing, heartbeat included, for {} s",
                    SILENCE_LIMIT.as_secs()
                ),
                Hang::NoInit => format!("did not reach its init within {} s", INIT_LIMIT.as_secs()),
                Hang::Timeout => format!("did not power off within {} s", self.timeout_s),
            },
            self.lines.last().map_or("(none)", String::as_str)
        )
    }
}

impl std::error::Error for GuestHung {}

/// Nodes, CPUs per node, memory per node.
pub const NODES: usize = 4;
pub const CPUS_PER_NODE: usize = 2;
pub const MIB_PER_NODE: usize = 2048;

/// SLIT distance between two nodes of the ring.
pub fn distance(a: usize, b: usize) -> u32 {
    let d = a.abs_diff(b);
    match d.min(NODES - d) {
        0 => 10,
        1 => 21,
        _ => 31,
    }
}

/// The qemu command line for a guest with `kernel` and `initrd`.
pub fn command(kernel: &Path, initrd: &Path, append_extra: &str) -> Command {
    command_sized(kernel, initrd, append_extra, MIB_PER_NODE)
}

/// [`command`] with `mib_per_node` of memory on each node instead of
/// [`MIB_PER_NODE`] (a scenario's `node_memory_mib`).
pub fn command_sized(
    kernel: &Path,
    initrd: &Path,
    append_extra: &str,
    mib_per_node: usize,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi"])
        // qemu's default CPU model plus 1 GiB pages (pdpe1gb), as every x86 server
        // CPU has them: without the flag the guest kernel registers no 1 GiB huge
        // page size at all.
        .args(["-cpu", "qemu64,pdpe1gb=on"])
        .args([
            "-smp",
            &format!(
                "{},sockets={NODES},cores={CPUS_PER_NODE}",
                NODES * CPUS_PER_NODE
            ),
        ])
        .args(["-m", &format!("{}M", NODES * mib_per_node)]);
    for n in 0..NODES {
        let first = n * CPUS_PER_NODE;
        cmd.args([
            "-object",
            &format!("memory-backend-ram,id=m{n},size={mib_per_node}M"),
            "-numa",
            &format!(
                "node,nodeid={n},cpus={first}-{},memdev=m{n}",
                first + CPUS_PER_NODE - 1
            ),
        ]);
    }
    for a in 0..NODES {
        for b in (a + 1)..NODES {
            cmd.args([
                "-numa",
                &format!("dist,src={a},dst={b},val={}", distance(a, b)),
            ]);
        }
    }
    cmd.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            // unknown_nmi_panic, panic_print (0x40: every CPU's backtrace) and
            // nokaslr: for the dump of a stopped guest, see STOPPED_DUMP.
            format!(
                "console=ttyS0 panic=-1 loglevel=4 nokaslr unknown_nmi_panic \
                 panic_print=0x40 {append_extra}"
            )
            .trim(),
            "-nographic",
            "-no-reboot",
        ]);
    cmd
}

/// Runs the guest interactively on this terminal (`--shell`).
pub fn interactive(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd.status().context("starting qemu-system-x86_64")?;
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(())
}

/// What a finished boot produced.
pub struct Boot {
    pub lines: Vec<String>,
    pub elapsed: Duration,
    /// Seconds from start until the guest's init ran.
    pub init_after: Option<Duration>,
}

/// Runs the guest, echoing each console line (`prefix` + line) unless `echo`
/// filters it, until qemu exits or `timeout` passes. A guest whose heartbeat
/// stops for [`SILENCE_LIMIT`] is asked for a dump ([`STOPPED_DUMP`]), given
/// [`DUMP_WAIT`] to print it, and killed.
pub fn run(
    mut cmd: Command,
    timeout: Duration,
    prefix: &str,
    echo: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Boot> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    let mut monitor = child.stdin.take();
    let deadline = start + timeout;
    let mut lines = Vec::new();
    let mut init_after = None;
    // Once the guest's init ran: when its last line (heartbeat included) came.
    let mut last_line: Option<Instant> = None;
    // When the heartbeat was found stopped and the dump asked for.
    let mut stopped_at: Option<Instant> = None;
    // A stall report (see `stalled`): the machine has stopped; it is asked for the
    // dump at once, waiting for the timeout only costs CI time.
    let mut stall_reported = false;
    // How the stop was found (a stall report is `Timeout` until the timeout).
    let mut stopped_kind = Hang::Timeout;
    // The harness printed its exit line: every result is in.
    let mut harness_exited = false;
    // A guest that finished its scenario but then stopped on its way down.
    let mut stopped_after_exit = false;
    loop {
        let now = Instant::now();
        let silent = last_line.is_some_and(|t| now.duration_since(t) >= SILENCE_LIMIT);
        let no_init = init_after.is_none() && now.duration_since(start) >= INIT_LIMIT;
        if silent && harness_exited {
            eprintln!(
                "{prefix}(the scenario ended but the guest printed nothing for {} s on its way down; stopped it)",
                SILENCE_LIMIT.as_secs()
            );
            let _ = child.kill();
            stopped_after_exit = true;
            break;
        }
        if stopped_at.is_none() && !harness_exited && (silent || no_init || stall_reported) {
            if silent {
                stopped_kind = Hang::Silent;
                eprintln!(
                    "{prefix}(no line for {} s: asking the stopped machine for its registers and an NMI backtrace)",
                    SILENCE_LIMIT.as_secs()
                );
            } else if no_init {
                stopped_kind = Hang::NoInit;
                eprintln!(
                    "{prefix}(no init after {} s: asking the machine for its registers and an NMI backtrace)",
                    INIT_LIMIT.as_secs()
                );
            } else {
                eprintln!(
                    "{prefix}(a stalled CPU reported: asking the machine for its registers and an NMI backtrace)"
                );
            }
            stopped_at = Some(now);
            if let Some(m) = monitor.as_mut() {
                use std::io::Write;
                let _ = m.write_all(STOPPED_DUMP).and_then(|()| m.flush());
            }
        }
        let dump_over = stopped_at.is_some_and(|t| now.duration_since(t) >= DUMP_WAIT);
        if now >= deadline || dump_over {
            let _ = child.kill();
            let _ = child.wait();
            return Err(GuestHung {
                timeout_s: timeout.as_secs(),
                lines,
                kind: stopped_kind,
            }
            .into());
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(500))) {
            Ok(line) => {
                if init_after.is_none() && line.contains("@@VMBLAB-INIT@@") {
                    init_after = Some(start.elapsed());
                }
                if init_after.is_some() {
                    last_line = Some(Instant::now());
                }
                // A heartbeat is a line of its own (one write to the console);
                // the mark is taken out of any other line all the same.
                let line = if line.contains(ALIVE_MARK) {
                    line.replace(ALIVE_MARK, "")
                } else {
                    line
                };
                if line.trim().is_empty() {
                    continue;
                }
                harness_exited |= line.contains("@@VMBLAB-EXIT@@");
                let stall_line = stall_report(&line).is_some();
                if let Some(shown) = echo(&line) {
                    eprintln!("{prefix}{shown}");
                }
                lines.push(line);
                if stall_line {
                    stall_reported = stalled(&lines);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(monitor);
    let status = child.wait().context("waiting for qemu")?;
    if stopped_after_exit {
        return Ok(Boot {
            lines,
            elapsed: start.elapsed(),
            init_after,
        });
    }
    if stopped_at.is_some() {
        // It answered the NMI with a panic, and -no-reboot ended qemu.
        return Err(GuestHung {
            timeout_s: timeout.as_secs(),
            lines,
            kind: stopped_kind,
        }
        .into());
    }
    if !status.success() {
        return Err(exit_error(status, lines));
    }
    Ok(Boot {
        lines,
        elapsed: start.elapsed(),
        init_after,
    })
}

/// QEMU itself died from a signal (a failed assertion, a crash): the emulator
/// failed, not the guest kernel, vmbalancer or the scenario.
#[derive(Debug)]
pub struct EmulatorCrashed {
    pub signal: i32,
    pub lines: Vec<String>,
}

impl std::fmt::Display for EmulatorCrashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // QEMU's own message (an assertion's) is the last line it printed with
        // its `qemu:` prefix, if any.
        let own = self.lines.iter().rev().find(|l| l.starts_with("qemu:"));
        write!(
            f,
            "qemu died from signal {}; its last words: {:?}; last console line: {:?}",
            self.signal,
            own,
            self.lines.last()
        )
    }
}

impl std::error::Error for EmulatorCrashed {}

/// The error for a qemu that ended unsuccessfully: [`EmulatorCrashed`] when a
/// signal ended it, else its exit status.
fn exit_error(status: std::process::ExitStatus, lines: Vec<String>) -> anyhow::Error {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(signal) => EmulatorCrashed { signal, lines }.into(),
        None => anyhow::anyhow!(
            "qemu exited with {status}; last console line: {:?}",
            lines.last()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_distances() {
        assert_eq!(distance(0, 0), 10);
        assert_eq!(distance(0, 1), 21);
        assert_eq!(distance(0, 3), 21);
        assert_eq!(distance(0, 2), 31);
        assert_eq!(distance(1, 3), 31);
    }

    #[test]
    fn command_has_four_nodes() {
        let cmd = command(Path::new("k"), Path::new("i"), "");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("node,nodeid="))
                .count(),
            4
        );
        assert!(args.contains(&"dist,src=0,dst=2,val=31".to_string()));
        assert!(args.contains(&"tcg,thread=multi".to_string()));
    }

    #[test]
    fn a_qemu_ended_by_a_signal_is_an_emulator_crash() {
        use std::os::unix::process::ExitStatusExt;
        let lines = vec![
            "qemu: qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: \
             Assertion failed."
                .to_string(),
            "Probing EDD (edd=off to disable)... ok".to_string(),
        ];
        // A raw wait status of 6: killed by SIGABRT.
        let e = exit_error(std::process::ExitStatus::from_raw(6), lines.clone());
        let crashed = e.downcast_ref::<EmulatorCrashed>().expect("a crash");
        assert_eq!(crashed.signal, 6);
        assert!(e.to_string().contains("iotlb_to_section"), "{e}");
        // Exit code 1: qemu refused something (a bad argument), not a crash.
        let e = exit_error(std::process::ExitStatus::from_raw(1 << 8), lines);
        assert!(e.downcast_ref::<EmulatorCrashed>().is_none());
    }

    #[test]
    fn a_stalled_kernel_is_told_from_a_slow_scenario() {
        let hung = |lines: &[&str]| GuestHung {
            timeout_s: 1,
            lines: lines.iter().map(|l| l.to_string()).collect(),
            kind: Hang::Timeout,
        };
        assert!(
            hung(&["[  121.2] watchdog: BUG: soft lockup - CPU#6 stuck for 44s! [x:1]"])
                .machine_stopped()
        );
        assert!(
            hung(&["[   94.6] rcu: INFO: rcu_preempt self-detected stall on CPU"])
                .machine_stopped()
        );
        let detected = "[   46.4] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:";
        assert!(!hung(&[detected, "t= 30.0s locality mean 0.9"]).machine_stopped());
        assert!(hung(&[detected, "(no progress)", detected]).machine_stopped());
        assert!(!hung(&["t= 30.0s locality mean 0.9", "(still sampling)"]).machine_stopped());
        assert!(hung(&[]).to_string().contains("(none)"));
        let silent = GuestHung {
            kind: Hang::Silent,
            ..hung(&["t=  6.0s locality mean 1.000"])
        };
        assert!(silent.machine_stopped());
        assert!(silent.to_string().contains("heartbeat included, for 90 s"));
        let no_init = GuestHung {
            kind: Hang::NoInit,
            ..hung(&["Booting from ROM..."])
        };
        assert!(no_init.machine_stopped());
        assert!(
            no_init
                .to_string()
                .contains("did not reach its init within 300 s")
        );
    }
}
