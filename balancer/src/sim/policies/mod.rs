//! The contenders the simulator compares. vmbalancer ([`DaemonLoop`]) is the daemon
//! itself: its tick observes, plans, guards, applies and learns through the
//! simulated observer and actuator. The baselines ([`Baseline`]) are faithful models
//! of the systems named in the project notes, not vmbalancer's engine: each sees the
//! world only through snapshots and acts through
//! [`Applier::apply`](crate::host::Applier::apply); those that bind memory
//! (cpuset.mems, numactl) also call [`World::set_mems`].

mod daemon_loop;
mod manual;
mod numad;
mod oracle;
mod vmbalanced;

pub use daemon_loop::DaemonLoop;
pub use manual::Manual;
pub use numad::Numad;
pub use oracle::Oracle;
pub use vmbalanced::Vmbalanced;

use std::cell::RefCell;
use std::rc::Rc;

use crate::host::{Applier, Observer};
use crate::model::{Action, ActionOutcome, NodeId, PlannedAction, Reason, Snapshot};

use super::World;

/// The world, shared by a run and the contender's observer and actuator.
pub type SharedWorld = Rc<RefCell<World>>;

/// A contender driving the simulated world.
pub trait Policy {
    fn name(&self) -> &'static str;
    /// Whether VMs marked `bound_initially` start confined (cpusets left by a previous
    /// placement). Only "none" runs without cpusets.
    fn keeps_initial_binding(&self) -> bool {
        true
    }
    /// One simulated second: observe, decide, apply. Returns the actions applied.
    fn tick(&mut self, world: &SharedWorld) -> Vec<PlannedAction>;
}

/// A baseline: decides from a snapshot of the world and acts on it directly.
pub trait Baseline {
    fn name(&self) -> &'static str;
    /// See [`Policy::keeps_initial_binding`].
    fn keeps_initial_binding(&self) -> bool {
        true
    }
    /// One second: decide from `snap` and apply. Returns the actions applied.
    fn tick(&mut self, host: &mut World, snap: &Snapshot) -> Vec<PlannedAction>;
}

impl<B: Baseline> Policy for B {
    fn name(&self) -> &'static str {
        Baseline::name(self)
    }
    fn keeps_initial_binding(&self) -> bool {
        Baseline::keeps_initial_binding(self)
    }
    fn tick(&mut self, world: &SharedWorld) -> Vec<PlannedAction> {
        let mut world = world.borrow_mut();
        let snap = match world.observe() {
            Ok(s) => s,
            Err(never) => match never {},
        };
        Baseline::tick(self, &mut world, &snap)
    }
}

/// No balancer: the kernel scheduler alone.
pub struct NoBalancer;

impl Baseline for NoBalancer {
    fn name(&self) -> &'static str {
        "none"
    }
    fn keeps_initial_binding(&self) -> bool {
        false
    }
    fn tick(&mut self, _host: &mut World, _snap: &Snapshot) -> Vec<PlannedAction> {
        Vec::new()
    }
}

/// Policy names accepted by `--policy`.
pub const NAMES: &[&str] = &[
    "none",
    "manual",
    "vmbalanced",
    "numad",
    "oracle",
    "vmbalancer",
];

/// Builds a policy by name.
pub fn by_name(
    name: &str,
    scenario: &super::scenario::Scenario,
    engine_cfg: &crate::engine::EngineConfig,
) -> Option<Box<dyn Policy>> {
    Some(match name {
        "none" => Box::new(NoBalancer),
        "manual" => Box::new(Manual::default()),
        "vmbalanced" => Box::new(Vmbalanced::new(scenario.seed)),
        "numad" => Box::new(Numad::default()),
        "oracle" => Box::new(Oracle::new(scenario)),
        "vmbalancer" => Box::new(DaemonLoop::new(engine_cfg.clone())),
        _ => return None,
    })
}

/// Moves a whole VM to `node` the cpuset way: CPUs, allowed memory, and all its
/// memory migrated (`cpuset.memory_migrate`). Returns the actions applied.
pub(crate) fn cpuset_move(
    host: &mut World,
    snap: &Snapshot,
    pid: u32,
    node: usize,
    reason: Reason,
    migrate: bool,
) -> Vec<PlannedAction> {
    let mut out = Vec::new();
    let cpus = super::node_cpus(node, host.cpn);
    let a = PlannedAction {
        vm: pid,
        action: Action::SetCpus { vcpus: None, cpus },
        reason,
    };
    if matches!(host.apply(snap, &a), ActionOutcome::VmGone) {
        return out;
    }
    out.push(a);
    host.set_mems(pid, 1 << node);
    if migrate {
        out.extend(migrate_all(host, snap, pid, 1 << node, node));
    }
    out
}

/// Migrates all of a VM's memory outside `keep` to `to` (`migrate_pages`).
pub(crate) fn migrate_all(
    host: &mut World,
    snap: &Snapshot,
    pid: u32,
    keep: u64,
    to: usize,
) -> Vec<PlannedAction> {
    let mut out = Vec::new();
    let Some(vm) = snap.vms.iter().find(|v| v.pid == pid) else {
        return out;
    };
    for (n, &b) in vm.memory.bytes_per_node.iter().enumerate() {
        if b == 0 || keep & (1 << n) != 0 {
            continue;
        }
        let a = PlannedAction {
            vm: pid,
            action: Action::MigrateMemory {
                from: n as NodeId,
                to: to as NodeId,
                regions: Vec::new(),
                max_bytes: b,
                within: None,
            },
            reason: Reason::Locality {
                locality_pct: 0.0,
                target_pct: 100.0,
            },
        };
        host.apply(snap, &a);
        out.push(a);
    }
    out
}
