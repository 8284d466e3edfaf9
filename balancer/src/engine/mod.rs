//! The pure policy engine: a [`Snapshot`] (plus the engine's own plain-data
//! [`EngineState`] from the previous decision and an [`EngineConfig`]) in, a [`Plan`]
//! (actions with [`Reason`]s, refusals with [`RefusalReason`]s) and the next state out.
//! No I/O, no clock (time is `Snapshot::now_ns`), no randomness, no hash-order
//! dependence: the same inputs always give the same plan, so the daemon, the simulator
//! and dry runs share it and tests can pin its behaviour.
//!
//! # Units
//! The engine places *units*: a whole VM, or, for a VM with two or more guest NUMA
//! cells, each cell on its own (its vCPUs and its memory). A unit has a *home*: one
//! node, or the nearest set of nodes when it is wider than any node.
//!
//! # One decision, in order
//! 1. **Adopt or place.** A unit the engine has not seen is adopted as it is when its
//!    vCPUs are already confined to some nodes (someone placed it, e.g. a restarted
//!    daemon). Otherwise it is *placed* (`placement.rs`): the node with the most free
//!    CPU capacity after placing it, among nodes with free memory plus headroom (and
//!    free huge pages of its page size); KSM partners and sibling cells (by SLIT
//!    distance) tip the choice. Wider than every node: the nearest set of nodes,
//!    grown by distance from the freest node. Operator-pinned VMs are never moved,
//!    only reported; their load still counts. When a known unit's affinity no
//!    longer matches its home (someone else changed it, or a dry run applied
//!    nothing), the observed affinity wins: it is re-adopted (and held for a
//!    hysteresis window), or placed again if it was widened to every node.
//! 2. **Resolve probations** (`probation.rs`). A unit moved CPU-first is re-examined
//!    once its probation window has passed: if moving it back would not bring the
//!    imbalance above the threshold, the need went away and it is *reverted* (CPUs back
//!    to where its memory still is: zero bytes moved); otherwise it *commits* and its
//!    memory starts to follow. A unit whose probations keep being reverted (at least
//!    `recurrence_reverts` earlier reverts within `recurrence_window_ns`) is judged
//!    on the peak view instead, every unit at `max(current, faded recent peak)`
//!    (`recurrence.rs`): co-bursting units are spread once, memory included, instead
//!    of being moved off and back on every burst. A single short burst still
//!    reverts with zero bytes moved.
//! 3. **Rebalance CPU** (`rebalance.rs`). Load of a node = CPU demand of the units homed
//!    there; the cost of a placement is `sum(load^2 / capacity)` over nodes, which is
//!    lowest when load ratios are equal. Act only when the spread of load ratios
//!    exceeds `imbalance_threshold_pct` of the mean and the busiest node is busy, on
//!    two decisions in a row (the first decision of a fresh engine excepted), and
//!    not while the busiest node's load still rises (for at most three ticks): a VM
//!    whose load changed during the last interval shows a partial reading. Every
//!    candidate move of a unit off the busiest node must lower the cost without
//!    overshooting; among moves gaining at least a quarter of the best gain, the one
//!    with the fewest bytes to move per CPU taken off the busy node wins (the
//!    cheapest to move; seed 004's "lowest resident memory per CPU usage").
//!    When no single move helps, 1-for-1 and 1-for-2 swaps between the busiest and the
//!    idlest node are searched. Units in probation or moved within the hysteresis
//!    window are not candidates, so nothing flaps. Moves are CPU-only (probation).
//! 4. **Migrate memory lazily** (`migration.rs`). Settled units below their locality
//!    target, including units placed in this same decision, get one `MigrateMemory`
//!    per decision: from the remote node holding most of
//!    their memory to their home, hot regions first at `hot_rate_bytes_per_s`, then the
//!    rest at `cold_rate_bytes_per_s`, within a host-wide budget, stopping at the
//!    target (the coldest remainder may stay). A VM with a move still running in the
//!    background gets nothing new until its outcome comes; one whose last move the
//!    host mostly refused (`ActionOutcome::Partial` with less than half moved: shared
//!    KSM pages, pinned pages, no room) waits [`REFUSED_MEMORY_HOLD_NS`] before its
//!    memory is planned again.
//! 5. **The process's own memory follows** (`process_memory.rs`). Once a whole-VM
//!    unit's guest RAM is home, the rest of its qemu process's anonymous memory (vCPU
//!    thread stacks, heap) on other nodes gets one `MigrateProcessMemory` home, at
//!    most once a minute per VM.
//!
//! # Reserved CPUs
//! CPUs in `EngineConfig::reserved_cpus` (numad's `-R`) are never given to VMs: a
//! node's capacity counts only its other CPUs (a node with all CPUs reserved has
//! none), and every planned CPU set leaves them out. The host's appliers refuse a set
//! that touches one, as a guard; the engine never plans one.
//!
//! # Memory that never moves
//! A VM whose snapshot says its memory is not movable (`VmMemory::not_movable`: a
//! confidential guest such as SEV, SEV-SNP or TDX, or guest_memfd RAM) gets no
//! `MigrateMemory` and no `MigrateProcessMemory`, ever. Its vCPUs may move (thread
//! affinity does not touch guest memory), but since the memory can never follow, a
//! CPU move away from it would make it remote for good: such a unit is placed on the
//! nodes holding its memory (the fewest nodes holding the locality target of it),
//! and is never a candidate for CPU rebalancing. Its load still counts. Every
//! decision reports it ([`RefusalReason::MemoryNotMovable`]), so `status` says why.
//!
//! # vCPUs unknown
//! A VM whose vCPU threads could not be told apart (`Vm::vcpus_known`) is one unit,
//! the whole process: its demand is that of all its threads, its affinity that of
//! any thread, its size in vCPUs the command line's. `SetCpus { vcpus: None }` moves
//! every thread of it. Guest NUMA cells are not split then: no thread is known to
//! belong to a cell.
//!
//! # Safety (`safety.rs`)
//! Memory is never planned onto a node whose free memory would fall below the
//! headroom, nor a huge-page VM onto a node without free huge pages of its size; such
//! moves are refused with a reason in [`Plan::refusals`], as are pinned VMs, KSM
//! merging across nodes and moves blocked by hysteresis.
//!
//! # Complexity
//! Building the view is O(VMs x nodes). Each move search is O(units on the busiest
//! node x nodes), swaps O(K^3) with K = `swap_candidates`; at most
//! `max_moves_per_tick` searches per decision.

mod config;
mod migration;
mod placement;
mod probation;
mod process_memory;
mod rebalance;
mod recurrence;
mod safety;
mod state;
mod view;

#[cfg(test)]
mod tests;

pub use config::EngineConfig;

/// How long a VM's memory waits after the host refused most of a move of it
/// (module doc, step 4). Long enough not to rescan the same refused pages every
/// tick, short enough that memory follows soon once room is made.
pub const REFUSED_MEMORY_HOLD_NS: u64 = 30_000_000_000;
pub use state::{BurstMemory, EngineState, EngineStats, Phase, UnitKey, UnitState};

use crate::model::{
    Action, ActionOutcome, CpuSet, NodeId, Plan, PlannedAction, Reason, Refusal, RefusalReason,
    Snapshot,
};
use view::{NodeView, UnitView, mask_nodes};

/// The engine with its carried state. Deterministic: see the module doc.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    cfg: EngineConfig,
    state: EngineState,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            state: EngineState::default(),
        }
    }

    /// Resumes from a saved state (e.g. the daemon's journal).
    pub fn with_state(cfg: EngineConfig, state: EngineState) -> Self {
        Self { cfg, state }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Goes on with another configuration and the state carried so far.
    pub fn reconfigure(&mut self, cfg: EngineConfig) {
        self.cfg = cfg;
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// One decision. Updates the carried state and returns the plan.
    pub fn plan(&mut self, snap: &Snapshot) -> Plan {
        let state = std::mem::take(&mut self.state);
        let (plan, state) = decide(&self.cfg, state, snap);
        self.state = state;
        plan
    }

    /// Feeds back what the host did with an action, so state follows reality: a
    /// refused CPU move is undone in the engine's books, moved bytes are counted.
    pub fn record_outcome(&mut self, action: &PlannedAction, outcome: &ActionOutcome) {
        if action.action.moves_memory() {
            // A move in the background keeps its VM busy until its outcome comes.
            let range = match &action.action {
                Action::MigrateMemory { within, .. } => *within,
                _ => None,
            };
            let key = (action.vm, range);
            let moving = &mut self.state.moving;
            if *outcome == ActionOutcome::Started {
                *moving.entry(key).or_default() += 1;
            } else if let Some(n) = moving.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    moving.remove(&key);
                }
            }
        }
        let stats = &mut self.state.stats;
        match (&action.action, outcome) {
            (a, ActionOutcome::Done { moved_bytes }) if a.moves_memory() => {
                stats.migrated_bytes += moved_bytes;
            }
            (
                a,
                ActionOutcome::Partial {
                    moved_bytes,
                    left_bytes,
                    ..
                },
            ) if a.moves_memory() => {
                // The rest stayed where it was: nothing of it is in flight.
                stats.migrated_bytes += moved_bytes;
                if moved_bytes < left_bytes {
                    let now = self.state.last_now_ns.unwrap_or(0);
                    self.state
                        .memory_refused_until_ns
                        .insert(action.vm, now.saturating_add(REFUSED_MEMORY_HOLD_NS));
                }
            }
            (_, ActionOutcome::VmGone) => {
                self.state.units.retain(|k, _| k.vm != action.vm);
            }
            (Action::SetCpus { .. }, ActionOutcome::Refused { .. }) => {
                stats.refused_actions += 1;
                for (_, u) in self.state.units.range_mut(
                    UnitKey {
                        vm: action.vm,
                        cell: None,
                    }..=UnitKey {
                        vm: action.vm,
                        cell: Some(u32::MAX),
                    },
                ) {
                    if let Phase::Probation { from, .. } = &u.phase {
                        u.home = from.clone();
                        u.phase = Phase::Settled;
                    }
                }
            }
            (_, ActionOutcome::Refused { .. }) => stats.refused_actions += 1,
            _ => {}
        }
    }
}

/// The shortest gap between two decisions, as a divisor of the tick: the daemon
/// starts a tick early on a wake, at least this fraction of a tick after the last
/// (`daemon::wake`), and the budgets of such a decision follow its real gap.
pub const MIN_GAP_DIVISOR: u32 = 4;

/// A gap between two nodes' load ratios as a spread in percent of the host's mean
/// ratio (at least 0.05: an almost idle host is not "out of balance" by a sliver).
pub fn spread_pct(ratio_gap: f64, total_load: f64, total_cap: f64) -> f64 {
    ratio_gap / (total_load / total_cap).max(0.05) * 100.0
}

/// The pure decision function behind [`Engine::plan`].
pub fn decide(cfg: &EngineConfig, mut state: EngineState, snap: &Snapshot) -> (Plan, EngineState) {
    let nn = snap.topology.nodes.len();
    if nn == 0 || nn > 64 {
        return (Plan::default(), state);
    }
    let dt_ns = match state.last_now_ns {
        Some(prev) if snap.now_ns > prev => {
            (snap.now_ns - prev).clamp(cfg.tick_ns / u64::from(MIN_GAP_DIVISOR), 5 * cfg.tick_ns)
        }
        _ => cfg.tick_ns,
    };
    let first_decision = state.last_now_ns.is_none();
    state.last_now_ns = Some(snap.now_ns);
    let (mut units, nodes, _masker) = view::build(snap, &cfg.reserved_cpus);
    // Forget units that no longer exist.
    let live: std::collections::BTreeSet<UnitKey> = units.iter().map(|u| u.key).collect();
    state.units.retain(|k, _| live.contains(k));
    state
        .moving
        .retain(|(vm, _), _| live.iter().any(|k| k.vm == *vm));
    state.demand_before_move.retain(|k, _| live.contains(k));
    // A VM whose memory we are moving waits on our copy: counted at its demand from
    // before the move (`EngineState::demand_before_move`).
    for u in &mut units {
        if state.memory_moving(u.key.vm, u.addr_range) {
            if let Some(&d) = state.demand_before_move.get(&u.key) {
                u.demand = u.demand.max(d);
            }
        } else {
            state.demand_before_move.insert(u.key, u.demand);
        }
    }
    recurrence::track(cfg, &mut state, &units, snap.now_ns);
    let mut ctx = Ctx::new(cfg, snap, dt_ns, units, nodes, state);
    ctx.first_decision = first_decision;
    ctx.report_host();
    ctx.classify();
    ctx.promise_huge_pages();
    ctx.place_new();
    ctx.resolve_probations();
    ctx.rebalance();
    ctx.migrate();
    ctx.migrate_process_memory();
    (ctx.plan, ctx.state)
}

/// How unequal the nodes' load ratios (CPU demand over capacity) are; nodes
/// without capacity are left out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Imbalance {
    /// Busiest minus idlest ratio, as a share of the mean ratio (at least 0.05), in
    /// percent.
    pub spread_pct: f64,
    /// Node index with the highest ratio.
    pub busiest: usize,
    /// Node index with the lowest ratio.
    pub idlest: usize,
    /// The busiest node's ratio (1.0 = demand equals capacity).
    pub busiest_ratio: f64,
}

/// Working data of one decision.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a EngineConfig,
    pub snap: &'a Snapshot,
    pub now: u64,
    pub dt_ns: u64,
    pub units: Vec<UnitView>,
    pub nodes: Vec<NodeView>,
    /// CPU demand per node index.
    pub load: Vec<f64>,
    /// Per unit: home mask when managed, where it runs when not.
    pub home: Vec<u64>,
    pub managed: Vec<bool>,
    /// Units still waiting for initial placement.
    pub pending: Vec<usize>,
    /// Bytes promised to each node by this plan.
    pub reserved: Vec<u64>,
    /// Huge-page bytes promised to each node index by units homed there whose memory
    /// has not arrived yet (see `safety.rs`), and each unit's own promise.
    pub promised: Vec<u64>,
    pub promise: Vec<Option<(usize, u64)>>,
    /// Bytes the host may still move this decision (`host_rate_bytes_per_s` over the
    /// time since the last decision), shared by guest RAM and process memory.
    pub host_budget_bytes: u64,
    /// Units acted on in this plan (one action kind per unit per decision).
    pub touched: Vec<bool>,
    pub committed_now: Vec<bool>,
    /// Per unit placed in this decision: the bytes its placement reserved on its
    /// node for the memory still to come (its own memory moves take it back).
    pub placed_now: Vec<Option<(usize, u64)>>,
    /// Unit indices of each VM (for KSM partner look-ups).
    pub vm_units: std::collections::HashMap<crate::model::VmId, Vec<usize>>,
    pub plan: Plan,
    pub state: EngineState,
    /// No decision came before this one (a fresh engine).
    pub first_decision: bool,
}

impl<'a> Ctx<'a> {
    fn new(
        cfg: &'a EngineConfig,
        snap: &'a Snapshot,
        dt_ns: u64,
        units: Vec<UnitView>,
        nodes: Vec<NodeView>,
        state: EngineState,
    ) -> Self {
        let n = units.len();
        let nn = nodes.len();
        let mut vm_units: std::collections::HashMap<crate::model::VmId, Vec<usize>> =
            std::collections::HashMap::new();
        for (i, u) in units.iter().enumerate() {
            vm_units.entry(u.key.vm).or_default().push(i);
        }
        Self {
            cfg,
            snap,
            now: snap.now_ns,
            dt_ns,
            units,
            nodes,
            load: vec![0.0; nn],
            home: vec![0; n],
            managed: vec![false; n],
            pending: Vec::new(),
            reserved: vec![0; nn],
            promised: vec![0; nn],
            promise: vec![None; n],
            host_budget_bytes: (cfg.host_rate_bytes_per_s as f64 * dt_ns as f64 / 1e9) as u64,
            touched: vec![false; n],
            committed_now: vec![false; n],
            placed_now: vec![None; n],
            vm_units,
            plan: Plan::default(),
            state,
            first_decision: false,
        }
    }

    pub fn node_id(&self, idx: usize) -> NodeId {
        self.snap.topology.nodes[idx].id
    }

    pub fn node_idx(&self, id: NodeId) -> Option<usize> {
        self.snap.topology.node_index(id)
    }

    pub fn dist(&self, a: usize, b: usize) -> u32 {
        if a == b {
            return 10;
        }
        self.snap
            .topology
            .distance
            .get(a)
            .and_then(|r| r.get(b))
            .copied()
            .unwrap_or(20)
    }

    pub fn mask_of_ids(&self, ids: &[NodeId]) -> u64 {
        ids.iter()
            .filter_map(|&id| self.node_idx(id))
            .fold(0, |m, i| m | 1 << i)
    }

    pub fn ids_of_mask(&self, mask: u64) -> Vec<NodeId> {
        mask_nodes(mask).map(|i| self.node_id(i)).collect()
    }

    /// The CPUs VMs may use on the nodes of `mask`: reserved CPUs never appear.
    pub fn cpus_of_mask(&self, mask: u64) -> CpuSet {
        mask_nodes(mask)
            .fold(CpuSet::new(), |acc, i| {
                acc.union(&self.snap.topology.nodes[i].cpus)
            })
            .difference(&self.cfg.reserved_cpus)
    }

    /// Adds (`sign = 1`) or removes (`-1`) a unit's demand spread over `mask`.
    pub fn add_load(&mut self, mask: u64, demand: f64, sign: f64) {
        view::spread(&self.nodes, &mut self.load, mask, demand, sign);
    }

    /// `sum(load^2/cap)`: lowest when load ratios are equal.
    pub fn cost_of(&self, load: &[f64]) -> f64 {
        load.iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.cap > 0.0)
            .map(|(l, n)| l * l / n.cap)
            .sum()
    }

    /// How unequal the nodes' load ratios are under `load`.
    pub fn imbalance(&self, load: &[f64]) -> Imbalance {
        let mut found: Option<Imbalance> = None;
        let mut idlest_ratio = f64::MAX;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.cap <= 0.0 {
                continue;
            }
            let r = load[i] / n.cap;
            let f = found.get_or_insert(Imbalance {
                spread_pct: 0.0,
                busiest: i,
                idlest: i,
                busiest_ratio: r,
            });
            if r > f.busiest_ratio {
                f.busiest_ratio = r;
                f.busiest = i;
            }
            if r < idlest_ratio {
                idlest_ratio = r;
                f.idlest = i;
            }
        }
        let Some(mut f) = found else {
            return Imbalance::default();
        };
        let (total_load, total_cap) = self.load_totals(load);
        f.spread_pct = spread_pct(f.busiest_ratio - idlest_ratio, total_load, total_cap);
        f
    }

    /// Load and capacity of the host under `load` (nodes with capacity), whose
    /// ratio is the unit of [`spread_pct`].
    pub fn load_totals(&self, load: &[f64]) -> (f64, f64) {
        self.nodes
            .iter()
            .zip(load)
            .filter(|(n, _)| n.cap > 0.0)
            .fold((0.0, 0.0), |(l, c), (n, x)| (l + x, c + n.cap))
    }

    pub fn refuse(&mut self, vm: Option<u32>, why: RefusalReason) {
        self.plan.refusals.push(Refusal { vm, why });
    }

    pub fn push(&mut self, u: usize, action: Action, reason: Reason) {
        self.touched[u] = true;
        self.plan.actions.push(PlannedAction {
            vm: self.units[u].key.vm,
            action,
            reason,
        });
    }

    /// A CPU move of unit `u` to `mask` (the action only; books are the caller's).
    pub fn set_cpus(&mut self, u: usize, mask: u64, reason: Reason) {
        let cpus = self.cpus_of_mask(mask);
        let vcpus = self.units[u].vcpus.clone();
        self.push(u, Action::SetCpus { vcpus, cpus }, reason);
    }

    /// Host-wide conditions worth reporting.
    fn report_host(&mut self) {
        let ksm = &self.snap.settings.ksm;
        if ksm.running && ksm.merge_across_nodes {
            self.refuse(
                None,
                RefusalReason::KsmMergesAcrossNodes {
                    pages_sharing: ksm.pages_sharing,
                },
            );
        }
        if self.snap.settings.numa_balancing {
            self.refuse(None, RefusalReason::NumaBalancingOn);
        }
    }

    /// Decides for every unit whether it is managed (and its home), pinned, or new,
    /// and books the load of everything but the new ones.
    fn classify(&mut self) {
        let all_mask: u64 = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].cap > 0.0)
            .fold(0, |m, i| m | 1 << i);
        for u in 0..self.units.len() {
            let unit = &self.units[u];
            let vm = &self.snap.vms[unit.vm_idx];
            if let Some(fixed) = &vm.memory.not_movable
                && unit
                    .key
                    .cell
                    .is_none_or(|c| vm.cells.first().is_some_and(|f| f.id == c))
            {
                self.refuse(
                    Some(unit.key.vm),
                    RefusalReason::MemoryNotMovable {
                        why: fixed.to_string(),
                    },
                );
            }
            let unit = &self.units[u];
            if unit.pinned {
                // Where its vCPUs really run, for the load.
                let mask = unit.affinity_mask;
                let remote =
                    crate::model::local_share_on(&unit.bytes_per_node, |i| mask & (1 << i) != 0)
                        .map_or(0.0, |local| 100.0 * (1.0 - local));
                let first_unit = unit
                    .key
                    .cell
                    .is_none_or(|c| vm.cells.first().is_some_and(|f| f.id == c));
                let (vm_id, d) = (unit.key.vm, unit.demand);
                if first_unit {
                    self.refuse(
                        Some(vm_id),
                        RefusalReason::OperatorPinned { remote_pct: remote },
                    );
                }
                self.home[u] = mask;
                self.add_load(mask, d, 1.0);
                continue;
            }
            let aff = unit.affinity_mask;
            if let Some(st) = self.state.units.get(&unit.key) {
                let mask = self.mask_of_ids(&st.home);
                if aff != 0 && mask != 0 && aff != mask {
                    // Someone else changed the affinity (an operator, a restarted
                    // libvirt, a dry run that applied nothing): reality wins.
                    if aff & all_mask == all_mask {
                        self.state.units.remove(&unit.key);
                        self.pending.push(u);
                    } else {
                        let home = self.ids_of_mask(aff);
                        let now = self.now;
                        if let Some(st) = self.state.units.get_mut(&unit.key) {
                            st.home = home;
                            st.phase = Phase::Settled;
                            st.last_move_ns = Some(now);
                        }
                        self.home[u] = aff;
                        self.managed[u] = true;
                        let d = unit.demand;
                        self.add_load(aff, d, 1.0);
                    }
                    continue;
                }
                if mask != 0 {
                    self.home[u] = mask;
                    self.managed[u] = true;
                    let d = unit.demand;
                    self.add_load(mask, d, 1.0);
                    continue;
                }
            }
            if aff != 0 && aff & all_mask != all_mask {
                // Already confined to some nodes: adopt as is.
                let home = self.ids_of_mask(aff);
                self.state.units.insert(
                    unit.key,
                    UnitState {
                        home,
                        phase: Phase::Settled,
                        last_move_ns: None,
                        bursts: BurstMemory::default(),
                    },
                );
                self.home[u] = aff;
                self.managed[u] = true;
                let d = unit.demand;
                self.add_load(aff, d, 1.0);
            } else {
                self.pending.push(u);
            }
        }
    }
}
