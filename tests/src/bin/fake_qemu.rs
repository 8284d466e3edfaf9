//! A fake VM that looks like qemu-kvm to the host, for the NUMA lab.
//!
//! Real qemu cannot run nested KVM in the lab guest, and a TCG guest inside a TCG
//! guest would be far too slow. What a NUMA balancer sees of a VM is a process: its
//! comm (`qemu-kvm`), its command line (`-name guest=NAME -smp N -m M`), its threads
//! (`CPU n/KVM` vCPUs, an I/O thread), one large anonymous mapping of guest memory,
//! and where those threads run and touch memory. This program reproduces exactly
//! that, with a controllable access pattern: vCPUs touch a hot set most of the time
//! and the rest rarely, with a duty cycle that changes in phases over time.
//!
//! Options (qemu style; unknown `-opt [value]` pairs are accepted and ignored):
//! `-name guest=NAME[,...]`, `-smp N`, `-m MiB[M|G]`, and the lab's own
//! `-lab-placement default|node|scattered|interleave`, `-lab-node N`,
//! `-lab-chunk-mib N`, `-lab-hot-fraction F`, `-lab-hot-offset F`, `-lab-hot-pct P`,
//! `-lab-hugetlb`, `-lab-small-pages`,
//! `-lab-phases AT:DUTY[,AT:DUTY...]`, `-lab-progress FILE`.
//!
//! Progress: every second the I/O thread rewrites FILE (atomically) with one JSON
//! object `{"t_s": seconds since the vCPUs started, "touches": [per vCPU]}`. The file
//! appears only after guest memory is fully placed, so it also signals readiness.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmbalancer_tests::lab::scenario::{Placement, hot_pages};
use vmbalancer_tests::lab::truth;

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;
const MPOL_DEFAULT: i32 = 0;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;

#[derive(Debug)]
struct Opts {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    placement: Placement,
    node: u32,
    chunk_mib: u64,
    hot_fraction: f64,
    hot_offset: f64,
    hot_pct: f64,
    hugetlb: bool,
    small_pages: bool,
    phases: Vec<(f64, f64)>,
    progress: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        name: "fake".into(),
        vcpus: 1,
        memory_mib: 128,
        placement: Placement::Default,
        node: 0,
        chunk_mib: 4,
        hot_fraction: 0.25,
        hot_offset: 0.0,
        hot_pct: 95.0,
        hugetlb: false,
        small_pages: false,
        phases: vec![(0.0, 100.0)],
        progress: None,
    };
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].as_str();
        let value = args.get(i + 1).cloned();
        let need = || {
            value
                .clone()
                .with_context(|| format!("{opt} needs a value"))
        };
        let mut used_value = true;
        match opt {
            "-name" => {
                let v = need()?;
                let first = v.split(',').next().unwrap_or_default();
                o.name = first.strip_prefix("guest=").unwrap_or(first).to_string();
            }
            "-smp" => {
                let v = need()?;
                let n = v.split(',').next().unwrap_or_default();
                o.vcpus = n
                    .strip_prefix("cpus=")
                    .unwrap_or(n)
                    .parse()
                    .context("-smp")?;
            }
            "-m" => o.memory_mib = parse_mib(&need()?)?,
            "-lab-placement" => {
                o.placement = match need()?.as_str() {
                    "default" => Placement::Default,
                    "node" => Placement::Node,
                    "scattered" => Placement::Scattered,
                    "interleave" => Placement::Interleave,
                    other => bail!("unknown placement {other:?}"),
                }
            }
            "-lab-node" => o.node = need()?.parse().context("-lab-node")?,
            "-lab-chunk-mib" => o.chunk_mib = need()?.parse().context("-lab-chunk-mib")?,
            "-lab-hot-fraction" => o.hot_fraction = need()?.parse().context("-lab-hot-fraction")?,
            "-lab-hot-offset" => o.hot_offset = need()?.parse().context("-lab-hot-offset")?,
            "-lab-hot-pct" => o.hot_pct = need()?.parse().context("-lab-hot-pct")?,
            "-lab-hugetlb" => {
                o.hugetlb = true;
                used_value = false;
            }
            "-lab-small-pages" => {
                o.small_pages = true;
                used_value = false;
            }
            "-lab-phases" => o.phases = parse_phases(&need()?)?,
            "-lab-progress" => o.progress = Some(PathBuf::from(need()?)),
            _ if opt.starts_with('-') => {
                // A qemu option we do not model; skip its value if it has one.
                used_value = value.as_deref().is_some_and(|v| !v.starts_with('-'));
            }
            _ => bail!("unexpected argument {opt:?}"),
        }
        i += if used_value { 2 } else { 1 };
    }
    if o.vcpus == 0 || o.memory_mib == 0 || o.chunk_mib == 0 {
        bail!("-smp, -m and -lab-chunk-mib must be > 0");
    }
    Ok(o)
}

fn parse_mib(v: &str) -> anyhow::Result<u64> {
    let v = v.split(',').next().unwrap_or_default();
    let v = v.strip_prefix("size=").unwrap_or(v);
    let (num, mult) = match v.chars().last() {
        Some('G' | 'g') => (&v[..v.len() - 1], 1024),
        Some('M' | 'm') => (&v[..v.len() - 1], 1),
        _ => (v, 1),
    };
    Ok(num.parse::<u64>().with_context(|| format!("-m {v:?}"))? * mult)
}

fn parse_phases(v: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut out: Vec<(f64, f64)> = v
        .split(',')
        .map(|p| {
            let (at, duty) = p.split_once(':').with_context(|| format!("phase {p:?}"))?;
            Ok((at.parse()?, duty.parse()?))
        })
        .collect::<anyhow::Result<_>>()?;
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// Sets the calling thread's memory policy (set_mempolicy(2)).
fn set_mempolicy(mode: i32, nodes: &[u32]) -> anyhow::Result<()> {
    let mut mask: u64 = 0;
    for &n in nodes {
        if n >= 63 {
            bail!("node {n} out of range");
        }
        mask |= 1 << n;
    }
    let (ptr, maxnode) = if mode == MPOL_DEFAULT {
        (std::ptr::null(), 0)
    } else {
        (&mask as *const u64, 64)
    };
    // SAFETY: the mask outlives the call and maxnode matches its size in bits.
    let r = unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, ptr, maxnode as libc::c_ulong) };
    if r != 0 {
        bail!(
            "set_mempolicy({mode}, {nodes:?}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Guest memory: one anonymous mapping, like qemu's `pc.ram`.
struct GuestMemory {
    base: *mut u8,
    len: usize,
    page: usize,
}

// The mapping is plain memory shared by the vCPU threads, as in a real VM.
unsafe impl Send for GuestMemory {}
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps guest RAM the way qemu does for anonymous memory: aligned to 2 MiB and
    /// advised MADV_HUGEPAGE, so the kernel backs it with transparent huge pages
    /// where it can (real guests run on THP unless the host turned it off), or
    /// MADV_NOHUGEPAGE with `small_pages` (a host with THP off).
    fn map(len: usize, hugetlb: bool, small_pages: bool) -> anyhow::Result<Self> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if hugetlb {
            flags |= libc::MAP_HUGETLB;
        }
        // hugetlb mappings are aligned by the kernel; anonymous ones get room to align.
        let slack = if hugetlb { 0 } else { HUGE_PAGE };
        // SAFETY: a fresh anonymous mapping; the pointer is checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + slack,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            bail!(
                "mmap of {len} bytes (hugetlb={hugetlb}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut base = raw.cast::<u8>();
        if !hugetlb {
            let addr = raw as usize;
            let aligned = addr.next_multiple_of(HUGE_PAGE);
            let head = aligned - addr;
            // SAFETY: both pieces lie inside the mapping just made and are never used.
            unsafe {
                if head > 0 {
                    libc::munmap(raw, head);
                }
                let tail = slack - head;
                if tail > 0 {
                    libc::munmap((aligned + len) as *mut libc::c_void, tail);
                }
                base = aligned as *mut u8;
                // Advice only: a kernel without THP keeps 4 KiB pages.
                let advice = if small_pages {
                    libc::MADV_NOHUGEPAGE
                } else {
                    libc::MADV_HUGEPAGE
                };
                libc::madvise(base.cast(), len, advice);
            }
        }
        Ok(Self {
            base,
            len,
            page: if hugetlb { HUGE_PAGE } else { PAGE },
        })
    }

    fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Writes into 4 KiB page `index` (a different cache line each time).
    #[inline]
    fn touch(&self, index: usize, salt: u64) {
        let offset = index * PAGE + ((salt as usize) & (PAGE - 64) & !63);
        // SAFETY: index < pages() and offset stays inside that page.
        unsafe {
            let p = self.base.add(offset).cast::<u64>();
            std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(salt));
        }
    }

    /// First touch of `range` (bytes) under the calling thread's current policy.
    fn fault_in(&self, start: usize, end: usize) {
        let mut off = start;
        while off < end {
            // SAFETY: off < len.
            unsafe { std::ptr::write_volatile(self.base.add(off), 1) };
            off += self.page;
        }
    }
}

/// Places guest memory as requested, then returns the calling thread to the
/// default policy so later faults and balancers act freely.
fn place(mem: &GuestMemory, o: &Opts, nodes: &[u32]) -> anyhow::Result<()> {
    match o.placement {
        Placement::Default => mem.fault_in(0, mem.len),
        Placement::Node => {
            set_mempolicy(MPOL_BIND, &[o.node])?;
            mem.fault_in(0, mem.len);
        }
        Placement::Interleave => {
            set_mempolicy(MPOL_INTERLEAVE, nodes)?;
            mem.fault_in(0, mem.len);
        }
        Placement::Scattered => {
            let chunk = ((o.chunk_mib as usize) << 20).max(mem.page);
            let mut start = 0;
            let mut turn = 0usize;
            while start < mem.len {
                let end = (start + chunk).min(mem.len);
                set_mempolicy(MPOL_BIND, &[nodes[turn % nodes.len()]])?;
                mem.fault_in(start, end);
                start = end;
                turn += 1;
            }
        }
    }
    set_mempolicy(MPOL_DEFAULT, &[])
}

fn duty_at(phases: &[(f64, f64)], t_s: f64) -> f64 {
    phases
        .iter()
        .take_while(|(at, _)| *at <= t_s)
        .last()
        .map_or(0.0, |&(_, d)| d)
}

/// A vCPU: in every 100 ms period, touches memory for `duty` % of it and sleeps
/// the rest. `hot_pct` % of touches go to the hot set (`hot_fraction` of memory
/// from `hot_offset` of the way in, see `scenario::hot_pages`), the rest anywhere.
fn vcpu_loop(mem: &GuestMemory, o: &Opts, start: Instant, counter: &AtomicU64, seed: u64) {
    const PERIOD: Duration = Duration::from_millis(100);
    let pages = mem.pages();
    let hot = hot_pages(pages, o.hot_fraction, o.hot_offset);
    let (hot_start, hot_len) = (hot.start, hot.len().max(1));
    let hot_threshold = (o.hot_pct / 100.0 * u32::MAX as f64) as u64;
    let mut rng = seed | 1;
    loop {
        let period_start = Instant::now();
        let duty = duty_at(&o.phases, start.elapsed().as_secs_f64()) / 100.0;
        let busy_until = period_start + PERIOD.mul_f64(duty.clamp(0.0, 1.0));
        while Instant::now() < busy_until {
            for _ in 0..256 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let r = rng >> 16;
                let index = if (r & 0xffff_ffff) < hot_threshold {
                    hot_start + (r >> 32) as usize % hot_len
                } else {
                    (r >> 32) as usize % pages
                };
                mem.touch(index, rng);
            }
            counter.fetch_add(256, Ordering::Relaxed);
        }
        let next = period_start + PERIOD;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
}

fn write_progress(path: &Path, start: Instant, counters: &[Arc<AtomicU64>]) {
    let touches: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let json = serde_json::json!({ "t_s": start.elapsed().as_secs_f64(), "touches": touches });
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn set_comm(name: &str) {
    let c = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse_args(&args)?;
    set_comm("qemu-kvm");
    let nodes: Vec<u32> = truth::read_nodes(Path::new("/"))
        .map(|n| n.into_iter().map(|n| n.id).collect())
        .unwrap_or_else(|_| vec![0]);
    let mut len = (o.memory_mib as usize) << 20;
    if o.hugetlb {
        len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    }
    let mem = Arc::new(GuestMemory::map(len, o.hugetlb, o.small_pages)?);
    place(&mem, &o, &nodes)?;
    let o = Arc::new(o);
    let start = Instant::now();
    let counters: Vec<Arc<AtomicU64>> = (0..o.vcpus).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for (i, counter) in counters.iter().enumerate() {
        let (mem, o, counter) = (mem.clone(), o.clone(), counter.clone());
        std::thread::Builder::new()
            .name(format!("CPU {i}/KVM"))
            .spawn(move || {
                vcpu_loop(
                    &mem,
                    &o,
                    start,
                    &counter,
                    0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x2545_f491),
                )
            })
            .context("spawning a vCPU thread")?;
    }
    let progress = o.progress.clone();
    let io = std::thread::Builder::new()
        .name("IO mon_iothread".into())
        .spawn(move || {
            loop {
                if let Some(p) = &progress {
                    write_progress(p, start, &counters);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .context("spawning the I/O thread")?;
    eprintln!(
        "fake qemu-kvm {}: {} vCPUs, {} MiB ({}), placement {}",
        o.name,
        o.vcpus,
        o.memory_mib,
        if o.hugetlb { "hugetlb" } else { "anonymous" },
        o.placement.name()
    );
    // The main thread stays as the emulator thread until the process is killed.
    let _ = io.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn qemu_like_arguments() {
        let o = parse_args(&args(
            "-name guest=vm3,debug-threads=on -machine pc-q35 -smp 4,sockets=1 -m 1G \
             -nodefaults -lab-placement scattered -lab-hugetlb -lab-phases 30:10,0:100",
        ))
        .unwrap();
        assert_eq!(o.name, "vm3");
        assert_eq!(o.vcpus, 4);
        assert_eq!(o.memory_mib, 1024);
        assert_eq!(o.placement, Placement::Scattered);
        assert!(o.hugetlb);
        assert_eq!(o.phases, vec![(0.0, 100.0), (30.0, 10.0)]);
        assert!(parse_args(&args("-smp 0")).is_err());
        assert!(parse_args(&args("-lab-placement weird")).is_err());
    }

    #[test]
    fn phases_pick_the_latest_started() {
        let p = [(0.0, 0.0), (30.0, 100.0), (60.0, 5.0)];
        assert_eq!(duty_at(&p, 10.0), 0.0);
        assert_eq!(duty_at(&p, 30.0), 100.0);
        assert_eq!(duty_at(&p, 99.0), 5.0);
    }

    #[test]
    fn scattered_memory_really_is_placed_and_touched() {
        // On a one-node host everything lands on node 0; the point is that the
        // policy calls succeed and every page is faulted in.
        let o = parse_args(&args("-m 8 -lab-placement scattered -lab-chunk-mib 2")).unwrap();
        let mem = GuestMemory::map(8 << 20, false, false).unwrap();
        place(&mem, &o, &[0]).unwrap();
        mem.touch(mem.pages() - 1, 12345);
    }
}
