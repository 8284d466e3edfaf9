//! Initial placement of units the engine has not seen and that nobody confined.
//!
//! Units are placed biggest first (CPU demand estimate, then KSM pages shared with
//! other VMs, then memory, then key, so the order is deterministic). Sharers go
//! before units of the same demand that share less: with `merge_across_nodes=0` a
//! group's merged pages sit on one node, and the group claims that node's CPUs
//! before a VM that would cost none of them anything elsewhere; placed after it, the
//! second sharer would find the node taken and leave its merged pages remote. A unit fits a node when the node has free memory plus
//! headroom (or free huge pages of its size) for the part of its memory not already
//! there, and enough CPUs for its demand. Among fitting nodes the score is the CPU
//! capacity left after placing it (as a ratio of the node), plus, where the unit's
//! demand fits the node's spare CPUs, half the share of its memory already on the
//! node (placing a VM by its memory moves no page), plus a bonus for KSM
//! pages shared with units already there (`merge_across_nodes=0` only; a GiB of
//! shared pages is worth 15 % of a node's CPUs, at most 30 %),
//! minus a small penalty per unit of SLIT distance to the unit's sibling cells. When
//! a node with more CPU to spare than the chosen one was left out because the unit's
//! memory cannot go there (no free huge pages of its size, or no headroom), the
//! refusal is reported with that node: a huge-page VM whose pages sit on a busy node
//! goes to its memory, and the plan says why not to the freer node. With
//! no fitting node the unit spans: starting from the freest node with memory, the
//! nearest nodes are added until CPUs and memory suffice. If memory cannot fit at all
//! the unit is left where it runs and the refusal is reported.

use crate::model::{Reason, RefusalReason};

use super::view::mask_nodes;
use super::{Ctx, Phase, UnitState};

/// Score bonus for a node holding all of a unit's memory, in node-CPU ratio: a VM
/// started where its memory already is moves no page, so a node with its memory and
/// CPUs to spare wins unless another node has at least half a node's CPUs more.
const MEMORY_AFFINITY: f64 = 0.5;

impl Ctx<'_> {
    /// Share of unit `u`'s resident memory already on node index `n`.
    fn memory_share_on(&self, u: usize, n: usize) -> f64 {
        crate::model::local_share_on(&self.units[u].bytes_per_node, |i| i == n).unwrap_or(0.0)
    }

    fn demand_estimate(&self, u: usize) -> f64 {
        let unit = &self.units[u];
        unit.demand
            .max(unit.nvcpus as f64 * self.cfg.new_vcpu_demand)
    }

    /// KSM pages unit `u`'s VM shares with managed units homed on node index `n`.
    pub fn ksm_affinity(&self, u: usize, n: usize) -> u64 {
        let ksm = &self.snap.settings.ksm;
        if !self.cfg.ksm_grouping || ksm.merge_across_nodes {
            return 0;
        }
        let vm = &self.snap.vms[self.units[u].vm_idx];
        if vm.ksm_shared_pages.is_empty() {
            return 0;
        }
        let mut pages = 0;
        for (other, p) in &vm.ksm_shared_pages {
            let on_n = self.vm_units.get(other).is_some_and(|us| {
                us.iter()
                    .any(|&j| self.managed[j] && self.home[j] & (1 << n) != 0)
            });
            if on_n {
                pages += p;
            }
        }
        pages
    }

    /// KSM pages unit `u`'s VM shares with any other VM, where grouping applies
    /// (`merge_across_nodes=0`), else 0.
    fn ksm_pages_shared(&self, u: usize) -> u64 {
        let ksm = &self.snap.settings.ksm;
        if !self.cfg.ksm_grouping || ksm.merge_across_nodes {
            return 0;
        }
        let vm = &self.snap.vms[self.units[u].vm_idx];
        vm.ksm_shared_pages.iter().map(|(_, p)| p).sum()
    }

    pub(super) fn place_new(&mut self) {
        let mut order = std::mem::take(&mut self.pending);
        order.sort_by(|&a, &b| {
            let (da, db) = (self.demand_estimate(a), self.demand_estimate(b));
            db.total_cmp(&da)
                .then(self.ksm_pages_shared(b).cmp(&self.ksm_pages_shared(a)))
                .then(self.units[b].need_bytes.cmp(&self.units[a].need_bytes))
                .then(self.units[a].key.cmp(&self.units[b].key))
        });
        for u in order {
            self.place_one(u);
        }
    }

    /// The nodes (index mask) holding unit `u`'s memory: the fewest, largest share
    /// first, that hold the locality target of it. `None` before any is resident.
    fn memory_home(&self, u: usize) -> Option<u64> {
        let bytes = &self.units[u].bytes_per_node;
        let total: u64 = bytes.iter().sum();
        if total == 0 {
            return None;
        }
        let mut order: Vec<usize> = (0..bytes.len()).filter(|&n| bytes[n] > 0).collect();
        order.sort_by_key(|&n| (std::cmp::Reverse(bytes[n]), n));
        let (mut mask, mut held) = (0u64, 0u64);
        for n in order {
            mask |= 1 << n;
            held += bytes[n];
            if held as f64 >= total as f64 * self.cfg.locality_target_pct / 100.0 {
                break;
            }
        }
        Some(mask)
    }

    fn place_one(&mut self, u: usize) {
        let d = self.demand_estimate(u);
        if self.units[u].memory_fixed
            && let Some(mask) = self.memory_home(u)
        {
            // Memory that never moves: the CPUs go to it, whatever the load there.
            let reason = if mask.count_ones() == 1 {
                Reason::InitialPlacement {
                    node: self.node_id(mask.trailing_zeros() as usize),
                }
            } else {
                Reason::SpanNodes {
                    nodes: self.ids_of_mask(mask),
                }
            };
            self.set_cpus(u, mask, reason);
            self.settle_placed(u, mask, d);
            return;
        }
        let nn = self.nodes.len();
        // (score, node, KSM partners there, CPU part of the score)
        let mut best: Option<(f64, usize, bool, f64)> = None;
        // The node with the most CPU left that memory kept the unit off, and why.
        let mut blocked: Option<(f64, RefusalReason)> = None;
        for n in 0..nn {
            let cap = self.nodes[n].cap;
            if cap <= 0.0 || cap < d {
                continue;
            }
            let cpu_score = (cap - self.load[n] - d) / cap;
            if let Err(why) = self.memory_fits(u, n, self.bytes_to_bring(u, n)) {
                if blocked.as_ref().is_none_or(|(s, _)| cpu_score > *s + 1e-12) {
                    blocked = Some((cpu_score, why));
                }
                continue;
            }
            let mut score = cpu_score;
            // Only among nodes with CPUs to spare: memory already there never
            // justifies overcommitting a node while another has room.
            if cap - self.load[n] >= d {
                score += MEMORY_AFFINITY * self.memory_share_on(u, n);
            }
            let ksm = self.ksm_affinity(u, n);
            score += (0.15 * ksm as f64 * 4096.0 / (1u64 << 30) as f64).min(0.3);
            score -= self.sibling_distance_penalty(u, n);
            if best.is_none_or(|(s, ..)| score > s + 1e-12) {
                best = Some((score, n, ksm > 0, cpu_score));
            }
        }
        let key = self.units[u].key;
        // Kept off a node with more CPU to spare by its memory (huge pages of its
        // size or headroom missing there): say so, and where it went instead.
        if let Some((blocked_cpu, why)) = blocked
            && best.is_none_or(|(.., cpu)| blocked_cpu > cpu + 1e-12)
        {
            self.refuse(Some(key.vm), why);
        }
        let mask = match best {
            Some((_, n, ksm, _)) => {
                let reason = if ksm {
                    Reason::KsmGrouping {
                        node: self.node_id(n),
                    }
                } else {
                    Reason::InitialPlacement {
                        node: self.node_id(n),
                    }
                };
                self.set_cpus(u, 1 << n, reason);
                let bring = self.bytes_to_bring(u, n).min(self.room_on(u, n));
                self.reserved[n] += bring;
                self.placed_now[u] = Some((n, bring));
                1u64 << n
            }
            None => match self.span(u, d) {
                Some(mask) => {
                    let nodes = self.ids_of_mask(mask);
                    self.set_cpus(u, mask, Reason::SpanNodes { nodes });
                    mask
                }
                None => {
                    let need = self.units[u].need_bytes;
                    self.refuse(
                        Some(key.vm),
                        RefusalReason::NoNodeWithMemory { need_bytes: need },
                    );
                    let aff = self.units[u].affinity_mask;
                    let dem = self.units[u].demand;
                    self.home[u] = aff;
                    self.add_load(aff, dem, 1.0);
                    return;
                }
            },
        };
        self.settle_placed(u, mask, d);
    }

    /// Books a placement of unit `u` on `mask` with demand `d`.
    fn settle_placed(&mut self, u: usize, mask: u64, d: f64) {
        let key = self.units[u].key;
        self.state.stats.placements += 1;
        self.state.units.insert(
            key,
            UnitState {
                home: self.ids_of_mask(mask),
                phase: Phase::Settled,
                last_move_ns: None,
                bursts: Default::default(),
            },
        );
        self.home[u] = mask;
        self.managed[u] = true;
        // Charge the demand the placement assumed, not the observed one: a VM seen
        // for the first time has no measured demand yet, and charging 0 would let
        // every new VM of one decision pile onto the same node.
        self.add_load(mask, d, 1.0);
    }

    /// Penalty for placing a cell far from its sibling cells already placed.
    fn sibling_distance_penalty(&self, u: usize, n: usize) -> f64 {
        let me = &self.units[u];
        if me.key.cell.is_none() {
            return 0.0;
        }
        let mut p = 0.0;
        for &j in self.vm_units.get(&me.key.vm).into_iter().flatten() {
            if j != u && self.managed[j] {
                for h in mask_nodes(self.home[j]) {
                    p += 0.01 * (self.dist(n, h).saturating_sub(10)) as f64;
                }
            }
        }
        p
    }

    /// The nearest set of nodes holding `d` CPUs of demand and the unit's memory.
    fn span(&mut self, u: usize, d: f64) -> Option<u64> {
        let nn = self.nodes.len();
        let need = self.units[u].need_bytes;
        let seed = (0..nn)
            .filter(|&n| self.nodes[n].cap > 0.0)
            .max_by(|&a, &b| {
                let fa = self.nodes[a].cap - self.load[a];
                let fb = self.nodes[b].cap - self.load[b];
                fa.total_cmp(&fb).then(b.cmp(&a))
            })?;
        let mut order: Vec<usize> = (0..nn).collect();
        order.sort_by_key(|&n| (self.dist(seed, n), n != seed, n));
        let (mut mask, mut cap, mut room) = (0u64, 0.0, 0u64);
        for n in order {
            mask |= 1 << n;
            cap += self.nodes[n].cap - self.load[n].min(self.nodes[n].cap);
            room += self.room_on(u, n) + self.units[u].bytes_per_node.get(n).copied().unwrap_or(0);
            if cap >= d && room >= need {
                return Some(mask);
            }
        }
        (room >= need).then_some(mask)
    }
}
