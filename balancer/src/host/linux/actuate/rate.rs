//! The migration rate limit, shared by every thread that moves pages.
//!
//! Why a shared pacer rather than a per-move budget: a memory move runs on several
//! threads at once (move_pages is CPU-bound in the caller, and the daemon competes
//! with busy vCPUs for CPU time), and the operator's limit is for the whole host.
//! Each batch waits until the pacer allows it, then charges what it moved from the
//! moment it started: a batch that took longer than its bytes' share of the budget
//! leaves no pause behind it (charging from the end instead paused every slow
//! mover for a whole batch's budget after each batch, so the limit slowed moves
//! that never reached it). Waiting ends early when the daemon stops, so a shutdown
//! never waits for the budget.

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

    /// Waits until the next batch may start; false when stopped meanwhile.
    pub fn wait(&self) -> bool {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return false;
            }
            let next = self.next_at.lock().map_or_else(|p| *p.into_inner(), |g| *g);
            let now = Instant::now();
            if now >= next {
                return true;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(20)));
        }
    }

    /// Charges `bytes` moved by a batch that started at `started`.
    pub fn spend(&self, bytes: u64, started: Instant) {
        let rate = self.bytes_per_s.load(Ordering::Relaxed);
        let d = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let mut g = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        *g = (*g).max(started) + d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_slower_than_the_limit_leaves_no_pause() {
        let r = RateLimit::new(4 << 20, Arc::new(AtomicBool::new(false)));
        // 1 MiB (250 ms of budget) that took 300 ms to move: the next may start now.
        assert!(r.wait());
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        r.spend(1 << 20, started);
        let t = Instant::now();
        assert!(r.wait());
        assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
    }

    #[test]
    fn spaces_batches_and_stops_on_cancel() {
        let flag = Arc::new(AtomicBool::new(false));
        let r = RateLimit::new(4 << 20, flag.clone());
        let t0 = Instant::now();
        assert!(r.wait());
        r.spend(1 << 20, Instant::now()); // 250 ms of budget
        assert!(r.wait());
        r.spend(1 << 20, Instant::now());
        assert!(r.wait());
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(490), "{waited:?}");
        assert!(waited < Duration::from_millis(900), "{waited:?}");
        // A stop request ends the wait at once, whatever budget is left.
        r.spend(64 << 20, Instant::now());
        flag.store(true, Ordering::Relaxed);
        let t1 = Instant::now();
        assert!(!r.wait());
        assert!(t1.elapsed() < Duration::from_millis(100));
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
                        assert!(r.wait());
                        r.spend(1 << 20, Instant::now());
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        // 8 MiB at 8 MiB/s: the last batch starts after at least ~7/8 s.
        assert!(
            t0.elapsed() >= Duration::from_millis(800),
            "{:?}",
            t0.elapsed()
        );
    }
}
