//! Tracepoint `sched:sched_migrate_task` (kernel/sched/core.c, `set_task_cpu()`): a
//! task is moved to another CPU. Counts migrations, and those that cross NUMA nodes,
//! per tracked thread.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use balancer_common::SchedMigrateLayout;

use crate::{get_or_insert, node_of, tracked, MIGRATIONS};

/// Field offsets of the record on the running kernel, written by userspace from the
/// tracepoint's `format` file before the program is loaded.
#[no_mangle]
static SCHED_MIGRATE_LAYOUT: SchedMigrateLayout = SchedMigrateLayout {
    pid_offset: 0,
    orig_cpu_offset: 0,
    dest_cpu_offset: 0,
    valid: 0,
};

#[tracepoint]
pub fn sched_migrate_task(ctx: TracePointContext) -> u32 {
    match try_sched_migrate_task(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sched_migrate_task(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: a plain read of a global the loader patched; volatile so the compiler
    // does not fold the build-time zeroes.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_MIGRATE_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    // SAFETY: offsets come from the running kernel's format file; read_at checks them.
    let tid: i32 = unsafe { ctx.read_at(layout.pid_offset as usize) }.map_err(|_| 0u32)?;
    let tid = tid as u32;
    if tracked(tid).is_none() {
        return Ok(0);
    }
    let orig: i32 = unsafe { ctx.read_at(layout.orig_cpu_offset as usize) }.map_err(|_| 0u32)?;
    let dest: i32 = unsafe { ctx.read_at(layout.dest_cpu_offset as usize) }.map_err(|_| 0u32)?;
    let cross = node_of(orig as u32) != node_of(dest as u32);

    let Some(counts) = get_or_insert(&MIGRATIONS, tid) else {
        // Only when the map is full: a configuration problem, not a hot path.
        warn!(ctx, "MIGRATIONS map full, tid {} not counted", tid);
        return Err(0);
    };
    // SAFETY: `counts` points into a live map value. Plain increments are enough:
    // the kernel serialises `set_task_cpu()` per task (it holds the task's pi_lock or
    // its runqueue lock), so two CPUs never count the same thread at once. (The
    // bpfel target also has no atomic fetch_add in `core`.)
    unsafe {
        (*counts).migrations += 1;
        if cross {
            (*counts).cross_node += 1;
        }
    }
    Ok(0)
}
