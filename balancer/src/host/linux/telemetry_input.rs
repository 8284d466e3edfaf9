//! How eBPF telemetry joins an observation.
//!
//! procfs tells where each thread is now; only the eBPF programs can tell where it ran
//! in between (run time per node), how often it was migrated, which memory faults were
//! remote, and which regions are hot. The observer does not depend on them: it takes a
//! [`TelemetrySource`], tells it which threads to track after each discovery pass, and
//! lets it fill the telemetry fields of the snapshot. Without eBPF (no privileges, a
//! kernel without a hook, a build without the programs) the source is [`NoTelemetry`],
//! and `vmbalancer trace` prints its reason instead of numbers it does not have.

use std::collections::BTreeSet;

use crate::model::{Snapshot, VmId};

/// The threads of one VM the programs should watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackedVm {
    pub pid: VmId,
    /// (vCPU index, thread id) of each vCPU thread.
    pub vcpus: Vec<(u32, u32)>,
    /// Emulator, I/O and other threads.
    pub other_threads: Vec<u32>,
}

/// One telemetry feature (a hook) and whether it works on this kernel.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct FeatureStatus {
    /// [`Feature::name`](crate::telemetry::Feature::name), e.g. `on-cpu-time`,
    /// `migrations`, `numa-hinting-faults`, `user-page-faults`.
    pub name: String,
    pub available: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// Measured cost of the program, ns per event (bpf stats), when known.
    pub ns_per_event: Option<f64>,
    /// The program type and hook that runs it (e.g. `raw_tp sched_switch`).
    pub path: Option<String>,
    /// The paths the kernel refused, with its reasons.
    pub refused: Vec<crate::telemetry::RefusedPath>,
}

/// Whether telemetry is available, in whole or in part.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TelemetryStatus {
    /// At least one feature works.
    pub available: bool,
    /// Why telemetry is unavailable as a whole.
    pub reason: Option<String>,
    pub features: Vec<FeatureStatus>,
}

/// A source of eBPF-derived data for snapshots.
pub trait TelemetrySource: Send {
    /// What works and what does not.
    fn status(&self) -> TelemetryStatus;

    /// The complete set of threads to watch, given after every discovery pass (threads
    /// not listed any more are to be dropped).
    fn track(&mut self, vms: &[TrackedVm]);

    /// Fills what the programs measured into `snapshot`: each
    /// [`Vcpu::telemetry`](crate::model::Vcpu::telemetry) (cumulative counters since the
    /// thread was first tracked), [`Vm::hot_regions`](crate::model::Vm::hot_regions)
    /// hottest first, and [`Vm::kernel_numa_moves`](crate::model::Vm::kernel_numa_moves).
    /// The VMs in `quiet` are reported as last read (`resample`): they carry their
    /// thread counters from then, and only their hot regions are filled.
    fn fill(&mut self, snapshot: &mut Snapshot, quiet: &BTreeSet<VmId>);

    /// Whether programs are loaded and counting: a VM read before they were is read
    /// again in full once they are (its counters were zeroes).
    fn active(&self) -> bool {
        false
    }

    /// Kernel-measured cost of all programs together (`None` without programs).
    fn cost(&self) -> Option<crate::telemetry::ProgramCost> {
        None
    }

    /// Readable while the programs have wakes to read (`None` without programs).
    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// The wakes the programs sent since the last call.
    fn take_wakes(&mut self) -> Vec<crate::telemetry::WakeEvent> {
        Vec::new()
    }
}

/// Telemetry that is not there, with the reason.
#[derive(Clone, Debug)]
pub struct NoTelemetry {
    pub reason: String,
}

impl NoTelemetry {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl TelemetrySource for NoTelemetry {
    fn status(&self) -> TelemetryStatus {
        TelemetryStatus {
            available: false,
            reason: Some(self.reason.clone()),
            features: Vec::new(),
        }
    }

    fn track(&mut self, _vms: &[TrackedVm]) {}

    fn fill(&mut self, _snapshot: &mut Snapshot, _quiet: &BTreeSet<VmId>) {}
}
