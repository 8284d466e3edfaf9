//! Measures one observation of this host by `LinuxObserver`, incremental (new VMs
//! from process connector events) against rescanning `/proc` every tick, with a few
//! mini_qemu VMs running. numa_maps is read once per VM at the start and then left to
//! its rate limit, so the figures are the per-tick cost of discovery and of the cheap
//! per-VM files.
//!
//! Usage (as root, for the connector):
//! `cargo build --release -p vmbalancer-tests && ./target/release/observe_cost [VMS [TICKS]]`
//! Results: `tests/results/observe-cost.md`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use balancer::host::Observer;
use balancer::host::linux::memory::MemoryPolicy;
use balancer::host::linux::{HostPaths, LinuxObserver, ObserverConfig};

fn median_us(o: &mut LinuxObserver, ticks: usize) -> anyhow::Result<(f64, usize)> {
    let mut v = Vec::with_capacity(ticks);
    let mut vms = 0;
    for _ in 0..ticks {
        let t = Instant::now();
        vms = o.observe()?.vms.len();
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], vms))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_vms: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let ticks: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let exe = std::env::current_exe()?.with_file_name("mini_qemu");
    let mut children = Vec::new();
    for i in 0..n_vms {
        let mut c = Command::new(&exe)
            .args([
                "-name",
                &format!("guest=cost{i},debug-threads=on"),
                "-smp",
                "2",
                "-m",
                "64",
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(c.stdout.take().expect("piped")).read_line(&mut line)?;
        children.push(c);
    }
    let procs = std::fs::read_dir("/proc")?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let config = |events: bool| ObserverConfig {
        memory: MemoryPolicy {
            min_interval_ns: u64::MAX,
            big_vm_bytes: u64::MAX,
            big_vm_min_interval_ns: u64::MAX,
        },
        use_proc_events: events,
        ..Default::default()
    };
    let mut inc = LinuxObserver::new(HostPaths::system(), config(true))?;
    let mut scan = LinuxObserver::new(HostPaths::system(), config(false))?;
    inc.observe()?;
    scan.observe()?;
    let (inc_us, inc_vms) = median_us(&mut inc, ticks)?;
    let (scan_us, scan_vms) = median_us(&mut scan, ticks)?;
    println!(
        "{procs} processes in /proc, {n_vms} mini_qemu VMs (2 vCPUs each), {ticks} ticks, median per observation:"
    );
    println!("| mode | VMs seen | median µs | ratio |");
    println!("|---|---|---|---|");
    match inc.proc_events_unavailable() {
        None => println!("| incremental (proc connector) | {inc_vms} | {inc_us:.0} | 1.0 |"),
        Some(why) => println!(
            "| incremental unavailable ({why}), rescanned | {inc_vms} | {inc_us:.0} | 1.0 |"
        ),
    }
    println!(
        "| full /proc rescan every tick | {scan_vms} | {scan_us:.0} | {:.1} |",
        scan_us / inc_us
    );
    println!(
        "full scans: incremental {}, rescan {}",
        inc.counters().full_scans,
        scan.counters().full_scans
    );
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}
