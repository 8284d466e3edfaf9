//! Tracepoint `exceptions:page_fault_user` (arch/x86/mm/fault.c,
//! `trace_page_fault_entries()`): a user-space page fault at `address`. Faults of
//! tracked threads count towards their VM's 2 MiB region in `HOT_REGIONS`, on the
//! slot of this CPU (whose node is the faulting node).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use balancer_common::{FaultAddressLayout, REGION_KIND_HVA};

use crate::{count_region_fault, current_tid, tracked};

/// Field offsets on the running kernel, patched by the loader.
#[no_mangle]
static PAGE_FAULT_USER_LAYOUT: FaultAddressLayout = FaultAddressLayout {
    address_offset: 0,
    valid: 0,
};

#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    match try_page_fault_user(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_page_fault_user(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&PAGE_FAULT_USER_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    let Some(thread) = tracked(current_tid()) else {
        return Ok(0);
    };
    // SAFETY: offset from the running kernel's format file.
    let address: u64 = unsafe { ctx.read_at(layout.address_offset as usize) }.map_err(|_| 0u32)?;
    count_region_fault(thread.vm_pid, REGION_KIND_HVA, address);
    Ok(0)
}
