//! [`LinuxObserver`]: the real host behind [`Observer`].
//!
//! Observation must be cheap enough to run every tick on a host with hundreds of
//! processes and VMs with hundreds of GiB, so it is incremental:
//!
//! - the topology's shape is read once (and on each full rescan); node memory, KSM and
//!   NUMA balancing settings are re-read every tick (a few small sysfs files);
//! - known VMs are kept with their parsed command line; a tick reads a quiet VM
//!   (idle, nothing changed: [`super::resample`]) from its process `stat` alone and
//!   reports it as last read; a busy one from its process `stat`, task list, vCPU
//!   `stat` and `schedstat` (not the other threads': nothing uses their run time),
//!   a thread's name only until it has its own (qemu names a thread from inside it,
//!   so a new thread briefly carries the process's name), the time since boot from
//!   the clock rather than `/proc/uptime`, and a vCPU's affinity with
//!   `sched_getaffinity` rather than its `status` file; its `status`, cgroup and
//!   cpuset only every 10-15 s and when its threads changed or the balancer acted
//!   on it;
//! - new and exited VMs are found from process connector events
//!   ([`super::proc_events`]) without walking `/proc`; a full walk runs at start, every
//!   [`ObserverConfig::full_rescan_interval_ns`], after lost events, and every tick
//!   when the connector is unavailable (no `CAP_NET_ADMIN`, a fixture tree);
//! - numa_maps is read at most at the rate [`super::memory::MemoryPolicy`] allows;
//! - which VMs share KSM pages is sampled every few tens of seconds, only while KSM
//!   merges ([`super::ksm_sharing`]);
//! - vCPU threads are told apart by name, or, for a qemu without `debug-threads=on`,
//!   by its QMP monitor once per process ([`super::vcpu_threads`]); when neither
//!   works the VM is reported with its vCPUs unknown and its whole process stands
//!   for them (all threads' demand and affinity), never a guess.
//!
//! A VM that vanishes mid-read is left out silently (counted); a VM whose files do not
//! parse is skipped for that tick with a debug line (counted); neither fails the
//! observation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::cgroup;
use super::discovery::{self, BackendKind, QemuConfig};
use super::memory::{self, MemoryPolicy, MemoryTracker, select_guest_ram};
use super::numa_maps::{read_maps, read_numa_maps};
use super::pinning::{self, PinningInput};
use super::proc_events::{ProcEvent, ProcEvents};
use super::resample;
use super::telemetry_input::{NoTelemetry, TelemetrySource, TelemetryStatus, TrackedVm};
use super::{HostError, HostPaths, monotonic_ns, procfs, topology};
use crate::host::{Observer, Wake};
use crate::model::{
    Action, ActionOutcome, DEFAULT_TARGET_LOCALITY_PCT, Pinning, PlannedAction, Snapshot,
    ThreadKind, Topology, Vcpu, Vm, VmId, VmMemory,
};

/// Settings of the observer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ObserverConfig {
    pub memory: MemoryPolicy,
    /// Full `/proc` walk at least this often, even when events arrive.
    pub full_rescan_interval_ns: u64,
    /// Subscribe to the process connector (only on the live `/proc`).
    pub use_proc_events: bool,
    /// Sample soft-dirty bits of VMs whose memory is away from their vCPUs for hot
    /// regions of resident memory (`write_heat.rs`). This writes the VMs'
    /// `clear_refs`, so it is off in `trace`, which changes nothing.
    pub write_heat: bool,
    /// The locality target memory moves towards, percent: write heat is sampled only
    /// for VMs below it. Default [`DEFAULT_TARGET_LOCALITY_PCT`]; the daemon passes
    /// its `target_locality_pct`.
    pub locality_target_pct: u32,
    /// Report idle VMs as last read (`resample`). The daemon does; `trace`, which
    /// shows what happened over its interval, reads every VM in full.
    pub quiet_vms: bool,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            memory: MemoryPolicy::default(),
            full_rescan_interval_ns: 30_000_000_000,
            use_proc_events: true,
            write_heat: true,
            locality_target_pct: DEFAULT_TARGET_LOCALITY_PCT,
            quiet_vms: true,
        }
    }
}

/// What the observer did, for `trace`, `status` and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ObserverCounters {
    pub observations: u64,
    pub full_scans: u64,
    pub proc_events: u64,
    pub proc_event_overflows: u64,
    /// Wakes reported between ticks ([`Observer::take_wakes`]).
    pub wakes: u64,
    pub vms_found: u64,
    pub vms_exited: u64,
    /// VMs left out of one observation because their files did not parse.
    pub vms_skipped: u64,
    /// VMs or threads that exited between two reads.
    pub vanished_mid_read: u64,
    pub numa_maps_reads: u64,
    pub numa_maps_read_ns_total: u64,
    /// Reads asked for because a probe page had moved (module doc of `memory`).
    pub memory_probe_changes: u64,
    /// VMs reported as last read, from their process `stat` alone (`resample`).
    pub quiet_reads: u64,
}

/// Per-vCPU state kept between observations.
#[derive(Clone, Copy, Debug)]
struct ThreadState {
    cpu_ticks: u64,
    /// What a vCPU thread ran and waited to run, from `schedstat` (ns).
    sched: Option<procfs::SchedStat>,
}

/// What changes of a VM only by an operator's hand, read with its full read and not
/// every tick ([`resample::facts_due`]).
#[derive(Clone, Debug, Default)]
struct SlowFacts {
    /// The VM's group, when it is a libvirt or systemd machine scope.
    cgroup_path: Option<String>,
    cpuset: Option<cgroup::Cpuset>,
    /// `Mems_allowed` of the process's `status`.
    mems_allowed: crate::model::CpuSet,
    read_at_ns: u64,
}

/// A change of a VM's resident size below this (or half a percent) is noise: qemu's
/// own allocations, not guest pages.
const RSS_CHANGE_FLOOR_BYTES: u64 = 4 << 20;

/// A qemu process being followed.
#[derive(Clone, Debug)]
struct KnownVm {
    starttime_ticks: u64,
    comm: String,
    config: QemuConfig,
    threads: HashMap<u32, ThreadState>,
    /// Thread names, read once per thread (module doc): a name that is still the
    /// process's own is read again, as qemu names a thread only once it runs.
    thread_names: HashMap<u32, String>,
    cpu_ticks: u64,
    sampled_at_ns: Option<u64>,
    /// The operator's placement from libvirt's status file, when it is a domain.
    libvirt: super::libvirt::IntentCache,
    /// Which threads are vCPUs when they are not named (the QMP monitor's answer).
    vcpu_threads: super::vcpu_threads::VcpuThreads,
    /// Resident size at the last observation: a change means pages were allocated
    /// or freed, so the memory placement may have changed.
    rss_bytes: u64,
    /// The VM as last read in full, telemetry included: what a quiet tick reports
    /// ([`resample`]).
    last: Option<Vm>,
    /// When it was read in full, and its thread count then. Earlier than
    /// `sampled_at_ns` when the ticks since were quiet.
    full_read_at_ns: Option<u64>,
    threads_at_read: u64,
    /// An action of the balancer touched it since its last full read.
    acted_on: bool,
    /// Its memory was local enough (at or above the locality target, or not read)
    /// at its last full read.
    memory_local: bool,
    /// The eBPF programs were counting at its last full read.
    telemetry_active: bool,
    facts: Option<SlowFacts>,
}

/// The observer of the real Linux host.
pub struct LinuxObserver {
    paths: HostPaths,
    config: ObserverConfig,
    topology: Topology,
    known: BTreeMap<u32, KnownVm>,
    events: Option<ProcEvents>,
    /// Connector events read between ticks (for wakes) and not yet discovered.
    pending_events: super::proc_events::Drained,
    events_unavailable: Option<String>,
    last_full_scan_ns: Option<u64>,
    memory: MemoryTracker,
    telemetry: Box<dyn TelemetrySource>,
    counters: ObserverCounters,
    managed: HashSet<u32>,
    ticks_per_s: u64,
    /// Seconds since boot from a capture tree's `/proc/uptime` (read once a tick;
    /// the live host reads its clock instead, see `sample`).
    uptime_s: Option<f64>,
    /// Idle CPUs per node between two observations.
    cpu_load: super::cpu_load::CpuSampler,
    /// Written regions of VMs whose memory is away from their vCPUs.
    /// Soft-dirty sampling, when [`ObserverConfig::write_heat`] is on.
    write_heat: Option<super::write_heat::WriteHeat>,
    /// KSM pages shared between VMs, sampled at a slow rate.
    ksm_sharing: super::ksm_sharing::KsmSharing,
    /// What this tick's routine numa_maps reads used (`memory::ReadBudget`).
    read_budget: memory::ReadBudget,
    /// The telemetry source counted this tick (`TelemetrySource::active`).
    telemetry_active: bool,
}

impl std::fmt::Debug for LinuxObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxObserver")
            .field("paths", &self.paths)
            .field("known_vms", &self.known.keys().collect::<Vec<_>>())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl LinuxObserver {
    /// Reads the topology and, on the live `/proc`, subscribes to process events.
    /// Telemetry starts as [`NoTelemetry`]; see [`Self::with_telemetry`].
    pub fn new(paths: HostPaths, config: ObserverConfig) -> Result<Self, HostError> {
        let topology = topology::read_topology(&paths)?;
        let (events, events_unavailable) = if !config.use_proc_events {
            (None, Some("disabled by configuration".to_string()))
        } else if !paths.is_live_proc() {
            (None, Some("not the live /proc".to_string()))
        } else {
            match ProcEvents::subscribe() {
                Ok(e) => (Some(e), None),
                Err(e) => {
                    tracing::info!(error = %e, "process connector unavailable; rescanning /proc every tick");
                    (None, Some(format!("process connector: {e}")))
                }
            }
        };
        Ok(Self {
            memory: MemoryTracker::new(config.memory.clone()),
            cpu_load: super::cpu_load::CpuSampler::new(&paths.proc),
            write_heat: config.write_heat.then(|| {
                super::write_heat::WriteHeat::new(&paths.proc, config.locality_target_pct)
            }),
            ksm_sharing: super::ksm_sharing::KsmSharing::new(&paths.proc),
            paths,
            config,
            topology,
            known: BTreeMap::new(),
            events,
            pending_events: Default::default(),
            events_unavailable,
            last_full_scan_ns: None,
            telemetry: Box::new(NoTelemetry::new("no telemetry source attached")),
            counters: ObserverCounters::default(),
            managed: HashSet::new(),
            ticks_per_s: procfs::clock_ticks_per_s(),
            uptime_s: None,
            read_budget: Default::default(),
            telemetry_active: false,
        })
    }

    /// Attaches an eBPF telemetry source.
    pub fn with_telemetry(mut self, telemetry: Box<dyn TelemetrySource>) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn telemetry_status(&self) -> TelemetryStatus {
        self.telemetry.status()
    }

    pub fn counters(&self) -> &ObserverCounters {
        &self.counters
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn paths(&self) -> &HostPaths {
        &self.paths
    }

    /// Why new VMs are found by rescanning rather than from events, if they are.
    pub fn proc_events_unavailable(&self) -> Option<&str> {
        self.events_unavailable.as_deref()
    }

    /// Tells the observer that `bytes` of VM `pid`'s guest RAM moved from node `from`
    /// to node `to`, so its memory view stays right until numa_maps is read again.
    /// `within`: the cell range the move was confined to, if any.
    pub fn note_migration(
        &mut self,
        pid: u32,
        from: u32,
        to: u32,
        bytes: u64,
        within: Option<(u64, u64)>,
    ) {
        self.memory.note_migration(pid, (from, to), bytes, within);
    }

    /// Marks VM `pid` as placed by the balancer: its narrowed affinity or cpuset is no
    /// longer taken as an operator's pinning.
    pub fn mark_managed(&mut self, pid: u32) {
        self.managed.insert(pid);
    }

    /// Replaces the set of VMs placed by the balancer (for `trace`, which learns it
    /// from the daemon's journal each interval).
    pub fn set_managed(&mut self, pids: impl IntoIterator<Item = u32>) {
        self.managed = pids.into_iter().collect();
    }

    /// Reads the process connector into [`Self::pending_events`] without blocking;
    /// where this read's events start there. A failed connector is given up for
    /// `/proc` rescans (and the next discovery rescans at once).
    fn read_proc_events(&mut self) -> usize {
        let start = self.pending_events.events.len();
        let Some(ev) = &mut self.events else {
            return start;
        };
        match ev.drain() {
            Ok(d) => {
                self.counters.proc_events += d.events.len() as u64;
                if d.overflowed {
                    self.counters.proc_event_overflows += 1;
                }
                self.pending_events.events.extend(d.events);
                self.pending_events.overflowed |= d.overflowed;
            }
            Err(e) => {
                tracing::warn!(error = %e, "process connector failed; falling back to /proc rescans");
                self.events_unavailable = Some(format!("process connector: {e}"));
                self.events = None;
                self.pending_events.overflowed = true;
            }
        }
        start
    }

    fn discover(&mut self, now_ns: u64) {
        self.read_proc_events();
        let drained = std::mem::take(&mut self.pending_events);
        let full = self.events.is_none()
            || drained.overflowed
            || self
                .last_full_scan_ns
                .is_none_or(|t| now_ns.saturating_sub(t) >= self.config.full_rescan_interval_ns);
        let mut candidates = BTreeSet::new();
        for e in drained.events {
            match e {
                ProcEvent::Exec { pid, tgid } | ProcEvent::Comm { pid, tgid, .. }
                    if pid == tgid =>
                {
                    candidates.insert(tgid);
                }
                ProcEvent::Exit { pid, tgid } if pid == tgid => {
                    if self.known.remove(&tgid).is_some() {
                        self.counters.vms_exited += 1;
                    }
                    candidates.remove(&tgid);
                }
                _ => {}
            }
        }
        if full {
            self.counters.full_scans += 1;
            self.last_full_scan_ns = Some(now_ns);
            match procfs::list_pids(&self.paths.proc) {
                Ok(pids) => {
                    let alive: BTreeSet<u32> = pids.iter().copied().collect();
                    let before = self.known.len();
                    self.known.retain(|pid, _| alive.contains(pid));
                    self.counters.vms_exited += (before - self.known.len()) as u64;
                    candidates = alive;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list processes"),
            }
        }
        for pid in candidates {
            if !self.known.contains_key(&pid) {
                self.consider(pid);
            }
        }
    }

    /// Process `pid`'s name if it is qemu (by its name or its executable's).
    fn qemu_comm(&self, pid: u32) -> Option<String> {
        let proc = &self.paths.proc;
        let comm = procfs::read_comm(proc, pid).ok()?;
        let exe = procfs::read_exe_basename(proc, pid);
        discovery::is_qemu(&comm, exe.as_deref(), None).then_some(comm)
    }

    /// Checks whether `pid` is qemu and starts following it if so.
    fn consider(&mut self, pid: u32) {
        let Some(comm) = self.qemu_comm(pid) else {
            return;
        };
        let proc = &self.paths.proc;
        let found = procfs::read_stat(proc, pid).and_then(|stat| {
            let argv = procfs::read_cmdline(proc, pid)?;
            Ok((stat, argv))
        });
        match found {
            Ok((stat, argv)) => {
                let config = discovery::parse_qemu_cmdline(&argv);
                if config.has_no_guest() {
                    tracing::debug!(
                        pid,
                        "qemu with -machine none (a capabilities probe): not a VM"
                    );
                    return;
                }
                for w in &config.warnings {
                    tracing::debug!(pid, warning = %w, "qemu command line");
                }
                tracing::debug!(pid, name = ?config.name, "found a qemu process");
                self.counters.vms_found += 1;
                self.known.insert(
                    pid,
                    KnownVm {
                        starttime_ticks: stat.starttime_ticks,
                        comm,
                        config,
                        threads: HashMap::new(),
                        thread_names: HashMap::new(),
                        cpu_ticks: stat.cpu_ticks(),
                        sampled_at_ns: None,
                        libvirt: Default::default(),
                        vcpu_threads: Default::default(),
                        rss_bytes: 0,
                        last: None,
                        full_read_at_ns: None,
                        threads_at_read: 0,
                        acted_on: false,
                        memory_local: true,
                        telemetry_active: false,
                        facts: None,
                    },
                );
            }
            Err(e) if e.is_vanished() => self.counters.vanished_mid_read += 1,
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot read a qemu process");
                self.counters.vms_skipped += 1;
            }
        }
    }

    /// Re-reads one known VM: in full, or only its process `stat` when it is quiet
    /// ([`resample`]; the flag returned says which).
    fn sample(&mut self, pid: u32, now_ns: u64) -> Result<(Vm, bool), HostError> {
        let paths = self.paths.clone();
        let proc = &paths.proc;
        let host_cpus = self.topology.all_cpus();
        let host_mems = self.topology.memory_nodes();
        let ticks_per_s = self.ticks_per_s as f64;
        let Some(known) = self.known.get_mut(&pid) else {
            return Err(HostError::Vanished { pid });
        };
        let stat = procfs::read_stat(proc, pid)?;
        if stat.starttime_ticks != known.starttime_ticks || stat.state == 'Z' {
            // The pid was reused, or the process is a zombie.
            return Err(HostError::Vanished { pid });
        }
        let live = paths.is_live_proc();
        let rss_bytes = if live {
            stat.rss_pages
                .saturating_mul(super::actuate::sys::page_size_bytes())
        } else {
            // A capture tree's `stat` lines may carry no resident size.
            procfs::read_status(proc, pid)?.vm_rss_bytes
        };
        let rss_moved =
            rss_bytes.abs_diff(known.rss_bytes) > (rss_bytes / 200).max(RSS_CHANGE_FLOOR_BYTES);
        if rss_moved {
            self.memory.note_may_have_changed(pid);
        }
        known.rss_bytes = rss_bytes;
        let dt_s = known
            .sampled_at_ns
            .map(|t| now_ns.saturating_sub(t) as f64 / 1e9)
            .filter(|&d| d > 0.0);
        // Seconds since boot, for the first sight of a thread: with no earlier sample
        // its demand is its CPU time over its age (0, as before, when unknown). A VM
        // seen for the first time must not look idle: a busy pinned VM would look
        // like room on its node. The clock is read when the demand is computed,
        // after the thread's CPU time: a time since boot read earlier (once a tick,
        // before a slow first tick's reads) shortens the age of a young thread and
        // made a VM started seconds ago look several CPUs busy. On the live host
        // that is `CLOCK_BOOTTIME` (what `/proc/uptime` and a task's start time
        // count from, a vDSO read); a capture tree has only its `uptime` file.
        let tree_uptime_s = self.uptime_s;
        let uptime_now_s = move || {
            if live {
                nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
                    .ok()
                    .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            } else {
                tree_uptime_s
            }
        };
        let demand_since = |now: u64, before: Option<u64>, start_ticks: u64| -> f64 {
            match (dt_s, before) {
                (Some(dt), Some(b)) => now.saturating_sub(b) as f64 / ticks_per_s / dt,
                _ => uptime_now_s()
                    .map(|up| up - start_ticks as f64 / ticks_per_s)
                    .filter(|&age| age >= 0.5)
                    .map_or(0.0, |age| now as f64 / ticks_per_s / age),
            }
        };
        let vm_demand = demand_since(
            stat.cpu_ticks(),
            known.sampled_at_ns.map(|_| known.cpu_ticks),
            stat.starttime_ticks,
        );
        let configured_bytes = known.config.mem_bytes.unwrap_or(0);
        let full_interval_ns = resample::full_interval_ns(pid);
        let quiet = self.config.quiet_vms
            && known.telemetry_active == self.telemetry_active
            && resample::quiet(&resample::QuietInput {
                demand_cpus: known.sampled_at_ns.map(|_| vm_demand),
                threads_now: stat.num_threads,
                threads_at_read: known.threads_at_read,
                rss_moved,
                // A reading due only by its interval waits for the full read.
                memory_settled: known.memory_local
                    && self
                        .memory
                        .get(pid)
                        .is_some_and(|t| !t.stale && t.moves_running == 0),
                acted_on: known.acted_on,
                since_full_read_ns: known.full_read_at_ns.map(|t| now_ns.saturating_sub(t)),
                full_interval_ns,
            });
        // The vCPUs' last read is older than the last tick: the ticks since were quiet.
        let was_quiet = known
            .full_read_at_ns
            .is_some_and(|t| Some(t) != known.sampled_at_ns);
        known.cpu_ticks = stat.cpu_ticks();
        known.sampled_at_ns = Some(now_ns);
        if quiet && let Some(last) = &known.last {
            self.counters.quiet_reads += 1;
            let mut vm = last.clone();
            vm.threads_cpu_demand = vm_demand;
            let per_vcpu = vm_demand / vm.vcpus.len().max(1) as f64;
            for v in &mut vm.vcpus {
                v.cpu_demand = per_vcpu;
            }
            return Ok((vm, true));
        }
        let facts_due = resample::facts_due(
            known
                .facts
                .as_ref()
                .map(|f| now_ns.saturating_sub(f.read_at_ns)),
            full_interval_ns,
            known.acted_on || stat.num_threads != known.threads_at_read,
        );
        known.acted_on = false;
        known.full_read_at_ns = Some(now_ns);
        known.threads_at_read = stat.num_threads;
        // Every thread's name first: which are vCPUs may depend on all of them (no
        // thread named `CPU n/KVM`: the monitor is asked). Only vCPUs' `stat` is
        // read: nothing uses the run time of the other threads one by one.
        let mut names = Vec::new();
        let mut thread_names = HashMap::new();
        for tid in procfs::list_tasks(proc, pid)? {
            let comm = match known.thread_names.remove(&tid) {
                Some(name) if name != known.comm => Ok(name),
                _ => procfs::read_task_comm(proc, pid, tid),
            };
            match comm {
                Ok(c) => {
                    thread_names.insert(tid, c.clone());
                    names.push((tid, c));
                }
                Err(e) if e.is_vanished() => self.counters.vanished_mid_read += 1,
                Err(e) => return Err(e),
            }
        }
        let (vcpu_discovery, vcpu_index) =
            known
                .vcpu_threads
                .find(pid, &names, &known.config.qmp_sockets, now_ns, |socket| {
                    super::qmp::query_vcpus(proc, pid, socket, QMP_TIMEOUT)
                });
        let vcpus_known = !matches!(vcpu_discovery, crate::model::VcpuDiscovery::Unknown { .. });
        let mut process_affinity = crate::model::CpuSet::new();
        let mut vcpus = Vec::new();
        let mut other_threads = Vec::new();
        let mut threads = HashMap::new();
        // What each vCPU ran since its last read, in the order of `vcpus`.
        let mut window_runs_ns = Vec::new();
        for (tid, comm) in names {
            let before = known.threads.get(&tid).copied();
            let kind = match vcpu_index.get(&tid) {
                Some(&i) => ThreadKind::Vcpu(i),
                None => match discovery::classify_thread(pid, tid, &comm) {
                    // A name alone is not enough when the monitor said otherwise.
                    ThreadKind::Vcpu(_) => ThreadKind::Other,
                    k => k,
                },
            };
            match kind {
                ThreadKind::Vcpu(index) => {
                    let read = procfs::read_task_stat(proc, pid, tid).and_then(|tstat| {
                        Ok((tstat, procfs::read_task_schedstat(proc, pid, tid)?))
                    });
                    let (tstat, sched) = match read {
                        Ok(r) => r,
                        Err(e) if e.is_vanished() => {
                            self.counters.vanished_mid_read += 1;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let state = ThreadState {
                        cpu_ticks: tstat.cpu_ticks(),
                        sched,
                    };
                    threads.insert(tid, state);
                    let window_run_ns = match (sched, before.and_then(|b| b.sched)) {
                        (Some(now), Some(b)) => now.run_ns.saturating_sub(b.run_ns),
                        _ => {
                            (tstat
                                .cpu_ticks()
                                .saturating_sub(before.map_or(0, |b| b.cpu_ticks))
                                as f64
                                / ticks_per_s
                                * 1e9) as u64
                        }
                    };
                    let affinity = match thread_affinity(&paths, pid, tid) {
                        Ok(cpus) => cpus,
                        // The thread exited; or, in a capture without the file, the
                        // affinity is unknown (empty).
                        Err(e) if e.is_vanished() && task_exists(proc, pid, tid) => {
                            Default::default()
                        }
                        Err(e) if e.is_vanished() => continue,
                        Err(e) => return Err(e),
                    };
                    vcpus.push(Vcpu {
                        index,
                        tid,
                        affinity,
                        last_cpu: tstat.processor,
                        cpu_demand: vcpu_demand(&state, before.as_ref(), dt_s).unwrap_or_else(
                            || {
                                demand_since(
                                    tstat.cpu_ticks(),
                                    before.map(|b| b.cpu_ticks),
                                    tstat.starttime_ticks,
                                )
                            },
                        ),
                        telemetry: Default::default(),
                    });
                    window_runs_ns.push(window_run_ns);
                }
                _ => {
                    if !vcpus_known {
                        // Balanced as a whole process: where it may run is where
                        // any of its threads may.
                        match procfs::read_task_status(proc, pid, tid) {
                            Ok(s) => process_affinity = process_affinity.union(&s.cpus_allowed),
                            Err(e) if e.is_vanished() => {}
                            Err(e) => return Err(e),
                        }
                    }
                    other_threads.push(tid);
                }
            }
        }
        if was_quiet {
            // Waking from quiet ticks: their vCPUs' last read is older than the
            // last tick, but what they ran since is this tick's (module doc of
            // `resample`): this tick's demand of the process, shared by what each ran.
            let total_ns: u64 = window_runs_ns.iter().sum();
            for (v, &ran_ns) in vcpus.iter_mut().zip(&window_runs_ns) {
                v.cpu_demand = if total_ns == 0 {
                    0.0
                } else {
                    (vm_demand * ran_ns as f64 / total_ns as f64).min(1.0)
                };
            }
        }
        vcpus.sort_by_key(|v| v.index);
        known.threads = threads;
        known.thread_names = thread_names;

        // cgroup: the process's group is the emulator group in libvirt layouts.
        let facts = match known.facts.take() {
            Some(f) if !facts_due => f,
            _ => read_slow_facts(&paths, pid, now_ns)?,
        };
        let (cgroup_path, cpuset) = (facts.cgroup_path.clone(), facts.cpuset.clone());
        let name = known
            .config
            .name
            .clone()
            .or_else(|| cgroup_path.as_deref().and_then(cgroup::machine_scope_name))
            .unwrap_or_else(|| known.comm.clone());

        // Memory, at the policy's rate.
        if live && let Some(addrs) = self.memory.probe_addrs(pid) {
            // Pages moved by anyone since the read (module doc of `memory`).
            let nodes = probe_nodes(pid, addrs);
            if self.memory.check_probe(pid, &nodes) {
                self.counters.memory_probe_changes += 1;
            }
        }
        if self
            .memory
            .due_within(pid, configured_bytes, now_ns, &mut self.read_budget)
        {
            let mem_paths: Vec<String> = known
                .config
                .backends
                .iter()
                .filter_map(|b| match &b.kind {
                    BackendKind::File { mem_path } => Some(mem_path.clone()),
                    _ => None,
                })
                .chain(known.config.mem_path.clone())
                .collect();
            let started = monotonic_ns();
            let maps = match read_maps(proc, pid) {
                Ok(m) => m,
                // A capture without `maps`: sizes fall back to resident sizes.
                Err(e) if e.is_vanished() && !paths.is_live_proc() => Vec::new(),
                Err(e) => return Err(e),
            };
            let numa = read_numa_maps(proc, pid)?;
            let cost = monotonic_ns().saturating_sub(started);
            let reading = select_guest_ram(&maps, &numa, configured_bytes, &mem_paths)
                .map_err(|w| HostError::parse(&proc.join(pid.to_string()).join("numa_maps"), w))?;
            let probe = live.then(|| {
                let addrs = memory::Probe::addresses(
                    &reading.guest_ranges,
                    super::actuate::sys::page_size_bytes(),
                );
                let nodes = probe_nodes(pid, &addrs);
                memory::Probe { addrs, nodes }
            });
            self.memory.store(pid, reading, now_ns, cost);
            if let Some(p) = probe {
                self.memory.set_probe(pid, p);
            }
            self.counters.numa_maps_reads += 1;
            self.counters.numa_maps_read_ns_total += cost;
        }
        let tracked = self.memory.get(pid).cloned().unwrap_or_default();
        let per_node = |m: &BTreeMap<u32, u64>| -> Vec<u64> {
            self.topology
                .nodes
                .iter()
                .map(|n| m.get(&n.id).copied().unwrap_or(0))
                .collect()
        };
        let backing = match tracked.reading.observed_backing.clone() {
            // numa_maps knows the real huge page size and memfd-ness.
            Some(b @ crate::model::MemoryBacking::HugeTlb { .. }) => b,
            Some(crate::model::MemoryBacking::Anonymous) | None => known.config.backing(),
            Some(b) => b,
        };
        let memory = VmMemory {
            bytes_per_node: per_node(&tracked.reading.guest_bytes_per_node),
            backing,
            configured_bytes,
            measured_at_ns: tracked.read_at_ns,
            overhead_bytes_per_node: per_node(&tracked.reading.overhead_bytes_per_node),
            own_overhead_bytes_per_node: per_node(&tracked.reading.own_overhead_bytes_per_node),
            guest_ranges: tracked.reading.guest_ranges.clone(),
            not_movable: known.config.not_movable.clone(),
        };
        // Memory away from the vCPUs is what the engine acts on: keep its reading at
        // the base interval, never a kept one (module doc of `memory`).
        let vcpu_nodes: BTreeSet<u32> = vcpus
            .iter()
            .filter_map(|v| v.last_cpu.and_then(|c| self.topology.node_of_cpu(c)))
            .collect();
        let local = crate::model::local_share_on(&memory.bytes_per_node, |i| {
            self.topology
                .nodes
                .get(i)
                .is_some_and(|n| vcpu_nodes.contains(&n.id))
        });
        let away = local.is_some_and(|l| l * 100.0 < f64::from(self.config.locality_target_pct));
        if away {
            self.memory.note_may_have_changed(pid);
        }
        known.memory_local = !away;

        // Each guest cell's own memory, where its backend's mapping is known.
        let mut cells = known.config.cells.clone();
        let backend_sizes: Vec<(String, u64)> = known
            .config
            .backends
            .iter()
            .map(|b| (b.id.clone(), b.size_bytes))
            .collect();
        let r = &tracked.reading;
        let located = memory::locate_cells(
            &known.config.cell_backend_ids,
            &backend_sizes,
            &r.guest_ranges,
        );
        for (cell, at) in cells.iter_mut().zip(located) {
            if let (Some(i), Some(bytes)) = (at, at.and_then(|i| r.guest_range_bytes.get(i))) {
                cell.addr_range = Some(r.guest_ranges[i]);
                cell.bytes_per_node = per_node(bytes);
            }
        }
        let libvirt = match &known.config.name {
            Some(domain) => known
                .libvirt
                .get(&paths.libvirt, domain, pid)
                .unwrap_or_default(),
            None => None,
        };
        // With the vCPUs unknown, the process's affinity stands for theirs: a qemu
        // started under `taskset` is pinned as surely as one with pinned vCPUs.
        let evidence = PinningInput {
            host_cpus: &host_cpus,
            host_mem_nodes: &host_mems,
            vcpu_affinities: if vcpus_known {
                vcpus.iter().map(|v| &v.affinity).collect()
            } else {
                vec![&process_affinity]
            },
            cgroup_mems: cpuset.as_ref().map(|c| &c.mems),
            cmdline_binding: known.config.strict_memory_binding(),
            libvirt,
            managed: self.managed.contains(&pid),
        };
        let pinning = pinning::detect(&evidence);
        let operator_pins = match pinning {
            Pinning::Operator { .. } => pinning::pins(&evidence),
            _ => Default::default(),
        };
        let mems_allowed = cpuset
            .as_ref()
            .map(|c| c.effective_mems.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| facts.mems_allowed.clone());
        known.facts = Some(facts);
        Ok((
            Vm {
                pid,
                name,
                vcpus,
                other_threads,
                memory,
                cells,
                pinning,
                operator_pins,
                hot_regions: Vec::new(),
                cgroup: cgroup_path,
                mems_allowed,
                threads_cpu_demand: vm_demand,
                kernel_numa_moves: 0,
                ksm_shared_pages: Vec::new(),
                ksm_merging_pages: None,
                vcpu_discovery,
                process_affinity,
                configured_vcpus: known.config.smp_cpus.unwrap_or(0),
            },
            false,
        ))
    }
}

/// Reads what changes of VM `pid` only by an operator's hand ([`SlowFacts`]).
fn read_slow_facts(paths: &HostPaths, pid: u32, now_ns: u64) -> Result<SlowFacts, HostError> {
    let status = procfs::read_status(&paths.proc, pid)?;
    let cg = cgroup::read_task_cgroup(paths, pid, None).and_then(|cg| {
        let Some(cg) = cg else {
            return Ok((None, None));
        };
        let cpuset = cgroup::read_cpuset(paths, &cg)?;
        let (vm_group, role) = cgroup::split_libvirt_path(&cg.path);
        let in_vm_scope = role.is_some() || cgroup::machine_scope_name(&cg.path).is_some();
        Ok((in_vm_scope.then_some(vm_group), cpuset))
    });
    let (cgroup_path, cpuset) = match cg {
        Ok(x) => x,
        Err(e) if e.is_vanished() => return Err(e),
        Err(e) => {
            // A cgroup that cannot be read hides the cpuset, not the VM.
            tracing::debug!(pid, error = %e, "cannot read the VM's cgroup");
            (None, None)
        }
    };
    Ok(SlowFacts {
        cgroup_path,
        cpuset,
        mems_allowed: status.mems_allowed,
        read_at_ns: now_ns,
    })
}

/// The longest one QMP exchange may take (it runs on the tick, at most once per VM
/// per [`super::vcpu_threads::RETRY_NS`] when the monitor does not answer).
const QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Where thread `tid` of `pid` may run. On the live host this is one
/// `sched_getaffinity` call instead of opening and parsing the thread's `status` file
/// (a tenth of the cost, and the daemon does it for every vCPU every tick); the tid
/// was just listed under the process, and an exited thread answers ESRCH, which reads
/// as vanished. A capture tree has only the file.
fn thread_affinity(
    paths: &HostPaths,
    pid: u32,
    tid: u32,
) -> Result<crate::model::CpuSet, HostError> {
    if !paths.is_live_proc() {
        return procfs::read_task_status(&paths.proc, pid, tid).map(|s| s.cpus_allowed);
    }
    super::actuate::sys::get_affinity(tid).map_err(|errno| HostError::Io {
        path: paths
            .proc
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string()),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })
}

/// The nodes of VM `pid`'s pages at `addrs` now (`move_pages` without moving: a
/// node, or a negative errno per page). A failed call (the VM exited) gives
/// all-`i32::MIN`, which differs from any reading and so asks for a read that then
/// finds the VM gone.
fn probe_nodes(pid: u32, addrs: &[u64]) -> Vec<i32> {
    let mut nodes = vec![i32::MIN; addrs.len()];
    if super::actuate::sys::move_pages(pid, addrs, None, &mut nodes).is_err() {
        nodes.fill(i32::MIN);
    }
    nodes
}

/// Whether a thread's directory is there (tells a missing file from an exited thread).
fn task_exists(proc: &std::path::Path, pid: u32, tid: u32) -> bool {
    proc.join(pid.to_string())
        .join("task")
        .join(tid.to_string())
        .join("stat")
        .exists()
}

impl Observer for LinuxObserver {
    type Error = HostError;

    fn wake_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let mut fds: Vec<_> = self.events.iter().map(|e| e.as_fd()).collect();
        fds.extend(self.telemetry.wake_fd());
        fds
    }

    fn take_wakes(&mut self) -> Vec<Wake> {
        use crate::telemetry::wake_kind;
        let start = self.read_proc_events();
        let mut wakes = Vec::new();
        for e in &self.pending_events.events[start..] {
            let wake = match e {
                &ProcEvent::Exec { pid, tgid } | &ProcEvent::Comm { pid, tgid, .. }
                    if pid == tgid
                        && !self.known.contains_key(&tgid)
                        && self.qemu_comm(tgid).is_some() =>
                {
                    Wake::NewVm { pid: tgid }
                }
                ProcEvent::Comm { pid, tgid, comm }
                    if *pid != *tgid
                        && self.known.contains_key(tgid)
                        && matches!(
                            discovery::classify_thread(*tgid, *pid, comm),
                            ThreadKind::Vcpu(_)
                        ) =>
                {
                    Wake::VcpuNamed {
                        vm: *tgid,
                        tid: *pid,
                    }
                }
                &ProcEvent::Exit { pid, tgid } if pid == tgid && self.known.contains_key(&tgid) => {
                    Wake::VmExited { pid: tgid }
                }
                _ => continue,
            };
            wakes.push(wake);
        }
        for w in self.telemetry.take_wakes() {
            let Some(known) = self.known.get(&w.vm_pid) else {
                continue;
            };
            match w.kind {
                // Our own CPU move: the kernel carries its threads over as we asked.
                wake_kind::CROSS_NODE if known.acted_on => {}
                wake_kind::CROSS_NODE => wakes.push(Wake::CrossNode {
                    vm: w.vm_pid,
                    tid: w.tid,
                    from: w.from_node,
                    to: w.to_node,
                }),
                wake_kind::REMOTE_FAULTS => wakes.push(Wake::RemoteFaults {
                    vm: w.vm_pid,
                    faults: w.count,
                }),
                _ => {}
            }
        }
        // A new qemu's exec and its main thread's rename arrive together.
        wakes.dedup();
        self.counters.wakes += wakes.len() as u64;
        wakes
    }

    fn observe(&mut self) -> Result<Snapshot, HostError> {
        let now_ns = monotonic_ns();
        self.counters.observations += 1;
        topology::refresh_node_memory(&self.paths, &mut self.topology)?;
        let busy = self.cpu_load.sample(&self.topology);
        for (i, node) in self.topology.nodes.iter_mut().enumerate() {
            node.idle_cpus = busy
                .as_ref()
                .and_then(|b| b.get(i))
                .map(|b| (node.cpus.len() as f64 - b).max(0.0));
        }
        let settings = topology::read_settings(&self.paths)?;
        if !self.paths.is_live_proc() {
            self.uptime_s = std::fs::read_to_string(self.paths.proc.join("uptime"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
        }
        if self.last_full_scan_ns.is_some()
            && self.events.is_some()
            && now_ns.saturating_sub(self.last_full_scan_ns.unwrap_or(0))
                >= self.config.full_rescan_interval_ns
        {
            // The shape can change on hotplug; re-read it with the full rescan.
            match topology::read_topology(&self.paths) {
                Ok(t) => self.topology = t,
                Err(e) => tracing::warn!(error = %e, "cannot re-read the topology"),
            }
        }
        let t0 = std::time::Instant::now();
        self.discover(now_ns);
        let discover_ns = t0.elapsed().as_nanos() as u64;
        let mut vms = Vec::new();
        let mut quiet = BTreeSet::new();
        self.read_budget = Default::default();
        self.telemetry_active = self.telemetry.active();
        let pids: Vec<u32> = self.known.keys().copied().collect();
        for pid in pids {
            let ts = std::time::Instant::now();
            let sampled = self.sample(pid, now_ns);
            tracing::trace!(
                pid,
                sample_ns = ts.elapsed().as_nanos() as u64,
                "VM sampled"
            );
            match sampled {
                Ok((vm, was_quiet)) => {
                    if was_quiet {
                        quiet.insert(vm.pid);
                    }
                    vms.push(vm)
                }
                Err(e) if e.is_vanished() => {
                    tracing::debug!(pid, "VM exited");
                    self.known.remove(&pid);
                    self.counters.vms_exited += 1;
                    self.counters.vanished_mid_read += 1;
                }
                Err(e) => {
                    tracing::debug!(pid, error = %e, "skipping a VM this tick");
                    self.counters.vms_skipped += 1;
                }
            }
        }
        let known = &self.known;
        self.memory.retain(|pid| known.contains_key(&pid));
        self.managed.retain(|pid| known.contains_key(pid));
        let tracked: Vec<TrackedVm> = vms
            .iter()
            .map(|vm| TrackedVm {
                pid: vm.pid,
                vcpus: vm.vcpus.iter().map(|v| (v.index, v.tid)).collect(),
                other_threads: vm.other_threads.clone(),
            })
            .collect();
        let tt = std::time::Instant::now();
        self.telemetry.track(&tracked);
        let track_ns = tt.elapsed().as_nanos() as u64;
        let mut snapshot = Snapshot {
            now_ns,
            topology: self.topology.clone(),
            vms,
            settings,
        };
        let tf = std::time::Instant::now();
        self.telemetry.fill(&mut snapshot, &quiet);
        let telemetry_ns = tf.elapsed().as_nanos() as u64;
        // What a quiet tick reports of each VM read in full now.
        for vm in &snapshot.vms {
            if !quiet.contains(&vm.pid)
                && let Some(k) = self.known.get_mut(&vm.pid)
            {
                k.last = Some(vm.clone());
                k.telemetry_active = self.telemetry_active;
            }
        }
        self.ksm_sharing.fill(&mut snapshot);
        let tw = std::time::Instant::now();
        if self.paths.is_live_proc()
            && let Some(write_heat) = self.write_heat.as_mut()
        {
            let memory = &self.memory;
            write_heat.fill(
                &mut snapshot,
                |pid| memory.moving(pid),
                |pid, starts| {
                    super::ebpf_source::regions_nodes(
                        pid,
                        starts,
                        super::write_heat::REGION_BYTES,
                        super::write_heat::NODE_SAMPLES,
                    )
                },
            );
        }
        tracing::trace!(
            discover_ns,
            track_ns,
            fill_ns = tf.elapsed().as_nanos() as u64,
            telemetry_ns,
            write_heat_ns = tw.elapsed().as_nanos() as u64,
            total_ns = t0.elapsed().as_nanos() as u64,
            "observed"
        );
        Ok(snapshot)
    }

    fn note_adopted(&mut self, vm: VmId) {
        self.mark_managed(vm);
    }

    fn program_cost(&self) -> Option<crate::telemetry::ProgramCost> {
        self.telemetry.cost()
    }

    fn retune(&mut self, t: &crate::host::Tunables) {
        self.config.locality_target_pct = t.locality_target_pct;
        if let Some(w) = self.write_heat.as_mut() {
            w.set_locality_target_pct(t.locality_target_pct);
        }
    }

    fn note_outcome(&mut self, action: &PlannedAction, outcome: &ActionOutcome) {
        // Read the VM in full on the next tick, whatever the action did.
        if let Some(k) = self.known.get_mut(&action.vm) {
            k.acted_on = true;
        }
        if matches!(action.action, Action::MigrateMemory { .. }) {
            // Started: the reading is held until this move's outcome comes, which
            // is any other outcome (module doc of `memory`).
            if *outcome == ActionOutcome::Started {
                self.memory.note_move_started(action.vm);
            } else {
                self.memory.note_move_ended(action.vm);
            }
        }
        let moved_bytes = match outcome {
            ActionOutcome::Done { moved_bytes } | ActionOutcome::Partial { moved_bytes, .. } => {
                *moved_bytes
            }
            _ => return,
        };
        match &action.action {
            Action::SetCpus { .. } => self.mark_managed(action.vm),
            Action::MigrateMemory {
                from, to, within, ..
            } if moved_bytes > 0 => {
                self.note_migration(action.vm, *from, *to, moved_bytes, *within)
            }
            Action::MigrateProcessMemory { from, to, .. } if moved_bytes > 0 => self
                .memory
                .note_process_migration(action.vm, *from, *to, moved_bytes),
            Action::MigrateMemory { .. } | Action::MigrateProcessMemory { .. } => {}
        }
    }
}

/// A vCPU thread's CPU demand over the last interval: the share of the time it was
/// not waiting for a CPU that it ran, `run / (interval - wait)` from `schedstat`, at
/// most one CPU (one that waited all along wants one). `None` without two readings,
/// where the caller falls back to CPU time alone.
///
/// Why not CPU time alone: on a node whose CPUs are all taken, a busy vCPU runs only
/// part of the time, and what it gets depends on everything else running there
/// (other VMs, page copies of memory moves, the daemon). Equal VMs then look unequal
/// and the engine would swap them back and forth for nothing; in the lab's
/// `scattered` case two such swaps of identical VMs undid the memory moves just
/// finished. A busy vCPU that ran 0.4 s and waited 0.6 s wants a whole CPU.
///
/// Why not ran plus waited: a quiet vCPU waits for a CPU after every wake-up on a
/// busy node, and that wait is no CPU it would use elsewhere. In the lab's
/// `cheapest-move` case quiet VMs sharing a node with a busy one (5 ms of work per
/// 100 ms, then some 30 ms on the run queue after each wake-up) read 0.35 CPUs each
/// instead of 0.05: the node looked overloaded at 1.98 CPUs of demand while its VMs
/// wanted 1.35, and the price per CPU of the VMs there was wrong.
fn vcpu_demand(now: &ThreadState, before: Option<&ThreadState>, dt_s: Option<f64>) -> Option<f64> {
    let (now, before, dt_s) = (now.sched?, before?.sched?, dt_s?);
    let run_s = now.run_ns.saturating_sub(before.run_ns) as f64 / 1e9;
    let wait_s = now.wait_ns.saturating_sub(before.wait_ns) as f64 / 1e9;
    let free_s = dt_s - wait_s;
    if free_s <= run_s {
        return Some(if run_s + wait_s > 0.0 { 1.0 } else { 0.0 });
    }
    Some((run_s / free_s).min(1.0))
}

#[cfg(test)]
mod demand_tests {
    use super::*;

    #[test]
    fn demand_is_what_a_vcpu_runs_of_the_time_it_is_not_waiting() {
        let at = |run_ms: u64, wait_ms: u64| ThreadState {
            cpu_ticks: 0,
            sched: Some(procfs::SchedStat {
                run_ns: run_ms * 1_000_000,
                wait_ns: wait_ms * 1_000_000,
            }),
        };
        let zero = at(0, 0);
        // (ran ms, waited ms of a 1 s interval, CPUs wanted)
        let cases = [
            (400, 600, 1.0),  // starved busy vCPU: a whole CPU
            (400, 500, 0.8),  // ran 0.4 s of the 0.5 s it was not held back
            (1000, 0, 1.0),   // busy, not starved
            (50, 300, 0.071), // quiet, waits after each wake-up: not 0.35
            (50, 0, 0.05),    // quiet on an idle node
            (0, 0, 0.0),      // asleep
            (0, 1000, 1.0),   // waited all along
            (900, 900, 1.0),  // clock skew between the reads: never above one
        ];
        for (run, wait, want) in cases {
            let got = vcpu_demand(&at(run, wait), Some(&zero), Some(1.0)).unwrap();
            assert!((got - want).abs() < 1e-3, "ran {run} waited {wait}: {got}");
        }
        // No earlier reading, or no schedstat: the caller's CPU-time estimate.
        assert_eq!(vcpu_demand(&at(5, 0), None, Some(1.0)), None);
        let none = ThreadState {
            cpu_ticks: 0,
            sched: None,
        };
        assert_eq!(vcpu_demand(&none, Some(&zero), Some(1.0)), None);
    }
}
