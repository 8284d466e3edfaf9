//! Policies the simulator compares. Each sees the host only through snapshots and
//! acts through [`Applier::apply`](crate::host::Applier::apply) like the daemon does;
//! the baselines that bind memory (cpuset.mems, numactl) also call
//! [`SimHost::set_mems`]. Baselines are faithful models of the systems named in the
//! project notes, not vmbalancer's engine.

mod engine;
mod manual;
mod numad;
mod oracle;
mod vmbalanced;

pub use engine::EnginePolicy;
pub use manual::Manual;
pub use numad::Numad;
pub use oracle::Oracle;
pub use vmbalanced::Vmbalanced;

use crate::model::{Action, ActionOutcome, NodeId, PlannedAction, Reason, Snapshot};

use super::SimHost;
use crate::host::Applier;

/// A policy driving the simulated host.
pub trait Policy {
    fn name(&self) -> &'static str;
    /// Whether VMs marked `bound_initially` start confined (cpusets left by a previous
    /// placement). Only "none" runs without cpusets.
    fn keeps_initial_binding(&self) -> bool {
        true
    }
    /// One second: decide from `snap` and apply. Returns the actions applied.
    fn tick(&mut self, host: &mut SimHost, snap: &Snapshot) -> Vec<PlannedAction>;
}

/// No balancer: the kernel scheduler alone.
pub struct NoBalancer;

impl Policy for NoBalancer {
    fn name(&self) -> &'static str {
        "none"
    }
    fn keeps_initial_binding(&self) -> bool {
        false
    }
    fn tick(&mut self, _host: &mut SimHost, _snap: &Snapshot) -> Vec<PlannedAction> {
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
        "vmbalancer" => Box::new(EnginePolicy::new(engine_cfg.clone())),
        _ => return None,
    })
}

/// Moves a whole VM to `node` the cpuset way: CPUs, allowed memory, and all its
/// memory migrated (`cpuset.memory_migrate`). Returns the actions applied.
pub(crate) fn cpuset_move(
    host: &mut SimHost,
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
    host: &mut SimHost,
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
