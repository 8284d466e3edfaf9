//! A virtual machine as the host sees it: a qemu process, its threads, its memory.

use serde::{Deserialize, Serialize};

use super::{CpuId, CpuSet, NodeId, NodeSet};

/// A VM is identified by its qemu process id for as long as it lives.
pub type VmId = u32;

/// One qemu process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub pid: VmId,
    /// `-name guest=X`, the libvirt scope name, or the comm as a last resort.
    pub name: String,
    pub vcpus: Vec<Vcpu>,
    /// Emulator, I/O and other non-vCPU threads.
    pub other_threads: Vec<u32>,
    pub memory: VmMemory,
    /// Guest NUMA cells declared on the command line (empty: one cell).
    pub cells: Vec<GuestCell>,
    pub pinning: Pinning,
    /// Hot memory regions, hottest first (from fault telemetry).
    pub hot_regions: Vec<HotRegion>,
    /// The VM's cgroup relative to the cgroup mount, when it has its own.
    pub cgroup: Option<String>,
    /// Nodes the VM's memory may be allocated on (`cpuset.mems` or `Mems_allowed_list`).
    pub mems_allowed: NodeSet,
    /// VMs this one shares KSM pages with and how many pages (when known; empty else).
    #[serde(default)]
    pub ksm_shared_pages: Vec<(VmId, u64)>,
    /// CPU demand of all the VM's threads in CPUs (1.0 = one full CPU) over the last
    /// observation interval.
    pub threads_cpu_demand: f64,
    /// The kernel's own NUMA task moves of the VM's threads (`sched_move_numa`,
    /// `sched_swap_numa`), cumulative, from telemetry.
    pub kernel_numa_moves: u64,
}

impl Vm {
    /// Sum of the vCPUs' CPU demand, in CPUs.
    pub fn cpu_demand(&self) -> f64 {
        self.vcpus.iter().map(|v| v.cpu_demand).sum()
    }
}

/// One vCPU thread.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vcpu {
    /// Index `n` of the thread named `CPU n/KVM`.
    pub index: u32,
    pub tid: u32,
    /// CPUs the thread may run on.
    pub affinity: CpuSet,
    /// CPU it last ran on.
    pub last_cpu: Option<CpuId>,
    /// CPU demand in CPUs (1.0 = one full CPU) over the last observation interval.
    pub cpu_demand: f64,
    pub telemetry: VcpuTelemetry,
}

/// What the eBPF programs saw of one thread since it was first tracked (cumulative).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuTelemetry {
    /// On-CPU time per node, indexed like `Topology::nodes`.
    pub run_ns_per_node: Vec<u64>,
    pub migrations: u64,
    pub cross_node_migrations: u64,
    /// NUMA hinting faults by the node of the faulting memory, indexed like nodes.
    pub numa_faults_per_node: Vec<u64>,
    /// Hinting faults on memory remote to the CPU that faulted.
    pub numa_faults_remote: u64,
}

/// Classifies the threads of a qemu process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThreadKind {
    Vcpu(u32),
    Emulator,
    Io,
    Other,
}

/// Where the VM's memory is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMemory {
    /// Guest-memory bytes resident on each node, indexed like `Topology::nodes`.
    pub bytes_per_node: Vec<u64>,
    pub backing: MemoryBacking,
    /// Size of the guest RAM as configured (`-m`).
    pub configured_bytes: u64,
    /// Age of `bytes_per_node`: when it was last read exactly (observer's clock).
    pub measured_at_ns: u64,
    /// Resident memory of the process that is not guest RAM (qemu heap, stacks,
    /// libraries, video RAM), indexed like `Topology::nodes`.
    pub overhead_bytes_per_node: Vec<u64>,
    /// The part of the overhead that is the process's own anonymous memory (heap,
    /// thread stacks, other anonymous mappings), indexed like `Topology::nodes`: what
    /// `MigrateProcessMemory` can bring home. Pages of shared files (the program,
    /// libraries) are page cache of every process mapping them and are left out.
    #[serde(default)]
    pub own_overhead_bytes_per_node: Vec<u64>,
    /// Host virtual address ranges `(start, len)` of guest RAM, for mapping guest
    /// fault addresses and planning region moves.
    pub guest_ranges: Vec<(u64, u64)>,
}

impl VmMemory {
    pub fn resident_bytes(&self) -> u64 {
        self.bytes_per_node.iter().sum()
    }
}

/// How guest RAM is backed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBacking {
    #[default]
    Anonymous,
    Memfd,
    File,
    /// hugetlbfs (or memfd with hugetlb) with the page size in bytes.
    HugeTlb {
        page_size_bytes: u64,
    },
}

/// A guest NUMA cell (`-numa node,...`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCell {
    pub id: u32,
    /// vCPU indices of the cell.
    pub vcpus: Vec<u32>,
    pub memory_bytes: u64,
    /// `host-nodes=` of its memory backend, if the command line binds it.
    pub host_nodes: Option<NodeSet>,
    /// Bytes of this cell's memory resident on each node, indexed like
    /// `Topology::nodes` (empty when unknown).
    #[serde(default)]
    pub bytes_per_node: Vec<u64>,
    /// Host virtual address range `(start, len)` of the cell's memory backend, when known.
    #[serde(default)]
    pub addr_range: Option<(u64, u64)>,
}

/// Whether an operator already placed the VM by hand.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pinning {
    /// Free to move.
    #[default]
    None,
    /// Pinned by the operator: reported, never moved.
    Operator { why: String },
    /// The operator excluded the VM from balancing by configuration.
    Excluded,
}

/// A hot region of guest memory (host virtual addresses).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HotRegion {
    pub start_addr: u64,
    pub len_bytes: u64,
    /// Node the region's pages are on (the majority node when mixed).
    pub node: NodeId,
    /// Decayed fault count: higher is hotter.
    pub heat: f64,
}
