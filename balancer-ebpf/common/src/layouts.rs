//! Tracepoint record layouts: where the fields a program reads sit, in bytes from the
//! start of the record. Userspace reads them from the tracepoint's `format` file at
//! load time and writes them into the program's global of the same name before
//! loading: layouts differ between kernel versions. Each program does nothing while
//! `valid` is 0.

/// `sched:sched_migrate_task`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedMigrateLayout {
    /// `pid_t pid` (the migrated thread id).
    pub pid_offset: u32,
    /// `int orig_cpu`.
    pub orig_cpu_offset: u32,
    /// `int dest_cpu`.
    pub dest_cpu_offset: u32,
    pub valid: u32,
}

/// `sched_migrate_task` as a BTF-typed or raw tracepoint, `TP_PROTO(struct
/// task_struct *p, int dest_cpu)`: the programs read the task's `pid` and its
/// current CPU (the origin of the move) at the offsets userspace found in the
/// kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskMigrateLayout {
    /// Offset of `pid_t pid` in `struct task_struct`.
    pub task_pid_offset: u32,
    /// Offset of the task's CPU (`thread_info.cpu`, or `cpu` on kernels before 5.16
    /// and architectures without the thread info in the task).
    pub task_cpu_offset: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// `sched_switch`, `TP_PROTO(bool preempt, struct task_struct *prev, struct
/// task_struct *next, ...)`: the programs read the switched-out task's `pid` and its
/// run time (`se.sum_exec_runtime`) at the offsets userspace found in the kernel's
/// BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedSwitchLayout {
    /// Offset of `pid_t pid` in `struct task_struct`.
    pub task_pid_offset: u32,
    /// Offset of `u64 se.sum_exec_runtime` in `struct task_struct`.
    pub task_runtime_offset: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// Classic tracepoint `sched:sched_switch`: the thread ids in the record, for kernels
/// that refuse the raw and BTF-typed programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedSwitchRecordLayout {
    /// `pid_t prev_pid`.
    pub prev_pid_offset: u32,
    /// `pid_t next_pid`.
    pub next_pid_offset: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// `exceptions:page_fault_user` (x86) and `kvm:kvm_page_fault`: one address field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultAddressLayout {
    /// `unsigned long address` / `u64 fault_address`.
    pub address_offset: u32,
    pub valid: u32,
}

/// `sched:sched_move_numa` and `sched:sched_swap_numa`: the thread ids involved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NumaMoveLayout {
    /// `pid_t pid` (move) or `pid_t src_pid` (swap).
    pub src_pid_offset: u32,
    /// `pid_t dst_pid` (swap only; unused for move).
    pub dst_pid_offset: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// Global names the loader patches.
pub mod globals {
    pub const SCHED_MIGRATE: &str = "SCHED_MIGRATE_LAYOUT";
    pub const TASK_MIGRATE: &str = "TASK_MIGRATE_LAYOUT";
    pub const SCHED_SWITCH: &str = "SCHED_SWITCH_LAYOUT";
    pub const SCHED_SWITCH_RECORD: &str = "SCHED_SWITCH_RECORD_LAYOUT";
    pub const PAGE_FAULT_USER: &str = "PAGE_FAULT_USER_LAYOUT";
    pub const KVM_PAGE_FAULT: &str = "KVM_PAGE_FAULT_LAYOUT";
    pub const SCHED_MOVE_NUMA: &str = "SCHED_MOVE_NUMA_LAYOUT";
    pub const SCHED_SWAP_NUMA: &str = "SCHED_SWAP_NUMA_LAYOUT";
}

/// Flags of `task_numa_fault(last_cpupid, mem_node, pages, flags)`, `TNF_*` in
/// kernel/sched/sched.h (unchanged since Linux 3.13).
pub mod tnf {
    pub const MIGRATED: i32 = 0x01;
    pub const FAULT_LOCAL: i32 = 0x08;
}

const _: () = assert!(core::mem::size_of::<SchedMigrateLayout>() == 16);
const _: () = assert!(core::mem::size_of::<TaskMigrateLayout>() == 16);
const _: () = assert!(core::mem::size_of::<SchedSwitchLayout>() == 16);
const _: () = assert!(core::mem::size_of::<SchedSwitchRecordLayout>() == 16);
const _: () = assert!(core::mem::size_of::<FaultAddressLayout>() == 8);
const _: () = assert!(core::mem::size_of::<NumaMoveLayout>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::SchedMigrateLayout {}
    unsafe impl aya::Pod for super::TaskMigrateLayout {}
    unsafe impl aya::Pod for super::SchedSwitchLayout {}
    unsafe impl aya::Pod for super::SchedSwitchRecordLayout {}
    unsafe impl aya::Pod for super::FaultAddressLayout {}
    unsafe impl aya::Pod for super::NumaMoveLayout {}
}
