//! The migration rate limit, shared by every thread that moves pages.
//!
//! Why a shared pacer rather than a per-move budget: a memory move runs on several
//! threads at once (move_pages is CPU-bound in the caller, and the daemon competes
//! with busy vCPUs for CPU time), and the operator's limit is for the whole host.
//! Each batch waits until the pacer admits it, and is charged from the moment it
//! starts: a batch that took longer than its bytes' share of the budget leaves no
//! pause behind it (charging from the end instead paused every slow mover for a
//! whole batch's budget after each batch, so the limit slowed moves that never
//! reached it). Admission reserves the batch's planned bytes under the pacer's lock
//! and the batch settles what it really moved afterwards: admitting first and
//! charging after the batch let every thread waiting at that moment through at
//! once, a burst of one batch per thread above the limit (a unit test caught four
//! threads finishing 8 MiB at 8 MiB/s in 0.75 s). Waiting ends early when the daemon
//! stops, so a shutdown never waits for the budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spaces page batches so that, on average, at most `bytes_per_s` move.
#[derive(Debug)]
pub struct RateLimit {
    /// Changed by a configuration reload while moves run.
    bytes_per_s: AtomicU64,
    /// Earliest instant the next batch may start.
    next_at: Mutex<Instant>,
    cancel: Arc<AtomicBool>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64, cancel: Arc<AtomicBool>) -> Self {
        Self {
            bytes_per_s: AtomicU64::new(bytes_per_s.max(1)),
            next_at: Mutex::new(Instant::now()),
            cancel,
        }
    }

    /// A new budget, for the batches charged from now on.
    pub fn set_bytes_per_s(&self, bytes_per_s: u64) {
        self.bytes_per_s
            .store(bytes_per_s.max(1), Ordering::Relaxed);
    }

    /// The budget's time for `bytes`.
    fn time_of(&self, bytes: u64) -> Duration {
        let rate = self.bytes_per_s.load(Ordering::Relaxed);
        Duration::from_secs_f64(bytes as f64 / rate as f64)
    }

    /// Waits until a batch of up to `planned_bytes` may start and reserves them from
    /// now; false when stopped meanwhile. The batch then [`settle`](Self::settle)s.
    pub fn wait(&self, planned_bytes: u64) -> bool {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            let next = {
                let mut g = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
                if now >= *g {
                    *g = now + self.time_of(planned_bytes);
                    return true;
                }
                *g
            };
            std::thread::sleep((next - now).min(Duration::from_millis(20)));
        }
    }

    /// Gives back the budget of the planned bytes a batch admitted by
    /// [`wait`](Self::wait) did not move (charges any it moved beyond them).
    pub fn settle(&self, planned_bytes: u64, moved_bytes: u64) {
        let mut g = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        if moved_bytes >= planned_bytes {
            *g += self.time_of(moved_bytes - planned_bytes);
        } else {
            let back = self.time_of(planned_bytes - moved_bytes);
            *g = g.checked_sub(back).unwrap_or(*g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_slower_than_the_limit_leaves_no_pause() {
        let r = RateLimit::new(4 << 20, Arc::new(AtomicBool::new(false)));
        // 1 MiB (250 ms of budget) that took 300 ms to move: the next may start now.
        assert!(r.wait(1 << 20));
        std::thread::sleep(Duration::from_millis(300));
        r.settle(1 << 20, 1 << 20);
        let t = Instant::now();
        assert!(r.wait(1 << 20));
        assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
    }

    #[test]
    fn spaces_batches_and_stops_on_cancel() {
        let flag = Arc::new(AtomicBool::new(false));
        let r = RateLimit::new(4 << 20, flag.clone());
        let t0 = Instant::now();
        assert!(r.wait(1 << 20)); // 250 ms of budget, from now
        assert!(r.wait(1 << 20));
        assert!(r.wait(64 << 20));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(490), "{waited:?}");
        assert!(waited < Duration::from_millis(900), "{waited:?}");
        // A stop request ends the wait at once, whatever budget is left.
        flag.store(true, Ordering::Relaxed);
        let t1 = Instant::now();
        assert!(!r.wait(1));
        assert!(t1.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn bytes_planned_but_not_moved_go_back_to_the_budget() {
        let r = RateLimit::new(4 << 20, Arc::new(AtomicBool::new(false)));
        // 4 MiB planned (a second of budget), none moved: the next may start now.
        assert!(r.wait(4 << 20));
        r.settle(4 << 20, 0);
        let t = Instant::now();
        assert!(r.wait(1 << 20));
        assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
    }

    #[test]
    fn threads_share_one_budget() {
        let r = Arc::new(RateLimit::new(8 << 20, Arc::new(AtomicBool::new(false))));
        let t0 = Instant::now();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..2 {
                        assert!(r.wait(1 << 20));
                        r.settle(1 << 20, 1 << 20);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        // 8 MiB at 8 MiB/s: the last batch starts after at least ~7/8 s, however
        // the threads are scheduled (each admission reserves its batch).
        assert!(
            t0.elapsed() >= Duration::from_millis(800),
            "{:?}",
            t0.elapsed()
        );
    }
}
