//! What the engine remembers between decisions, as plain data: for every placement
//! unit (a VM, or one guest NUMA cell of a big VM) its home nodes, its probation phase,
//! when it last moved and its recent burst history (reverted probations and the peak
//! demand seen). Nothing else carries over, so a decision depends only on
//! (snapshot, this state, config).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{NodeId, VmId};

/// A unit of placement: a whole VM (`cell: None`) or one of its guest NUMA cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnitKey {
    pub vm: VmId,
    pub cell: Option<u32>,
}

/// Where a unit is in its move life cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Home is final; memory follows lazily until the locality target is met.
    Settled,
    /// CPUs moved to `home` at `since_ns`; memory still where it was (`from`).
    Probation {
        since_ns: u64,
        from: Vec<NodeId>,
        /// The unit's demand readings (CPUs) summed over the second half of the
        /// window, and how many: the need is judged on their mean, so one noisy
        /// reading at the end cannot decide alone.
        #[serde(default)]
        late_demand_sum: f64,
        #[serde(default)]
        late_samples: u32,
    },
}

impl Phase {
    /// A probation that starts at `since_ns`, with memory still on `from`.
    pub fn probation(since_ns: u64, from: Vec<NodeId>) -> Self {
        Phase::Probation {
            since_ns,
            from,
            late_demand_sum: 0.0,
            late_samples: 0,
        }
    }
}

/// Engine memory of one unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitState {
    /// Nodes whose CPUs the unit runs on (one node unless it spans).
    pub home: Vec<NodeId>,
    pub phase: Phase,
    /// Last rebalancing move (or revert), for the hysteresis window.
    pub last_move_ns: Option<u64>,
    /// Recent bursts, for recurrence awareness (`recurrence.rs`).
    #[serde(default)]
    pub bursts: BurstMemory,
}

/// What the engine remembers of a unit's bursts: when its probations were reverted
/// (the need went away) and its recent peak CPU demand.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BurstMemory {
    /// `Snapshot::now_ns` of each reverted probation within the recurrence window,
    /// oldest first.
    pub reverts_ns: Vec<u64>,
    /// Recent peak CPU demand (CPUs); it fades linearly to 0 over one recurrence
    /// window after `peak_ns` (see `recurrence.rs`).
    pub peak_demand: f64,
    /// When the unit last reached (three quarters of) that peak.
    pub peak_ns: u64,
    /// Earlier reverts behind a probation committed on a recurring burst whose memory
    /// has not started to follow yet (its first migration carries the reason); 0:
    /// none.
    pub commit_reverts: u32,
}

/// Counters the engine keeps for status and the simulator's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    pub placements: u64,
    pub moves: u64,
    pub swaps: u64,
    pub commits: u64,
    pub reverts: u64,
    pub migrate_actions: u64,
    pub migrate_planned_bytes: u64,
    pub migrated_bytes: u64,
    pub refused_actions: u64,
    /// Probations that passed on a recurring burst's peak demand (also counted in
    /// `commits`).
    #[serde(default)]
    pub recurring_commits: u64,
}

/// Everything carried from one decision to the next.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub last_now_ns: Option<u64>,
    pub units: BTreeMap<UnitKey, UnitState>,
    /// VMs whose process memory moved recently, with the time (`now_ns`) after which
    /// it may be planned again (`process_memory.rs`).
    #[serde(default)]
    pub process_memory_after_ns: BTreeMap<VmId, u64>,
    /// Memory moves running in the background (`ActionOutcome::Started`) per VM and
    /// range (a guest cell's RAM, `None` for the whole VM), until their outcomes
    /// arrive. Nothing new is planned for memory a move covers meanwhile
    /// ([`EngineState::memory_moving`]); a wide VM's cells move side by side. Not
    /// carried across a restart: the moves of a stopped daemon are over.
    ///
    /// The one record of memory in flight. A move that ends `Partial` has stopped: the
    /// bytes it left are where they were (what the applier reports), so they hold
    /// nothing. (An earlier second record counted those bytes as still draining at the
    /// hot rate and held the VM for that long after its move had ended.)
    #[serde(skip)]
    pub moving: BTreeMap<(VmId, Option<(u64, u64)>), u32>,
    /// Each unit's CPU demand at the last decision its VM had no move of ours in
    /// flight: what it is counted at while one runs (`decide`). A vCPU touching a
    /// page being copied waits for the copy (a hugetlb page is unmapped for all of
    /// it: 13-24 s for 1 GiB under the lab's emulation), so the VM measures idle for
    /// a reason of ours; counted so, its node looked free and another VM was put
    /// there, after which the 1 GiB page was moved back (lab `hugetlb-1g`, 6.12).
    #[serde(skip)]
    pub demand_before_move: BTreeMap<UnitKey, f64>,
    /// VMs whose last memory move the host mostly refused (pages shared by several
    /// processes such as KSM pages, pinned pages, no room), with the time (`now_ns`)
    /// after which their memory may be planned again: asking again at once would
    /// scan the same pages for the same refusal every decision.
    #[serde(default)]
    pub memory_refused_until_ns: BTreeMap<VmId, u64>,
    /// When the CPU imbalance the last decision saw was first seen (`None`: the
    /// last decision saw none). Rebalancing acts from the second decision in a row.
    #[serde(default)]
    pub imbalance_since_ns: Option<u64>,
    /// Each node's load (CPUs) at the last decision that saw the imbalance, to tell
    /// a load still rising from one that settled.
    #[serde(default)]
    pub imbalance_loads: Option<Vec<f64>>,
    pub stats: EngineStats,
}

impl EngineState {
    /// Whether a move of ours runs on memory of VM `vm` in `range` (a guest cell's
    /// RAM; `None`: anywhere in the VM). A move of the whole VM covers every range.
    pub fn memory_moving(&self, vm: VmId, range: Option<(u64, u64)>) -> bool {
        self.moving
            .keys()
            .any(|&(v, r)| v == vm && (r.is_none() || range.is_none() || r == range))
    }
}
