//! `vmbalancer run`: loads the configuration (file, then flags), builds the host
//! boundary and runs the daemon until SIGTERM/SIGINT.

use std::path::PathBuf;

use anyhow::Context;

use crate::daemon::config::{Config, Overrides, PinnedVms, VmSelector};
use crate::daemon::journal::Journal;
use crate::daemon::notify::{self, Notifier};
use crate::daemon::policy::EnginePolicy;
use crate::daemon::run::{Daemon, Shutdown, run};
use crate::host::linux::actuate::{ApplierConfig, LinuxApplier};
use crate::host::linux::telemetry_deferred::DeferredTelemetry;
use crate::host::linux::{HostPaths, LinuxObserver, ObserverConfig, ebpf_source};
use crate::host::logonly::LogOnly;
use crate::model::CpuSet;

/// Arguments of `vmbalancer run`. Flags override the configuration file.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Configuration file [default: /etc/vmbalancer/config.toml, if it exists].
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Log the plan, change nothing on the host (no journal, no CPU or page moves).
    #[arg(long)]
    pub dry_run: bool,
    /// Tick interval in milliseconds.
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Target CPU utilisation of a node, percent (numad -u).
    #[arg(long, short = 'u')]
    pub target_utilisation_pct: Option<u32>,
    /// Target memory locality, percent (numad -m).
    #[arg(long, short = 'm')]
    pub target_locality_pct: Option<u32>,
    /// Balance only this VM (pid or name pattern); repeatable. Replaces the file's list.
    #[arg(long = "include", short = 'p', value_parser = parse_selector)]
    pub include: Vec<VmSelector>,
    /// Never touch this VM (pid or name pattern); repeatable. Added to the file's list.
    #[arg(long = "exclude", short = 'x', value_parser = parse_selector)]
    pub exclude: Vec<VmSelector>,
    /// CPUs never given to VMs, e.g. `0,8-9` (numad -R).
    #[arg(long, short = 'R', value_parser = CpuSet::parse_list)]
    pub reserved_cpus: Option<CpuSet>,
    /// Page migration limit in bytes per second.
    #[arg(long)]
    pub migration_rate_limit_bytes_per_s: Option<u64>,
    /// Probation window of CPU-first moves, milliseconds.
    #[arg(long)]
    pub probation_window_ms: Option<u64>,
    /// Operator-pinned VMs: `leave` or `balance`.
    #[arg(long, value_parser = parse_pinned)]
    pub pinned_vms: Option<PinnedVms>,
    /// Restore original CPU sets on exit (`true`/`false`).
    #[arg(long)]
    pub restore_on_exit: Option<bool>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Prometheus endpoint on a loopback address, e.g. `127.0.0.1:9767`.
    #[arg(long)]
    pub prometheus_listen: Option<String>,
}

/// A flag value that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    #[error("empty VM selector")]
    EmptySelector,
    #[error("{0:?}: expected `leave` or `balance`")]
    PinnedVms(String),
}

/// A number is a pid, anything else a name pattern.
pub fn parse_selector(s: &str) -> Result<VmSelector, ArgError> {
    if s.is_empty() {
        return Err(ArgError::EmptySelector);
    }
    Ok(match s.parse::<u32>() {
        Ok(pid) => VmSelector::Pid(pid),
        Err(_) => VmSelector::Name(s.to_string()),
    })
}

fn parse_pinned(s: &str) -> Result<PinnedVms, ArgError> {
    match s {
        "leave" => Ok(PinnedVms::Leave),
        "balance" => Ok(PinnedVms::Balance),
        _ => Err(ArgError::PinnedVms(s.to_owned())),
    }
}

impl Args {
    /// The configuration file with these flags applied.
    pub fn config(&self) -> anyhow::Result<Config> {
        let cfg = Config::load(self.config.as_deref())?;
        Ok(cfg.apply(self.overrides())?)
    }

    /// The flags that override the file.
    fn overrides(&self) -> Overrides {
        Overrides {
            tick_ms: self.tick_ms,
            target_utilisation_pct: self.target_utilisation_pct,
            target_locality_pct: self.target_locality_pct,
            include_vms: self.include.clone(),
            exclude_vms: self.exclude.clone(),
            reserved_cpus: self.reserved_cpus.clone(),
            migration_rate_limit_bytes_per_s: self.migration_rate_limit_bytes_per_s,
            probation_window_ms: self.probation_window_ms,
            pinned_vms: self.pinned_vms,
            restore_on_exit: self.restore_on_exit,
            state_dir: self.state_dir.clone(),
            runtime_dir: self.runtime_dir.clone(),
            prometheus_listen: self.prometheus_listen.clone(),
        }
    }
}

pub fn main(args: Args) -> anyhow::Result<()> {
    // Nothing on the host changes before the configuration is valid.
    let cfg = args.config()?;
    tracing::info!(dry_run = args.dry_run, tick_ms = cfg.tick_ms, "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let shutdown = Shutdown::new();
    let observer_cfg = ObserverConfig {
        write_heat: cfg.write_heat_sampling,
        locality_target_pct: cfg.target_locality_pct,
        ..ObserverConfig::default()
    };
    let observer = LinuxObserver::new(host_paths(&cfg), observer_cfg)
        .context("observing the host")?
        // Balancing starts from procfs at once; the programs join when loaded.
        .with_telemetry(Box::new(DeferredTelemetry::spawn(
            ebpf_source::load_or_explain,
        )));
    let policy = EnginePolicy::new(&cfg);
    // The only place the daemon reads systemd's environment.
    let notifier = Notifier::from_env();
    let watchdog_every = notify::watchdog_interval();
    if args.dry_run {
        let d = Daemon::new(
            cfg,
            observer,
            LogOnly::default(),
            policy,
            None,
            shutdown,
            true,
        )
        .with_notify(notifier, watchdog_every)
        .with_reload(reader(args.clone()));
        rt.block_on(run(d))?;
    } else {
        let journal = Journal::open(&cfg.state_dir)?;
        let cfg_nice = cfg.migration_nice;
        let applier = LinuxApplier::new(applier_config(&cfg)).with_cancel(shutdown.flag());
        let progress = applier.progress_handle();
        let d = Daemon::new(
            cfg,
            observer,
            applier,
            policy,
            Some(journal),
            shutdown,
            false,
        )
        .with_notify(notifier, watchdog_every)
        .with_loop_nice(cfg_nice)
        .with_progress(progress)
        .with_reload(reader(args.clone()));
        rt.block_on(run(d))?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reads the configuration again as at start: the same file, the same flags on top.
fn reader(args: Args) -> crate::daemon::run::Reloader {
    Box::new(move || {
        let cfg = Config::load(args.config.as_deref())?;
        cfg.apply(args.overrides())
    })
}

/// The applier's settings from the daemon's configuration.
pub fn applier_config(cfg: &Config) -> ApplierConfig {
    ApplierConfig {
        proc_root: cfg.proc_root.clone(),
        sys_root: cfg.sys_root.clone(),
        cgroup_root: cfg.cgroup_root.clone(),
        rate_limit_bytes_per_s: cfg.migration_rate_limit_bytes_per_s,
        batch_pages: cfg.migration_batch_pages,
        migration_threads: cfg.migration_threads,
        migration_nice: cfg.migration_nice,
        headroom_bytes: cfg.memory_headroom_bytes,
        reserved_cpus: cfg.reserved_cpus.clone(),
    }
}

/// Where the observer reads the host, from the daemon's configuration.
pub fn host_paths(cfg: &Config) -> HostPaths {
    HostPaths {
        proc: cfg.proc_root.clone(),
        sys: cfg.sys_root.clone(),
        cgroup: cfg.cgroup_root.clone(),
        libvirt: cfg.libvirt_status_dir.clone(),
    }
}
