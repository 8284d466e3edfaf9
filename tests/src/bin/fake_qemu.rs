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
//! Guest NUMA cells are given as qemu takes them and libvirt writes them for
//! `<cpu><numa><cell .../>`: `-object memory-backend-ram,id=ram-nodeN,size=BYTES`
//! (or its JSON form) and `-numa node,nodeid=N,cpus=A-B,memdev=ram-nodeN` per cell,
//! read by the balancer's own command-line parser. As in qemu, each backend is its
//! own mapping (created in command-line order, with a guard page after it so the
//! kernel never merges neighbours), and each cell's vCPU threads touch only their
//! cell's memory, with a hot set per cell. The placement options apply to each
//! cell's memory on its own. Cells must cover `-m` and every vCPU exactly.
//!
//! Guest RAM is advised `MADV_MERGEABLE`, as qemu does by default (`-machine
//! mem-merge=on`), so KSM may merge it when the host runs KSM. Every page is first
//! written with a value unique to the process and page, so nothing merges unless a
//! scenario asks: `-lab-same-content KEY:FRACTION` fills the first FRACTION of each
//! guest RAM mapping with pages whose content depends only on KEY and the page's
//! index (VMs given the same KEY hold identical pages there, the case of guests
//! booted from one image), and the vCPUs only read that part, so merged pages stay
//! merged (a write would break the sharing).
//!
//! Options (qemu style; unknown `-opt [value]` pairs are accepted and ignored, so a
//! confidential guest's `-object sev-guest,...` can be carried on the command line):
//! `-name guest=NAME[,debug-threads=on]`, `-smp N`, `-m MiB[M|G]`, `-object`, `-numa`,
//! `-qmp unix:PATH,server=on[,wait=off]`, and the lab's own
//! `-lab-placement default|node|scattered|interleave`, `-lab-node N`,
//! `-lab-chunk-mib N`, `-lab-hot-fraction F`, `-lab-hot-offset F`, `-lab-hot-pct P`,
//! `-lab-hugetlb`, `-lab-hugetlb-page-mib 2|1024`, `-lab-small-pages`, `-lab-same-content KEY:FRACTION`,
//! `-lab-phases AT:DUTY[,AT:DUTY...]`, `-lab-progress FILE`, `-lab-hold FILE` (idle
//! while FILE exists, phases from when it is gone).
//!
//! As qemu, it names its threads (`CPU n/KVM`, `IO mon_iothread`) only with
//! `debug-threads=on`; otherwise every thread carries the process's name, and it
//! lists its vCPU threads for the lab's ground truth in `vcpus/PID` beside the
//! progress file (`/run/lab/vcpus/PID` in the lab; `tid index` lines). With `-qmp` it serves a minimal QMP monitor on that socket:
//! the greeting, `qmp_capabilities` and `query-cpus-fast` with its real thread ids,
//! one client at a time as qemu; any other command gets qemu's `CommandNotFound`.
//!
//! Progress: every second the I/O thread rewrites FILE (atomically) with one JSON
//! object `{"t_s": seconds since the vCPUs started, "touches": [per vCPU], "ram":
//! [{"cell": id or null, "start": address, "len": bytes, "vcpus": [indexes]}]}`: the
//! touches, and where each guest RAM mapping is (the harness's ground truth of which
//! mapping is which cell). The file appears only after guest memory is fully placed,
//! so it also signals readiness.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use balancer::host::linux::discovery;
use vmbalancer_tests::lab::scenario::{Placement, duty_pct_at, hot_pages};
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
    /// The huge page size with `-lab-hugetlb` (`-lab-hugetlb-page-mib`, default
    /// 2 MiB): the kernel pool its pages come from.
    huge_page_bytes: usize,
    small_pages: bool,
    phases: Vec<(f64, f64)>,
    progress: Option<PathBuf>,
    debug_threads: bool,
    qmp: Option<PathBuf>,
    /// Guest NUMA cells: (cell id, vCPU indexes, bytes), from `-numa`/`-object`.
    cells: Vec<(u32, Vec<u32>, u64)>,
    /// `-lab-same-content`: (key, fraction of each mapping).
    same_content: Option<(String, f64)>,
    /// `-lab-hold FILE`: the vCPUs touch nothing while FILE exists; their phases
    /// start when it is gone.
    hold: Option<PathBuf>,
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
        huge_page_bytes: HUGE_PAGE,
        small_pages: false,
        phases: vec![(0.0, 100.0)],
        progress: None,
        debug_threads: false,
        qmp: None,
        cells: Vec::new(),
        same_content: None,
        hold: None,
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
                o.debug_threads = v.split(',').any(|p| p == "debug-threads=on");
            }
            "-qmp" => {
                let v = need()?;
                let mut parts = v.split(',');
                let path = parts
                    .next()
                    .and_then(|p| p.strip_prefix("unix:"))
                    .context("-qmp: only unix:PATH is served")?;
                if !parts.any(|p| p == "server" || p == "server=on") {
                    bail!("-qmp: only a listening monitor (server=on) is served");
                }
                o.qmp = Some(PathBuf::from(path));
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
            "-lab-hugetlb-page-mib" => {
                let mib: usize = need()?.parse().context("-lab-hugetlb-page-mib")?;
                if !matches!(mib, 2 | 1024) {
                    bail!("-lab-hugetlb-page-mib: 2 or 1024, got {mib}");
                }
                o.huge_page_bytes = mib << 20;
            }
            "-lab-small-pages" => {
                o.small_pages = true;
                used_value = false;
            }
            "-lab-phases" => o.phases = parse_phases(&need()?)?,
            "-lab-hold" => o.hold = Some(PathBuf::from(need()?)),
            "-lab-same-content" => {
                let v = need()?;
                let (key, fraction) = v
                    .rsplit_once(':')
                    .context("-lab-same-content wants KEY:FRACTION")?;
                let fraction: f64 = fraction.parse().context("-lab-same-content fraction")?;
                if !(0.0..=1.0).contains(&fraction) || key.is_empty() {
                    bail!("-lab-same-content: a key and a fraction in 0..1, not {v:?}");
                }
                o.same_content = Some((key.to_string(), fraction));
            }
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
    o.cells = guest_cells(args, o.vcpus, o.memory_mib << 20)?;
    Ok(o)
}

/// The guest NUMA cells of the command line, checked as qemu checks them: each
/// cell's memory is a RAM backend, the cells' sizes add up to `-m`, and every vCPU
/// is in exactly one cell. Empty without `-numa node`.
fn guest_cells(
    args: &[String],
    vcpus: u32,
    memory_bytes: u64,
) -> anyhow::Result<Vec<(u32, Vec<u32>, u64)>> {
    let argv: Vec<String> = std::iter::once("qemu-kvm".to_string())
        .chain(args.iter().cloned())
        .collect();
    let cfg = discovery::parse_qemu_cmdline(&argv);
    if let Some(w) = cfg.warnings.first() {
        bail!("cannot read the command line: {w}");
    }
    if cfg.cells.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = vec![false; vcpus as usize];
    let mut total = 0u64;
    let mut out = Vec::new();
    for (cell, memdev) in cfg.cells.iter().zip(&cfg.cell_backend_ids) {
        let backend = cfg
            .backends
            .iter()
            .find(|b| &b.id == memdev)
            .with_context(|| format!("guest cell {}: no memory backend {memdev:?}", cell.id))?;
        if backend.kind != discovery::BackendKind::Ram || backend.size_bytes == 0 {
            bail!(
                "guest cell {}: backend {memdev:?} must be memory-backend-ram with a size",
                cell.id
            );
        }
        for &v in &cell.vcpus {
            match seen.get_mut(v as usize) {
                Some(s) if !*s => *s = true,
                Some(_) => bail!("vCPU {v} is in two guest cells"),
                None => bail!("guest cell {} names vCPU {v} of {vcpus}", cell.id),
            }
        }
        total += backend.size_bytes;
        out.push((cell.id, cell.vcpus.clone(), backend.size_bytes));
    }
    if let Some(v) = seen.iter().position(|s| !s) {
        bail!("vCPU {v} is in no guest cell");
    }
    if total != memory_bytes {
        bail!("the guest cells hold {total} bytes, -m is {memory_bytes}");
    }
    Ok(out)
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
    /// Pages from the start holding `-lab-same-content`: only read by the vCPUs.
    same_pages: usize,
}

// The mapping is plain memory shared by the vCPU threads, as in a real VM.
unsafe impl Send for GuestMemory {}
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps guest RAM the way qemu does for anonymous memory: aligned to 2 MiB and
    /// advised MADV_HUGEPAGE, so the kernel backs it with transparent huge pages
    /// where it can (real guests run on THP unless the host turned it off), or
    /// MADV_NOHUGEPAGE with `small_pages` (a host with THP off). With `huge_page`,
    /// MAP_HUGETLB in pages of that size (its log2 in the MAP_HUGE_SHIFT bits, as
    /// MAP_HUGE_2MB and MAP_HUGE_1GB are).
    fn map(len: usize, huge_page: Option<usize>, small_pages: bool) -> anyhow::Result<Self> {
        let hugetlb = huge_page.is_some();
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if let Some(size) = huge_page {
            flags |= libc::MAP_HUGETLB | ((size.trailing_zeros() as i32) << libc::MAP_HUGE_SHIFT);
        }
        // hugetlb mappings are aligned by the kernel; anonymous ones get room to align,
        // and keep one inaccessible guard page after them, as qemu's RAM mappings do,
        // so two backends side by side stay two mappings.
        let slack = if hugetlb { 0 } else { HUGE_PAGE + PAGE };
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
                libc::mprotect((aligned + len) as *mut libc::c_void, PAGE, libc::PROT_NONE);
                if tail > PAGE {
                    libc::munmap((aligned + len + PAGE) as *mut libc::c_void, tail - PAGE);
                }
                base = aligned as *mut u8;
                // Advice only: a kernel without THP keeps 4 KiB pages.
                let advice = if small_pages {
                    libc::MADV_NOHUGEPAGE
                } else {
                    libc::MADV_HUGEPAGE
                };
                libc::madvise(base.cast(), len, advice);
                // qemu's default mem-merge=on: KSM may merge guest RAM.
                libc::madvise(base.cast(), len, libc::MADV_MERGEABLE);
            }
        }
        Ok(Self {
            base,
            len,
            page: huge_page.unwrap_or(PAGE),
            same_pages: 0,
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

    /// Reads 4 KiB page `index` (a cache line of it), leaving it as it is.
    #[inline]
    fn read(&self, index: usize, salt: u64) -> u64 {
        let offset = index * PAGE + ((salt as usize) & (PAGE - 64) & !63);
        // SAFETY: index < pages() and offset stays inside that page.
        unsafe { std::ptr::read_volatile(self.base.add(offset).cast::<u64>()) }
    }

    /// First touch of `range` (bytes) under the calling thread's current policy.
    /// Each 4 KiB page gets a value unique to this process and page, so KSM finds
    /// nothing to merge but what `fill_same` writes.
    fn fault_in(&self, start: usize, end: usize) {
        let unique = u64::from(std::process::id()) << 40 | self.base as u64 >> 12;
        let mut off = start;
        while off < end {
            // SAFETY: off < len, and off is 8-byte aligned (a page boundary).
            unsafe {
                std::ptr::write_volatile(self.base.add(off).cast::<u64>(), unique + off as u64)
            };
            off += PAGE.min(self.page);
        }
    }

    /// Fills the first `fraction` of the mapping with pages that depend only on
    /// `key` and the page index (see the module doc), and keeps vCPU writes off them.
    fn fill_same(&mut self, key: &str, fraction: f64) {
        let seed = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.same_pages = ((self.pages() as f64 * fraction) as usize).min(self.pages());
        for page in 0..self.same_pages {
            let mut x = seed ^ (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for word in 0..PAGE / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // SAFETY: the word lies inside page `page` < pages().
                unsafe {
                    std::ptr::write_volatile(self.base.add(page * PAGE + word * 8).cast::<u64>(), x)
                };
            }
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
    duty_pct_at(phases.iter().copied(), t_s)
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
                if index < mem.same_pages {
                    std::hint::black_box(mem.read(index, rng));
                } else {
                    mem.touch(index, rng);
                }
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

/// One guest RAM mapping: a cell's backend, or all of `-m` without cells.
struct Ram {
    cell: Option<u32>,
    vcpus: Vec<u32>,
    mem: Arc<GuestMemory>,
}

impl Ram {
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "cell": self.cell,
            "start": self.mem.base as u64,
            "len": self.mem.len as u64,
            "vcpus": self.vcpus,
        })
    }
}

/// Maps and places guest RAM: one mapping per cell in command-line order (qemu
/// creates its backends so), else one for all of `-m`.
fn map_ram(o: &Opts, nodes: &[u32]) -> anyhow::Result<Vec<Ram>> {
    let parts: Vec<(Option<u32>, Vec<u32>, u64)> = if o.cells.is_empty() {
        vec![(None, (0..o.vcpus).collect(), o.memory_mib << 20)]
    } else {
        o.cells
            .iter()
            .map(|(id, vcpus, bytes)| (Some(*id), vcpus.clone(), *bytes))
            .collect()
    };
    let mut out = Vec::new();
    for (cell, vcpus, bytes) in parts {
        let mut len = bytes as usize;
        let huge_page = o.hugetlb.then_some(o.huge_page_bytes);
        if let Some(size) = huge_page {
            len = len.div_ceil(size) * size;
        }
        let mut mem = GuestMemory::map(len, huge_page, o.small_pages)?;
        place(&mem, o, nodes)?;
        if let Some((key, fraction)) = &o.same_content {
            mem.fill_same(key, *fraction);
        }
        out.push(Ram {
            cell,
            vcpus,
            mem: Arc::new(mem),
        });
    }
    Ok(out)
}

fn write_progress(
    path: &Path,
    start: Instant,
    counters: &[Arc<AtomicU64>],
    ram: &serde_json::Value,
) {
    let touches: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let json = serde_json::json!({
        "t_s": start.elapsed().as_secs_f64(),
        "touches": touches,
        "ram": ram,
    });
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// The calling thread's id.
fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// A thread named as qemu would name it: only with `debug-threads=on`; otherwise it
/// keeps the process's name.
fn thread(name: String, debug_threads: bool) -> std::thread::Builder {
    let b = std::thread::Builder::new();
    if debug_threads { b.name(name) } else { b }
}

/// A minimal QMP monitor: one client at a time, the greeting, then one reply per
/// command line. Only what vmbalancer may ask is implemented.
fn serve_qmp(path: &Path, vcpu_tids: &[u32]) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        let greeting = serde_json::json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake_qemu"}, "capabilities": []}});
        if writeln!(w, "{greeting}\r").is_err() {
            continue;
        }
        let mut negotiated = false;
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                let _ = writeln!(
                    w,
                    "{}\r",
                    serde_json::json!({"error": {"class": "GenericError", "desc": "JSON parse error"}})
                );
                continue;
            };
            let id = msg.get("id").cloned();
            let mut reply = match (msg["execute"].as_str(), negotiated) {
                (Some("qmp_capabilities"), false) => {
                    negotiated = true;
                    serde_json::json!({"return": {}})
                }
                (Some("query-cpus-fast"), true) => serde_json::json!({"return": vcpu_tids
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| serde_json::json!({
                        "cpu-index": i,
                        "qom-path": format!("/machine/unattached/device[{i}]"),
                        "thread-id": tid,
                        "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                        "target": "x86_64",
                    }))
                    .collect::<Vec<_>>()}),
                (Some(cmd), _) => {
                    serde_json::json!({"error": {"class": "CommandNotFound", "desc": format!("The command {cmd} has not been found")}})
                }
                (None, _) => {
                    serde_json::json!({"error": {"class": "GenericError", "desc": "QMP input must be an object with 'execute'"}})
                }
            };
            if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
                obj.insert("id".into(), id);
            }
            if writeln!(w, "{reply}\r").is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Lists the vCPU threads for the lab's ground truth (see the module doc): in
/// `vcpus/` beside the progress file (`/run/lab/vcpus/PID` in the lab).
fn publish_vcpus(progress: &Path, tids: &[u32]) -> anyhow::Result<()> {
    let dir = progress.parent().unwrap_or(Path::new(".")).join("vcpus");
    std::fs::create_dir_all(&dir)?;
    let text: String = tids
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{t} {i}\n"))
        .collect();
    std::fs::write(dir.join(std::process::id().to_string()), text)?;
    Ok(())
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
    let rams = map_ram(&o, &nodes)?;
    let ram_json = serde_json::Value::Array(rams.iter().map(Ram::describe).collect());
    let o = Arc::new(o);
    let start = Instant::now();
    let counters: Vec<Arc<AtomicU64>> = (0..o.vcpus).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    for (i, counter) in counters.iter().enumerate() {
        let mem = rams
            .iter()
            .find(|r| r.vcpus.contains(&(i as u32)))
            .map(|r| r.mem.clone())
            .context("a vCPU without guest RAM")?;
        let (o, counter) = (o.clone(), counter.clone());
        let tid_tx = tid_tx.clone();
        thread(format!("CPU {i}/KVM"), o.debug_threads)
            .spawn(move || {
                let _ = tid_tx.send((i, gettid()));
                // Held: idle until the file is gone, and the phases start then.
                let start = match o.hold.as_deref() {
                    Some(hold) => {
                        while hold.exists() {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Instant::now()
                    }
                    None => start,
                };
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
    let mut vcpu_tids = vec![0u32; o.vcpus as usize];
    for _ in 0..o.vcpus {
        let (i, tid) = tid_rx.recv().context("a vCPU thread did not start")?;
        vcpu_tids[i] = tid;
    }
    if let Some(progress) = o.progress.as_deref().filter(|_| !o.debug_threads) {
        publish_vcpus(progress, &vcpu_tids).context("listing the vCPU threads")?;
    }
    if let Some(path) = o.qmp.clone() {
        let tids = vcpu_tids.clone();
        thread("IO monitor".into(), o.debug_threads)
            .spawn(move || {
                if let Err(e) = serve_qmp(&path, &tids) {
                    eprintln!("fake qemu-kvm: QMP monitor: {e:#}");
                }
            })
            .context("spawning the monitor thread")?;
    }
    let progress = o.progress.clone();
    let io = thread("IO mon_iothread".into(), o.debug_threads)
        .spawn(move || {
            loop {
                if let Some(p) = &progress {
                    write_progress(p, start, &counters, &ram_json);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .context("spawning the I/O thread")?;
    eprintln!(
        "fake qemu-kvm {}: {} vCPUs, {} MiB ({}) in {} guest cell(s), placement {}",
        o.name,
        o.vcpus,
        o.memory_mib,
        if o.hugetlb { "hugetlb" } else { "anonymous" },
        o.cells.len().max(1),
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
        assert_eq!(o.huge_page_bytes, 2 << 20);
        assert_eq!(o.phases, vec![(0.0, 100.0), (30.0, 10.0)]);
        assert!(o.debug_threads);
        assert_eq!(o.qmp, None);
        let plain = parse_args(&args(
            "-name guest=p -qmp unix:/run/p.qmp,server=on,wait=off -object sev-guest,id=sev0 \
             -machine q35,confidential-guest-support=sev0",
        ))
        .unwrap();
        assert!(!plain.debug_threads);
        assert_eq!(plain.qmp, Some(PathBuf::from("/run/p.qmp")));
        assert!(parse_args(&args("-qmp unix:/x")).is_err());
        assert!(parse_args(&args("-smp 0")).is_err());
        assert!(parse_args(&args("-lab-placement weird")).is_err());
        let gib = parse_args(&args("-m 1G -lab-hugetlb -lab-hugetlb-page-mib 1024")).unwrap();
        assert_eq!(gib.huge_page_bytes, 1 << 30);
        assert!(parse_args(&args("-lab-hugetlb-page-mib 4")).is_err());
    }

    #[test]
    fn same_content_is_identical_across_processes_and_only_read() {
        let o = parse_args(&args("-lab-same-content image:0.75")).unwrap();
        assert_eq!(o.same_content, Some(("image".to_string(), 0.75)));
        assert!(parse_args(&args("-lab-same-content image")).is_err());
        assert!(parse_args(&args("-lab-same-content image:1.5")).is_err());
        // Two mappings (as two VMs): the same key gives the same pages, the rest
        // differs; another key differs everywhere.
        let fill = |key: &str| {
            let mut m = GuestMemory::map(16 * PAGE, None, true).unwrap();
            m.fault_in(0, m.len);
            m.fill_same(key, 0.5);
            m
        };
        let (a, b, c) = (fill("image"), fill("image"), fill("other"));
        let page = |m: &GuestMemory, i: usize| {
            // SAFETY: page i < 16 of the mapping.
            unsafe { std::slice::from_raw_parts(m.base.add(i * PAGE), PAGE).to_vec() }
        };
        assert_eq!(a.same_pages, 8);
        for i in 0..8 {
            assert_eq!(page(&a, i), page(&b, i), "page {i}");
            assert_ne!(page(&a, i), page(&c, i), "page {i}");
            assert_ne!(page(&a, i), page(&a, (i + 1) % 8), "page {i}");
        }
        for i in 8..16 {
            assert_ne!(page(&a, i), page(&b, i), "page {i}");
        }
    }

    #[test]
    fn serves_query_cpus_fast_with_its_thread_ids() {
        let dir = std::env::temp_dir().join(format!("fake-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let p = path.clone();
        std::thread::spawn(move || serve_qmp(&p, &[101, 102]));
        let got = (0..100).find_map(|_| {
            let s = balancer::host::linux::qmp::QmpSocket {
                path: path.display().to_string(),
                abstract_ns: false,
            };
            std::thread::sleep(Duration::from_millis(20));
            balancer::host::linux::qmp::query_vcpus(
                Path::new("/proc"),
                std::process::id(),
                &s,
                Duration::from_secs(2),
            )
            .ok()
        });
        let _ = std::fs::remove_dir_all(&dir);
        let got: Vec<(u32, u32)> = got.unwrap().iter().map(|v| (v.index, v.tid)).collect();
        assert_eq!(got, vec![(0, 101), (1, 102)]);
    }

    #[test]
    fn guest_cells_as_libvirt_writes_them() {
        let o = parse_args(&args(
            "-name guest=wide -smp 4,sockets=2,cores=2 -m 1024 \
             -object memory-backend-ram,id=ram-node0,size=536870912 \
             -numa node,nodeid=0,cpus=0-1,memdev=ram-node0 \
             -object {\"qom-type\":\"memory-backend-ram\",\"id\":\"ram-node1\",\"size\":536870912} \
             -numa node,nodeid=1,cpus=2-3,memdev=ram-node1",
        ))
        .unwrap();
        assert_eq!(
            o.cells,
            vec![(0, vec![0, 1], 512 << 20), (1, vec![2, 3], 512 << 20)]
        );
        let bad = [
            // Sizes that do not add up to -m.
            "-smp 2 -m 1024 -object memory-backend-ram,id=a,size=256M \
             -numa node,nodeid=0,cpus=0-1,memdev=a",
            // A vCPU in no cell, and one out of range.
            "-smp 2 -m 256 -object memory-backend-ram,id=a,size=256M \
             -numa node,nodeid=0,cpus=0,memdev=a",
            "-smp 2 -m 256 -object memory-backend-ram,id=a,size=256M \
             -numa node,nodeid=0,cpus=0-2,memdev=a",
            // A backend that is not there.
            "-smp 1 -m 256 -numa node,nodeid=0,cpus=0,memdev=zz",
        ];
        for b in bad {
            assert!(parse_args(&args(b)).is_err(), "{b}");
        }
    }

    #[test]
    fn each_cell_is_its_own_mapping() {
        let o = parse_args(&args(
            "-smp 2 -m 8 -object memory-backend-ram,id=a,size=4M \
             -numa node,nodeid=0,cpus=0,memdev=a \
             -object memory-backend-ram,id=b,size=4M -numa node,nodeid=1,cpus=1,memdev=b",
        ))
        .unwrap();
        let rams = map_ram(&o, &[0]).unwrap();
        assert_eq!(rams.len(), 2);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for r in &rams {
            // One line of exactly the backend's size: no neighbour merged into it.
            let (start, end) = (r.mem.base as u64, r.mem.base as u64 + (4 << 20));
            assert!(maps.contains(&format!("{start:x}-{end:x} ")), "{maps}");
            assert_eq!(r.describe()["len"], 4 << 20);
        }
        assert_eq!(rams[1].vcpus, vec![1]);
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
        let mem = GuestMemory::map(8 << 20, None, false).unwrap();
        place(&mem, &o, &[0]).unwrap();
        mem.touch(mem.pages() - 1, 12345);
    }
}
