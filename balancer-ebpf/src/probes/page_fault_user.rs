//! Raw tracepoint `page_fault_user` (arch/x86/mm/fault.c, `trace_page_fault_entries()`,
//! `TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)`):
//! a user-space page fault at `address`. Faults of tracked threads count towards
//! their VM's 2 MiB region in `HOT_REGIONS`, on the slot of this CPU (whose node is
//! the faulting node).
//!
//! A raw tracepoint rather than the classic `exceptions:page_fault_user`: page faults
//! are the hottest path a VM has, and the classic form first copies the whole record
//! into a perf buffer for every fault on the host, tracked or not; here the program
//! reads the first argument directly. The loader checks the argument's name and
//! type in the event's `format` file before attaching, so a kernel that changes the
//! prototype disables the feature instead of counting garbage.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use balancer_common::{FaultAddressLayout, REGION_KIND_HVA};

use crate::{count_region_fault, current_tracked_vm};

/// `valid` is set by the loader once it checked the prototype.
#[no_mangle]
static PAGE_FAULT_USER_LAYOUT: FaultAddressLayout = FaultAddressLayout {
    address_offset: 0,
    valid: 0,
};

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    match try_page_fault_user(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_page_fault_user(ctx: &RawTracePointContext) -> Result<i32, i32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&PAGE_FAULT_USER_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    let Some(vm_pid) = current_tracked_vm() else {
        return Ok(0);
    };
    let address: u64 = ctx.arg(0);
    count_region_fault(vm_pid, REGION_KIND_HVA, address);
    Ok(0)
}
