//! `vmbalancer advise -w NCPUS[:MB]`: numad-compatible placement advice.
//!
//! Prints a node list (`2-3,6`) on stdout, as `numad -w` does for libvirt's
//! `placement='auto'`. The running daemon answers from its current view, counting
//! the answers it gave in the last minute as used room (VMs started together are
//! spread); when it is not running, a fresh look at the nodes (free memory, CPU load
//! sampled over 200 ms) is taken here, which knows nothing of earlier answers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::daemon::advice::{self, Params, Request};
use crate::daemon::config::Config;
use crate::daemon::control::{self, ClientError, Response};
use crate::host::linux::cpu_load as hostview;
use crate::host::linux::topology;
use crate::model::Snapshot;

/// Arguments of `vmbalancer advise`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the new VM needs: NCPUS[:MB] (numad -w).
    #[arg(short = 'w', long = "want", value_name = "NCPUS[:MB]")]
    pub want: String,
    /// Configuration file (runtime directory, utilisation target, reserved CPUs).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Control socket [default: RUNTIME_DIR/control.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Do not ask the daemon; look at the host directly (earlier answers are not
    /// counted).
    #[arg(long)]
    pub local: bool,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let req = Request::parse(&args.want)?;
    let cfg = Config::load(args.config.as_deref())?;
    let path = args
        .socket
        .clone()
        .unwrap_or_else(|| cfg.control_socket_path());
    if !args.local {
        let ask = control::Request::Advise {
            cpus: req.cpus,
            mem_mb: req.mem_bytes >> 20,
        };
        match control::request(&path, &ask, Duration::from_secs(5)) {
            Ok(Response::Advice { nodes }) => {
                println!("{nodes}");
                return Ok(());
            }
            Ok(Response::Error { error }) if error.starts_with("permission denied") => {
                tracing::warn!(%error, "the daemon refused, looking directly")
            }
            Ok(other) => tracing::debug!(?other, "daemon gave no advice, looking directly"),
            Err(ClientError::NotRunning(_)) => {
                tracing::debug!("daemon not running, looking directly")
            }
            Err(e) => tracing::debug!(error = %e, "daemon unreachable, looking directly"),
        }
    }
    let topology =
        topology::read_topology(&super::run::host_paths(&cfg)).context("reading the NUMA nodes")?;
    let busy = hostview::busy_cpus_per_node(&cfg.proc_root, &topology, Duration::from_millis(200))
        .context("sampling CPU load")?;
    let snapshot = Snapshot {
        topology,
        ..Default::default()
    };
    let params = Params {
        target_utilisation_pct: cfg.target_utilisation_pct,
        headroom_bytes: cfg.memory_headroom_bytes,
        reserved_cpus: cfg.reserved_cpus.clone(),
    };
    // Alone, nothing remembers earlier answers: VMs started together may all get the
    // same node until their load shows. The daemon holds its answers (advice::HOLD).
    let nodes = advice::advise(&snapshot, &req, &busy, &[], &params);
    anyhow::ensure!(
        !nodes.is_empty(),
        "no NUMA node found under {}",
        cfg.sys_root.display()
    );
    println!("{nodes}");
    Ok(())
}
