//! `lab-harness --bench-mover`: how fast vmbalancer's page mover moves a VM's guest
//! RAM between nodes, against numactl's `migratepages` and the raw kernel calls, in
//! one guest run so every figure shares the same emulation and load.
//!
//! Each layout starts fake VMs (busy vCPUs, guest RAM placed on one node each, the
//! kernel's automatic NUMA balancing off so nothing else moves pages) and then
//! moves every VM's guest RAM to its other node once per method, back and forth,
//! VM after VM (as the daemon moves them, and as numad runs `migratepages`). A
//! method's pages are the kernel's own count (`pgmigrate_success`, base pages, the
//! same counter for every method); its time is the wall time of the whole layout's
//! move. A method still moving after [`CAP`] is stopped (the `migratepages` process
//! killed, the mover cancelled at a batch boundary, the raw loop left): its rate is
//! what it moved in that time, and the next method moves from wherever each VM's
//! memory mostly is. Afterwards the share of guest RAM on the target nodes is read
//! per page (move_pages without targets), so a method that leaves pages behind or
//! was stopped shows it.
//!
//! Methods:
//! - `migratepages`: numactl's command, one process per VM (migrate_pages(2) for the
//!   whole process), at nice 0 as numad runs it, and at nice -10 (the mover's
//!   default), which shows how much of a difference is priority alone;
//! - `vmbalancer`: the daemon's page mover at the daemon's default configuration
//!   (threads, batch size, nice value and migration rate limit);
//! - `vmbalancer, no rate limit`: the same mover with the limit lifted, which shows
//!   whether the mover or the limit sets the pace;
//! - `move_pages xN`: one thread, the guest RAM in move_pages calls of N pages with
//!   no lookup before or after (the raw call's speed at that batch size).
//!
//! `migratepages` is migrate_pages(2) itself (numactl only parses its arguments),
//! so the syscall has no row of its own.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use balancer::daemon::config::Config;
use balancer::host::linux::actuate::pages::{self, MoverSettings, PageMove};
use balancer::host::linux::actuate::rate::RateLimit;
use balancer::host::linux::actuate::sys;
use vmbalancer_tests::lab::protocol::{MoverBench, Record};
use vmbalancer_tests::lab::scenario::Scenario;
use vmbalancer_tests::lab::truth::{self, NodeInfo};

use crate::{emit, vms};

/// One layout: VM size and count, page size.
struct Layout {
    vm_mib: u64,
    vms: u32,
    small_pages: bool,
}

impl Layout {
    fn name(&self) -> String {
        let size = if self.vm_mib >= 1024 {
            format!("{}G", self.vm_mib / 1024)
        } else {
            format!("{}M", self.vm_mib)
        };
        let pages = if self.small_pages { "4k" } else { "thp" };
        format!("{pages} {size} x{}", self.vms)
    }

    /// VM `i` starts on node `home`, its other node is `away` (two VMs per layout
    /// and node pair at most, so the 8-VM layouts fit the guest's 2 GiB nodes).
    fn nodes(&self, i: u32) -> (u32, u32) {
        if self.vms == 1 {
            (0, 1)
        } else {
            (i % 2, i % 2 + 2)
        }
    }
}

/// The layouts measured: THP-backed (qemu's default) and 4 KiB guest RAM, 256 MiB
/// and 1 GiB VMs, one and eight VMs. No 1 GiB VM on 4 KiB pages: under emulation
/// those pages move at about a thousand a second, and a `migratepages` call cannot
/// be stopped at the cap, so that one row alone would take over four minutes.
const LAYOUTS: &[Layout] = &[
    Layout {
        vm_mib: 256,
        vms: 1,
        small_pages: false,
    },
    Layout {
        vm_mib: 1024,
        vms: 1,
        small_pages: false,
    },
    Layout {
        vm_mib: 256,
        vms: 8,
        small_pages: false,
    },
    Layout {
        vm_mib: 256,
        vms: 1,
        small_pages: true,
    },
    Layout {
        vm_mib: 256,
        vms: 8,
        small_pages: true,
    },
];

/// Longest a method may move one layout before it is stopped.
const CAP: Duration = Duration::from_secs(45);

#[derive(Clone, Copy, Debug)]
enum Method {
    /// numactl's command at the given nice value (numad runs it at 0).
    Migratepages {
        nice: i32,
    },
    Mover {
        rate_limited: bool,
    },
    RawMovePages {
        batch_pages: usize,
    },
}

const METHODS: &[Method] = &[
    Method::Migratepages { nice: 0 },
    Method::Migratepages { nice: -10 },
    Method::Mover { rate_limited: true },
    Method::Mover {
        rate_limited: false,
    },
    Method::RawMovePages { batch_pages: 512 },
    Method::RawMovePages { batch_pages: 8192 },
];

impl Method {
    fn name(self) -> String {
        match self {
            Method::Migratepages { nice: 0 } => "migratepages".into(),
            Method::Migratepages { nice } => format!("migratepages at nice {nice}"),
            Method::Mover { rate_limited: true } => "vmbalancer".into(),
            Method::Mover {
                rate_limited: false,
            } => "vmbalancer, no rate limit".into(),
            Method::RawMovePages { batch_pages } => format!("move_pages x{batch_pages}"),
        }
    }
}

/// A started VM: pid, guest RAM (start, length).
struct Vm {
    pid: u32,
    ram: (u64, u64),
}

/// Runs every layout; returns true when every method of every layout moved the
/// pages (the figures are the result, not a verdict).
pub fn run(nodes: &[NodeInfo]) -> anyhow::Result<bool> {
    std::fs::write("/proc/sys/kernel/numa_balancing", "0")
        .context("turning automatic NUMA balancing off")?;
    let mut ok = true;
    for layout in LAYOUTS {
        ok &= run_layout(layout, nodes)
            .with_context(|| format!("mover benchmark, layout {}", layout.name()))?;
    }
    Ok(ok)
}

fn run_layout(layout: &Layout, nodes: &[NodeInfo]) -> anyhow::Result<bool> {
    let mut toml = String::from("balancer = \"none\"\n");
    for i in 0..layout.vms {
        toml += &format!(
            "[[vms]]\nname = \"b{i}\"\nvcpus = 2\nmemory_mib = {}\nplacement = \"node\"\n\
             node = {}\nsmall_pages = {}\ncgroup = false\n",
            layout.vm_mib,
            layout.nodes(i).0,
            layout.small_pages
        );
    }
    let scenario = Scenario::from_toml(&toml).context("the layout's scenario")?;
    let mut running = vms::start_all(&scenario, nodes)?;
    let result = (|| {
        vms::wait_ready(&mut running, Duration::from_secs(300))?;
        let mut vms_here = Vec::new();
        for r in &running {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid))?;
            let ram = truth::guest_ram_mapping(&maps, r.memory_bytes)?;
            vms_here.push(Vm { pid: r.pid, ram });
        }
        let page = sys::page_size_bytes();
        let mut ok = true;
        for &method in METHODS {
            // Each VM moves from whichever of its two nodes holds most of it now.
            let mut on = Vec::new();
            for (i, vm) in vms_here.iter().enumerate() {
                let (a, b) = layout.nodes(i as u32);
                let status = pages::query_nodes(vm.pid, &page_addrs(vm, page))?;
                let on_a = status.iter().filter(|&&s| s == a as i32).count();
                on.push(if on_a * 2 >= status.len() {
                    (a, b)
                } else {
                    (b, a)
                });
            }
            let row = measure(layout, method, &vms_here, &on)?;
            // A stopped method is a rate, not a failure; one that finished must
            // have left nothing behind.
            ok &= row.seconds >= CAP.as_secs_f64() || row.on_target >= 0.99;
            emit(&Record::MoverBench(row));
        }
        Ok(ok)
    })();
    vms::stop_all(running);
    result
}

fn pgmigrate_success() -> u64 {
    truth::read_vmstat(Path::new("/"))
        .ok()
        .and_then(|v| v.get("pgmigrate_success").copied())
        .unwrap_or(0)
}

/// Moves every VM from `on[i].0` to `on[i].1` with `method`.
fn measure(
    layout: &Layout,
    method: Method,
    vms: &[Vm],
    on: &[(u32, u32)],
) -> anyhow::Result<MoverBench> {
    let defaults = Config::default();
    let page = sys::page_size_bytes();
    let pages0 = pgmigrate_success();
    let t0 = Instant::now();
    let deadline = t0 + CAP;
    let mut calls = 0u64;
    for (vm, &(from, to)) in vms.iter().zip(on) {
        if Instant::now() >= deadline {
            break;
        }
        match method {
            Method::Migratepages { nice } => {
                // The child inherits the nice value of the thread that starts it.
                sys::set_own_nice(nice).context("setting nice for migratepages")?;
                let child = std::process::Command::new("migratepages")
                    .args([vm.pid.to_string(), from.to_string(), to.to_string()])
                    .spawn();
                sys::set_own_nice(0).context("resetting nice")?;
                let mut child = child.context("running migratepages")?;
                calls += 1;
                loop {
                    if let Some(status) = child.try_wait()? {
                        anyhow::ensure!(status.success(), "migratepages failed: {status}");
                        break;
                    }
                    if Instant::now() >= deadline {
                        // The kernel finishes the page in hand and returns.
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Method::Mover { rate_limited } => {
                let rate = if rate_limited {
                    defaults.migration_rate_limit_bytes_per_s
                } else {
                    u64::MAX / 2
                };
                let stop = Arc::new(AtomicBool::new(false));
                let limit = RateLimit::new(rate, stop.clone());
                let ranges = [vm.ram];
                let _cap = Watchdog::arm(deadline, stop);
                // As the daemon's mover thread: its helper threads inherit this.
                sys::set_own_nice(defaults.migration_nice).context("setting the mover's nice")?;
                let t = pages::move_pages_between(
                    &PageMove {
                        pid: vm.pid,
                        from,
                        to,
                        ranges: &ranges,
                        page_bytes: page,
                        budget_bytes: vm.ram.1,
                    },
                    MoverSettings {
                        threads: defaults.migration_threads,
                        batch_pages: defaults.migration_batch_pages,
                    },
                    &limit,
                    &|_| {},
                )
                .map_err(|_| anyhow::anyhow!("VM {} exited", vm.pid));
                sys::set_own_nice(0).context("resetting nice")?;
                calls += t?.move_calls;
            }
            Method::RawMovePages { batch_pages } => {
                let addrs = page_addrs(vm, page);
                for chunk in addrs.chunks(batch_pages) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let nodes = vec![to as i32; chunk.len()];
                    let mut status = vec![0i32; chunk.len()];
                    sys::move_pages(vm.pid, chunk, Some(&nodes), &mut status)
                        .context("move_pages")?;
                    calls += 1;
                }
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let pages = pgmigrate_success().saturating_sub(pages0);
    let (mut on_target, mut total) = (0u64, 0u64);
    for (vm, &(_, to)) in vms.iter().zip(on) {
        let status =
            pages::query_nodes(vm.pid, &page_addrs(vm, page)).context("reading page nodes")?;
        on_target += status.iter().filter(|&&s| s == to as i32).count() as u64;
        total += status.len() as u64;
    }
    Ok(MoverBench {
        layout: layout.name(),
        method: method.name(),
        pages,
        seconds,
        on_target: on_target as f64 / total.max(1) as f64,
        calls,
    })
}

/// Every base page address of a VM's guest RAM.
fn page_addrs(vm: &Vm, page: u64) -> Vec<u64> {
    (vm.ram.0..vm.ram.0 + vm.ram.1)
        .step_by(page as usize)
        .collect()
}

/// Sets a stop flag at a deadline unless dropped first.
struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn arm(deadline: Instant, stop: Arc<AtomicBool>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let seen = done.clone();
        std::thread::spawn(move || {
            while !seen.load(Ordering::Relaxed) {
                if Instant::now() >= deadline {
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}
