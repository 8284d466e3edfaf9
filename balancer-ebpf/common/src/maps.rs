//! Map records. Sizes are asserted at compile time: change a field, update the assert.

/// A thread userspace asked the programs to watch (key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedThread {
    /// Thread group id (the qemu process) the thread belongs to. It must be the
    /// thread's own thread group: the page fault programs take the VM of a fault
    /// from the faulting task's thread group id rather than from this record.
    pub vm_pid: u32,
    /// vCPU index, or [`TrackedThread::NOT_A_VCPU`] for emulator and I/O threads.
    pub vcpu_index: u32,
}

impl TrackedThread {
    pub const NOT_A_VCPU: u32 = u32::MAX;
}

/// Scheduler migrations of one tracked thread (key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCounts {
    /// Every `sched_migrate_task` seen for the thread.
    pub migrations: u64,
    /// Those whose source and destination CPUs are on different NUMA nodes.
    pub cross_node: u64,
}

/// Capacity of the tracked-thread map (threads of all VMs on the host).
pub const MAX_TRACKED_THREADS: u32 = 16384;
/// Largest thread id limit the kernel allows on 64-bit (`PID_MAX_LIMIT`, 4 Mi):
/// `kernel.pid_max` can be raised to it and no further.
pub const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;
/// Thread ids per word of [`names::TRACKED_BITS`].
pub const TRACKED_BITS_PER_WORD: u32 = 64;
/// Words of [`names::TRACKED_BITS`] in the object; the loader sizes the map from
/// `kernel.pid_max` instead (512 bytes per 4096 thread ids).
pub const TRACKED_BITS_WORDS: u32 = PID_MAX_LIMIT / TRACKED_BITS_PER_WORD;

/// Word index and mask of thread `tid` in [`names::TRACKED_BITS`].
#[inline(always)]
pub const fn tracked_bit(tid: u32) -> (u32, u64) {
    (
        tid / TRACKED_BITS_PER_WORD,
        1u64 << (tid % TRACKED_BITS_PER_WORD),
    )
}
/// Capacity of the CPU -> NUMA node table (the kernel's NR_CPUS upper bound is 8192).
pub const MAX_CPUS: u32 = 8192;
/// Node of a CPU the table does not know (offline or beyond the table).
pub const UNKNOWN_NODE: u32 = u32::MAX;
/// NUMA nodes the per-node counters have room for; events on higher nodes are
/// counted in the totals only.
pub const MAX_NODES: usize = 16;
/// Capacity of the hot-region LRU map (2 MiB regions over all tracked VMs).
pub const MAX_HOT_REGIONS: u32 = 16384;
/// log2 of the hot-region size: 2 MiB, the transparent huge page size on x86-64.
pub const REGION_SHIFT: u32 = 21;
/// Capacity of the per-VM event map.
pub const MAX_VMS: u32 = 1024;

/// On-CPU time of one tracked thread by the node of the CPU (key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnCpuTime {
    pub ns_by_node: [u64; MAX_NODES],
    /// All on-CPU time, including nodes beyond [`MAX_NODES`] and unknown CPUs.
    pub total_ns: u64,
    /// The thread's `se.sum_exec_runtime` when it was last switched out (or when it
    /// was tracked): the next switch-out adds the difference.
    pub last_runtime_ns: u64,
}

/// NUMA hinting faults of one tracked thread (`task_numa_fault`, key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NumaFaults {
    /// Faults by the node of the faulting memory.
    pub faults_by_mem_node: [u64; MAX_NODES],
    /// Faults on memory local to the CPU that faulted (`TNF_FAULT_LOCAL`).
    pub local_faults: u64,
    /// Faults on memory of another node.
    pub remote_faults: u64,
    /// Pages the kernel migrated because of these faults (`TNF_MIGRATED`).
    pub migrated_pages: u64,
    /// Pages covered by the faults.
    pub pages: u64,
}

/// Kind of address in a [`RegionKey`].
pub const REGION_KIND_HVA: u32 = 0;
/// Guest physical address (`kvm:kvm_page_fault`).
pub const REGION_KIND_GPA: u32 = 1;

/// A 2 MiB region of one VM's memory (key of the hot-region LRU map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey {
    pub vm_pid: u32,
    /// [`REGION_KIND_HVA`] (qemu virtual address) or [`REGION_KIND_GPA`].
    pub kind: u32,
    /// Address >> [`REGION_SHIFT`].
    pub region: u64,
}

/// Faults in one region seen by one CPU (per-CPU LRU map value). The node of the
/// faults is the node of the CPU, so userspace sums the CPUs by node. No time stamp:
/// a clock read would cost a tracked page fault more than the rest of its counting,
/// and userspace ages regions by how their counts change between its reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionFaults {
    pub faults: u64,
}

/// Kernel NUMA balancing moves of a VM's threads (per-CPU hash, key: VM pid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmNumaEvents {
    /// `sched:sched_move_numa`: a thread moved to its preferred node.
    pub move_numa: u64,
    /// `sched:sched_swap_numa`: a thread swapped with one on another node.
    pub swap_numa: u64,
}

/// Why a program asks the daemon to look now ([`WakeEvent::kind`]).
pub mod wake {
    /// A tracked thread was moved to a CPU of another NUMA node.
    pub const CROSS_NODE: u32 = 1;
    /// Tracked threads on one CPU took [`REMOTE_FAULTS_PER_WAKE`] NUMA hinting
    /// faults on remote memory since that CPU last asked.
    pub const REMOTE_FAULTS: u32 = 2;
    /// Remote hinting faults one CPU counts before it asks: with the kernel's
    /// default scan of 256 MiB per period, a VM whose memory is mostly away reaches
    /// it within one scan; a VM with a few remote pages does not.
    pub const REMOTE_FAULTS_PER_WAKE: u64 = 256;
    /// Bytes of the wake ring buffer: one page holds 128 events, and each arming
    /// lets at most one event per CPU through.
    pub const RING_BYTES: u32 = 4096;
}

/// One reason to wake the daemon (a record of the wake ring buffer). Programs send
/// one only while [`names::WAKE_ARMED`] is set, and clear it as they do: the daemon
/// sets it again when it observes, so a burst of events wakes it once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeEvent {
    /// [`wake::CROSS_NODE`] or [`wake::REMOTE_FAULTS`].
    pub kind: u32,
    /// The VM (thread group) of the thread.
    pub vm_pid: u32,
    pub tid: u32,
    /// Cross-node: the node left; remote faults: the node of the CPU.
    pub from_node: u32,
    /// Cross-node: the node entered; remote faults: the node the memory of the
    /// last fault is on once the kernel handled it (when it migrated the page, the
    /// node it moved it to: often this CPU's).
    pub to_node: u32,
    /// Remote faults: how many were counted on this CPU.
    pub count: u32,
}

/// Map names, shared so the two sides cannot drift apart.
pub mod names {
    /// `HashMap<u32 tid, TrackedThread>`, filled by userspace.
    pub const TRACKED: &str = "TRACKED";
    /// `Array<u64>`, filled by userspace in step with `TRACKED`: bit `tid % 64` of
    /// word `tid / 64` is set while `tid` is a key of `TRACKED`. The programs decide
    /// "not tracked" (most events of a host) from it with an array lookup the JIT
    /// inlines, instead of a hash lookup (a call and a hash of the key).
    pub const TRACKED_BITS: &str = "TRACKED_BITS";
    /// `Array<u32 node>` indexed by CPU number, filled by userspace from sysfs.
    pub const CPU_NODE: &str = "CPU_NODE";
    /// `HashMap<u32 tid, MigrationCounts>`, filled by `sched_migrate_task`.
    pub const MIGRATIONS: &str = "MIGRATIONS";
    /// `HashMap<u32 tid, OnCpuTime>`, filled by `sched_switch`.
    pub const ON_CPU: &str = "ON_CPU";
    /// `HashMap<u32 tid, NumaFaults>`, filled by `task_numa_fault`.
    pub const NUMA_FAULTS: &str = "NUMA_FAULTS";
    /// `LruPerCpuHashMap<RegionKey, RegionFaults>`, filled by the page fault programs.
    pub const HOT_REGIONS: &str = "HOT_REGIONS";
    /// `PerCpuHashMap<u32 vm_pid, VmNumaEvents>`, filled by `sched_{move,swap}_numa`.
    pub const VM_NUMA_EVENTS: &str = "VM_NUMA_EVENTS";
    /// `RingBuf` of [`super::WakeEvent`]s, read by the daemon between its ticks.
    pub const WAKE_EVENTS: &str = "WAKE_EVENTS";
    /// `Array<u32>` of one entry: non-zero while the programs may send a
    /// [`super::WakeEvent`]. Userspace sets it, the program that sends clears it.
    pub const WAKE_ARMED: &str = "WAKE_ARMED";
    /// `PerCpuArray<u64>` of one entry: remote hinting faults of tracked threads
    /// counted on each CPU since it last sent a wake.
    pub const REMOTE_FAULTS_SINCE_WAKE: &str = "REMOTE_FAULTS_SINCE_WAKE";
}

const _: () = assert!(core::mem::size_of::<TrackedThread>() == 8);
const _: () = assert!(core::mem::size_of::<MigrationCounts>() == 16);
const _: () = assert!(core::mem::size_of::<OnCpuTime>() == 8 * (MAX_NODES + 2));
const _: () = assert!(core::mem::size_of::<NumaFaults>() == 8 * (MAX_NODES + 4));
const _: () = assert!(core::mem::size_of::<RegionKey>() == 16);
const _: () = assert!(core::mem::size_of::<RegionFaults>() == 8);
const _: () = assert!(core::mem::size_of::<VmNumaEvents>() == 16);
const _: () = assert!(core::mem::size_of::<WakeEvent>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::TrackedThread {}
    unsafe impl aya::Pod for super::MigrationCounts {}
    unsafe impl aya::Pod for super::OnCpuTime {}
    unsafe impl aya::Pod for super::NumaFaults {}
    unsafe impl aya::Pod for super::RegionKey {}
    unsafe impl aya::Pod for super::RegionFaults {}
    unsafe impl aya::Pod for super::VmNumaEvents {}
    unsafe impl aya::Pod for super::WakeEvent {}
}
