//! How often a VM writes each 2 MiB region of its guest RAM, from the kernel's
//! soft-dirty bits, for VMs whose memory is away from their vCPUs.
//!
//! Why: hot-first migration needs to know the hot regions of memory that is already
//! resident. Page faults (eBPF) only show memory being touched for the first time,
//! and NUMA hinting faults exist only while the kernel's own balancing runs. The
//! soft-dirty bit works on any kernel with `CONFIG_MEM_SOFT_DIRTY`: writing `4` to
//! `/proc/PID/clear_refs` clears it for the whole process, and `/proc/PID/pagemap`
//! (bit 55) then shows which pages were written since.
//!
//! A bit only says "written at least once", and with transparent huge pages one write
//! marks a whole 2 MiB region: over a long window a region written a few hundred
//! times a second looks exactly like one written all the time. So a sampling round
//! clears the bits once and then reads them in passes at growing gaps
//! ([`PASS_GAPS_US`]), noting in which pass each region is first seen written. The
//! regions written first are the ones written most often: a region's round heat is
//! its written pages, halved for each pass it came after the VM's first written
//! region ([`earliness`]). Counting passes rather than microseconds keeps the order
//! right where the VM's CPU is taken away for milliseconds at a time. One round is a
//! noisy sample, so rounds are averaged ([`ROUND_WEIGHT`]), with one exception: a
//! round that found more than half of the regions it read written by its first
//! telling pass resolved nothing (its passes were too slow for the VM's writes, as
//! in a daemon's first seconds, when it loads its eBPF programs beside the
//! sampler), and the first round that does resolve replaces what such rounds said
//! instead of being averaged into it ([`VmState::learn`]). Without that, in the
//! stack lab's nested emulation, a first round that found 63 % of the regions
//! written at once kept a warm region "hot" for five rounds (10 s), and the first
//! memory moves, planned on it, carried the warm three quarters of each VM in
//! address order. A VM that really writes most of its memory never resolves, and
//! all of it stays hot. Each VM's round starts
//! its passes right after its own clear, and the VMs' rounds run side by side on a
//! few threads, so one tick waits for the slowest VM's round, not their sum; a region
//! backed by one huge page needs one pagemap entry per pass instead of 512.
//!
//! Cost and scope: clearing write-protects the VM's pages, so its next write to each
//! page (or huge page) takes a minor fault, and on a KVM VM the clear also drops its
//! secondary (EPT) mappings, which refault as the guest runs. That is paid only by
//! VMs with more of their guest RAM off the nodes their vCPUs run on than the
//! locality target leaves (those whose memory may move; the target comes from the
//! daemon's configuration), at most once per [`ROUND_EVERY_NS`], and not while a move
//! of the VM's memory by the daemon runs: that move's regions are already chosen, a
//! round would only take CPU from the mover threads (under the lab's emulation a
//! round of the demo's 8 VMs of 384 MiB takes 0.9-1.3 s of thread time), and the round
//! after the move ends, before the VM's next move is planned, brings the heat up to
//! date; its regions' nodes are not looked up meanwhile either. A VM with guest
//! NUMA cells is the exception: its cells move on their own, and one cell's next
//! move may be planned while another's runs. Pages only read are not seen.
//!
//! Guest RAM on hugetlbfs is never sampled ([`wants_round`]): the kernel keeps no
//! soft-dirty bit per hugetlb page (pagemap reports the mapping's `VM_SOFTDIRTY`
//! flag for each of them, which a clear resets for good), and a huge page moves
//! whole, so there is no order to find inside it. Its reads would also wait while
//! the mover copies one of the VM's pages (see the module doc of `memory`): a 1 GiB
//! page takes 20 s to copy under the lab's emulation.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::{HotRegion, MemoryBacking, NodeId, Snapshot, Vm};

/// Shortest time between two sampling rounds of one VM. Each round clears the bits,
/// which costs a TLB flush per huge page and a write fault per written page.
pub const ROUND_EVERY_NS: u64 = 2_000_000_000;
/// Waits before each read pass of a round, after the clear. Short first gaps resolve
/// fast writers, the later ones still catch regions written a few hundred times a
/// second; a region not seen by the last pass counts as cold in that round.
pub const PASS_GAPS_US: [u64; 6] = [0, 250, 500, 1_000, 2_000, 4_000];
/// Most regions of one VM sampled in a round (8 GiB); a bigger VM is covered over
/// several rounds, from where the last one stopped, so a pass stays a few ms long.
pub const MAX_REGIONS_PER_ROUND: usize = 4096;
/// Weight of the newest round in a region's averaged heat.
pub const ROUND_WEIGHT: f64 = 0.3;
/// Region size heat is counted in (the huge page size).
pub const REGION_BYTES: u64 = 2 << 20;

/// Pages sampled per region to tell its node: a region is one transparent huge
/// page, or 512 small pages that moved together, so a few samples agree.
pub const NODE_SAMPLES: u64 = 8;
/// Averaged heat (weighted written pages) below which a region is forgotten.
const MIN_HEAT: f64 = 0.01;
const PAGE_BYTES: u64 = 4096;
const PAGES_PER_REGION: u64 = REGION_BYTES / PAGE_BYTES;
const SOFT_DIRTY_BIT: u64 = 1 << 55;
const PRESENT_BIT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Per-VM sampling state.
#[derive(Debug, Default)]
struct VmState {
    /// When the last round ran (snapshot time).
    last_round_ns: u64,
    /// Averaged heat of each region seen written, by start address.
    heat: BTreeMap<u64, f64>,
    /// Regions last found backed by one huge page: a pass reads one entry of them.
    huge: BTreeSet<u64>,
    /// Where the next round starts, for VMs larger than [`MAX_REGIONS_PER_ROUND`].
    cursor: u64,
    /// The refusal of its bits was logged (see [`denial`]).
    denied_said: bool,
    /// A round that told hot from warm has been learned ([`RoundVm::resolves`]).
    resolved: bool,
}

/// Soft-dirty sampling of the VMs that need it.
#[derive(Debug)]
pub struct WriteHeat {
    proc_root: PathBuf,
    /// A VM is sampled while more than this share of its guest RAM is off its vCPUs'
    /// nodes: at or below it, the locality target is met and none of it will move.
    min_remote_share: f64,
    vms: BTreeMap<u32, VmState>,
    /// Set once clearing failed (no soft-dirty support): stop trying.
    unsupported: bool,
}

/// The remote share above which a VM is below `locality_target_pct`.
fn remote_share_below(locality_target_pct: u32) -> f64 {
    1.0 - f64::from(locality_target_pct.min(100)) / 100.0
}

impl WriteHeat {
    /// Samples VMs below `locality_target_pct` (the engine's target: above it no
    /// memory moves, so its heat would go unused).
    pub fn new(proc_root: &Path, locality_target_pct: u32) -> Self {
        let supported = soft_dirty_works();
        if !supported {
            log_unsupported();
        }
        Self {
            proc_root: proc_root.to_path_buf(),
            min_remote_share: remote_share_below(locality_target_pct),
            vms: BTreeMap::new(),
            unsupported: !supported,
        }
    }

    /// A reloaded locality target.
    pub fn set_locality_target_pct(&mut self, locality_target_pct: u32) {
        self.min_remote_share = remote_share_below(locality_target_pct);
    }

    /// Runs a round for the VMs due one and gives every sampled VM its regions by
    /// write heat, hottest first, in place of fault heat (first-touch faults say
    /// nothing about memory already resident); not a VM [`held`] by a move, which
    /// nothing plans on until the move ends. `moving(pid)`: a move of the VM's
    /// memory runs. `nodes_of(pid, starts)` gives the node of each region starting
    /// at `starts` (one query per VM).
    pub fn fill(
        &mut self,
        snapshot: &mut Snapshot,
        moving: impl Fn(u32) -> bool,
        nodes_of: impl Fn(u32, &[u64]) -> Vec<Option<NodeId>> + Sync,
    ) {
        self.vms
            .retain(|pid, _| snapshot.vms.iter().any(|v| v.pid == *pid));
        if self.unsupported {
            return;
        }
        let due = self.due_rounds(snapshot, &moving);
        if !due.is_empty() {
            let Ok(done) = sample_round(&self.proc_root, due) else {
                log_unsupported();
                self.unsupported = true;
                return;
            };
            for vm in done {
                if let Some(state) = self.vms.get_mut(&vm.pid) {
                    if let Some(why) = vm.denied.as_deref() {
                        // Said once per VM: its rounds keep being refused the same way.
                        if !state.denied_said {
                            state.denied_said = true;
                            tracing::warn!(
                                vm = vm.pid,
                                why,
                                "no write heat for this VM, its memory moves without hot-first order: \
                                 the kernel refused the daemon its soft-dirty bits (another user's \
                                 process needs CAP_DAC_OVERRIDE)"
                            );
                        }
                        continue;
                    }
                    state.learn(&vm);
                    tracing::debug!(vm = vm.pid, order = %state.describe(), "write heat");
                }
            }
        }
        // Each VM's regions are looked up on their own, side by side like the
        // rounds: a query walks that VM's page tables only. Not those of a VM held
        // by its move: nothing is planned on them until the move ends.
        let mut lookups: Vec<(usize, Vec<Option<NodeId>>)> = snapshot
            .vms
            .iter()
            .enumerate()
            .filter(|(_, vm)| !held(vm, &moving))
            .filter(|(_, vm)| self.vms.get(&vm.pid).is_some_and(|s| !s.heat.is_empty()))
            .map(|(i, _)| (i, Vec::new()))
            .collect();
        let (vms, states) = (&snapshot.vms, &self.vms);
        on_threads(&mut lookups, |(i, nodes)| {
            let pid = vms[*i].pid;
            if let Some(state) = states.get(&pid) {
                let starts: Vec<u64> = state.heat.keys().copied().collect();
                *nodes = nodes_of(pid, &starts);
            }
        });
        for (i, nodes) in lookups {
            let vm = &mut snapshot.vms[i];
            let Some(state) = self.vms.get(&vm.pid) else {
                continue;
            };
            vm.hot_regions = state
                .heat
                .iter()
                .zip(nodes)
                .filter_map(|((&start, &heat), node)| {
                    Some(HotRegion {
                        start_addr: start,
                        len_bytes: REGION_BYTES,
                        node: node?,
                        heat,
                    })
                })
                .collect();
            vm.hot_regions.sort_by(|a, b| {
                b.heat
                    .total_cmp(&a.heat)
                    .then(a.start_addr.cmp(&b.start_addr))
            });
        }
    }

    /// The rounds due now: VMs that want one ([`wants_round`]; the others are
    /// forgotten), sampled never or at least [`ROUND_EVERY_NS`] ago, and not
    /// [`held`] by a move. Marks them sampled now.
    fn due_rounds(&mut self, snapshot: &Snapshot, moving: impl Fn(u32) -> bool) -> Vec<RoundVm> {
        let now = snapshot.now_ns;
        let mut due = Vec::new();
        for vm in &snapshot.vms {
            if !wants_round(vm, &snapshot.topology, self.min_remote_share) {
                self.vms.remove(&vm.pid);
                continue;
            }
            let state = self.vms.entry(vm.pid).or_default();
            let never = state.last_round_ns == 0;
            if never
                || (!held(vm, &moving) && now.saturating_sub(state.last_round_ns) >= ROUND_EVERY_NS)
            {
                state.last_round_ns = now.max(1);
                due.push(state.plan_round(vm.pid, &vm.memory.guest_ranges));
            }
        }
        due
    }
}

/// Whether `vm` keeps the heat it has for now: a move of its memory runs (module
/// doc). Not a VM with guest cells: one cell's move does not hold the others',
/// which may be planned on this heat meanwhile.
fn held(vm: &Vm, moving: impl Fn(u32) -> bool) -> bool {
    vm.cells.len() < 2 && moving(vm.pid)
}

impl VmState {
    /// The regions of this VM's next round: up to [`MAX_REGIONS_PER_ROUND`] from the
    /// cursor on, wrapping around.
    fn plan_round(&mut self, pid: u32, ranges: &[(u64, u64)]) -> RoundVm {
        let all: Vec<(u64, u64)> = regions_of(ranges).collect();
        let from = all.partition_point(|r| r.0 < self.cursor) % all.len().max(1);
        let take = all.len().min(MAX_REGIONS_PER_ROUND);
        let regions: Vec<Probe> = all
            .iter()
            .cycle()
            .skip(from)
            .take(take)
            .map(|&(first, end)| Probe {
                first,
                end,
                huge: self.huge.contains(&first),
                heat: None,
            })
            .collect();
        self.cursor = all.get((from + take) % all.len().max(1)).map_or(0, |r| r.0);
        RoundVm {
            pid,
            regions,
            first_pass: None,
            huge_now: Vec::new(),
            seen_at_first_pass: 0,
            denied: None,
        }
    }

    /// The 16 hottest regions, as `MiB-from-the-first-region:heat`, for logs.
    fn describe(&self) -> String {
        let base = self.heat.keys().next().copied().unwrap_or(0);
        let mut by_heat: Vec<(&u64, &f64)> = self.heat.iter().collect();
        by_heat.sort_by(|a, b| b.1.total_cmp(a.1));
        let parts: Vec<String> = by_heat
            .iter()
            .take(16)
            .map(|(a, h)| format!("{}:{:.0}", (**a - base) >> 20, h))
            .collect();
        parts.join(" ")
    }

    /// Folds a finished round in: the regions' averaged heat and which are huge. The
    /// first round that resolves replaces the heat of earlier rounds that did not
    /// (module doc).
    fn learn(&mut self, round: &RoundVm) {
        let heat: Vec<(u64, f64)> = round
            .regions
            .iter()
            .map(|p| (p.first, p.heat.unwrap_or(0.0)))
            .collect();
        if !self.resolved && round.resolves() {
            self.heat.clear();
            self.resolved = true;
        }
        blend(&mut self.heat, &heat);
        for &(first, huge) in &round.huge_now {
            if huge {
                self.huge.insert(first);
            } else {
                self.huge.remove(&first);
            }
        }
    }
}

impl RoundVm {
    /// Whether the round told hot from warm: its first telling pass found at most
    /// half of the regions it read written.
    fn resolves(&self) -> bool {
        self.seen_at_first_pass > 0 && self.seen_at_first_pass * 2 <= self.regions.len()
    }
}

/// One region in a round.
#[derive(Debug)]
struct Probe {
    first: u64,
    end: u64,
    /// Backed by one huge page (last round): one pagemap entry stands for all.
    huge: bool,
    /// Written pages weighted by [`earliness`], once seen (0 if it cannot be read).
    heat: Option<f64>,
}

/// One VM's part of a round.
#[derive(Debug)]
struct RoundVm {
    pid: u32,
    regions: Vec<Probe>,
    /// The first pass that saw any of its regions written.
    first_pass: Option<usize>,
    /// Huge-page backing found after the passes, per region.
    huge_now: Vec<(u64, bool)>,
    /// Regions first seen written by its first pass that saw any.
    seen_at_first_pass: usize,
    /// The kernel refused to show or clear its bits: which file, and its error.
    denied: Option<String>,
}

/// Why a VM's bits could not be read or cleared when the kernel refused the daemon
/// (`None` for a VM that exited, which is no news). `/proc/PID/pagemap` (0400) and
/// `/proc/PID/clear_refs` (0200) belong to the qemu process's user, `libvirt-qemu`
/// under libvirt: root opens them only with `CAP_DAC_OVERRIDE`.
fn denial(file: &str, e: &std::io::Error) -> Option<String> {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)).then(|| format!("{file}: {e}"))
}

/// Says once why resident memory has no write heat.
fn log_unsupported() {
    tracing::info!("soft-dirty bits unsupported by this kernel: no write heat for resident memory");
}

/// Clearing was refused as unsupported: the kernel has no soft-dirty tracking.
#[derive(Debug)]
struct Unsupported;

/// Clears the bits of each VM, then reads its regions in passes ([`PASS_GAPS_US`])
/// and gives each region its written pages at the first pass that sees any,
/// weighted by how many passes after the VM's first written region that was
/// ([`earliness`]). A VM that cannot be cleared or read (it exited) is skipped
/// quietly. The passes run at the daemon's normal priority: under real-time
/// priority the lab guest's RCU grace-period thread starved while memory moved.
///
/// Each VM's round (clear, passes, huge-page check) runs on its own, on up to
/// [`MAX_ROUND_THREADS`] threads (half the CPUs the daemon may use). Two reasons:
/// - a VM's first pass must come right after *its* clear. Clearing every VM first
///   and then reading them all gave the first VM cleared the time of every other
///   clear (70-400 ms for 8 VMs of 384 MiB under emulation) to write, so its first
///   pass found nearly every region written and told hot from warm by nothing;
/// - the walks are per process, independent, and the tick waits for the slowest of
///   them rather than for their sum.
fn sample_round(proc_root: &Path, mut vms: Vec<RoundVm>) -> Result<Vec<RoundVm>, Unsupported> {
    let round_start = Instant::now();
    let kpageflags = File::open(proc_root.join("kpageflags")).ok();
    let threads = round_threads(vms.len());
    let stats = on_threads(&mut vms, |vm| {
        let mut stats = RoundStats::default();
        sample_vm(proc_root, kpageflags.as_ref(), vm, &mut stats).map(|()| stats)
    });
    let mut total = RoundStats::default();
    for s in stats {
        total.add(&s?);
    }
    tracing::debug!(
        vms = vms.len(),
        threads,
        huge = total.huge,
        seen_per_pass = ?total.seen_per_pass,
        clear_ms = total.clear_us / 1000,
        passes_ms = total.passes_us / 1000,
        huge_check_ms = total.huge_check_us / 1000,
        round_ms = round_start.elapsed().as_millis(),
        "write heat round"
    );
    Ok(vms)
}

/// Most threads one round uses.
pub const MAX_ROUND_THREADS: usize = 8;

/// Threads for `vms` VMs' rounds: half the CPUs the daemon may use, at most
/// [`MAX_ROUND_THREADS`], at most one per VM.
fn round_threads(vms: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| (n.get() / 2).max(1))
        .min(MAX_ROUND_THREADS)
        .min(vms)
        .max(1)
}

/// `f` on every item, the items split in [`round_threads`] contiguous chunks, one
/// scoped thread each (none for a single chunk); results in the items' order.
/// Written here rather than with a thread-pool crate: two call sites, both per VM
/// and short, and the threads must inherit the loop's priority when they start.
fn on_threads<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut T) -> R + Sync) -> Vec<R> {
    let per_thread = items.len().div_ceil(round_threads(items.len())).max(1);
    if items.len() <= per_thread {
        return items.iter_mut().map(&f).collect();
    }
    std::thread::scope(|scope| {
        let f = &f;
        let workers: Vec<_> = items
            .chunks_mut(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter_mut().map(f).collect::<Vec<R>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// What a round did, summed over its VMs, for the debug line.
#[derive(Debug, Default)]
struct RoundStats {
    /// Regions first seen written at each pass.
    seen_per_pass: [usize; PASS_GAPS_US.len()],
    huge: usize,
    clear_us: u128,
    passes_us: u128,
    huge_check_us: u128,
}

impl RoundStats {
    fn add(&mut self, o: &RoundStats) {
        for (a, b) in self.seen_per_pass.iter_mut().zip(o.seen_per_pass) {
            *a += b;
        }
        self.huge += o.huge;
        self.clear_us += o.clear_us;
        self.passes_us += o.passes_us;
        self.huge_check_us += o.huge_check_us;
    }
}

/// One VM's round: clear its bits, read its regions in passes, tell which are
/// huge (see [`sample_round`]).
fn sample_vm(
    proc_root: &Path,
    kpageflags: Option<&File>,
    vm: &mut RoundVm,
    stats: &mut RoundStats,
) -> Result<(), Unsupported> {
    let clear_start = Instant::now();
    let pagemap = match File::open(proc_root.join(format!("{}/pagemap", vm.pid))) {
        Ok(f) => f,
        Err(e) => {
            vm.denied = denial("pagemap", &e);
            return Ok(());
        }
    };
    match std::fs::write(proc_root.join(format!("{}/clear_refs", vm.pid)), "4") {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(Unsupported),
        Err(e) => {
            vm.denied = denial("clear_refs", &e);
            return Ok(());
        }
    }
    let passes_start = Instant::now();
    stats.clear_us += (passes_start - clear_start).as_micros();
    let mut buf = vec![0u8; (PAGES_PER_REGION * 8) as usize];
    for (pass, gap_us) in PASS_GAPS_US.into_iter().enumerate() {
        if vm.regions.iter().all(|p| p.heat.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_micros(gap_us));
        for probe in vm.regions.iter_mut().filter(|p| p.heat.is_none()) {
            let end = if probe.huge {
                probe.first + PAGE_BYTES
            } else {
                probe.end
            };
            match written_pages(&pagemap, probe.first, end, &mut buf) {
                // The VM exited or unmapped the range: nothing more to learn.
                Err(_) => probe.heat = Some(0.0),
                Ok(0) => {}
                Ok(written) => {
                    let pages = if probe.huge {
                        PAGES_PER_REGION
                    } else {
                        written as u64
                    };
                    let first_pass = *vm.first_pass.get_or_insert(pass);
                    if pass == first_pass {
                        vm.seen_at_first_pass += 1;
                    }
                    probe.heat = Some(pages as f64 * earliness(pass - first_pass));
                    stats.seen_per_pass[pass] += 1;
                }
            }
        }
    }
    let huge_start = Instant::now();
    stats.passes_us += (huge_start - passes_start).as_micros();
    vm.huge_now = vm
        .regions
        .iter()
        .map(|p| (p.first, is_huge(&pagemap, kpageflags, p.first, p.end)))
        .collect();
    stats.huge += vm.huge_now.iter().filter(|h| h.1).count();
    stats.huge_check_us += huge_start.elapsed().as_micros();
    Ok(())
}

/// Folds one round into the averaged heat: a region new to the map takes the
/// round's value, a known one moves [`ROUND_WEIGHT`] of the way to it, regions not
/// in the round keep theirs, and regions that cooled below [`MIN_HEAT`] are dropped.
fn blend(heat: &mut BTreeMap<u64, f64>, round: &[(u64, f64)]) {
    for &(addr, now) in round {
        match heat.get_mut(&addr) {
            Some(h) => *h += ROUND_WEIGHT * (now - *h),
            None => {
                heat.insert(addr, now);
            }
        }
    }
    heat.retain(|_, h| *h >= MIN_HEAT);
}

/// The 2 MiB-aligned pieces of `ranges`, as (first byte, end byte).
fn regions_of(ranges: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges.iter().flat_map(|&(start, len)| {
        let end = start.saturating_add(len);
        let first_region = start / REGION_BYTES * REGION_BYTES;
        (first_region..end)
            .step_by(REGION_BYTES as usize)
            .map(move |r| (r.max(start), (r + REGION_BYTES).min(end)))
    })
}

/// Pages of `[first, end)` with the soft-dirty bit set. `buf` holds a region's entries.
fn written_pages(pagemap: &File, first: u64, end: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let pages = ((end - first) / PAGE_BYTES) as usize;
    let bytes = &mut buf[..pages * 8];
    pagemap.read_exact_at(bytes, first / PAGE_BYTES * 8)?;
    Ok(bytes
        .chunks_exact(8)
        .filter(|e| entry(e) & SOFT_DIRTY_BIT != 0)
        .count())
}

/// Whether the region `[first, end)` is one transparent huge page: a full aligned
/// region whose first page is the head of a THP (`/proc/kpageflags`) and whose last
/// page is 511 frames on. Without frame numbers or kpageflags (no CAP_SYS_ADMIN) a
/// region is never taken as huge, and passes read all its entries (slower, same
/// result). A huge page mapped by page table entries (after a partial unmap) would
/// pass this test with only its first page's bit read; VMs rarely have those.
fn is_huge(pagemap: &File, kpageflags: Option<&File>, first: u64, end: u64) -> bool {
    const KPF_COMPOUND_HEAD: u64 = 1 << 15;
    const KPF_THP: u64 = 1 << 22;
    if !first.is_multiple_of(REGION_BYTES) || end - first != REGION_BYTES {
        return false;
    }
    let Some(kpageflags) = kpageflags else {
        return false;
    };
    let mut e = [0u8; 8];
    let mut frame = |addr: u64| {
        pagemap.read_exact_at(&mut e, addr / PAGE_BYTES * 8).ok()?;
        let v = entry(&e);
        (v & PRESENT_BIT != 0 && v & PFN_MASK != 0).then_some(v & PFN_MASK)
    };
    let (Some(head), Some(last)) = (frame(first), frame(end - PAGE_BYTES)) else {
        return false;
    };
    let mut flags = [0u8; 8];
    last == head + PAGES_PER_REGION - 1
        && kpageflags.read_exact_at(&mut flags, head * 8).is_ok()
        && entry(&flags) & (KPF_THP | KPF_COMPOUND_HEAD) == KPF_THP | KPF_COMPOUND_HEAD
}

/// Weight of a region first seen `passes_late` passes after the VM's first region:
/// halved per pass. The pass schedule is geometric, so on a host where the VM runs
/// steadily this tracks 1/delay; where the VM's CPU is taken away for whole
/// milliseconds (an overloaded or emulated host) wall-clock delays mean little, but
/// which regions were written first still does.
fn earliness(passes_late: usize) -> f64 {
    0.5f64.powi(passes_late as i32)
}

/// One little-endian pagemap entry.
fn entry(e: &[u8]) -> u64 {
    u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])
}

/// Whether the running kernel tracks soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`): a
/// kernel without it accepts the clear but never sets the bit. Tried on a page of
/// this process.
pub fn soft_dirty_works() -> bool {
    let mut page = vec![0u8; 2 * PAGE_BYTES as usize];
    let addr = (page.as_ptr() as u64).div_ceil(PAGE_BYTES) * PAGE_BYTES;
    let off = (addr - page.as_ptr() as u64) as usize;
    page[off] = 1;
    if std::fs::write("/proc/self/clear_refs", "4").is_err() {
        return false;
    }
    // SAFETY: `off` is inside `page`; volatile so the write after the clear happens.
    unsafe { std::ptr::write_volatile(page.as_mut_ptr().add(off), 2) };
    let Ok(file) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut e = [0u8; 8];
    let ok = file.read_exact_at(&mut e, addr / PAGE_BYTES * 8).is_ok()
        && entry(&e) & SOFT_DIRTY_BIT != 0;
    std::hint::black_box(&page);
    ok
}

/// Whether `vm` is sampled: guest RAM located, not on hugetlbfs (module doc), and
/// more than `min_remote_share` of its memory off its vCPUs' nodes.
fn wants_round(vm: &Vm, topology: &crate::model::Topology, min_remote_share: f64) -> bool {
    !vm.memory.guest_ranges.is_empty()
        && !matches!(vm.memory.backing, MemoryBacking::HugeTlb { .. })
        && remote_share(vm, topology) > min_remote_share
}

/// Share of the VM's guest RAM not on the nodes its vCPUs last ran on.
fn remote_share(vm: &Vm, topology: &crate::model::Topology) -> f64 {
    let total: u64 = vm.memory.bytes_per_node.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mut local = vec![false; vm.memory.bytes_per_node.len()];
    for v in &vm.vcpus {
        if let Some(i) = v
            .last_cpu
            .and_then(|c| topology.node_of_cpu(c))
            .and_then(|n| topology.node_index(n))
            && let Some(l) = local.get_mut(i)
        {
            *l = true;
        }
    }
    let near: u64 = vm
        .memory
        .bytes_per_node
        .iter()
        .zip(&local)
        .filter(|(_, l)| **l)
        .map(|(b, _)| *b)
        .sum();
    1.0 - near as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A finished round of four regions with the given heat, `first` of them seen by
    /// the first pass that saw any.
    fn round_of(heat: [f64; 4], first: usize) -> RoundVm {
        RoundVm {
            pid: 1,
            regions: (0..4u64)
                .map(|i| Probe {
                    first: i * REGION_BYTES,
                    end: (i + 1) * REGION_BYTES,
                    huge: true,
                    heat: Some(heat[i as usize]),
                })
                .collect(),
            first_pass: Some(0),
            huge_now: Vec::new(),
            seen_at_first_pass: first,
            denied: None,
        }
    }

    #[test]
    fn the_first_round_that_resolves_replaces_rounds_that_did_not() {
        let flat = round_of([512.0; 4], 4);
        let told = round_of([512.0, 0.0, 0.0, 64.0], 1);
        assert!(!flat.resolves() && told.resolves());
        let mut state = VmState::default();
        state.learn(&flat);
        state.learn(&told);
        let h = |a: u64| state.heat.get(&(a * REGION_BYTES)).copied().unwrap_or(0.0);
        assert_eq!((h(0), h(1), h(3)), (512.0, 0.0, 64.0), "{:?}", state.heat);
        // From then on rounds are averaged, resolving or not.
        state.learn(&flat);
        let h = |a: u64| state.heat.get(&(a * REGION_BYTES)).copied().unwrap_or(0.0);
        assert_eq!(
            h(3),
            64.0 + ROUND_WEIGHT * (512.0 - 64.0),
            "{:?}",
            state.heat
        );
    }

    #[test]
    fn a_vm_writing_all_its_memory_stays_hot_everywhere() {
        let mut state = VmState::default();
        for _ in 0..3 {
            state.learn(&round_of([512.0; 4], 4));
        }
        assert!(state.heat.values().all(|&h| h == 512.0), "{:?}", state.heat);
        assert!(!state.resolved);
    }

    #[test]
    fn a_refused_file_is_named_and_a_vanished_vm_is_not() {
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        let why = denial("clear_refs", &denied).expect("a refusal is reported");
        assert!(why.starts_with("clear_refs: "), "{why}");
        let gone = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(denial("pagemap", &gone), None);
        let exited = std::io::Error::from_raw_os_error(libc::ESRCH);
        assert_eq!(denial("clear_refs", &exited), None);
    }

    #[test]
    fn remote_guest_ram_is_sampled_unless_on_hugetlbfs() {
        let t = crate::model::Topology::uniform(2, 2, 4 << 30);
        let mut vm = Vm::default();
        vm.vcpus.push(crate::model::Vcpu {
            last_cpu: Some(2),
            ..Default::default()
        });
        vm.memory.bytes_per_node = vec![1 << 30, 0];
        vm.memory.guest_ranges = vec![(1 << 40, 1 << 30)];
        assert!(wants_round(&vm, &t, 0.1));
        vm.memory.backing = MemoryBacking::HugeTlb {
            page_size_bytes: 1 << 30,
        };
        assert!(!wants_round(&vm, &t, 0.1), "hugetlbfs: no soft-dirty bits");
        vm.memory.backing = MemoryBacking::default();
        vm.memory.bytes_per_node = vec![0, 1 << 30];
        assert!(!wants_round(&vm, &t, 0.1), "local");
    }

    #[test]
    fn a_vm_whose_memory_moves_keeps_its_heat_until_the_move_ends() {
        let topology = crate::model::Topology::uniform(2, 2, 4 << 30);
        let mut vm = Vm {
            pid: 7,
            ..Default::default()
        };
        vm.vcpus.push(crate::model::Vcpu {
            last_cpu: Some(2),
            ..Default::default()
        });
        vm.memory.bytes_per_node = vec![1 << 30, 0];
        vm.memory.guest_ranges = vec![(1 << 40, 1 << 30)];
        let mut heat = WriteHeat {
            proc_root: PathBuf::from("/proc"),
            min_remote_share: 0.1,
            vms: BTreeMap::new(),
            unsupported: false,
        };
        let at = |vm: &Vm, now_ns: u64| Snapshot {
            now_ns,
            topology: topology.clone(),
            vms: vec![vm.clone()],
            ..Default::default()
        };
        let (s, every) = (1_000_000_000, ROUND_EVERY_NS);
        let moving = |_| true;
        let still = |_| false;
        // Its first round runs even while a move runs (it has no heat at all).
        assert_eq!(heat.due_rounds(&at(&vm, s), moving).len(), 1);
        assert!(heat.due_rounds(&at(&vm, s + every), moving).is_empty());
        assert!(heat.due_rounds(&at(&vm, s + 5 * every), moving).is_empty());
        assert_eq!(heat.vms.len(), 1, "its heat is kept meanwhile");
        // The move ended: a round at once, then the usual interval.
        assert_eq!(heat.due_rounds(&at(&vm, s + 5 * every), still).len(), 1);
        assert!(
            heat.due_rounds(&at(&vm, s + 5 * every + 1), still)
                .is_empty()
        );
        // A VM with cells: another cell may move next, on this heat.
        vm.cells = vec![Default::default(), Default::default()];
        assert_eq!(heat.due_rounds(&at(&vm, s + 7 * every), moving).len(), 1);
    }

    #[test]
    fn ranges_split_at_region_boundaries() {
        let r = REGION_BYTES;
        let got: Vec<_> = regions_of(&[(r - 8192, r + 8192), (5 * r, r)]).collect();
        assert_eq!(got, vec![(r - 8192, r), (r, 2 * r), (5 * r, 6 * r)]);
    }

    #[test]
    fn rounds_average_and_cold_regions_fade() {
        let mut heat = BTreeMap::new();
        blend(&mut heat, &[(0, 100.0), (1, 10.0), (3, 0.0)]);
        assert_eq!(heat.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        blend(&mut heat, &[(0, 100.0), (1, 0.0), (2, 50.0)]);
        assert_eq!(heat[&0], 100.0);
        assert!((heat[&1] - 7.0).abs() < 1e-9, "{heat:?}");
        assert_eq!(heat[&2], 50.0);
        // Regions left out of a round (not sampled) keep their heat.
        blend(&mut heat, &[(0, 100.0)]);
        assert_eq!(heat[&2], 50.0);
        for _ in 0..40 {
            blend(&mut heat, &[(0, 100.0), (1, 0.0), (2, 0.0)]);
        }
        assert_eq!(heat.keys().copied().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn big_vms_are_sampled_a_slice_per_round_wrapping_around() {
        let r = REGION_BYTES;
        let regions = MAX_REGIONS_PER_ROUND as u64 + MAX_REGIONS_PER_ROUND as u64 / 2;
        let ranges = [(0, regions * r)];
        let mut state = VmState::default();
        state.huge.insert(r);
        let first = state.plan_round(1, &ranges);
        assert_eq!(first.regions.len(), MAX_REGIONS_PER_ROUND);
        assert_eq!(first.regions[0].first, 0);
        assert!(first.regions[1].huge && !first.regions[0].huge);
        let second = state.plan_round(1, &ranges);
        assert_eq!(second.regions[0].first, MAX_REGIONS_PER_ROUND as u64 * r);
        // The second round wraps and goes on from the start.
        assert_eq!(
            second.regions.last().unwrap().first,
            (MAX_REGIONS_PER_ROUND as u64 / 2 - 1) * r
        );
        let third = state.plan_round(1, &ranges);
        assert_eq!(
            third.regions[0].first,
            (MAX_REGIONS_PER_ROUND as u64 / 2) * r
        );
        // A small VM is sampled whole every round.
        let mut small = VmState::default();
        for _ in 0..3 {
            assert_eq!(small.plan_round(2, &[(0, 3 * r)]).regions.len(), 3);
        }
    }

    /// On a kernel with soft-dirty bits: a region written all the time by another
    /// thread gets more heat than one written every 20 ms, and an untouched one none.
    #[test]
    #[ignore = "needs a kernel with soft-dirty bits (CONFIG_MEM_SOFT_DIRTY), as CI has"]
    fn a_constantly_written_region_is_hotter_than_a_rarely_written_one() {
        assert!(
            soft_dirty_works(),
            "this test needs soft-dirty bits, which this kernel does not set"
        );
        let len = 4 * REGION_BYTES as usize;
        let buf = vec![1u8; len];
        let base = (buf.as_ptr() as u64).div_ceil(REGION_BYTES) * REGION_BYTES;
        let (hot, warm, cold) = (base, base + REGION_BYTES, base + 2 * REGION_BYTES);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut last_warm = Instant::now();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 4096) % REGION_BYTES;
                    // SAFETY: both addresses lie in `buf`, which outlives this thread
                    // (joined below); volatile so each write really happens.
                    unsafe { std::ptr::write_volatile((hot + i) as *mut u8, 2) };
                    if last_warm.elapsed() >= Duration::from_millis(20) {
                        unsafe { std::ptr::write_volatile((warm + i) as *mut u8, 2) };
                        last_warm = Instant::now();
                    }
                }
            })
        };
        let me = std::process::id();
        let ranges = [(base, 3 * REGION_BYTES)];
        let mut state = VmState::default();
        for _ in 0..5 {
            let round = sample_round(Path::new("/proc"), vec![state.plan_round(me, &ranges)]);
            state.learn(&round.unwrap()[0]);
        }
        let heat = state.heat;
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let h = |a| heat.get(&a).copied().unwrap_or(0.0);
        assert!(h(hot) > 2.0 * h(warm), "{heat:?}");
        assert_eq!(h(cold), 0.0, "{heat:?}");
        std::hint::black_box(&buf);
    }
}
