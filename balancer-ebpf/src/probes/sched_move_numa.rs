//! Tracepoint `sched:sched_move_numa` (kernel/sched/core.c, `migrate_task_to()`):
//! automatic NUMA balancing moves a task to its preferred node. Counted per VM.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use balancer_common::NumaMoveLayout;

use super::count_vm_event;

/// Field offsets on the running kernel, patched by the loader.
#[no_mangle]
static SCHED_MOVE_NUMA_LAYOUT: NumaMoveLayout = NumaMoveLayout {
    src_pid_offset: 0,
    dst_pid_offset: 0,
    valid: 0,
    _pad: 0,
};

#[tracepoint]
pub fn sched_move_numa(ctx: TracePointContext) -> u32 {
    match try_sched_move_numa(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sched_move_numa(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_MOVE_NUMA_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    // SAFETY: offset from the running kernel's format file.
    let pid: i32 = unsafe { ctx.read_at(layout.src_pid_offset as usize) }.map_err(|_| 0u32)?;
    count_vm_event(pid as u32, |e| e.move_numa += 1);
    Ok(0)
}
