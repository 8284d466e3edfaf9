//! What an applier records and reports beyond single actions: the sets a VM had when
//! the daemon adopted it (journaled, restored on exit), what to put back, the events
//! handled quietly, and a memory move in progress.
//!
//! Plain data, so the daemon's [`Actuator`](crate::daemon::Actuator) trait speaks in
//! model types and any applier (the Linux one, the log-only one, test doubles) fills
//! them in.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{CpuSet, NodeSet, VmId};

/// Things that happen to VMs under us, handled quietly and counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietCounters {
    /// Actions that found their VM gone (ESRCH, no `/proc/PID`).
    pub vm_gone: u64,
    /// Threads that vanished between listing and acting.
    pub threads_gone: u64,
    /// cgroups removed under us.
    pub cgroups_gone: u64,
    /// Actions refused before touching the host.
    pub refused: u64,
}

/// A cpuset group's sets as first seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSets {
    pub dir: PathBuf,
    pub cpus: CpuSet,
    pub mems: NodeSet,
    /// `cpuset.memory_migrate` on cgroup v1.
    pub memory_migrate: Option<bool>,
}

/// The CPU and memory sets of a VM when vmbalancer adopted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalSets {
    pub vm: VmId,
    /// Start time of the process (`/proc/PID/stat` field 22, clock ticks), so a reused
    /// pid is not mistaken for the VM.
    pub start_time_ticks: u64,
    /// Affinity of each thread.
    pub threads: BTreeMap<u32, CpuSet>,
    /// The VM's cpuset groups, parents first (empty for plain processes).
    pub groups: Vec<GroupSets>,
}

/// What to put back when an applier restores a VM's recorded sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreWhat {
    pub cpus: bool,
    pub mems: bool,
}

/// A memory move in progress, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub vm: VmId,
    pub from: u32,
    pub to: u32,
    pub moved_bytes: u64,
    /// Bytes still on `from` in the regions being moved (known after the first pass).
    pub left_bytes: u64,
    pub max_bytes: u64,
}
