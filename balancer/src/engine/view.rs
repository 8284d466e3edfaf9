//! The per-decision view of a snapshot: placement units with their demand and memory
//! per node, and nodes with capacity, load and free memory. Built once per decision in
//! O(VMs x nodes); node sets are `u64` bit masks of node *indices* (hosts with more
//! than 64 nodes are refused by [`Engine::plan`](super::Engine::plan)).

use std::collections::HashMap;

use crate::model::{CpuSet, MemoryBacking, Pinning, Snapshot, Topology};

use super::state::UnitKey;

/// One placement unit as seen now.
#[derive(Clone, Debug)]
pub struct UnitView {
    pub key: UnitKey,
    /// Index into `snapshot.vms`.
    pub vm_idx: usize,
    /// vCPU indices of the unit; `None` means all of the VM's (a whole-VM unit).
    pub vcpus: Option<Vec<u32>>,
    pub nvcpus: usize,
    pub demand: f64,
    /// Resident bytes per node index.
    pub bytes_per_node: Vec<u64>,
    pub resident_bytes: u64,
    /// Bytes the unit will need in total (configured guest RAM of the unit).
    pub need_bytes: u64,
    pub hugepage_size: Option<u64>,
    pub pinned: bool,
    /// Nodes (index mask) the unit's vCPUs may run on now.
    pub affinity_mask: u64,
    /// Address range of the unit's memory (cells), to select its hot regions.
    pub addr_range: Option<(u64, u64)>,
    /// The unit's memory is never migrated (confidential guest): its CPUs go where
    /// its memory is and never away from it.
    pub memory_fixed: bool,
}

/// One node as seen now.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// CPUs VMs may use: the node's CPUs minus the reserved ones.
    pub cap: f64,
    pub free_bytes: u64,
}

/// Bit mask of the node indices whose CPUs intersect `cpus`.
pub struct NodeMasker<'a> {
    cpu_node: Vec<u8>,
    cache: HashMap<&'a CpuSet, u64>,
}

impl<'a> NodeMasker<'a> {
    pub fn new(topo: &Topology) -> Self {
        let mut cpu_node = Vec::new();
        for (i, n) in topo.nodes.iter().enumerate() {
            for c in n.cpus.iter() {
                let c = c as usize;
                if cpu_node.len() <= c {
                    cpu_node.resize(c + 1, u8::MAX);
                }
                cpu_node[c] = i as u8;
            }
        }
        Self {
            cpu_node,
            cache: HashMap::new(),
        }
    }

    pub fn mask(&mut self, cpus: &'a CpuSet) -> u64 {
        if let Some(m) = self.cache.get(cpus) {
            return *m;
        }
        let mut m = 0u64;
        for c in cpus.iter() {
            if let Some(&n) = self.cpu_node.get(c as usize)
                && n != u8::MAX
            {
                m |= 1 << n;
            }
        }
        self.cache.insert(cpus, m);
        m
    }
}

/// Splits the snapshot's VMs into units and summarises the nodes. A node's capacity
/// is its CPUs outside `reserved`.
pub fn build<'a>(
    snap: &'a Snapshot,
    reserved: &CpuSet,
) -> (Vec<UnitView>, Vec<NodeView>, NodeMasker<'a>) {
    let topo = &snap.topology;
    let nn = topo.nodes.len();
    let mut masker = NodeMasker::new(topo);
    let nodes: Vec<NodeView> = topo
        .nodes
        .iter()
        .map(|n| NodeView {
            cap: n.cpus.difference(reserved).len() as f64,
            free_bytes: n.memory.free_bytes,
        })
        .collect();
    let mut units = Vec::with_capacity(snap.vms.len());
    for (vm_idx, vm) in snap.vms.iter().enumerate() {
        let pinned = !matches!(vm.pinning, Pinning::None);
        let hugepage_size = match vm.memory.backing {
            MemoryBacking::HugeTlb { page_size_bytes } => Some(page_size_bytes),
            _ => None,
        };
        let mut vm_bytes = vm.memory.bytes_per_node.clone();
        vm_bytes.resize(nn, 0);
        let memory_fixed = vm.memory.not_movable.is_some();
        // Cells are units only when their vCPU threads are known.
        if vm.cells.len() >= 2 && vm.vcpus_known() {
            let total_cell: u64 = vm.cells.iter().map(|c| c.memory_bytes).sum::<u64>().max(1);
            for cell in &vm.cells {
                let mut mask = 0;
                let mut demand = 0.0;
                let mut n = 0;
                for v in vm.vcpus.iter().filter(|v| cell.vcpus.contains(&v.index)) {
                    mask |= masker.mask(&v.affinity);
                    demand += sane(v.cpu_demand);
                    n += 1;
                }
                let bytes: Vec<u64> = if cell.bytes_per_node.len() == nn {
                    cell.bytes_per_node.clone()
                } else {
                    vm_bytes
                        .iter()
                        .map(|b| {
                            ((*b as u128 * cell.memory_bytes as u128) / total_cell as u128) as u64
                        })
                        .collect()
                };
                let resident = bytes.iter().sum();
                units.push(UnitView {
                    key: UnitKey {
                        vm: vm.pid,
                        cell: Some(cell.id),
                    },
                    vm_idx,
                    vcpus: Some(cell.vcpus.clone()),
                    nvcpus: n,
                    demand,
                    bytes_per_node: bytes,
                    resident_bytes: resident,
                    need_bytes: cell.memory_bytes.max(resident),
                    hugepage_size,
                    pinned,
                    affinity_mask: mask,
                    addr_range: cell.addr_range,
                    memory_fixed,
                });
            }
        } else {
            // vCPUs unknown: the whole process is the unit, with the demand of all
            // its threads and where any of them may run; as many vCPUs as `-smp`.
            let (mask, nvcpus, demand) = if vm.vcpus_known() {
                (
                    vm.vcpus.iter().fold(0, |m, v| m | masker.mask(&v.affinity)),
                    vm.vcpus.len(),
                    vm.vcpus.iter().map(|v| sane(v.cpu_demand)).sum(),
                )
            } else {
                (
                    masker.mask(&vm.process_affinity),
                    vm.configured_vcpus.max(1) as usize,
                    sane(vm.threads_cpu_demand),
                )
            };
            let resident = vm_bytes.iter().sum();
            units.push(UnitView {
                key: UnitKey {
                    vm: vm.pid,
                    cell: None,
                },
                vm_idx,
                vcpus: None,
                nvcpus,
                demand,
                bytes_per_node: vm_bytes,
                resident_bytes: resident,
                need_bytes: vm.memory.configured_bytes.max(resident),
                hugepage_size,
                pinned,
                affinity_mask: mask,
                addr_range: None,
                memory_fixed,
            });
        }
    }
    (units, nodes, masker)
}

/// A demand reading the engine can use: NaN, infinite or negative counts as idle.
fn sane(d: f64) -> f64 {
    if d.is_finite() && d > 0.0 { d } else { 0.0 }
}

/// Node indices of a mask, in increasing order.
pub fn mask_nodes(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1 << i) != 0)
}

/// Adds `sign * demand` to `load`, spread over the nodes of `mask` in proportion to
/// their capacity (a unit wider than a node loads each of its nodes by its share).
pub fn spread(nodes: &[NodeView], load: &mut [f64], mask: u64, demand: f64, sign: f64) {
    let cap: f64 = mask_nodes(mask).map(|i| nodes[i].cap).sum();
    if cap <= 0.0 {
        return;
    }
    for i in mask_nodes(mask) {
        load[i] += sign * demand * nodes[i].cap / cap;
    }
}
