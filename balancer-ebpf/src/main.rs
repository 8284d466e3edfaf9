//! vmbalancer's eBPF programs. One file per kernel hook under [`probes`]; the maps
//! they share live here. Every map is keyed by thread id and only threads userspace
//! put into [`TRACKED`] are counted, so the cost on untracked threads is one hash
//! lookup.
#![no_std]
#![no_main]

mod probes;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use balancer_common::{MigrationCounts, TrackedThread, MAX_CPUS, MAX_TRACKED_THREADS};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
