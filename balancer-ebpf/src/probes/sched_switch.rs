//! Raw tracepoint `sched_switch` (kernel/sched/core.c, `__schedule()`): the CPU
//! switches from `prev` to `next`. Accumulates the on-CPU time of tracked threads by
//! the NUMA node of the CPU. A per-CPU slot remembers which tracked thread was
//! switched in and when; switching it out adds the elapsed time to its counters.
//! A thread already running when it becomes tracked counts from its next switch-in.
//!
//! A raw tracepoint rather than the classic `sched:sched_switch`: classic tracepoint
//! programs are skipped while any BPF map syscall or other tracing program holds the
//! CPU's `bpf_prog_active`, and a skipped switch-out loses a whole time slice. Raw
//! tracepoint programs only guard against recursion of themselves. The price is a
//! struct field read: `task_struct.pid`, at the offset userspace takes from BTF.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::raw_tracepoint, programs::RawTracePointContext,
};
use balancer_common::{OnCpuState, SchedSwitchLayout, MAX_NODES};

use crate::{get_or_insert, node_of, now_ns, this_cpu, tracked, ON_CPU, ON_CPU_STATE};

/// `task_struct.pid` on the running kernel, patched by the loader.
#[no_mangle]
static SCHED_SWITCH_LAYOUT: SchedSwitchLayout = SchedSwitchLayout {
    task_pid_offset: 0,
    valid: 0,
};

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    match try_sched_switch(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

/// `task->pid` of a task pointer argument.
#[inline(always)]
fn pid_of(ctx: &RawTracePointContext, arg: usize, pid_offset: u32) -> Result<u32, i32> {
    let task: u64 = ctx.arg(arg);
    let ptr = (task as usize + pid_offset as usize) as *const i32;
    // SAFETY: a checked kernel read of a field of a live task_struct.
    unsafe { bpf_probe_read_kernel(ptr) }
        .map(|p| p as u32)
        .map_err(|_| 0)
}

fn try_sched_switch(ctx: &RawTracePointContext) -> Result<i32, i32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    let state = ON_CPU_STATE.get_ptr_mut(0).ok_or(0)?;
    let now = now_ns();
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let current = unsafe { *state };
    if current.tid != 0 {
        let prev = pid_of(ctx, 1, layout.task_pid_offset)?;
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
    let next = pid_of(ctx, 2, layout.task_pid_offset)?;
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
