//! `vmbalancer trace`: the host as the balancer sees it, changing nothing.
//!
//! Trace runs the same observer as the daemon ([`LinuxObserver`]) and no applier at all
//! (it is the log-only mode without even a plan): it only reads procfs, sysfs and
//! cgroupfs, and the eBPF maps when telemetry is available. Every `--interval` it
//! prints, per VM, its guest memory per node (like `numastat -c qemu-kvm`), CPU use,
//! locality, where each vCPU runs, and from telemetry the remote-fault share, the
//! cross-node migrations per second and the hottest regions; node totals in a footer;
//! then warnings in plain words. Without telemetry it says why and shows the rest.
//!
//! Options: `--features` prints which program type and hook runs each eBPF feature on
//! this kernel and why the kernel refused the others, then exits; `--once` samples for `--interval` seconds, prints one report and exits;
//! `--json` prints one JSON object per interval on one line; `--vm NAME|PID` (repeat
//! for several) keeps only those VMs; `--root DIR` reads a fixture tree holding
//! `proc/`, `sys/` and `cgroup/` instead of the live host; `--state-dir DIR` names the
//! daemon's state directory, whose journal tells which VMs the daemon placed (their
//! narrowed CPU sets are the daemon's, not an operator's pins).
//!
//! # JSON schema (version 1)
//!
//! One object per line. Byte counts are bytes; `*_pct` are percentages (0-100, CPU use
//! 100 = one CPU); arrays named `*_per_node` are aligned with `nodes`. Fields that only
//! eBPF telemetry can fill are `null` when it is unavailable.
//!
//! ```text
//! {
//!   "schema": 1,
//!   "time_unix_ms": u64,
//!   "interval_s": f64,                 // time between the two observations compared
//!   "telemetry": { "available": bool, "reason": string|null,
//!                  "features": [ { "name": string, "available": bool,
//!                                  "reason": string|null, "ns_per_event": f64|null,
//!                                  "path": string|null,   // e.g. "tp_btf sched_switch"
//!                                  "refused": [ { "path": string, "reason": string } ] } ] },
//!   "discovery": { "new_process_detection": "proc connector"|"rescan",
//!                  "rescan_reason": string|null,
//!                  "counters": { "observations", "full_scans", "proc_events",
//!                                "proc_event_overflows", "wakes", "vms_found",
//!                                "vms_exited", "vms_skipped", "vanished_mid_read",
//!                                "numa_maps_reads", "numa_maps_read_ns_total",
//!                                "memory_probe_changes", "quiet_reads": u64 } },
//!   "settings": { "numa_balancing": bool, "ksm_running": bool,
//!                 "ksm_merge_across_nodes": bool, "ksm_pages_sharing": u64 },
//!   "nodes": [ { "id": u32, "cpus": "0-3,8", "mem_total_bytes": u64,
//!                "mem_free_bytes": u64, "file_bytes": u64,
//!                "hugepages": [ { "page_size_bytes", "total_pages", "free_pages" } ],
//!                "vm_bytes": u64,        // guest RAM of the listed VMs on the node
//!                "vcpus": u32 } ],       // listed vCPUs that last ran on the node
//!   "vms": [ {
//!     "pid": u32, "name": string,
//!     "pinning": "none"|"operator"|"excluded", "pinning_reason": string|null,
//!     "cgroup": string|null,            // the VM's own group (libvirt scope)
//!     "backing": "anonymous"|"memfd"|"file"|"hugetlb-<size>kB",
//!     "configured_bytes": u64,          // -m
//!     "memory_bytes_per_node": [u64],   // guest RAM resident per node (numa_maps)
//!     "memory_bytes": u64,
//!     "overhead_bytes_per_node": [u64], // the rest of the process's resident memory
//!     "own_overhead_bytes_per_node": [u64], // its anonymous part (stacks, heap)
//!     "memory_age_s": f64,              // numa_maps is read at a bounded rate
//!     "cpu_pct": f64,                   // all threads, from /proc stat deltas
//!     "locality_pct": f64|null,         // guest RAM on the nodes the vCPUs ran on
//!     "remote_fault_pct": f64|null,     // telemetry: remote NUMA hinting faults
//!     "cross_node_migrations_per_s": f64|null, "migrations_per_s": f64|null,
//!     "kernel_numa_moves_per_s": f64|null,
//!     "vcpus": [ { "index": u32, "tid": u32, "cpu": u32|null, "node": u32|null,
//!                  "affinity": "0-7", "cpu_pct": f64,
//!                  "run_pct_per_node": [f64]|null, "run_ns_total": u64|null,
//!                  "migrations": u64|null, "cross_node_migrations": u64|null } ],
//!     "vcpus_found_by": "thread names"|"qmp"|"unknown", // unknown: `vcpus` is empty
//!     "vcpus_found_detail": string|null, // the QMP socket, or why they are unknown
//!     "memory_not_movable": string|null, // why guest memory is never migrated
//!     "other_threads": [u32],
//!     "hot_regions": [ { "start_addr": "0x7f..", "len_bytes": u64, "node": u32,
//!                        "heat": f64 } ],   // hottest first, at most 5
//!     "ksm_merging_pages": u64|null,    // pages KSM merged (/proc/PID/ksm_merging_pages)
//!     "ksm_partners": [ { "pid": u32, "name": string, "pages": u64 } ] // sampled
//!   } ],
//!   "warnings": [ { "kind": "memory_remote_from_vcpus"|"autonuma_with_pinning"|
//!                           "ksm_across_nodes"|"vm_wider_than_node"|
//!                           "vcpus_unknown"|"memory_not_movable",
//!                   "vm": u32|null, "message": string } ]
//! }
//! ```

mod render;
mod report;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::host::Observer;
use crate::host::linux::{
    HostPaths, LinuxObserver, NoTelemetry, ObserverConfig, TelemetrySource, ebpf_source,
};

/// Arguments of `vmbalancer trace`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds between two reports (and the sampling time of `--once`).
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// Sample for one interval, print one report and exit.
    #[arg(long)]
    pub once: bool,
    /// Print one JSON object per interval (schema in the module documentation).
    #[arg(long)]
    pub json: bool,
    /// Print the eBPF feature matrix (each feature's active path and the paths this
    /// kernel refused, with its reasons) and exit; with `--json`, as one JSON object.
    #[arg(long)]
    pub features: bool,
    /// Show only this VM (name or qemu pid); repeat for several.
    #[arg(long = "vm", value_name = "NAME|PID")]
    pub vms: Vec<String>,
    /// Read a captured tree holding proc/, sys/ and cgroup/ instead of the live host.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The daemon's state directory, whose journal names the VMs it placed (default:
    /// `state_dir` of the daemon's configuration; none with `--root`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Tells the observer which VMs the daemon placed: their narrowed CPU sets are the
/// daemon's, not an operator's pins. A VM counts only while its process is the one
/// the daemon adopted (same start time).
fn note_daemon_placements(observer: &mut LinuxObserver, state_dir: &Path) -> anyhow::Result<()> {
    let held =
        crate::daemon::journal::Journal::held(state_dir).context("reading the daemon's journal")?;
    let proc = observer.paths().proc.clone();
    observer.set_managed(
        held.into_iter()
            .map(|o| (o.vm, o.start_time_ticks))
            .filter(|&(pid, start)| {
                crate::host::linux::procfs::read_stat(&proc, pid)
                    .is_ok_and(|s| s.starttime_ticks == start)
            })
            .map(|(pid, _)| pid),
    );
    Ok(())
}

/// The daemon's state directory whose journal trace reads: `--state-dir`, else the
/// daemon's configured one on the live host; none for a captured tree (`--root`).
/// Resolved once: the configuration is not read again every interval.
fn daemon_state_dir(args: &Args) -> anyhow::Result<Option<PathBuf>> {
    Ok(match (&args.state_dir, &args.root) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(
            crate::daemon::config::Config::load(None)
                .context("reading the daemon's configuration for its state directory")?
                .state_dir,
        ),
    })
}

/// The telemetry trace reads: the eBPF programs on the live host, or the reason they
/// cannot load; a captured tree (`--root`) has no programs to read.
fn open_telemetry(root: Option<&std::path::Path>) -> Box<dyn TelemetrySource> {
    match root {
        Some(root) => Box::new(NoTelemetry::new(format!(
            "reading the captured tree {}: no live eBPF programs",
            root.display()
        ))),
        None => ebpf_source::load_or_explain(),
    }
}

pub fn main(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.interval.is_finite() && (0.0..=86_400.0).contains(&args.interval),
        "--interval must be a number of seconds between 0 and 86400"
    );
    if args.features {
        let status = open_telemetry(args.root.as_deref()).status();
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer(&mut out, &status)?;
            writeln!(out)?;
        } else {
            write!(out, "{}", render::features(&status))?;
        }
        return Ok(());
    }
    let paths = match &args.root {
        Some(root) => HostPaths::under(root),
        None => HostPaths::system(),
    };
    // Trace changes nothing: no soft-dirty clearing, so resident memory's heat is
    // what the eBPF fault programs saw. It shows what each VM did over the interval,
    // so every VM is read in full, idle or not.
    let observer_cfg = ObserverConfig {
        write_heat: false,
        quiet_vms: false,
        ..ObserverConfig::default()
    };
    let mut observer = LinuxObserver::new(paths, observer_cfg)
        .context("reading the host topology")?
        .with_telemetry(open_telemetry(args.root.as_deref()));
    let state_dir = daemon_state_dir(&args)?;
    if let Some(dir) = &state_dir {
        note_daemon_placements(&mut observer, dir)?;
    }
    let mut prev = observer.observe().context("observing the host")?;
    let live_table = !args.json && !args.once && std::io::stdout().is_terminal();
    loop {
        std::thread::sleep(Duration::from_secs_f64(args.interval));
        if let Some(dir) = &state_dir {
            note_daemon_placements(&mut observer, dir)?;
        }
        let cur = observer.observe().context("observing the host")?;
        let report = report::build(
            Some(&prev),
            &cur,
            report::ReportContext {
                time_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                telemetry: observer.telemetry_status(),
                rescan_reason: observer.proc_events_unavailable(),
                counters: observer.counters().clone(),
                filters: &args.vms,
            },
        );
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        } else {
            if live_table {
                // Clear the screen and go home: a refreshing table.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{}", render::render(&report))?;
        }
        out.flush()?;
        if args.once {
            return Ok(());
        }
        prev = cur;
    }
}
