//! What the engine asks for: actions, each with the reason it was chosen.

use serde::{Deserialize, Serialize};

use super::{CpuSet, NodeId, VmId};

/// The engine's output for one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<PlannedAction>,
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
    MigrateMemory {
        from: NodeId,
        to: NodeId,
        regions: Vec<(u64, u64)>,
        max_bytes: u64,
    },
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
}
