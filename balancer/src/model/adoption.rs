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

use super::{CpuSet, NodeSet, OperatorPins, VmId};

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

impl OriginalSets {
    /// What to put back when vmbalancer lets go of a VM whose CPUs the operator pinned
    /// meanwhile: the recorded groups except the ones the operator's pin now covers
    /// (libvirt's `vcpuN` groups of pinned vCPUs, its `emulator` group with an
    /// emulator pin), and no thread affinity (those of a VM without such groups are
    /// the operator's to keep: there is no telling which set is whose).
    pub fn released(&self, pins: &OperatorPins) -> Self {
        let operators = |g: &GroupSets| {
            let name = g.dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match name.strip_prefix("vcpu").and_then(|i| i.parse().ok()) {
                Some(index) => pins.covers_vcpu(index),
                None => name == "emulator" && pins.emulator,
            }
        };
        Self {
            vm: self.vm,
            start_time_ticks: self.start_time_ticks,
            threads: BTreeMap::new(),
            groups: self
                .groups
                .iter()
                .filter(|g| !operators(g))
                .cloned()
                .collect(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn group(dir: &str) -> GroupSets {
        GroupSets {
            dir: PathBuf::from(dir),
            cpus: CpuSet::new(),
            mems: NodeSet::new(),
            memory_migrate: None,
        }
    }

    #[test]
    fn letting_go_keeps_what_the_operator_pinned() {
        let scope = "/sys/fs/cgroup/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope";
        let dirs = [
            scope.to_string(),
            format!("{scope}/libvirt"),
            format!("{scope}/libvirt/emulator"),
            format!("{scope}/libvirt/vcpu0"),
            format!("{scope}/libvirt/vcpu1"),
        ];
        let original = OriginalSets {
            vm: 7,
            start_time_ticks: 9,
            threads: [(7, CpuSet::parse_list("0-7").unwrap())].into(),
            groups: dirs.iter().map(|d| group(d)).collect(),
        };
        let kept = |pins: OperatorPins| -> Vec<String> {
            let r = original.released(&pins);
            assert_eq!((r.vm, r.start_time_ticks), (7, 9));
            assert!(r.threads.is_empty(), "no thread affinity is put back");
            r.groups
                .iter()
                .map(|g| g.dir.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let scope_name = "machine-qemu\\x2d1\\x2dvm1.scope";
        // `virsh vcpupin` of both vCPUs: the emulator group and the parents go back.
        let vcpus = OperatorPins {
            vcpus: vec![0, 1],
            ..OperatorPins::default()
        };
        assert_eq!(kept(vcpus), [scope_name, "libvirt", "emulator"]);
        // Only vCPU 1 pinned: vCPU 0's group goes back too.
        let one = OperatorPins {
            vcpus: vec![1],
            ..OperatorPins::default()
        };
        assert_eq!(kept(one), [scope_name, "libvirt", "emulator", "vcpu0"]);
        // emulatorpin and a static <vcpu cpuset>: only the parents go back.
        assert_eq!(kept(OperatorPins::everything()), [scope_name, "libvirt"]);
        // Only memory bound (numatune): every CPU set goes back.
        assert_eq!(kept(OperatorPins::default()).len(), 5);
    }
}
