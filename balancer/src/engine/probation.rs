//! CPU-first probation. A rebalancing move only changes where a unit's vCPUs run;
//! its memory stays where it was. Once `probation_ns` has passed the engine asks
//! whether the need lasted: it imagines moving the unit back and, if the imbalance
//! would then stay within the threshold (or nobody would be busy), the need went away
//! and the CPUs go back to where the memory still is: the whole episode moved zero
//! bytes. Otherwise the move commits and lazy migration brings the memory along.
//! A commit whose home can no longer take the memory (headroom, huge pages) reverts
//! instead, with the refusal reported. A unit whose earlier probations were reverted
//! (it keeps bursting) is judged on the peak view instead of the current load; see
//! `recurrence.rs`.

use crate::model::Reason;

use super::view::spread;
use super::{Ctx, Phase};

impl Ctx<'_> {
    pub(super) fn resolve_probations(&mut self) {
        // The peak view, built once when a recurring unit's probation ends.
        let mut peak_view: Option<Vec<f64>> = None;
        for u in 0..self.units.len() {
            if !self.managed[u] || self.touched[u] {
                continue;
            }
            let key = self.units[u].key;
            let Some(st) = self.state.units.get(&key) else {
                continue;
            };
            let Phase::Probation {
                since_ns,
                from,
                late_demand_sum,
                late_samples,
            } = st.phase.clone()
            else {
                continue;
            };
            let d = self.units[u].demand;
            if self.now < since_ns.saturating_add(self.cfg.probation_ns) {
                if self.now >= since_ns.saturating_add(self.cfg.probation_ns / 2) {
                    note_late_demand(&mut self.state, key, d);
                }
                continue;
            }
            let from_mask = self.mask_of_ids(&from);
            let home_mask = self.home[u];
            // Imagine the revert: on the current load with the unit at its demand over
            // the window's second half, or, for a unit that keeps bursting, on the
            // peak view (recurrence.rs).
            let recurring = self.recurrence_of(u);
            let (base, dj) = if recurring > 0 {
                let peaks = peak_view.get_or_insert_with(|| self.peak_load()).clone();
                (peaks, self.peak_demand(u))
            } else {
                let late = (late_demand_sum + d) / f64::from(late_samples + 1);
                let mut base = self.load.clone();
                spread(&self.nodes, &mut base, home_mask, late - d, 1.0);
                (base, late)
            };
            let mut trial = base.clone();
            spread(&self.nodes, &mut trial, home_mask, dj, -1.0);
            spread(&self.nodes, &mut trial, from_mask, dj, 1.0);
            let trial_imbalance = self.imbalance(&trial);
            let need_gone = from_mask != 0
                && (trial_imbalance.spread_pct <= self.cfg.imbalance_threshold_pct
                    || trial_imbalance.busiest_ratio * 100.0 < self.cfg.busy_floor_pct
                    || self.cost_of(&trial) <= self.cost_of(&base) + 1e-9);
            let mut commit_blocked = None;
            if !need_gone {
                for n in super::view::mask_nodes(home_mask) {
                    let bring = self.bytes_to_bring(u, n) / home_mask.count_ones() as u64;
                    if let Err(why) = self.memory_fits(u, n, bring) {
                        commit_blocked = Some(why);
                        break;
                    }
                }
            }
            if need_gone || commit_blocked.is_some() {
                if let Some(why) = commit_blocked {
                    self.refuse(Some(key.vm), why);
                }
                let from_ids = from.clone();
                spread(&self.nodes, &mut self.load, home_mask, d, -1.0);
                spread(&self.nodes, &mut self.load, from_mask, d, 1.0);
                if let Some(peaks) = peak_view.as_mut() {
                    let p = self.peak_demand(u);
                    spread(&self.nodes, peaks, home_mask, p, -1.0);
                    spread(&self.nodes, peaks, from_mask, p, 1.0);
                }
                self.home[u] = from_mask;
                self.release_promise(u, u64::MAX);
                if let Some(st) = self.state.units.get_mut(&key) {
                    st.home = from_ids.clone();
                    st.phase = Phase::Settled;
                    st.last_move_ns = Some(self.now);
                    super::recurrence::note_revert(&mut st.bursts, self.now);
                }
                self.state.stats.reverts += 1;
                let node = from_ids.first().copied().unwrap_or(0);
                self.set_cpus(u, from_mask, Reason::ProbationReverted { node });
            } else {
                if let Some(st) = self.state.units.get_mut(&key) {
                    st.phase = Phase::Settled;
                    // Its first migration (now, or when the budget allows) says why.
                    st.bursts.commit_reverts = recurring;
                }
                if recurring > 0 {
                    self.state.stats.recurring_commits += 1;
                }
                self.state.stats.commits += 1;
                self.committed_now[u] = true;
            }
        }
    }
}

/// Adds one demand reading to a unit's probation (second half of its window).
fn note_late_demand(state: &mut super::EngineState, key: super::UnitKey, d: f64) {
    if let Some(st) = state.units.get_mut(&key)
        && let Phase::Probation {
            late_demand_sum,
            late_samples,
            ..
        } = &mut st.phase
    {
        *late_demand_sum += d;
        *late_samples += 1;
    }
}
