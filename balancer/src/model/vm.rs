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
    /// With [`Pinning::Operator`]: which of the VM's CPU sets the operator's pin covers.
    #[serde(default)]
    pub operator_pins: OperatorPins,
    /// Hot memory regions, hottest first (from fault telemetry).
    pub hot_regions: Vec<HotRegion>,
    /// The VM's cgroup relative to the cgroup mount, when it has its own.
    pub cgroup: Option<String>,
    /// Nodes the VM's memory may be allocated on (`cpuset.mems` or `Mems_allowed_list`).
    pub mems_allowed: NodeSet,
    /// VMs this one shares KSM pages with and how many pages (when known; empty else).
    #[serde(default)]
    pub ksm_shared_pages: Vec<(VmId, u64)>,
    /// Pages of this VM that KSM merged (`/proc/PID/ksm_merging_pages`), when the
    /// kernel says and KSM is merging.
    #[serde(default)]
    pub ksm_merging_pages: Option<u64>,
    /// CPU demand of all the VM's threads in CPUs (1.0 = one full CPU) over the last
    /// observation interval.
    pub threads_cpu_demand: f64,
    /// The kernel's own NUMA task moves of the VM's threads (`sched_move_numa`,
    /// `sched_swap_numa`), cumulative, from telemetry.
    pub kernel_numa_moves: u64,
    /// How the vCPU threads were told apart from the VM's other threads.
    #[serde(default)]
    pub vcpu_discovery: VcpuDiscovery,
    /// CPUs any thread of the process may run on (union of the threads' affinities).
    /// Filled only when the vCPUs are unknown: it is then where the VM runs, since it
    /// is balanced as a whole process.
    #[serde(default)]
    pub process_affinity: super::CpuSet,
    /// vCPUs the command line asks for (`-smp`; 0 when it does not say).
    #[serde(default)]
    pub configured_vcpus: u32,
}

impl Vm {
    /// Sum of the vCPUs' CPU demand, in CPUs.
    pub fn cpu_demand(&self) -> f64 {
        self.vcpus.iter().map(|v| v.cpu_demand).sum()
    }

    /// Whether the VM's vCPU threads are known (by name or from the monitor). When
    /// they are not, `vcpus` is empty and the VM is placed as a whole process: its
    /// demand is that of all its threads, where it runs is `process_affinity`.
    pub fn vcpus_known(&self) -> bool {
        !matches!(self.vcpu_discovery, VcpuDiscovery::Unknown { .. })
    }
}

/// How a VM's vCPU threads were found.
///
/// Guessing is never an option: a thread taken for a vCPU that is not one (an I/O
/// worker, the main loop) would be placed and counted as guest CPU work, and the
/// real vCPUs would be left wherever they are. A VM whose vCPUs cannot be told apart
/// is balanced as one process, which is honest: every thread moves together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuDiscovery {
    /// Thread names `CPU n/KVM` (qemu's `-name ...,debug-threads=on`, which libvirt
    /// always passes).
    #[default]
    ThreadNames,
    /// The QMP monitor's `query-cpus-fast` over the unix socket at `socket`.
    Qmp { socket: String },
    /// Neither worked; `why` says what was tried.
    Unknown { why: String },
}

impl std::fmt::Display for VcpuDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuDiscovery::ThreadNames => write!(f, "vCPUs by thread names"),
            VcpuDiscovery::Qmp { socket } => write!(f, "vCPUs from QMP query-cpus-fast ({socket})"),
            VcpuDiscovery::Unknown { why } => {
                write!(f, "vCPUs unknown ({why}): balanced as a whole process")
            }
        }
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
    /// Set when the guest's memory must never be migrated (a confidential guest, or
    /// guest_memfd backing): the engine moves none of its pages.
    #[serde(default)]
    pub not_movable: Option<MemoryNotMovable>,
}

/// Why a VM's memory is never migrated, as its qemu command line says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryNotMovable {
    /// The QOM type that makes it so: `sev-guest`, `sev-snp-guest`, `tdx-guest`,
    /// another confidential-guest-support type, or `guest_memfd`.
    pub kind: String,
    /// The option that says it, for the operator (e.g. `-object sev-guest,id=sev0`).
    pub option: String,
}

impl std::fmt::Display for MemoryNotMovable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == "guest_memfd" {
            write!(f, "guest RAM is in guest_memfd ({})", self.option)
        } else {
            write!(f, "confidential guest, {} ({})", self.kind, self.option)
        }
    }
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

/// Which of a VM's CPU sets an operator's pin covers.
///
/// Why: an operator may pin a VM vmbalancer holds (`virsh vcpupin`). vmbalancer then
/// lets go of it, and what it changed itself must not stay behind as if the operator
/// had set it: it puts back the CPU sets the pin does not cover (e.g. the emulator
/// threads' after a `vcpupin` of the vCPUs only) and keeps the ones it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorPins {
    /// Every vCPU's CPUs (`<vcpu cpuset=..>`, `placement='auto'`, pinned threads).
    pub all_vcpus: bool,
    /// vCPUs pinned one by one (`vcpupin`), by index.
    pub vcpus: Vec<u32>,
    /// The emulator threads' CPUs (`emulatorpin`, or a pin of every vCPU and the
    /// emulator at once).
    pub emulator: bool,
}

impl OperatorPins {
    /// A pin of every thread of the VM (evidence that names no single set).
    pub fn everything() -> Self {
        Self {
            all_vcpus: true,
            vcpus: Vec::new(),
            emulator: true,
        }
    }

    /// Whether the operator set the CPUs of vCPU `index`.
    pub fn covers_vcpu(&self, index: u32) -> bool {
        self.all_vcpus || self.vcpus.contains(&index)
    }
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
