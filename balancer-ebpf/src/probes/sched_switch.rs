//! `sched_switch` (kernel/sched/core.c, `__schedule()`): the CPU switches from `prev`
//! to `next`. Accumulates the on-CPU time of tracked threads by the NUMA node of the
//! CPU.
//!
//! The time is the scheduler's own: `__schedule()` has charged `prev` its slice
//! (`update_curr()` adds it to `se.sum_exec_runtime`, what `/proc/TID/schedstat` and
//! the thread CPU clock report) before the tracepoint fires. A thread runs only
//! between a switch-in and a switch-out on one CPU, so what its `sum_exec_runtime`
//! grew since its previous switch-out ran on this CPU: the switch-out adds that
//! difference to this CPU's node and keeps the new value. No clock is read (a clock
//! read costs more than the rest of the accounting), nothing is kept per CPU, and
//! `next` plays no part: the untracked case is `prev`'s thread id and its entry of
//! the slot table. Userspace stores the thread's `sum_exec_runtime` (from
//! `/proc/TID/schedstat`) in the thread's slot when it starts tracking it, so
//! counting starts there; where it could not ([`OnCpuTime::NO_START`]), the first
//! switch-out only records the value. A switch-out a program
//! misses (below) loses no time: the next one charges both slices, to its own node.
//!
//! Three entry points share that accounting; the loader attaches the first one the
//! running kernel accepts:
//! - the BTF-typed tracepoint (`tp_btf`, preferred): the kernel types the task
//!   pointers, so `pid` and `sum_exec_runtime` are plain loads;
//! - the raw tracepoint: the same hook and recursion guard, the fields read with
//!   `bpf_probe_read_kernel` (the arguments are untyped). Both only guard against
//!   recursion of themselves, while classic tracepoint programs are skipped whenever
//!   any BPF map syscall or other tracing program holds the CPU's `bpf_prog_active`;
//! - the classic tracepoint `sched:sched_switch`: `prev`'s thread id comes in the
//!   record (offset from its format file) and its run time from the current task,
//!   which is still `prev` when the tracepoint fires.

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
#[cfg(doc)]
use balancer_common::OnCpuTime;
use balancer_common::{SchedSwitchLayout, SchedSwitchRecordLayout, MAX_NODES};

use crate::{btf_field, kernel_field, node_of, this_cpu, tracked};

/// `task_struct` offsets on the running kernel, patched by the loader.
#[no_mangle]
static SCHED_SWITCH_LAYOUT: SchedSwitchLayout = SchedSwitchLayout {
    task_pid_offset: 0,
    task_runtime_offset: 0,
    valid: 0,
    _pad: 0,
};

/// Offsets of `prev_pid` and `next_pid` in the classic tracepoint's record.
#[no_mangle]
static SCHED_SWITCH_RECORD_LAYOUT: SchedSwitchRecordLayout = SchedSwitchRecordLayout {
    prev_pid_offset: 0,
    next_pid_offset: 0,
    valid: 0,
    _pad: 0,
};

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let prev: *const u8 = ctx.arg(1);
    // SAFETY: `prev` is the kernel's task pointer of this switch, the offsets are
    // its fields on this kernel.
    let tid = unsafe { btf_field::<i32>(prev, layout.task_pid_offset) } as u32;
    match account(tid, || {
        // SAFETY: as above.
        Ok(unsafe { btf_field::<u64>(prev, layout.task_runtime_offset) })
    }) {
        Ok(r) | Err(r) => r,
    }
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT) };
    if layout.valid == 0 {
        return 0;
    }
    let prev: u64 = ctx.arg(1);
    let Ok(tid) = kernel_field::<i32>(prev, layout.task_pid_offset) else {
        return 0;
    };
    match account(tid as u32, || {
        kernel_field::<u64>(prev, layout.task_runtime_offset)
    }) {
        Ok(r) | Err(r) => r,
    }
}

#[tracepoint]
pub fn sched_switch_tp(ctx: TracePointContext) -> i32 {
    // SAFETY: reads of globals the loader patched; volatile keeps them loads.
    let (record, layout) = unsafe {
        (
            core::ptr::read_volatile(&SCHED_SWITCH_RECORD_LAYOUT),
            core::ptr::read_volatile(&SCHED_SWITCH_LAYOUT),
        )
    };
    if record.valid == 0 || layout.valid == 0 {
        return 0;
    }
    // SAFETY: an offset from the running kernel's format file.
    let Ok(tid) = (unsafe { ctx.read_at::<i32>(record.prev_pid_offset as usize) }) else {
        return 0;
    };
    match account(tid as u32, || {
        // SAFETY: a helper without arguments; the current task is `prev` until the
        // context switch that follows the tracepoint.
        let current = unsafe { bpf_get_current_task() };
        kernel_field::<u64>(current, layout.task_runtime_offset)
    }) {
        Ok(r) | Err(r) => r,
    }
}

/// The accounting of one switch-out of thread `tid`, whose `se.sum_exec_runtime`
/// `runtime` reads; it is only read for a tracked thread.
#[inline(always)]
fn account(tid: u32, runtime: impl FnOnce() -> Result<u64, i32>) -> Result<i32, i32> {
    if tid == 0 {
        return Ok(0);
    }
    let Some(state) = tracked(tid) else {
        return Ok(0);
    };
    let runtime_ns = runtime()?;
    // SAFETY: live map value; only the CPU switching this thread out writes it (a
    // task is switched out by one CPU at a time). A slot without a starting point
    // holds `OnCpuTime::NO_START`, which no run time exceeds: this switch-out only
    // records one.
    unsafe {
        let t = &mut (*state).on_cpu;
        let last = t.last_runtime_ns;
        t.last_runtime_ns = runtime_ns;
        if runtime_ns > last {
            let elapsed = runtime_ns - last;
            t.total_ns += elapsed;
            let node = node_of(this_cpu()) as usize;
            if node < MAX_NODES {
                t.ns_by_node[node] += elapsed;
            }
        }
    }
    Ok(0)
}
