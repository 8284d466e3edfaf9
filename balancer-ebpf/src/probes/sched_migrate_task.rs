//! `sched_migrate_task` (kernel/sched/core.c, `set_task_cpu()`): a task is moved to
//! another CPU. Counts migrations, and those that cross NUMA nodes, per tracked
//! thread.
//!
//! Three entry points share the counting; the loader attaches the first one the
//! running kernel accepts:
//! - the BTF-typed tracepoint (`tp_btf`, preferred), `TP_PROTO(struct task_struct *p,
//!   int dest_cpu)`: the thread id and the origin CPU (`task_cpu(p)`, not yet
//!   changed when the tracepoint fires) are plain loads through the typed pointer,
//!   and no trace record is built;
//! - the raw tracepoint: the same arguments, the fields read with
//!   `bpf_probe_read_kernel`;
//! - the classic tracepoint `sched:sched_migrate_task`: the fields come from the
//!   record, at offsets from its format file.
//!
//! In each, an untracked thread costs its thread id and its entry of the slot
//! table; a tracked one its slot's owner and counters, array lookups all. A
//! cross-node move of a tracked thread also wakes the daemon when it listens
//! ([`crate::send_wake`]): its vCPUs left the node its memory was put on.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use balancer_common::{wake, SchedMigrateLayout, TaskMigrateLayout, ThreadState, WakeEvent};

use crate::{btf_field, kernel_field, node_of, send_wake, tracked};

/// Field offsets of the record on the running kernel, written by userspace from the
/// tracepoint's `format` file before the program is loaded.
#[no_mangle]
static SCHED_MIGRATE_LAYOUT: SchedMigrateLayout = SchedMigrateLayout {
    pid_offset: 0,
    orig_cpu_offset: 0,
    dest_cpu_offset: 0,
    valid: 0,
};

/// `task_struct` offsets on the running kernel, from its BTF.
#[no_mangle]
static TASK_MIGRATE_LAYOUT: TaskMigrateLayout = TaskMigrateLayout {
    task_pid_offset: 0,
    task_cpu_offset: 0,
    valid: 0,
    _pad: 0,
};

#[btf_tracepoint(function = "sched_migrate_task")]
pub fn sched_migrate_task_btf(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&TASK_MIGRATE_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    // SAFETY: `task` is the kernel's task pointer of this move, the offsets are its
    // fields on this kernel.
    let tid = unsafe { btf_field::<i32>(task, layout.task_pid_offset) } as u32;
    let Some(state) = tracked(tid) else {
        return 0;
    };
    // SAFETY: as above.
    let orig = unsafe { btf_field::<u32>(task, layout.task_cpu_offset) };
    let dest: u64 = ctx.arg(1);
    count(state, tid, orig, dest as u32);
    0
}

#[raw_tracepoint(tracepoint = "sched_migrate_task")]
pub fn sched_migrate_task_raw(ctx: RawTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&TASK_MIGRATE_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    let Ok(tid) = kernel_field::<i32>(task, layout.task_pid_offset) else {
        return 0;
    };
    let tid = tid as u32;
    let Some(state) = tracked(tid) else {
        return 0;
    };
    let Ok(orig) = kernel_field::<u32>(task, layout.task_cpu_offset) else {
        return 0;
    };
    let dest: u64 = ctx.arg(1);
    count(state, tid, orig, dest as u32);
    0
}

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
    let Some(state) = tracked(tid) else {
        return Ok(0);
    };
    // SAFETY: as above.
    let cpus = unsafe {
        (
            ctx.read_at::<i32>(layout.orig_cpu_offset as usize),
            ctx.read_at::<i32>(layout.dest_cpu_offset as usize),
        )
    };
    let (Ok(orig), Ok(dest)) = cpus else {
        // Only when the layout does not fit the record: a loader bug, not a hot path.
        warn!(
            ctx,
            "sched_migrate_task record unreadable, tid {} not counted", tid
        );
        return Err(0);
    };
    count(state, tid, orig as u32, dest as u32);
    Ok(0)
}

/// Counts one move of tracked thread `tid` (whose slot holds `state`) from CPU
/// `orig` to CPU `dest`.
#[inline(always)]
fn count(state: *mut ThreadState, tid: u32, orig: u32, dest: u32) {
    let (from, to) = (node_of(orig), node_of(dest));
    let cross = from != to;
    // SAFETY: `state` points into a live map value. Plain increments are enough:
    // the kernel serialises `set_task_cpu()` per task (it holds the task's pi_lock or
    // its runqueue lock), so two CPUs never count the same thread at once. (The
    // bpfel target also has no atomic fetch_add in `core`.)
    unsafe {
        if cross {
            let vm_pid = (*state).owner.vm_pid;
            send_wake(|| WakeEvent {
                kind: wake::CROSS_NODE,
                vm_pid,
                tid,
                from_node: from,
                to_node: to,
                count: 1,
            });
        }
        let counts = &mut (*state).migrations;
        counts.migrations += 1;
        if cross {
            counts.cross_node += 1;
        }
    }
}
