//! Tracepoint `sched:sched_swap_numa` (kernel/sched/core.c, `migrate_swap()`):
//! automatic NUMA balancing swaps two tasks between nodes. Counted for the VM of
//! each tracked task involved.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use balancer_common::NumaMoveLayout;

use super::count_vm_event;

/// Field offsets on the running kernel, patched by the loader.
#[no_mangle]
static SCHED_SWAP_NUMA_LAYOUT: NumaMoveLayout = NumaMoveLayout {
    src_pid_offset: 0,
    dst_pid_offset: 0,
    valid: 0,
    _pad: 0,
};

#[tracepoint]
pub fn sched_swap_numa(ctx: TracePointContext) -> u32 {
    match try_sched_swap_numa(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sched_swap_numa(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWAP_NUMA_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    // SAFETY: offsets from the running kernel's format file.
    let src: i32 = unsafe { ctx.read_at(layout.src_pid_offset as usize) }.map_err(|_| 0u32)?;
    let dst: i32 = unsafe { ctx.read_at(layout.dst_pid_offset as usize) }.map_err(|_| 0u32)?;
    count_vm_event(src as u32, |e| e.swap_numa += 1);
    count_vm_event(dst as u32, |e| e.swap_numa += 1);
    Ok(0)
}
