//! One module per kernel hook.

pub mod kvm_page_fault;
pub mod page_fault_user;
pub mod sched_migrate_task;
pub mod sched_move_numa;
pub mod sched_swap_numa;
pub mod sched_switch;
pub mod task_numa_fault;

use balancer_common::VmNumaEvents;

use crate::{tracked, VM_NUMA_EVENTS};

/// Applies `f` to this CPU's [`VmNumaEvents`] of the VM thread `tid` belongs to, if
/// it is tracked.
#[inline(always)]
fn count_vm_event(tid: u32, f: impl FnOnce(&mut VmNumaEvents)) {
    let Some(state) = tracked(tid) else { return };
    // SAFETY: a live map value; the slot's owner holds the VM.
    let vm = unsafe { (*state).owner.vm_pid };
    if VM_NUMA_EVENTS.get_ptr_mut(vm).is_none() {
        let _ = VM_NUMA_EVENTS.insert(vm, VmNumaEvents::default(), 1);
    }
    if let Some(p) = VM_NUMA_EVENTS.get_ptr_mut(vm) {
        // SAFETY: this CPU's slot of a live per-CPU map value.
        f(unsafe { &mut *p });
    }
}
