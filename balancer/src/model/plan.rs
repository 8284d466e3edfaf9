//! What the engine asks for: actions, each with the reason it was chosen.

use serde::{Deserialize, Serialize};

use super::{CpuSet, NodeId, VmId};

/// The engine's output for one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<PlannedAction>,
    /// Decisions the engine considered and refused, and conditions it only reports
    /// (operator pinning, KSM merging across nodes). Shown by status and trace.
    #[serde(default)]
    pub refusals: Vec<Refusal>,
    /// For each search for a CPU move off a busy node, every unit that was on it and
    /// how it fared: the figures behind the choice of the cheapest unit to move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_choices: Vec<MoveChoice>,
}

/// One search for a CPU move off the busiest node: the units there, each with the
/// figures the engine weighed, and which one moved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveChoice {
    /// The busy node.
    pub from: NodeId,
    /// The imbalance that started the search, in percent of the mean load ratio.
    pub imbalance_pct: f64,
    /// The VM moved, when a single move was found.
    pub chosen: Option<VmId>,
    pub candidates: Vec<MoveCandidate>,
}

/// A unit on the busy node as the engine judged it for a move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveCandidate {
    pub vm: VmId,
    /// The guest NUMA cell, when the VM is placed cell by cell.
    pub cell: Option<u32>,
    /// Its resident memory, all nodes together.
    pub resident_bytes: u64,
    /// The CPU demand it would take off the busy node, in CPUs.
    pub cpus_gained: f64,
    /// Its best target, when one helps.
    pub to: Option<NodeId>,
    /// Bytes that would follow it there (resident memory not yet on the target,
    /// plus KSM pages it would leave, minus those it would join).
    pub bytes_to_move: u64,
    /// `bytes_to_move / cpus_gained`: the engine's price of the move (`None` for a
    /// unit with no demand).
    pub bytes_per_cpu: Option<f64>,
    pub verdict: CandidateVerdict,
}

/// Why a unit on the busy node was, or was not, the one moved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CandidateVerdict {
    /// The fewest bytes to move per CPU gained among the moves that help enough.
    Chosen,
    /// Helps enough, but moves more bytes per CPU gained than the chosen unit.
    Costlier { than: VmId },
    /// Helps, but by less than a quarter of the best move's gain (cost units).
    TooLittleGain { gain: f64, best_gain: f64 },
    /// Every node it could go to would end up with a higher load ratio than the
    /// busy node has now, or the move would not lower the cost.
    NoHelpfulTarget,
    /// Helpful targets lack memory (or huge pages) for it.
    MemoryBlocked { why: RefusalReason },
    /// Not a candidate now: in probation, moved within the hysteresis window, acted
    /// on earlier in this plan, spanning nodes, or not managed.
    NotMovable { why: String },
    /// It uses no CPU: moving it gains nothing.
    Idle,
}

/// Something the engine would have done (or warns about) but did not do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The VM concerned; `None` for host-wide reports.
    pub vm: Option<VmId>,
    pub why: RefusalReason,
}

/// Why the engine refused or only reported. Data, so it can be counted and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The VM is pinned by the operator (or excluded): reported, never moved.
    OperatorPinned { remote_pct: f64 },
    /// No node (or set of nodes) has the free memory plus headroom the VM needs.
    NoNodeWithMemory { need_bytes: u64 },
    /// The target node lacks free huge pages of the VM's page size.
    NoHugePages { node: NodeId, page_size_bytes: u64 },
    /// A memory move was refused: the target would fall below its free-memory headroom.
    TargetMemoryFull {
        node: NodeId,
        free_bytes: u64,
        headroom_bytes: u64,
    },
    /// The VM was moved too recently (hysteresis window).
    Hysteresis { until_ns: u64 },
    /// KSM merges pages across nodes (`merge_across_nodes=1`), pulling memory remote.
    KsmMergesAcrossNodes { pages_sharing: u64 },
    /// Automatic NUMA balancing is on and may fight the engine's placements.
    NumaBalancingOn,
    /// An imbalance exceeds the threshold but no move or swap reduces it.
    NoImprovingMove { imbalance_pct: f64 },
    /// The VM's memory is never migrated (a confidential guest, guest_memfd RAM):
    /// its vCPUs stay where its memory is. `why` is
    /// [`MemoryNotMovable`](super::MemoryNotMovable)'s text. Reported every decision.
    MemoryNotMovable { why: String },
    /// An imbalance exceeds the threshold for the first decision: it must last to
    /// the next one before a VM moves (a VM whose load just changed shows a partial
    /// reading).
    ImbalanceUnconfirmed { imbalance_pct: f64 },
    /// The busiest node's load rose by `rise_cpus` since the last decision, which
    /// already saw the imbalance: a VM there is still ramping up and reads partly,
    /// so the cheapest move waits for a decision that reads it whole (at most until
    /// the imbalance is three ticks old).
    ImbalanceRising {
        imbalance_pct: f64,
        node: NodeId,
        rise_cpus: f64,
    },
}

/// `2 MiB`, `1 GiB`: a size (a huge page's, a headroom) in the largest binary unit
/// it is a whole number of, from MiB up.
pub fn size_words(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// In words, for `status` and the log: what is missing and where.
impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OperatorPinned { remote_pct } => write!(
                f,
                "pinned by the operator, left alone ({remote_pct:.0}% of its memory remote)"
            ),
            Self::NoNodeWithMemory { need_bytes } => write!(
                f,
                "no node or set of nodes has {} free above the headroom for it",
                size_words(*need_bytes)
            ),
            Self::NoHugePages {
                node,
                page_size_bytes,
            } => write!(
                f,
                "node {node} has too few free {} huge pages for its memory: its huge pages cannot move there",
                size_words(*page_size_bytes)
            ),
            Self::TargetMemoryFull {
                node,
                free_bytes,
                headroom_bytes,
            } => write!(
                f,
                "node {node} has {} free, too little above its {} headroom",
                size_words(*free_bytes),
                size_words(*headroom_bytes)
            ),
            Self::Hysteresis { until_ns } => write!(
                f,
                "moved recently: held in place until {:.1} s (monotonic)",
                *until_ns as f64 / 1e9
            ),
            Self::KsmMergesAcrossNodes { pages_sharing } => write!(
                f,
                "KSM merges pages across nodes ({pages_sharing} pages sharing): merged pages are remote for all but one VM"
            ),
            Self::NumaBalancingOn => write!(
                f,
                "automatic NUMA balancing (kernel.numa_balancing) is on and may fight the placements"
            ),
            Self::NoImprovingMove { imbalance_pct } => write!(
                f,
                "CPU load {imbalance_pct:.0}% out of balance, but no move or swap lowers it"
            ),
            Self::MemoryNotMovable { why } => write!(
                f,
                "its memory is never migrated ({why}): its vCPUs stay where its memory is"
            ),
            Self::ImbalanceUnconfirmed { imbalance_pct } => write!(
                f,
                "CPU load {imbalance_pct:.0}% out of balance for one decision: waiting for the next to confirm it"
            ),
            Self::ImbalanceRising {
                imbalance_pct,
                node,
                rise_cpus,
            } => write!(
                f,
                "CPU load {imbalance_pct:.0}% out of balance, node {node} {rise_cpus:.2} CPUs busier than a decision ago: waiting for its load to settle before choosing what moves"
            ),
        }
    }
}

/// One action with the VM it concerns and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedAction {
    pub vm: VmId,
    pub action: Action,
    pub reason: Reason,
}

/// A change to the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Restrict vCPU threads to `cpus`: all of them when `vcpus` is `None`, else the
    /// listed vCPU indices. Non-vCPU threads follow when `vcpus` is `None`.
    SetCpus {
        vcpus: Option<Vec<u32>>,
        cpus: CpuSet,
    },
    /// Move at most `max_bytes` of the VM's memory from `from` to `to`, the listed
    /// regions (host virtual `(start, len)`) first, hottest first.
    /// The applier first allows `to` for the VM's memory (`cpuset.mems`) when its
    /// cgroup restricts it, so new pages can land there too.
    ///
    /// `within` confines the move to one host range `(start, len)`: a guest NUMA
    /// cell's memory backend, so a cell's move never takes pages of another cell
    /// that are at home where they are. `None`: all of guest RAM.
    MigrateMemory {
        from: NodeId,
        to: NodeId,
        regions: Vec<(u64, u64)>,
        max_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within: Option<(u64, u64)>,
    },
    /// Move at most `max_bytes` of the qemu process's own memory outside guest RAM
    /// (vCPU thread stacks, heap, other anonymous mappings) from `from` to `to`. Its
    /// vCPU threads use their stacks on every exit from the guest, so once guest RAM
    /// is home this follows it. Shared program and library pages are never moved.
    MigrateProcessMemory {
        from: NodeId,
        to: NodeId,
        max_bytes: u64,
    },
}

impl Action {
    /// Whether the action moves pages (rather than CPU sets).
    pub fn moves_memory(&self) -> bool {
        !matches!(self, Action::SetCpus { .. })
    }
}

/// Why an action was planned. Data, so status and trace can show and count it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reason {
    /// A new VM placed where CPU capacity and memory fit best.
    InitialPlacement { node: NodeId },
    /// Probation start: CPUs move first because of a load imbalance between nodes.
    CpuImbalance {
        from: NodeId,
        to: NodeId,
        imbalance_pct: f64,
    },
    /// The probation window passed and the need lasted: memory follows.
    ProbationCommitted { node: NodeId },
    /// The need went away within the probation window: CPUs go back.
    ProbationReverted { node: NodeId },
    /// Memory is being brought local to where the VM runs.
    Locality { locality_pct: f64, target_pct: f64 },
    /// Guest RAM is home; the process's own memory on `from` follows it.
    ProcessMemory { from: NodeId, remote_bytes: u64 },
    /// Two VMs exchange nodes (or one for two) because no single move helped.
    Swap {
        with: Vec<VmId>,
        from: NodeId,
        to: NodeId,
        imbalance_pct: f64,
    },
    /// A VM (or guest cell) too big for one node placed on the nearest set of nodes.
    SpanNodes { nodes: Vec<NodeId> },
    /// Kept next to the VMs it shares KSM pages with (`merge_across_nodes=0`).
    KsmGrouping { node: NodeId },
    /// The unit keeps bursting: its CPU-first moves were reverted `reverts` times
    /// within `window_s` seconds, so the engine places it on its peak demand. On a
    /// `MigrateMemory`: its probation passed on that lasting evidence and memory
    /// follows to `node`; on a `SetCpus`: a move to `node` (CPU-first, probation).
    RecurringBurst {
        node: NodeId,
        reverts: u32,
        window_s: u64,
    },
}

/// What happened when an action was applied, read back from the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActionOutcome {
    /// Applied and verified.
    Done { moved_bytes: u64 },
    /// Applied in part (e.g. some pages could not move); the rest is left as it was.
    Partial {
        moved_bytes: u64,
        left_bytes: u64,
        why: String,
    },
    /// Not applied: the host is unchanged.
    Refused { why: String },
    /// The VM exited meanwhile.
    VmGone,
    /// Only logged (trace, `--dry-run`).
    LoggedOnly,
    /// Checked and running in the background (a memory move on the applier's
    /// worker); its real outcome is reported when it ends.
    Started,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_words_say_what_is_missing_and_where() {
        let huge = RefusalReason::NoHugePages {
            node: 3,
            page_size_bytes: 2 << 20,
        };
        assert_eq!(
            huge.to_string(),
            "node 3 has too few free 2 MiB huge pages for its memory: its huge pages cannot move there"
        );
        let full = RefusalReason::TargetMemoryFull {
            node: 1,
            free_bytes: 300 << 20,
            headroom_bytes: 512 << 20,
        };
        assert_eq!(
            full.to_string(),
            "node 1 has 300 MiB free, too little above its 512 MiB headroom"
        );
        assert_eq!(size_words(1 << 30), "1 GiB");
        assert_eq!(size_words(3 << 29), "1536 MiB");
    }
}
