//! numad (0.5, as summarised in the project notes): every 5-15 s (5 after a move, 15
//! when idle) it looks at processes with more than 300 MB resident and more than 0.5
//! CPU, biggest (CPU x RSS) first, skipping any it handled in the last 300 s. For the
//! first one not already local it picks the nodes with the most available CPU
//! (capacity at the 85 % target utilisation minus use, plus what the process itself
//! uses there) and memory, as few as cover its CPU need; when no set of nodes has the
//! room (every CPU busy) it does nothing. It moves at most one process per cycle:
//! `sched_setaffinity` on every thread, then a synchronous whole-process
//! `migrate_pages`, no probation, no revert. Memory stays unbound (first touch).

use std::collections::BTreeMap;

use crate::model::{Action, PlannedAction, Reason, Snapshot};

use super::{Baseline, World, migrate_all};
use crate::host::Applier;

const MIN_RSS_BYTES: u64 = 300 * 1000 * 1000;
const MIN_CPU: f64 = 0.5;
const TARGET_UTIL: f64 = 0.85;
const TARGET_LOCALITY: f64 = 0.90;
const RECHECK_S: u32 = 300;

/// The numad baseline.
#[derive(Default)]
pub struct Numad {
    next_s: u32,
    last_seen: BTreeMap<u32, u32>,
}

impl Baseline for Numad {
    fn name(&self) -> &'static str {
        "numad"
    }

    fn tick(&mut self, host: &mut World, snap: &Snapshot) -> Vec<PlannedAction> {
        let t = (snap.now_ns / 1_000_000_000) as u32;
        if t < self.next_s {
            return Vec::new();
        }
        self.next_s = t + 15;
        let topo = &snap.topology;
        let nn = topo.nodes.len();
        let mut used = vec![0.0; nn];
        for vm in &snap.vms {
            for v in &vm.vcpus {
                if let Some(n) = v.last_cpu.and_then(|c| topo.node_of_cpu(c)) {
                    used[n as usize] += v.cpu_demand;
                }
            }
        }
        let mut cands: Vec<&crate::model::Vm> = snap
            .vms
            .iter()
            .filter(|vm| vm.memory.resident_bytes() > MIN_RSS_BYTES && vm.cpu_demand() > MIN_CPU)
            .filter(|vm| {
                self.last_seen
                    .get(&vm.pid)
                    .is_none_or(|&s| t >= s + RECHECK_S)
            })
            .collect();
        cands.sort_by(|a, b| {
            let ma = a.cpu_demand() * a.memory.resident_bytes() as f64;
            let mb = b.cpu_demand() * b.memory.resident_bytes() as f64;
            mb.total_cmp(&ma).then(a.pid.cmp(&b.pid))
        });
        for vm in cands {
            let need = vm.cpu_demand();
            let rss = vm.memory.resident_bytes();
            let mut own = vec![0.0; nn];
            for v in &vm.vcpus {
                if let Some(n) = v.last_cpu.and_then(|c| topo.node_of_cpu(c)) {
                    own[n as usize] += v.cpu_demand;
                }
            }
            // Available CPU and memory per node, counting what the process has there.
            let avail: Vec<(usize, f64, f64)> = (0..nn)
                .map(|n| {
                    let cap = topo.nodes[n].cpus.len() as f64;
                    let cpu = cap * TARGET_UTIL - used[n] + own[n];
                    let mem = topo.nodes[n].memory.free_bytes as f64
                        + vm.memory.bytes_per_node.get(n).copied().unwrap_or(0) as f64;
                    (n, cpu, mem)
                })
                .collect();
            let mut order = avail.clone();
            order.sort_by(|a, b| {
                let ma = a.1.max(0.0) * a.2;
                let mb = b.1.max(0.0) * b.2;
                mb.total_cmp(&ma).then(a.0.cmp(&b.0))
            });
            let (mut mask, mut cpu, mut mem) = (0u64, 0.0, 0.0);
            for (n, c, m) in &order {
                if *c <= 0.0 {
                    break;
                }
                mask |= 1 << n;
                cpu += c;
                mem += m;
                if cpu >= need && mem >= rss as f64 {
                    break;
                }
            }
            self.last_seen.insert(vm.pid, t);
            if mask == 0 || cpu < need || mem < rss as f64 {
                continue; // no room anywhere: numad leaves it alone
            }
            let local: u64 = (0..nn)
                .filter(|n| mask & (1 << n) != 0)
                .map(|n| vm.memory.bytes_per_node.get(n).copied().unwrap_or(0))
                .sum();
            let cpus = (0..nn)
                .filter(|n| mask & (1 << n) != 0)
                .fold(crate::model::CpuSet::new(), |acc, n| {
                    acc.union(&topo.nodes[n].cpus)
                });
            let already = vm.vcpus.iter().all(|v| v.affinity == cpus);
            if already && local as f64 >= TARGET_LOCALITY * rss as f64 {
                continue;
            }
            let to = mask.trailing_zeros() as usize;
            let a = PlannedAction {
                vm: vm.pid,
                action: Action::SetCpus { vcpus: None, cpus },
                reason: Reason::CpuImbalance {
                    from: 0,
                    to: to as u32,
                    imbalance_pct: 0.0,
                },
            };
            host.apply(snap, &a);
            let mut out = vec![a];
            out.extend(migrate_all(host, snap, vm.pid, mask, to));
            self.next_s = t + 5;
            return out;
        }
        Vec::new()
    }
}
