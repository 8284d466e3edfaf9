//! Between two ticks: sleep until the next is due, or tick early when the observer
//! reports a [`Wake`].
//!
//! Why: at the default 1 s tick, what happens just after an observation is seen up
//! to a second later, and an imbalance acts from the second decision that sees it:
//! 1-2 s before the first move. The kernel tells us sooner: the process connector
//! reports a new qemu and its vCPU threads as they are named, the eBPF programs a
//! vCPU moved to another node or memory faulting remotely. The loop polls those
//! descriptors while it waits, and a wake starts the next tick early.
//!
//! Bounds, so that no host activity can make the daemon busy:
//! - ticks start at least a quarter of a tick apart ([`MIN_GAP_DIVISOR`]): a
//!   storm of wakes at most quadruples the tick rate, and the engine's budgets
//!   follow the real gap between snapshots down to the same quarter tick;
//! - a readiness that brings no wake (the connector reports every fork and exit on
//!   the host) is read, kept for the next observation, and the descriptors rest
//!   [`IDLE_POLL_GAP`] before the next poll: at most 20 such reads a second;
//! - the eBPF programs send one wake per observation (their switch, see
//!   `telemetry::WakeChannel`).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::run::Shutdown;
use crate::engine::MIN_GAP_DIVISOR;
use crate::host::{Observer, Wake};

/// How long the descriptors rest after a readiness that brought no wake.
pub const IDLE_POLL_GAP: Duration = Duration::from_millis(50);

/// How the wait between two ticks ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The next tick is due.
    Due,
    /// The observer reported these; the next tick starts now.
    Woken(Vec<Wake>),
    /// The daemon is stopping.
    Stop,
}

/// Waits from a tick that started at `tick_start` until the next is due (`tick`
/// later), the observer has a wake (only when `listen`: the configuration's
/// `wake_on_events`), or `shutdown` is triggered.
pub fn wait<O: Observer>(
    observer: &mut O,
    shutdown: &Shutdown,
    tick_start: Instant,
    tick: Duration,
    listen: bool,
) -> Waited {
    let due = tick_start + tick;
    let earliest = tick_start + tick / MIN_GAP_DIVISOR;
    loop {
        if shutdown.is_set() {
            return Waited::Stop;
        }
        let now = Instant::now();
        if now >= due {
            return Waited::Due;
        }
        let left = due - now;
        let readable = {
            let fds = if listen {
                observer.wake_fds()
            } else {
                Vec::new()
            };
            match shutdown.wake_fd() {
                Some(stop) if !fds.is_empty() => poll_fds(stop.as_fd(), &fds, left),
                _ => {
                    return if shutdown.wait_timeout(left) {
                        Waited::Stop
                    } else {
                        Waited::Due
                    };
                }
            }
        };
        match readable {
            Readable::Stop => return Waited::Stop,
            Readable::Nothing => continue,
            Readable::Wake => {}
            Readable::Failed => {
                return if shutdown.wait_timeout(left) {
                    Waited::Stop
                } else {
                    Waited::Due
                };
            }
        }
        let wakes = observer.take_wakes();
        if !wakes.is_empty() {
            let now = Instant::now();
            if now < earliest && shutdown.wait_timeout(earliest - now) {
                return Waited::Stop;
            }
            return Waited::Woken(wakes);
        }
        let rest = IDLE_POLL_GAP.min(due.saturating_duration_since(Instant::now()));
        if shutdown.wait_timeout(rest) {
            return Waited::Stop;
        }
    }
}

enum Readable {
    /// The stop descriptor.
    Stop,
    /// One of the observer's descriptors.
    Wake,
    /// Neither, before the timeout (or the poll was interrupted).
    Nothing,
    /// `poll` failed: this wait sleeps instead.
    Failed,
}

fn poll_fds(
    stop: std::os::fd::BorrowedFd<'_>,
    fds: &[std::os::fd::BorrowedFd<'_>],
    left: Duration,
) -> Readable {
    let mut all: Vec<PollFd<'_>> = std::iter::once(stop)
        .chain(fds.iter().copied())
        .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    // Whole milliseconds, rounded up, so the wait never ends just before it is due.
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    match poll(&mut all, timeout) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Readable::Nothing,
        Ok(_) => {
            let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            if ready(&all[0]) {
                Readable::Stop
            } else if all[1..].iter().any(ready) {
                Readable::Wake
            } else {
                Readable::Nothing
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "poll between ticks failed; sleeping instead");
            Readable::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Snapshot;
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::BorrowedFd;
    use std::sync::Arc;

    /// An observer whose one descriptor a test makes readable; reading it gives
    /// `wakes` (a readiness without a wake when empty).
    struct Poked {
        fd: Arc<EventFd>,
        wakes: Vec<Wake>,
        reads: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("not observed in these tests")]
    struct NotObserved;

    impl Observer for Poked {
        type Error = NotObserved;
        fn observe(&mut self) -> Result<Snapshot, NotObserved> {
            Err(NotObserved)
        }
        fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
            vec![self.fd.as_fd()]
        }
        fn take_wakes(&mut self) -> Vec<Wake> {
            let _ = self.fd.read();
            self.reads += 1;
            self.wakes.clone()
        }
    }

    fn poked(wakes: Vec<Wake>) -> Poked {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap();
        Poked {
            fd: Arc::new(fd),
            wakes,
            reads: 0,
        }
    }

    fn poke_after(fd: &Arc<EventFd>, after: Duration) {
        let fd = fd.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            fd.write(1).unwrap();
        });
    }

    const TICK: Duration = Duration::from_millis(800);

    #[test]
    fn a_wake_starts_the_tick_early_but_not_before_a_quarter_tick() {
        let wake = Wake::NewVm { pid: 42 };
        let mut obs = poked(vec![wake.clone()]);
        let stop = Shutdown::new();
        let start = Instant::now();
        poke_after(&obs.fd, Duration::from_millis(20));
        let waited = wait(&mut obs, &stop, start, TICK, true);
        let took = start.elapsed();
        assert_eq!(waited, Waited::Woken(vec![wake]));
        assert!(took >= TICK / MIN_GAP_DIVISOR, "{took:?}");
        assert!(took < TICK, "{took:?}");
    }

    #[test]
    fn readiness_without_a_wake_waits_for_the_tick_and_rests_between_polls() {
        let mut obs = poked(Vec::new());
        let stop = Shutdown::new();
        // Readable all along: a host forking all the time.
        obs.fd.write(1).unwrap();
        let fd = obs.fd.clone();
        let keep = std::thread::spawn(move || {
            for _ in 0..40 {
                let _ = fd.write(1);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let start = Instant::now();
        let waited = wait(&mut obs, &stop, start, TICK, true);
        keep.join().unwrap();
        assert_eq!(waited, Waited::Due);
        assert!(start.elapsed() >= TICK);
        // One read per rest, not one per event.
        let most = (TICK.as_millis() / IDLE_POLL_GAP.as_millis()) as u32 + 1;
        assert!(obs.reads <= most, "{} reads", obs.reads);
    }

    #[test]
    fn not_listening_waits_for_the_tick_whatever_is_readable() {
        let mut obs = poked(vec![Wake::NewVm { pid: 42 }]);
        let stop = Shutdown::new();
        obs.fd.write(1).unwrap();
        let start = Instant::now();
        assert_eq!(wait(&mut obs, &stop, start, TICK, false), Waited::Due);
        assert!(start.elapsed() >= TICK);
        assert_eq!(obs.reads, 0);
    }

    #[test]
    fn stopping_ends_the_wait_at_once() {
        let mut obs = poked(Vec::new());
        let stop = Shutdown::new();
        let s = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            s.trigger();
        });
        let start = Instant::now();
        assert_eq!(wait(&mut obs, &stop, start, TICK * 10, true), Waited::Stop);
        assert!(start.elapsed() < TICK, "{:?}", start.elapsed());
    }
}
