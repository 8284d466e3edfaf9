//! Loading: checks what the kernel and the process can do, reads tracepoint layouts,
//! loads the embedded eBPF object, fills the configuration maps and attaches the
//! programs. Every failure is one [`TelemetryError`] line naming what is missing,
//! checked in the order an operator would fix them: privileges, kernel version, BTF,
//! tracefs, then the individual hooks.

use std::path::{Path, PathBuf};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::Array,
    programs::{FEntry, KProbe, RawTracePoint, TracePoint},
};
use balancer_common::{
    FaultAddressLayout, MAX_CPUS, NumaMoveLayout, SchedMigrateLayout, SchedSwitchLayout, globals,
    names,
};

use super::preflight::{check_kernel_version, check_privileges, raise_memlock_limit};
use super::{
    Feature, FeatureState, TelemetryError, topology,
    tracefs::{Tracefs, TracepointFormat},
};

/// The eBPF object built by `balancer/build.rs`, embedded in the binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer-ebpf.o"));

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

/// The loaded and attached eBPF programs and their maps. The read API is in
/// `telemetry::maps`.
///
/// Dropping it detaches and unloads everything.
pub struct Telemetry {
    pub(super) ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub(super) features: Vec<(Feature, FeatureState)>,
    /// NUMA node of each possible CPU (index: CPU), `None` when offline/unknown.
    pub(super) cpu_node: Vec<Option<u32>>,
    /// Number of nodes the per-node vectors of the read API have.
    pub(super) node_count: usize,
    /// Keeps `kernel.bpf_stats_enabled` on while we live (None if the kernel refused).
    _stats: Option<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("features", &self.features)
            .field("node_count", &self.node_count)
            .finish_non_exhaustive()
    }
}

/// Why an optional tracepoint's layout is unknown on this kernel.
#[derive(Debug, thiserror::Error)]
enum LayoutError {
    #[error(transparent)]
    Format(#[from] super::tracefs::FormatError),
    #[error(transparent)]
    Btf(#[from] super::btf::BtfError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("no fields")]
    NoFields,
    #[error("first argument is `{c_type} {name}`, expected `unsigned long address`")]
    NotAnAddress { c_type: String, name: String },
    #[error("the kvm module is not loaded")]
    NoKvm,
}

/// Layouts of every tracepoint, each available or not (with the reason).
struct Layouts {
    migrate: SchedMigrateLayout,
    switch: Result<SchedSwitchLayout, LayoutError>,
    page_fault_user: Result<FaultAddressLayout, LayoutError>,
    kvm_page_fault: Result<FaultAddressLayout, LayoutError>,
    move_numa: Result<NumaMoveLayout, LayoutError>,
    swap_numa: Result<NumaMoveLayout, LayoutError>,
}

impl Layouts {
    fn read(
        tracefs: &Tracefs,
        btf: &super::btf::Btf,
        sys_root: &Path,
    ) -> Result<Self, TelemetryError> {
        let migrate = tracefs.format("sched", "sched_migrate_task")?;
        let migrate = (|| -> Result<_, super::tracefs::FormatError> {
            Ok(SchedMigrateLayout {
                pid_offset: migrate.offset_of("pid", 4)?,
                orig_cpu_offset: migrate.offset_of("orig_cpu", 4)?,
                dest_cpu_offset: migrate.offset_of("dest_cpu", 4)?,
                valid: 1,
            })
        })()
        .map_err(|reason| TelemetryError::BadFormat {
            path: tracefs.format_path("sched", "sched_migrate_task"),
            reason,
        })?;
        let optional = |sys: &str, event: &str| -> Result<TracepointFormat, LayoutError> {
            Ok(tracefs.format(sys, event)?)
        };
        let switch = btf
            .member_offset("task_struct", "pid")
            .map(|task_pid_offset| SchedSwitchLayout {
                task_pid_offset,
                valid: 1,
            })
            .map_err(LayoutError::from);
        // Read as a raw tracepoint: the address is the first TP_PROTO argument,
        // which the format file shows as the first field after the common ones.
        let page_fault_user = optional("exceptions", "page_fault_user").and_then(|f| {
            let first = f
                .fields
                .iter()
                .find(|x| !x.name.starts_with("common_"))
                .ok_or(LayoutError::NoFields)?;
            if first.name != "address" || first.size_bytes != 8 {
                return Err(LayoutError::NotAnAddress {
                    c_type: first.c_type.clone(),
                    name: first.name.clone(),
                });
            }
            Ok(FaultAddressLayout {
                address_offset: first.offset_bytes,
                valid: 1,
            })
        });
        let kvm_page_fault = if sys_root.join("module/kvm").is_dir() {
            optional("kvm", "kvm_page_fault").and_then(|f| {
                Ok(FaultAddressLayout {
                    address_offset: f
                        .offset_of("fault_address", 8)
                        .or_else(|_| f.offset_of("address", 8))?,
                    valid: 1,
                })
            })
        } else {
            Err(LayoutError::NoKvm)
        };
        let move_numa = optional("sched", "sched_move_numa").and_then(|f| {
            Ok(NumaMoveLayout {
                src_pid_offset: f.offset_of("pid", 4)?,
                dst_pid_offset: 0,
                valid: 1,
                _pad: 0,
            })
        });
        let swap_numa = optional("sched", "sched_swap_numa").and_then(|f| {
            Ok(NumaMoveLayout {
                src_pid_offset: f.offset_of("src_pid", 4)?,
                dst_pid_offset: f.offset_of("dst_pid", 4)?,
                valid: 1,
                _pad: 0,
            })
        });
        Ok(Self {
            migrate,
            switch,
            page_fault_user,
            kvm_page_fault,
            move_numa,
            swap_numa,
        })
    }
}

impl Telemetry {
    /// Loads and attaches every program the running kernel supports. The migration
    /// counter is required; any other hook missing on this kernel only disables its
    /// feature (see [`Telemetry::features`]).
    pub fn load() -> Result<Self, TelemetryError> {
        Self::load_with(&LoadOptions::default())
    }

    pub fn load_with(opts: &LoadOptions) -> Result<Self, TelemetryError> {
        check_privileges(&opts.proc_root)?;
        check_kernel_version(&opts.proc_root)?;
        let btf = Btf::parse_file(&opts.btf_path, aya::Endianness::default()).map_err(|e| {
            TelemetryError::NoBtf {
                path: opts.btf_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let tracefs = Tracefs::find_or_mount()?;
        raise_memlock_limit();
        let kernel_types = super::btf::Btf::from_file(&opts.btf_path)?;
        let layouts = Layouts::read(&tracefs, &kernel_types, &opts.sys_root)?;

        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global(globals::SCHED_MIGRATE, &layouts.migrate, true);
        // Programs whose layout is unknown keep `valid == 0` and are not attached.
        if let Ok(l) = &layouts.switch {
            loader.override_global(globals::SCHED_SWITCH, l, true);
        }
        if let Ok(l) = &layouts.page_fault_user {
            loader.override_global(globals::PAGE_FAULT_USER, l, true);
        }
        if let Ok(l) = &layouts.kvm_page_fault {
            loader.override_global(globals::KVM_PAGE_FAULT, l, true);
        }
        if let Ok(l) = &layouts.move_numa {
            loader.override_global(globals::SCHED_MOVE_NUMA, l, true);
        }
        if let Ok(l) = &layouts.swap_numa {
            loader.override_global(globals::SCHED_SWAP_NUMA, l, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| classify_load_error(&e.to_string()))?;

        let table = topology::cpu_nodes(&opts.sys_root)?;
        fill_cpu_nodes(&mut ebpf, &table)?;

        let features = attach_all(&mut ebpf, &btf, &layouts, &opts.sys_root)?;

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
                tracing::warn!(error = %e, "cannot enable BPF run-time statistics; cost() reads zeroes");
                None
            }
        };
        for (feature, state) in &features {
            match state {
                FeatureState::Active => {
                    tracing::info!(feature = feature.name(), "eBPF feature active")
                }
                FeatureState::Unavailable(reason) => {
                    tracing::warn!(feature = feature.name(), %reason, "eBPF feature unavailable")
                }
            }
        }
        let max_cpu = table.iter().map(|(c, _)| *c as usize).max().unwrap_or(0);
        let mut cpu_node = vec![None; max_cpu + 1];
        for (cpu, node) in &table {
            cpu_node[*cpu as usize] = Some(*node);
        }
        let node_count = table
            .iter()
            .map(|(_, n)| *n as usize + 1)
            .max()
            .unwrap_or(1)
            .min(balancer_common::MAX_NODES);
        Ok(Self {
            ebpf,
            logger,
            features,
            cpu_node,
            node_count,
            _stats: stats,
        })
    }

    /// Which features are active on this kernel, and why the others are not.
    pub fn features(&self) -> &[(Feature, FeatureState)] {
        &self.features
    }

    /// Whether `feature` is active.
    pub fn has(&self, feature: Feature) -> bool {
        self.features
            .iter()
            .any(|(f, s)| *f == feature && *s == FeatureState::Active)
    }

    /// Whether the programs' log channel (aya-log) is connected.
    pub fn logs_connected(&self) -> bool {
        self.logger.is_some()
    }

    /// Forwards pending log records of the programs to `tracing` (via `log`). Cheap;
    /// call it once per daemon tick. The programs only log on error paths.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// Attaches every program whose hook this kernel has. The migration counter is
/// required; every other feature is reported as active or unavailable with a reason.
fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    layouts: &Layouts,
    sys_root: &Path,
) -> Result<Vec<(Feature, FeatureState)>, TelemetryError> {
    // A layout that is unknown makes the feature unavailable for that reason; else
    // attaching decides.
    fn state<T>(
        layout: &Result<T, LayoutError>,
        attach: impl FnOnce() -> Result<(), TelemetryError>,
    ) -> FeatureState {
        match layout.as_ref().map(|_| attach()) {
            Ok(Ok(())) => FeatureState::Active,
            Ok(Err(e)) => FeatureState::Unavailable(e.to_string()),
            Err(e) => FeatureState::Unavailable(e.to_string()),
        }
    }

    // Required: without it there is no telemetry worth running.
    attach_tracepoint(ebpf, "sched_migrate_task", "sched", "sched_migrate_task")?;
    let mut features = vec![(Feature::Migrations, FeatureState::Active)];
    features.push((
        Feature::OnCpuTime,
        state(&layouts.switch, || {
            attach_raw_tracepoint(ebpf, "sched_switch")
        }),
    ));
    features.push((
        Feature::NumaHintingFaults,
        attach_numa_fault(ebpf, btf, sys_root),
    ));
    features.push((
        Feature::UserPageFaults,
        state(&layouts.page_fault_user, || {
            attach_raw_tracepoint(ebpf, "page_fault_user")
        }),
    ));
    features.push((
        Feature::KvmPageFaults,
        state(&layouts.kvm_page_fault, || {
            attach_tracepoint(ebpf, "kvm_page_fault", "kvm", "kvm_page_fault")
        }),
    ));
    let moves = state(&layouts.move_numa, || {
        attach_tracepoint(ebpf, "sched_move_numa", "sched", "sched_move_numa")
    });
    let swaps = state(&layouts.swap_numa, || {
        attach_tracepoint(ebpf, "sched_swap_numa", "sched", "sched_swap_numa")
    });
    let numa_moves = match (moves, swaps) {
        (FeatureState::Active, FeatureState::Active) => FeatureState::Active,
        (FeatureState::Unavailable(r), _) | (_, FeatureState::Unavailable(r)) => {
            FeatureState::Unavailable(r)
        }
    };
    features.push((Feature::NumaBalancingMoves, numa_moves));
    Ok(features)
}

/// fentry on `task_numa_fault`, or a kprobe where the kernel refuses fentry programs
/// (no BPF trampoline, a security policy); both count the same.
fn attach_numa_fault(ebpf: &mut Ebpf, btf: &Btf, sys_root: &Path) -> FeatureState {
    let Err(fentry) = attach_fentry(ebpf, btf, "task_numa_fault") else {
        return FeatureState::Active;
    };
    match attach_kprobe(ebpf, "task_numa_fault_kprobe", "task_numa_fault") {
        Ok(()) => {
            tracing::info!(reason = %fentry, "task_numa_fault: fentry refused, using a kprobe");
            FeatureState::Active
        }
        Err(kprobe) => {
            let kprobe = if sys_root.join("bus/event_source/devices/kprobe").exists() {
                kprobe.to_string()
            } else {
                "kprobe fallback: this kernel has no kprobes (CONFIG_KPROBES)".to_owned()
            };
            FeatureState::Unavailable(format!("{fentry}; {kprobe}"))
        }
    }
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, name: &str) -> Result<(), TelemetryError> {
    let prog_err = |reason: String| TelemetryError::Program {
        program: name.to_owned(),
        reason,
    };
    let p: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| prog_err("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| prog_err(e.to_string()))?;
    p.load().map_err(|e| classify_program_error(name, &e))?;
    if let Err(e) = p.attach(name) {
        // Unload so cost() lists only attached programs.
        let _ = p.unload();
        return Err(classify_program_error(name, &e));
    }
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), TelemetryError> {
    let prog_err = |reason: String| TelemetryError::Program {
        program: program.to_owned(),
        reason,
    };
    let p: &mut KProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| prog_err("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| prog_err(e.to_string()))?;
    p.load().map_err(|e| classify_program_error(program, &e))?;
    if let Err(e) = p.attach(function, 0) {
        let _ = p.unload();
        return Err(classify_program_error(program, &e));
    }
    Ok(())
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf, function: &str) -> Result<(), TelemetryError> {
    let prog_err = |reason: String| TelemetryError::Program {
        program: function.to_owned(),
        reason,
    };
    let p: &mut FEntry = ebpf
        .program_mut(function)
        .ok_or_else(|| prog_err("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| prog_err(e.to_string()))?;
    p.load(function, btf)
        .map_err(|e| classify_program_error(function, &e))?;
    if let Err(e) = p.attach() {
        let _ = p.unload();
        return Err(classify_program_error(function, &e));
    }
    Ok(())
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    system: &str,
    event: &str,
) -> Result<(), TelemetryError> {
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
    if let Err(e) = tp.attach(system, event) {
        let _ = tp.unload();
        return Err(classify_program_error(program, &e));
    }
    Ok(())
}

fn fill_cpu_nodes(ebpf: &mut Ebpf, table: &[(u32, u32)]) -> Result<(), TelemetryError> {
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
    // Privileges were checked before loading: an EPERM here is the kernel refusing
    // this hook (e.g. lockdown, a function that cannot be traced), so keep its text.
    let text = e.to_string();
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
    // EPERM only: the verifier rejects invalid programs with EACCES ("Permission denied").
    text.contains("Operation not permitted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_btf_is_named() {
        let root = std::env::temp_dir().join(format!("vmbalancer-nobtf-{}", std::process::id()));
        std::fs::create_dir_all(root.join("self")).unwrap();
        std::fs::create_dir_all(root.join("sys/kernel")).unwrap();
        std::fs::write(root.join("self/status"), "CapEff:\t000001ffffffffff\n").unwrap();
        std::fs::write(root.join("sys/kernel/osrelease"), "6.1.0\n").unwrap();
        let opts = LoadOptions {
            sys_root: root.clone(),
            proc_root: root.clone(),
            btf_path: root.join("no-such-vmlinux"),
        };
        let e = Telemetry::load_with(&opts).unwrap_err();
        assert!(matches!(e, TelemetryError::NoBtf { .. }), "{e}");
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF"));
        assert!(!e.to_string().contains('\n'), "one line");
        std::fs::remove_dir_all(root).unwrap();
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
