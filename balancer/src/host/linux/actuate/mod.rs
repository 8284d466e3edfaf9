//! The Linux [`Applier`]: changes where VMs run and where their memory is, and reads
//! every change back from the host before reporting it.
//!
//! Why it is built this way:
//! - CPU sets of libvirt VMs are written to their cgroup's `vcpuN`/`emulator` groups
//!   (libvirt would undo, and the cpuset may refuse, a plain sched_setaffinity); plain
//!   qemu processes get sched_setaffinity on every thread ([`cpus`]).
//! - Memory moves with large move_pages batches on several threads, hot regions
//!   first and rate-limited ([`pages`], planned and checked in [`memory`]). While pages move, `cpuset.mems` is widened to old+new so new
//!   allocations may land on the target, and narrowed only when nothing is left
//!   behind: on cgroup v2 narrowing would migrate the rest of the VM at once.
//! - The sets a VM had when vmbalancer first touched it are recorded
//!   ([`OriginalSets`]) so a revert or a shutdown puts them back, and the daemon's
//!   journal can do the same after a crash.
//! - VMs exit and threads come and go at any time. ESRCH, a vanished thread or a
//!   removed cgroup is counted in [`QuietCounters`] and logged at debug level, and the
//!   action ends as `VmGone` or with the surviving threads; never as an error storm.
//! - No set written is ever empty, and a failed multi-step change is rolled back.
//!
//! Only the few files actuation needs are read here (cpuset files, `/proc/PID/task`,
//! `/proc/PID/maps`, a node's `meminfo`, the online CPU list); everything else comes
//! from the [`Snapshot`]. Every path is under a configurable root.

pub mod cgroup;
pub mod cpus;
pub mod memory;
pub mod pages;
pub mod rate;
pub mod refusal;
pub mod sys;
pub mod worker;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use self::cgroup::{CpusetFs, LibvirtGroups, SetKind};
pub use self::refusal::{Refusal, Shortfall};
use super::{HostError, procfs, read_idset};
use crate::host::Applier;
use crate::model::{Action, ActionOutcome, CpuSet, NodeSet, PlannedAction, Snapshot, Vm, VmId};
pub use crate::model::{GroupSets, MigrationProgress, OriginalSets, QuietCounters, RestoreWhat};

/// Settings of the Linux applier.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplierConfig {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Page migration budget for all VMs together.
    pub rate_limit_bytes_per_s: u64,
    /// Pages per move_pages call.
    pub batch_pages: u64,
    /// Mover threads shared by all moves (move_pages is CPU-bound in the caller).
    pub migration_threads: usize,
    /// Nice value of the background mover's threads.
    pub migration_nice: i32,
    /// Free memory a target node must keep after a move.
    pub headroom_bytes: u64,
    /// CPUs never given to VMs.
    pub reserved_cpus: CpuSet,
}

impl Default for ApplierConfig {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            rate_limit_bytes_per_s: 256 << 20,
            batch_pages: 8192,
            migration_threads: 4,
            migration_nice: 0,
            headroom_bytes: 512 << 20,
            reserved_cpus: CpuSet::new(),
        }
    }
}

/// The real Linux applier.
pub struct LinuxApplier {
    cfg: ApplierConfig,
    cpuset: Option<CpusetFs>,
    originals: BTreeMap<VmId, OriginalSets>,
    /// The CPU set this applier last wrote to each cpuset group, so letting go of a VM
    /// puts back only the groups nobody changed since ([`Self::release`]).
    written_cpus: BTreeMap<PathBuf, CpuSet>,
    counters: QuietCounters,
    /// The memory moves running, for status.
    progress: Arc<Mutex<Vec<MigrationProgress>>>,
    page_size_bytes: u64,
    /// The shared rate limit of page moves.
    limit: Arc<rate::RateLimit>,
    /// Runs memory moves off the caller's thread once [`Self::move_in_background`]
    /// was called; `None`: moves run inside `apply`.
    worker: Option<worker::MoveWorker>,
}

impl LinuxApplier {
    /// A new applier; finds the cpuset interface under `cfg.cgroup_root`.
    pub fn new(cfg: ApplierConfig) -> Self {
        let cpuset = CpusetFs::detect(&cfg.cgroup_root);
        tracing::debug!(?cpuset, "cpuset interface");
        Self {
            limit: Arc::new(rate::RateLimit::new(
                cfg.rate_limit_bytes_per_s,
                Arc::new(AtomicBool::new(false)),
            )),
            cfg,
            cpuset,
            originals: BTreeMap::new(),
            written_cpus: BTreeMap::new(),
            counters: QuietCounters::default(),
            progress: Arc::new(Mutex::new(Vec::new())),
            page_size_bytes: sys::page_size_bytes(),
            worker: None,
        }
    }

    /// From now on memory moves run on the mover threads: `apply` checks and prepares
    /// them, returns `ActionOutcome::Started`, and [`Self::ended_moves`] reports
    /// their outcomes. Stays synchronous if the thread cannot be started.
    pub fn move_in_background(&mut self) {
        if self.worker.is_some() {
            return;
        }
        match worker::MoveWorker::spawn(
            self.mover_settings(),
            self.cfg.migration_nice,
            self.limit.clone(),
            self.progress.clone(),
        ) {
            Ok(w) => self.worker = Some(w),
            Err(e) => tracing::warn!(error = %e, "no mover thread: memory moves run on the tick"),
        }
    }

    /// Outcomes of background moves that ended since the last call, by VM; with
    /// `wait`, waits up to that long for every move in flight to end.
    pub fn ended_moves(
        &mut self,
        wait: Option<std::time::Duration>,
    ) -> Vec<(PlannedAction, ActionOutcome)> {
        let Some(w) = self.worker.as_mut() else {
            return Vec::new();
        };
        let ended = match wait {
            Some(limit) => w.wait_all(limit),
            None => w.ended(),
        };
        ended
            .into_iter()
            .filter_map(|(mut p, result)| {
                let planned = p.planned.take();
                let outcome = memory::finish(self, p, result);
                Some((planned?, outcome))
            })
            .collect()
    }

    /// A memory move: prepared here; run now, or handed to the worker.
    fn migrate_memory(
        &mut self,
        snapshot: &Snapshot,
        planned: &PlannedAction,
        vm: &Vm,
        (from, to): (u32, u32),
        scope: memory::Scope<'_>,
        max_bytes: u64,
    ) -> ActionOutcome {
        let mut p = match memory::prepare(self, snapshot, vm, from, to, scope, max_bytes) {
            Ok(p) => p,
            Err(refused) => return refused,
        };
        p.planned = Some(planned.clone());
        let batch_pages = self.mover_settings().batch_pages;
        let p = match self.worker.as_mut() {
            Some(w) => match w.submit(p, batch_pages) {
                Ok(()) => return ActionOutcome::Started,
                // The worker is gone: run the move here rather than lose it.
                Err(p) => *p,
            },
            None => p,
        };
        let result = memory::move_prepared(&p, self.mover_settings(), &self.limit, &self.progress);
        memory::finish(self, p, result)
    }

    /// Uses `flag` as the stop signal: a running migration stops at the next batch
    /// boundary once it is set.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.limit = Arc::new(rate::RateLimit::new(self.cfg.rate_limit_bytes_per_s, flag));
        self
    }

    /// How page moves are carried out.
    pub fn mover_settings(&self) -> pages::MoverSettings {
        pages::MoverSettings {
            threads: self.cfg.migration_threads,
            batch_pages: pages::paced_batch_pages(
                self.cfg.batch_pages,
                self.cfg.rate_limit_bytes_per_s,
                self.page_size_bytes,
            ),
        }
    }

    /// The live progress of the memory moves running, for status.
    pub fn progress_handle(&self) -> Arc<Mutex<Vec<MigrationProgress>>> {
        self.progress.clone()
    }

    pub fn counters(&self) -> &QuietCounters {
        &self.counters
    }

    pub fn cpuset_fs(&self) -> Option<&CpusetFs> {
        self.cpuset.as_ref()
    }

    /// Sets recorded at adoption, by VM.
    pub fn originals(&self) -> &BTreeMap<VmId, OriginalSets> {
        &self.originals
    }

    /// Takes over originals recorded by an earlier run (from the journal).
    pub fn insert_original(&mut self, o: OriginalSets) {
        self.originals.insert(o.vm, o);
    }

    /// Forgets a VM that exited.
    pub fn forget(&mut self, vm: VmId) {
        if let Some(o) = self.originals.remove(&vm) {
            for g in &o.groups {
                self.written_cpus.remove(&g.dir);
            }
        }
    }

    /// Lets go of a VM: puts back the CPU sets of `o` (the record already reduced to
    /// what the operator's pin does not cover, [`OriginalSets::released`]) whose
    /// group still holds what this applier last wrote there. A group changed since is
    /// someone else's now: the operator pins vCPUs one `virsh vcpupin` at a time, and
    /// the next one may land between the observation that saw the first and this
    /// write. Groups this applier never wrote (e.g. before a restart) stay as they are.
    pub fn release(&mut self, o: &OriginalSets) -> ActionOutcome {
        let mut ours = o.clone();
        ours.groups.retain(|g| {
            let now = cgroup::read_set(&g.dir, SetKind::Cpus).ok();
            let mine = self.written_cpus.get(&g.dir);
            let keep = mine.is_some() && now.as_ref() == mine;
            if !keep {
                tracing::debug!(group = %g.dir.display(), ?now, ?mine, "not ours any more: left as it is");
            }
            keep
        });
        if ours.groups.is_empty() {
            return ActionOutcome::Done { moved_bytes: 0 };
        }
        let what = RestoreWhat {
            cpus: true,
            mems: false,
        };
        self.restore(&ours, what)
    }

    /// Records the VM's current sets unless already recorded. `None` when the VM is
    /// gone.
    pub fn adopt(&mut self, vm: &Vm) -> Option<&OriginalSets> {
        if !self.originals.contains_key(&vm.pid) {
            let start_time_ticks = process_start_ticks(&self.cfg.proc_root, vm.pid)?;
            let mut threads = BTreeMap::new();
            for tid in list_threads(&self.cfg.proc_root, vm.pid).ok()? {
                match sys::get_affinity(tid) {
                    Ok(set) => {
                        threads.insert(tid, set);
                    }
                    Err(_) => self.counters.threads_gone += 1,
                }
            }
            let groups = self
                .vm_groups(vm)
                .map(|(_, g)| {
                    g.all()
                        .into_iter()
                        .filter_map(|dir| self.read_group(&dir))
                        .collect()
                })
                .or_else(|| {
                    let (fs, dir) = self.vm_dir(vm)?;
                    fs.has_cpuset(&dir)
                        .then(|| self.read_group(&dir).into_iter().collect())
                })
                .unwrap_or_default();
            tracing::debug!(vm = vm.pid, threads = threads.len(), "adopted VM");
            self.originals.insert(
                vm.pid,
                OriginalSets {
                    vm: vm.pid,
                    start_time_ticks,
                    threads,
                    groups,
                },
            );
        }
        self.originals.get(&vm.pid)
    }

    fn read_group(&self, dir: &Path) -> Option<GroupSets> {
        let fs = self.cpuset.as_ref()?;
        Some(GroupSets {
            dir: dir.to_path_buf(),
            cpus: cgroup::read_set(dir, SetKind::Cpus).ok()?,
            mems: cgroup::read_set(dir, SetKind::Mems).ok()?,
            memory_migrate: fs.memory_migrate(dir).ok().flatten(),
        })
    }

    /// The VM's own cpuset group, when it has one.
    fn vm_dir(&self, vm: &Vm) -> Option<(&CpusetFs, PathBuf)> {
        let fs = self.cpuset.as_ref()?;
        let rel = vm.cgroup.as_deref()?;
        let dir = fs.dir(rel);
        (dir != fs.mount() && dir.is_dir()).then_some((fs, dir))
    }

    /// The VM's libvirt per-thread groups, when it has them.
    fn vm_groups(&self, vm: &Vm) -> Option<(&CpusetFs, LibvirtGroups)> {
        let (fs, dir) = self.vm_dir(vm)?;
        LibvirtGroups::find(fs, &dir).map(|g| (fs, g))
    }

    /// Puts back a VM's original sets. CPU sets: children first on the way down,
    /// so every write keeps child within parent; thread affinities when the VM has
    /// no group or one was removed ([`Self::restore_threads`]). `mems` is restored
    /// only when asked: on cgroup v2 that migrates pages back.
    pub fn restore(&mut self, o: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        if !self.same_process(o) {
            self.counters.vm_gone += 1;
            return ActionOutcome::VmGone;
        }
        let mut problems = Vec::new();
        // Parents must first allow what the children get back (they may have been
        // narrowed by someone else meanwhile), then children, then parents exactly.
        for kind in [SetKind::Cpus, SetKind::Mems] {
            let wanted = match kind {
                SetKind::Cpus => what.cpus,
                SetKind::Mems => what.mems,
            };
            if !wanted {
                continue;
            }
            let value = |g: &GroupSets| match kind {
                SetKind::Cpus => g.cpus.clone(),
                SetKind::Mems => g.mems.clone(),
            };
            let all: NodeSet = o
                .groups
                .iter()
                .fold(NodeSet::new(), |a, g| a.union(&value(g)));
            for g in &o.groups {
                if let Ok(eff) = cgroup::read_effective(&g.dir, kind)
                    && !value(g).is_subset(&eff)
                    && let Ok(base) = cgroup::widen_base(&g.dir, kind)
                    && let Err(e) = cgroup::write_set(&g.dir, kind, &base.union(&all))
                {
                    self.note_io(&g.dir, e, &mut problems);
                }
            }
            let Some(fs) = self.cpuset.clone() else {
                continue;
            };
            for g in o.groups.iter().rev() {
                if let Err(e) = cgroup::write_recorded(&fs, &g.dir, kind, &value(g)) {
                    self.note_io(&g.dir, e, &mut problems);
                } else if kind == SetKind::Cpus {
                    self.written_cpus.remove(&g.dir);
                }
            }
        }
        // Threads too when the VM has no group, or when a group it had was removed
        // meanwhile: the applier then moved its threads one by one.
        let group_gone = o.groups.iter().any(|g| !g.dir.is_dir());
        if what.cpus && (o.groups.is_empty() || group_gone) {
            self.restore_threads(o, &mut problems);
        }
        cpu_change_outcome(problems)
    }

    /// Puts back the affinity of the VM's threads as they are now. Only its current
    /// threads: a recorded thread that exited may have left its id to a thread of
    /// another process. A thread born since adoption inherited its set from a thread
    /// the daemon had moved; it gets the set the main thread had at adoption.
    fn restore_threads(&mut self, o: &OriginalSets, problems: &mut Vec<Shortfall>) {
        let Ok(current) = list_threads(&self.cfg.proc_root, o.vm) else {
            self.counters.vm_gone += 1;
            return;
        };
        let born_since = o.threads.get(&o.vm);
        for tid in current {
            let Some(set) = o.threads.get(&tid).or(born_since) else {
                continue;
            };
            match sys::set_affinity(tid, set) {
                Ok(()) => {}
                Err(nix::Error::ESRCH) => self.counters.threads_gone += 1,
                Err(errno) => problems.push(Shortfall::Affinity { tid, errno }),
            }
        }
    }

    /// Restores the CPU sets of every adopted VM (shutdown with `restore_on_exit`).
    pub fn restore_all_cpus(&mut self) -> Vec<(VmId, ActionOutcome)> {
        let all: Vec<OriginalSets> = self.originals.values().cloned().collect();
        all.iter()
            .map(|o| {
                let what = RestoreWhat {
                    cpus: true,
                    mems: false,
                };
                (o.vm, self.restore(o, what))
            })
            .collect()
    }

    /// Whether `o.vm` is still the process that was adopted.
    pub fn same_process(&self, o: &OriginalSets) -> bool {
        process_start_ticks(&self.cfg.proc_root, o.vm) == Some(o.start_time_ticks)
    }

    fn note_io(&mut self, dir: &Path, e: io::Error, problems: &mut Vec<Shortfall>) {
        if e.kind() == io::ErrorKind::NotFound {
            self.counters.cgroups_gone += 1;
            tracing::debug!(dir = %dir.display(), "cgroup removed under us");
        } else {
            problems.push(Shortfall::Cgroup {
                dir: dir.to_path_buf(),
                source: e,
            });
        }
    }

    fn refuse(&mut self, vm: VmId, why: Refusal) -> ActionOutcome {
        self.counters.refused += 1;
        let why = why.to_string();
        tracing::info!(vm, %why, "action refused");
        ActionOutcome::Refused { why }
    }

    fn gone(&mut self, vm: VmId) -> ActionOutcome {
        self.counters.vm_gone += 1;
        tracing::debug!(vm, "VM exited before or during the action");
        ActionOutcome::VmGone
    }
}

impl Applier for LinuxApplier {
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome {
        let fallback;
        let vm = match snapshot.vms.iter().find(|v| v.pid == action.vm) {
            Some(vm) => vm,
            None => {
                // Not in the snapshot (e.g. an action from the journal): act on what
                // the host shows.
                fallback = Vm {
                    pid: action.vm,
                    ..Default::default()
                };
                &fallback
            }
        };
        if !self.cfg.proc_root.join(vm.pid.to_string()).is_dir() {
            return self.gone(vm.pid);
        }
        // The engine plans no page move for such a VM; this guards any other planner.
        if action.action.moves_memory()
            && let Some(fixed) = &vm.memory.not_movable
        {
            return self.refuse(vm.pid, Refusal::NotMovable(fixed.clone()));
        }
        if self.adopt(vm).is_none() {
            return self.gone(vm.pid);
        }
        match &action.action {
            Action::SetCpus { vcpus, cpus } => {
                cpus::set_cpus(self, snapshot, vm, vcpus.as_deref(), cpus)
            }
            Action::MigrateMemory {
                from,
                to,
                regions,
                max_bytes,
                within,
            } => {
                let scope = match within {
                    _ if !regions.is_empty() => memory::Scope::Regions(regions),
                    Some(range) => memory::Scope::Within(*range),
                    None => memory::Scope::WholeVm,
                };
                self.migrate_memory(snapshot, action, vm, (*from, *to), scope, *max_bytes)
            }
            Action::MigrateProcessMemory {
                from,
                to,
                max_bytes,
            } => self.migrate_memory(
                snapshot,
                action,
                vm,
                (*from, *to),
                memory::Scope::ProcessOwn,
                *max_bytes,
            ),
        }
    }

    /// The reserved CPUs and headroom guard the next actions; the rate limit paces
    /// the next batch of every move, those under way included.
    fn retune(&mut self, t: &crate::host::Tunables) {
        self.cfg.reserved_cpus = t.reserved_cpus.clone();
        self.cfg.headroom_bytes = t.headroom_bytes;
        self.cfg.rate_limit_bytes_per_s = t.rate_limit_bytes_per_s;
        self.limit.set_bytes_per_s(t.rate_limit_bytes_per_s);
    }
}

/// Thread ids of a process, from `/proc/PID/task` (the observer's reader).
pub fn list_threads(proc_root: &Path, pid: u32) -> Result<Vec<u32>, HostError> {
    procfs::list_tasks(proc_root, pid)
}

/// Start time of the process in clock ticks (`/proc/PID/stat` field 22, read by the
/// observer's reader); `None` when it is gone or its `stat` does not parse.
pub fn process_start_ticks(proc_root: &Path, pid: u32) -> Option<u64> {
    match procfs::read_stat(proc_root, pid) {
        Ok(stat) => Some(stat.starttime_ticks),
        Err(e) => {
            if !e.is_vanished() {
                tracing::warn!(pid, error = %e, "cannot read the process start time");
            }
            None
        }
    }
}

/// CPUs online on the host (`devices/system/cpu/online`).
pub fn online_cpus(sys_root: &Path) -> Result<CpuSet, HostError> {
    read_idset(&sys_root.join("devices/system/cpu/online"))
}

/// The outcome of a CPU-set change (no pages move): done when every thread or group
/// read back as asked, partial with what differed otherwise.
fn cpu_change_outcome(problems: Vec<Shortfall>) -> ActionOutcome {
    if problems.is_empty() {
        ActionOutcome::Done { moved_bytes: 0 }
    } else {
        let why: Vec<String> = problems.iter().map(ToString::to_string).collect();
        ActionOutcome::Partial {
            moved_bytes: 0,
            left_bytes: 0,
            why: why.join("; "),
        }
    }
}

/// The daemon's view of the real applier.
impl crate::daemon::Actuator for LinuxApplier {
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        LinuxApplier::adopt(self, vm).cloned()
    }
    fn readopt(&mut self, original: OriginalSets) {
        self.insert_original(original);
    }
    fn restore(&mut self, original: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        LinuxApplier::restore(self, original, what)
    }
    fn release(&mut self, original: &OriginalSets) -> ActionOutcome {
        LinuxApplier::release(self, original)
    }
    fn alive(&self, original: &OriginalSets) -> bool {
        self.same_process(original)
    }
    fn forget(&mut self, vm: u32) {
        LinuxApplier::forget(self, vm);
    }
    fn counters(&self) -> QuietCounters {
        LinuxApplier::counters(self).clone()
    }
    fn move_in_background(&mut self) {
        LinuxApplier::move_in_background(self);
    }
    fn ended_moves(
        &mut self,
        wait: Option<std::time::Duration>,
    ) -> Vec<(PlannedAction, ActionOutcome)> {
        LinuxApplier::ended_moves(self, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process() {
        let proc_root = Path::new("/proc");
        let me = std::process::id();
        let t = process_start_ticks(proc_root, me).unwrap();
        assert!(t > 0);
        assert_eq!(process_start_ticks(proc_root, me), Some(t));
        assert!(list_threads(proc_root, me).unwrap().contains(&me));
        assert!(!online_cpus(Path::new("/sys")).unwrap().is_empty());
    }

    #[test]
    fn adopts_and_restores_own_thread_affinity() {
        // A helper thread of this test process plays the VM's thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = sys::get_affinity(tid).unwrap();
        let mut a = LinuxApplier::new(ApplierConfig::default());
        let vm = Vm {
            pid: std::process::id(),
            ..Default::default()
        };
        let o = a.adopt(&vm).unwrap().clone();
        assert_eq!(o.threads.get(&tid), Some(&before));
        sys::set_affinity(tid, &CpuSet::parse_list("0").unwrap()).unwrap();
        let out = a.restore(
            &o,
            RestoreWhat {
                cpus: true,
                mems: false,
            },
        );
        assert_eq!(out, ActionOutcome::Done { moved_bytes: 0 });
        assert_eq!(sys::get_affinity(tid).unwrap(), before);
        done_tx.send(()).unwrap();
        h.join().unwrap();
        // Restoring the main test thread's set too is harmless: same values.
    }
}
