//! The daemon's tick loop with the real Linux applier on one VM, SIGKILLed at a
//! chosen phase of a move: the fault matrix's crash in each phase
//! (`tests/fault_matrix.rs`). Starts as the daemon starts (journal, recovery), plays
//! one action, then shuts down as on SIGTERM (restoring the VM), unless killed first.
//!
//! Usage: `fault_daemon STATE_DIR SYS_ROOT PHASE PID TID0 TID1 ACTION`, where PHASE
//! is `adopt`, `begin`, `applied`, `moving`, `restore` or `never`
//! ([`Phase`]) and ACTION is `none`, `cpus:LIST` or `mem:ADDR:LEN` (node 0 to
//! node 1). SYS_ROOT is the applier's sysfs (a copy where node 1 exists lets a memory
//! move start on a one-node host). Prints `finished` when not killed.
//!
//! `fault_daemon tracefs`: tracefs unmounted under loaded eBPF programs, in a mount
//! namespace of this process only (the host's tracefs stays): loads the programs,
//! tracks a spinning thread, unmounts tracefs, and prints `before NS`, `after NS`
//! (run time the programs counted for the thread before and after the unmount) and
//! `reloaded` once the programs load again with tracefs unmounted (as a restarted
//! daemon would).

use std::path::PathBuf;

use anyhow::{Context, bail};
use balancer::daemon::run::Shutdown;
use balancer::host::linux::actuate::{ApplierConfig, LinuxApplier};
use vmbalancer_tests::fault::{self, KillAt, Phase, Script};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "tracefs") {
        return tracefs_unmounted();
    }
    let [state, sys_root, phase, pid, tid0, tid1, action] = &args[..] else {
        bail!("usage: fault_daemon STATE_DIR SYS_ROOT PHASE PID TID0 TID1 ACTION");
    };
    let state = PathBuf::from(state);
    let phase: Phase = phase.parse().map_err(anyhow::Error::msg)?;
    let pid: u32 = pid.parse().context("PID")?;
    let tids: Vec<u32> = [tid0, tid1]
        .iter()
        .map(|t| t.parse().context("TID"))
        .collect::<anyhow::Result<_>>()?;
    let actions = match action.split(':').collect::<Vec<_>>()[..] {
        ["none"] => vec![],
        ["cpus", list] => vec![fault::set_cpus(pid, list)],
        ["mem", addr, len] => vec![fault::move_memory(pid, addr.parse()?, len.parse()?)],
        _ => bail!("unknown action {action:?}"),
    };
    let applier = LinuxApplier::new(ApplierConfig {
        sys_root: PathBuf::from(sys_root),
        headroom_bytes: 0,
        // Many small batches: the move runs long enough to be killed in the middle.
        batch_pages: 16,
        migration_threads: 1,
        ..ApplierConfig::default()
    });
    let mut d = fault::daemon(
        fault::config(&state),
        fault::vm_snapshot(pid, &tids, None),
        KillAt {
            inner: applier,
            phase,
        },
        Script::actions(actions),
        Shutdown::new(),
    );
    let recovered = d.recover()?;
    eprintln!("fault_daemon: recovered {recovered:?}");
    d.begin();
    for _ in 0..3 {
        d.tick();
    }
    d.finish();
    println!("finished");
    Ok(())
}

/// See the module doc.
fn tracefs_unmounted() -> anyhow::Result<()> {
    use balancer::host::linux::{EbpfTelemetry, TelemetrySource, TrackedVm};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    // Still one thread: a mount namespace of our own, not propagated to the host.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare")?;
    let sh = |args: &[&str]| -> anyhow::Result<()> {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()?;
        anyhow::ensure!(st.success(), "{args:?}: {st}");
        Ok(())
    };
    sh(&["mount", "--make-rprivate", "/"])?;
    let telemetry = balancer::telemetry::Telemetry::load().context("loading the programs")?;
    let mut source = EbpfTelemetry::new(telemetry);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let spinner = std::thread::spawn(move || {
        let _ = tx.send(nix::unistd::gettid().as_raw() as u32);
        fault::spin_until(&s);
    });
    let vcpu = rx.recv()?;
    source.track(&[TrackedVm {
        pid: std::process::id(),
        vcpus: vec![(0, vcpu)],
        other_threads: vec![],
    }]);
    let mut run_ns = || {
        let mut snap = fault::vm_snapshot(std::process::id(), &[vcpu], None);
        snap.now_ns = vmbalancer_tests::clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
        source.fill(&mut snap, &Default::default());
        snap.vms[0].vcpus[0]
            .telemetry
            .run_ns_per_node
            .iter()
            .sum::<u64>()
    };
    std::thread::sleep(Duration::from_millis(300));
    println!("before {}", run_ns());
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        while std::path::Path::new(dir).join("trace").exists() {
            sh(&["umount", "-l", dir])?;
        }
    }
    println!("unmounted");
    std::thread::sleep(Duration::from_millis(300));
    println!("after {}", run_ns());
    stop.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    // A daemon started now finds no tracefs: the loader mounts it.
    balancer::telemetry::Telemetry::load().context("loading without tracefs")?;
    println!("reloaded");
    Ok(())
}
