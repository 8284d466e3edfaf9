//! Plain data shared by every part of vmbalancer.
//!
//! Observation fills a [`Snapshot`]; the engine reads it and writes a [`Plan`];
//! appliers carry the plan out. Nothing in this module does I/O, so the same types
//! describe a real Linux host, a simulated one, and captured test fixtures.
//! Units are in field names: `_bytes`, `_pages`, `_ns`, `_pct`.

mod adoption;
mod idset;
mod locality;
mod plan;
mod snapshot;
mod topology;
mod vm;

pub use adoption::{GroupSets, MigrationProgress, OriginalSets, QuietCounters, RestoreWhat};
pub use idset::{CpuId, CpuSet, IdSet, IdSetParseError, NodeId, NodeSet};
pub use locality::{local_share, local_share_on};
pub use plan::{
    Action, ActionOutcome, CandidateVerdict, MoveCandidate, MoveChoice, Plan, PlannedAction,
    Reason, Refusal, RefusalReason, size_words,
};
pub use snapshot::{HostSettings, KsmState, Snapshot};
pub use topology::{HugePagePool, Node, NodeMemory, Topology};
/// The share of a VM's memory on its home nodes that counts as local enough, in
/// percent, when nobody configured one: 90, numad's `-m` default and the documented
/// default of the daemon's `target_locality_pct`. The one definition behind the
/// daemon's configuration, the engine's `locality_target_pct` and the observer's
/// choice of VMs worth write-heat sampling (those that may still have memory to move).
pub const DEFAULT_TARGET_LOCALITY_PCT: u32 = 90;

pub use vm::{
    GuestCell, HotRegion, MemoryBacking, MemoryNotMovable, OperatorPins, Pinning, ThreadKind, Vcpu,
    VcpuDiscovery, VcpuTelemetry, Vm, VmId, VmMemory,
};
