//! Memory moves off the tick: a pool of mover threads runs the batches of every
//! prepared move handed over, the most urgent move's first, and sends each move back
//! with what the page mover did once its last batch ended.
//!
//! Why off the tick: moving a VM's memory takes seconds, and the daemon's tick must
//! keep observing, placing vCPUs and answering the watchdog meanwhile. The applier
//! checks and prepares a move on the tick (refusals stay immediate, nothing changes
//! before them), hands it here, and reports `ActionOutcome::Started`; the daemon
//! collects the real outcome on a later tick, when the journal entry of the move
//! ends.
//!
//! Why one pool for all moves, handing out batches rather than moves: a decision
//! starts many small moves at once (the hot regions of each VM on each source node,
//! often a single batch each). Run one move after the other, each on its own
//! threads, a one-batch move used one thread while the others waited, and the last
//! VM's hot set waited for every move queued before it: in the lab's `scattered`
//! case (8 VMs x 384 MiB) the hot sets took half a minute to come home. Here the
//! `migration_threads` threads always take the next batch of the most urgent move
//! that has one: moves of listed (hot) regions before moves of whole source nodes.
//! Hot moves take turns batch by batch, so the hottest batch of every VM goes before
//! the second of any; the others go in the order they were handed over (the
//! engine's order: VMs with remote hot memory first). A stop request (the rate limit's cancel flag) ends every move at
//! its next batch boundary; moves not started yet then end at once with nothing
//! moved, each reported as stopped.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::MigrationProgress;
use super::memory::Prepared;
use super::pages::{Gone, Job, MoverSettings, Tally};
use super::rate::RateLimit;
use super::sys;

/// A move handed back by the pool.
pub type Ended = (Prepared, Result<Tally, Gone>);

/// A move in the pool.
struct Entry {
    prepared: Prepared,
    job: Arc<Job>,
    /// Moves of listed regions go first.
    hot: bool,
    /// Order of hand-over.
    seq: u64,
    /// Batches of it running now.
    running: usize,
    /// A batch of it was taken (status shows it from then on).
    started: bool,
}

/// What the mover threads share, under one lock.
struct Queue {
    entries: Vec<Entry>,
    next_seq: u64,
    /// No more moves come: threads leave once the queue is empty.
    closed: bool,
    outbox: Sender<Ended>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    limit: Arc<RateLimit>,
    progress: Arc<Mutex<Vec<MigrationProgress>>>,
}

/// The mover threads and the queue of ended moves.
pub struct MoveWorker {
    shared: Arc<Shared>,
    ended: Receiver<Ended>,
    threads: Vec<JoinHandle<()>>,
    /// Moves handed over and not yet collected.
    in_flight: usize,
}

impl MoveWorker {
    /// Starts `settings.threads` mover threads at `nice`.
    pub fn spawn(
        settings: MoverSettings,
        nice: i32,
        limit: Arc<RateLimit>,
        progress: Arc<Mutex<Vec<MigrationProgress>>>,
    ) -> std::io::Result<Self> {
        let (outbox, ended) = channel::<Ended>();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                entries: Vec::new(),
                next_seq: 0,
                closed: false,
                outbox,
            }),
            wake: Condvar::new(),
            limit,
            progress,
        });
        let mut worker = Self {
            shared: shared.clone(),
            ended,
            threads: Vec::new(),
            in_flight: 0,
        };
        for i in 0..settings.threads.max(1) {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("vmb-mover-{i}"))
                .spawn(move || {
                    // Nice is per thread on Linux: each mover sets its own.
                    if let Err(e) = sys::set_own_nice(nice) {
                        tracing::warn!(nice, error = %e, "a mover thread keeps the daemon's priority");
                    }
                    serve(&shared);
                })?;
            worker.threads.push(t);
        }
        Ok(worker)
    }

    /// Queues a prepared move, cut into batches of `batch_pages`; gives it back if
    /// the pool no longer takes moves.
    pub fn submit(&mut self, p: Prepared, batch_pages: u64) -> Result<(), Box<Prepared>> {
        let Ok(mut q) = self.shared.queue.lock() else {
            return Err(Box::new(p));
        };
        if q.closed || self.threads.is_empty() {
            return Err(Box::new(p));
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        q.entries.push(Entry {
            job: Arc::new(Job::new(&p.page_move(), batch_pages)),
            hot: p.is_hot(),
            prepared: p,
            seq,
            running: 0,
            started: false,
        });
        drop(q);
        self.shared.wake.notify_all();
        self.in_flight += 1;
        Ok(())
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
        // Closing the queue ends the threads once the moves handed over ended.
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One mover thread: takes the most urgent open batch, runs it, hands back moves
/// whose last batch ended; sleeps while there is nothing to take.
fn serve(shared: &Shared) {
    let Ok(mut q) = shared.queue.lock() else {
        return;
    };
    loop {
        q = retire(shared, q);
        if let Some((seq, job, batch)) = take(&mut q) {
            publish(shared, &q);
            drop(q);
            job.run(batch, &shared.limit);
            drop(job);
            let Ok(g) = shared.queue.lock() else {
                return;
            };
            q = g;
            if let Some(e) = q.entries.iter_mut().find(|e| e.seq == seq) {
                e.running -= 1;
            }
            publish(shared, &q);
            // A move this batch finished may be handed back by any thread.
            shared.wake.notify_all();
            continue;
        }
        if q.closed && q.entries.is_empty() {
            return;
        }
        q = match shared.wake.wait(q) {
            Ok(g) => g,
            Err(_) => return,
        };
    }
}

/// The next batch of the most urgent move that has one: hot moves first, taking
/// turns (the first, hottest batch of every hot move before the second of any), then
/// the others in hand-over order.
fn take(q: &mut Queue) -> Option<(u64, Arc<Job>, usize)> {
    let mut order: Vec<usize> = (0..q.entries.len()).collect();
    order.sort_by_key(|&i| {
        let e = &q.entries[i];
        (!e.hot, if e.hot { e.job.taken() } else { 0 }, e.seq)
    });
    for i in order {
        let e = &mut q.entries[i];
        if let Some(batch) = e.job.claim() {
            e.running += 1;
            e.started = true;
            return Some((e.seq, e.job.clone(), batch));
        }
    }
    None
}

/// Hands back every move with no batch left to take and none running.
fn retire<'a>(shared: &'a Shared, mut q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
    let mut i = 0;
    let mut done = Vec::new();
    while i < q.entries.len() {
        let e = &q.entries[i];
        if e.running > 0 || e.job.open() {
            i += 1;
            continue;
        }
        done.push(q.entries.remove(i));
    }
    if done.is_empty() {
        return q;
    }
    // Status stops listing the moves before they are handed back: whoever receives
    // one never sees it still running.
    publish(shared, &q);
    for e in done {
        let result = e.job.result();
        // The receiver is gone only when the applier is: nobody waits for it then.
        let _ = q.outbox.send((e.prepared, result));
    }
    q
}

/// Status's list of the moves running, from the queue.
fn publish(shared: &Shared, q: &Queue) {
    if let Ok(mut g) = shared.progress.lock() {
        *g = q
            .entries
            .iter()
            .filter(|e| e.started)
            .map(|e| e.prepared.progress(e.job.moved_bytes()))
            .collect();
    }
}
