//! One observation of the whole host: what the engine decides from.

use serde::{Deserialize, Serialize};

use super::{Topology, Vm};

/// Everything the engine needs to decide, taken at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The observer's monotonic clock; the engine's only notion of time.
    pub now_ns: u64,
    pub topology: Topology,
    pub vms: Vec<Vm>,
    pub settings: HostSettings,
}

/// Host-wide kernel settings that change how balancing behaves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSettings {
    /// `kernel.numa_balancing` (automatic NUMA balancing) is on.
    pub numa_balancing: bool,
    pub ksm: KsmState,
}

/// Kernel samepage merging, from `/sys/kernel/mm/ksm`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmState {
    pub running: bool,
    /// Pages may be merged across nodes, which pulls VMs' memory remote.
    pub merge_across_nodes: bool,
    pub pages_sharing: u64,
}
