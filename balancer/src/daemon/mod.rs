//! `vmbalancer run`: the tick loop, action journal, control socket and configuration.
//!
//! Why it is split this way: the loop ([`run`]) only sequences observe -> plan ->
//! journal -> apply -> read back -> feedback; what it talks to sits behind traits, so
//! the same loop drives the real host, a fake host in tests, `--dry-run`, and the
//! simulated world of `vmbalancer simulate` ([`crate::sim`]):
//! - [`crate::host::Observer`] builds snapshots;
//! - [`crate::host::Applier`] changes the host; [`Actuator`] adds what the daemon
//!   needs beyond one action (adoption, restore, counters, progress);
//! - [`Policy`] turns a snapshot into a plan and learns from outcomes.
//!
//! Everything else is a small module with one job: [`config`] (TOML + flags),
//! [`journal`] (moves in flight, crash recovery), [`control`] (the unix socket:
//! root, or a status group for reading), [`status`] (the document `vmbalancer
//! status` shows), [`notify`] (sd_notify), [`prometheus`] (optional metrics),
//! [`advice`] (numad-compatible placement advice, pure), [`wake`] (the wait between
//! ticks, cut short by kernel events).

pub mod advice;
pub mod config;
pub mod control;
pub mod journal;
pub mod notify;
pub mod policy;
pub mod prometheus;
pub mod run;
pub mod status;
pub mod wake;

use std::time::Duration;

use crate::host::Applier;
use crate::model::{
    ActionOutcome, OriginalSets, Plan, PlannedAction, QuietCounters, RestoreWhat, Snapshot, Vm,
};

/// The decision-maker the loop consults every tick. The engine implements it; tests
/// use scripted policies.
pub trait Policy {
    /// Plans this tick's actions from a snapshot (pure: no I/O, no clock).
    fn plan(&mut self, snapshot: &Snapshot) -> Plan;
    /// What happened to an action, as read back from the host.
    fn feedback(&mut self, action: &PlannedAction, outcome: &ActionOutcome);
    /// Probation timers running, for status.
    fn probations(&self) -> Vec<status::Probation> {
        Vec::new()
    }
    /// Takes a reloaded configuration, keeping what it learned so far (probations,
    /// recurrence, moves under way).
    fn reconfigure(&mut self, _cfg: &config::Config) {}
}

/// What the daemon needs from an applier beyond applying single actions.
pub trait Actuator: Applier {
    /// Records the VM's current sets before its first change; `None` when the VM is
    /// gone. Appliers that change nothing return an empty record.
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets>;
    /// Takes over a record from the journal of an earlier run.
    fn readopt(&mut self, original: OriginalSets);
    /// Puts back recorded sets.
    fn restore(&mut self, original: &OriginalSets, what: RestoreWhat) -> ActionOutcome;
    /// Puts back the CPU sets of a VM the daemon lets go of (`original` already
    /// reduced to what the operator's pin does not cover). Appliers that know what
    /// they wrote leave a set someone changed since; the others restore the CPU sets.
    fn release(&mut self, original: &OriginalSets) -> ActionOutcome {
        self.restore(
            original,
            RestoreWhat {
                cpus: true,
                mems: false,
            },
        )
    }
    /// Whether the recorded process is still the same one (not a reused pid).
    fn alive(&self, original: &OriginalSets) -> bool;
    /// Forgets an exited VM.
    fn forget(&mut self, vm: u32);
    fn counters(&self) -> QuietCounters;
    /// From now on memory moves may run in the background: `apply` then answers
    /// `ActionOutcome::Started` and [`Actuator::ended_moves`] brings the outcome.
    /// Appliers without a worker keep applying everything at once.
    fn move_in_background(&mut self) {}
    /// Background moves that ended, each with the action it carried out (a VM's
    /// moves may end in any order); with `wait`, waits that long for every move
    /// still running (after a stop request they end at their next batch boundary).
    fn ended_moves(&mut self, _wait: Option<Duration>) -> Vec<(PlannedAction, ActionOutcome)> {
        Vec::new()
    }
}
