//! The applier of `vmbalancer trace` and `--dry-run`: logs each action, changes nothing.

use super::Applier;
use crate::model::{ActionOutcome, PlannedAction, Snapshot};

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
