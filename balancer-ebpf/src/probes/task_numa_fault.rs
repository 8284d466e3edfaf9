//! fentry on `task_numa_fault(int last_cpupid, int mem_node, int pages, int flags)`
//! (kernel/sched/fair.c): the kernel's automatic NUMA balancing took a hinting fault
//! for the current task. For KVM guests the fault is charged to the vCPU thread.
//! Counts faults by memory node, local/remote and migrated pages per tracked thread.
//! Every [`wake::REMOTE_FAULTS_PER_WAKE`] remote faults on one CPU wake the daemon
//! when it listens: a VM's memory is away from where it runs.
//!
//! The same counting is also built as a kprobe, which the loader attaches where the
//! kernel refuses fentry programs (no BPF trampoline, or a security policy), and as a
//! perf-event program on a hardware execution breakpoint at the function's first
//! instruction, for kernels that have neither BPF trampolines nor kprobes. The
//! breakpoint stops before the instruction runs, so the registers hold the arguments
//! (x86-64 calling convention: rdi, rsi, rdx, rcx); it costs a debug exception per
//! hinting fault, which is why it comes last.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::{
    macros::{fentry, kprobe, perf_event},
    programs::{FEntryContext, PerfEventContext, ProbeContext},
};
use balancer_common::{tnf, wake, WakeEvent, MAX_NODES};

use crate::{node_of, send_wake, this_cpu, tracked, REMOTE_FAULTS_SINCE_WAKE};

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
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(state) = tracked(tid) else {
        return Ok(0);
    };
    let pages = if pages > 0 { pages as u64 } else { 0 };
    // SAFETY: live map value of the current thread's slot; only it faults as itself.
    unsafe {
        let f = &mut (*state).numa_faults;
        if mem_node >= 0 && (mem_node as usize) < MAX_NODES {
            f.faults_by_mem_node[mem_node as usize] += 1;
        }
        if flags & tnf::FAULT_LOCAL != 0 {
            f.local_faults += 1;
        } else {
            f.remote_faults += 1;
            remote_fault((pid_tgid >> 32) as u32, tid, mem_node);
        }
        if flags & tnf::MIGRATED != 0 {
            f.migrated_pages += pages;
        }
        f.pages += pages;
    }
    Ok(0)
}

/// Counts a remote fault of tracked thread `tid` of VM `vm_pid` on this CPU, and
/// wakes the daemon when this CPU has counted enough since it last did.
#[inline(always)]
fn remote_fault(vm_pid: u32, tid: u32, mem_node: i32) {
    let Some(n) = REMOTE_FAULTS_SINCE_WAKE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array; only this CPU writes it, and a
    // hinting fault does not nest within another on one CPU.
    unsafe {
        *n += 1;
        let count = *n;
        if count < wake::REMOTE_FAULTS_PER_WAKE {
            return;
        }
        let sent = send_wake(|| WakeEvent {
            kind: wake::REMOTE_FAULTS,
            vm_pid,
            tid,
            from_node: node_of(this_cpu()),
            to_node: mem_node as u32,
            count: count.min(u32::MAX as u64) as u32,
        });
        if sent {
            *n = 0;
        }
    }
}
