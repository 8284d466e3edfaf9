//! Moving a VM's memory between nodes, and reading the result back.
//!
//! Lazy and hot-first: the planned regions are moved in their order (the engine lists
//! the hottest first), window by window: each 2 MiB window is queried with
//! move_pages(nodes = NULL) so only pages really on the source node are moved, in
//! batches of `batch_pages`, and each batch is queried again afterwards so only pages
//! found on the target are counted. A shared rate limit ([`super::rate`]) spaces
//! batches, and a shutdown stops between two batches.
//!
//! Why several threads: moving a page costs the caller CPU time (unmap, copy, remap,
//! TLB shootdown), and on a busy host the daemon shares CPUs with the vCPUs it is
//! balancing. Measured in the 4-node lab guest with every CPU busy, one thread moved
//! about 5-18 MB/s; windows are therefore handed out in order to
//! `migration_threads` threads, so hot regions still go first.
//!
//! Why not migrate_pages for whole-VM moves: it is one syscall on one thread that
//! cannot be rate-limited, stopped or spread over threads, it walks every mapping of
//! the process, and in the lab (6.1 guest, every CPU busy) single calls for 16 MiB
//! took from 2 s to more than 30 s while the batched path kept moving.
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
use super::{LinuxApplier, MigrationProgress, sys};
use crate::host::linux::HostError;
use crate::host::linux::numa_maps::{MapsEntry, read_maps};
use crate::model::{ActionOutcome, MemoryBacking, NodeId, NodeSet, Snapshot, Vm};

/// Which pages of the VM's process a move covers.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Listed guest RAM regions, in order (the engine lists the hottest first).
    Regions(&'a [(u64, u64)]),
    /// Every writable mapping of the process: guest RAM and the rest.
    WholeVm,
    /// The process's own anonymous memory outside guest RAM (`MigrateProcessMemory`).
    ProcessOwn,
}

/// Applies `MigrateMemory` (scope `Regions` or `WholeVm`) and `MigrateProcessMemory`
/// (scope `ProcessOwn`).
pub fn migrate(
    a: &mut LinuxApplier,
    snapshot: &Snapshot,
    vm: &Vm,
    from: NodeId,
    to: NodeId,
    scope: Scope<'_>,
    max_bytes: u64,
) -> ActionOutcome {
    if from == to {
        return a.refuse(vm.pid, format!("source and target are both node {to}"));
    }
    if max_bytes == 0 {
        return a.refuse(vm.pid, "nothing to move (max_bytes is 0)".into());
    }
    let node_dir = a.cfg.sys_root.join(format!("devices/system/node/node{to}"));
    if !node_dir.is_dir() {
        return a.refuse(vm.pid, format!("node {to} does not exist on this host"));
    }
    let from_bytes = from_node_bytes(snapshot, vm, from, scope);
    let need_bytes = from_bytes.map_or(max_bytes, |b| b.min(max_bytes));
    // Guest RAM on hugetlbfs moves in huge pages; the process's own memory never does.
    let huge_page_bytes = match (scope, &vm.memory.backing) {
        (Scope::ProcessOwn, _) => None,
        (_, MemoryBacking::HugeTlb { page_size_bytes }) => Some(*page_size_bytes),
        _ => None,
    };
    if let Err(why) = check_room(a, snapshot, to, need_bytes, &node_dir, huge_page_bytes) {
        return a.refuse(vm.pid, why);
    }

    let ranges = match scope {
        Scope::Regions(regions) => Ok(regions.to_vec()),
        Scope::WholeVm => writable_ranges(&a.cfg.proc_root, vm.pid, |_| true),
        Scope::ProcessOwn => {
            if vm.memory.guest_ranges.is_empty() {
                return a.refuse(
                    vm.pid,
                    "guest RAM is not located, so the process's own memory cannot be told apart"
                        .into(),
                );
            }
            let own = |m: &MapsEntry| {
                m.is_anonymous()
                    && !vm
                        .memory
                        .guest_ranges
                        .iter()
                        .any(|&(s, l)| m.start_addr < s.saturating_add(l) && s < m.end_addr)
            };
            writable_ranges(&a.cfg.proc_root, vm.pid, own)
        }
    };
    let ranges = match ranges {
        Ok(r) => r,
        Err(e) if e.is_vanished() => return a.gone(vm.pid),
        Err(e) => return a.refuse(vm.pid, e.to_string()),
    };

    let widened = match widen_mems(a, vm, to) {
        Ok(w) => w,
        Err(why) => return a.refuse(vm.pid, why),
    };

    set_progress(a, |p| {
        *p = Some(MigrationProgress {
            vm: vm.pid,
            from,
            to,
            moved_bytes: 0,
            left_bytes: from_bytes.unwrap_or(0),
            max_bytes,
        })
    });

    // hugetlbfs pages move whole and only through their first address.
    let step = huge_page_bytes
        .filter(|&p| p > a.page_size_bytes)
        .unwrap_or(a.page_size_bytes);
    let started = std::time::Instant::now();
    let result = batched_move(a, vm, from, to, &ranges, max_bytes, step);
    set_progress(a, |p| *p = None);

    let tally = match result {
        Ok(t) => t,
        Err(Gone) => {
            undo_widen(a, &widened);
            return a.gone(vm.pid);
        }
    };
    let page = step;
    let moved_bytes = tally.verified_pages * page;
    // Windows after the budget ran out were not scanned: estimate what is left there
    // from the snapshot (unnamed moves only; named regions were scanned as needed).
    let mut left_bytes = tally.left_pages * page;
    if !matches!(scope, Scope::Regions(_))
        && let Some(b) = from_bytes
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
    let whole_vm = matches!(scope, Scope::WholeVm);
    if whole_vm && tally.left_pages == 0 && !tally.cancelled && !narrowing_migrates {
        narrow_mems(a, &widened, from, to);
    }
    // memory_migrate goes back as it was found (mems may stay widened).
    restore_migrate_flag(a, &widened);
    tracing::debug!(
        vm = vm.pid,
        from,
        to,
        moved_bytes,
        left_bytes,
        failed_pages = tally.failed_pages,
        elapsed_ms = started.elapsed().as_millis() as u64,
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

/// The VM exited during the move.
struct Gone;

#[derive(Debug, Default)]
struct Tally {
    /// Pages verified on the target after the move.
    verified_pages: u64,
    /// Pages found on the source and not moved (budget, failures).
    left_pages: u64,
    failed_pages: u64,
    first_error: String,
    cancelled: bool,
}

fn set_progress(a: &LinuxApplier, f: impl FnOnce(&mut Option<MigrationProgress>)) {
    if let Ok(mut p) = a.progress.lock() {
        f(&mut p);
    }
}

/// What the snapshot says the move may find on `from`: guest RAM, or for the
/// process's own memory the anonymous overhead.
fn from_node_bytes(snapshot: &Snapshot, vm: &Vm, from: NodeId, scope: Scope<'_>) -> Option<u64> {
    let i = snapshot.topology.node_index(from)?;
    match scope {
        Scope::ProcessOwn => vm.memory.own_overhead_bytes_per_node.get(i).copied(),
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
    node_dir: &Path,
    huge_page_bytes: Option<u64>,
) -> Result<(), String> {
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
            return Err(format!(
                "node {to} has {free_pages} free huge pages of {page_size_bytes} bytes, \
                 the move needs {need_pages}"
            ));
        }
        return Ok(());
    }
    let snap_free = snapshot.topology.node(to).map(|n| n.memory.free_bytes);
    let now_free = read_node_free_bytes(node_dir);
    let free = match (snap_free, now_free) {
        (Some(s), Some(n)) => s.min(n),
        (Some(s), None) => s,
        (None, Some(n)) => n,
        (None, None) => return Err(format!("node {to} has no readable memory information")),
    };
    if free < need_bytes.saturating_add(a.cfg.headroom_bytes) {
        return Err(format!(
            "node {to} has {free} bytes free, the move needs {need_bytes} plus {} headroom",
            a.cfg.headroom_bytes
        ));
    }
    Ok(())
}

/// `MemFree` of a node's meminfo, in bytes.
pub fn read_node_free_bytes(node_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(node_dir.join("meminfo")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.split_once("MemFree:")?.1;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Writable mappings of the process that `keep` accepts, as `(start, len)`. Kernel
/// mappings (`[vsyscall]`, `[vdso]`, `[vvar]`) are never writable.
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
struct Widened {
    /// (group, configured mems before, effective mems before, widened by us)
    groups: Vec<(PathBuf, NodeSet, NodeSet, bool)>,
    /// v1 groups whose `memory_migrate` was 1 and is held at 0 for the move.
    migrate_was_on: Vec<PathBuf>,
}

fn widen_mems(a: &mut LinuxApplier, vm: &Vm, to: NodeId) -> Result<Widened, String> {
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
            if let Err(e) = fs.set_memory_migrate(&dir, false) {
                undo_widen(a, &w);
                return Err(format!("{}: memory_migrate: {e}", dir.display()));
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
        if let Err(e) = cgroup::write_set(&dir, SetKind::Mems, &wider) {
            undo_widen(a, &w);
            return Err(format!("widening {} mems: {e}", dir.display()));
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

/// Node of each page (`None` = not present or unmapped).
fn query(pid: u32, pages: &[u64]) -> Result<Vec<i32>, nix::Error> {
    let mut status = vec![0i32; pages.len()];
    sys::move_pages(pid, pages, None, &mut status)?;
    Ok(status)
}

fn gone_or(e: nix::Error, t: &mut Tally) -> Result<(), Gone> {
    if e == nix::Error::ESRCH {
        return Err(Gone);
    }
    if t.first_error.is_empty() {
        t.first_error = e.to_string();
    }
    Ok(())
}

/// Moves `pages` (all on `from`) to `to` and reads the result back. Returns (pages
/// now on `to`, pages still elsewhere).
///
/// The status array is not trusted alone: with transparent huge pages, moving one
/// address moves its whole 2 MiB page, and the kernel reports the other addresses of
/// that huge page as busy (or not at all when it stops early on a failure). What
/// counts is where each page is afterwards, so the batch is queried again, and pages
/// still on the source (transiently busy, e.g. under I/O) are tried once more.
fn move_batch(
    pid: u32,
    pages: &[u64],
    from: NodeId,
    to: NodeId,
    t: &mut Tally,
) -> Result<(u64, u64), Gone> {
    let mut todo: Vec<u64> = pages.to_vec();
    let mut moved = 0u64;
    // Pages that neither moved nor stayed on the source in the first attempt.
    let mut failed_elsewhere = 0u64;
    for attempt in 0..2 {
        if todo.is_empty() {
            break;
        }
        let nodes = vec![to as i32; todo.len()];
        // A value the kernel never writes: entries it did not reach stay visible.
        let mut st = vec![i32::MIN; todo.len()];
        let t_move = std::time::Instant::now();
        if let Err(e) = sys::move_pages(pid, &todo, Some(&nodes), &mut st) {
            gone_or(e, t)?;
        }
        let move_ns = t_move.elapsed().as_nanos() as u64;
        let t_query = std::time::Instant::now();
        let after = match query(pid, &todo) {
            Ok(s) => s,
            Err(e) => {
                gone_or(e, t)?;
                return Ok((moved, todo.len() as u64));
            }
        };
        tracing::trace!(
            pages = todo.len(),
            attempt,
            move_ns,
            query_ns = t_query.elapsed().as_nanos() as u64,
            busy = st.iter().filter(|s| **s == -libc::EBUSY).count(),
            "move_pages batch"
        );
        let mut stuck = 0u64;
        // Only pages still on the source are worth a second try.
        let mut retry = Vec::new();
        for ((p, now), reported) in todo.iter().zip(&after).zip(&st) {
            if *now == to as i32 {
                moved += 1;
                continue;
            }
            stuck += 1;
            if *now == from as i32 {
                retry.push(*p);
            }
            if *reported < 0 && *reported != i32::MIN && t.first_error.is_empty() {
                t.first_error = nix::Error::from_raw(-*reported).to_string();
            }
        }
        if attempt == 1 || retry.is_empty() {
            if stuck > 0 && t.first_error.is_empty() {
                t.first_error = "pages stayed on the source node".into();
            }
            return Ok((moved, stuck + failed_elsewhere));
        }
        stuck -= retry.len() as u64;
        failed_elsewhere += stuck;
        todo = retry;
    }
    Ok((moved, todo.len() as u64 + failed_elsewhere))
}

/// Windows of this many bytes, aligned to it, are scanned and moved one at a time,
/// each by one thread. The 2 MiB huge page size, so a transparent huge page never
/// straddles two windows and its pages are counted in the window that moved it, and
/// small enough that even a small move spreads over every thread (one window is one
/// default batch of 512 pages; hugetlbfs pages get a window of one huge page).
const WINDOW_BYTES: u64 = 2 << 20;

/// The aligned windows covering `ranges`, in the ranges' order (hottest first).
fn windows_of(ranges: &[(u64, u64)], page: u64) -> Vec<(u64, u64)> {
    let window = WINDOW_BYTES.max(page);
    let mut out = Vec::new();
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        let mut addr = start / page * page;
        while addr < end {
            let win_end = ((addr / window + 1) * window).min(end);
            out.push((addr, win_end));
            addr = win_end.div_ceil(page) * page;
        }
    }
    out
}

/// What the threads of one batched move share.
struct MoveJob<'a> {
    pid: u32,
    from: NodeId,
    to: NodeId,
    page: u64,
    batch: usize,
    windows: &'a [(u64, u64)],
    /// Index of the next window to take.
    next: std::sync::atomic::AtomicUsize,
    budget_pages: u64,
    /// Pages reserved from the budget by batches (started or done).
    reserved: std::sync::atomic::AtomicU64,
    /// Pages verified on the target so far, for progress.
    moved: std::sync::atomic::AtomicU64,
    gone: std::sync::atomic::AtomicBool,
    limit: &'a super::rate::RateLimit,
    progress: &'a std::sync::Mutex<Option<MigrationProgress>>,
}

impl MoveJob<'_> {
    /// Takes up to `want` pages of the budget; 0 when it is spent.
    fn reserve(&self, want: u64) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let mut cur = self.reserved.load(SeqCst);
        loop {
            let take = want.min(self.budget_pages.saturating_sub(cur));
            if take == 0 {
                return 0;
            }
            match self
                .reserved
                .compare_exchange(cur, cur + take, SeqCst, SeqCst)
            {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }

    /// One thread's share: windows are taken in order until none is left, the
    /// budget is spent, the VM is gone or the daemon stops.
    fn work(&self) -> Tally {
        use std::sync::atomic::Ordering::SeqCst;
        let mut t = Tally::default();
        loop {
            if self.gone.load(SeqCst) || t.cancelled {
                break;
            }
            let i = self.next.fetch_add(1, SeqCst);
            let Some(&(start, end)) = self.windows.get(i) else {
                break;
            };
            if self.reserved.load(SeqCst) >= self.budget_pages {
                break;
            }
            if self.window(start, end, &mut t).is_err() {
                self.gone.store(true, SeqCst);
                break;
            }
        }
        t
    }

    fn window(&self, start: u64, end: u64, t: &mut Tally) -> Result<(), Gone> {
        use std::sync::atomic::Ordering::SeqCst;
        let pages: Vec<u64> = (0..(end - start).div_ceil(self.page))
            .map(|i| start + i * self.page)
            .collect();
        let t_query = std::time::Instant::now();
        let status = match query(self.pid, &pages) {
            Ok(s) => s,
            Err(e) => return gone_or(e, t),
        };
        tracing::trace!(
            pages = pages.len(),
            query_ns = t_query.elapsed().as_nanos() as u64,
            "window scanned"
        );
        let on_src: Vec<u64> = pages
            .iter()
            .zip(&status)
            .filter(|(_, s)| **s == self.from as i32)
            .map(|(p, _)| *p)
            .collect();
        let mut chunks = on_src.chunks(self.batch);
        for chunk in chunks.by_ref() {
            if !self.limit.wait() {
                t.cancelled = true;
                t.left_pages += chunk.len() as u64;
                break;
            }
            let take = self.reserve(chunk.len() as u64) as usize;
            if take == 0 {
                t.left_pages += chunk.len() as u64;
                break;
            }
            let (moved, stuck) = move_batch(self.pid, &chunk[..take], self.from, self.to, t)?;
            // Unused reservation goes back to the budget.
            self.reserved.fetch_sub(take as u64 - moved, SeqCst);
            self.limit.spend(moved * self.page);
            t.verified_pages += moved;
            t.failed_pages += stuck;
            t.left_pages += stuck + (chunk.len() - take) as u64;
            let done = (self.moved.fetch_add(moved, SeqCst) + moved) * self.page;
            if let Ok(mut p) = self.progress.lock()
                && let Some(p) = p.as_mut().filter(|p| p.vm == self.pid)
            {
                p.moved_bytes = done.min(p.max_bytes);
            }
        }
        // Pages on the source never tried (budget spent, stop asked).
        t.left_pages += chunks.map(|c| c.len() as u64).sum::<u64>();
        Ok(())
    }
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.verified_pages += o.verified_pages;
        self.left_pages += o.left_pages;
        self.failed_pages += o.failed_pages;
        self.cancelled |= o.cancelled;
        if self.first_error.is_empty() {
            self.first_error = o.first_error;
        }
    }
}

/// Moves the pages of `ranges` that are on `from`, window by window, on up to
/// `migration_threads` threads. Windows are handed out in order, so with the hot
/// regions listed first they still move first.
fn batched_move(
    a: &mut LinuxApplier,
    vm: &Vm,
    from: NodeId,
    to: NodeId,
    ranges: &[(u64, u64)],
    max_bytes: u64,
    page: u64,
) -> Result<Tally, Gone> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    let windows = windows_of(ranges, page);
    let limit = a.limit.clone();
    let progress = a.progress.clone();
    let job = MoveJob {
        pid: vm.pid,
        from,
        to,
        page,
        batch: a.cfg.batch_pages.max(1) as usize,
        windows: &windows,
        next: AtomicUsize::new(0),
        budget_pages: max_bytes.div_ceil(page),
        reserved: AtomicU64::new(0),
        moved: AtomicU64::new(0),
        gone: AtomicBool::new(false),
        limit: &limit,
        progress: &progress,
    };
    let threads = a.cfg.migration_threads.clamp(1, windows.len().max(1));
    let mut t = Tally::default();
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(|| job.work())).collect();
        t.add(job.work());
        for h in helpers {
            // A panicking helper only loses its own count; the pages are where they are.
            if let Ok(x) = h.join() {
                t.add(x);
            }
        }
    });
    if job.gone.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Gone);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_node_free_memory_and_own_maps() {
        let free = read_node_free_bytes(Path::new("/sys/devices/system/node/node0"));
        assert!(free.unwrap() > 0);
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

    #[test]
    fn query_sees_own_touched_page_on_node_0() {
        let buf = vec![1u8; 1 << 16];
        let page = sys::page_size_bytes();
        let addr = (buf.as_ptr() as u64).div_ceil(page) * page;
        let s = query(std::process::id(), &[addr]).unwrap();
        assert_eq!(s, vec![0]);
        drop(buf);
    }
}
