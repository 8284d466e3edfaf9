//! The applier of `vmbalancer trace` and `--dry-run`: logs each action, changes nothing.

use super::Applier;
use crate::model::{
    ActionOutcome, OriginalSets, PlannedAction, QuietCounters, RestoreWhat, Snapshot, Vm,
};

/// Logs actions instead of applying them.
#[derive(Debug, Default)]
pub struct LogOnly {
    /// Every action seen, in order (for `status` and tests).
    pub logged: Vec<PlannedAction>,
}

impl Applier for LogOnly {
    fn apply(&mut self, _snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome {
        tracing::info!(vm = action.vm, action = ?action.action, reason = ?action.reason, "would apply");
        self.logged.push(action.clone());
        ActionOutcome::LoggedOnly
    }
}

/// `--dry-run`: nothing is adopted, restored or moved.
impl crate::daemon::Actuator for LogOnly {
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        Some(OriginalSets {
            vm: vm.pid,
            ..Default::default()
        })
    }
    fn readopt(&mut self, _original: OriginalSets) {}
    fn restore(&mut self, original: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        tracing::info!(vm = original.vm, ?what, "would restore original sets");
        ActionOutcome::LoggedOnly
    }
    fn alive(&self, _original: &OriginalSets) -> bool {
        false
    }
    fn forget(&mut self, _vm: u32) {}
    fn counters(&self) -> QuietCounters {
        QuietCounters::default()
    }
}
