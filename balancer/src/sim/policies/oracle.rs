//! The oracle: the best *static* assignment of every unit (VM, or guest cell) to one
//! node, found offline by search with full knowledge of the scenario (demand over
//! time, arrivals, departures), and applied for free: memory is placed on the
//! assigned node instantly at arrival. It is a reference for "% of oracle", not a
//! policy a host could run; a dynamic policy can beat it when load moves.
//!
//! Search: greedy (biggest unit first, to the node that adds the most delivered CPU
//! over the run), then first-improvement moves and swaps until none helps. The
//! objective is the CPU delivered, `sum over t, n of min(capacity, load(n, t))`, with
//! node memory as a hard limit.

use std::collections::BTreeSet;

use crate::model::{Action, PlannedAction, Reason, Snapshot};

use super::super::scenario::Scenario;
use super::{Baseline, World};
use crate::host::Applier;

const GIB: f64 = (1u64 << 30) as f64;

struct Unit {
    vm: usize,
    cell: usize,
    vcpus: Vec<u32>,
    demand: Vec<f64>,
    mem: f64,
    alive: Vec<bool>,
    fixed: Option<usize>,
}

/// The oracle reference.
pub struct Oracle {
    /// Node per unit, with (vm index, cell, vcpus).
    assign: Vec<(usize, usize, Vec<u32>, usize)>,
    done: BTreeSet<u32>,
}

impl Oracle {
    pub fn new(s: &Scenario) -> Self {
        let nn = s.host.nodes as usize;
        let cap = s.host.cpus_per_node as f64;
        let mem_cap = s.host.mem_per_node_gib * GIB - 0.5 * GIB;
        let step = 5u32;
        let times: Vec<u32> = (0..s.duration_s).step_by(step as usize).collect();
        let mut units = Vec::new();
        let mut vm_idx = 0;
        let mut rr = 0;
        for g in &s.vms {
            for i in 0..g.count {
                let cells = g.cells.max(1);
                let manual = if !g.manual_nodes.is_empty() {
                    g.manual_nodes[i as usize % g.manual_nodes.len()] as usize
                } else if !g.initial_nodes.is_empty() {
                    g.initial_nodes[i as usize % g.initial_nodes.len()] as usize
                } else {
                    let n = rr % nn;
                    rr += 1;
                    n
                };
                for c in 0..cells {
                    let per = g.vcpus / cells;
                    units.push(Unit {
                        vm: vm_idx,
                        cell: c as usize,
                        vcpus: (c * per..(c + 1) * per).collect(),
                        demand: times.iter().map(|&t| g.demand_at(t) * per as f64).collect(),
                        mem: g.mem_gib * GIB / cells as f64,
                        alive: times
                            .iter()
                            .map(|&t| t >= g.start_s && g.end_s.is_none_or(|e| t < e))
                            .collect(),
                        fixed: g.operator_pinned.then_some(manual),
                    });
                }
                vm_idx += 1;
            }
        }
        let nt = times.len();
        let mut load = vec![vec![0.0; nt]; nn];
        let mut mem = vec![vec![0.0; nt]; nn];
        let mut at = vec![usize::MAX; units.len()];
        let score_add = |load: &[Vec<f64>], mem: &[Vec<f64>], u: &Unit, n: usize| -> f64 {
            let mut s = 0.0;
            for t in 0..nt {
                if !u.alive[t] {
                    continue;
                }
                if mem[n][t] + u.mem > mem_cap {
                    return f64::NEG_INFINITY;
                }
                s += (load[n][t] + u.demand[t]).min(cap) - load[n][t].min(cap);
            }
            s
        };
        let add = |load: &mut [Vec<f64>], mem: &mut [Vec<f64>], u: &Unit, n: usize, sign: f64| {
            for t in 0..nt {
                if u.alive[t] {
                    load[n][t] += sign * u.demand[t];
                    mem[n][t] += sign * u.mem;
                }
            }
        };
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by(|&a, &b| {
            let da: f64 = units[a].demand.iter().sum();
            let db: f64 = units[b].demand.iter().sum();
            db.total_cmp(&da).then(a.cmp(&b))
        });
        for &u in &order {
            let n = match units[u].fixed {
                Some(n) => n,
                None => (0..nn)
                    .max_by(|&a, &b| {
                        let sa = score_add(&load, &mem, &units[u], a);
                        let sb = score_add(&load, &mem, &units[u], b);
                        // Ties: the emptier node (less total load).
                        let la: f64 = load[a].iter().sum();
                        let lb: f64 = load[b].iter().sum();
                        sa.total_cmp(&sb).then(lb.total_cmp(&la)).then(b.cmp(&a))
                    })
                    .unwrap_or(0),
            };
            at[u] = n;
            add(&mut load, &mut mem, &units[u], n, 1.0);
        }
        // Local search: moves, then swaps, until nothing improves.
        let total = |load: &[Vec<f64>]| -> f64 {
            load.iter()
                .flat_map(|r| r.iter())
                .map(|l| l.min(cap) - 1e-6 * l * l)
                .sum()
        };
        for _round in 0..20 {
            let mut improved = false;
            for u in 0..units.len() {
                if units[u].fixed.is_some() {
                    continue;
                }
                let cur = at[u];
                let base = total(&load);
                let mut best = (base, cur);
                add(&mut load, &mut mem, &units[u], cur, -1.0);
                for n in 0..nn {
                    if n == cur || score_add(&load, &mem, &units[u], n) == f64::NEG_INFINITY {
                        continue;
                    }
                    add(&mut load, &mut mem, &units[u], n, 1.0);
                    let s = total(&load);
                    if s > best.0 + 1e-9 {
                        best = (s, n);
                    }
                    add(&mut load, &mut mem, &units[u], n, -1.0);
                }
                add(&mut load, &mut mem, &units[u], best.1, 1.0);
                if best.1 != cur {
                    at[u] = best.1;
                    improved = true;
                }
            }
            if units.len() <= 200 {
                for a in 0..units.len() {
                    for b in a + 1..units.len() {
                        let (na, nb) = (at[a], at[b]);
                        if na == nb || units[a].fixed.is_some() || units[b].fixed.is_some() {
                            continue;
                        }
                        let base = total(&load);
                        add(&mut load, &mut mem, &units[a], na, -1.0);
                        add(&mut load, &mut mem, &units[b], nb, -1.0);
                        add(&mut load, &mut mem, &units[a], nb, 1.0);
                        add(&mut load, &mut mem, &units[b], na, 1.0);
                        let ok = mem.iter().all(|r| r.iter().all(|&m| m <= mem_cap));
                        if ok && total(&load) > base + 1e-9 {
                            at[a] = nb;
                            at[b] = na;
                            improved = true;
                        } else {
                            add(&mut load, &mut mem, &units[a], nb, -1.0);
                            add(&mut load, &mut mem, &units[b], na, -1.0);
                            add(&mut load, &mut mem, &units[a], na, 1.0);
                            add(&mut load, &mut mem, &units[b], nb, 1.0);
                        }
                    }
                }
            }
            if !improved {
                break;
            }
        }
        let assign = units
            .iter()
            .zip(&at)
            .map(|(u, &n)| (u.vm, u.cell, u.vcpus.clone(), n))
            .collect();
        Self {
            assign,
            done: BTreeSet::new(),
        }
    }
}

impl Baseline for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn tick(&mut self, host: &mut World, snap: &Snapshot) -> Vec<PlannedAction> {
        let mut out = Vec::new();
        for vm in &snap.vms {
            let Some(i) = host.vm_index(vm.pid) else {
                continue;
            };
            if !self.done.insert(vm.pid) {
                continue;
            }
            let mut mems = 0u64;
            let units: Vec<_> = self.assign.iter().filter(|a| a.0 == i).cloned().collect();
            let whole = units.len() == 1;
            for (_, cell, vcpus, n) in units {
                let a = PlannedAction {
                    vm: vm.pid,
                    action: Action::SetCpus {
                        vcpus: (!whole).then_some(vcpus),
                        cpus: super::super::node_cpus(n, host.cpn),
                    },
                    reason: Reason::InitialPlacement { node: n as u32 },
                };
                if !matches!(
                    host.apply(snap, &a),
                    crate::model::ActionOutcome::Done { .. }
                ) {
                    continue;
                }
                out.push(a);
                host.teleport_memory(vm.pid, (!whole).then_some(cell), n);
                mems |= 1 << n;
            }
            host.set_mems(vm.pid, mems);
        }
        out
    }
}
