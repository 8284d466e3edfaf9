//! fentry on `task_numa_fault(int last_cpupid, int mem_node, int pages, int flags)`
//! (kernel/sched/fair.c): the kernel's automatic NUMA balancing took a hinting fault
//! for the current task. For KVM guests the fault is charged to the vCPU thread.
//! Counts faults by memory node, local/remote and migrated pages per tracked thread.
//!
//! The same counting is also built as a kprobe, which the loader attaches where the
//! kernel refuses fentry programs (no BPF trampoline, or a security policy), and as a
//! perf-event program on a hardware execution breakpoint at the function's first
//! instruction, for kernels that have neither BPF trampolines nor kprobes. The
//! breakpoint stops before the instruction runs, so the registers hold the arguments
//! (x86-64 calling convention: rdi, rsi, rdx, rcx); it costs a debug exception per
//! hinting fault, which is why it comes last.

use aya_ebpf::{
    macros::{fentry, kprobe, perf_event},
    programs::{FEntryContext, PerfEventContext, ProbeContext},
};
use balancer_common::{tnf, MAX_NODES};

use crate::{current_tid, get_or_insert, is_tracked, NUMA_FAULTS};

#[fentry(function = "task_numa_fault")]
pub fn task_numa_fault(ctx: FEntryContext) -> u32 {
    match count(ctx.arg(1), ctx.arg(2), ctx.arg(3)) {
        Ok(r) | Err(r) => r,
    }
}

#[kprobe]
pub fn task_numa_fault_kprobe(ctx: ProbeContext) -> u32 {
    let (Some(mem_node), Some(pages), Some(flags)) = (ctx.arg(1), ctx.arg(2), ctx.arg(3)) else {
        return 0;
    };
    match count(mem_node, pages, flags) {
        Ok(r) | Err(r) => r,
    }
}

#[perf_event]
pub fn task_numa_fault_breakpoint(ctx: PerfEventContext) -> u32 {
    // SAFETY: the perf event's saved registers, a read-only part of the context.
    let (mem_node, pages, flags) = unsafe {
        let regs = &(*ctx.ctx).regs;
        (regs.rsi as i32, regs.rdx as i32, regs.rcx as i32)
    };
    match count(mem_node, pages, flags) {
        Ok(r) | Err(r) => r,
    }
}

/// Counts one hinting fault of the current thread, if tracked.
#[inline(always)]
fn count(mem_node: i32, pages: i32, flags: i32) -> Result<u32, u32> {
    let tid = current_tid();
    if !is_tracked(tid) {
        return Ok(0);
    }
    let f = get_or_insert(&NUMA_FAULTS, tid).ok_or(0u32)?;
    let pages = if pages > 0 { pages as u64 } else { 0 };
    // SAFETY: live map value of the current thread; only it faults as itself.
    unsafe {
        if mem_node >= 0 && (mem_node as usize) < MAX_NODES {
            (*f).faults_by_mem_node[mem_node as usize] += 1;
        }
        if flags & tnf::FAULT_LOCAL != 0 {
            (*f).local_faults += 1;
        } else {
            (*f).remote_faults += 1;
        }
        if flags & tnf::MIGRATED != 0 {
            (*f).migrated_pages += pages;
        }
        (*f).pages += pages;
    }
    Ok(0)
}
