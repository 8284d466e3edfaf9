//! The one boundary between vmbalancer and the world.
//!
//! An [`Observer`] turns the host into a [`Snapshot`]; an [`Applier`] carries out a
//! [`PlannedAction`] and reports what really happened. The daemon, the simulator and
//! the diagnostic mode all run `observe -> engine -> apply`; only the implementations
//! behind these traits differ:
//!
//! - [`linux`]: procfs, sysfs, cgroups, sched_setaffinity, move_pages;
//! - [`sim`]: a simulated host with a scheduler and a NUMA performance model;
//! - [`logonly`]: applies nothing and logs what would have been done.

pub mod linux;
pub mod logonly;
pub mod sim;

use crate::model::{ActionOutcome, PlannedAction, Snapshot};

/// Builds snapshots of a host.
pub trait Observer {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Observes the host now. Errors are for the host as a whole (e.g. sysfs missing);
    /// a VM that vanishes mid-read is simply left out of the snapshot.
    fn observe(&mut self) -> Result<Snapshot, Self::Error>;
}

/// Carries out actions on a host.
pub trait Applier {
    /// Applies one action planned from `snapshot`, reads the result back from the host
    /// and reports it. Never leaves a VM with an empty or inconsistent CPU or memory set.
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome;
}
