//! Measures what the eBPF telemetry costs the traced threads: page faults and context
//! switches of tracked threads, timed without and with the programs attached in the
//! same run (alternating rounds, medians), plus the kernel's own run-time statistics
//! per program. Needs root.
//!
//! Usage: `cargo run -p vmbalancer-tests --bin ebpf_overhead [-- --rounds N]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{Context, bail};
use balancer::telemetry::{Telemetry, TrackedThread};

const PAGES: usize = 16384;
const PAGE: usize = 4096;
const ROUND_TRIPS: usize = 20000;

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the size matches.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// ns per first-touch page fault of a fresh anonymous mapping (no huge pages).
fn page_faults(telemetry: Option<&mut Telemetry>) -> anyhow::Result<f64> {
    if let Some(t) = telemetry {
        t.track(
            gettid(),
            TrackedThread {
                vm_pid: std::process::id(),
                vcpu_index: 0,
            },
        )?;
    }
    let len = PAGES * PAGE;
    // SAFETY: anonymous private mapping, checked below, unmapped at the end.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            bail!("mmap failed");
        }
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        let start = Instant::now();
        for i in 0..PAGES {
            std::ptr::write_volatile((p as *mut u8).add(i * PAGE), 1);
        }
        let ns = start.elapsed().as_nanos() as f64 / PAGES as f64;
        libc::munmap(p, len);
        Ok(ns)
    }
}

/// ns per context switch: two threads pinned to one CPU pass a byte back and forth.
fn context_switches(telemetry: Option<&mut Telemetry>) -> anyhow::Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || -> std::io::Result<()> {
        pin_self(0);
        tid_tx.send(gettid()).ok();
        let mut buf = [0u8; 1];
        for _ in 0..ROUND_TRIPS {
            b.read_exact(&mut buf)?;
            b.write_all(&buf)?;
        }
        Ok(())
    });
    pin_self(0);
    let peer_tid = tid_rx.recv()?;
    if let Some(t) = telemetry {
        let vm = TrackedThread {
            vm_pid: std::process::id(),
            vcpu_index: 0,
        };
        t.track(gettid(), vm)?;
        t.track(peer_tid, vm)?;
    }
    let mut buf = [1u8; 1];
    let start = Instant::now();
    for _ in 0..ROUND_TRIPS {
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
    }
    let ns = start.elapsed().as_nanos() as f64 / (2 * ROUND_TRIPS) as f64;
    peer.join()
        .map_err(|_| anyhow::anyhow!("peer panicked"))??;
    Ok(ns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = match std::env::args().skip_while(|a| a != "--rounds").nth(1) {
        Some(n) => n.parse().context("--rounds N")?,
        None => 5,
    };
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ebpf_overhead loads eBPF programs: run it as root");
    }
    let (mut pf_off, mut pf_on, mut cs_off, mut cs_on) = (vec![], vec![], vec![], vec![]);
    let mut last = None;
    for _ in 0..rounds {
        pf_off.push(page_faults(None)?);
        cs_off.push(context_switches(None)?);
        let mut t = Telemetry::load()?;
        pf_on.push(page_faults(Some(&mut t))?);
        cs_on.push(context_switches(Some(&mut t))?);
        last = Some(t.cost()?);
    }
    let (pf_off, pf_on, cs_off, cs_on) =
        (median(pf_off), median(pf_on), median(cs_off), median(cs_on));
    println!("ebpf_overhead: {rounds} rounds, medians, same run, alternating off/on");
    println!(
        "page fault (tracked thread):     off {pf_off:8.0} ns  on {pf_on:8.0} ns  ratio {:.3}",
        pf_on / pf_off
    );
    println!(
        "context switch (tracked threads): off {cs_off:8.0} ns  on {cs_on:8.0} ns  ratio {:.3}",
        cs_on / cs_off
    );
    println!("kernel run-time statistics of the last round (kernel.bpf_stats_enabled):");
    for c in last.unwrap_or_default() {
        if c.run_count > 0 {
            println!(
                "  {:<20} {:>9} runs {:>7.0} ns/event",
                c.program,
                c.run_count,
                c.ns_per_event()
            );
        }
    }
    Ok(())
}
