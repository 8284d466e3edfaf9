//! Memory moves off the tick: one worker thread runs prepared moves in the order
//! they were handed over and sends each back with what the page mover did.
//!
//! Why: moving a VM's memory takes seconds (the rate limit alone spaces a 1 GiB move
//! over four of them at the default), and the daemon's tick must keep observing,
//! placing vCPUs and answering the watchdog meanwhile. The applier checks and
//! prepares a move on the tick (refusals stay immediate, nothing changes before
//! them), hands it here, and reports `ActionOutcome::Started`; the daemon collects
//! the real outcome on a later tick, when the journal entry of the move ends.
//!
//! One worker, not one per VM: the page mover already spreads a move over
//! `migration_threads` threads, and moves queued in plan order keep the engine's
//! priorities (VMs with remote hot memory first). A stop request (the rate limit's
//! cancel flag) ends the running move at its next batch boundary; queued moves then
//! end at once with nothing moved, each reported as stopped.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::MigrationProgress;
use super::memory::{self, Prepared};
use super::pages::{Gone, MoverSettings, Tally};
use super::rate::RateLimit;
use super::sys;

/// A move handed back by the worker.
pub type Ended = (Prepared, Result<Tally, Gone>);

/// The worker thread and its two queues.
pub struct MoveWorker {
    jobs: Option<Sender<Prepared>>,
    ended: Receiver<Ended>,
    thread: Option<JoinHandle<()>>,
    /// Moves handed over and not yet collected.
    in_flight: usize,
}

impl MoveWorker {
    /// Starts the worker; its threads (and the page mover's helper threads, which
    /// inherit it) run at `nice`.
    pub fn spawn(
        settings: MoverSettings,
        nice: i32,
        limit: Arc<RateLimit>,
        progress: Arc<Mutex<Option<MigrationProgress>>>,
    ) -> std::io::Result<Self> {
        let (jobs, inbox) = channel::<Prepared>();
        let (outbox, ended) = channel::<Ended>();
        let thread = std::thread::Builder::new()
            .name("vmb-mover".into())
            .spawn(move || {
                if let Err(e) = sys::set_own_nice(nice) {
                    tracing::warn!(nice, error = %e, "mover threads keep the daemon's priority");
                }
                for p in inbox {
                    let result = memory::move_prepared(&p, settings, &limit, &progress);
                    if outbox.send((p, result)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            ended,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Queues a prepared move; gives it back if the worker is gone.
    pub fn submit(&mut self, p: Prepared) -> Result<(), Box<Prepared>> {
        let Some(tx) = self.jobs.as_ref() else {
            return Err(Box::new(p));
        };
        match tx.send(p) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(Box::new(e.0)),
        }
    }

    /// Moves that ended since the last call, without waiting.
    pub fn ended(&mut self) -> Vec<Ended> {
        let mut out = Vec::new();
        while let Ok(e) = self.ended.try_recv() {
            out.push(e);
        }
        self.in_flight -= out.len().min(self.in_flight);
        out
    }

    /// Waits up to `limit` for every move handed over to end (after a stop request
    /// they end at their next batch boundary).
    pub fn wait_all(&mut self, limit: Duration) -> Vec<Ended> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while self.in_flight > out.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ended.recv_timeout(left) {
                Ok(e) => out.push(e),
                Err(_) => break,
            }
        }
        self.in_flight -= out.len().min(self.in_flight);
        out
    }
}

impl Drop for MoveWorker {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the move in hand.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
