//! Recurrence awareness: telling a burst that keeps coming back from a one-off.
//!
//! CPU-first probation judges one burst at a time: a burst shorter than the probation
//! window is reverted with zero bytes moved, which is right for a one-off. But units
//! that share a node and keep bursting together are moved off it and back again on
//! every burst, running away from their memory each time. A reverted probation is the
//! evidence: the engine only moves a unit off a node that is overloaded, and only
//! reverts it when the need went away before the window ended. So each unit remembers
//! (plain data in [`BurstMemory`]) when its probations were reverted, and every unit
//! remembers its recent peak CPU demand, fading linearly to nothing over one
//! recurrence window after it was last reached (three quarters of it counts).
//!
//! When a probation ends and the unit has already been reverted `recurrence_reverts`
//! times (at least once) within `recurrence_window_ns`, the engine judges the need
//! on the host's *peak view* instead of the current one: every unit at
//! `max(current, faded peak)`. Co-bursting units were idle together when the burst
//! ended, but on the peak view moving this one back would overload the node they
//! share at the next burst, so the probation passes on that lasting evidence and
//! memory follows once (reason [`Reason::RecurringBurst`]), spreading every later
//! burst. Everything else (rebalancing, placement, non-recurring probations) still
//! decides on current demand, so the peaks never move anything by themselves: a unit
//! that stops bursting is not moved for its past, and its memory here fades.
//!
//! A single short burst is never enough (it has no earlier revert), so it reverts
//! with zero bytes moved, as the probation contract says.

use crate::model::{NodeId, Reason};

use super::state::{BurstMemory, Phase};
use super::view::UnitView;
use super::{Ctx, EngineConfig, EngineState};

/// A unit's demand counts as "at its peak again" from this share of the faded peak.
const PEAK_REACHED: f64 = 0.75;
/// Reverts remembered per unit at most (the window bounds them already).
const MAX_REVERTS: usize = 16;

/// The remembered peak, faded linearly over one window since it was last reached.
pub(super) fn faded_peak(cfg: &EngineConfig, b: &BurstMemory, now_ns: u64) -> f64 {
    let window = cfg.recurrence_window_ns.max(1) as f64;
    let age = now_ns.saturating_sub(b.peak_ns) as f64;
    b.peak_demand * (1.0 - age / window).clamp(0.0, 1.0)
}

/// Records a reverted probation of a unit.
pub(super) fn note_revert(b: &mut BurstMemory, now_ns: u64) {
    b.reverts_ns.push(now_ns);
    if b.reverts_ns.len() > MAX_REVERTS {
        b.reverts_ns.remove(0);
    }
}

/// Ages every known unit's burst memory and records its current demand: a new or
/// renewed peak when it reaches three quarters of the faded one.
pub(super) fn track(cfg: &EngineConfig, state: &mut EngineState, units: &[UnitView], now_ns: u64) {
    if cfg.recurrence_reverts == 0 {
        return;
    }
    let window = cfg.recurrence_window_ns;
    for unit in units {
        let Some(st) = state.units.get_mut(&unit.key) else {
            continue;
        };
        let b = &mut st.bursts;
        b.reverts_ns
            .retain(|&t| t <= now_ns && now_ns - t <= window);
        let faded = faded_peak(cfg, b, now_ns);
        if unit.demand > 0.0 && unit.demand >= PEAK_REACHED * faded {
            b.peak_demand = faded.max(unit.demand);
            b.peak_ns = now_ns;
        } else if faded <= 0.0 {
            b.peak_demand = 0.0;
        }
    }
}

impl Ctx<'_> {
    /// Earlier reverts within the window when unit `u`'s probation is to be judged on
    /// the peak view, else 0.
    pub(super) fn recurrence_of(&self, u: usize) -> u32 {
        if self.cfg.recurrence_reverts == 0 {
            return 0;
        }
        let Some(st) = self.state.units.get(&self.units[u].key) else {
            return 0;
        };
        let reverts = st.bursts.reverts_ns.len() as u32;
        let probation = matches!(st.phase, Phase::Probation { .. });
        if probation && reverts >= self.cfg.recurrence_reverts {
            reverts
        } else {
            0
        }
    }

    /// Unit `u`'s demand on the peak view: `max(current, faded peak)`.
    pub(super) fn peak_demand(&self, u: usize) -> f64 {
        let d = self.units[u].demand;
        match self.state.units.get(&self.units[u].key) {
            Some(st) => d.max(faded_peak(self.cfg, &st.bursts, self.now)),
            None => d,
        }
    }

    /// Load per node with every unit at its peak demand, at its current home.
    pub(super) fn peak_load(&self) -> Vec<f64> {
        let mut load = vec![0.0; self.nodes.len()];
        for u in 0..self.units.len() {
            if self.home[u] != 0 {
                let d = self.peak_demand(u);
                super::view::spread(&self.nodes, &mut load, self.home[u], d, 1.0);
            }
        }
        load
    }

    /// The reason of unit `u`'s first migration towards `node` after its probation
    /// passed on a recurring burst, if that is still to come (and now taken).
    pub(super) fn take_recurring_reason(&mut self, u: usize, node: NodeId) -> Option<Reason> {
        let st = self.state.units.get_mut(&self.units[u].key)?;
        let reverts = std::mem::take(&mut st.bursts.commit_reverts);
        (reverts > 0).then_some(Reason::RecurringBurst {
            node,
            reverts,
            window_s: self.cfg.recurrence_window_ns / 1_000_000_000,
        })
    }
}
