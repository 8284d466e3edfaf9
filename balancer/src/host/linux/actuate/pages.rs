//! The page mover: moves the pages of listed address ranges of a process from one
//! node to another with move_pages(2), in order, on several threads, under the
//! shared rate limit, and counts only pages seen on the target afterwards.
//!
//! # Where the time goes, and why the mover is shaped this way
//! Every move_pages call that moves pages first disables the per-CPU LRU caches
//! (`lru_cache_disable`: an expedited RCU grace period, then a drain on every CPU
//! that waits for a kworker to run there) and re-enables them at the end. On a host
//! whose CPUs are all busy with vCPU threads that fixed cost dominates small calls:
//! in the 4-node lab guest, calls of 512 pages moved about 25 MB/s where one
//! migrate_pages(2) call over the same memory moved about 550 MB/s
//! (tests/results/lab-bench-mover.md measures both in one guest run). Per page the
//! two paths do the same work (isolate, unmap, copy, remap), so the mover makes
//! calls large: a batch is up to `batch_pages` pages gathered across the ranges in
//! their order (hot first), one call moves all of them.
//!
//! Where each page is comes from move_pages with no target nodes (`do_pages_stat`:
//! a page-table lookup, no LRU drain, no copy), so only pages really on the source
//! are asked to move: nothing moves twice, and pages on a third node are left to a
//! move of their own. After the call, the status the kernel wrote is trusted for
//! pages it reports on the target; only the others are queried again (with
//! transparent huge pages the kernel moves a whole 2 MiB page for its first address
//! and reports the other 511 as busy) and pages still on the source get one more
//! try, so transiently busy pages (under I/O, pinned for a moment) are not lost.
//!
//! # What it does not use, and why
//! - migrate_pages(2) moves every page of the process on the source node in one
//!   call: no hot-first order, no rate limit, no stop at a batch boundary, and
//!   nothing to bound how long the call holds the process's mmap lock.
//! - mbind(2) with `MPOL_MF_MOVE` moves a range at migrate_pages' speed but only in
//!   the calling process's own address space, and it also rewrites that range's
//!   memory policy: it cannot move a VM's memory from outside the VM.
//!
//! # Threads
//! Batches are handed out in order to `threads` threads that share one rate limit
//! ([`super::rate`]), so hot batches still go first; the kernel's per-call fixed
//! cost and the copy of one thread overlap with the others'. A stop request is seen
//! between two batches.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};

use super::rate::RateLimit;
use super::sys;
use crate::model::NodeId;

/// The 2 MiB transparent huge page size. Batches start and end on multiples of it
/// (for pages of ranges that do), so a huge page never straddles two batches and its
/// pages are counted by the batch that moved it.
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;

/// How moves are carried out (from the daemon's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoverSettings {
    /// Threads moving one VM's pages at once.
    pub threads: usize,
    /// Most pages one move_pages call is asked to move.
    pub batch_pages: u64,
}

/// Longest a batch may take of the rate limit's budget. A batch moves whole and is
/// charged after it moved: under a low limit, one batch of the full size would move
/// many seconds' worth of pages at once, in whatever order it holds, and then wait,
/// so the limit would no longer space moves and a cold batch could run far ahead
/// of hot pages planned a tick later.
pub const BATCH_BUDGET_MS: u64 = 250;

/// The batch size for a rate limit: `batch_pages`, or fewer where the limit allows
/// fewer in [`BATCH_BUDGET_MS`] (at least one page). At the default limit (256 MiB/s)
/// and 4 KiB pages that is 16384 pages, above the default batch.
pub fn paced_batch_pages(batch_pages: u64, rate_limit_bytes_per_s: u64, page_bytes: u64) -> u64 {
    let paced = rate_limit_bytes_per_s.saturating_mul(BATCH_BUDGET_MS) / 1000 / page_bytes.max(1);
    batch_pages.min(paced).max(1)
}

/// One move: pages of `ranges` (in their order) found on `from` go to `to`, at most
/// `budget_bytes` of them.
#[derive(Clone, Copy, Debug)]
pub struct PageMove<'a> {
    pub pid: u32,
    pub from: NodeId,
    pub to: NodeId,
    /// `(start address, length in bytes)`, hottest first.
    pub ranges: &'a [(u64, u64)],
    /// The step between page addresses: the base page size, or a hugetlbfs page
    /// size (such pages move whole, through their first address).
    pub page_bytes: u64,
    pub budget_bytes: u64,
}

/// What a move did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Pages seen on the target after their batch.
    pub verified_pages: u64,
    /// Pages found on the source and not moved (budget spent, failures, stop).
    pub left_pages: u64,
    /// Pages asked to move that did not reach the target.
    pub failed_pages: u64,
    /// The first error seen, for the outcome's reason.
    pub first_error: String,
    /// A stop request ended the move between two batches.
    pub cancelled: bool,
    /// move_pages calls that moved pages (not counting queries).
    pub move_calls: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.verified_pages += o.verified_pages;
        self.left_pages += o.left_pages;
        self.failed_pages += o.failed_pages;
        self.cancelled |= o.cancelled;
        self.move_calls += o.move_calls;
        if self.first_error.is_empty() {
            self.first_error = o.first_error;
        }
    }

    fn note_error(&mut self, why: impl FnOnce() -> String) {
        if self.first_error.is_empty() {
            self.first_error = why();
        }
    }
}

/// The process exited during the move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone;

/// Moves the pages of `m` that are on `m.from` to `m.to`, on `settings.threads`
/// threads of its own. `on_progress` receives the bytes verified on the target so
/// far, after every batch. The daemon's movers run the same [`Job`]s from a pool
/// shared by all moves ([`super::worker`]).
pub fn move_pages_between(
    m: &PageMove<'_>,
    settings: MoverSettings,
    limit: &RateLimit,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<Tally, Gone> {
    let job = Job::new(m, settings.batch_pages);
    let threads = settings.threads.clamp(1, job.batches.len().max(1));
    let work = || {
        while let Some(i) = job.claim() {
            job.run(i, limit);
            on_progress(job.moved_bytes());
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    job.result()
}

/// Node of each page (`-ENOENT` etc. for pages not present).
pub fn query_nodes(pid: u32, pages: &[u64]) -> Result<Vec<i32>, nix::Error> {
    let mut status = vec![0i32; pages.len()];
    sys::move_pages(pid, pages, None, &mut status)?;
    Ok(status)
}

/// A batch: pieces `(start, end)` of the ranges, in order, page-aligned.
type Batch = Vec<(u64, u64)>;

/// Splits `ranges` into batches of at most `batch_pages` pages each, in order. A
/// batch ends early only where a 2 MiB boundary allows (see [`HUGE_PAGE_BYTES`]).
fn batches_of(ranges: &[(u64, u64)], page: u64, batch_pages: u64) -> Vec<Batch> {
    let align = HUGE_PAGE_BYTES.max(page);
    // At least one aligned block per batch, so a batch always makes progress.
    let batch_bytes = (batch_pages.saturating_mul(page)).max(align) / align * align;
    let mut out: Vec<Batch> = Vec::new();
    let mut cur: Batch = Vec::new();
    let mut cur_bytes = 0u64;
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        let mut addr = start / page * page;
        while addr < end {
            // The next piece ends at the range's end, or where the batch is full,
            // rounded down to an aligned boundary when that still leaves a piece.
            let room = batch_bytes - cur_bytes;
            let mut piece_end = end.min(addr.saturating_add(room));
            if piece_end < end {
                let aligned = piece_end / align * align;
                if aligned > addr {
                    piece_end = aligned;
                } else if !cur.is_empty() {
                    // Nothing aligned fits: close this batch, retry in a new one.
                    out.push(std::mem::take(&mut cur));
                    cur_bytes = 0;
                    continue;
                }
            }
            let piece_end = piece_end.div_ceil(page) * page;
            cur.push((addr, piece_end));
            cur_bytes += piece_end - addr;
            addr = piece_end;
            if cur_bytes >= batch_bytes {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// One move cut into batches, which any number of threads take in order. It owns
/// what it needs, so a pool of threads can hold several moves at once and hand out
/// the batches of the most urgent one first.
#[derive(Debug)]
pub struct Job {
    pid: u32,
    from: NodeId,
    to: NodeId,
    page: u64,
    batches: Vec<Batch>,
    /// Index of the next batch to take.
    next: AtomicUsize,
    budget_pages: u64,
    /// Pages reserved from the budget by batches (started or done).
    reserved: AtomicU64,
    /// Pages verified on the target so far.
    moved: AtomicU64,
    gone: AtomicBool,
    cancelled: AtomicBool,
    tally: Mutex<Tally>,
}

impl Job {
    /// The batches of `m`, at most `batch_pages` pages each.
    pub fn new(m: &PageMove<'_>, batch_pages: u64) -> Self {
        let page = m.page_bytes.max(1);
        Self {
            pid: m.pid,
            from: m.from,
            to: m.to,
            page,
            batches: batches_of(m.ranges, page, batch_pages.max(1)),
            next: AtomicUsize::new(0),
            budget_pages: m.budget_bytes.div_ceil(page),
            reserved: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            tally: Mutex::new(Tally::default()),
        }
    }

    /// Whether a batch may still be taken: some are left, the budget is not spent,
    /// the process is there and no stop request ended the move.
    pub fn open(&self) -> bool {
        !self.gone.load(SeqCst)
            && !self.cancelled.load(SeqCst)
            && self.next.load(SeqCst) < self.batches.len()
            && self.reserved.load(SeqCst) < self.budget_pages
    }

    /// Batches taken so far.
    pub fn taken(&self) -> usize {
        self.next.load(SeqCst).min(self.batches.len())
    }

    /// Takes the next batch, if the move is still [`open`](Self::open).
    pub fn claim(&self) -> Option<usize> {
        if !self.open() {
            return None;
        }
        let i = self.next.fetch_add(1, SeqCst);
        (i < self.batches.len()).then_some(i)
    }

    /// Runs batch `i` (from [`claim`](Self::claim)) and adds what it did to the tally.
    pub fn run(&self, i: usize, limit: &RateLimit) {
        let Some(batch) = self.batches.get(i) else {
            return;
        };
        let mut t = Tally::default();
        if self.batch(batch, &mut t, limit).is_err() {
            self.gone.store(true, SeqCst);
        }
        if t.cancelled {
            self.cancelled.store(true, SeqCst);
        }
        if let Ok(mut all) = self.tally.lock() {
            all.add(t);
        }
    }

    /// Bytes verified on the target so far.
    pub fn moved_bytes(&self) -> u64 {
        self.moved.load(SeqCst) * self.page
    }

    /// What the move did, once no batch is running any more.
    pub fn result(&self) -> Result<Tally, Gone> {
        if self.gone.load(SeqCst) {
            return Err(Gone);
        }
        Ok(self.tally.lock().map(|t| t.clone()).unwrap_or_default())
    }

    /// Takes up to `want` pages of the budget; 0 when it is spent.
    fn reserve(&self, want: u64) -> u64 {
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

    fn batch(&self, pieces: &[(u64, u64)], t: &mut Tally, limit: &RateLimit) -> Result<(), Gone> {
        let pages: Vec<u64> = pieces
            .iter()
            .flat_map(|&(s, e)| (s..e).step_by(self.page as usize))
            .collect();
        let t_query = std::time::Instant::now();
        let status = match query_nodes(self.pid, &pages) {
            Ok(s) => s,
            Err(e) => return gone_or(e, t),
        };
        let on_src: Vec<u64> = pages
            .iter()
            .zip(&status)
            .filter(|(_, s)| **s == self.from as i32)
            .map(|(p, _)| *p)
            .collect();
        tracing::trace!(
            pages = pages.len(),
            on_source = on_src.len(),
            query_ns = t_query.elapsed().as_nanos() as u64,
            "batch scanned"
        );
        if on_src.is_empty() {
            return Ok(());
        }
        let planned_bytes = on_src.len() as u64 * self.page;
        if !limit.wait(planned_bytes) {
            t.cancelled = true;
            t.left_pages += on_src.len() as u64;
            return Ok(());
        }
        let take = self.reserve(on_src.len() as u64) as usize;
        let (moved, stuck) = if take > 0 {
            move_and_verify(self.pid, self.from, self.to, &on_src[..take], t)?
        } else {
            (0, 0)
        };
        // Unused reservation goes back to the budget.
        self.reserved.fetch_sub(take as u64 - moved, SeqCst);
        limit.settle(planned_bytes, moved * self.page);
        t.verified_pages += moved;
        t.failed_pages += stuck;
        t.left_pages += stuck + (on_src.len() - take) as u64;
        self.moved.fetch_add(moved, SeqCst);
        Ok(())
    }
}

fn gone_or(e: nix::Error, t: &mut Tally) -> Result<(), Gone> {
    if e == nix::Error::ESRCH {
        return Err(Gone);
    }
    t.note_error(|| e.to_string());
    Ok(())
}

/// Moves `pages` (all seen on the source) to the target. Returns (pages now on the
/// target, pages that are not).
fn move_and_verify(
    pid: u32,
    from: NodeId,
    to: NodeId,
    pages: &[u64],
    t: &mut Tally,
) -> Result<(u64, u64), Gone> {
    let mut todo: Vec<u64> = pages.to_vec();
    let mut moved = 0u64;
    let mut failed = 0u64;
    for attempt in 0..2 {
        let nodes = vec![to as i32; todo.len()];
        // A value the kernel never writes: entries it did not reach stay visible.
        let mut st = vec![i32::MIN; todo.len()];
        let t_move = std::time::Instant::now();
        t.move_calls += 1;
        if let Err(e) = sys::move_pages(pid, &todo, Some(&nodes), &mut st) {
            gone_or(e, t)?;
        }
        let move_ns = t_move.elapsed().as_nanos() as u64;
        // The kernel's word is enough for pages it put on the target; the rest
        // (huge-page tails reported busy, entries it never reached) are looked up.
        let unsure: Vec<usize> = (0..todo.len()).filter(|&i| st[i] != to as i32).collect();
        moved += (todo.len() - unsure.len()) as u64;
        let unsure_pages: Vec<u64> = unsure.iter().map(|&i| todo[i]).collect();
        let after = if unsure_pages.is_empty() {
            Vec::new()
        } else {
            match query_nodes(pid, &unsure_pages) {
                Ok(s) => s,
                Err(e) => {
                    gone_or(e, t)?;
                    return Ok((moved, failed + unsure_pages.len() as u64));
                }
            }
        };
        tracing::trace!(
            pages = todo.len(),
            attempt,
            move_ns,
            looked_up = unsure_pages.len(),
            "move_pages batch"
        );
        let mut retry = Vec::new();
        for (&i, now) in unsure.iter().zip(&after) {
            if *now == to as i32 {
                moved += 1;
            } else if *now == from as i32 && attempt == 0 {
                retry.push(todo[i]);
            } else {
                failed += 1;
            }
            let reported = st[i];
            if *now != to as i32 && reported < 0 && reported != i32::MIN {
                t.note_error(|| nix::Error::from_raw(-reported).to_string());
            }
        }
        if retry.is_empty() {
            break;
        }
        todo = retry;
    }
    if failed > 0 {
        t.note_error(|| "pages stayed on the source node".into());
    }
    Ok((moved, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pages_in(b: &Batch, page: u64) -> u64 {
        b.iter().map(|(s, e)| (e - s) / page).sum()
    }

    #[test]
    fn batches_keep_order_size_and_huge_page_boundaries() {
        let page = 4096;
        // 10 MiB from an aligned start, batches of 1024 pages (4 MiB).
        let b = batches_of(&[(64 * MIB, 10 * MIB)], page, 1024);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], vec![(64 * MIB, 68 * MIB)]);
        assert_eq!(b[1], vec![(68 * MIB, 72 * MIB)]);
        assert_eq!(b[2], vec![(72 * MIB, 74 * MIB)]);
        // Small hot regions are gathered into one batch, in their order.
        let hot = [
            (100 * MIB, 64 << 10),
            (10 * MIB, 128 << 10),
            (50 * MIB, 4096),
        ];
        let b = batches_of(&hot, page, 1024);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0],
            vec![
                (100 * MIB, 100 * MIB + (64 << 10)),
                (10 * MIB, 10 * MIB + (128 << 10)),
                (50 * MIB, 50 * MIB + 4096)
            ]
        );
        // An unaligned range is cut on 2 MiB boundaries, never inside a huge page.
        let b = batches_of(&[(MIB, 6 * MIB)], page, 512);
        for batch in &b {
            for &(s, e) in batch {
                assert!(s == MIB || s % (2 * MIB) == 0, "{s:#x}");
                assert!(e == 7 * MIB || e % (2 * MIB) == 0, "{e:#x}");
            }
        }
        let total: u64 = b.iter().map(|x| pages_in(x, page)).sum();
        assert_eq!(total, 6 * MIB / page);
        // Batches smaller than a huge page are rounded up to one.
        let b = batches_of(&[(0, 8 * MIB)], page, 16);
        assert_eq!(b.len(), 4);
        // hugetlbfs pages of 1 GiB: one page per batch at least.
        let gib = 1 << 30;
        let b = batches_of(&[(gib, 2 * gib)], gib, 512);
        assert_eq!(b.iter().map(|x| pages_in(x, gib)).sum::<u64>(), 2);
    }

    #[test]
    fn low_rate_limits_shrink_batches() {
        // The default limit leaves the default batch alone.
        assert_eq!(paced_batch_pages(8192, 256 << 20, 4096), 8192);
        // 8 MiB/s: a quarter of a second is 2 MiB, 512 pages.
        assert_eq!(paced_batch_pages(8192, 8 << 20, 4096), 512);
        // Never below one page.
        assert_eq!(paced_batch_pages(8192, 4096, 4096), 1);
    }

    #[test]
    fn every_page_lands_in_exactly_one_batch() {
        let page = 4096;
        let ranges = [
            (3 * MIB + 8192, 5 * MIB),
            (40 * MIB, 4096),
            (41 * MIB, 2 * MIB + 12288),
        ];
        for batch_pages in [1, 7, 512, 600, 5000] {
            let b = batches_of(&ranges, page, batch_pages);
            let mut seen: Vec<u64> = b
                .iter()
                .flat_map(|x| x.iter().flat_map(|&(s, e)| (s..e).step_by(4096)))
                .collect();
            let want: Vec<u64> = ranges
                .iter()
                .flat_map(|&(s, l)| (s..s + l).step_by(4096))
                .collect();
            assert_eq!(seen, want, "order, batch {batch_pages}");
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), want.len(), "duplicates, batch {batch_pages}");
        }
    }

    #[test]
    fn query_sees_own_touched_page_on_node_0() {
        let buf = vec![1u8; 1 << 16];
        let page = sys::page_size_bytes();
        let addr = (buf.as_ptr() as u64).div_ceil(page) * page;
        let s = query_nodes(std::process::id(), &[addr]).unwrap();
        assert_eq!(s, vec![0]);
        drop(buf);
    }

    #[test]
    fn moving_onto_the_node_the_pages_are_on_moves_nothing() {
        // This host may have one node: a move 0 -> 0 finds every page "on the source"
        // and the kernel reports them on the target; all are verified, none fail.
        let mut buf = vec![0u8; 4 << 20];
        for i in (0..buf.len()).step_by(4096) {
            buf[i] = 1;
        }
        let page = sys::page_size_bytes();
        let start = (buf.as_ptr() as u64).div_ceil(page) * page;
        let ranges = [(start, 2 << 20)];
        let m = PageMove {
            pid: std::process::id(),
            from: 0,
            to: 0,
            ranges: &ranges,
            page_bytes: page,
            budget_bytes: 1 << 30,
        };
        let limit = RateLimit::new(1 << 40, std::sync::Arc::new(AtomicBool::new(false)));
        let seen = AtomicU64::new(0);
        let t = move_pages_between(
            &m,
            MoverSettings {
                threads: 2,
                batch_pages: 128,
            },
            &limit,
            &|b| seen.store(b, SeqCst),
        )
        .unwrap();
        assert_eq!(t.failed_pages, 0, "{t:?}");
        assert_eq!(t.verified_pages, (2 << 20) / page, "{t:?}");
        assert_eq!(seen.load(SeqCst), 2 << 20);
        drop(buf);
    }
}
