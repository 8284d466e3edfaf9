//! Samples ground truth about the running fake VMs.
//!
//! vCPU placement is polled every 250 ms (the CPU each vCPU last ran on and its
//! CPU time), so "where a VM runs" is CPU time per node over an interval, not one
//! instantaneous look. Memory placement is read from numa_maps at each sample.
//!
//! Each sample also asks the kernel where the pages of each VM's guest RAM mapping
//! are (move_pages(2) with no target nodes only reports; a page it gives no node is
//! placed by its frame number, see [`place_by_frame`]), which numa_maps cannot give
//! for part of a mapping: the hot set's and the cold part's locality, from which the
//! access-weighted locality and off-node access rate follow (`lab::access`). Scenarios
//! asserting hot-set order or per-VM pages moved query every page (exact, and pages
//! moved are counted); the others query every n-th page, at most
//! [`MAX_QUERY_PAGES`] per VM, so a sample stays cheap in the emulated guest where
//! the VMs compete for the same CPUs.
//!
//! Guest NUMA cells: a VM with cells reports where each cell's memory backend is
//! mapped (its progress file's `ram` list). Each cell is judged on its own: its
//! mapping's `numa_maps` line against the node its own vCPU threads ran on most,
//! and its hot set and cold part by the per-page query of that mapping. The VM's
//! locality is then the cells' (weighted by their bytes; access-weighted: the mean
//! of its cells, whose vCPUs touch alike), because a guest that knows its NUMA
//! layout keeps each vCPU's work in its own cell's memory: a wide VM split over
//! nodes cell by cell is local, not half remote.
//!
//! For the reaction time, each poll also reads every vCPU thread's allowed CPUs
//! (`Cpus_allowed_list`): the first change after the balancer started is its first
//! CPU move as the kernel sees it (numad and vmbalancer restrict CPU sets or
//! affinities; autoNUMA moves tasks inside their allowed set, which no affinity shows,
//! so it has no such time). The nodes each VM's vCPUs may run on are kept as a
//! history from t = 0, so the first VM moved off a node is known from the kernel.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use balancer::host::linux::actuate::sys;
use balancer::model::CpuSet;
use vmbalancer_tests::lab::protocol::{CellTruth, Sample, Summary, VmTruth};
use vmbalancer_tests::lab::scenario::hot_pages;
use vmbalancer_tests::lab::truth::{self, NodeInfo};
use vmbalancer_tests::lab::{access, judge, metrics};

use crate::vms::RunningVm;

const POLL: Duration = Duration::from_millis(250);

/// Pages of guest RAM queried per VM and sample when every page is not needed. The
/// query costs tens of microseconds per page in the emulated guest; 2048 evenly
/// spaced pages (512 in a 25 % hot set) still place a locality within a few percent.
pub const MAX_QUERY_PAGES: usize = 2048;

struct Track {
    name: String,
    pid: u32,
    vcpus: u32,
    progress: std::path::PathBuf,
    threads: Vec<(u32, u32)>,
    last_ticks: HashMap<u32, u64>,
    interval_ticks: Vec<u64>,
    last_nodes: Vec<usize>,
    work: WorkRate,
    first_touches: Option<u64>,
    pages: Option<PageTrack>,
    /// Share of touches on hot-set pages (`access::hot_access_share`).
    hot_share: f64,
    /// Each vCPU thread's allowed CPUs when the balancer started.
    allowed_at_start: HashMap<u32, CpuSet>,
    /// Nodes the vCPU threads may run on (union), `(t_s, nodes)` from t = 0, one
    /// entry per change.
    node_history: Vec<(f64, Vec<usize>)>,
    /// The VM's own clock (its progress report) when the balancer started; 0 for a
    /// domain, whose phases count from then (`VmSpec::phases`).
    clock_at_t0_s: f64,
    phases_from_t0: bool,
    /// Per vCPU index: CPU ticks per node since the previous sample, and the node
    /// it last ran on (for the cells' main nodes).
    vcpu_ticks: HashMap<u32, (Vec<u64>, usize)>,
    /// The guest cells, once the VM reported its mappings.
    cells: Option<Vec<CellTrack>>,
    /// The VM's hot set (fraction, offset) and per-page setting, for its cells'
    /// page tracks.
    hot: (f64, f64),
    per_page: bool,
}

/// One guest cell of a VM: its id, vCPU indexes and its mapping's page track.
struct CellTrack {
    id: u32,
    vcpus: Vec<u32>,
    pages: PageTrack,
}

/// A cell's mapping as the VM reports it: (cell id, start, length, vCPU indexes).
type CellRam = (u32, u64, u64, Vec<u32>);

/// The guest RAM mappings a fake VM reports in its progress file: (cell id, start,
/// length, vCPU indexes) for each cell; empty for a VM without cells.
fn read_cells(path: &Path) -> Option<Vec<CellRam>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v.get("ram")?
        .as_array()?
        .iter()
        .filter(|r| !r.get("cell").is_none_or(serde_json::Value::is_null))
        .map(|r| {
            let vcpus = r
                .get("vcpus")?
                .as_array()?
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<u32>>>()?;
            Some((
                r.get("cell")?.as_u64()? as u32,
                r.get("start")?.as_u64()?,
                r.get("len")?.as_u64()?,
                vcpus,
            ))
        })
        .collect()
}

/// Per-page node history of one VM's guest RAM mapping.
struct PageTrack {
    memory_bytes: u64,
    hot_fraction: f64,
    hot_offset: f64,
    /// (start, length) once found in /proc/PID/maps.
    mapping: Option<(u64, u64)>,
    /// Every `stride`-th page is queried; 1 = all, and only then are moves counted.
    stride: usize,
    prev: Vec<i32>,
    moved: u64,
    /// Share of the pages queried at the last sample whose node is known.
    present_share: Option<f64>,
}

const QUERY_BATCH: usize = 8192;

/// The node of every `stride`-th page of `[start, start + len)` of process `pid`
/// (negative errno for pages not present), from move_pages(2) with `nodes = NULL`,
/// and for the pages it gives no node, from their frame numbers ([`frame_nodes`]).
fn page_nodes(pid: u32, start: u64, len: u64, stride: usize) -> Vec<i32> {
    let pages = (len / 4096) as usize;
    let step = stride.max(1) as u64 * 4096;
    let pages = pages.div_ceil(stride.max(1));
    let mut out = vec![-libc::ENOENT; pages];
    let mut addrs: Vec<u64> = Vec::with_capacity(QUERY_BATCH);
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
    for first in (0..pages).step_by(QUERY_BATCH) {
        let n = QUERY_BATCH.min(pages - first);
        addrs.clear();
        addrs.extend((first..first + n).map(|i| start + i as u64 * step));
        let status = &mut out[first..first + n];
        if sys::move_pages(pid, &addrs, None, status).is_err() {
            status.fill(-libc::EFAULT);
        }
        if let (Some(frames), Some(pagemap)) = (frame_nodes(), pagemap.as_ref()) {
            place_by_frame(pagemap, frames, &addrs, stride <= 1, status);
        }
    }
    out
}

/// Where each frame is, read once (`None` where sysfs does not say).
fn frame_nodes() -> Option<&'static truth::FrameNodes> {
    static FRAMES: std::sync::OnceLock<Option<truth::FrameNodes>> = std::sync::OnceLock::new();
    FRAMES
        .get_or_init(|| {
            let root = Path::new("/");
            let nodes = truth::read_nodes(root).ok()?;
            truth::FrameNodes::read(root, &nodes).ok()
        })
        .as_ref()
}

/// Gives the pages of `addrs` the query left without a node (negative `status`) the
/// node of their frame, from `/proc/PID/pagemap` (present bit and frame number; the
/// harness runs as root). Under autoNUMA the query reports no node for a third of a
/// VM's guest RAM, mostly its remote pages (tests/results/lab-demo.md): counting
/// only the pages it reports overstated autoNUMA's locality. `contiguous`: the
/// addresses are consecutive pages, read with one call.
fn place_by_frame(
    pagemap: &std::fs::File,
    frames: &truth::FrameNodes,
    addrs: &[u64],
    contiguous: bool,
    status: &mut [i32],
) {
    use procfs::process::{MemoryPageFlags, PageInfo};
    use std::os::unix::fs::FileExt;
    if status.iter().all(|&s| s >= 0) || addrs.is_empty() {
        return;
    }
    let node = |e: &[u8]| {
        let PageInfo::MemoryPage(flags) =
            PageInfo::parse_info(u64::from_ne_bytes(e.try_into().ok()?))
        else {
            return None;
        };
        let pfn = flags.get_page_frame_number().0;
        (flags.contains(MemoryPageFlags::PRESENT) && pfn != 0)
            .then(|| frames.node_of(pfn))
            .flatten()
    };
    if contiguous {
        let mut buf = vec![0u8; addrs.len() * 8];
        if pagemap
            .read_exact_at(&mut buf, addrs[0] / 4096 * 8)
            .is_err()
        {
            return;
        }
        for (s, e) in status.iter_mut().zip(buf.chunks_exact(8)) {
            if *s < 0
                && let Some(n) = node(e)
            {
                *s = n as i32;
            }
        }
    } else {
        let mut e = [0u8; 8];
        for (s, &addr) in status.iter_mut().zip(addrs) {
            if *s < 0
                && pagemap.read_exact_at(&mut e, addr / 4096 * 8).is_ok()
                && let Some(n) = node(&e)
            {
                *s = n as i32;
            }
        }
    }
}

/// Share of the present pages in `nodes` that are on `node`.
fn share_on(nodes: &[i32], node: Option<usize>) -> f64 {
    let present = nodes.iter().filter(|&&n| n >= 0).count();
    match node {
        Some(m) if present > 0 => {
            nodes.iter().filter(|&&n| n == m as i32).count() as f64 / present as f64
        }
        _ => 0.0,
    }
}

impl PageTrack {
    /// (hot locality, cold locality, pages moved so far when every page is queried)
    /// with `main` as home.
    fn sample(&mut self, pid: u32, main: Option<usize>) -> Option<(f64, f64, Option<u64>)> {
        if self.mapping.is_none() {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
            self.mapping = truth::guest_ram_mapping(&maps, self.memory_bytes).ok();
        }
        let (start, _) = self.mapping?;
        let nodes = page_nodes(pid, start, self.memory_bytes, self.stride);
        let present = nodes.iter().filter(|&&n| n >= 0).count();
        self.present_share = Some(present as f64 / nodes.len().max(1) as f64);
        let exact = self.stride == 1;
        if exact && !self.prev.is_empty() {
            self.moved += nodes
                .iter()
                .zip(&self.prev)
                .filter(|&(&a, &b)| a >= 0 && b >= 0 && a != b)
                .count() as u64;
        }
        let hot = hot_pages(
            (self.memory_bytes / 4096) as usize,
            self.hot_fraction,
            self.hot_offset,
        );
        let (mut hot_nodes, mut cold_nodes) = (Vec::new(), Vec::new());
        for (i, &n) in nodes.iter().enumerate() {
            if hot.contains(&(i * self.stride)) {
                hot_nodes.push(n);
            } else {
                cold_nodes.push(n);
            }
        }
        let out = (
            share_on(&hot_nodes, main),
            share_on(&cold_nodes, main),
            exact.then_some(self.moved),
        );
        if exact {
            self.prev = nodes;
        }
        Some(out)
    }
}

pub struct Sampler {
    n_nodes: usize,
    cpu_node: BTreeMap<u32, usize>,
    clk_tck: f64,
    tracks: Vec<Track>,
    samples: Vec<Sample>,
    vmstat0: BTreeMap<String, u64>,
    interval_start: Instant,
    /// When the balancer started ([`Sampler::start_clock`]), and CLOCK_MONOTONIC then.
    t0: Option<(Instant, u64)>,
    /// Seconds after `t0` when a vCPU thread's allowed CPUs first changed.
    first_affinity_change_s: Option<f64>,
    /// Time spent in per-page queries: (total, longest sample) in seconds.
    query_s: (f64, f64),
}

/// The fake VM's last progress report: its own clock (`t_s`) and touches of all vCPUs.
fn read_report(path: &Path) -> Option<(f64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let t_s = v.get("t_s")?.as_f64()?;
    let touches = v
        .get("touches")?
        .as_array()?
        .iter()
        .filter_map(|x| x.as_u64())
        .sum();
    Some((t_s, touches))
}

/// A VM that has not reported for this long (harness time) counts as doing no work.
const REPORT_STALE: Duration = Duration::from_secs(5);

/// The work rate of one VM from two of its own progress reports.
///
/// Why not touches over the sample interval: the VM reports once a second, so a
/// sample taken less than a second after the previous one (the harness runs
/// scenario commands between samples, and a slow command delays one sample and
/// crowds the next) sees no new report and would count a running VM as idle. The
/// rate holds from the VM's last report until a newer one, and drops to zero when
/// reports stop for [`REPORT_STALE`].
#[derive(Debug, Default)]
struct WorkRate {
    last: Option<(f64, u64, Instant)>,
    per_s: f64,
}

impl WorkRate {
    fn new(report: Option<(f64, u64)>, now: Instant) -> Self {
        Self {
            last: report.map(|(t, n)| (t, n, now)),
            per_s: 0.0,
        }
    }

    /// Takes the current report; returns touches per second (all vCPUs).
    fn update(&mut self, report: Option<(f64, u64)>, now: Instant) -> f64 {
        match (report, self.last) {
            (Some((t, n)), Some((t0, n0, _))) if t > t0 => {
                self.per_s = n.saturating_sub(n0) as f64 / (t - t0);
                self.last = Some((t, n, now));
            }
            (Some((t, n)), None) => self.last = Some((t, n, now)),
            (_, Some((_, _, at))) if now.duration_since(at) < REPORT_STALE => {}
            _ => self.per_s = 0.0,
        }
        self.per_s
    }

    fn touches(&self) -> u64 {
        self.last.map_or(0, |(_, n, _)| n)
    }
}

impl Sampler {
    /// `per_page`: query every page of guest RAM at each sample (else every n-th).
    pub fn new(nodes: &[NodeInfo], vms: &[RunningVm], per_page: bool) -> anyhow::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let clk_tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let tracks = vms
            .iter()
            .map(|v| Track {
                name: v.name.clone(),
                pid: v.pid,
                vcpus: v.vcpus,
                progress: v.progress.clone(),
                threads: Vec::new(),
                last_ticks: HashMap::new(),
                interval_ticks: vec![0; nodes.len()],
                last_nodes: Vec::new(),
                work: WorkRate::new(read_report(&v.progress), Instant::now()),
                first_touches: None,
                pages: Some(PageTrack {
                    memory_bytes: v.memory_bytes,
                    hot_fraction: v.hot_fraction,
                    hot_offset: v.hot_offset,
                    mapping: None,
                    stride: if per_page {
                        1
                    } else {
                        access::query_stride((v.memory_bytes / 4096) as usize, MAX_QUERY_PAGES)
                    },
                    prev: Vec::new(),
                    moved: 0,
                    present_share: None,
                }),
                hot_share: access::hot_access_share(v.hot_access_pct, v.hot_fraction),
                allowed_at_start: HashMap::new(),
                node_history: Vec::new(),
                clock_at_t0_s: 0.0,
                phases_from_t0: matches!(v.process, crate::vms::VmProcess::Domain),
                vcpu_ticks: HashMap::new(),
                cells: None,
                hot: (v.hot_fraction, v.hot_offset),
                per_page,
            })
            .collect();
        Ok(Self {
            n_nodes: nodes.len(),
            cpu_node: truth::cpu_to_node(nodes),
            clk_tck,
            tracks,
            samples: Vec::new(),
            vmstat0: truth::read_vmstat(Path::new("/"))?,
            interval_start: Instant::now(),
            t0: None,
            first_affinity_change_s: None,
            query_s: (0.0, 0.0),
        })
    }

    /// Marks the balancer's start (t = 0): CPU moves are looked for from here on,
    /// against each vCPU thread's allowed CPUs now.
    pub fn start_clock(&mut self) {
        let root = Path::new("/");
        for t in &mut self.tracks {
            t.allowed_at_start = t
                .threads
                .iter()
                .filter_map(|&(tid, _)| {
                    Some((tid, truth::read_cpus_allowed(root, t.pid, tid).ok()?))
                })
                .collect();
        }
        self.t0 = Some((Instant::now(), monotonic_ns()));
        self.first_affinity_change_s = None;
        for t in &mut self.tracks {
            t.node_history.clear();
            t.clock_at_t0_s = if t.phases_from_t0 {
                0.0
            } else {
                read_report(&t.progress).map_or(0.0, |(s, _)| s)
            };
        }
        self.poll();
    }

    /// Where each VM's vCPUs were allowed over the run, and its known load.
    pub fn placements(
        &self,
        phases: impl Fn(&str) -> Vec<(f64, f64)>,
    ) -> (Vec<judge::NodeHistory>, Vec<judge::KnownLoad>) {
        self.tracks
            .iter()
            .map(|t| {
                (
                    judge::NodeHistory {
                        name: t.name.clone(),
                        pid: t.pid,
                        changes: t.node_history.clone(),
                    },
                    judge::KnownLoad {
                        name: t.name.clone(),
                        vcpus: t.vcpus,
                        phases: phases(&t.name),
                        clock_at_t0_s: t.clock_at_t0_s,
                    },
                )
            })
            .unzip()
    }

    /// Seconds spent in per-page queries over the run, and in the longest sample:
    /// the harness's own cost, which the VMs and the balancer share CPUs with.
    pub fn query_cost_s(&self) -> (f64, f64) {
        self.query_s
    }

    /// CLOCK_MONOTONIC (ns) at [`Sampler::start_clock`].
    pub fn t0_monotonic_ns(&self) -> Option<u64> {
        self.t0.map(|(_, ns)| ns)
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn poll(&mut self) {
        let root = Path::new("/");
        for t in &mut self.tracks {
            if t.threads.len() < t.vcpus as usize {
                t.threads = truth::vcpu_threads(root, t.pid).unwrap_or_default();
            }
            t.last_nodes.clear();
            let mut allowed_nodes: Vec<usize> = Vec::new();
            for &(tid, idx) in &t.threads {
                let Ok(stat) = truth::read_task_stat(root, t.pid, tid) else {
                    continue;
                };
                let node = self.cpu_node.get(&stat.processor).copied().unwrap_or(0);
                let prev = t
                    .last_ticks
                    .insert(tid, stat.cpu_ticks)
                    .unwrap_or(stat.cpu_ticks);
                t.interval_ticks[node] += stat.cpu_ticks.saturating_sub(prev);
                t.last_nodes.push(node);
                let per_vcpu = t
                    .vcpu_ticks
                    .entry(idx)
                    .or_insert_with(|| (vec![0; self.n_nodes], node));
                per_vcpu.0[node] += stat.cpu_ticks.saturating_sub(prev);
                per_vcpu.1 = node;
                if let Some((t0, _)) = self.t0
                    && let Ok(now) = truth::read_cpus_allowed(root, t.pid, tid)
                {
                    allowed_nodes.extend(now.iter().filter_map(|c| self.cpu_node.get(&c).copied()));
                    let before = t.allowed_at_start.entry(tid).or_insert_with(|| now.clone());
                    if *before != now && self.first_affinity_change_s.is_none() {
                        self.first_affinity_change_s = Some(t0.elapsed().as_secs_f64());
                    }
                }
            }
            if let Some((t0, _)) = self.t0 {
                allowed_nodes.sort_unstable();
                allowed_nodes.dedup();
                if !allowed_nodes.is_empty()
                    && t.node_history
                        .last()
                        .is_none_or(|(_, n)| *n != allowed_nodes)
                {
                    t.node_history
                        .push((t0.elapsed().as_secs_f64(), allowed_nodes));
                }
            }
        }
    }

    pub fn poll_for(&mut self, d: Duration) {
        self.poll_until(Instant::now() + d);
    }

    pub fn poll_until(&mut self, due: Instant) {
        loop {
            self.poll();
            let now = Instant::now();
            if now >= due {
                return;
            }
            std::thread::sleep(POLL.min(due - now));
        }
    }

    /// Takes a sample at `t_s` and starts a new interval.
    pub fn sample(&mut self, t_s: f64) -> Sample {
        let root = Path::new("/");
        let dt = self.interval_start.elapsed().as_secs_f64().max(1e-3);
        self.interval_start = Instant::now();
        if self.samples.is_empty()
            && let Ok(v) = truth::read_vmstat(root)
        {
            self.vmstat0 = v;
        }
        let mut load = vec![0.0; self.n_nodes];
        let mut vms = Vec::new();
        let mut weights = Vec::new();
        let mut query_s = 0.0;
        for t in &mut self.tracks {
            let bytes = truth::read_numa_maps(root, t.pid)
                .and_then(|m| truth::numa_maps_private_bytes_per_node(&m, self.n_nodes))
                .unwrap_or_else(|_| vec![0; self.n_nodes]);
            let main = metrics::main_node(&t.interval_ticks, &t.last_nodes);
            for (n, &ticks) in t.interval_ticks.iter().enumerate() {
                load[n] += ticks as f64 / self.clk_tck / dt;
            }
            let touches_per_s = t.work.update(read_report(&t.progress), Instant::now());
            t.first_touches.get_or_insert(t.work.touches());
            let rate = touches_per_s / t.vcpus.max(1) as f64;
            let queried = Instant::now();
            let paged = t.pages.as_mut().and_then(|p| p.sample(t.pid, main));
            query_s += queried.elapsed().as_secs_f64();
            let mut access_locality =
                paged.map(|(h, c, _)| access::vm_access_locality(t.hot_share, h, c));
            let queried = Instant::now();
            let cells = sample_cells(t, self.n_nodes);
            query_s += queried.elapsed().as_secs_f64();
            let mut locality = metrics::locality(&bytes, main);
            if !cells.is_empty() {
                let by_bytes: Vec<(f64, u64)> = cells
                    .iter()
                    .map(|c| (c.locality, c.bytes_per_node.iter().sum()))
                    .collect();
                locality = metrics::weighted_mean(&by_bytes);
                let each: Vec<(f64, u64)> = cells
                    .iter()
                    .filter_map(|c| Some((c.access_locality?, 0)))
                    .collect();
                access_locality = (each.len() == cells.len())
                    .then(|| access::mean_by_accesses(&each))
                    .flatten();
            }
            vms.push(VmTruth {
                name: t.name.clone(),
                pid: t.pid,
                locality,
                bytes_per_node: bytes,
                vcpu_ticks_per_node: std::mem::replace(
                    &mut t.interval_ticks,
                    vec![0; self.n_nodes],
                ),
                vcpu_nodes: t.last_nodes.clone(),
                main_node: main,
                touches_per_vcpu_s: rate,
                hot_locality: paged.map(|p| p.0),
                cold_locality: paged.map(|p| p.1),
                pages_moved: paged.and_then(|p| p.2),
                queried_present_share: t.pages.as_ref().and_then(|p| p.present_share),
                access_locality,
                offnode_accesses_per_s: access_locality
                    .map(|a| access::offnode_accesses_per_s(touches_per_s, a)),
                cells,
            });
            // Accesses per second weigh the VMs (whole touches: the weights are counts).
            weights.push(touches_per_s.round() as u64);
        }
        let weighted: Vec<(f64, u64)> = vms
            .iter()
            .map(|v| (v.locality, v.bytes_per_node.iter().sum()))
            .collect();
        let by_accesses = |f: fn(&VmTruth) -> Option<f64>| {
            let pairs: Vec<(f64, u64)> = vms
                .iter()
                .zip(&weights)
                .filter_map(|(v, &w)| Some((f(v)?, w)))
                .collect();
            access::mean_by_accesses(&pairs)
        };
        self.query_s = (self.query_s.0 + query_s, self.query_s.1.max(query_s));
        let offnode: Vec<f64> = vms
            .iter()
            .filter_map(|v| v.offnode_accesses_per_s)
            .collect();
        let sample = Sample {
            t_s,
            locality_mean: metrics::weighted_mean(&weighted),
            locality_min: vms.iter().map(|v| v.locality).fold(1.0, f64::min),
            vcpu_load_per_node: load,
            access_locality_mean: by_accesses(|v| v.access_locality),
            hot_locality_mean: by_accesses(|v| v.hot_locality),
            offnode_accesses_per_s: (!offnode.is_empty()).then(|| offnode.iter().sum()),
            vms,
        };
        self.samples.push(sample.clone());
        sample
    }

    /// The run's summary, from the first sample (t = 0) to now.
    pub fn summary(&self, balancer: &str, kernel: &str, run_s: f64) -> Summary {
        let vmstat = truth::read_vmstat(Path::new("/")).unwrap_or_default();
        let delta = |k: &str| {
            vmstat
                .get(k)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.vmstat0.get(k).copied().unwrap_or(0))
        };
        let locality: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|s| (s.t_s, s.locality_mean))
            .collect();
        let series = |f: fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
            self.samples
                .iter()
                .filter_map(|s| Some((s.t_s, f(s)?)))
                .collect()
        };
        let access_locality = series(|s| s.access_locality_mean);
        let hot_locality = series(|s| s.hot_locality_mean);
        let balances: Vec<f64> = self
            .samples
            .iter()
            .skip(1)
            .map(|s| metrics::cpu_balance(&s.vcpu_load_per_node))
            .collect();
        let work: u64 = self
            .tracks
            .iter()
            .map(|t| {
                t.work
                    .touches()
                    .saturating_sub(t.first_touches.unwrap_or(t.work.touches()))
            })
            .sum();
        let vcpus: u32 = self.tracks.iter().map(|t| t.vcpus).sum();
        let span_s = self.samples.last().map_or(0.0, |s| s.t_s).max(1e-3);
        Summary {
            balancer: balancer.into(),
            kernel: kernel.into(),
            vms: self.tracks.len(),
            time_to_090_s: metrics::time_to(&locality, 0.9),
            time_to_095_s: metrics::time_to(&locality, 0.95),
            locality,
            numa_pages_migrated: delta("numa_pages_migrated"),
            pgmigrate_success: delta("pgmigrate_success"),
            cpu_balance: if balances.is_empty() {
                1.0
            } else {
                balances.iter().sum::<f64>() / balances.len() as f64
            },
            work_touches: work,
            touches_per_vcpu_s: work as f64 / span_s / vcpus.max(1) as f64,
            run_s,
            access_time_to_095_s: metrics::time_to(&access_locality, 0.95),
            hot_time_to_095_s: metrics::time_to(&hot_locality, 0.95),
            access_locality,
            hot_locality,
            offnode_accesses_per_s: series(|s| s.offnode_accesses_per_s),
            first_cpu_move_affinity_s: self.first_affinity_change_s,
            first_cpu_move_status_s: None,
            tick_late_moving_s: None,
            balancer_cpu_s: None,
        }
    }
}

/// Each guest cell's truth at a sample (empty for a VM without cells), and a new
/// interval for the per-vCPU CPU time.
fn sample_cells(t: &mut Track, n_nodes: usize) -> Vec<CellTruth> {
    let vcpu_ticks = std::mem::take(&mut t.vcpu_ticks);
    if t.cells.is_none() {
        t.cells = read_cells(&t.progress)
            .filter(|c| !c.is_empty())
            .map(|cells| {
                cells
                    .into_iter()
                    .map(|(id, start, len, vcpus)| CellTrack {
                        id,
                        vcpus,
                        pages: PageTrack {
                            memory_bytes: len,
                            hot_fraction: t.hot.0,
                            hot_offset: t.hot.1,
                            mapping: Some((start, len)),
                            stride: if t.per_page {
                                1
                            } else {
                                access::query_stride((len / 4096) as usize, MAX_QUERY_PAGES)
                            },
                            prev: Vec::new(),
                            moved: 0,
                            present_share: None,
                        },
                    })
                    .collect()
            });
    }
    let Some(cells) = t.cells.as_mut() else {
        return Vec::new();
    };
    // No mapping holds all of guest RAM: the cells' tracks replace the VM's.
    t.pages = None;
    let numa_maps = truth::read_numa_maps(Path::new("/"), t.pid).unwrap_or_default();
    cells
        .iter_mut()
        .map(|c| {
            let mut ticks = vec![0u64; n_nodes];
            let mut last = Vec::new();
            for (n, at) in c.vcpus.iter().filter_map(|i| vcpu_ticks.get(i)) {
                for (sum, v) in ticks.iter_mut().zip(n) {
                    *sum += v;
                }
                last.push(*at);
            }
            let main = metrics::main_node(&ticks, &last);
            let start = c.pages.mapping.map_or(0, |m| m.0);
            let bytes = truth::numa_maps_mapping_bytes_per_node(&numa_maps, start, n_nodes)
                .unwrap_or_else(|_| vec![0; n_nodes]);
            let paged = c.pages.sample(t.pid, main);
            CellTruth {
                id: c.id,
                locality: metrics::locality(&bytes, main),
                bytes_per_node: bytes,
                main_node: main,
                access_locality: paged
                    .map(|(h, cold, _)| access::vm_access_locality(t.hot_share, h, cold)),
            }
        })
        .collect()
}

/// CLOCK_MONOTONIC in ns, the clock of vmbalancer's decision times.
fn monotonic_ns() -> u64 {
    vmbalancer_tests::clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod work_rate_tests {
    use super::*;

    #[test]
    fn a_crowded_sample_keeps_the_last_rate_and_silence_means_no_work() {
        let t0 = Instant::now();
        let mut w = WorkRate::new(Some((1.0, 100)), t0);
        assert_eq!(
            w.update(Some((3.0, 500)), t0 + Duration::from_secs(2)),
            200.0
        );
        // 0.3 s later: no new report yet; the VM is still working at its last rate.
        let crowded = t0 + Duration::from_millis(2300);
        assert_eq!(w.update(Some((3.0, 500)), crowded), 200.0);
        // A VM whose counters stop is idle at its next report.
        assert_eq!(w.update(Some((4.0, 500)), t0 + Duration::from_secs(3)), 0.0);
        assert_eq!(
            w.update(Some((5.0, 900)), t0 + Duration::from_secs(4)),
            400.0
        );
        // No report for longer than REPORT_STALE: no work.
        assert_eq!(
            w.update(Some((5.0, 900)), t0 + Duration::from_secs(10)),
            0.0
        );
        assert_eq!(w.touches(), 900);
    }
}
