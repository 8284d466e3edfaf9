//! Map records. Sizes are asserted at compile time: change a field, update the assert.

/// A thread userspace asked the programs to watch (the daemon's `Telemetry::track`
/// takes it; the programs keep its [`SlotOwner`]).
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

/// The thread a slot belongs to ([`ThreadState::owner`]). The programs count into a
/// slot only when its owner is the thread of the event, so a thread id entry read
/// while userspace rewrites it (a half-done copy of a packed word) does not send one
/// thread's counts to another thread's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotOwner {
    pub tid: u32,
    /// Thread group id (the qemu process) of the thread.
    pub vm_pid: u32,
}

/// Scheduler migrations of one tracked thread ([`ThreadState::migrations`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCounts {
    /// Every `sched_migrate_task` seen for the thread.
    pub migrations: u64,
    /// Those whose source and destination CPUs are on different NUMA nodes.
    pub cross_node: u64,
}

/// Slots of per-thread state: the tracked threads of all VMs on the host.
pub const MAX_TRACKED_THREADS: u32 = 16384;
/// Largest thread id limit the kernel allows on 64-bit (`PID_MAX_LIMIT`, 4 Mi):
/// `kernel.pid_max` can be raised to it and no further.
pub const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;
/// Thread ids per word of [`names::TRACKED_SLOTS`]: four 16-bit entries in a `u64`.
/// An array map stores each value in a multiple of 8 bytes, so a map of one `u16`
/// (or `u32`) per thread id would take 8 bytes per id; packed, it takes 2.
pub const TRACKED_SLOTS_PER_WORD: u32 = 4;
/// Bits of one entry of [`names::TRACKED_SLOTS`].
pub const TRACKED_SLOT_BITS: u32 = 16;
/// Words of [`names::TRACKED_SLOTS`] in the object; the loader sizes the map from
/// `kernel.pid_max` instead (8 KiB per 4096 thread ids: 64 KiB at the usual 32768,
/// 8 MiB at the 4 Mi maximum).
pub const TRACKED_SLOTS_WORDS: u32 = PID_MAX_LIMIT / TRACKED_SLOTS_PER_WORD;

const _: () = assert!(TRACKED_SLOTS_PER_WORD * TRACKED_SLOT_BITS == 64);
// Every slot, plus one, fits an entry (0 means "not tracked").
const _: () = assert!(MAX_TRACKED_THREADS < (1 << TRACKED_SLOT_BITS));

/// Word index and bit shift of thread `tid`'s entry in [`names::TRACKED_SLOTS`].
#[inline(always)]
pub const fn tracked_slot_entry(tid: u32) -> (u32, u32) {
    (
        tid / TRACKED_SLOTS_PER_WORD,
        (tid % TRACKED_SLOTS_PER_WORD) * TRACKED_SLOT_BITS,
    )
}

/// The slot an entry of [`names::TRACKED_SLOTS`] (or a value of [`names::TRACKED`])
/// names, `None` for 0 (not tracked).
#[inline(always)]
pub const fn slot_of_entry(entry: u32) -> Option<u32> {
    entry.checked_sub(1)
}

/// The entry of [`names::TRACKED_SLOTS`] (and value of [`names::TRACKED`]) that
/// names `slot`: the slot plus one, so that 0 (the map's zero fill) is "not tracked".
#[inline(always)]
pub const fn entry_of_slot(slot: u32) -> u32 {
    slot + 1
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

/// On-CPU time of one tracked thread by the node of the CPU
/// ([`ThreadState::on_cpu`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnCpuTime {
    pub ns_by_node: [u64; MAX_NODES],
    /// All on-CPU time, including nodes beyond [`MAX_NODES`] and unknown CPUs.
    pub total_ns: u64,
    /// The thread's `se.sum_exec_runtime` when it was last switched out (or when it
    /// was tracked): the next switch-out adds the difference. [`OnCpuTime::NO_START`]
    /// when userspace could not read it: the next switch-out only records it.
    pub last_runtime_ns: u64,
}

impl OnCpuTime {
    /// [`OnCpuTime::last_runtime_ns`] of a thread tracked without a starting point.
    /// No run time exceeds it, so the first switch-out counts nothing.
    pub const NO_START: u64 = u64::MAX;
}

/// NUMA hinting faults of one tracked thread (`task_numa_fault`,
/// [`ThreadState::numa_faults`]).
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

/// Everything the programs keep for one tracked thread ([`names::THREADS`], index:
/// the thread's slot). One value per thread: the owner check and the counters of an
/// event are one array lookup. Userspace writes the whole value (owner, zero counts,
/// on-CPU starting point) when it gives the slot to a thread, before it publishes the
/// thread's entry of [`names::TRACKED_SLOTS`].
///
/// Between the last counter of one slot and the first counter of the next lie 64
/// bytes (the padding and the next slot's read-mostly owner), so no cache line holds
/// counters of two threads, wherever the array starts: vCPUs of one VM get
/// neighbouring slots and run on different CPUs, and would otherwise write one
/// line from two CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub owner: SlotOwner,
    /// Written by `sched_switch` when the thread is switched out.
    pub on_cpu: OnCpuTime,
    /// Written by `sched_migrate_task`.
    pub migrations: MigrationCounts,
    /// Written by `task_numa_fault`.
    pub numa_faults: NumaFaults,
    pub _pad: [u64; 7],
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
///
/// Each tracked thread has a slot, an index below [`super::MAX_TRACKED_THREADS`]
/// that userspace assigns when it tracks the thread and frees when it untracks it.
/// The per-thread maps are arrays indexed by slot: the verifier turns a lookup into
/// a bounds check and an address computation, where a hash lookup is a call and a
/// hash of the key (tens of nanoseconds).
pub mod names {
    /// `Array<u64>` indexed by thread id / 4, written by userspace (sized from
    /// `kernel.pid_max`): four 16-bit entries per word, the entry of thread `tid` at
    /// bits `(tid % 4) * 16`; 0 when the thread is not tracked, its slot plus one when
    /// it is. The programs decide "not tracked" (most events of a host) from it with
    /// one array lookup, and find a tracked thread's slot with the same lookup.
    pub const TRACKED_SLOTS: &str = "TRACKED_SLOTS";
    /// `HashMap<u32 tid, u32 entry>`: every tracked thread and its slot plus one,
    /// written by userspace. The programs read it only for thread ids beyond
    /// `TRACKED_SLOTS` (`kernel.pid_max` raised after loading).
    pub const TRACKED: &str = "TRACKED";
    /// `Array<ThreadState>` indexed by slot: the thread that holds each slot, its VM
    /// (written by userspace when it assigns the slot, with zero counts and the
    /// thread's on-CPU starting point) and its counters, which `sched_switch`,
    /// `sched_migrate_task` and `task_numa_fault` fill.
    pub const THREADS: &str = "THREADS";
    /// `Array<u32 node>` indexed by CPU number, filled by userspace from sysfs.
    pub const CPU_NODE: &str = "CPU_NODE";
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
const _: () = assert!(core::mem::size_of::<SlotOwner>() == 8);
const _: () = assert!(core::mem::size_of::<MigrationCounts>() == 16);
const _: () = assert!(core::mem::size_of::<OnCpuTime>() == 8 * (MAX_NODES + 2));
const _: () = assert!(core::mem::size_of::<NumaFaults>() == 8 * (MAX_NODES + 4));
const _: () = assert!(core::mem::size_of::<ThreadState>() == 384);
const _: () = assert!(core::mem::size_of::<ThreadState>().is_multiple_of(64));
const _: () = assert!(core::mem::size_of::<RegionKey>() == 16);
const _: () = assert!(core::mem::size_of::<RegionFaults>() == 8);
const _: () = assert!(core::mem::size_of::<VmNumaEvents>() == 16);
const _: () = assert!(core::mem::size_of::<WakeEvent>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::TrackedThread {}
    unsafe impl aya::Pod for super::SlotOwner {}
    unsafe impl aya::Pod for super::MigrationCounts {}
    unsafe impl aya::Pod for super::OnCpuTime {}
    unsafe impl aya::Pod for super::NumaFaults {}
    unsafe impl aya::Pod for super::ThreadState {}
    unsafe impl aya::Pod for super::RegionKey {}
    unsafe impl aya::Pod for super::RegionFaults {}
    unsafe impl aya::Pod for super::VmNumaEvents {}
    unsafe impl aya::Pod for super::WakeEvent {}
}
