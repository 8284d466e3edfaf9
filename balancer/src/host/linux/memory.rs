//! Guest memory per node for each VM, exact but at a bounded cost.
//!
//! The exact figure comes from `numa_maps`, whose read walks the page tables of the
//! whole process under its mmap lock: for a big guest that is milliseconds during which
//! the guest's own page faults wait (`tests/results/numa-maps-cost.md` has the
//! measured cost). So each VM is read at most every [`MemoryPolicy::min_interval_ns`],
//! and VMs of [`MemoryPolicy::big_vm_bytes`] or more at most every
//! [`MemoryPolicy::big_vm_min_interval_ns`]. In between, the last reading is kept and
//! adjusted by the balancer's own page migrations ([`MemoryTracker::note_migration`]),
//! which are the only large changes a guest's placement sees once it is populated.
//!
//! Nor is a VM whose placement stays as it was read again at that rate: each read
//! that finds the same bytes per node as the one before doubles the VM's interval, up
//! to [`MAX_STALE_NS`], so the work of a tick does not grow with guest memory while
//! nothing changes (tests/results/scale-cost.md). What can change a placement resets
//! the interval ([`MemoryTracker::note_may_have_changed`]):
//! - pages allocated or freed: the VM's resident size moved (the observer reads it
//!   every tick anyway);
//! - pages migrated by anyone (automatic NUMA balancing, numad, an operator's
//!   `migratepages`): a [`Probe`] of [`PROBE_PAGES`] pages spread over guest RAM is
//!   asked for its nodes every tick (one `move_pages` query, microseconds) and any
//!   page found elsewhere than at the read means a new read. The host-wide
//!   `pgmigrate_success` counter cannot serve: compaction moves pages within a node
//!   all the time on a busy host and would keep every VM "changed". A migration that
//!   misses all probe pages is small (a share `f` of guest RAM escapes 64 pages with
//!   probability `(1-f)^64`: 4 % for 5 %, per tick) and the next read at most
//!   [`MAX_STALE_NS`] later sees it;
//! - the balancer's own moves, and a VM whose memory is away from its vCPUs (below
//!   the locality target: the engine is working on it), which the observer keeps at
//!   the base interval so a move is never planned on a reading kept from before it.
//!
//! While a move of the balancer's own runs on a VM, its reading is not renewed
//! ([`MemoryTracker::note_move_started`]): the engine plans nothing new for a VM
//! until its move's outcome comes, the outcome adjusts the reading, and marks it
//! stale so the first tick after the move reads it again. A read during the move
//! walks the page tables the mover is rewriting, under the same mmap lock, and
//! shows a half-done move that nobody acts on; in the lab's `scattered` case those
//! reads took about half of each tick while 8 VMs moved. A move whose outcome never
//! came (it cannot happen, but a reading must never freeze) holds the reading for
//! at most [`MOVE_HOLD_MAX_NS`]. Its probe is not asked either (same reason, and
//! the query would wait: a write fault on a page being copied waits holding the VM's
//! mmap lock for reading, a writer of that lock queues behind it, and the query's
//! read lock behind the writer; in the lab (`hugetlb-1g`) a 1 GiB hugetlb page took
//! 20 s to copy under emulation and held every tick that long). The read after the
//! move renews the probe.
//!
//! Only guest RAM counts as the VM's memory: the mappings that back `-m` (the largest
//! anonymous, memfd, hugetlb or `mem-path` file mappings whose sizes add up to the
//! configured size). Everything else (qemu's heap, thread stacks, libraries, video RAM,
//! ROMs) is reported as overhead.

use std::collections::{BTreeMap, HashMap};

use super::numa_maps::{MappingKind, MapsEntry, MapsError, NumaMapping};
use crate::model::{MemoryBacking, NodeId};

/// How often numa_maps may be read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MemoryPolicy {
    /// Minimum time between two reads of one VM.
    pub min_interval_ns: u64,
    /// VMs with at least this much configured RAM are "big".
    pub big_vm_bytes: u64,
    /// Minimum time between two reads of one big VM.
    pub big_vm_min_interval_ns: u64,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        Self {
            min_interval_ns: 1_000_000_000,
            big_vm_bytes: 16 << 30,
            big_vm_min_interval_ns: 30_000_000_000,
        }
    }
}

/// The longest a VM's reading is kept while nothing says it may have changed.
pub const MAX_STALE_NS: u64 = 60_000_000_000;
/// The longest a VM's reading is held while a move of it runs (module doc).
pub const MOVE_HOLD_MAX_NS: u64 = 30_000_000_000;

/// Guest RAM whose numa_maps one tick reads only because a kept reading's interval
/// ran out (nothing said the placement changed). Such reads of VMs started together
/// come due together: at 200 VMs, four 1 GiB VMs read on one tick made it 160 ms
/// (tests/results/scale-cost.md), at about 35 ms per GiB. Beyond the budget a read
/// waits for the next tick; the first read of a tick is always done, so a VM larger
/// than the budget is read alone. Reads asked for by a change are never held back.
pub const ROUTINE_READ_BUDGET_BYTES: u64 = 1 << 30;

/// What the routine reads of one tick have used of [`ROUTINE_READ_BUDGET_BYTES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadBudget {
    reads: u32,
    bytes: u64,
}

/// Readings that differ by at most this share of the VM's memory (or
/// [`SAME_FLOOR_BYTES`]) count as the same placement.
const SAME_SHARE: f64 = 0.005;
const SAME_FLOOR_BYTES: u64 = 2 << 20;

/// The result of one numa_maps read of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReading {
    /// Guest RAM resident per node.
    pub guest_bytes_per_node: BTreeMap<NodeId, u64>,
    /// Everything else the process has resident, per node.
    pub overhead_bytes_per_node: BTreeMap<NodeId, u64>,
    /// The anonymous part of the overhead (heap, stacks, anonymous mappings), per node.
    pub own_overhead_bytes_per_node: BTreeMap<NodeId, u64>,
    /// Guest RAM mappings as (start address, length), in address order.
    pub guest_ranges: Vec<(u64, u64)>,
    /// Resident bytes per node of each mapping of `guest_ranges` (same order): one
    /// per memory backend, so per guest NUMA cell when the VM has cells.
    pub guest_range_bytes: Vec<BTreeMap<NodeId, u64>>,
    /// Backing as seen in numa_maps (hugetlb page size is exact here).
    pub observed_backing: Option<MemoryBacking>,
}

/// Mappings smaller than this are never guest RAM.
const MIN_RAM_MAPPING_BYTES: u64 = 1 << 20;

fn is_ram_candidate(m: &NumaMapping, mem_paths: &[String]) -> bool {
    match &m.kind {
        MappingKind::Anon => true,
        MappingKind::Heap | MappingKind::Stack => false,
        MappingKind::File(f) => {
            m.huge
                || m.is_memfd()
                || mem_paths
                    .iter()
                    .any(|p| !p.is_empty() && f.starts_with(p.as_str()))
        }
    }
}

/// Splits a process's mappings into guest RAM and overhead.
///
/// `configured_bytes` is `-m` (0 when unknown: the single largest candidate is taken);
/// `mem_paths` are the `mem-path`s of file backends. Mapping sizes come from `maps`;
/// when `maps` is empty (a capture without it) resident sizes stand in for them.
pub fn select_guest_ram(
    maps: &[MapsEntry],
    numa: &[NumaMapping],
    configured_bytes: u64,
    mem_paths: &[String],
) -> Result<MemoryReading, MapsError> {
    let len_of: HashMap<u64, u64> = if maps.is_empty() {
        numa.iter()
            .map(|m| {
                let resident = m.bytes_per_node().map(|b| b.values().sum()).unwrap_or(0);
                (m.start_addr, resident)
            })
            .collect()
    } else {
        // Guest RAM is always writable; an inaccessible reservation (a malloc arena's
        // 64 MiB, a guard region) is never guest RAM, however close its size.
        maps.iter()
            .filter(|e| e.is_writable())
            .map(|e| (e.start_addr, e.len_bytes()))
            .collect()
    };
    let mut candidates: Vec<(usize, u64)> = numa
        .iter()
        .enumerate()
        .filter(|(_, m)| is_ram_candidate(m, mem_paths))
        .filter_map(|(i, m)| Some((i, *len_of.get(&m.start_addr)?)))
        .filter(|&(_, len)| len >= MIN_RAM_MAPPING_BYTES)
        .collect();
    // Largest first; ties by address for a stable choice.
    candidates.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(numa[a.0].start_addr.cmp(&numa[b.0].start_addr))
    });
    let tolerance = (configured_bytes / 32).max(2 << 20);
    let mut chosen = Vec::new();
    let mut sum = 0u64;
    for (i, len) in candidates {
        if configured_bytes == 0 {
            chosen.push(i);
            break;
        }
        if sum.saturating_add(len) <= configured_bytes.saturating_add(tolerance) {
            chosen.push(i);
            sum = sum.saturating_add(len);
        }
        if sum.saturating_add(tolerance) >= configured_bytes {
            break;
        }
    }
    let mut reading = MemoryReading::default();
    let mut ranges = Vec::new();
    for (i, m) in numa.iter().enumerate() {
        let bytes = m.bytes_per_node()?;
        let guest = chosen.contains(&i);
        if guest {
            ranges.push((
                (
                    m.start_addr,
                    len_of.get(&m.start_addr).copied().unwrap_or(0),
                ),
                bytes.clone(),
            ));
        }
        let target = if guest {
            &mut reading.guest_bytes_per_node
        } else {
            &mut reading.overhead_bytes_per_node
        };
        let own = !guest && !matches!(m.kind, MappingKind::File(_));
        for (n, b) in bytes {
            let e = target.entry(n).or_default();
            *e = e.saturating_add(b);
            if own {
                let e = reading.own_overhead_bytes_per_node.entry(n).or_default();
                *e = e.saturating_add(b);
            }
        }
        if guest {
            let seen = if m.huge {
                MemoryBacking::HugeTlb {
                    page_size_bytes: m.page_size_bytes,
                }
            } else if m.is_memfd() {
                MemoryBacking::Memfd
            } else if matches!(m.kind, MappingKind::File(_)) {
                MemoryBacking::File
            } else {
                MemoryBacking::Anonymous
            };
            reading.observed_backing.get_or_insert(seen);
        }
    }
    ranges.sort_by_key(|&(range, _)| range);
    (reading.guest_ranges, reading.guest_range_bytes) = ranges.into_iter().unzip();
    Ok(reading)
}

/// Which guest RAM mapping backs each guest NUMA cell: index into
/// `reading.guest_ranges` per cell, or `None` when that cannot be told for sure.
///
/// Anonymous mappings carry no name in `/proc/PID/maps`, so the backend of a cell
/// is found from what qemu does: it creates its `-object memory-backend-*` in
/// command-line order at start-up, one `mmap` each, and the kernel hands out
/// mappings top-down, so the guest RAM mappings from the highest address down are
/// the backends in command-line order. Every mapping must also be exactly its
/// backend's size; where the sizes all differ they alone decide. Any mismatch
/// (a backend missing, a size that differs, a bottom-up address layout that breaks
/// the size check) leaves every cell unlocated: the engine then splits the VM's
/// memory over its cells in proportion and moves it as a whole, never a wrong
/// cell's pages.
pub fn locate_cells(
    cell_backend_ids: &[String],
    backend_sizes: &[(String, u64)],
    guest_ranges: &[(u64, u64)],
) -> Vec<Option<usize>> {
    let none = vec![None; cell_backend_ids.len()];
    // The cells' backends in creation (command-line) order.
    let ordered: Vec<&(String, u64)> = backend_sizes
        .iter()
        .filter(|(id, _)| cell_backend_ids.contains(id))
        .collect();
    if ordered.len() != cell_backend_ids.len() || ordered.len() != guest_ranges.len() {
        return none;
    }
    let sizes_distinct = {
        let mut s: Vec<u64> = ordered.iter().map(|(_, b)| *b).collect();
        s.sort_unstable();
        s.windows(2).all(|w| w[0] != w[1])
    };
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    if sizes_distinct {
        for (id, size) in &ordered {
            match guest_ranges.iter().position(|&(_, len)| len == *size) {
                Some(i) => by_id.insert(id.as_str(), i),
                None => return none,
            };
        }
    } else {
        // Highest address first = first created.
        let mut desc: Vec<usize> = (0..guest_ranges.len()).collect();
        desc.sort_by(|&a, &b| guest_ranges[b].0.cmp(&guest_ranges[a].0));
        for ((id, size), i) in ordered.iter().zip(desc) {
            if guest_ranges[i].1 != *size {
                return none;
            }
            by_id.insert(id.as_str(), i);
        }
    }
    cell_backend_ids
        .iter()
        .map(|id| by_id.get(id.as_str()).copied())
        .collect()
}

/// Moves up to `bytes` of `map` from node `from` to node `to`, never more than `from`
/// holds; returns the bytes moved.
fn shift(map: &mut BTreeMap<NodeId, u64>, from: NodeId, to: NodeId, bytes: u64) -> u64 {
    let have = map.get(&from).copied().unwrap_or(0);
    let moved = bytes.min(have);
    map.insert(from, have - moved);
    *map.entry(to).or_default() += moved;
    moved
}

/// The last reading of one VM and how fresh it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackedMemory {
    pub reading: MemoryReading,
    /// When numa_maps was last read (observer clock).
    pub read_at_ns: u64,
    /// Bytes moved by migrations noted since that read.
    pub adjusted_bytes: u64,
    /// Reads in a row that found the placement of the read before.
    pub unchanged_reads: u32,
    /// Something may have changed the placement since the read: read again at the
    /// base interval.
    pub stale: bool,
    /// Pages sampled at the read, asked again each tick.
    pub probe: Probe,
    /// The balancer's moves of this VM still running.
    pub moves_running: u32,
}

/// Pages spread evenly over guest RAM for the cheap check of the module doc.
pub const PROBE_PAGES: usize = 64;

/// Addresses of [`PROBE_PAGES`] pages over guest RAM and the node each was on (as
/// `move_pages` reports it: a node, or a negative errno for a page not present).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub addrs: Vec<u64>,
    pub nodes: Vec<i32>,
}

impl Probe {
    /// [`PROBE_PAGES`] page addresses spread evenly over `ranges` (start, length),
    /// each range getting pages in proportion to its length; none for no memory.
    pub fn addresses(ranges: &[(u64, u64)], page_bytes: u64) -> Vec<u64> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if total == 0 || page_bytes == 0 {
            return Vec::new();
        }
        let step = (total / PROBE_PAGES as u64).max(page_bytes);
        let mut out = Vec::with_capacity(PROBE_PAGES);
        // Walk the ranges as one line of `total` bytes, a sample every `step`, in the
        // middle of its step so the first and last pages are not always the ones.
        let mut offset = step / 2;
        let mut base = 0u64;
        for &(start, len) in ranges {
            while offset < base + len && out.len() < PROBE_PAGES {
                let addr = start + (offset - base);
                out.push(addr - addr % page_bytes);
                offset += step;
            }
            base += len;
        }
        out
    }
}

impl TrackedMemory {
    /// How long this reading is kept, from the base interval of the VM's size.
    fn keep_ns(&self, base_ns: u64) -> u64 {
        if self.stale {
            return base_ns;
        }
        base_ns
            .saturating_mul(1u64 << self.unchanged_reads.min(16))
            .min(MAX_STALE_NS.max(base_ns))
    }
}

/// Whether two readings place the same bytes on the same nodes (within
/// [`SAME_SHARE`]).
fn same_placement(a: &MemoryReading, b: &MemoryReading) -> bool {
    let diff = |x: &BTreeMap<NodeId, u64>, y: &BTreeMap<NodeId, u64>| -> u64 {
        x.keys()
            .chain(y.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|n| {
                let (p, q) = (
                    x.get(n).copied().unwrap_or(0),
                    y.get(n).copied().unwrap_or(0),
                );
                p.abs_diff(q)
            })
            .sum()
    };
    let total: u64 = a.guest_bytes_per_node.values().sum::<u64>()
        + a.overhead_bytes_per_node.values().sum::<u64>();
    let slack = ((total as f64 * SAME_SHARE) as u64).max(SAME_FLOOR_BYTES);
    a.guest_ranges == b.guest_ranges
        && diff(&a.guest_bytes_per_node, &b.guest_bytes_per_node)
            + diff(&a.overhead_bytes_per_node, &b.overhead_bytes_per_node)
            <= slack
}

/// Per-VM readings with the rate limit.
#[derive(Debug, Default)]
pub struct MemoryTracker {
    pub policy: MemoryPolicy,
    vms: HashMap<u32, TrackedMemory>,
    /// numa_maps reads done, and their total wall time (for `trace` and status).
    pub reads: u64,
    pub read_ns_total: u64,
}

impl MemoryTracker {
    pub fn new(policy: MemoryPolicy) -> Self {
        Self {
            policy,
            ..Default::default()
        }
    }

    /// Whether VM `pid` may be read again at `now_ns`.
    pub fn due(&self, pid: u32, configured_bytes: u64, now_ns: u64) -> bool {
        let Some(t) = self.vms.get(&pid) else {
            return true;
        };
        let since_read_ns = now_ns.saturating_sub(t.read_at_ns);
        if t.moves_running > 0 && since_read_ns < MOVE_HOLD_MAX_NS {
            return false;
        }
        let base = if configured_bytes >= self.policy.big_vm_bytes {
            self.policy.big_vm_min_interval_ns
        } else {
            self.policy.min_interval_ns
        };
        since_read_ns >= t.keep_ns(base)
    }

    /// Whether VM `pid` is read now: [`Self::due`], and for a routine read (its
    /// reading not marked stale), within this tick's `budget`
    /// ([`ROUTINE_READ_BUDGET_BYTES`]), which it then uses.
    pub fn due_within(
        &self,
        pid: u32,
        configured_bytes: u64,
        now_ns: u64,
        budget: &mut ReadBudget,
    ) -> bool {
        if !self.due(pid, configured_bytes, now_ns) {
            return false;
        }
        let routine = self.vms.get(&pid).is_some_and(|t| !t.stale);
        if !routine {
            return true;
        }
        let bytes = budget.bytes.saturating_add(configured_bytes);
        if budget.reads > 0 && bytes > ROUTINE_READ_BUDGET_BYTES {
            return false;
        }
        budget.reads += 1;
        budget.bytes = bytes;
        true
    }

    pub fn store(&mut self, pid: u32, reading: MemoryReading, now_ns: u64, read_cost_ns: u64) {
        self.reads += 1;
        self.read_ns_total = self.read_ns_total.saturating_add(read_cost_ns);
        let unchanged_reads = match self.vms.get(&pid) {
            Some(before) if same_placement(&before.reading, &reading) => {
                before.unchanged_reads.saturating_add(1)
            }
            _ => 0,
        };
        let moves_running = self.vms.get(&pid).map_or(0, |t| t.moves_running);
        self.vms.insert(
            pid,
            TrackedMemory {
                reading,
                read_at_ns: now_ns,
                adjusted_bytes: 0,
                unchanged_reads,
                stale: false,
                probe: Probe::default(),
                moves_running,
            },
        );
    }

    /// A move of VM `pid`'s memory by the balancer started: its reading is held
    /// until the move ends (module doc).
    pub fn note_move_started(&mut self, pid: u32) {
        if let Some(t) = self.vms.get_mut(&pid) {
            t.moves_running = t.moves_running.saturating_add(1);
        }
    }

    /// A move of VM `pid`'s memory by the balancer ended, whatever its outcome: the
    /// reading is read again at the base interval once no move of the VM runs.
    pub fn note_move_ended(&mut self, pid: u32) {
        if let Some(t) = self.vms.get_mut(&pid) {
            t.moves_running = t.moves_running.saturating_sub(1);
        }
        self.note_may_have_changed(pid);
    }

    /// Keeps the probe taken right after VM `pid`'s read.
    pub fn set_probe(&mut self, pid: u32, probe: Probe) {
        if let Some(t) = self.vms.get_mut(&pid) {
            t.probe = probe;
        }
    }

    /// Whether a move of VM `pid`'s memory by the balancer runs now.
    pub fn moving(&self, pid: u32) -> bool {
        self.vms.get(&pid).is_some_and(|t| t.moves_running > 0)
    }

    /// The probe's addresses of VM `pid`, to be asked for their nodes now; none
    /// while a move of the balancer's own runs on it (module doc).
    pub fn probe_addrs(&self, pid: u32) -> Option<&[u64]> {
        self.vms
            .get(&pid)
            .filter(|t| t.moves_running == 0)
            .map(|t| t.probe.addrs.as_slice())
            .filter(|a| !a.is_empty())
    }

    /// The probe's pages of VM `pid` are on `nodes` now: any page elsewhere than at
    /// the read means the placement may have changed. Returns whether it did.
    pub fn check_probe(&mut self, pid: u32, nodes: &[i32]) -> bool {
        let changed = self
            .vms
            .get(&pid)
            .is_some_and(|t| t.probe.nodes.as_slice() != nodes);
        if changed {
            self.note_may_have_changed(pid);
        }
        changed
    }

    /// Something may have changed VM `pid`'s placement: its next read comes at the
    /// base interval, and the back-off starts again from there.
    pub fn note_may_have_changed(&mut self, pid: u32) {
        if let Some(t) = self.vms.get_mut(&pid) {
            t.stale = true;
            t.unchanged_reads = 0;
        }
    }

    pub fn get(&self, pid: u32) -> Option<&TrackedMemory> {
        self.vms.get(&pid)
    }

    /// Applies a completed page migration to the cached view: `bytes` of guest RAM went
    /// from node `from` to node `to` (never more than the cache holds on `from`).
    /// With `within` (a cell's move), the mapping holding that range is shifted too.
    pub fn note_migration(
        &mut self,
        pid: u32,
        (from, to): (NodeId, NodeId),
        bytes: u64,
        within: Option<(u64, u64)>,
    ) {
        let Some(t) = self.vms.get_mut(&pid) else {
            return;
        };
        let r = &mut t.reading;
        let bytes = match within.and_then(|w| r.guest_ranges.iter().position(|g| g.0 == w.0)) {
            Some(i) => r
                .guest_range_bytes
                .get_mut(i)
                .map_or(bytes, |m| shift(m, from, to, bytes)),
            None => bytes,
        };
        let moved = shift(&mut t.reading.guest_bytes_per_node, from, to, bytes);
        t.adjusted_bytes = t.adjusted_bytes.saturating_add(moved);
        t.stale = true;
        t.unchanged_reads = 0;
    }

    /// Applies a completed move of the process's own memory (not guest RAM) to the
    /// cached view, like [`MemoryTracker::note_migration`].
    pub fn note_process_migration(&mut self, pid: u32, from: NodeId, to: NodeId, bytes: u64) {
        let Some(t) = self.vms.get_mut(&pid) else {
            return;
        };
        let r = &mut t.reading;
        let moved = shift(&mut r.own_overhead_bytes_per_node, from, to, bytes);
        shift(&mut r.overhead_bytes_per_node, from, to, moved);
        t.adjusted_bytes = t.adjusted_bytes.saturating_add(moved);
        t.stale = true;
        t.unchanged_reads = 0;
    }

    /// Forgets every VM not in `alive`.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.vms.retain(|&pid, _| alive(pid));
    }
}

#[cfg(test)]
mod tests {
    use super::super::numa_maps::{parse_maps, parse_numa_maps};
    use super::*;

    const MAPS: &str = "\
55d0bee1f000-55d0bee21000 r--p 00000000 08:01 100 /usr/bin/qemu-system-x86_64
55d0c0000000-55d0c4000000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0100000000 rw-p 00000000 00:00 0
7f0100000000-7f0100001000 ---p 00000000 00:00 0
7f0200000000-7f0201000000 rw-p 00000000 00:00 0
7f0300000000-7f0300800000 rw-p 00000000 00:00 0
";
    const NUMA: &str = "\
55d0bee1f000 default file=/usr/bin/qemu-system-x86_64 mapped=2 N0=2 kernelpagesize_kB=4
55d0c0000000 default heap anon=1000 dirty=1000 N0=600 N1=400 kernelpagesize_kB=4
7f0000000000 default anon=1048576 dirty=1048576 N0=262144 N1=786432 kernelpagesize_kB=4
7f0100000000 default kernelpagesize_kB=4
7f0200000000 default anon=4096 dirty=4096 N0=4096 kernelpagesize_kB=4
7f0300000000 default anon=10 dirty=10 N1=10 kernelpagesize_kB=4
";

    #[test]
    fn picks_guest_ram_by_size() {
        let maps = parse_maps(MAPS).unwrap();
        let numa = parse_numa_maps(NUMA).unwrap();
        let r = select_guest_ram(&maps, &numa, 4 << 30, &[]).unwrap();
        assert_eq!(r.guest_ranges, vec![(0x7f0000000000, 4 << 30)]);
        assert_eq!(r.guest_bytes_per_node[&0], 1 << 30);
        assert_eq!(r.guest_bytes_per_node[&1], 3 << 30);
        // The 16 MiB video RAM, the heap and stacks are overhead.
        assert_eq!(r.overhead_bytes_per_node[&0], (2 + 600 + 4096) * 4096);
        assert_eq!(r.observed_backing, Some(MemoryBacking::Anonymous));
        // Unknown -m: the largest mapping.
        let r = select_guest_ram(&maps, &numa, 0, &[]).unwrap();
        assert_eq!(r.guest_ranges.len(), 1);
    }

    #[test]
    fn cells_are_located_by_creation_order_and_size() {
        let ids = ["ram-node0".to_string(), "ram-node1".to_string()];
        let sizes = |a: u64, b: u64| {
            vec![
                ("ram-node0".to_string(), a),
                ("pc.rom".to_string(), 1),
                ("ram-node1".to_string(), b),
            ]
        };
        // Equal sizes: top-down, the first backend created is the highest mapping.
        let ranges = [(0x7f00_0000_0000, 512 << 20), (0x7f10_0000_0000, 512 << 20)];
        assert_eq!(
            locate_cells(&ids, &sizes(512 << 20, 512 << 20), &ranges),
            vec![Some(1), Some(0)]
        );
        // Distinct sizes decide alone, whatever the addresses.
        let ranges = [(0x7f00_0000_0000, 256 << 20), (0x7f10_0000_0000, 768 << 20)];
        assert_eq!(
            locate_cells(&ids, &sizes(256 << 20, 768 << 20), &ranges),
            vec![Some(0), Some(1)]
        );
        // A size that matches no mapping, or a mapping missing: nothing located.
        assert_eq!(
            locate_cells(&ids, &sizes(512 << 20, 512 << 20), &ranges),
            vec![None, None]
        );
        assert_eq!(
            locate_cells(&ids, &sizes(256 << 20, 768 << 20), &ranges[..1]),
            vec![None, None]
        );
    }

    #[test]
    fn select_keeps_bytes_per_mapping() {
        let maps = parse_maps(
            "7f0000000000-7f0020000000 rw-p 00000000 00:00 0\n\
             7f0020000000-7f0020001000 ---p 00000000 00:00 0\n\
             7f0040000000-7f0060000000 rw-p 00000000 00:00 0\n",
        )
        .unwrap();
        let numa = parse_numa_maps(
            "7f0000000000 default anon=10 N0=4 N1=6 kernelpagesize_kB=4\n\
             7f0020000000 default kernelpagesize_kB=4\n\
             7f0040000000 default anon=8 N2=8 kernelpagesize_kB=4\n",
        )
        .unwrap();
        let r = select_guest_ram(&maps, &numa, 1 << 30, &[]).unwrap();
        assert_eq!(
            r.guest_ranges,
            vec![(0x7f0000000000, 512 << 20), (0x7f0040000000, 512 << 20)]
        );
        assert_eq!(r.guest_range_bytes[0][&1], 6 * 4096);
        assert_eq!(r.guest_range_bytes[1][&2], 8 * 4096);
        let mut t = MemoryTracker::default();
        t.store(7, r, 0, 1);
        t.note_migration(7, (2, 3), 4 * 4096, Some((0x7f0040000000, 512 << 20)));
        let r = &t.get(7).unwrap().reading;
        assert_eq!(r.guest_range_bytes[1][&3], 4 * 4096);
        assert_eq!(r.guest_bytes_per_node[&3], 4 * 4096);
    }

    #[test]
    fn an_inaccessible_reservation_is_not_guest_ram() {
        // A 64 MiB VM in two 32 MiB cells beside a malloc arena's reservation of
        // almost 64 MiB (PROT_NONE, nothing resident).
        let maps = parse_maps(
            "7f0000000000-7f0002000000 rw-p 00000000 00:00 0\n\
             7f0002000000-7f0002001000 ---p 00000000 00:00 0\n\
             7f0004000000-7f0006000000 rw-p 00000000 00:00 0\n\
             7f0010021000-7f0014000000 ---p 00000000 00:00 0\n",
        )
        .unwrap();
        let numa = parse_numa_maps(
            "7f0000000000 default anon=8192 N0=8192 kernelpagesize_kB=4\n\
             7f0002000000 default kernelpagesize_kB=4\n\
             7f0004000000 default anon=8192 N0=8192 kernelpagesize_kB=4\n\
             7f0010021000 default kernelpagesize_kB=4\n",
        )
        .unwrap();
        let r = select_guest_ram(&maps, &numa, 64 << 20, &[]).unwrap();
        assert_eq!(
            r.guest_ranges,
            vec![(0x7f0000000000, 32 << 20), (0x7f0004000000, 32 << 20)]
        );
    }

    #[test]
    fn rate_limit_and_migration_updates() {
        let mut t = MemoryTracker::new(MemoryPolicy {
            min_interval_ns: 10,
            big_vm_bytes: 1000,
            big_vm_min_interval_ns: 100,
        });
        assert!(t.due(1, 10, 0));
        let mut r = MemoryReading::default();
        r.guest_bytes_per_node.insert(0, 500);
        t.store(1, r.clone(), 0, 5);
        t.store(2, r, 0, 5);
        assert!(!t.due(1, 10, 9));
        assert!(t.due(1, 10, 10));
        assert!(!t.due(2, 5000, 50));
        assert!(t.due(2, 5000, 100));
        t.note_migration(1, (0, 1), 700, None);
        let g = &t.get(1).unwrap().reading.guest_bytes_per_node;
        assert_eq!((g[&0], g[&1]), (0, 500));
        t.retain(|pid| pid == 2);
        assert!(t.get(1).is_none());
    }

    /// A tracker whose base interval is `base_ns` for VMs of any size.
    fn tracker_read_every(base_ns: u64) -> MemoryTracker {
        MemoryTracker::new(MemoryPolicy {
            min_interval_ns: base_ns,
            big_vm_bytes: u64::MAX,
            big_vm_min_interval_ns: u64::MAX,
        })
    }

    #[test]
    fn routine_reads_of_one_tick_stay_within_the_budget_reads_after_a_change_do_not() {
        let s = 1_000_000_000u64;
        let gib = 1u64 << 30;
        let mut t = tracker_read_every(s);
        for pid in 1..=4 {
            t.store(pid, MemoryReading::default(), 0, 0);
        }
        // Four 1 GiB VMs read together come due together: one is read this tick
        // (the first read of a tick is always allowed), the others wait.
        let mut budget = ReadBudget::default();
        let read: Vec<u32> = (1..=4)
            .filter(|&pid| t.due_within(pid, gib, s, &mut budget))
            .collect();
        assert_eq!(read, vec![1]);
        // Small VMs share the budget: 64 of 16 MiB fit into 1 GiB.
        let mut budget = ReadBudget::default();
        let mut small = tracker_read_every(s);
        for pid in 1..=100 {
            small.store(pid, MemoryReading::default(), 0, 0);
        }
        let n = (1..=100)
            .filter(|&pid| small.due_within(pid, 16 << 20, s, &mut budget))
            .count();
        assert_eq!(n, 64);
        // A VM whose placement may have changed is read at once, budget or not;
        // so is one never read.
        t.note_may_have_changed(3);
        assert!(t.due_within(3, gib, s, &mut budget));
        assert!(t.due_within(99, gib, s, &mut budget));
        // Not due is not read, whatever the budget.
        assert!(!t.due_within(2, gib, s / 2, &mut ReadBudget::default()));
    }

    #[test]
    fn an_unchanged_placement_is_read_less_often_until_something_may_change_it() {
        let s = 1_000_000_000u64;
        let mut t = tracker_read_every(s);
        let mut r = MemoryReading::default();
        r.guest_bytes_per_node.insert(0, 1 << 30);
        // Each read that finds the same placement doubles the wait: 1, 2, 4, 8 s.
        let mut now = 0;
        t.store(1, r.clone(), now, 1);
        for wait_s in [1, 2, 4, 8] {
            assert!(!t.due(1, 1 << 30, now + wait_s * s - 1), "{wait_s}");
            now += wait_s * s;
            assert!(t.due(1, 1 << 30, now), "{wait_s}");
            t.store(1, r.clone(), now, 1);
        }
        // Never longer than MAX_STALE_NS.
        for _ in 0..20 {
            now += MAX_STALE_NS;
            assert!(t.due(1, 1 << 30, now));
            t.store(1, r.clone(), now, 1);
        }
        // Its resident size moved (or pages migrated on the host): the base interval.
        t.note_may_have_changed(1);
        assert!(t.due(1, 1 << 30, now + s));
        // A read that finds another placement starts the back-off again.
        let mut moved = r.clone();
        moved.guest_bytes_per_node.insert(0, 1 << 29);
        moved.guest_bytes_per_node.insert(1, 1 << 29);
        now += s;
        t.store(1, moved.clone(), now, 1);
        assert!(t.due(1, 1 << 30, now + s));
        // A difference within half a percent is the same placement.
        let mut nearly = moved.clone();
        nearly.guest_bytes_per_node.insert(1, (1 << 29) + (4 << 20));
        now += s;
        t.store(1, nearly, now, 1);
        assert!(!t.due(1, 1 << 30, now + s));
        // The balancer's own move: read again at the base interval.
        t.note_migration(1, (0, 1), 1 << 20, None);
        assert!(t.due(1, 1 << 30, now + s));
        // A probe page found on another node than at the read: read again.
        now += s;
        t.store(1, moved.clone(), now, 1);
        t.store(1, moved.clone(), now + s, 1);
        now += s;
        t.set_probe(
            1,
            Probe {
                addrs: vec![4096, 8192],
                nodes: vec![0, -2],
            },
        );
        assert!(!t.due(1, 1 << 30, now + s));
        assert!(!t.check_probe(1, &[0, -2]), "same nodes, nothing changed");
        assert!(!t.due(1, 1 << 30, now + s));
        assert!(t.check_probe(1, &[1, -2]), "a page moved to node 1");
        assert!(t.due(1, 1 << 30, now + s));
        // Not asked while a move of ours runs (its query would wait on the copy).
        assert!(t.probe_addrs(1).is_some());
        t.note_move_started(1);
        assert!(t.probe_addrs(1).is_none());
        t.note_move_ended(1);
        assert_eq!(t.probe_addrs(1), Some(&[4096u64, 8192][..]));
    }

    #[test]
    fn a_reading_is_held_while_a_move_of_ours_runs_and_renewed_after_it() {
        let s = 1_000_000_000u64;
        let mut t = tracker_read_every(s);
        let mut r = MemoryReading::default();
        r.guest_bytes_per_node.insert(1, 1 << 30);
        t.store(1, r.clone(), 0, 1);
        // Below its target: the observer asks for a read every tick.
        t.note_may_have_changed(1);
        assert!(t.due(1, 1 << 30, s));
        // Two moves start; a read in between would see a half-done move.
        t.note_move_started(1);
        t.note_move_started(1);
        t.note_may_have_changed(1);
        assert!(!t.due(1, 1 << 30, 5 * s));
        // A read stored anyway (a VM read for another reason) keeps the count.
        t.store(1, r.clone(), 5 * s, 1);
        t.note_move_ended(1);
        assert!(!t.due(1, 1 << 30, 7 * s), "one move still runs");
        // The last outcome comes: its bytes adjust the view, the next tick reads.
        t.note_migration(1, (1, 0), 1 << 29, None);
        t.note_move_ended(1);
        assert!(t.due(1, 1 << 30, 7 * s));
        // A move whose outcome never came holds the reading for a bounded time.
        t.store(1, r, 8 * s, 1);
        t.note_move_started(1);
        assert!(!t.due(1, 1 << 30, 8 * s + MOVE_HOLD_MAX_NS - 1));
        assert!(t.due(1, 1 << 30, 8 * s + MOVE_HOLD_MAX_NS));
        // An outcome for a VM never started (refused before it ran) is harmless.
        t.note_move_ended(2);
        t.note_move_ended(1);
        t.note_move_ended(1);
        assert_eq!(t.get(1).unwrap().moves_running, 0);
    }

    #[test]
    fn probe_pages_spread_over_all_guest_ranges_in_proportion() {
        let page = 4096u64;
        assert!(Probe::addresses(&[], page).is_empty());
        // Two mappings, the second three times the first: a quarter of the pages in
        // the first, every page inside its mapping and page aligned.
        let ranges = [(1 << 30, 64 << 20), (4 << 30, 192 << 20)];
        let a = Probe::addresses(&ranges, page);
        assert_eq!(a.len(), PROBE_PAGES);
        let in_first = a
            .iter()
            .filter(|&&x| x >= ranges[0].0 && x < ranges[0].0 + ranges[0].1)
            .count();
        assert_eq!(in_first, PROBE_PAGES / 4);
        assert!(
            a.iter()
                .all(|&x| x % page == 0 && ranges.iter().any(|r| x >= r.0 && x < r.0 + r.1))
        );
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        // Smaller than the probe: one page each, no more than there are.
        let tiny = Probe::addresses(&[(1 << 20, 3 * page)], page);
        assert_eq!(tiny, vec![1 << 20, (1 << 20) + page, (1 << 20) + 2 * page]);
    }
}
