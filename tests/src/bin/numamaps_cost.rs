//! Measures what one read of `/proc/PID/numa_maps` costs for a process with 1 GiB of
//! touched anonymous memory, which is what bounds how often vmbalancer may read it.
//!
//! The read walks the page tables of every mapping while holding the mmap lock for
//! reading, so it costs CPU time in the reader and makes writers of the lock (mmap,
//! munmap, mprotect in the guest's qemu) wait. Printed, all from this one run:
//! - read + parse time of numa_maps with 4 KiB pages (`MADV_NOHUGEPAGE`, the worst
//!   case) and with transparent huge pages (`MADV_HUGEPAGE`), against baselines of
//!   `/proc/PID/stat` and `/proc/PID/maps` (no page walk) read the same way;
//! - the wait of a thread doing `mprotect` (takes the mmap lock for writing) in a
//!   loop, with and without a concurrent numa_maps reader.
//!
//! Usage: `cargo run --release -p vmbalancer-tests --bin numamaps_cost [-- MIB [READS]]`;
//! results are recorded in `tests/results/numa-maps-cost.md`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use balancer::host::linux::numa_maps::{read_maps, read_numa_maps};

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(len: usize, advice: libc::c_int) -> anyhow::Result<Self> {
        let ptr: *mut libc::c_void = vmbalancer_tests::anon::map(len, Some(advice))
            .map_err(|e| anyhow::anyhow!("mmap: {e}"))?
            .cast();
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { (ptr as *mut u8).add(off).write_volatile(1) };
        }
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Median and max of `reads` timed calls, in microseconds.
fn time_us(reads: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..reads)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// p99 and max wait of mprotect (mmap write lock) in µs over `dur`, optionally with
/// a thread reading numa_maps in a loop.
fn writer_wait_us(dur: Duration, with_reader: bool) -> (f64, f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = with_reader.then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::read("/proc/self/numa_maps");
                n += 1;
            }
            n
        })
    });
    let page = Mapping::new(4096, libc::MADV_NORMAL).expect("small mapping");
    let mut waits = Vec::new();
    let start = Instant::now();
    let mut prot = libc::PROT_READ;
    while start.elapsed() < dur {
        let t = Instant::now();
        // SAFETY: changes protection of our own page; never accessed meanwhile.
        unsafe { libc::mprotect(page.ptr, 4096, prot) };
        waits.push(t.elapsed().as_secs_f64() * 1e6);
        prot ^= libc::PROT_WRITE;
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.map_or(0, |h| h.join().unwrap_or(0));
    waits.sort_by(f64::total_cmp);
    (waits[waits.len() * 99 / 100], waits[waits.len() - 1], reads)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let reads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let pid = std::process::id();
    let proc = Path::new("/proc");

    println!("numa_maps read cost, {mib} MiB touched anonymous memory, {reads} reads each");
    println!(
        "kernel: {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!();
    println!("| what | median µs | max µs | ratio to stat |");
    println!("|---|---|---|---|");
    let (stat_med, stat_max) = time_us(reads, || {
        let _ = balancer::host::linux::procfs::read_stat(proc, pid);
    });
    println!("| /proc/PID/stat read+parse (baseline) | {stat_med:.1} | {stat_max:.1} | 1.0 |");
    for (label, advice) in [
        ("4 KiB pages (MADV_NOHUGEPAGE)", libc::MADV_NOHUGEPAGE),
        (
            "transparent huge pages (MADV_HUGEPAGE)",
            libc::MADV_HUGEPAGE,
        ),
    ] {
        let m = Mapping::new(mib << 20, advice)?;
        let (maps_med, maps_max) = time_us(reads, || {
            let _ = read_maps(proc, pid);
        });
        let (nm_med, nm_max) = time_us(reads, || {
            let _ = read_numa_maps(proc, pid);
        });
        let numa = read_numa_maps(proc, pid)?;
        let found = numa
            .iter()
            .find(|n| n.start_addr == m.ptr as u64)
            .map(|n| n.pages_per_node.values().sum::<u64>() * n.page_size_bytes)
            .unwrap_or(0);
        println!(
            "| /proc/PID/maps read+parse, {label} | {maps_med:.1} | {maps_max:.1} | {:.1} |",
            maps_med / stat_med
        );
        println!(
            "| /proc/PID/numa_maps read+parse, {label} | {nm_med:.1} | {nm_max:.1} | {:.1} |",
            nm_med / stat_med
        );
        anyhow::ensure!(
            found == (mib as u64) << 20,
            "numa_maps shows {found} bytes of the {mib} MiB mapping"
        );
        if advice == libc::MADV_NOHUGEPAGE {
            let secs = Duration::from_secs(3);
            let (p99_base, max_base, _) = writer_wait_us(secs, false);
            let (p99_read, max_read, n) = writer_wait_us(secs, true);
            println!();
            println!(
                "mprotect (mmap write lock) wait over {}s, 4 KiB pages: alone p99 {p99_base:.1} µs max {max_base:.1} µs; \
                 with a numa_maps reader looping ({n} reads) p99 {p99_read:.1} µs max {max_read:.1} µs \
                 (p99 ratio {:.1})",
                secs.as_secs(),
                p99_read / p99_base
            );
            println!();
            println!("| what | median µs | max µs | ratio to stat |");
            println!("|---|---|---|---|");
        }
    }
    Ok(())
}
