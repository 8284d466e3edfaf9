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
    MigrateMemory {
        from: NodeId,
        to: NodeId,
        regions: Vec<(u64, u64)>,
        max_bytes: u64,
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
