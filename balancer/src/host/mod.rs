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

use crate::model::{ActionOutcome, CpuSet, PlannedAction, Snapshot, VmId};

/// The settings of the boundary a configuration reload may change while the daemon
/// runs (the rest is fixed when the observer and applier are built).
#[derive(Clone, Debug, PartialEq)]
pub struct Tunables {
    /// The locality target memory moves aim at, percent (observers sample write heat
    /// only below it).
    pub locality_target_pct: u32,
    /// CPUs never given to VMs (the applier refuses sets that touch them).
    pub reserved_cpus: CpuSet,
    /// Page migration budget for all VMs together.
    pub rate_limit_bytes_per_s: u64,
    /// Free memory a target node must keep after a move.
    pub headroom_bytes: u64,
}

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

    /// Takes reloaded settings; observers without such settings ignore them.
    fn retune(&mut self, _tunables: &Tunables) {}
}

/// Carries out actions on a host.
pub trait Applier {
    /// Applies one action planned from `snapshot`, reads the result back from the host
    /// and reports it. Never leaves a VM with an empty or inconsistent CPU or memory set.
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome;

    /// Takes reloaded settings; appliers without such settings ignore them.
    fn retune(&mut self, _tunables: &Tunables) {}
}
