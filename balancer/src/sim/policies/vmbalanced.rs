//! vmbalanced, the seed 004 proof of concept, as described there: every 5 s it reads
//! per-node nr_running and load (nr_running / nr_cpus); when (a) nr_running_high -
//! nr_running_low >= a margin (the slide's number is lost; 4, one VM's vCPUs, is used),
//! (b) load_high / load_low > 1.1 and (c) load_high > 1.0, it moves one VM from the
//! busiest to the idlest node through cpusets: CPUs and memory at once (the migration
//! takes seconds: 4-7 s in the seed's log), then sleeps 5 s. It picks the first VM
//! listed on the busy node. New VMs get a random node.

use std::collections::BTreeSet;

use crate::model::{PlannedAction, Reason, Snapshot};

use super::super::rng::Rng;
use super::{Baseline, World, cpuset_move};

const MARGIN: f64 = 4.0;

/// The seed's balancer.
pub struct Vmbalanced {
    rng: Rng,
    known: BTreeSet<u32>,
    next_check_s: u32,
}

impl Vmbalanced {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed ^ 0x5eed_0004),
            known: BTreeSet::new(),
            next_check_s: 0,
        }
    }
}

impl Baseline for Vmbalanced {
    fn name(&self) -> &'static str {
        "vmbalanced"
    }

    fn tick(&mut self, host: &mut World, snap: &Snapshot) -> Vec<PlannedAction> {
        let t = (snap.now_ns / 1_000_000_000) as u32;
        if t < self.next_check_s {
            return Vec::new();
        }
        let nn = snap.topology.nodes.len();
        let mut out = Vec::new();
        // New groups: a random node each (VMs already confined are adopted).
        for vm in &snap.vms {
            if !self.known.insert(vm.pid) {
                continue;
            }
            let confined = vm.vcpus.iter().all(|v| {
                snap.topology
                    .nodes
                    .iter()
                    .any(|n| v.affinity.is_subset(&n.cpus))
            });
            if !confined {
                let node = self.rng.below(nn);
                let reason = Reason::InitialPlacement { node: node as u32 };
                out.extend(cpuset_move(host, snap, vm.pid, node, reason, true));
            }
        }
        // Per-node nr_running and load.
        let mut nr = vec![0.0; nn];
        for vm in &snap.vms {
            for v in &vm.vcpus {
                if let Some(n) = v.last_cpu.and_then(|c| snap.topology.node_of_cpu(c)) {
                    nr[n as usize] += v.cpu_demand;
                }
            }
        }
        let load: Vec<f64> = (0..nn)
            .map(|n| nr[n] / snap.topology.nodes[n].cpus.len().max(1) as f64)
            .collect();
        let hi = (0..nn).max_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)));
        let lo = (0..nn).min_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)));
        self.next_check_s = t + 5;
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return out;
        };
        let ratio = if load[lo] > 0.0 {
            load[hi] / load[lo]
        } else {
            f64::INFINITY
        };
        if nr[hi] - nr[lo] >= MARGIN && ratio > 1.1 && load[hi] > 1.0 {
            let hi_cpus = &snap.topology.nodes[hi].cpus;
            let pick = snap
                .vms
                .iter()
                .find(|vm| vm.vcpus.iter().all(|v| v.affinity == *hi_cpus));
            if let Some(vm) = pick {
                let reason = Reason::CpuImbalance {
                    from: hi as u32,
                    to: lo as u32,
                    imbalance_pct: (ratio - 1.0) * 100.0,
                };
                out.extend(cpuset_move(host, snap, vm.pid, lo, reason, true));
                // The cpuset write returns once memory has moved; then it sleeps 5 s.
                let secs =
                    (host.queued_bytes(vm.pid) / host.params.migrate_bytes_per_s).ceil() as u32;
                self.next_check_s = t + secs.max(1) + 5;
            }
        }
        out
    }
}
