//! Loading: checks what the kernel and the process can do, reads tracepoint layouts,
//! loads the embedded eBPF object, fills the configuration maps and attaches the
//! programs. Every failure is one [`TelemetryError`] line naming what is missing,
//! checked in the order an operator would fix them: privileges, kernel version, BTF,
//! tracefs, then the individual hooks.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::TracePoint,
};
use balancer_common::{
    MAX_CPUS, MigrationCounts, SCHED_MIGRATE_LAYOUT_SYMBOL, SchedMigrateLayout, TrackedThread,
    names,
};

use super::{
    Feature, FeatureState, ProgramCost, TelemetryError, ThreadTelemetry, topology, tracefs::Tracefs,
};

/// The eBPF object built by `balancer/build.rs`, embedded in the binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer-ebpf.o"));

/// Oldest kernel supported: CAP_BPF, fentry and BPF global data all exist from 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// Where loading looks for the kernel's interfaces.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// sysfs root (for `devices/system/node`); `/sys` on a real host.
    pub sys_root: PathBuf,
    /// procfs root (for the kernel version and capabilities); `/proc` on a real host.
    pub proc_root: PathBuf,
    /// Kernel BTF.
    pub btf_path: PathBuf,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
        }
    }
}

/// The loaded and attached eBPF programs and their maps.
///
/// Dropping it detaches and unloads everything.
pub struct Telemetry {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    features: Vec<(Feature, FeatureState)>,
    /// Keeps `kernel.bpf_stats_enabled` on while we live (None if the kernel refused).
    _stats: Option<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Loads and attaches every program the running kernel supports.
    pub fn load() -> Result<Self, TelemetryError> {
        Self::load_with(&LoadOptions::default())
    }

    pub fn load_with(opts: &LoadOptions) -> Result<Self, TelemetryError> {
        check_privileges(&opts.proc_root)?;
        check_kernel_version(&opts.proc_root)?;
        let btf =
            aya::Btf::parse_file(&opts.btf_path, aya::Endianness::default()).map_err(|e| {
                TelemetryError::NoBtf {
                    path: opts.btf_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let tracefs = Tracefs::find_or_mount()?;
        raise_memlock_limit();

        let migrate = tracefs.format("sched", "sched_migrate_task")?;
        let bad = |reason: String| TelemetryError::BadFormat {
            path: tracefs.format_path("sched", "sched_migrate_task"),
            reason,
        };
        let layout = SchedMigrateLayout {
            pid_offset: migrate.offset_of("pid", 4).map_err(bad)?,
            orig_cpu_offset: migrate.offset_of("orig_cpu", 4).map_err(bad)?,
            dest_cpu_offset: migrate.offset_of("dest_cpu", 4).map_err(bad)?,
            valid: 1,
        };

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(SCHED_MIGRATE_LAYOUT_SYMBOL, &layout, true)
            .load(EBPF_OBJECT)
            .map_err(|e| classify_load_error(&e.to_string()))?;

        fill_cpu_nodes(&mut ebpf, &opts.sys_root)?;

        let mut features = Vec::new();
        let state = attach_tracepoint(
            &mut ebpf,
            "sched_migrate_task",
            "sched",
            "sched_migrate_task",
        )?;
        features.push((Feature::Migrations, state));

        // After loading: initialised before, aya-log breaks program loading.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "eBPF log channel not available");
                None
            }
        };
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "cannot enable BPF run-time statistics; cost() will read zeroes");
                None
            }
        };
        for (feature, state) in &features {
            tracing::info!(feature = feature.name(), state = ?state, "eBPF telemetry feature");
        }
        Ok(Self {
            ebpf,
            logger,
            features,
            _stats: stats,
        })
    }

    /// Starts watching thread `tid`.
    pub fn track(&mut self, tid: u32, thread: TrackedThread) -> Result<(), TelemetryError> {
        let map = self
            .ebpf
            .map_mut(names::TRACKED)
            .ok_or_else(|| TelemetryError::map(names::TRACKED, "missing from the object"))?;
        let mut map: HashMap<_, u32, TrackedThread> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        map.insert(tid, thread, 0)
            .map_err(|e| TelemetryError::map(names::TRACKED, e))
    }

    /// Stops watching thread `tid` and forgets its counters. Unknown tids are fine.
    pub fn untrack(&mut self, tid: u32) -> Result<(), TelemetryError> {
        remove_key::<TrackedThread>(&mut self.ebpf, names::TRACKED, tid)?;
        remove_key::<MigrationCounts>(&mut self.ebpf, names::MIGRATIONS, tid)
    }

    /// Tracked thread ids, in no particular order.
    pub fn tracked(&self) -> Result<Vec<u32>, TelemetryError> {
        let map = self
            .ebpf
            .map(names::TRACKED)
            .ok_or_else(|| TelemetryError::map(names::TRACKED, "missing from the object"))?;
        let map: HashMap<_, u32, TrackedThread> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        map.keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TelemetryError::map(names::TRACKED, e))
    }

    /// Everything the programs counted for thread `tid` since it was tracked
    /// (zeroes when nothing happened yet or the thread is not tracked).
    pub fn read_thread(&self, tid: u32) -> Result<ThreadTelemetry, TelemetryError> {
        let map = self
            .ebpf
            .map(names::MIGRATIONS)
            .ok_or_else(|| TelemetryError::map(names::MIGRATIONS, "missing from the object"))?;
        let map: HashMap<_, u32, MigrationCounts> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(names::MIGRATIONS, e))?;
        let counts = match map.get(&tid, 0) {
            Ok(c) => c,
            Err(aya::maps::MapError::KeyNotFound) => MigrationCounts::default(),
            Err(e) => return Err(TelemetryError::map(names::MIGRATIONS, e)),
        };
        Ok(ThreadTelemetry {
            migrations: counts.migrations,
            cross_node_migrations: counts.cross_node,
        })
    }

    /// Which features are active on this kernel (and why not, for the others).
    pub fn features(&self) -> &[(Feature, FeatureState)] {
        &self.features
    }

    /// Run time per program as measured by the kernel (`kernel.bpf_stats_enabled`).
    pub fn cost(&self) -> Result<Vec<ProgramCost>, TelemetryError> {
        let mut out = Vec::new();
        for (name, program) in self.ebpf.programs() {
            let info = program.info().map_err(|e| TelemetryError::Program {
                program: name.to_owned(),
                reason: e.to_string(),
            })?;
            out.push(ProgramCost {
                program: name.to_owned(),
                run_count: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            });
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(out)
    }

    /// Forwards pending log records of the programs to `tracing` (via `log`). Cheap;
    /// call it once per daemon tick. The programs only log on error paths.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

fn remove_key<V: aya::Pod>(ebpf: &mut Ebpf, name: &str, tid: u32) -> Result<(), TelemetryError> {
    let Some(map) = ebpf.map_mut(name) else {
        return Ok(());
    };
    let mut map: HashMap<_, u32, V> =
        HashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))?;
    match map.remove(&tid) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(TelemetryError::map(name, e)),
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    system: &str,
    event: &str,
) -> Result<FeatureState, TelemetryError> {
    let prog_err = |reason: String| TelemetryError::Program {
        program: program.to_owned(),
        reason,
    };
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| prog_err("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| prog_err(e.to_string()))?;
    tp.load().map_err(|e| classify_program_error(program, &e))?;
    tp.attach(system, event)
        .map_err(|e| classify_program_error(program, &e))?;
    Ok(FeatureState::Active)
}

fn fill_cpu_nodes(ebpf: &mut Ebpf, sys_root: &Path) -> Result<(), TelemetryError> {
    let table = topology::cpu_nodes(sys_root)?;
    let map = ebpf
        .map_mut(names::CPU_NODE)
        .ok_or_else(|| TelemetryError::map(names::CPU_NODE, "missing from the object"))?;
    let mut map: Array<_, u32> =
        Array::try_from(map).map_err(|e| TelemetryError::map(names::CPU_NODE, e))?;
    // Unlisted CPUs read as node 0 (the map's zero fill); mark them unknown instead so a
    // migration through an offline CPU is not mistaken for a local one.
    let listed: std::collections::HashMap<u32, u32> = table.iter().copied().collect();
    let max_cpu = table
        .iter()
        .map(|(c, _)| *c)
        .max()
        .unwrap_or(0)
        .min(MAX_CPUS - 1);
    for cpu in 0..=max_cpu {
        let node = listed
            .get(&cpu)
            .copied()
            .unwrap_or(balancer_common::UNKNOWN_NODE);
        map.set(cpu, node, 0)
            .map_err(|e| TelemetryError::map(names::CPU_NODE, e))?;
    }
    Ok(())
}

fn classify_program_error(program: &str, e: &aya::programs::ProgramError) -> TelemetryError {
    let text = e.to_string();
    if is_permission_error(&text) {
        return TelemetryError::MissingCapability;
    }
    if text.contains("tracefs") {
        return TelemetryError::NoTracefs { reason: text };
    }
    // The verifier log is long; keep its last line, which names the problem.
    let short = match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!(
            "{io_error}; verifier: {}",
            verifier_log
                .to_string()
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(no log)")
        ),
        _ => text,
    };
    TelemetryError::Program {
        program: program.to_owned(),
        reason: short,
    }
}

fn classify_load_error(text: &str) -> TelemetryError {
    if is_permission_error(text) {
        TelemetryError::MissingCapability
    } else {
        TelemetryError::Load(text.to_owned())
    }
}

fn is_permission_error(text: &str) -> bool {
    text.contains("Operation not permitted") || text.contains("Permission denied")
}

/// CAP_BPF (39) and CAP_PERFMON (38), or CAP_SYS_ADMIN (21), in the effective set.
fn check_privileges(proc_root: &Path) -> Result<(), TelemetryError> {
    let status = std::fs::read_to_string(proc_root.join("self/status"))
        .map_err(|e| TelemetryError::io("reading /proc/self/status", e))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    if has(21) || (has(39) && has(38)) {
        Ok(())
    } else {
        Err(TelemetryError::MissingCapability)
    }
}

fn check_kernel_version(proc_root: &Path) -> Result<(), TelemetryError> {
    let release = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease"))
        .map_err(|e| TelemetryError::io("reading the kernel release", e))?;
    let release = release.trim();
    let version = parse_release(release);
    if version.is_some_and(|v| v < MIN_KERNEL) {
        return Err(TelemetryError::KernelTooOld {
            found: release.to_owned(),
            needed: format!("{}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
        });
    }
    Ok(())
}

/// `6.18.44-foo` -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_release("6.1.0").unwrap() >= MIN_KERNEL);
    }

    #[test]
    fn permission_errors_are_recognised() {
        assert!(matches!(
            classify_load_error("map create failed: Operation not permitted (os error 1)"),
            TelemetryError::MissingCapability
        ));
        assert!(matches!(
            classify_load_error("bad ELF"),
            TelemetryError::Load(_)
        ));
    }
}
