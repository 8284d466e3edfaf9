//! CPU rebalancing with hysteresis: single moves off the busiest node, cheapest to
//! move first, and 1-for-1 / 1-for-2 swaps with the idlest node when no single move
//! lowers the cost. See the module doc of [`super`] for the rules.
//!
//! Cheapest means the fewest bytes to move per CPU taken off the busy node (seed
//! 004's "lowest resident memory per CPU usage"), among the moves that lower the
//! cost by at least a quarter of the best move's gain, so a tiny VM that barely
//! helps never wins on price alone. Every search leaves a [`MoveChoice`] in the
//! plan: each unit on the busy node with its resident bytes, the CPU it would take
//! off, its bytes per CPU and why it won or lost, for `status` to show.

use crate::model::{CandidateVerdict, MoveCandidate, MoveChoice, Reason, RefusalReason};

use super::view::spread;
use super::{Ctx, Imbalance, Phase};

/// A move of unit `u` to node index `t`: the cost it removes and the bytes that
/// would follow (see [`Ctx::move_bytes`]).
#[derive(Clone, Copy)]
struct MoveOpt {
    gain: f64,
    bytes: f64,
    u: usize,
    t: usize,
}

/// A unit that may move now.
#[derive(Clone, Copy)]
struct Cand {
    u: usize,
    from: usize,
    d: f64,
}

impl Ctx<'_> {
    fn movable(&self, u: usize) -> bool {
        // Memory that never moves cannot follow a CPU move: such a unit stays put.
        if !self.managed[u]
            || self.touched[u]
            || self.home[u].count_ones() != 1
            || self.units[u].memory_fixed
        {
            return false;
        }
        let Some(st) = self.state.units.get(&self.units[u].key) else {
            return false;
        };
        if matches!(st.phase, Phase::Probation { .. }) {
            return false;
        }
        st.last_move_ns
            .is_none_or(|t| self.now >= t.saturating_add(self.cfg.hysteresis_ns))
    }

    /// The unit on node `hi` whose hysteresis window ends first, if any is held.
    fn held_by_hysteresis(&self, hi: usize) -> Option<(u32, u64)> {
        (0..self.units.len())
            .filter(|&u| self.managed[u] && self.home[u] == 1 << hi && !self.touched[u])
            .filter_map(|u| {
                let st = self.state.units.get(&self.units[u].key)?;
                let until = st.last_move_ns?.saturating_add(self.cfg.hysteresis_ns);
                (matches!(st.phase, Phase::Settled) && until > self.now)
                    .then_some((self.units[u].key.vm, until))
            })
            .min_by_key(|&(vm, until)| (until, vm))
    }

    /// Bytes that must move for unit `u` to live on node `n`, plus KSM pages it would
    /// leave behind (as bytes) minus those it would join.
    fn move_bytes(&self, u: usize, from: usize, to: usize) -> f64 {
        let bring = self.units[u]
            .resident_bytes
            .saturating_sub(self.units[u].bytes_per_node[to]) as f64;
        let ksm_leave = self.ksm_affinity(u, from) as f64 * 4096.0;
        let ksm_join = self.ksm_affinity(u, to) as f64 * 4096.0;
        (bring + ksm_leave - ksm_join).max(0.0) + 1.0
    }

    fn node_cost(&self, n: usize, l: f64) -> f64 {
        let cap = self.nodes[n].cap;
        if cap <= 0.0 { 0.0 } else { l * l / cap }
    }

    /// Idle CPUs node `n` still has this decision: what the host measured, minus the
    /// demand moved there since. `None` when the host does not measure idle time.
    /// The host counts reserved CPUs too, and VMs cannot use them: the reading is
    /// taken as if they were all idle (the lower bound of what VMs may use), so an
    /// idle reserved CPU never makes a busy node look free.
    fn idle_left(&self, n: usize, load_before: &[f64]) -> Option<f64> {
        let node = self.snap.topology.nodes.get(n)?;
        let reserved = node.cpus.len() as f64 - self.nodes[n].cap;
        let idle = node.idle_cpus? - reserved;
        Some(idle - (self.load[n] - load_before[n]).max(0.0))
    }

    /// Whether an imbalance seen now may act, else the refusal that says why. It acts
    /// from the second decision in a row that sees it, once the busiest node's load
    /// stopped rising: a VM whose load changed during the last interval reads
    /// partly, and the cheapest move would be judged on that reading. In the stack
    /// lab's `stack-cheapest-move` two VMs had already brought node 0 to its busy
    /// floor when the third rose; the decision 0.8 s later read the 2-vCPU VM at
    /// 1.18 CPUs instead of 2 and moved a dearer one. A rise of more than
    /// `imbalance_threshold_pct` of the node's CPUs since the last decision waits
    /// for the next one, for at most three ticks from when the imbalance was
    /// first seen. A daemon's first decision has nothing to wait for.
    fn imbalance_settled(&mut self, hi: usize, imb: f64) -> bool {
        let first_seen = self.state.imbalance_since_ns.is_none();
        let since = *self.state.imbalance_since_ns.get_or_insert(self.now);
        let before = self
            .state
            .imbalance_loads
            .replace(self.load.clone())
            .and_then(|l| l.get(hi).copied());
        if self.first_decision {
            return true;
        }
        if first_seen {
            self.refuse(
                None,
                RefusalReason::ImbalanceUnconfirmed { imbalance_pct: imb },
            );
            return false;
        }
        let rise_cpus = before.map_or(0.0, |b| self.load[hi] - b);
        let settle_cpus = self.nodes[hi].cap * self.cfg.imbalance_threshold_pct / 100.0;
        let waited_ns = self.now.saturating_sub(since);
        if rise_cpus > settle_cpus && waited_ns < 3 * self.cfg.tick_ns {
            self.refuse(
                None,
                RefusalReason::ImbalanceRising {
                    imbalance_pct: imb,
                    node: self.node_id(hi),
                    rise_cpus,
                },
            );
            return false;
        }
        true
    }

    pub(super) fn rebalance(&mut self) {
        let load_before = self.load.clone();
        for round in 0..self.cfg.max_moves_per_tick {
            let Imbalance {
                spread_pct: imb,
                busiest: hi,
                idlest: lo,
                busiest_ratio,
            } = self.imbalance(&self.load);
            if imb <= self.cfg.imbalance_threshold_pct
                || busiest_ratio * 100.0 < self.cfg.busy_floor_pct
            {
                if round == 0 {
                    self.state.imbalance_since_ns = None;
                    self.state.imbalance_loads = None;
                }
                return;
            }
            if round == 0 && !self.imbalance_settled(hi, imb) {
                return;
            }
            // Measured use is not demand on a saturated host: a VM waiting for CPU
            // uses less than it wants, and an emulated or noisy host makes equal
            // nodes look unequal. Moving vCPUs only helps when the target really has
            // idle CPUs; otherwise every move is a memory migration for nothing.
            if self
                .idle_left(lo, &load_before)
                .is_some_and(|idle| idle < self.cfg.min_idle_cpus)
            {
                self.refuse(None, RefusalReason::NoImprovingMove { imbalance_pct: imb });
                return;
            }
            let moved =
                self.best_single_move(hi, imb) || (self.cfg.swaps && self.best_swap(hi, lo, imb));
            if !moved {
                match self.held_by_hysteresis(hi) {
                    Some((vm, until_ns)) => {
                        self.refuse(Some(vm), RefusalReason::Hysteresis { until_ns })
                    }
                    None => {
                        self.refuse(None, RefusalReason::NoImprovingMove { imbalance_pct: imb })
                    }
                }
                return;
            }
        }
    }

    /// Why unit `u` cannot move now, or `None` when it may.
    fn unmovable_why(&self, u: usize) -> Option<String> {
        if !self.managed[u] {
            return Some("not managed (pinned, excluded or not yet placed)".into());
        }
        if self.touched[u] {
            return Some("already acted on in this plan".into());
        }
        if self.home[u].count_ones() != 1 {
            return Some("spans several nodes".into());
        }
        if self.movable(u) {
            return None;
        }
        let st = self.state.units.get(&self.units[u].key);
        Some(match st.map(|s| &s.phase) {
            Some(Phase::Probation { .. }) => "in probation after its last move".into(),
            _ => match st.and_then(|s| s.last_move_ns) {
                Some(t) => format!(
                    "moved {:.0} s ago (hysteresis {:.0} s)",
                    self.now.saturating_sub(t) as f64 / 1e9,
                    self.cfg.hysteresis_ns as f64 / 1e9
                ),
                None => "not tracked yet".into(),
            },
        })
    }

    /// One move off node `hi`: among moves of a unit to another node that lower the
    /// cost without overshooting and gain at least a quarter of the best gain, the
    /// one with the fewest bytes to move per CPU taken off `hi` (then the bigger
    /// gain). Every unit on `hi` is reported with its figures in the plan.
    fn best_single_move(&mut self, hi: usize, imb: f64) -> bool {
        let nn = self.nodes.len();
        let lh = self.load[hi];
        let rh = lh / self.nodes[hi].cap;
        let (total_load, total_cap) = self.load_totals(&self.load);
        let mut opts: Vec<MoveOpt> = Vec::new();
        // Units on `hi` with why they have no option (None: they have some).
        let mut on_hi: Vec<(usize, Option<CandidateVerdict>)> = Vec::new();
        let mut blocked = None;
        for u in 0..self.units.len() {
            if self.home[u] != 1 << hi {
                continue;
            }
            if let Some(why) = self.unmovable_why(u) {
                on_hi.push((u, Some(CandidateVerdict::NotMovable { why })));
                continue;
            }
            let d = self.units[u].demand;
            if d <= 0.0 {
                on_hi.push((u, Some(CandidateVerdict::Idle)));
                continue;
            }
            let before = opts.len();
            let mut mem_block = None;
            for t in 0..nn {
                let ct = self.nodes[t].cap;
                if t == hi || ct <= 0.0 {
                    continue;
                }
                let lt = self.load[t];
                if (lt + d) / ct > rh {
                    continue; // would overshoot: just moves the hot spot
                }
                // A move that makes the target the busier of the two must narrow
                // their gap by at least the threshold: one that mirrors the hot
                // spot (the two nodes' roles swapped, their loads alike) gains a
                // sliver on a noisy reading, and its memory would follow for
                // nothing.
                let (hi_after, t_after) = ((lh - d) / self.nodes[hi].cap, (lt + d) / ct);
                if t_after >= hi_after
                    && super::spread_pct(
                        (rh - lt / ct) - (t_after - hi_after),
                        total_load,
                        total_cap,
                    ) < self.cfg.imbalance_threshold_pct
                {
                    continue;
                }
                let gain = self.node_cost(hi, lh) + self.node_cost(t, lt)
                    - self.node_cost(hi, lh - d)
                    - self.node_cost(t, lt + d);
                if gain <= 1e-9 {
                    continue;
                }
                if let Err(why) = self.memory_fits(u, t, self.bytes_to_bring(u, t)) {
                    blocked.get_or_insert((self.units[u].key.vm, why.clone()));
                    mem_block.get_or_insert(why);
                    continue;
                }
                opts.push(MoveOpt {
                    gain,
                    bytes: self.move_bytes(u, hi, t),
                    u,
                    t,
                });
            }
            let none = (opts.len() == before).then_some(match mem_block {
                Some(why) => CandidateVerdict::MemoryBlocked { why },
                None => CandidateVerdict::NoHelpfulTarget,
            });
            on_hi.push((u, none));
        }
        let best_gain = opts.iter().map(|o| o.gain).fold(0.0, f64::max);
        let helps = |o: &MoveOpt| o.gain >= 0.25 * best_gain;
        let price = |o: &MoveOpt| o.bytes / self.units[o.u].demand;
        let cheaper = |a: &MoveOpt, b: &MoveOpt| {
            price(a)
                .total_cmp(&price(b))
                .then(b.gain.total_cmp(&a.gain))
                .then(self.units[a.u].key.cmp(&self.units[b.u].key))
                .then(a.t.cmp(&b.t))
        };
        let pick = opts
            .iter()
            .filter(|o| helps(o))
            .min_by(|a, b| cheaper(a, b))
            .copied();
        let chosen_vm = pick.map(|p| self.units[p.u].key.vm);
        let candidates = on_hi
            .into_iter()
            .map(|(u, none)| {
                let mine = opts.iter().filter(|o| o.u == u);
                // Its best helpful option, else its biggest gain (too little).
                let best = mine
                    .clone()
                    .filter(|o| helps(o))
                    .min_by(|a, b| cheaper(a, b))
                    .or_else(|| mine.max_by(|a, b| a.gain.total_cmp(&b.gain)))
                    .copied();
                let verdict = match (none, best) {
                    (Some(v), _) => v,
                    (None, Some(_)) if pick.is_some_and(|p| p.u == u) => CandidateVerdict::Chosen,
                    (None, Some(o)) if helps(&o) => CandidateVerdict::Costlier {
                        than: chosen_vm.unwrap_or_default(),
                    },
                    (None, Some(o)) => CandidateVerdict::TooLittleGain {
                        gain: o.gain,
                        best_gain,
                    },
                    (None, None) => CandidateVerdict::NoHelpfulTarget,
                };
                self.candidate(u, best, verdict)
            })
            .collect();
        self.plan.cpu_choices.push(MoveChoice {
            from: self.node_id(hi),
            imbalance_pct: imb,
            chosen: chosen_vm,
            candidates,
        });
        match pick {
            Some(MoveOpt { u, t, .. }) => {
                let (from, to) = (self.node_id(hi), self.node_id(t));
                let reason = Reason::CpuImbalance {
                    from,
                    to,
                    imbalance_pct: imb,
                };
                self.move_unit(u, hi, t, reason);
                true
            }
            None => {
                if let Some((vm, why)) = blocked {
                    self.refuse(Some(vm), why);
                }
                false
            }
        }
    }

    /// Unit `u`'s figures for the plan: with its best option, the bytes that would
    /// follow it there; without one, its resident bytes.
    fn candidate(
        &self,
        u: usize,
        best: Option<MoveOpt>,
        verdict: CandidateVerdict,
    ) -> MoveCandidate {
        let unit = &self.units[u];
        let bytes_to_move = best.map_or(unit.resident_bytes, |o| (o.bytes - 1.0).max(0.0) as u64);
        let cpus_gained = unit.demand;
        MoveCandidate {
            vm: unit.key.vm,
            cell: unit.key.cell,
            resident_bytes: unit.resident_bytes,
            cpus_gained,
            to: best.map(|o| self.node_id(o.t)),
            bytes_to_move,
            bytes_per_cpu: (cpus_gained > 0.0).then(|| bytes_to_move as f64 / cpus_gained),
            verdict,
        }
    }

    fn move_unit(&mut self, u: usize, from: usize, to: usize, reason: Reason) {
        // Its old home's huge pages are no longer needed by it.
        self.release_promise(u, u64::MAX);
        let d = self.units[u].demand;
        spread(&self.nodes, &mut self.load, 1 << from, d, -1.0);
        spread(&self.nodes, &mut self.load, 1 << to, d, 1.0);
        self.home[u] = 1 << to;
        let key = self.units[u].key;
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        if let Some(st) = self.state.units.get_mut(&key) {
            st.home = vec![to_id];
            st.phase = Phase::probation(self.now, vec![from_id]);
            st.last_move_ns = Some(self.now);
            st.bursts.commit_reverts = 0;
        }
        self.state.stats.moves += 1;
        self.set_cpus(u, 1 << to, reason);
    }

    fn swap_cands(&self, node: usize) -> Vec<Cand> {
        let mut c: Vec<Cand> = (0..self.units.len())
            .filter(|&u| self.home[u] == 1 << node && self.movable(u) && self.units[u].demand > 0.0)
            .map(|u| Cand {
                u,
                from: node,
                d: self.units[u].demand,
            })
            .collect();
        // Cheapest per CPU first, then bigger demand.
        c.sort_by(|a, b| {
            let ca = self.units[a.u].resident_bytes as f64 / a.d;
            let cb = self.units[b.u].resident_bytes as f64 / b.d;
            ca.total_cmp(&cb)
                .then(self.units[a.u].key.cmp(&self.units[b.u].key))
        });
        c.truncate(self.cfg.swap_candidates.max(1));
        c
    }

    fn best_swap(&mut self, hi: usize, lo: usize, imb: f64) -> bool {
        if hi == lo {
            return false;
        }
        let xs = self.swap_cands(hi);
        let ys = self.swap_cands(lo);
        let (lh, ll) = (self.load[hi], self.load[lo]);
        let base = self.node_cost(hi, lh) + self.node_cost(lo, ll);
        let rh = lh / self.nodes[hi].cap;
        let mut groups_x: Vec<Vec<Cand>> = xs.iter().map(|c| vec![*c]).collect();
        let mut groups_y: Vec<Vec<Cand>> = ys.iter().map(|c| vec![*c]).collect();
        for i in 0..xs.len() {
            for j in i + 1..xs.len() {
                groups_x.push(vec![xs[i], xs[j]]);
            }
        }
        for i in 0..ys.len() {
            for j in i + 1..ys.len() {
                groups_y.push(vec![ys[i], ys[j]]);
            }
        }
        let mut best: Option<(f64, f64, usize, usize)> = None; // (score, gain, gx, gy)
        let mut best_gain = 0.0f64;
        let mut opts = Vec::new();
        for (gi, gx) in groups_x.iter().enumerate() {
            let dx: f64 = gx.iter().map(|c| c.d).sum();
            for (gj, gy) in groups_y.iter().enumerate() {
                if gx.len() + gy.len() > 3 {
                    continue;
                }
                let dy: f64 = gy.iter().map(|c| c.d).sum();
                let delta = dx - dy;
                if delta <= 0.0 {
                    continue;
                }
                let (nh, nl) = (lh - delta, ll + delta);
                if nl / self.nodes[lo].cap > rh {
                    continue;
                }
                let gain = base - self.node_cost(hi, nh) - self.node_cost(lo, nl);
                if gain <= 1e-9 {
                    continue;
                }
                let mem_ok = gx.iter().all(|c| {
                    self.memory_fits(c.u, lo, self.bytes_to_bring(c.u, lo))
                        .is_ok()
                }) && gy.iter().all(|c| {
                    self.memory_fits(c.u, hi, self.bytes_to_bring(c.u, hi))
                        .is_ok()
                });
                if !mem_ok {
                    continue;
                }
                let bytes: f64 = gx.iter().map(|c| self.move_bytes(c.u, hi, lo)).sum::<f64>()
                    + gy.iter().map(|c| self.move_bytes(c.u, lo, hi)).sum::<f64>();
                best_gain = best_gain.max(gain);
                opts.push((bytes / gain, gain, gi, gj));
            }
        }
        for o in opts {
            if o.1 >= 0.25 * best_gain && best.is_none_or(|b| o.0 < b.0) {
                best = Some(o);
            }
        }
        let Some((_, _, gi, gj)) = best else {
            return false;
        };
        let gx = groups_x[gi].clone();
        let gy = groups_y[gj].clone();
        let vms_x: Vec<u32> = gx.iter().map(|c| self.units[c.u].key.vm).collect();
        let vms_y: Vec<u32> = gy.iter().map(|c| self.units[c.u].key.vm).collect();
        for c in &gx {
            let reason = Reason::Swap {
                with: vms_y.clone(),
                from: self.node_id(c.from),
                to: self.node_id(lo),
                imbalance_pct: imb,
            };
            self.move_unit(c.u, hi, lo, reason);
        }
        for c in &gy {
            let reason = Reason::Swap {
                with: vms_x.clone(),
                from: self.node_id(c.from),
                to: self.node_id(hi),
                imbalance_pct: imb,
            };
            self.move_unit(c.u, lo, hi, reason);
        }
        self.state.stats.swaps += 1;
        self.state.stats.moves -= (gx.len() + gy.len()) as u64;
        self.state.stats.moves += 1;
        true
    }
}
