//! How much of a known VM one tick reads: all of it, or only its process `stat`.
//!
//! Reading a VM costs a few `/proc` files per thread (tests/results/scale-cost.md has
//! the profile: per-thread `stat`, per-vCPU `schedstat`, the cgroup and its cpuset,
//! `status`, the memory probe). At 200 VMs that was 6-8 % of a core every second,
//! although most VMs of a host are idle most of the time and nothing about them
//! changes: an idle vCPU neither runs nor moves, an idle guest's pages are neither
//! faulted nor migrated by the kernel's NUMA balancing (hinting faults need accesses).
//!
//! So a VM is **quiet** when its whole process (every thread, from the one `stat`
//! read a tick needs anyway to tell an exit or a reused pid) used less than
//! [`QUIET_CPUS`] since the tick before, and nothing says it changed: same thread
//! count, same resident size, its memory reading settled (not stale, no move of ours
//! running, local enough), no action of ours on it since its last full read (a
//! reading whose kept interval merely ran out is renewed at the next full read). A
//! quiet VM is reported as it was last read, with its demand from this tick's process
//! `stat`. It is read in full again as soon as one of those stops holding, and at
//! least every [`full_interval_ns`]: between 10 and 15 s, spread by pid so that VMs
//! that went quiet together (all of them, at the daemon's start) are not all read on
//! the same tick. That periodic read is what notices what no cheap signal shows (an
//! operator's `migratepages` or cpuset change on an idle VM).
//!
//! When a quiet VM wakes, its vCPUs' demand comes from `schedstat` over the interval
//! since their last read, which spans the quiet ticks. Those ticks used less than
//! [`QUIET_CPUS`] in all, so the run time of the interval is this tick's: the demand
//! is computed over the last tick, not averaged over the quiet period, and a VM that
//! wakes up is seen at its real demand on the tick it wakes.
//!
//! Which facts of a VM change only by an operator's hand (its cgroup and cpuset, the
//! `Mems_allowed` of its `status`) are read with the full read as well, not every
//! tick a busy VM is read: [`facts_due`].

/// A VM whose process used less CPU than this since the last tick (in CPUs, all its
/// threads together) may be quiet. An idle Linux guest under KVM uses well under a
/// hundredth of a CPU; one vCPU that runs a twentieth of the time is not idle.
pub const QUIET_CPUS: f64 = 0.05;

/// The base of the interval between two full reads of a quiet VM (see
/// [`full_interval_ns`]).
pub const FULL_READ_BASE_NS: u64 = 10_000_000_000;

/// The interval after which a quiet VM, or the slow facts of a busy one, are read in
/// full again: [`FULL_READ_BASE_NS`] plus up to half of it, by pid, so the full reads
/// of many VMs spread over the ticks.
pub fn full_interval_ns(pid: u32) -> u64 {
    // A multiplicative hash spreads neighbouring pids (VMs started together).
    let spread = u64::from(pid.wrapping_mul(2_654_435_761)) % 1000;
    FULL_READ_BASE_NS + FULL_READ_BASE_NS / 2 * spread / 1000
}

/// What the tick knows of a VM before reading more than its process `stat`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuietInput {
    /// The process's CPU use since the previous tick, in CPUs (`None` on first sight).
    pub demand_cpus: Option<f64>,
    /// Threads now and at the last full read.
    pub threads_now: u64,
    pub threads_at_read: u64,
    /// The resident size moved more than noise since the last full read.
    pub rss_moved: bool,
    /// The memory reading is settled: read, not stale, no move of ours running, and
    /// local at the last full read.
    pub memory_settled: bool,
    /// An action of the balancer touched the VM since its last full read.
    pub acted_on: bool,
    /// Time since the last full read (`None`: never read in full).
    pub since_full_read_ns: Option<u64>,
    /// This VM's [`full_interval_ns`].
    pub full_interval_ns: u64,
}

/// Whether this tick may report the VM as last read (module doc).
pub fn quiet(i: &QuietInput) -> bool {
    i.demand_cpus.is_some_and(|d| d < QUIET_CPUS)
        && i.threads_now == i.threads_at_read
        && !i.rss_moved
        && i.memory_settled
        && !i.acted_on
        && i.since_full_read_ns.is_some_and(|t| t < i.full_interval_ns)
}

/// Whether a read of a busy VM reads its slow facts (cgroup, cpuset, `status`) too:
/// on first sight, after an action of ours, when its threads changed, and every
/// [`full_interval_ns`].
pub fn facts_due(since_facts_ns: Option<u64>, full_interval_ns: u64, changed: bool) -> bool {
    changed || since_facts_ns.is_none_or(|t| t >= full_interval_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> QuietInput {
        QuietInput {
            demand_cpus: Some(0.01),
            threads_now: 6,
            threads_at_read: 6,
            rss_moved: false,
            memory_settled: true,
            acted_on: false,
            since_full_read_ns: Some(1_000_000_000),
            full_interval_ns: full_interval_ns(1234),
        }
    }

    /// One way a VM stops being quiet.
    type Change = (&'static str, fn(&mut QuietInput));

    #[test]
    fn an_idle_settled_vm_is_quiet_until_anything_says_it_changed() {
        assert!(quiet(&idle()));
        let cases: [Change; 8] = [
            ("busy", |i| i.demand_cpus = Some(0.2)),
            ("first sight", |i| i.demand_cpus = None),
            ("a thread came", |i| i.threads_now = 7),
            ("pages allocated", |i| i.rss_moved = true),
            ("memory not settled", |i| i.memory_settled = false),
            ("we acted on it", |i| i.acted_on = true),
            ("never read in full", |i| i.since_full_read_ns = None),
            ("full read due", |i| {
                i.since_full_read_ns = Some(i.full_interval_ns)
            }),
        ];
        for (what, change) in cases {
            let mut i = idle();
            change(&mut i);
            assert!(!quiet(&i), "{what}: must be read in full");
        }
    }

    #[test]
    fn full_reads_spread_between_one_and_one_and_a_half_base_intervals() {
        let intervals: Vec<u64> = (1000..1200).map(full_interval_ns).collect();
        assert!(
            intervals
                .iter()
                .all(|&t| (FULL_READ_BASE_NS..=FULL_READ_BASE_NS * 3 / 2).contains(&t))
        );
        // Neighbouring pids land across the range, not on one tick.
        let distinct_s: std::collections::BTreeSet<u64> =
            intervals.iter().map(|t| t / 1_000_000_000).collect();
        assert!(distinct_s.len() >= 5, "{distinct_s:?}");
    }

    #[test]
    fn slow_facts_are_read_first_on_change_and_at_the_interval() {
        let every = full_interval_ns(7);
        assert!(facts_due(None, every, false));
        assert!(!facts_due(Some(every - 1), every, false));
        assert!(facts_due(Some(every - 1), every, true));
        assert!(facts_due(Some(every), every, false));
    }
}
