//! Slots of tracked threads: the index under which the programs keep a thread's
//! state in the `names::THREADS` array, found through the thread id's entry in the
//! `names::TRACKED_SLOTS` array. Arrays, because the verifier inlines an array
//! lookup (a bounds check and an address) where a hash lookup is a call and a hash
//! of the key.
//!
//! This process is the only writer, so the assignment lives here, in memory:
//! - a thread gets a slot never used before while there is one, so slots are
//!   rarely reused at all;
//! - a freed slot is first *retired*: a program that read the thread's entry just
//!   before userspace cleared it may still be counting into the slot. It becomes
//!   free only after a grace period: `membarrier(MEMBARRIER_CMD_GLOBAL)`, which
//!   waits for an RCU grace period (`synchronize_rcu()`), and every program on a
//!   tracepoint, raw tracepoint, fentry, kprobe or perf event runs inside an RCU
//!   read-side section, so none that saw the old entry is still running when it
//!   returns. Where the kernel refuses that call (`nohz_full` CPUs, no membarrier),
//!   a slot becomes free [`RETIRE_FALLBACK`] after it was retired instead: not a
//!   proof, but a million times longer than a program runs.
//!
//! The caller resets the slot's state before it publishes the thread's entry, so the
//! new thread starts from zero (see `Telemetry::track`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a retired slot waits when the kernel offers no grace period.
pub const RETIRE_FALLBACK: Duration = Duration::from_secs(1);

/// No slot left: every one is held by a tracked thread or waits out its grace period.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("all {capacity} slots of tracked threads are in use")]
pub struct SlotsFull {
    pub capacity: u32,
}

/// The slot a tracked thread holds, and the VM it was tracked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub slot: u32,
    pub vm_pid: u32,
}

/// Which slot each tracked thread holds, and which slots can be handed out.
#[derive(Debug)]
pub struct Slots {
    capacity: u32,
    by_tid: HashMap<u32, Held>,
    /// Slots from here to `capacity` were never handed out.
    next_fresh: u32,
    /// Freed slots past their grace period.
    free: Vec<u32>,
    /// Freed slots a program may still write, with when they were freed.
    retired: Vec<(u32, Instant)>,
}

impl Slots {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            by_tid: HashMap::new(),
            next_fresh: 0,
            free: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// The slot of tracked thread `tid`, and its VM.
    pub fn get(&self, tid: u32) -> Option<Held> {
        self.by_tid.get(&tid).copied()
    }

    /// Tracked thread ids, in no particular order.
    pub fn tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_tid.keys().copied()
    }

    /// Gives thread `tid` (not tracked yet) of VM `vm_pid` a slot: a fresh one,
    /// else a free one, else retired ones once `grace_period` says every program has
    /// finished that could have seen them (it returns false when it could not wait).
    pub fn assign(
        &mut self,
        tid: u32,
        vm_pid: u32,
        grace_period: impl FnOnce() -> bool,
    ) -> Result<u32, SlotsFull> {
        debug_assert!(!self.by_tid.contains_key(&tid));
        let slot = if self.next_fresh < self.capacity {
            self.next_fresh += 1;
            self.next_fresh - 1
        } else {
            if self.free.is_empty() && !self.retired.is_empty() {
                self.end_grace(grace_period(), Instant::now());
            }
            self.free.pop().ok_or(SlotsFull {
                capacity: self.capacity,
            })?
        };
        self.by_tid.insert(tid, Held { slot, vm_pid });
        Ok(slot)
    }

    /// Takes thread `tid`'s slot away; it is handed out again only after a grace
    /// period. Call it once the thread's entry is cleared.
    pub fn release(&mut self, tid: u32) -> Option<u32> {
        let Held { slot, .. } = self.by_tid.remove(&tid)?;
        self.retired.push((slot, Instant::now()));
        Some(slot)
    }

    /// Frees every retired slot after a grace period (`waited`), else those retired
    /// [`RETIRE_FALLBACK`] before `now`.
    fn end_grace(&mut self, waited: bool, now: Instant) {
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|&(_, at)| waited || now.duration_since(at) >= RETIRE_FALLBACK);
        self.free.extend(done.into_iter().map(|(slot, _)| slot));
        self.retired = waiting;
    }
}

/// Waits until every eBPF program that was running has finished: one RCU grace
/// period, through `membarrier(MEMBARRIER_CMD_GLOBAL)`. False when the kernel
/// refuses it (`EINVAL` with `nohz_full` CPUs, `ENOSYS` without membarrier).
pub fn wait_for_running_programs() -> bool {
    /// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h): `synchronize_rcu()` on a
    /// machine with more than one CPU online, nothing to wait for on one.
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a system call with integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_slots_first_then_freed_ones_after_a_grace_period() {
        let mut s = Slots::new(2);
        assert_eq!(s.assign(10, 1, || panic!("no wait while fresh")), Ok(0));
        assert_eq!(s.assign(11, 1, || panic!("no wait while fresh")), Ok(1));
        assert_eq!(s.get(10), Some(Held { slot: 0, vm_pid: 1 }));
        assert_eq!(s.release(10), Some(0));
        assert_eq!(s.release(10), None, "released once");
        assert_eq!(s.get(10), None);
        // Full until the retired slot's grace period ends.
        let mut waits = 0;
        assert_eq!(
            s.assign(12, 1, || {
                waits += 1;
                true
            }),
            Ok(0)
        );
        assert_eq!(waits, 1);
        assert_eq!(
            s.assign(13, 1, || panic!("nothing retired")),
            Err(SlotsFull { capacity: 2 })
        );
        assert_eq!(s.get(13), None);
        let mut tids: Vec<u32> = s.tids().collect();
        tids.sort_unstable();
        assert_eq!(tids, vec![11, 12]);
    }

    #[test]
    fn without_a_grace_period_a_slot_waits_out_the_fallback() {
        let mut s = Slots::new(1);
        s.assign(1, 1, || true).unwrap();
        s.release(1);
        assert_eq!(s.assign(2, 1, || false), Err(SlotsFull { capacity: 1 }));
        let later = Instant::now() + RETIRE_FALLBACK;
        s.end_grace(false, later);
        assert_eq!(s.assign(2, 1, || panic!("already free")), Ok(0));
    }

    #[test]
    fn one_grace_period_frees_every_retired_slot() {
        let mut s = Slots::new(3);
        for tid in 1..=3 {
            s.assign(tid, 1, || true).unwrap();
        }
        for tid in 1..=3 {
            s.release(tid);
        }
        let mut waits = 0;
        for tid in 4..=6 {
            s.assign(tid, 1, || {
                waits += 1;
                true
            })
            .unwrap();
        }
        assert_eq!(waits, 1);
    }

    #[test]
    fn the_kernel_waits_for_running_programs() {
        // Any Linux this builds for has membarrier; nohz_full test machines do not.
        let nohz_full = std::fs::read_to_string("/sys/devices/system/cpu/nohz_full")
            .is_ok_and(|s| !s.trim().is_empty() && s.trim() != "(null)");
        if !nohz_full {
            assert!(wait_for_running_programs());
        }
    }
}
