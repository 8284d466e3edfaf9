//! What the world shows: a [`Snapshot`] built like the Linux observer builds one
//! (topology, VMs, their vCPUs, memory per node and cell, hot regions), and
//! [`SimObserver`], the daemon's [`Observer`] over a shared world.

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use crate::host::Observer;
use crate::model::{
    GuestCell, HostSettings, HotRegion, HugePagePool, KsmState, MemoryBacking, Node, NodeMemory,
    OperatorPins, Pinning, Snapshot, Topology, Vcpu, Vm, VmMemory,
};

use super::world::{GIB, GUEST_BASE, HUGE_2M, MIB, World, node_cpus};

impl Observer for World {
    type Error = Infallible;

    fn observe(&mut self) -> Result<Snapshot, Infallible> {
        let nn = self.nn;
        let h = &self.scenario.host;
        let nodes = (0..nn)
            .map(|n| {
                let cpus = node_cpus(n, self.cpn);
                let used_huge = self.hugetlb_used(n);
                let hugepages = if h.hugepages_2m_per_node > 0 {
                    let used = (used_huge / HUGE_2M as f64).ceil() as u64;
                    vec![HugePagePool {
                        page_size_bytes: HUGE_2M,
                        total_pages: h.hugepages_2m_per_node,
                        free_pages: h.hugepages_2m_per_node.saturating_sub(used),
                    }]
                } else {
                    Vec::new()
                };
                // Huge page pools are reserved out of the node's memory.
                let pool = (h.hugepages_2m_per_node * HUGE_2M) as f64;
                let free = (self.free_bytes(n) + used_huge - pool).max(0.0);
                Node {
                    id: n as u32,
                    smt_siblings: cpus.iter().map(|c| std::iter::once(c).collect()).collect(),
                    cpus,
                    memory: NodeMemory {
                        total_bytes: self.mem_total[n] as u64,
                        free_bytes: free as u64,
                        file_bytes: 0,
                        hugepages,
                    },
                    // The simulated host does not model idle time per node.
                    idle_cpus: None,
                }
            })
            .collect();
        let topology = Topology {
            nodes,
            distance: self.dist.clone(),
        };
        let mut vms = Vec::new();
        for (i, vm) in self.vms.iter().enumerate() {
            if !vm.alive {
                continue;
            }
            let g = self.group(i);
            let ncells = vm.cells.len();
            let cell_span = (g.mem_gib * GIB) as u64 / ncells as u64;
            let base = GUEST_BASE + i as u64 * (1u64 << 40);
            let vcpus: Vec<Vcpu> = vm
                .vcpus
                .iter()
                .enumerate()
                .map(|(j, v)| Vcpu {
                    index: j as u32,
                    tid: vm.pid * 1000 + j as u32 + 1,
                    affinity: v.cpus.clone(),
                    last_cpu: Some(v.node as u32 * self.cpn + (j as u32 % self.cpn)),
                    cpu_demand: v.demand,
                    telemetry: Default::default(),
                })
                .collect();
            let bytes_per_node = (0..nn)
                .map(|n| vm.cells.iter().map(|c| c.on(n)).sum::<f64>() as u64)
                .collect();
            let mut hot_regions = Vec::new();
            for (ci, c) in vm.cells.iter().enumerate() {
                let cbase = base + ci as u64 * cell_span;
                for n in 0..nn {
                    if c.hot[n] >= MIB {
                        hot_regions.push(HotRegion {
                            start_addr: cbase + n as u64 * (cell_span / nn as u64),
                            len_bytes: c.hot[n] as u64,
                            node: n as u32,
                            heat: c.hot[n] / MIB,
                        });
                    }
                }
            }
            let cells = if ncells > 1 {
                vm.cells
                    .iter()
                    .enumerate()
                    .map(|(ci, c)| GuestCell {
                        id: ci as u32,
                        vcpus: vm
                            .vcpus
                            .iter()
                            .enumerate()
                            .filter(|(_, v)| v.cell == ci)
                            .map(|(j, _)| j as u32)
                            .collect(),
                        memory_bytes: c.mem_bytes as u64,
                        host_nodes: None,
                        bytes_per_node: (0..nn).map(|n| c.on(n) as u64).collect(),
                        addr_range: Some((base + ci as u64 * cell_span, cell_span)),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let ksm_shared_pages = match g.ksm_group {
                Some(kg) => self
                    .vms
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| {
                        *j != i && o.alive && self.scenario.vms[o.group].ksm_group == Some(kg)
                    })
                    .map(|(_, o)| (o.pid, g.ksm_shared_mib * 256))
                    .collect(),
                None => Vec::new(),
            };
            let threads_cpu_demand: f64 = vcpus.iter().map(|v| v.cpu_demand).sum();
            vms.push(Vm {
                pid: vm.pid,
                name: vm.name.clone(),
                vcpus,
                other_threads: Vec::new(),
                memory: VmMemory {
                    bytes_per_node,
                    backing: if g.hugepages {
                        MemoryBacking::HugeTlb {
                            page_size_bytes: HUGE_2M,
                        }
                    } else {
                        MemoryBacking::Anonymous
                    },
                    configured_bytes: (g.mem_gib * GIB) as u64,
                    measured_at_ns: self.t as u64 * 1_000_000_000,
                    ..Default::default()
                },
                cells,
                pinning: if g.operator_pinned {
                    Pinning::Operator {
                        why: "vcpupin in the domain XML".into(),
                    }
                } else {
                    Pinning::None
                },
                operator_pins: if g.operator_pinned {
                    OperatorPins::everything()
                } else {
                    OperatorPins::default()
                },
                hot_regions,
                cgroup: Some(format!("machine.slice/{}", vm.name)),
                mems_allowed: (0..nn as u32)
                    .filter(|n| vm.mems_allowed & (1 << n) != 0)
                    .collect(),
                ksm_shared_pages,
                threads_cpu_demand,
                kernel_numa_moves: 0,
                ..Default::default()
            });
        }
        let any_ksm = self.scenario.vms.iter().any(|g| g.ksm_group.is_some());
        Ok(Snapshot {
            now_ns: self.t as u64 * 1_000_000_000,
            topology,
            vms,
            settings: HostSettings {
                numa_balancing: false,
                ksm: KsmState {
                    running: h.ksm_running || any_ksm,
                    merge_across_nodes: h.ksm_merge_across_nodes,
                    pages_sharing: 0,
                },
            },
        })
    }
}

/// The daemon's observer of a shared world: each tick it observes the world as it is
/// at the world's current second (the world's clock is the snapshot's `now_ns`).
pub struct SimObserver(pub Rc<RefCell<World>>);

impl Observer for SimObserver {
    type Error = Infallible;

    fn observe(&mut self) -> Result<Snapshot, Infallible> {
        self.0.borrow_mut().observe()
    }
}
