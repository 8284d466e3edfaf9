//! `sched_switch` (kernel/sched/core.c, `__schedule()`): the CPU switches from `prev`
//! to `next`. Accumulates the on-CPU time of tracked threads by the NUMA node of the
//! CPU. A per-CPU slot remembers which tracked thread was switched in and when;
//! switching it out adds the elapsed time to its counters. A thread already running
//! when it becomes tracked counts from its next switch-in.
//!
//! Three entry points share that accounting; the loader attaches the first one the
//! running kernel accepts:
//! - the raw tracepoint (preferred): raw tracepoint programs only guard against
//!   recursion of themselves, while classic tracepoint programs are skipped whenever
//!   any BPF map syscall or other tracing program holds the CPU's `bpf_prog_active`,
//!   and a skipped switch-out loses a whole time slice. It reads `task_struct.pid`
//!   at the offset userspace takes from BTF;
//! - the BTF-typed tracepoint (`tp_btf`): the same hook, arguments and guard, typed
//!   by the kernel's BTF;
//! - the classic tracepoint `sched:sched_switch`: the thread ids come in the record
//!   (offsets from its format file), at the price of the skips above.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use balancer_common::{OnCpuState, SchedSwitchLayout, SchedSwitchRecordLayout, MAX_NODES};

use crate::{get_or_insert, node_of, now_ns, this_cpu, tracked, ON_CPU, ON_CPU_STATE};

/// `task_struct.pid` on the running kernel, patched by the loader.
#[no_mangle]
static SCHED_SWITCH_LAYOUT: SchedSwitchLayout = SchedSwitchLayout {
    task_pid_offset: 0,
    valid: 0,
};

/// Offsets of `prev_pid` and `next_pid` in the classic tracepoint's record.
#[no_mangle]
static SCHED_SWITCH_RECORD_LAYOUT: SchedSwitchRecordLayout = SchedSwitchRecordLayout {
    prev_pid_offset: 0,
    next_pid_offset: 0,
    valid: 0,
    _pad: 0,
};

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let off = layout.task_pid_offset;
    match account(|| pid_of(ctx.arg(1), off), || pid_of(ctx.arg(2), off)) {
        Ok(r) | Err(r) => r,
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let off = layout.task_pid_offset;
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    match account(|| pid_of(prev, off), || pid_of(next, off)) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn sched_switch_tp(ctx: TracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_RECORD_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let field = |offset: u32| -> Result<u32, i32> {
        // SAFETY: an offset from the running kernel's format file.
        unsafe { ctx.read_at::<i32>(offset as usize) }
            .map(|p| p as u32)
            .map_err(|_| 0)
    };
    match account(
        || field(layout.prev_pid_offset),
        || field(layout.next_pid_offset),
    ) {
        Ok(r) | Err(r) => r,
    }
}

/// `task->pid` of a task pointer argument.
#[inline(always)]
fn pid_of(task: u64, pid_offset: u32) -> Result<u32, i32> {
    let ptr = (task as usize + pid_offset as usize) as *const i32;
    // SAFETY: a checked kernel read of a field of a live task_struct.
    unsafe { bpf_probe_read_kernel(ptr) }
        .map(|p| p as u32)
        .map_err(|_| 0)
}

/// The accounting of one switch. `prev` is only asked for when this CPU runs a
/// tracked thread, so the untracked case costs one per-CPU read and one lookup.
#[inline(always)]
fn account(
    prev: impl FnOnce() -> Result<u32, i32>,
    next: impl FnOnce() -> Result<u32, i32>,
) -> Result<i32, i32> {
    let state = ON_CPU_STATE.get_ptr_mut(0).ok_or(0)?;
    let now = now_ns();
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let current = unsafe { *state };
    if current.tid != 0 {
        let prev = prev()?;
        // Still tracked: userspace may have untracked it while it ran, and must not
        // find its counters recreated.
        if current.tid == prev && now > current.since_ns && tracked(prev).is_some() {
            let elapsed = now - current.since_ns;
            if let Some(t) = get_or_insert(&ON_CPU, current.tid) {
                // SAFETY: live map value; only the CPU switching this thread out
                // writes it.
                unsafe {
                    (*t).total_ns += elapsed;
                    let node = current.node as usize;
                    if node < MAX_NODES {
                        (*t).ns_by_node[node] += elapsed;
                    }
                }
            }
        }
    }
    let next = next()?;
    let new_state = if next != 0 && tracked(next).is_some() {
        OnCpuState {
            tid: next,
            node: node_of(this_cpu()),
            since_ns: now,
        }
    } else {
        OnCpuState::default()
    };
    // SAFETY: this CPU's slot.
    unsafe { *state = new_state };
    Ok(0)
}
