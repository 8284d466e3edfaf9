//! vmbalancer's eBPF programs. One file per kernel hook under [`probes`]; the maps
//! they share and small helpers live here.
//!
//! Most events of a host are about threads that are not tracked, so every program
//! decides that case first and with the least work: the thread id and its entry in
//! [`TRACKED_SLOTS`] (an array lookup, which the JIT inlines into a bounds check and
//! a load); no hash lookup, no write. The same entry gives a tracked thread its
//! slot: a small index userspace assigns when it tracks the thread, under which
//! [`THREADS`] keeps all its state (owner, on-CPU time, migrations, hinting faults)
//! in one value. That is an array too, so a tracked event costs two inlined lookups
//! and no hash of a key (a hash lookup is a call and tens of nanoseconds). No program
//! reads a clock: a clock read costs more than the rest of an event's work (on-CPU
//! time comes from the scheduler's own accounting, see [`probes::sched_switch`]).
//!
//! The slot table holds one 16-bit entry per thread id below `kernel.pid_max`, four
//! to a word (an array map rounds each value up to 8 bytes, so unpacked entries
//! would cost four times as much): 64 KiB at the usual pid_max of 32768, 8 MiB at the
//! 4 Mi maximum systemd sets. Thread ids beyond it (pid_max raised after loading)
//! fall back to the [`TRACKED`] hash.
//!
//! Userspace writes a word of the table with an ordinary map update (a copy that
//! may be seen half done), so a program that finds a slot checks that the slot's
//! owner is its thread before it counts there. Userspace resets a
//! slot's state and writes its owner before it publishes the thread's entry, and
//! clears the entry before it frees the slot; it hands a freed slot out again only
//! after every program that could still have read the old entry has finished (see
//! the daemon's `telemetry::slots`). So a slot never carries one thread's counts to
//! the next.
//!
//! Per-thread state is written for the thread the event is about, which is the
//! current thread or a thread the kernel serialises (a task is switched out or
//! migrated by one CPU at a time), so plain increments are race-free there. Maps
//! shared by the threads of a VM are per-CPU; userspace sums them. No atomics and no
//! locks on any hot path.
//!
//! Two events also wake the daemon between its ticks ([`send_wake`]): a tracked
//! thread moved to another node, and many remote hinting faults. A one-word switch
//! the daemon sets when it observes ([`WAKE_ARMED`]) lets one such event through to
//! a small ring buffer and is cleared by it, so a storm of events costs the daemon
//! one wake, and the programs a load and a compare each while it is not listening.
#![no_std]
#![no_main]

mod probes;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use balancer_common::{
    slot_of_entry, tracked_slot_entry, wake, RegionFaults, RegionKey, ThreadState, VmNumaEvents,
    WakeEvent, MAX_CPUS, MAX_HOT_REGIONS, MAX_TRACKED_THREADS, MAX_VMS, REGION_SHIFT,
    TRACKED_SLOTS_WORDS, TRACKED_SLOT_BITS, UNKNOWN_NODE,
};

/// Thread id -> slot plus one (0: not tracked), four 16-bit entries per word,
/// written by userspace (which sizes it from `kernel.pid_max`).
#[map(name = "TRACKED_SLOTS")]
static TRACKED_SLOTS: Array<u64> = Array::with_max_entries(TRACKED_SLOTS_WORDS, 0);

/// Thread id -> slot plus one of every tracked thread, written by userspace; read
/// only for thread ids beyond [`TRACKED_SLOTS`].
#[map(name = "TRACKED")]
static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// Slot -> the thread that holds it, its VM and its counters: owner and starting
/// point written by userspace when it assigns the slot, counters by the programs.
#[map(name = "THREADS")]
static THREADS: Array<ThreadState> = Array::with_max_entries(MAX_TRACKED_THREADS, 0);

/// CPU -> NUMA node, written by userspace from sysfs.
#[map(name = "CPU_NODE")]
static CPU_NODE: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// Page faults per VM and 2 MiB region, per CPU; least recently used regions go first.
#[map(name = "HOT_REGIONS")]
static HOT_REGIONS: LruPerCpuHashMap<RegionKey, RegionFaults> =
    LruPerCpuHashMap::with_max_entries(MAX_HOT_REGIONS, 0);

/// Kernel NUMA balancing moves per VM, per CPU.
#[map(name = "VM_NUMA_EVENTS")]
static VM_NUMA_EVENTS: PerCpuHashMap<u32, VmNumaEvents> =
    PerCpuHashMap::with_max_entries(MAX_VMS, 0);

/// Reasons to wake the daemon, read by it between ticks.
#[map(name = "WAKE_EVENTS")]
static WAKE_EVENTS: RingBuf = RingBuf::with_byte_size(wake::RING_BYTES, 0);

/// Non-zero while the daemon listens for a wake (set by it, cleared by a sender).
#[map(name = "WAKE_ARMED")]
static WAKE_ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Remote hinting faults of tracked threads on each CPU since it last sent a wake.
#[map(name = "REMOTE_FAULTS_SINCE_WAKE")]
static REMOTE_FAULTS_SINCE_WAKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Sends the wake `event` builds when the daemon listens, and stops it listening
/// until it observes again; true when sent. Two CPUs may both send for one arming:
/// the daemon reads both, and the ring buffer holds far more than one per CPU.
#[inline(always)]
fn send_wake(event: impl FnOnce() -> WakeEvent) -> bool {
    let Some(armed) = WAKE_ARMED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the one live entry of an array map; volatile so each event reads the
    // word userspace writes.
    unsafe {
        if core::ptr::read_volatile(armed) == 0 {
            return false;
        }
        core::ptr::write_volatile(armed, 0);
    }
    WAKE_EVENTS.output::<WakeEvent>(&event(), 0).is_ok()
}

/// Thread `tid`'s entry of the slot table: 0 when not tracked, else its slot plus
/// one (see [`tracked`] before trusting the slot). Thread ids beyond the table
/// (`kernel.pid_max` raised after loading) are looked up in [`TRACKED`] instead.
#[inline(always)]
fn slot_entry(tid: u32) -> u32 {
    let (word, shift) = tracked_slot_entry(tid);
    match TRACKED_SLOTS.get(word) {
        Some(bits) => ((*bits >> shift) & ENTRY_MASK) as u32,
        // SAFETY: the value is copied out at once.
        None => unsafe { TRACKED.get(tid) }.copied().unwrap_or(0),
    }
}

/// Mask of one entry of [`TRACKED_SLOTS`].
const ENTRY_MASK: u64 = (1 << TRACKED_SLOT_BITS) - 1;

/// Whether thread `tid` is tracked: one entry, no owner check. An entry seen while
/// userspace rewrites it belongs to a thread being tracked or untracked at that
/// moment, for which either answer is right.
#[inline(always)]
fn is_tracked(tid: u32) -> bool {
    slot_entry(tid) != 0
}

/// The state of thread `tid` if it is tracked: its entry in the slot table first
/// (the untracked case ends there), then its slot's value, whose owner must be
/// `tid`. A pointer into [`THREADS`], written only for that thread (see the crate
/// documentation).
#[inline(always)]
fn tracked(tid: u32) -> Option<*mut ThreadState> {
    let slot = slot_of_entry(slot_entry(tid))?;
    // Explicit, though the lookup checks it too: older verifiers see the bound.
    if slot >= MAX_TRACKED_THREADS {
        return None;
    }
    let state = THREADS.get_ptr_mut(slot)?;
    // SAFETY: a live map value; the owner is written by userspace only while the
    // slot is unpublished.
    if unsafe { (*state).owner.tid } != tid {
        return None;
    }
    Some(state)
}

/// The current thread's VM if it is tracked. A tracked thread's VM is its thread
/// group (the qemu process, the owner's `vm_pid`), which comes with the thread id
/// from one helper: only the thread's entry of the slot table is read.
#[inline(always)]
fn current_tracked_vm() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    is_tracked(pid_tgid as u32).then_some((pid_tgid >> 32) as u32)
}

/// NUMA node of a CPU, [`UNKNOWN_NODE`] when the table does not know it.
#[inline(always)]
fn node_of(cpu: u32) -> u32 {
    CPU_NODE.get(cpu).copied().unwrap_or(UNKNOWN_NODE)
}

/// The CPU running this program.
#[inline(always)]
fn this_cpu() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() }
}

/// A field read straight through a BTF-typed pointer (tp_btf arguments): the
/// verifier knows the pointer's type and, because the loader's global is read-only
/// and frozen, the offset as a constant, so it checks the field against the kernel's
/// BTF and the JIT emits one load (guarded by the exception table) instead of a
/// `bpf_probe_read_kernel` call.
///
/// # Safety
/// `base` is a typed pointer argument of a tp_btf program and a `T` field lies at
/// `offset` in what it points to.
#[inline(always)]
pub(crate) unsafe fn btf_field<T: Copy>(base: *const u8, offset: u32) -> T {
    core::ptr::read_volatile(base.add(offset as usize) as *const T)
}

/// A field of an untyped kernel pointer, read with `bpf_probe_read_kernel`.
#[inline(always)]
pub(crate) fn kernel_field<T: Copy>(base: u64, offset: u32) -> Result<T, i32> {
    let ptr = (base as usize + offset as usize) as *const T;
    // SAFETY: a checked kernel read.
    unsafe { bpf_probe_read_kernel(ptr) }.map_err(|_| 0)
}

/// Counts one fault of VM `vm_pid` at `address` in this CPU's slot of [`HOT_REGIONS`].
#[inline(always)]
fn count_region_fault(vm_pid: u32, kind: u32, address: u64) {
    let key = RegionKey {
        vm_pid,
        kind,
        region: address >> REGION_SHIFT,
    };
    match HOT_REGIONS.get_ptr_mut(key) {
        Some(p) => {
            // SAFETY: this CPU's slot of a live map value.
            unsafe { (*p).faults += 1 };
        }
        None => {
            let v = RegionFaults { faults: 1 };
            // An LRU map evicts instead of failing; ignore the rare race with another
            // CPU inserting the same key (one fault lost).
            let _ = HOT_REGIONS.insert(key, v, 0);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
