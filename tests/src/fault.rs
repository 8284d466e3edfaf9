//! Scaffolding of the daemon's tests on this host (`tests/fault_matrix.rs`, the
//! `fault_daemon` program it SIGKILLs, `tests/daemon_recovery.rs`): the daemon as
//! `vmbalancer run` builds it over an observer that always shows the same host and a
//! policy that plays a script, an actuator around the real Linux applier that kills
//! its own process at a chosen phase of a move, and what the tests read of a VM
//! afterwards.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use balancer::daemon::config::Config;
use balancer::daemon::journal::Journal;
use balancer::daemon::run::{Daemon, Shutdown};
use balancer::daemon::{Actuator, Policy};
use balancer::host::linux::actuate::{LinuxApplier, list_threads, sys};
use balancer::host::linux::{HostPaths, topology::read_topology};
use balancer::host::{Applier, Observer};
use balancer::model::{
    Action, ActionOutcome, CpuSet, OriginalSets, Plan, PlannedAction, QuietCounters, Reason,
    RestoreWhat, Snapshot, Vcpu, Vm, VmId,
};

/// Shows the same snapshot at every observation.
pub struct Fixed(pub Snapshot);

impl Observer for Fixed {
    type Error = std::io::Error;
    fn observe(&mut self) -> Result<Snapshot, std::io::Error> {
        Ok(self.0.clone())
    }
}

/// The daemon's defaults, with its state directory at `state` and its runtime
/// directory (the control socket) in `state/run`.
pub fn config(state: &Path) -> Config {
    Config {
        state_dir: state.to_path_buf(),
        runtime_dir: state.join("run"),
        ..Config::default()
    }
}

/// The daemon as `vmbalancer run` builds it (journal in `cfg.state_dir`, not a dry
/// run), observing the fixed view `snap`, acting through `actuator`, playing `policy`.
pub fn daemon<A: Actuator, P: Policy>(
    cfg: Config,
    snap: Snapshot,
    actuator: A,
    policy: P,
    stop: Shutdown,
) -> Daemon<Fixed, A, P> {
    let journal = Journal::open(&cfg.state_dir).expect("the journal in the state directory");
    Daemon::new(
        cfg,
        Fixed(snap),
        actuator,
        policy,
        Some(journal),
        stop,
        false,
    )
}

/// Plans the scripted plans in order, then nothing.
pub struct Script(pub VecDeque<Plan>);

impl Script {
    /// One plan per action, in order.
    pub fn actions(actions: Vec<PlannedAction>) -> Self {
        Self(
            actions
                .into_iter()
                .map(|a| Plan {
                    actions: vec![a],
                    ..Default::default()
                })
                .collect(),
        )
    }
}

impl Policy for Script {
    fn plan(&mut self, _s: &Snapshot) -> Plan {
        self.0.pop_front().unwrap_or_default()
    }
    fn feedback(&mut self, _a: &PlannedAction, _o: &ActionOutcome) {}
}

/// This host, with one VM: process `pid` whose threads `tids` are its vCPUs.
pub fn vm_snapshot(pid: u32, tids: &[u32], cgroup: Option<String>) -> Snapshot {
    Snapshot {
        topology: read_topology(&HostPaths::system()).expect("this host's topology"),
        vms: vec![Vm {
            pid,
            name: "fault-target".into(),
            cgroup,
            vcpus: tids
                .iter()
                .enumerate()
                .map(|(i, &tid)| Vcpu {
                    index: i as u32,
                    tid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Moves the whole VM to `cpus`.
pub fn set_cpus(vm: VmId, cpus: &str) -> PlannedAction {
    PlannedAction {
        vm,
        action: Action::SetCpus {
            vcpus: None,
            cpus: CpuSet::parse_list(cpus).expect("a CPU list"),
        },
        reason: Reason::CpuImbalance {
            from: 0,
            to: 0,
            imbalance_pct: 50.0,
        },
    }
}

/// Moves `[addr, addr+len)` of the VM from node 0 to node 1.
pub fn move_memory(vm: VmId, addr: u64, len: u64) -> PlannedAction {
    PlannedAction {
        vm,
        action: Action::MigrateMemory {
            from: 0,
            to: 1,
            regions: vec![(addr, len)],
            max_bytes: len,
            within: None,
        },
        reason: Reason::ProbationCommitted { node: 1 },
    }
}

/// The CPU affinity of every thread the process has now.
pub fn affinities(pid: u32) -> BTreeMap<u32, CpuSet> {
    list_threads(Path::new("/proc"), pid)
        .expect("the process's threads")
        .into_iter()
        .filter_map(|tid| sys::get_affinity(tid).ok().map(|s| (tid, s)))
        .collect()
}

/// The node of each page of `[addr, addr+len)` (negative: an error the kernel
/// gives for the page).
pub fn page_nodes(pid: u32, addr: u64, len: u64) -> Vec<i32> {
    let page = sys::page_size_bytes();
    let pages: Vec<u64> = (0..len / page).map(|i| addr + i * page).collect();
    let mut out = Vec::with_capacity(pages.len());
    for chunk in pages.chunks(4096) {
        let mut st = vec![i32::MIN; chunk.len()];
        sys::move_pages(pid, chunk, None, &mut st).expect("querying page nodes");
        out.extend(st);
    }
    out
}

/// Where in a move [`KillAt`] SIGKILLs its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The VM's sets are read, nothing is journaled or changed yet.
    Adopt,
    /// The journal names the action in flight; the host is not changed yet.
    Begin,
    /// The host changed; the journal still has the action in flight (also inside a
    /// recovery, which re-applies actions).
    Applied,
    /// A memory move runs on the mover threads.
    Moving,
    /// Shutting down: a VM's sets were put back, the journal still holds it.
    Restore,
    /// Not killed.
    Never,
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "adopt" => Phase::Adopt,
            "begin" => Phase::Begin,
            "applied" => Phase::Applied,
            "moving" => Phase::Moving,
            "restore" => Phase::Restore,
            "never" => Phase::Never,
            _ => return Err(format!("unknown phase {s:?}")),
        })
    }
}

/// The Linux applier, but the process SIGKILLs itself at `phase`.
pub struct KillAt {
    pub inner: LinuxApplier,
    pub phase: Phase,
}

impl KillAt {
    fn kill_if(&self, phase: Phase) {
        if self.phase == phase {
            eprintln!("fault_daemon: SIGKILL at {phase:?}");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

impl Applier for KillAt {
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome {
        self.kill_if(Phase::Begin);
        let out = self.inner.apply(snapshot, action);
        if out == ActionOutcome::Started {
            if self.phase == Phase::Moving {
                // Killed once the mover threads report the move as running.
                let progress = self.inner.progress_handle();
                let until = Instant::now() + Duration::from_secs(10);
                while Instant::now() < until
                    && !progress
                        .lock()
                        .map(|p| p.iter().any(|m| m.vm == action.vm))
                        .unwrap_or(false)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                self.kill_if(Phase::Moving);
            }
        } else {
            self.kill_if(Phase::Applied);
        }
        out
    }
}

impl Actuator for KillAt {
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        let o = Actuator::adopt(&mut self.inner, vm);
        self.kill_if(Phase::Adopt);
        o
    }
    fn readopt(&mut self, original: OriginalSets) {
        self.inner.readopt(original);
    }
    fn restore(&mut self, original: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        let out = Actuator::restore(&mut self.inner, original, what);
        self.kill_if(Phase::Restore);
        out
    }
    fn alive(&self, original: &OriginalSets) -> bool {
        self.inner.alive(original)
    }
    fn forget(&mut self, vm: u32) {
        Actuator::forget(&mut self.inner, vm);
    }
    fn counters(&self) -> QuietCounters {
        Actuator::counters(&self.inner)
    }
    fn move_in_background(&mut self) {
        Actuator::move_in_background(&mut self.inner);
    }
    fn ended_moves(&mut self, wait: Option<Duration>) -> Vec<(PlannedAction, ActionOutcome)> {
        Actuator::ended_moves(&mut self.inner, wait)
    }
}

/// Keeps a CPU busy until `stop`, sleeping a millisecond every 5: the programs
/// account run time when a thread is switched out, which a thread alone on an
/// otherwise idle CPU may never be.
pub fn spin_until(stop: &std::sync::atomic::AtomicBool) {
    let mut x = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let until = Instant::now() + Duration::from_millis(5);
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
