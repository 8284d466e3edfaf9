//! The one boundary between vmbalancer and the world.
//!
//! An [`Observer`] turns the host into a [`Snapshot`]; an [`Applier`] carries out a
//! [`PlannedAction`] and reports what really happened. The daemon, the simulator and
//! the diagnostic mode all run `observe -> engine -> apply`; only the implementations
//! behind these traits differ:
//!
//! - [`linux`]: procfs, sysfs, cgroups, sched_setaffinity, move_pages;
//! - [`logonly`]: applies nothing and logs what would have been done;
//! - the simulated world ([`crate::sim`]), with a scheduler and a NUMA performance
//!   model, implements them in its own module: it is a world to run the daemon in,
//!   not a host.

pub mod linux;
pub mod logonly;

use crate::model::{ActionOutcome, PlannedAction, Snapshot, VmId};

/// Builds snapshots of a host.
pub trait Observer {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Observes the host now. Errors are for the host as a whole (e.g. sysfs missing);
    /// a VM that vanishes mid-read is simply left out of the snapshot.
    fn observe(&mut self) -> Result<Snapshot, Self::Error>;

    /// The balancer owns the placement of VM `vm` (it adopted the VM, now or in an
    /// earlier run): its narrowed CPU or memory sets are no longer an operator's pinning.
    fn note_adopted(&mut self, _vm: VmId) {}

    /// An action was applied and read back: observers that keep state between
    /// observations (e.g. memory per node read at a bounded rate) account for it.
    fn note_outcome(&mut self, _action: &PlannedAction, _outcome: &ActionOutcome) {}

    /// What the observer's eBPF programs cost so far, all programs together, as the
    /// kernel measures it; `None` when no program is loaded.
    fn program_cost(&self) -> Option<crate::telemetry::ProgramCost> {
        None
    }
}

/// Carries out actions on a host.
pub trait Applier {
    /// Applies one action planned from `snapshot`, reads the result back from the host
    /// and reports it. Never leaves a VM with an empty or inconsistent CPU or memory set.
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome;
}
