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

const _: () = assert!(core::mem::size_of::<TrackedThread>() == 8);
const _: () = assert!(core::mem::size_of::<MigrationCounts>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::TrackedThread {}
    unsafe impl aya::Pod for super::MigrationCounts {}
}
