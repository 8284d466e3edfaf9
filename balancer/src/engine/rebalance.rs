//! CPU rebalancing with hysteresis: single moves off the busiest node, cheapest to
//! move first, and 1-for-1 / 1-for-2 swaps with the idlest node when no single move
//! lowers the cost. See the module doc of [`super`] for the rules.

use crate::model::{Reason, RefusalReason};

use super::view::spread;
use super::{Ctx, Imbalance, Phase};

/// A unit that may move now.
#[derive(Clone, Copy)]
struct Cand {
    u: usize,
    from: usize,
    d: f64,
}

impl Ctx<'_> {
    fn movable(&self, u: usize) -> bool {
        if !self.managed[u] || self.touched[u] || self.home[u].count_ones() != 1 {
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

    pub(super) fn rebalance(&mut self) {
        let load_before = self.load.clone();
        for _ in 0..self.cfg.max_moves_per_tick {
            let Imbalance {
                spread_pct: imb,
                busiest: hi,
                idlest: lo,
                busiest_ratio,
            } = self.imbalance(&self.load);
            if imb <= self.cfg.imbalance_threshold_pct
                || busiest_ratio * 100.0 < self.cfg.busy_floor_pct
            {
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

    fn best_single_move(&mut self, hi: usize, imb: f64) -> bool {
        let nn = self.nodes.len();
        let lh = self.load[hi];
        let rh = lh / self.nodes[hi].cap;
        // (gain, bytes, unit, target)
        let mut opts: Vec<(f64, f64, usize, usize)> = Vec::new();
        let mut blocked = None;
        for u in 0..self.units.len() {
            if self.home[u] != 1 << hi || !self.movable(u) {
                continue;
            }
            let d = self.units[u].demand;
            if d <= 0.0 {
                continue;
            }
            for t in 0..nn {
                let ct = self.nodes[t].cap;
                if t == hi || ct <= 0.0 {
                    continue;
                }
                let lt = self.load[t];
                if (lt + d) / ct > rh {
                    continue; // would overshoot: just moves the hot spot
                }
                let gain = self.node_cost(hi, lh) + self.node_cost(t, lt)
                    - self.node_cost(hi, lh - d)
                    - self.node_cost(t, lt + d);
                if gain <= 1e-9 {
                    continue;
                }
                if let Err(why) = self.memory_fits(u, t, self.bytes_to_bring(u, t)) {
                    blocked.get_or_insert((self.units[u].key.vm, why));
                    continue;
                }
                opts.push((gain, self.move_bytes(u, hi, t), u, t));
            }
        }
        let best_gain = opts.iter().map(|o| o.0).fold(0.0, f64::max);
        let pick = opts
            .iter()
            .filter(|o| o.0 >= 0.25 * best_gain)
            .min_by(|a, b| {
                (a.1 / a.0)
                    .total_cmp(&(b.1 / b.0))
                    .then(self.units[a.2].key.cmp(&self.units[b.2].key))
                    .then(a.3.cmp(&b.3))
            })
            .copied();
        match pick {
            Some((_, _, u, t)) => {
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

    fn move_unit(&mut self, u: usize, from: usize, to: usize, reason: Reason) {
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
