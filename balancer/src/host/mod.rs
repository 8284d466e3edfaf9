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

use std::os::fd::BorrowedFd;

use crate::model::{ActionOutcome, CpuSet, PlannedAction, Snapshot, VmId};

/// Something that happened since the last observation that the balancer should see
/// now rather than at its next tick. Observers report them from kernel events (the
/// process connector, the eBPF programs' wake channel); the daemon's loop then
/// ticks early (`daemon::wake`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A qemu process started.
    NewVm { pid: VmId },
    /// A known VM's process exited.
    VmExited { pid: VmId },
    /// A vCPU thread of a known VM named itself: qemu does so once the thread
    /// runs, so its vCPUs can be placed.
    VcpuNamed { vm: VmId, tid: u32 },
    /// A tracked thread of `vm` was moved from a CPU of node `from` to one of `to`.
    CrossNode {
        vm: VmId,
        tid: u32,
        from: u32,
        to: u32,
    },
    /// Tracked threads of `vm` took many NUMA hinting faults on remote memory.
    RemoteFaults { vm: VmId, faults: u32 },
}

impl Wake {
    /// A short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Wake::NewVm { .. } => "new_vm",
            Wake::VmExited { .. } => "vm_exited",
            Wake::VcpuNamed { .. } => "vcpu_named",
            Wake::CrossNode { .. } => "cross_node",
            Wake::RemoteFaults { .. } => "remote_faults",
        }
    }
}

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

    /// Descriptors that become readable when the observer may have a [`Wake`] to
    /// report; the daemon polls them between ticks. None by default: such an
    /// observer is observed at the tick only. The set may change between ticks
    /// (programs that finished loading).
    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// Reads what made the wake descriptors readable, without blocking, and keeps
    /// it for the next observation; the wakes among it (none when nothing of it
    /// concerns a VM).
    fn take_wakes(&mut self) -> Vec<Wake> {
        Vec::new()
    }
}

/// Carries out actions on a host.
pub trait Applier {
    /// Applies one action planned from `snapshot`, reads the result back from the host
    /// and reports it. Never leaves a VM with an empty or inconsistent CPU or memory set.
    fn apply(&mut self, snapshot: &Snapshot, action: &PlannedAction) -> ActionOutcome;

    /// Takes reloaded settings; appliers without such settings ignore them.
    fn retune(&mut self, _tunables: &Tunables) {}
}
