//! vmbalancer's eBPF programs. One file per kernel hook under [`probes`]; the maps
//! they share and small helpers live here. Every program first looks the thread up in
//! [`TRACKED`] and returns when it is not there, so the cost on the rest of the host
//! is one hash lookup per event.
//!
//! Per-thread maps are keyed by the thread the event is about, which is the current
//! thread or a thread the kernel serialises (a task is switched out or migrated by one
//! CPU at a time), so plain increments are race-free there. Maps shared by the threads
//! of a VM are per-CPU; userspace sums them. No atomics on any hot path.
#![no_std]
#![no_main]

mod probes;

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
};
use balancer_common::{
    MigrationCounts, NumaFaults, OnCpuState, OnCpuTime, RegionFaults, RegionKey, TrackedThread,
    VmNumaEvents, MAX_CPUS, MAX_HOT_REGIONS, MAX_TRACKED_THREADS, MAX_VMS, REGION_SHIFT,
    UNKNOWN_NODE,
};

/// Threads to watch (tid -> thread), written by userspace.
#[map(name = "TRACKED")]
static TRACKED: HashMap<u32, TrackedThread> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// CPU -> NUMA node, written by userspace from sysfs.
#[map(name = "CPU_NODE")]
static CPU_NODE: Array<u32> = Array::with_max_entries(MAX_CPUS, 0);

/// Migrations per tracked thread (tid -> counts).
#[map(name = "MIGRATIONS")]
static MIGRATIONS: HashMap<u32, MigrationCounts> =
    HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// The tracked thread this CPU runs, since when.
#[map(name = "ON_CPU_STATE")]
static ON_CPU_STATE: PerCpuArray<OnCpuState> = PerCpuArray::with_max_entries(1, 0);

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

/// The tracked thread with id `tid`, if any.
#[inline(always)]
fn tracked(tid: u32) -> Option<TrackedThread> {
    // SAFETY: the value is copied out at once.
    unsafe { TRACKED.get(tid) }.copied()
}

/// Thread id of the current task.
#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
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

/// Nanoseconds since boot (CLOCK_MONOTONIC).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
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
    let now = now_ns();
    match HOT_REGIONS.get_ptr_mut(key) {
        Some(p) => {
            // SAFETY: this CPU's slot of a live map value.
            unsafe {
                (*p).faults += 1;
                (*p).last_seen_ns = now;
            }
        }
        None => {
            let v = RegionFaults {
                faults: 1,
                last_seen_ns: now,
            };
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
