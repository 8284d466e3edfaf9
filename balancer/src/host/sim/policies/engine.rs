//! vmbalancer's own engine, driven exactly like the daemon drives it:
//! `plan(snapshot)`, apply each action, feed back each outcome.

use crate::engine::{Engine, EngineConfig};
use crate::host::Applier;
use crate::model::{PlannedAction, Snapshot};

use super::{Policy, SimHost};

/// The engine as a simulator policy.
pub struct EnginePolicy {
    pub engine: Engine,
    pub refusals: u64,
}

impl EnginePolicy {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            engine: Engine::new(cfg),
            refusals: 0,
        }
    }
}

impl Policy for EnginePolicy {
    fn name(&self) -> &'static str {
        "vmbalancer"
    }

    fn tick(&mut self, host: &mut SimHost, snap: &Snapshot) -> Vec<PlannedAction> {
        let plan = self.engine.plan(snap);
        self.refusals += plan.refusals.len() as u64;
        for a in &plan.actions {
            let outcome = host.apply(snap, a);
            self.engine.record_outcome(a, &outcome);
        }
        plan.actions
    }
}
