//! Lazy memory migration for settled units below their locality target.
//!
//! Each decision a unit gets one `MigrateMemory` per remote node holding its memory,
//! most first, to the home node (the roomiest home node when it spans), until the
//! moves planned reach its locality target or its budget is spent. While hot regions
//! of the unit sit on a source they are listed, hottest first, and the unit's budget
//! is `hot_rate_bytes_per_s`; otherwise the rest moves at `cold_rate_bytes_per_s`. A
//! move takes the whole source node when the budgets allow, even past the target:
//! each partial move costs a scan of the VM's address space, so leaving a sliver for
//! later costs more than finishing. Moves never exceed the room above the target's
//! headroom or what is left of the host-wide budget. Units with remote hot memory go
//! first, then the least local, so the budget buys the most locality.
//!
//! Hot means at least [`HOT_SHARE_OF_PEAK`] of the heat of the VM's hottest region.
//! Heat sources report every region they saw touched, and with write heat most of a
//! busy VM's memory is written now and then: in the lab's 384 MiB VMs two thirds of
//! the regions had some heat where a quarter carried 95 % of the writes. Moving every
//! region with any heat "hot first" moved VM after VM nearly whole, and the last VM's
//! hot set waited for all the others' warm memory. Warm regions go with the cold rest.
//! A hot move is charged its regions' bytes, not the whole source's, so one decision
//! plans the hot sets of many VMs at once.

use crate::model::{Action, Reason};

use super::view::mask_nodes;
use super::{Ctx, Phase};

/// Share of the hottest region's heat a region needs to count as hot (module doc).
/// Write heat halves a region's round heat for each read pass it shows up later than
/// the VM's first written region, so a quarter is two passes: regions written about
/// as often as the hottest ones, not ones caught by the last, longest pass.
pub const HOT_SHARE_OF_PEAK: f64 = 0.25;

impl Ctx<'_> {
    pub(super) fn migrate(&mut self) {
        let secs = self.dt_ns as f64 / 1e9;
        let target = self.cfg.locality_target_pct / 100.0;
        let now = self.now;
        self.state
            .memory_refused_until_ns
            .retain(|_, until| *until > now);
        // (has remote hot, locality, unit)
        let mut todo: Vec<(bool, f64, usize)> = Vec::new();
        for u in 0..self.units.len() {
            // A unit placed just now is touched by its CPU move, and its memory may
            // follow at once: placement is not a probation (nothing to confirm), and
            // waiting a decision costs the VM a tick of remote accesses.
            let placed_now = self.placed_now[u].is_some();
            if !self.managed[u] || (self.touched[u] && !placed_now) || self.units[u].memory_fixed {
                continue;
            }
            let Some(st) = self.state.units.get(&self.units[u].key) else {
                continue;
            };
            let vm = self.units[u].key.vm;
            // A move of this memory still running (a cell moves beside its VM's other
            // cells): nothing new until its outcome comes; one
            // the host mostly refused: not again until the hold is over.
            if !matches!(st.phase, Phase::Settled)
                || self.state.memory_moving(vm, self.units[u].addr_range)
                || self
                    .state
                    .memory_refused_until_ns
                    .get(&vm)
                    .is_some_and(|&until| self.now < until)
            {
                continue;
            }
            let unit = &self.units[u];
            if unit.resident_bytes == 0 {
                continue;
            }
            let home = self.home[u];
            let loc = crate::model::local_share_on(&unit.bytes_per_node, |n| home & (1 << n) != 0)
                .unwrap_or(0.0);
            if loc >= target {
                // Nothing to follow: a commit's reason has nothing to ride on.
                let key = unit.key;
                if let Some(st) = self.state.units.get_mut(&key) {
                    st.bursts.commit_reverts = 0;
                }
                continue;
            }
            let hot = !self.remote_hot(u, home).is_empty();
            todo.push((hot, loc, u));
        }
        todo.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then(a.1.total_cmp(&b.1))
                .then(self.units[a.2].key.cmp(&self.units[b.2].key))
        });
        for (_, loc, u) in todo {
            if self.host_budget_bytes == 0 {
                break;
            }
            // Its placement's reservation for the memory to come gives way to the
            // moves planned now, which reserve what they move.
            if let Some((n, bytes)) = self.placed_now[u].take() {
                self.reserved[n] = self.reserved[n].saturating_sub(bytes);
            }
            let home = self.home[u];
            let unit = &self.units[u];
            let to_target = ((target - loc) * unit.resident_bytes as f64)
                .ceil()
                .max(0.0) as u64;
            // Remote nodes holding the unit's memory, most first.
            let mut sources: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| home & (1 << n) == 0 && unit.bytes_per_node[n] > 0)
                .collect();
            sources.sort_by(|&a, &b| {
                unit.bytes_per_node[b]
                    .cmp(&unit.bytes_per_node[a])
                    .then(a.cmp(&b))
            });
            let mut unit_budget = None;
            let mut planned = 0u64;
            for src in sources {
                if self.host_budget_bytes == 0 || planned >= to_target.max(1) {
                    break;
                }
                if let Some(b) = self.plan_move(u, src, loc, secs, &mut unit_budget) {
                    planned += b;
                }
            }
        }
    }

    /// Plans one `MigrateMemory` of unit `u` from node index `src` to its home (the
    /// roomiest home node when it spans): the source's hot regions first at the hot
    /// rate, else the cold rest at the cold rate, the whole source node when the
    /// budgets allow (finishing a node costs one scan of the address space, a
    /// remainder left for later costs another). `unit_budget` is what the unit may
    /// still move this decision (set by its first move). Returns the bytes planned.
    fn plan_move(
        &mut self,
        u: usize,
        src: usize,
        loc: f64,
        secs: f64,
        unit_budget: &mut Option<u64>,
    ) -> Option<u64> {
        let home = self.home[u];
        let unit = &self.units[u];
        let within = unit.addr_range;
        let dst = mask_nodes(home).max_by(|&a, &b| {
            self.room_on(u, a)
                .cmp(&self.room_on(u, b))
                .then(self.dist(src, b).cmp(&self.dist(src, a)))
                .then(b.cmp(&a))
        })?;
        let regions = self.remote_hot_on(u, src);
        let rate = if regions.is_empty() {
            self.cfg.cold_rate_bytes_per_s
        } else {
            self.cfg.hot_rate_bytes_per_s
        };
        let budget = *unit_budget.get_or_insert((rate as f64 * secs) as u64);
        let mut max_bytes = budget
            .min(unit.bytes_per_node[src])
            .min(self.host_budget_bytes);
        if !regions.is_empty() {
            let region_bytes: u64 = regions.iter().map(|&(_, len)| len).sum();
            max_bytes = max_bytes.min(region_bytes);
        }
        let room = self.room_on(u, dst);
        if room == 0 {
            if let Err(why) = self.memory_fits(u, dst, 1) {
                let vm = unit.key.vm;
                self.refuse(Some(vm), why);
            }
            return None;
        }
        max_bytes = max_bytes.min(room);
        if max_bytes == 0 {
            return None;
        }
        self.host_budget_bytes -= max_bytes;
        *unit_budget = Some(budget - max_bytes);
        let recurring = self.take_recurring_reason(u, self.node_id(dst));
        let reason = if let Some(r) = recurring {
            r
        } else if self.committed_now[u] {
            Reason::ProbationCommitted {
                node: self.node_id(dst),
            }
        } else {
            Reason::Locality {
                locality_pct: loc * 100.0,
                target_pct: self.cfg.locality_target_pct,
            }
        };
        let (from, to) = (self.node_id(src), self.node_id(dst));
        self.push_memory_move(
            u,
            dst,
            max_bytes,
            Action::MigrateMemory {
                from,
                to,
                regions,
                max_bytes,
                within,
            },
            reason,
        );
        Some(max_bytes)
    }

    /// Plans a memory move of unit `u` bringing `bytes` to node index `dst`: the bytes
    /// are reserved there and counted in the stats.
    pub(super) fn push_memory_move(
        &mut self,
        u: usize,
        dst: usize,
        bytes: u64,
        action: Action,
        reason: Reason,
    ) {
        self.release_promise(u, bytes);
        self.reserved[dst] += bytes;
        self.state.stats.migrate_actions += 1;
        self.state.stats.migrate_planned_bytes += bytes;
        self.push(u, action, reason);
    }

    /// Hot regions of unit `u` outside `home`, hottest first.
    fn remote_hot(&self, u: usize, home: u64) -> Vec<(u64, u64)> {
        self.hot_regions_where(u, |n| home & (1 << n) == 0)
    }

    fn remote_hot_on(&self, u: usize, src: usize) -> Vec<(u64, u64)> {
        self.hot_regions_where(u, |n| n == src)
    }

    /// Hot regions of unit `u` on the nodes `on` accepts, hottest first: those with
    /// at least [`HOT_SHARE_OF_PEAK`] of the heat of the unit's hottest region
    /// wherever it is.
    fn hot_regions_where(&self, u: usize, on: impl Fn(usize) -> bool) -> Vec<(u64, u64)> {
        let unit = &self.units[u];
        let vm = &self.snap.vms[unit.vm_idx];
        let in_unit = |r: &&crate::model::HotRegion| {
            unit.addr_range
                .is_none_or(|(s, l)| r.start_addr >= s && r.start_addr < s.saturating_add(l))
        };
        let peak = vm
            .hot_regions
            .iter()
            .filter(in_unit)
            .map(|r| r.heat)
            .fold(0.0, f64::max);
        let floor = peak * HOT_SHARE_OF_PEAK;
        let mut regs: Vec<&crate::model::HotRegion> = vm
            .hot_regions
            .iter()
            .filter(|r| r.heat > 0.0 && r.heat >= floor)
            .filter(in_unit)
            .filter(|r| self.node_idx(r.node).is_some_and(&on))
            .collect();
        regs.sort_by(|a, b| {
            b.heat
                .total_cmp(&a.heat)
                .then(a.start_addr.cmp(&b.start_addr))
        });
        regs.iter().map(|r| (r.start_addr, r.len_bytes)).collect()
    }
}
