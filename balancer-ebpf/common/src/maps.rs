//! Map records. Sizes are asserted at compile time: change a field, update the assert.

/// A thread userspace asked the programs to watch (key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedThread {
    /// Thread group id (the qemu process) the thread belongs to.
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

/// Where the fields of the `sched:sched_migrate_task` record sit, in bytes from the
/// start of the record. Read from the tracepoint's `format` file at load time and
/// written into the program's global [`SCHED_MIGRATE_LAYOUT_SYMBOL`] before loading:
/// the layout differs between kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedMigrateLayout {
    /// Offset of `pid_t pid` (the migrated thread id).
    pub pid_offset: u32,
    /// Offset of `int orig_cpu`.
    pub orig_cpu_offset: u32,
    /// Offset of `int dest_cpu`.
    pub dest_cpu_offset: u32,
    /// 1 once userspace filled the record; the program does nothing while it is 0.
    pub valid: u32,
}

/// Name of the global holding the [`SchedMigrateLayout`].
pub const SCHED_MIGRATE_LAYOUT_SYMBOL: &str = "SCHED_MIGRATE_LAYOUT";

/// Capacity of the tracked-thread map (threads of all VMs on the host).
pub const MAX_TRACKED_THREADS: u32 = 16384;
/// Capacity of the CPU -> NUMA node table (the kernel's NR_CPUS upper bound is 8192).
pub const MAX_CPUS: u32 = 8192;
/// Node of a CPU the table does not know (offline or beyond the table).
pub const UNKNOWN_NODE: u32 = u32::MAX;

/// Map names, shared so the two sides cannot drift apart.
pub mod names {
    /// `HashMap<u32 tid, TrackedThread>`, filled by userspace.
    pub const TRACKED: &str = "TRACKED";
    /// `Array<u32 node>` indexed by CPU number, filled by userspace from sysfs.
    pub const CPU_NODE: &str = "CPU_NODE";
    /// `HashMap<u32 tid, MigrationCounts>`, filled by `sched_migrate_task`.
    pub const MIGRATIONS: &str = "MIGRATIONS";
}

const _: () = assert!(core::mem::size_of::<TrackedThread>() == 8);
const _: () = assert!(core::mem::size_of::<MigrationCounts>() == 16);
const _: () = assert!(core::mem::size_of::<SchedMigrateLayout>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::TrackedThread {}
    unsafe impl aya::Pod for super::MigrationCounts {}
    unsafe impl aya::Pod for super::SchedMigrateLayout {}
}
