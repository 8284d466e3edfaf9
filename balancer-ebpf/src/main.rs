//! vmbalancer's eBPF programs. One file per kernel hook under [`probes`]; the maps
//! they share and small helpers live here.
//!
//! Most events of a host are about threads that are not tracked, so every program
//! decides that case first and with the least work: the thread id and one bit of
//! [`TRACKED_BITS`] (an array lookup, which the JIT inlines into a bounds check and
//! a load); no hash lookup, no write. Only for tracked threads do the programs read
//! further fields and touch their counters (hash maps keyed by thread or VM: a call
//! and a hash of the key each). No program reads a clock: a clock read costs more
//! than the rest of an event's work (on-CPU time comes from the scheduler's own
//! accounting, see [`probes::sched_switch`]).
//!
//! Per-thread maps are keyed by the thread the event is about, which is the current
//! thread or a thread the kernel serialises (a task is switched out or migrated by one
//! CPU at a time), so plain increments are race-free there. Maps shared by the threads
//! of a VM are per-CPU; userspace sums them. No atomics on any hot path.
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
    tracked_bit, wake, MigrationCounts, NumaFaults, OnCpuTime, RegionFaults, RegionKey,
    TrackedThread, VmNumaEvents, WakeEvent, MAX_CPUS, MAX_HOT_REGIONS, MAX_TRACKED_THREADS,
    MAX_VMS, REGION_SHIFT, TRACKED_BITS_WORDS, UNKNOWN_NODE,
};

/// Threads to watch (tid -> thread), written by userspace.
#[map(name = "TRACKED")]
static TRACKED: HashMap<u32, TrackedThread> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// The keys of [`TRACKED`] as a bitmap indexed by thread id, written by userspace
/// (which sizes it from `kernel.pid_max`).
#[map(name = "TRACKED_BITS")]
static TRACKED_BITS: Array<u64> = Array::with_max_entries(TRACKED_BITS_WORDS, 0);

/// CPU -> NUMA node, written by userspace from sysfs.
#[map(name = "CPU_NODE")]
static CPU_NODE: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// Migrations per tracked thread (tid -> counts).
#[map(name = "MIGRATIONS")]
static MIGRATIONS: HashMap<u32, MigrationCounts> =
    HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// On-CPU time per tracked thread (tid -> time by node).
#[map(name = "ON_CPU")]
static ON_CPU: HashMap<u32, OnCpuTime> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// NUMA hinting faults per tracked thread.
#[map(name = "NUMA_FAULTS")]
static NUMA_FAULTS: HashMap<u32, NumaFaults> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

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

/// Whether thread `tid` is tracked. Thread ids beyond the bitmap (`kernel.pid_max`
/// raised after loading) are looked up in [`TRACKED`] instead.
#[inline(always)]
fn is_tracked(tid: u32) -> bool {
    let (word, mask) = tracked_bit(tid);
    match TRACKED_BITS.get(word) {
        Some(bits) => *bits & mask != 0,
        // SAFETY: only the presence of the key is used.
        None => unsafe { TRACKED.get(tid) }.is_some(),
    }
}

/// The tracked thread with id `tid`, if any: the bitmap first, the hash only for a
/// tracked thread.
#[inline(always)]
fn tracked(tid: u32) -> Option<TrackedThread> {
    if !is_tracked(tid) {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { TRACKED.get(tid) }.copied()
}

/// The current thread's VM if it is tracked. A tracked thread's VM is its thread
/// group (the qemu process, [`TrackedThread::vm_pid`]), which comes with the thread
/// id from one helper: no lookup of [`TRACKED`].
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

/// A pointer to `map[key]`, inserting `V::default()` first when missing. `None` only
/// when the map is full.
#[inline(always)]
fn get_or_insert<V: Default>(map: &HashMap<u32, V>, key: u32) -> Option<*mut V> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    // BPF_NOEXIST: if another CPU inserted it meanwhile, use theirs.
    let _ = map.insert(key, V::default(), 1);
    map.get_ptr_mut(key)
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
