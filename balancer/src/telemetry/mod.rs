//! The eBPF side of observation: loads the programs from `balancer-ebpf`, tells them
//! which threads to track, and reads their maps.
//!
//! The daemon, `vmbalancer trace` and the integration tests all use this one API:
//! [`Telemetry::load`], then [`Telemetry::track`] the vCPU and emulator threads of each
//! VM, and read per-thread counters with [`Telemetry::read_thread`], every VM's hot
//! regions with [`Telemetry::hot_regions_by_vm`] and program cost with
//! [`Telemetry::cost`]. Everything that varies between kernels (tracepoint record
//! layouts, which hooks exist, the range of thread ids) is resolved at load time,
//! never compiled in.
//!
//! Per-thread counters live in arrays indexed by a slot this process gives each
//! tracked thread (`slots`): the programs find a thread's slot from its id in one
//! array lookup and count with array lookups only, which the verifier inlines.

pub mod btf;
mod error;
mod loader;
mod maps;
mod preflight;
mod slots;
pub mod topology;
pub mod tracefs;
mod wake;

pub use balancer_common::TrackedThread;
pub use balancer_common::{WakeEvent, wake as wake_kind};
pub use error::TelemetryError;
pub use loader::{LoadOptions, Telemetry};
pub use preflight::MIN_KERNEL;
pub use wake::WakeChannel;

/// What the programs counted for one thread since it was tracked (cumulative).
/// Per-node vectors have one entry per NUMA node of the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThreadTelemetry {
    /// Scheduler migrations (`sched:sched_migrate_task`) of the thread.
    pub migrations: u64,
    /// Those between CPUs of different NUMA nodes.
    pub cross_node_migrations: u64,
    /// On-CPU time by the node of the CPU (`sched:sched_switch`).
    pub on_cpu_ns_by_node: Vec<u64>,
    /// All on-CPU time, including CPUs of unknown node.
    pub on_cpu_total_ns: u64,
    /// NUMA hinting faults (`task_numa_fault`) by the node of the faulting memory.
    pub numa_faults_by_mem_node: Vec<u64>,
    /// Hinting faults on memory local to the faulting CPU.
    pub numa_faults_local: u64,
    /// Hinting faults on memory of another node.
    pub numa_faults_remote: u64,
    /// Pages the kernel migrated because of these faults.
    pub numa_migrated_pages: u64,
    /// Pages covered by the hinting faults.
    pub numa_fault_pages: u64,
}

/// What a hot region's address means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RegionKind {
    /// A virtual address of the qemu process (`exceptions:page_fault_user`).
    HostVirtual,
    /// A guest physical address (`kvm:kvm_page_fault`).
    GuestPhysical,
}

/// Faults of one VM in one 2 MiB region.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegionHeat {
    pub kind: RegionKind,
    pub start_addr: u64,
    pub len_bytes: u64,
    /// Faults by the node of the CPU that faulted.
    pub faults_by_node: Vec<u64>,
    pub faults_total: u64,
}

/// The kernel's automatic NUMA balancing acting on one VM's threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmNumaMoves {
    /// `sched:sched_move_numa` events.
    pub move_numa: u64,
    /// `sched:sched_swap_numa` events involving one of its threads.
    pub swap_numa: u64,
}

/// A telemetry feature: one or more programs on one kernel hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Feature {
    /// `sched:sched_migrate_task`: migrations and cross-node migrations per thread.
    Migrations,
    /// `sched:sched_switch`: on-CPU time per thread per node.
    OnCpuTime,
    /// fentry `task_numa_fault`: NUMA hinting faults per thread.
    NumaHintingFaults,
    /// `exceptions:page_fault_user`: hot 2 MiB regions per VM (host addresses).
    UserPageFaults,
    /// `kvm:kvm_page_fault`: hot 2 MiB regions per VM (guest physical addresses).
    KvmPageFaults,
    /// `sched:sched_move_numa` and `sched:sched_swap_numa` per VM.
    NumaBalancingMoves,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Migrations => "migrations",
            Feature::OnCpuTime => "on-cpu-time",
            Feature::NumaHintingFaults => "numa-hinting-faults",
            Feature::UserPageFaults => "user-page-faults",
            Feature::KvmPageFaults => "kvm-page-faults",
            Feature::NumaBalancingMoves => "numa-balancing-moves",
        }
    }
}

/// Whether a feature runs on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FeatureState {
    Active,
    /// The hook is missing or was rejected; the reason says which.
    Unavailable(String),
}

/// A way of running a feature that the kernel refused, and its words for why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RefusedPath {
    /// e.g. `raw_tp sched_switch`, `fentry task_numa_fault`.
    pub path: String,
    pub reason: String,
}

/// How one feature runs on this kernel: the path the loader attached (the first one,
/// in order of preference, the kernel accepted) and every path tried before it or
/// instead of it, with the kernel's reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeaturePaths {
    pub feature: Feature,
    /// `None` when no path loads: the feature is unavailable.
    pub active: Option<String>,
    pub refused: Vec<RefusedPath>,
}

impl FeaturePaths {
    /// The feature's state: active, or unavailable with every path's reason.
    pub fn state(&self) -> FeatureState {
        if self.active.is_some() {
            return FeatureState::Active;
        }
        FeatureState::Unavailable(
            self.refused
                .iter()
                .map(|r| format!("{}: {}", r.path, r.reason))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// Kernel-measured cost of one program since it was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgramCost {
    pub program: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramCost {
    /// Mean nanoseconds per event (0 when it never ran).
    pub fn ns_per_event(&self) -> f64 {
        if self.run_count == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_count as f64
        }
    }
}

impl ThreadTelemetry {
    /// The model's view of this thread, with per-node vectors reordered to follow
    /// `node_ids` (the ids of `Topology::nodes`, in order). Our vectors are indexed
    /// by node id; the model's by position in the topology.
    pub fn to_vcpu_telemetry(&self, node_ids: &[u32]) -> crate::model::VcpuTelemetry {
        let pick = |v: &[u64]| -> Vec<u64> {
            node_ids
                .iter()
                .map(|&id| v.get(id as usize).copied().unwrap_or(0))
                .collect()
        };
        crate::model::VcpuTelemetry {
            run_ns_per_node: pick(&self.on_cpu_ns_by_node),
            migrations: self.migrations,
            cross_node_migrations: self.cross_node_migrations,
            numa_faults_per_node: pick(&self.numa_faults_by_mem_node),
            numa_faults_remote: self.numa_faults_remote,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_telemetry_follows_topology_order() {
        let t = ThreadTelemetry {
            migrations: 5,
            cross_node_migrations: 2,
            on_cpu_ns_by_node: vec![10, 0, 30],
            numa_faults_by_mem_node: vec![1, 2, 3],
            numa_faults_remote: 4,
            ..Default::default()
        };
        // A host whose nodes are 0 and 2 (node 1 offline), listed in that order.
        let v = t.to_vcpu_telemetry(&[0, 2]);
        assert_eq!(v.run_ns_per_node, vec![10, 30]);
        assert_eq!(v.numa_faults_per_node, vec![1, 3]);
        assert_eq!(
            (v.migrations, v.cross_node_migrations, v.numa_faults_remote),
            (5, 2, 4)
        );
        // Nodes beyond what the programs count read as zero.
        assert_eq!(t.to_vcpu_telemetry(&[7]).run_ns_per_node, vec![0]);
    }

    #[test]
    fn telemetry_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Telemetry>();
    }

    #[test]
    fn cost_per_event() {
        let c = ProgramCost {
            program: "p".into(),
            run_count: 4,
            run_time_ns: 1000,
        };
        assert_eq!(c.ns_per_event(), 250.0);
        assert_eq!(ProgramCost::default().ns_per_event(), 0.0);
    }
}
