//! Moving a VM's memory between nodes, and reading the result back.
//!
//! The pages themselves move through [`super::pages`] (hot regions first, large
//! move_pages calls, several threads, the shared rate limit, only pages seen on the
//! target counted). This module decides whether a move may start and what it
//! covers, keeps the VM's cpuset memory nodes in step, and turns the tally into the
//! action's outcome.
//!
//! While pages move, the VM's `cpuset.mems` (when it has a cpuset group) is widened
//! to include the target, with v1's `memory_migrate` held at 0, so the guest's new
//! allocations may land there. On v1 it is narrowed (target in, source out) after a
//! whole-VM move left nothing behind; on v2 it is never narrowed by a move, because
//! there any mems write migrates the VM's pages off the removed nodes at once, in a
//! kernel workqueue the write waits for.
//!
//! Refusals happen before anything changes: unknown or memory-less target node, not
//! enough free memory above the headroom, no free huge pages of the VM's size.

use std::path::{Path, PathBuf};

use super::cgroup::{self, SetKind};
use std::sync::Mutex;

use super::pages::{self, PageMove};
use super::rate::RateLimit;
use super::{LinuxApplier, MigrationProgress, Refusal};
use crate::host::linux::HostError;
use crate::host::linux::numa_maps::{MapsEntry, read_maps};
use crate::host::linux::topology;
use crate::model::{
    ActionOutcome, MemoryBacking, NodeId, NodeSet, PlannedAction, Snapshot, Vm, VmId,
};

/// Which pages of the VM's process a move covers.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Listed guest RAM regions, in order (the engine lists the hottest first).
    Regions(&'a [(u64, u64)]),
    /// Every writable mapping of the process: guest RAM and the rest.
    WholeVm,
    /// The writable mappings inside one host range `(start, len)`, clipped to it: a
    /// guest NUMA cell's memory backend, whose pages move without the other cells'.
    Within((u64, u64)),
    /// The process's own anonymous memory outside guest RAM (`MigrateProcessMemory`).
    ProcessOwn,
}

/// [`Scope`] without the borrowed regions, kept with a prepared move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Covers {
    Regions,
    WholeVm,
    /// One cell's range: the other cells may still need the source node, so the
    /// VM's memory nodes are never narrowed after it.
    Within,
    ProcessOwn,
}

/// A move that passed its checks: its ranges are listed and the VM's memory nodes
/// widened. The page mover needs the first part ([`Prepared::page_move`]),
/// [`finish`] the rest. Owned and `Send`, so a background worker can carry it.
#[derive(Debug)]
pub struct Prepared {
    pub vm: VmId,
    /// The action it carries out, handed back with its outcome (moves of one VM end
    /// in any order).
    pub planned: Option<PlannedAction>,
    from: NodeId,
    to: NodeId,
    ranges: Vec<(u64, u64)>,
    /// Step between page addresses (base page, or hugetlbfs page).
    page_bytes: u64,
    max_bytes: u64,
    /// What the snapshot said is on the source (guest RAM or own memory).
    from_bytes: Option<u64>,
    /// What the move covers.
    covers: Covers,
    widened: Widened,
    started: std::time::Instant,
}

impl Prepared {
    /// The page mover's part.
    pub fn page_move(&self) -> PageMove<'_> {
        PageMove {
            pid: self.vm,
            from: self.from,
            to: self.to,
            ranges: &self.ranges,
            page_bytes: self.page_bytes,
            budget_bytes: self.max_bytes,
        }
    }

    /// Whether the move carries listed (hot) regions: the movers take its batches
    /// before those of moves of whole source nodes.
    pub fn is_hot(&self) -> bool {
        self.covers == Covers::Regions
    }

    /// The move as status shows it, with `moved_bytes` verified so far.
    pub fn progress(&self, moved_bytes: u64) -> MigrationProgress {
        MigrationProgress {
            vm: self.vm,
            from: self.from,
            to: self.to,
            moved_bytes: moved_bytes.min(self.max_bytes),
            left_bytes: self.from_bytes.unwrap_or(0),
            max_bytes: self.max_bytes,
        }
    }
}

/// The checks, the ranges and the widened memory nodes of a move; the outcome to
/// report instead when it may not start (nothing changed then).
pub fn prepare(
    a: &mut LinuxApplier,
    snapshot: &Snapshot,
    vm: &Vm,
    from: NodeId,
    to: NodeId,
    scope: Scope<'_>,
    max_bytes: u64,
) -> Result<Prepared, ActionOutcome> {
    if from == to {
        return Err(a.refuse(vm.pid, Refusal::SameNode { node: to }));
    }
    if max_bytes == 0 {
        return Err(a.refuse(vm.pid, Refusal::NothingToMove));
    }
    let node_dir = a.cfg.sys_root.join(format!("devices/system/node/node{to}"));
    if !node_dir.is_dir() {
        return Err(a.refuse(vm.pid, Refusal::NoSuchNode { node: to }));
    }
    let from_bytes = from_node_bytes(snapshot, vm, from, scope);
    let need_bytes = from_bytes.map_or(max_bytes, |b| b.min(max_bytes));
    // Guest RAM on hugetlbfs moves in huge pages; the process's own memory never does.
    let huge_page_bytes = match (scope, &vm.memory.backing) {
        (Scope::ProcessOwn, _) => None,
        (_, MemoryBacking::HugeTlb { page_size_bytes }) => Some(*page_size_bytes),
        _ => None,
    };
    if let Err(why) = check_room(a, snapshot, to, need_bytes, huge_page_bytes) {
        return Err(a.refuse(vm.pid, why));
    }

    let in_guest_ram = |m: &MapsEntry| {
        vm.memory
            .guest_ranges
            .iter()
            .any(|&(s, l)| m.start_addr < s.saturating_add(l) && s < m.end_addr)
    };
    let ranges = match scope {
        Scope::Regions(regions) => Ok(regions.to_vec()),
        // A huge-page move steps through its ranges a huge page at a time and counts
        // each page found on the target as one huge page: only guest RAM is on
        // hugetlbfs, so only its mappings are walked (the process's own small pages
        // follow with `MigrateProcessMemory`). Without located guest RAM, everything.
        Scope::WholeVm if huge_page_bytes.is_some() && !vm.memory.guest_ranges.is_empty() => {
            writable_ranges(&a.cfg.proc_root, vm.pid, in_guest_ram)
        }
        Scope::WholeVm => writable_ranges(&a.cfg.proc_root, vm.pid, |_| true),
        Scope::Within(range) => {
            writable_ranges(&a.cfg.proc_root, vm.pid, |_| true).map(|r| clip(&r, range))
        }
        Scope::ProcessOwn => {
            if vm.memory.guest_ranges.is_empty() {
                return Err(a.refuse(vm.pid, Refusal::GuestRamUnlocated));
            }
            writable_ranges(&a.cfg.proc_root, vm.pid, |m| {
                m.is_anonymous() && !in_guest_ram(m)
            })
        }
    };
    let ranges = match ranges {
        Ok(r) => r,
        Err(e) if e.is_vanished() => return Err(a.gone(vm.pid)),
        Err(e) => return Err(a.refuse(vm.pid, Refusal::Maps(e))),
    };

    let widened = match widen_mems(a, vm, to) {
        Ok(w) => w,
        Err(why) => return Err(a.refuse(vm.pid, why)),
    };
    // hugetlbfs pages move whole and only through their first address.
    let page_bytes = huge_page_bytes
        .filter(|&p| p > a.page_size_bytes)
        .unwrap_or(a.page_size_bytes);
    Ok(Prepared {
        planned: None,
        vm: vm.pid,
        from,
        to,
        ranges,
        page_bytes,
        max_bytes,
        from_bytes,
        covers: match scope {
            Scope::Regions(_) => Covers::Regions,
            Scope::WholeVm => Covers::WholeVm,
            Scope::Within(_) => Covers::Within,
            Scope::ProcessOwn => Covers::ProcessOwn,
        },
        widened,
        started: std::time::Instant::now(),
    })
}

/// Moves the pages of a prepared move on the calling thread and its own helpers,
/// showing its progress meanwhile (the synchronous path: recovery, or no worker).
/// Touches nothing of the applier but the shared rate limit and the progress list.
pub fn move_prepared(
    p: &Prepared,
    settings: pages::MoverSettings,
    limit: &RateLimit,
    progress: &Mutex<Vec<MigrationProgress>>,
) -> Result<pages::Tally, pages::Gone> {
    let show = |moved_bytes: Option<u64>| {
        if let Ok(mut g) = progress.lock() {
            g.retain(|m| m.vm != p.vm);
            if let Some(b) = moved_bytes {
                g.push(p.progress(b));
            }
        }
    };
    show(Some(0));
    let result = pages::move_pages_between(&p.page_move(), settings, limit, &|b| show(Some(b)));
    show(None);
    result
}

/// After the pages moved: the memory nodes as the move leaves them, and the
/// outcome from what the mover verified.
pub fn finish(
    a: &mut LinuxApplier,
    p: Prepared,
    result: Result<pages::Tally, pages::Gone>,
) -> ActionOutcome {
    let (vm, from, to, max_bytes) = (p.vm, p.from, p.to, p.max_bytes);
    let tally = match result {
        Ok(t) => t,
        Err(pages::Gone) => {
            undo_widen(a, &p.widened);
            return a.gone(vm);
        }
    };
    let page = p.page_bytes;
    let moved_bytes = tally.verified_pages * page;
    // Batches after the budget ran out were not scanned: estimate what is left there
    // from the snapshot (unnamed moves only; named regions were scanned as needed).
    let mut left_bytes = tally.left_pages * page;
    if p.covers != Covers::Regions
        && let Some(b) = p.from_bytes
    {
        left_bytes = left_bytes.max(b.saturating_sub(moved_bytes));
    }
    // Narrow only after a whole-VM move left nothing on the source, and only where
    // narrowing cannot migrate (v1, memory_migrate held at 0). On v2 every mems
    // write makes the kernel migrate the whole VM's pages off the removed node from a
    // workqueue the write waits for: in the lab that blocked the daemon for more
    // than 20 s after a move that had already left nothing behind. The source stays
    // allowed there; the VM's faults allocate on its home node anyway.
    let narrowing_migrates = matches!(a.cpuset, Some(cgroup::CpusetFs::V2(_)));
    if p.covers == Covers::WholeVm
        && tally.left_pages == 0
        && !tally.cancelled
        && !narrowing_migrates
    {
        narrow_mems(a, &p.widened, from, to);
    }
    // memory_migrate goes back as it was found (mems may stay widened).
    restore_migrate_flag(a, &p.widened);
    tracing::debug!(
        vm,
        from,
        to,
        moved_bytes,
        left_bytes,
        failed_pages = tally.failed_pages,
        move_calls = tally.move_calls,
        elapsed_ms = p.started.elapsed().as_millis() as u64,
        "memory move"
    );
    if tally.cancelled {
        return ActionOutcome::Partial {
            moved_bytes,
            left_bytes,
            why: "stopped at a batch boundary by shutdown".into(),
        };
    }
    if tally.failed_pages > 0 {
        if moved_bytes == 0 {
            return ActionOutcome::Refused {
                why: format!(
                    "no page could move to node {to} ({} failed: {})",
                    tally.failed_pages, tally.first_error
                ),
            };
        }
        return ActionOutcome::Partial {
            moved_bytes,
            left_bytes,
            why: format!(
                "{} pages could not move ({})",
                tally.failed_pages, tally.first_error
            ),
        };
    }
    if left_bytes > 0 && moved_bytes < max_bytes {
        return ActionOutcome::Partial {
            moved_bytes,
            left_bytes,
            why: "pages moved back or were not verified on the target".into(),
        };
    }
    ActionOutcome::Done { moved_bytes }
}

/// What the snapshot says the move may find on `from`: guest RAM, or for the
/// process's own memory the anonymous overhead.
fn from_node_bytes(snapshot: &Snapshot, vm: &Vm, from: NodeId, scope: Scope<'_>) -> Option<u64> {
    let i = snapshot.topology.node_index(from)?;
    match scope {
        Scope::ProcessOwn => vm.memory.own_overhead_bytes_per_node.get(i).copied(),
        // A cell's move: what that cell has there, when the cell is located.
        Scope::Within(range) => vm
            .cells
            .iter()
            .find(|c| c.addr_range == Some(range))
            .and_then(|c| c.bytes_per_node.get(i).copied()),
        _ => vm.memory.bytes_per_node.get(i).copied(),
    }
}

/// Free memory (and huge pages) on the target, double-checked against the node's
/// `meminfo` now rather than only the snapshot's possibly older number.
fn check_room(
    a: &LinuxApplier,
    snapshot: &Snapshot,
    to: NodeId,
    need_bytes: u64,
    huge_page_bytes: Option<u64>,
) -> Result<(), Refusal> {
    if let Some(page_size_bytes) = huge_page_bytes {
        let free_pages = snapshot
            .topology
            .node(to)
            .and_then(|n| {
                n.memory
                    .hugepages
                    .iter()
                    .find(|h| h.page_size_bytes == page_size_bytes)
            })
            .map_or(0, |h| h.free_pages);
        let need_pages = need_bytes.div_ceil(page_size_bytes.max(1));
        if free_pages < need_pages {
            return Err(Refusal::NoHugePages {
                node: to,
                free_pages,
                page_size_bytes,
                need_pages,
            });
        }
        return Ok(());
    }
    let snap_free = snapshot.topology.node(to).map(|n| n.memory.free_bytes);
    let now_free = match topology::read_node_meminfo(&a.cfg.sys_root, to) {
        Ok(m) => Some(m.free_bytes),
        Err(e) => {
            tracing::warn!(node = to, error = %e, "cannot re-read the node's free memory");
            None
        }
    };
    let free = match (snap_free, now_free) {
        (Some(s), Some(n)) => s.min(n),
        (Some(s), None) => s,
        (None, Some(n)) => n,
        (None, None) => return Err(Refusal::NoMemoryInfo { node: to }),
    };
    if free < need_bytes.saturating_add(a.cfg.headroom_bytes) {
        return Err(Refusal::NoRoom {
            node: to,
            free_bytes: free,
            need_bytes,
            headroom_bytes: a.cfg.headroom_bytes,
        });
    }
    Ok(())
}

/// Writable mappings of the process that `keep` accepts, as `(start, len)`. Kernel
/// mappings (`[vsyscall]`, `[vdso]`, `[vvar]`) are never writable.
/// The parts of `ranges` inside `(start, len)`.
fn clip(ranges: &[(u64, u64)], (start, len): (u64, u64)) -> Vec<(u64, u64)> {
    let end = start.saturating_add(len);
    ranges
        .iter()
        .filter_map(|&(s, l)| {
            let (a, b) = (s.max(start), s.saturating_add(l).min(end));
            (a < b).then(|| (a, b - a))
        })
        .collect()
}

fn writable_ranges(
    proc_root: &Path,
    pid: u32,
    keep: impl Fn(&MapsEntry) -> bool,
) -> Result<Vec<(u64, u64)>, HostError> {
    Ok(read_maps(proc_root, pid)?
        .into_iter()
        .filter(|m| m.is_writable() && m.len_bytes() > 0 && keep(m))
        .map(|m| (m.start_addr, m.len_bytes()))
        .collect())
}

/// `cpuset.mems` of the VM's groups around a move: each group, its set before and
/// whether the move widened it.
#[derive(Debug)]
struct Widened {
    /// (group, configured mems before, effective mems before, widened by us)
    groups: Vec<(PathBuf, NodeSet, NodeSet, bool)>,
    /// v1 groups whose `memory_migrate` was 1 and is held at 0 for the move.
    migrate_was_on: Vec<PathBuf>,
}

fn widen_mems(a: &mut LinuxApplier, vm: &Vm, to: NodeId) -> Result<Widened, Refusal> {
    let mut w = Widened {
        groups: Vec::new(),
        migrate_was_on: Vec::new(),
    };
    let dirs: Vec<PathBuf> = if let Some((_, g)) = a.vm_groups(vm) {
        g.all()
    } else if let Some((fs, dir)) = a.vm_dir(vm) {
        if fs.has_cpuset(&dir) {
            vec![dir]
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    let Some(fs) = a.cpuset.clone() else {
        return Ok(w);
    };
    // Parents first: a v1 child's mems must stay inside its parent's.
    for dir in dirs {
        let Ok(cur) = cgroup::read_set(&dir, SetKind::Mems) else {
            a.counters.cgroups_gone += 1;
            continue;
        };
        let eff = cgroup::read_effective(&dir, SetKind::Mems).unwrap_or_else(|_| cur.clone());
        // Held at 0 for the whole move, so no mems write of ours migrates pages.
        if fs.memory_migrate(&dir).ok().flatten() == Some(true) {
            if let Err(source) = fs.set_memory_migrate(&dir, false) {
                undo_widen(a, &w);
                return Err(Refusal::MemoryMigrate { dir, source });
            }
            w.migrate_was_on.push(dir.clone());
        }
        // Judged on the effective set: on v2 an empty (inherited) mems allows every
        // node of the parent, and writing {to} there would migrate the whole VM.
        if eff.contains(to) {
            w.groups.push((dir, cur, eff, false));
            continue;
        }
        let mut wider = if cur.is_empty() {
            eff.clone()
        } else {
            cur.clone()
        };
        wider.insert(to);
        if let Err(source) = cgroup::write_set(&dir, SetKind::Mems, &wider) {
            undo_widen(a, &w);
            return Err(Refusal::WidenMems { dir, source });
        }
        w.groups.push((dir, cur, eff, true));
    }
    Ok(w)
}

/// Puts mems back as they were (children first). Removing the target again cannot
/// move pages on v1 (memory_migrate held at 0); on v2 it moves back what reached the
/// target, which is the revert asked for.
fn undo_widen(a: &mut LinuxApplier, w: &Widened) {
    let Some(fs) = a.cpuset.clone() else {
        return;
    };
    for (dir, before, _, changed) in w.groups.iter().rev() {
        if *changed && cgroup::write_recorded(&fs, dir, SetKind::Mems, before).is_err() {
            a.counters.cgroups_gone += 1;
        }
    }
    restore_migrate_flag(a, w);
}

fn restore_migrate_flag(a: &LinuxApplier, w: &Widened) {
    if let Some(fs) = a.cpuset.as_ref() {
        for dir in &w.migrate_was_on {
            let _ = fs.set_memory_migrate(dir, true);
        }
    }
}

/// After a complete move: the source leaves the groups' mems, children first
/// (memory_migrate is still held at 0 on v1).
fn narrow_mems(a: &mut LinuxApplier, w: &Widened, from: NodeId, to: NodeId) {
    // From the effective set before the move: nodes other than the source keep
    // their pages (narrowing to the target alone would migrate them too on v2).
    for (dir, _, eff_before, _) in w.groups.iter().rev() {
        let mut narrow = eff_before.clone();
        narrow.remove(from);
        narrow.insert(to);
        if cgroup::read_set(dir, SetKind::Mems).is_ok_and(|cur| cur == narrow) {
            continue;
        }
        if cgroup::write_set(dir, SetKind::Mems, &narrow).is_err() {
            a.counters.cgroups_gone += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_move_covers_only_its_range() {
        /// (start, len)
        type Range = (u64, u64);
        // (mappings, cell range, what is moved)
        let cases: [(&[Range], Range, Vec<Range>); 4] = [
            // The cell's own mapping among others: only it.
            (
                &[(0x1000, 0x1000), (0x4000, 0x4000), (0x9000, 0x1000)],
                (0x4000, 0x4000),
                vec![(0x4000, 0x4000)],
            ),
            // Merged with a neighbour: the cell's part of it.
            (&[(0x0, 0x10000)], (0x4000, 0x4000), vec![(0x4000, 0x4000)]),
            // Two mappings across the range: both clipped.
            (
                &[(0x0, 0x6000), (0x6000, 0x6000)],
                (0x4000, 0x4000),
                vec![(0x4000, 0x2000), (0x6000, 0x2000)],
            ),
            // Nothing of the range mapped (the cell's backend is gone).
            (&[(0x0, 0x1000)], (0x4000, 0x4000), vec![]),
        ];
        for (maps, range, want) in cases {
            assert_eq!(clip(maps, range), want, "{maps:x?} {range:x?}");
        }
    }

    #[test]
    fn reads_node_free_memory_and_own_maps() {
        let free = topology::read_node_meminfo(Path::new("/sys"), 0).unwrap();
        assert!(free.free_bytes > 0);
        let ranges = writable_ranges(Path::new("/proc"), std::process::id(), |_| true).unwrap();
        assert!(!ranges.is_empty());
        assert!(ranges.iter().all(|(_, len)| *len > 0));
    }

    #[test]
    fn own_memory_is_the_anonymous_writable_mappings() {
        let maps = "55d0-55e0 r-xp 00000000 08:01 42 /usr/bin/qemu-kvm\n\
                    55e0-55f0 rw-p 00010000 08:01 42 /usr/bin/qemu-kvm\n\
                    5600-5700 rw-p 00000000 00:00 0 [heap]\n\
                    7f00-7f80 rw-p 00000000 00:00 0 \n\
                    7f80-7f90 rw-s 00000000 00:01 9 /memfd:ram (deleted)\n\
                    7f90-7fa0 rw-p 00000000 00:00 0 [anon:guest]\n\
                    7fa0-7fb0 rw-s 00000000 00:01 3 [anon_shmem:x]\n\
                    7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n\
                    ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n";
        let maps = crate::host::linux::numa_maps::parse_maps(maps).unwrap();
        let writable: Vec<&MapsEntry> = maps.iter().filter(|m| m.is_writable()).collect();
        assert_eq!(writable.len(), 7);
        let own: Vec<u64> = writable
            .iter()
            .filter(|m| m.is_anonymous())
            .map(|m| m.start_addr)
            .collect();
        assert_eq!(own, vec![0x5600, 0x7f00, 0x7f90, 0x7ffd]);
    }
}
