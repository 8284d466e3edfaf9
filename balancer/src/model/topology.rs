//! The machine: NUMA nodes, their CPUs and memory, and the distances between them.

use serde::{Deserialize, Serialize};

use super::{CpuId, CpuSet, NodeId, NodeSet};

/// Static shape of the host, read once at start and on CPU/memory hotplug.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// Online nodes that have CPUs or memory, in increasing id order.
    pub nodes: Vec<Node>,
    /// SLIT distances, `distance[i][j]` between `nodes[i]` and `nodes[j]` (10 = local).
    pub distance: Vec<Vec<u32>>,
}

/// One NUMA node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// Online CPUs of the node (may be empty for memory-only nodes).
    pub cpus: CpuSet,
    /// For each CPU of the node, the set of its SMT siblings (itself included).
    pub smt_siblings: Vec<CpuSet>,
    /// Live memory state of the node.
    pub memory: NodeMemory,
    /// CPUs of the node that sat idle (all processes counted) since the previous
    /// observation; `None` when unknown (first observation, simulated host).
    #[serde(default)]
    pub idle_cpus: Option<f64>,
}

/// Memory of one node, refreshed every observation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMemory {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Page cache on the node (`FilePages`): reclaimable, but not free.
    pub file_bytes: u64,
    /// Huge page pools of the node, one per page size.
    pub hugepages: Vec<HugePagePool>,
}

/// The huge pages of one size on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePagePool {
    pub page_size_bytes: u64,
    pub total_pages: u64,
    pub free_pages: u64,
}

impl Topology {
    /// Index into `nodes` of node `id`.
    pub fn node_index(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node a CPU belongs to.
    pub fn node_of_cpu(&self, cpu: CpuId) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(cpu))
            .map(|n| n.id)
    }

    /// Every online CPU of the host.
    pub fn all_cpus(&self) -> CpuSet {
        self.nodes
            .iter()
            .fold(CpuSet::new(), |acc, n| acc.union(&n.cpus))
    }

    /// Nodes that have memory (CPU-only nodes cannot hold pages).
    pub fn memory_nodes(&self) -> NodeSet {
        self.nodes
            .iter()
            .filter(|n| n.memory.total_bytes > 0)
            .map(|n| n.id)
            .collect()
    }

    /// SLIT distance between two nodes; 10 for the same node, and a remote default of 20
    /// when the firmware gave no table.
    pub fn distance(&self, a: NodeId, b: NodeId) -> u32 {
        if a == b {
            return 10;
        }
        match (self.node_index(a), self.node_index(b)) {
            (Some(i), Some(j)) => self
                .distance
                .get(i)
                .and_then(|row| row.get(j))
                .copied()
                .unwrap_or(20),
            _ => 20,
        }
    }

    /// A symmetric test topology: `nodes` nodes of `cpus_per_node` CPUs numbered
    /// node-major, `mem_per_node_bytes` each, distance 10 local and 21 remote.
    pub fn uniform(nodes: u32, cpus_per_node: u32, mem_per_node_bytes: u64) -> Self {
        let nodes_v = (0..nodes)
            .map(|id| {
                let cpus: CpuSet = (id * cpus_per_node..(id + 1) * cpus_per_node).collect();
                Node {
                    id,
                    smt_siblings: cpus.iter().map(|c| std::iter::once(c).collect()).collect(),
                    cpus,
                    memory: NodeMemory {
                        total_bytes: mem_per_node_bytes,
                        free_bytes: mem_per_node_bytes,
                        ..Default::default()
                    },
                    idle_cpus: None,
                }
            })
            .collect();
        let distance = (0..nodes)
            .map(|i| (0..nodes).map(|j| if i == j { 10 } else { 21 }).collect())
            .collect();
        Self {
            nodes: nodes_v,
            distance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_topology_maps_cpus_to_nodes() {
        let t = Topology::uniform(4, 2, 1 << 30);
        assert_eq!(t.node_of_cpu(0), Some(0));
        assert_eq!(t.node_of_cpu(5), Some(2));
        assert_eq!(t.node_of_cpu(8), None);
        assert_eq!(t.all_cpus().to_string(), "0-7");
        assert_eq!(t.distance(1, 1), 10);
        assert_eq!(t.distance(1, 3), 21);
    }
}
