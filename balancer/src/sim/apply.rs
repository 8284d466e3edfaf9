//! How the world changes when acted on: [`Applier`] for the world (what the baseline
//! policies call), and [`SimActuator`], the daemon's [`Actuator`] over a shared world.

use std::cell::RefCell;
use std::rc::Rc;

use std::time::Duration;

use crate::daemon::Actuator;
use crate::host::Applier;
use crate::host::linux::actuate::{OriginalSets, QuietCounters, RestoreWhat};
use crate::model::{Action, ActionOutcome, PlannedAction, Snapshot, Vm};

use super::world::{GIB, GUEST_BASE, MigJob, World};

impl Applier for World {
    fn apply(&mut self, _snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome {
        let Some(i) = self.vm_index(action.vm) else {
            return ActionOutcome::VmGone;
        };
        if !self.vms[i].alive {
            return ActionOutcome::VmGone;
        }
        if self.group(i).operator_pinned {
            return ActionOutcome::Refused {
                why: "VM is pinned by the operator".into(),
            };
        }
        match &action.action {
            // Simulated VMs have no process memory besides guest RAM (their snapshots
            // report none, so the engine never plans this here).
            Action::MigrateProcessMemory { .. } => ActionOutcome::Refused {
                why: "the simulator models no process memory outside guest RAM".into(),
            },
            Action::SetCpus { vcpus, cpus } => {
                let mut mask = 0u64;
                for c in cpus.iter() {
                    let n = (c / self.cpn) as usize;
                    if n < self.nn {
                        mask |= 1 << n;
                    }
                }
                if mask == 0 {
                    return ActionOutcome::Refused {
                        why: "empty CPU set".into(),
                    };
                }
                for (j, v) in self.vms[i].vcpus.iter_mut().enumerate() {
                    if vcpus.as_ref().is_none_or(|l| l.contains(&(j as u32))) {
                        v.cpus = cpus.clone();
                        v.allowed = mask;
                    }
                }
                // The scheduler honours a new affinity at once.
                let load = self.node_load();
                for v in self.vms[i].vcpus.iter_mut() {
                    if v.allowed & (1 << v.node) == 0 {
                        v.node = (0..self.nn)
                            .filter(|n| mask & (1 << n) != 0)
                            .min_by(|&a, &b| {
                                (load[a] / self.cap[a]).total_cmp(&(load[b] / self.cap[b]))
                            })
                            .unwrap_or(v.node);
                    }
                }
                ActionOutcome::Done { moved_bytes: 0 }
            }
            Action::MigrateMemory {
                from,
                to,
                regions,
                max_bytes,
                within,
            } => {
                let (from, to) = (*from as usize, *to as usize);
                if from >= self.nn || to >= self.nn || from == to {
                    return ActionOutcome::Refused {
                        why: "bad nodes".into(),
                    };
                }
                let ncells = self.vms[i].cells.len();
                let cell = if ncells > 1 {
                    let g = self.group(i);
                    let span = (g.mem_gib * GIB) as u64 / ncells as u64;
                    let base = GUEST_BASE + i as u64 * (1u64 << 40);
                    within
                        .or(regions.first().copied())
                        .map(|(a, _)| ((a.saturating_sub(base)) / span.max(1)) as usize)
                        .filter(|&c| c < ncells)
                } else {
                    None
                };
                let avail: f64 = self.vms[i]
                    .cells
                    .iter()
                    .enumerate()
                    .filter(|(ci, _)| cell.is_none_or(|c| c == *ci))
                    .map(|(_, c)| c.on(from))
                    .sum();
                let bytes = (*max_bytes as f64).min(avail);
                // As the real applier does with cpuset.mems: the target becomes allowed.
                self.vms[i].mems_allowed |= 1 << to;
                if bytes <= 0.0 {
                    return ActionOutcome::Done { moved_bytes: 0 };
                }
                self.jobs.push(MigJob {
                    vm: i,
                    cell,
                    from,
                    to,
                    remaining: bytes,
                    hot_first: !regions.is_empty(),
                    moved: 0.0,
                    reported: self.background_moves.then(|| action.clone()),
                });
                if self.background_moves {
                    return ActionOutcome::Started;
                }
                let now = bytes.min(self.params.migrate_bytes_per_s);
                if now >= bytes {
                    ActionOutcome::Done {
                        moved_bytes: bytes as u64,
                    }
                } else {
                    ActionOutcome::Partial {
                        moved_bytes: now as u64,
                        left_bytes: (bytes - now) as u64,
                        why: "continues in the background at the migration bandwidth".into(),
                    }
                }
            }
        }
    }
}

/// The daemon's actuator on a shared world. Memory moves run in the background once
/// the daemon asks for it, as on Linux: `MigrateMemory` answers `Started` and the
/// outcome comes through [`Actuator::ended_moves`] when the world has moved the
/// pages at the migration bandwidth. Every action applied is kept for the run's
/// summary ([`SimActuator::take_applied`]).
pub struct SimActuator {
    world: Rc<RefCell<World>>,
    applied: Vec<PlannedAction>,
}

impl SimActuator {
    pub fn new(world: Rc<RefCell<World>>) -> Self {
        Self {
            world,
            applied: Vec::new(),
        }
    }

    /// The actions applied since the last call.
    pub fn take_applied(&mut self) -> Vec<PlannedAction> {
        std::mem::take(&mut self.applied)
    }
}

impl Applier for SimActuator {
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome {
        let outcome = self.world.borrow_mut().apply(snapshot, action);
        if outcome != ActionOutcome::VmGone {
            self.applied.push(action.clone());
        }
        outcome
    }
}

impl Actuator for SimActuator {
    /// The world keeps no original sets to restore: a simulated run ends with the
    /// world, so the record is only the VM's pid.
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        let world = self.world.borrow();
        let i = world.vm_index(vm.pid)?;
        world.vms[i].alive.then(|| OriginalSets {
            vm: vm.pid,
            ..Default::default()
        })
    }
    fn readopt(&mut self, _original: OriginalSets) {}
    fn restore(&mut self, _original: &OriginalSets, _what: RestoreWhat) -> ActionOutcome {
        ActionOutcome::Refused {
            why: "the simulator keeps no original sets".into(),
        }
    }
    fn alive(&self, original: &OriginalSets) -> bool {
        let world = self.world.borrow();
        world
            .vm_index(original.vm)
            .is_some_and(|i| world.vms[i].alive)
    }
    fn forget(&mut self, _vm: u32) {}
    fn counters(&self) -> QuietCounters {
        QuietCounters::default()
    }
    fn move_in_background(&mut self) {
        self.world.borrow_mut().background_moves = true;
    }
    fn ended_moves(&mut self, _wait: Option<Duration>) -> Vec<(PlannedAction, ActionOutcome)> {
        self.world.borrow_mut().ended_moves()
    }
}
