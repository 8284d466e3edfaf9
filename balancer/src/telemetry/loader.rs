//! Loading: checks what the kernel and the process can do, reads tracepoint layouts,
//! loads the embedded eBPF object, fills the configuration maps and attaches the
//! programs. Every failure is one [`TelemetryError`] line naming what is missing,
//! checked in the order an operator would fix them: privileges, kernel version, BTF,
//! tracefs, then the individual hooks.
//!
//! Kernels differ in which program types they accept on a hook (a verifier that
//! rejects one form, no BPF trampolines, no kprobes), so a feature may have several
//! paths that count the same thing. The loader tries them in order of preference,
//! keeps the first the kernel accepts and records why each other one was refused
//! ([`FeaturePaths`]): `vmbalancer trace --features` prints that matrix.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::Array,
    programs::{
        BtfTracePoint, FEntry, KProbe, PerfEvent, RawTracePoint, TracePoint,
        perf_event::{BreakpointConfig, PerfEventConfig, PerfEventScope, SamplePolicy},
    },
};
use balancer_common::{
    FaultAddressLayout, MAX_CPUS, MAX_TRACKED_THREADS, NumaMoveLayout, PID_MAX_LIMIT,
    SchedMigrateLayout, SchedSwitchLayout, SchedSwitchRecordLayout, TRACKED_SLOTS_PER_WORD,
    TaskMigrateLayout, globals, names,
};

use super::preflight::{check_kernel_version, check_privileges, raise_memlock_limit};
use super::{
    Feature, FeaturePaths, FeatureState, RefusedPath, TelemetryError,
    btf::BtfError,
    topology,
    tracefs::{FormatError, Tracefs, TracepointFormat},
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
    /// Kinds of path not to try (the first word of a path's name: `tp_btf`,
    /// `raw_tp`, `tracepoint`, `fentry`, `kprobe`, `hw`), reported as refused. Tests
    /// use it to run each fallback on a kernel that would take the preferred path.
    pub skip_paths: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            skip_paths: Vec::new(),
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
    paths: Vec<FeaturePaths>,
    /// NUMA node of each possible CPU (index: CPU), `None` when offline/unknown.
    pub(super) cpu_node: Vec<Option<u32>>,
    /// Number of nodes the per-node vectors of the read API have.
    pub(super) node_count: usize,
    /// procfs root, for the run time of threads as they are tracked.
    pub(super) proc_root: PathBuf,
    /// The slot of each tracked thread in the per-thread arrays.
    pub(super) slots: super::slots::Slots,
    /// Keeps `kernel.bpf_stats_enabled` on while we live (None if the kernel refused).
    _stats: Option<std::os::fd::OwnedFd>,
    /// The programs' wakes (taken by [`Telemetry::take_wake_channel`]).
    wake: Option<super::WakeChannel>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("features", &self.features)
            .field("node_count", &self.node_count)
            .finish_non_exhaustive()
    }
}

/// Why the record or kernel-struct layout one program reads is unknown on this
/// kernel. The program then keeps `valid == 0`, is not attached, and this is the
/// reason its path shows in the feature matrix.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The tracepoint's `format` file is missing or unreadable.
    #[error(transparent)]
    Tracepoint(TelemetryError),
    #[error("{}: {reason}", path.display())]
    Field { path: PathBuf, reason: FormatError },
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("{}: no fields after the common ones", path.display())]
    NoFields { path: PathBuf },
    #[error(
        "{}: first argument is `{c_type} {name}`, expected `unsigned long address`",
        path.display()
    )]
    NotAddress {
        path: PathBuf,
        c_type: String,
        name: String,
    },
    #[error("the kvm module is not loaded")]
    NoKvm,
}

/// A layout, or why there is none; shared by every path that needs it.
type Layout<T> = Result<T, Arc<LayoutError>>;

/// Layouts of every tracepoint, each available or not (with the reason).
struct Layouts {
    migrate: SchedMigrateLayout,
    task_migrate: Layout<TaskMigrateLayout>,
    switch: Layout<SchedSwitchLayout>,
    switch_record: Layout<SchedSwitchRecordLayout>,
    page_fault_user: Layout<FaultAddressLayout>,
    kvm_page_fault: Layout<FaultAddressLayout>,
    move_numa: Layout<NumaMoveLayout>,
    swap_numa: Layout<NumaMoveLayout>,
}

impl Layouts {
    fn read(
        tracefs: &Tracefs,
        btf: &super::btf::Btf,
        sys_root: &Path,
    ) -> Result<Self, TelemetryError> {
        let migrate = tracefs.format("sched", "sched_migrate_task")?;
        let migrate = (|| -> Result<_, FormatError> {
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
        // An optional tracepoint's format, and a reader of its fields whose errors
        // name the format file.
        let optional = |sys: &str, event: &str| {
            let path = tracefs.format_path(sys, event);
            let format = tracefs
                .format(sys, event)
                .map_err(LayoutError::Tracepoint)?;
            Ok::<_, LayoutError>((format, path))
        };
        let field = |(f, path): &(TracepointFormat, PathBuf), name: &str, size_bytes: u32| {
            f.offset_of(name, size_bytes)
                .map_err(|reason| LayoutError::Field {
                    path: path.clone(),
                    reason,
                })
        };
        // `task_cpu()`: `thread_info.cpu` where the thread info is in the task (x86
        // since 5.16), the task's own `cpu` before.
        let task_migrate = (|| -> Result<_, LayoutError> {
            let task_cpu_offset = match btf.member_offset("task_struct", "cpu") {
                Ok(offset) => offset,
                Err(_) => {
                    btf.member_offset("task_struct", "thread_info")?
                        + btf.member_offset("thread_info", "cpu")?
                }
            };
            Ok(TaskMigrateLayout {
                task_pid_offset: btf.member_offset("task_struct", "pid")?,
                task_cpu_offset,
                valid: 1,
                _pad: 0,
            })
        })();
        let switch = (|| -> Result<_, LayoutError> {
            Ok(SchedSwitchLayout {
                task_pid_offset: btf.member_offset("task_struct", "pid")?,
                task_runtime_offset: btf.member_offset("task_struct", "se")?
                    + btf.member_offset("sched_entity", "sum_exec_runtime")?,
                valid: 1,
                _pad: 0,
            })
        })();
        let switch_record = optional("sched", "sched_switch").and_then(|f| {
            Ok(SchedSwitchRecordLayout {
                prev_pid_offset: field(&f, "prev_pid", 4)?,
                next_pid_offset: field(&f, "next_pid", 4)?,
                valid: 1,
                _pad: 0,
            })
        });
        // Read as a raw tracepoint: the address is the first TP_PROTO argument,
        // which the format file shows as the first field after the common ones.
        let page_fault_user = optional("exceptions", "page_fault_user").and_then(|(f, path)| {
            let Some(first) = f.fields.iter().find(|x| !x.name.starts_with("common_")) else {
                return Err(LayoutError::NoFields { path });
            };
            if first.name != "address" || first.size_bytes != 8 {
                return Err(LayoutError::NotAddress {
                    path,
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
                    address_offset: field(&f, "fault_address", 8)
                        .or_else(|_| field(&f, "address", 8))?,
                    valid: 1,
                })
            })
        } else {
            Err(LayoutError::NoKvm)
        };
        let move_numa = optional("sched", "sched_move_numa").and_then(|f| {
            Ok(NumaMoveLayout {
                src_pid_offset: field(&f, "pid", 4)?,
                dst_pid_offset: 0,
                valid: 1,
                _pad: 0,
            })
        });
        let swap_numa = optional("sched", "sched_swap_numa").and_then(|f| {
            Ok(NumaMoveLayout {
                src_pid_offset: field(&f, "src_pid", 4)?,
                dst_pid_offset: field(&f, "dst_pid", 4)?,
                valid: 1,
                _pad: 0,
            })
        });
        Ok(Self {
            migrate,
            task_migrate: task_migrate.map_err(Arc::new),
            switch: switch.map_err(Arc::new),
            switch_record: switch_record.map_err(Arc::new),
            page_fault_user: page_fault_user.map_err(Arc::new),
            kvm_page_fault: kvm_page_fault.map_err(Arc::new),
            move_numa: move_numa.map_err(Arc::new),
            swap_numa: swap_numa.map_err(Arc::new),
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
            .map_max_entries(names::TRACKED_SLOTS, tracked_slots_words(&opts.proc_root))
            .override_global(globals::SCHED_MIGRATE, &layouts.migrate, true);
        // Programs whose layout is unknown keep `valid == 0` and are not attached.
        if let Ok(l) = &layouts.task_migrate {
            loader.override_global(globals::TASK_MIGRATE, l, true);
        }
        if let Ok(l) = &layouts.switch {
            loader.override_global(globals::SCHED_SWITCH, l, true);
        }
        if let Ok(l) = &layouts.switch_record {
            loader.override_global(globals::SCHED_SWITCH_RECORD, l, true);
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

        let online_cpus: Vec<u32> = table.iter().map(|(cpu, _)| *cpu).collect();
        let paths = attach_all(
            &mut ebpf,
            &btf,
            &layouts,
            &opts.sys_root,
            &opts.proc_root,
            &online_cpus,
            &opts.skip_paths,
        )?;
        let features: Vec<(Feature, FeatureState)> =
            paths.iter().map(|p| (p.feature, p.state())).collect();

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
        for p in &paths {
            let refused: Vec<String> = p
                .refused
                .iter()
                .map(|r| format!("{}: {}", r.path, r.reason))
                .collect();
            match (&p.active, p.state()) {
                (Some(path), _) if refused.is_empty() => {
                    tracing::info!(feature = p.feature.name(), %path, "eBPF feature active")
                }
                (Some(path), _) => tracing::info!(
                    feature = p.feature.name(),
                    %path,
                    refused = %refused.join("; "),
                    "eBPF feature active on a fallback path"
                ),
                (None, FeatureState::Unavailable(reason)) => {
                    tracing::warn!(feature = p.feature.name(), %reason, "eBPF feature unavailable")
                }
                (None, FeatureState::Active) => {}
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
        let wake = match super::WakeChannel::take(&mut ebpf) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "the programs cannot wake the daemon; it reacts at its tick");
                None
            }
        };
        Ok(Self {
            wake,
            ebpf,
            logger,
            features,
            paths,
            cpu_node,
            node_count,
            proc_root: opts.proc_root.clone(),
            slots: super::slots::Slots::new(MAX_TRACKED_THREADS),
            _stats: stats,
        })
    }

    /// The programs' wake channel; `None` once taken or when it could not be set up.
    pub fn take_wake_channel(&mut self) -> Option<super::WakeChannel> {
        self.wake.take()
    }

    /// Which features are active on this kernel, and why the others are not.
    pub fn features(&self) -> &[(Feature, FeatureState)] {
        &self.features
    }

    /// For each feature, the path that runs it and the paths the kernel refused.
    pub fn feature_paths(&self) -> &[FeaturePaths] {
        &self.paths
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

/// Words of the slot table: one 16-bit entry per thread id below `kernel.pid_max`
/// (the kernel allocates ids below it), four per word: 64 KiB at the usual 32768,
/// 8 MiB at the 4 Mi maximum. The whole id space when it cannot be read. Ids beyond
/// the table (pid_max raised later) still work: the programs look those up in the
/// tracked-thread hash.
fn tracked_slots_words(proc_root: &Path) -> u32 {
    let pid_max = std::fs::read_to_string(proc_root.join("sys/kernel/pid_max"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(1, PID_MAX_LIMIT);
    pid_max.div_ceil(TRACKED_SLOTS_PER_WORD)
}

/// Why one path of a feature was not used. Its text is the reason the feature
/// matrix shows ([`RefusedPath`]), where the path already names the hook.
#[derive(Debug, thiserror::Error)]
enum PathRefusal {
    #[error(transparent)]
    Layout(#[from] Arc<LayoutError>),
    #[error("left out by the load options")]
    Skipped,
    #[error("this kernel has no kprobes (CONFIG_KPROBES)")]
    NoKprobes,
    /// The kernel refused the program, in its words.
    #[error("{reason}")]
    Rejected { reason: String, errno: Option<i32> },
    #[error(transparent)]
    Other(TelemetryError),
    /// x86 allows kernel execution breakpoints only where a kprobe could go, and none
    /// at all without kprobes.
    #[error("{0} (kernel breakpoints need CONFIG_KPROBES)")]
    BreakpointNeedsKprobes(Box<PathRefusal>),
}

impl From<TelemetryError> for PathRefusal {
    fn from(e: TelemetryError) -> Self {
        match e {
            TelemetryError::Program { reason, errno, .. } => Self::Rejected { reason, errno },
            e => Self::Other(e),
        }
    }
}

/// Attaches one path's programs, or says why they were not attached.
type Attach<'a> = Box<dyn FnOnce(&mut Ebpf) -> Result<(), PathRefusal> + 'a>;

/// One way of running a feature: its name in the matrix and how to attach it.
type Candidate<'a> = (&'static str, Attach<'a>);

/// Tries `candidates` in order; the first that attaches is the feature's path.
fn first_that_attaches(
    ebpf: &mut Ebpf,
    skip: &[String],
    feature: Feature,
    candidates: Vec<Candidate<'_>>,
) -> FeaturePaths {
    let mut out = FeaturePaths {
        feature,
        active: None,
        refused: Vec::new(),
    };
    for (path, attach) in candidates {
        let kind = path.split_whitespace().next().unwrap_or_default();
        let outcome = if skip.iter().any(|s| s == kind) {
            Err(PathRefusal::Skipped)
        } else {
            attach(ebpf)
        };
        match outcome {
            Ok(()) => {
                out.active = Some(path.to_owned());
                break;
            }
            Err(reason) => out.refused.push(RefusedPath {
                path: path.to_owned(),
                reason: reason.to_string(),
            }),
        }
    }
    out
}

/// Attaches every program whose hook this kernel has. The migration counter is
/// required; every other feature gets the first of its paths the kernel accepts, or
/// is reported unavailable with each path's reason.
fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    layouts: &Layouts,
    sys_root: &Path,
    proc_root: &Path,
    online_cpus: &[u32],
    skip: &[String],
) -> Result<Vec<FeaturePaths>, TelemetryError> {
    let tracepoint = |layout: Layout<()>,
                      program: &'static str,
                      sys: &'static str,
                      event: &'static str|
     -> Attach<'static> {
        Box::new(move |ebpf: &mut Ebpf| {
            layout?;
            Ok(attach_tracepoint(ebpf, program, sys, event)?)
        })
    };
    let raw = |layout: Layout<()>, name: &'static str| -> Attach<'static> {
        Box::new(move |ebpf: &mut Ebpf| {
            layout?;
            Ok(attach_raw_tracepoint(ebpf, name)?)
        })
    };

    // Required: without it there is no telemetry worth running.
    let task_migrate = ok(&layouts.task_migrate);
    let migrations = first_that_attaches(
        ebpf,
        skip,
        Feature::Migrations,
        vec![
            (
                "tp_btf sched_migrate_task",
                Box::new({
                    let task_migrate = task_migrate.clone();
                    move |ebpf: &mut Ebpf| {
                        task_migrate?;
                        Ok(attach_btf_tracepoint(
                            ebpf,
                            btf,
                            "sched_migrate_task_btf",
                            "sched_migrate_task",
                        )?)
                    }
                }),
            ),
            (
                "raw_tp sched_migrate_task",
                Box::new(move |ebpf: &mut Ebpf| {
                    task_migrate?;
                    Ok(attach_raw_tracepoint_as(
                        ebpf,
                        "sched_migrate_task_raw",
                        "sched_migrate_task",
                    )?)
                }),
            ),
            (
                "tracepoint sched:sched_migrate_task",
                Box::new(|ebpf: &mut Ebpf| {
                    Ok(attach_tracepoint(
                        ebpf,
                        "sched_migrate_task",
                        "sched",
                        "sched_migrate_task",
                    )?)
                }),
            ),
        ],
    );
    if migrations.active.is_none() {
        let FeatureState::Unavailable(reason) = migrations.state() else {
            unreachable!("no active path");
        };
        return Err(TelemetryError::Program {
            program: "sched_migrate_task".to_owned(),
            reason,
            errno: None,
        });
    }
    let mut features = vec![migrations];
    let switch = ok(&layouts.switch);
    features.push(first_that_attaches(
        ebpf,
        skip,
        Feature::OnCpuTime,
        vec![
            (
                "tp_btf sched_switch",
                Box::new({
                    let switch = switch.clone();
                    move |ebpf: &mut Ebpf| {
                        switch?;
                        Ok(attach_btf_tracepoint(
                            ebpf,
                            btf,
                            "sched_switch_btf",
                            "sched_switch",
                        )?)
                    }
                }),
            ),
            ("raw_tp sched_switch", raw(switch, "sched_switch")),
            (
                "tracepoint sched:sched_switch",
                tracepoint(
                    ok(&layouts.switch).and(ok(&layouts.switch_record)),
                    "sched_switch_tp",
                    "sched",
                    "sched_switch",
                ),
            ),
        ],
    ));
    features.push(first_that_attaches(
        ebpf,
        skip,
        Feature::NumaHintingFaults,
        vec![
            (
                "fentry task_numa_fault",
                Box::new(|ebpf: &mut Ebpf| Ok(attach_fentry(ebpf, btf, "task_numa_fault")?)),
            ),
            (
                "kprobe task_numa_fault",
                Box::new(|ebpf: &mut Ebpf| {
                    if !sys_root.join("bus/event_source/devices/kprobe").exists() {
                        return Err(PathRefusal::NoKprobes);
                    }
                    Ok(attach_kprobe(
                        ebpf,
                        "task_numa_fault_kprobe",
                        "task_numa_fault",
                    )?)
                }),
            ),
            (
                "hw breakpoint task_numa_fault",
                Box::new(|ebpf: &mut Ebpf| {
                    let no_kprobes = !sys_root.join("bus/event_source/devices/kprobe").exists();
                    attach_breakpoint(
                        ebpf,
                        "task_numa_fault_breakpoint",
                        "task_numa_fault",
                        proc_root,
                        online_cpus,
                    )
                    .map_err(|e| match PathRefusal::from(e) {
                        r @ PathRefusal::Rejected {
                            errno: Some(libc::EINVAL),
                            ..
                        } if no_kprobes => PathRefusal::BreakpointNeedsKprobes(Box::new(r)),
                        r => r,
                    })
                }),
            ),
        ],
    ));
    features.push(first_that_attaches(
        ebpf,
        skip,
        Feature::UserPageFaults,
        vec![(
            "raw_tp page_fault_user",
            raw(ok(&layouts.page_fault_user), "page_fault_user"),
        )],
    ));
    features.push(first_that_attaches(
        ebpf,
        skip,
        Feature::KvmPageFaults,
        vec![(
            "tracepoint kvm:kvm_page_fault",
            tracepoint(
                ok(&layouts.kvm_page_fault),
                "kvm_page_fault",
                "kvm",
                "kvm_page_fault",
            ),
        )],
    ));
    let (move_numa, swap_numa) = (ok(&layouts.move_numa), ok(&layouts.swap_numa));
    features.push(first_that_attaches(
        ebpf,
        skip,
        Feature::NumaBalancingMoves,
        vec![(
            "tracepoint sched:sched_move_numa + sched:sched_swap_numa",
            Box::new(move |ebpf: &mut Ebpf| {
                tracepoint(move_numa, "sched_move_numa", "sched", "sched_move_numa")(ebpf)?;
                tracepoint(swap_numa, "sched_swap_numa", "sched", "sched_swap_numa")(ebpf)
            }),
        )],
    ));
    Ok(features)
}

/// Whether a layout is known, as a value every path that needs it can keep.
fn ok<T>(r: &Layout<T>) -> Layout<()> {
    r.as_ref().map(|_| ()).map_err(Arc::clone)
}

/// Program `name` of the embedded object, as the program type `P` its hook needs.
fn program_as<'e, P>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut P, TelemetryError>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| TelemetryError::MissingProgram {
            program: name.to_owned(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| TelemetryError::Program {
            program: name.to_owned(),
            reason: e.to_string(),
            errno: None,
        })
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, name: &str) -> Result<(), TelemetryError> {
    attach_raw_tracepoint_as(ebpf, name, name)
}

/// Attaches raw tracepoint program `program` to `tracepoint`.
fn attach_raw_tracepoint_as(
    ebpf: &mut Ebpf,
    program: &str,
    tracepoint: &str,
) -> Result<(), TelemetryError> {
    let p: &mut RawTracePoint = program_as(ebpf, program)?;
    p.load().map_err(|e| classify_program_error(program, &e))?;
    if let Err(e) = p.attach(tracepoint) {
        // Unload so cost() lists only attached programs.
        let _ = p.unload();
        return Err(classify_program_error(program, &e));
    }
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), TelemetryError> {
    let p: &mut KProbe = program_as(ebpf, program)?;
    p.load().map_err(|e| classify_program_error(program, &e))?;
    if let Err(e) = p.attach(function, 0) {
        let _ = p.unload();
        return Err(classify_program_error(program, &e));
    }
    Ok(())
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf, function: &str) -> Result<(), TelemetryError> {
    let p: &mut FEntry = program_as(ebpf, function)?;
    p.load(function, btf)
        .map_err(|e| classify_program_error(function, &e))?;
    if let Err(e) = p.attach() {
        let _ = p.unload();
        return Err(classify_program_error(function, &e));
    }
    Ok(())
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &str,
    tracepoint: &str,
) -> Result<(), TelemetryError> {
    let p: &mut BtfTracePoint = program_as(ebpf, program)?;
    p.load(tracepoint, btf)
        .map_err(|e| classify_program_error(program, &e))?;
    if let Err(e) = p.attach() {
        let _ = p.unload();
        return Err(classify_program_error(program, &e));
    }
    Ok(())
}

/// A perf-event program on a hardware execution breakpoint at `function`'s first
/// instruction, one event per online CPU (every task on it).
fn attach_breakpoint(
    ebpf: &mut Ebpf,
    program: &str,
    function: &str,
    proc_root: &Path,
    online_cpus: &[u32],
) -> Result<(), TelemetryError> {
    let address =
        kernel_symbol_address(&proc_root.join("kallsyms"), function).map_err(|source| {
            TelemetryError::Symbol {
                program: program.to_owned(),
                source,
            }
        })?;
    let p: &mut PerfEvent = program_as(ebpf, program)?;
    p.load().map_err(|e| classify_program_error(program, &e))?;
    for &cpu in online_cpus {
        if let Err(e) = p.attach(
            PerfEventConfig::Breakpoint(BreakpointConfig::Instruction { address }),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(1),
            false,
        ) {
            // Unloading detaches the CPUs already done.
            let _ = p.unload();
            return Err(classify_program_error(program, &e));
        }
    }
    Ok(())
}

/// Why a kernel symbol's address is unknown.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{symbol} is not in {}", path.display())]
    NoSymbol { symbol: String, path: PathBuf },
    #[error("{} hides kernel addresses (kernel.kptr_restrict)", path.display())]
    Hidden { path: PathBuf },
}

/// The address of a kernel text symbol in `kallsyms`.
fn kernel_symbol_address(kallsyms: &Path, symbol: &str) -> Result<u64, KallsymsError> {
    let text = std::fs::read_to_string(kallsyms).map_err(|source| KallsymsError::Read {
        path: kallsyms.to_path_buf(),
        source,
    })?;
    let address = text
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            (name == symbol && matches!(kind, "t" | "T") && f.next().is_none())
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .ok_or_else(|| KallsymsError::NoSymbol {
            symbol: symbol.to_owned(),
            path: kallsyms.to_path_buf(),
        })?;
    if address == 0 {
        return Err(KallsymsError::Hidden {
            path: kallsyms.to_path_buf(),
        });
    }
    Ok(address)
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    system: &str,
    event: &str,
) -> Result<(), TelemetryError> {
    let tp: &mut TracePoint = program_as(ebpf, program)?;
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
    let short = match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!(
            "{io_error}; verifier: {}",
            verifier_rejection(&verifier_log.to_string())
        ),
        // aya keeps the errno in the source chain (e.g. "`perf_event_open` failed").
        _ => {
            let mut text = text;
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    };
    TelemetryError::Program {
        program: program.to_owned(),
        reason: short,
        errno: errno_of(e),
    }
}

/// The errno somewhere in an error's chain (aya keeps it in an `io::Error` there).
fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(errno) = io.raw_os_error()
        {
            return Some(errno);
        }
        cur = err.source();
    }
    None
}

/// The line of a verifier log that states why the program was rejected.
///
/// The log ends with statistics ("processed N insns ...", "verification time",
/// "stack depth") printed whether the program passed or not; the rejection is the
/// last line before them. Both are kept so the reason and the program's size show.
fn verifier_rejection(log: &str) -> String {
    let is_summary = |l: &str| {
        let l = l.trim();
        l.is_empty()
            || l.starts_with("processed ")
            || l.starts_with("verification time")
            || l.starts_with("stack depth")
    };
    let lines: Vec<&str> = log.lines().collect();
    let summary = lines
        .iter()
        .rev()
        .find(|l| l.trim().starts_with("processed "));
    let rejection = lines.iter().rev().find(|l| !is_summary(l));
    match (rejection, summary) {
        (Some(r), Some(s)) => format!("{} ({})", r.trim(), s.trim()),
        (Some(r), None) => r.trim().to_owned(),
        (None, Some(s)) => s.trim().to_owned(),
        (None, None) => "(no log)".to_owned(),
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
            skip_paths: Vec::new(),
        };
        let e = Telemetry::load_with(&opts).unwrap_err();
        assert!(matches!(e, TelemetryError::NoBtf { .. }), "{e}");
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF"));
        assert!(!e.to_string().contains('\n'), "one line");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn verifier_rejection_is_the_line_before_the_summary() {
        let log = "0: R1=ctx() R10=fp0\n\
                   ; let t = ...\n\
                   12: (79) r2 = *(u64 *)(r1 +0)\n\
                   R1 invalid mem access 'scalar'\n\
                   verification time 310 usec\n\
                   stack depth 48\n\
                   processed 818 insns (limit 1000000) max_states_per_insn 2 total_states 40 peak_states 40 mark_read 13\n";
        assert_eq!(
            verifier_rejection(log),
            "R1 invalid mem access 'scalar' (processed 818 insns (limit 1000000) \
             max_states_per_insn 2 total_states 40 peak_states 40 mark_read 13)"
        );
        assert_eq!(verifier_rejection(""), "(no log)");
        assert_eq!(
            verifier_rejection("invalid func unknown#195896080\n"),
            "invalid func unknown#195896080"
        );
    }

    #[test]
    fn kernel_symbols_are_found_by_exact_name() {
        let dir = std::env::temp_dir().join(format!("vmbalancer-kallsyms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kallsyms");
        std::fs::write(
            &path,
            "ffffffff813c3f40 T __pfx_task_numa_fault\n\
             ffffffff813c3f50 T task_numa_fault\n\
             ffffffffc0a01000 t task_numa_fault_helper\t[kvm]\n",
        )
        .unwrap();
        assert_eq!(
            kernel_symbol_address(&path, "task_numa_fault").unwrap(),
            0xffff_ffff_813c_3f50
        );
        let missing = kernel_symbol_address(&path, "no_such_function").unwrap_err();
        assert!(
            matches!(&missing, KallsymsError::NoSymbol { symbol, .. } if symbol == "no_such_function"),
            "{missing}"
        );
        assert_eq!(
            missing.to_string(),
            format!("no_such_function is not in {}", path.display())
        );
        std::fs::write(&path, "0000000000000000 T task_numa_fault\n").unwrap();
        let hidden = kernel_symbol_address(&path, "task_numa_fault").unwrap_err();
        assert!(matches!(hidden, KallsymsError::Hidden { .. }), "{hidden}");
        assert!(
            hidden
                .to_string()
                .ends_with("hides kernel addresses (kernel.kptr_restrict)")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn slot_table_covers_pid_max() {
        let dir = std::env::temp_dir().join(format!("vmbalancer-pidmax-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sys/kernel")).unwrap();
        let words = |text: &str| {
            std::fs::write(dir.join("sys/kernel/pid_max"), text).unwrap();
            tracked_slots_words(&dir)
        };
        assert_eq!(words("32768\n"), 8192);
        assert_eq!(words("32769\n"), 8193);
        assert_eq!(words("4194304\n"), 1 << 20);
        // Beyond the kernel's limit, zero or garbage: the whole id space.
        assert_eq!(words("99999999\n"), 1 << 20);
        assert_eq!(words("0\n"), 1);
        assert_eq!(words("many\n"), 1 << 20);
        std::fs::remove_dir_all(dir).unwrap();
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
