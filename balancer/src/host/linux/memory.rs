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
//! Only guest RAM counts as the VM's memory: the mappings that back `-m` (the largest
//! anonymous, memfd, hugetlb or `mem-path` file mappings whose sizes add up to the
//! configured size). Everything else (qemu's heap, thread stacks, libraries, video RAM,
//! ROMs) is reported as overhead.

use std::collections::{BTreeMap, HashMap};

use super::numa_maps::{MappingKind, MapsEntry, NumaMapping};
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

/// The result of one numa_maps read of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReading {
    /// Guest RAM resident per node.
    pub guest_bytes_per_node: BTreeMap<NodeId, u64>,
    /// Everything else the process has resident, per node.
    pub overhead_bytes_per_node: BTreeMap<NodeId, u64>,
    /// The anonymous part of the overhead (heap, stacks, anonymous mappings), per node.
    pub own_overhead_bytes_per_node: BTreeMap<NodeId, u64>,
    /// Guest RAM mappings as (start address, length).
    pub guest_ranges: Vec<(u64, u64)>,
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
) -> Result<MemoryReading, String> {
    let len_of: HashMap<u64, u64> = if maps.is_empty() {
        numa.iter()
            .map(|m| {
                let resident = m.bytes_per_node().map(|b| b.values().sum()).unwrap_or(0);
                (m.start_addr, resident)
            })
            .collect()
    } else {
        maps.iter().map(|e| (e.start_addr, e.len_bytes())).collect()
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
    for (i, m) in numa.iter().enumerate() {
        let bytes = m.bytes_per_node()?;
        let guest = chosen.contains(&i);
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
            reading.guest_ranges.push((
                m.start_addr,
                len_of.get(&m.start_addr).copied().unwrap_or(0),
            ));
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
    reading.guest_ranges.sort_unstable();
    Ok(reading)
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
        let interval = if configured_bytes >= self.policy.big_vm_bytes {
            self.policy.big_vm_min_interval_ns
        } else {
            self.policy.min_interval_ns
        };
        now_ns.saturating_sub(t.read_at_ns) >= interval
    }

    pub fn store(&mut self, pid: u32, reading: MemoryReading, now_ns: u64, read_cost_ns: u64) {
        self.reads += 1;
        self.read_ns_total = self.read_ns_total.saturating_add(read_cost_ns);
        self.vms.insert(
            pid,
            TrackedMemory {
                reading,
                read_at_ns: now_ns,
                adjusted_bytes: 0,
            },
        );
    }

    pub fn get(&self, pid: u32) -> Option<&TrackedMemory> {
        self.vms.get(&pid)
    }

    /// Applies a completed page migration to the cached view: `bytes` of guest RAM went
    /// from node `from` to node `to` (never more than the cache holds on `from`).
    pub fn note_migration(&mut self, pid: u32, from: NodeId, to: NodeId, bytes: u64) {
        let Some(t) = self.vms.get_mut(&pid) else {
            return;
        };
        let moved = shift(&mut t.reading.guest_bytes_per_node, from, to, bytes);
        t.adjusted_bytes = t.adjusted_bytes.saturating_add(moved);
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
        t.note_migration(1, 0, 1, 700);
        let g = &t.get(1).unwrap().reading.guest_bytes_per_node;
        assert_eq!((g[&0], g[&1]), (0, 500));
        t.retain(|pid| pid == 2);
        assert!(t.get(1).is_none());
    }
}
