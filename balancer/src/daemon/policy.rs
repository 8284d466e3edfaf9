//! The daemon's policy is the engine: this module adapts [`Engine`] to the daemon's
//! [`Policy`] trait and derives the engine's configuration from the daemon's.
//!
//! The daemon configuration holds the knobs an operator sets (numad's names where
//! they exist); the engine has finer ones whose defaults are documented in
//! [`EngineConfig`]. Mapping them here keeps one source of truth for each value.

use super::Policy;
use super::config::Config;
use super::status::Probation;
use crate::engine::{Engine, EngineConfig, Phase};
use crate::model::{ActionOutcome, Pinning, Plan, PlannedAction, Snapshot, Vm};

const NS_PER_MS: u64 = 1_000_000;

/// The engine's configuration for a daemon configuration.
pub fn engine_config(cfg: &Config) -> EngineConfig {
    let defaults = EngineConfig::default();
    let limit = cfg.migration_rate_limit_bytes_per_s;
    EngineConfig {
        tick_ns: cfg.tick_ms * NS_PER_MS,
        probation_ns: cfg.probation_window_ms * NS_PER_MS,
        busy_floor_pct: f64::from(cfg.target_utilisation_pct),
        locality_target_pct: f64::from(cfg.target_locality_pct),
        free_headroom_bytes: cfg.memory_headroom_bytes,
        // Plans never name a reserved CPU, so the applier's guard never has to refuse.
        reserved_cpus: cfg.reserved_cpus.clone(),
        // The operator's limit bounds the host; per-VM rates never exceed it.
        host_rate_bytes_per_s: limit,
        hot_rate_bytes_per_s: defaults.hot_rate_bytes_per_s.min(limit),
        cold_rate_bytes_per_s: defaults.cold_rate_bytes_per_s.min(limit),
        ..defaults
    }
}

/// The policy engine behind the daemon's [`Policy`] trait.
#[derive(Debug)]
pub struct EnginePolicy {
    engine: Engine,
    /// Which VMs the operator lets the daemon move (include/exclude, pinned VMs).
    selection: Config,
}

impl EnginePolicy {
    pub fn new(cfg: &Config) -> Self {
        Self::with_engine_config(cfg, engine_config(cfg))
    }

    /// With an engine configured apart from the daemon's (the simulator's
    /// `--engine-config`); `cfg` still chooses which VMs are moved.
    pub fn with_engine_config(cfg: &Config, engine: EngineConfig) -> Self {
        Self {
            engine: Engine::new(engine),
            selection: cfg.clone(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Policy for EnginePolicy {
    fn plan(&mut self, snapshot: &Snapshot) -> Plan {
        // The engine decides from each VM's pinning; the operator's choices come first:
        // VMs outside include/exclude are left alone (their load still counts), and
        // with `pinned_vms = "balance"` operator-pinned VMs are balanced like any VM.
        let wanted = |vm: &Vm| match (&vm.pinning, self.selection.manages(vm)) {
            (Pinning::Operator { .. }, true) => Pinning::None,
            (_, false) if vm.pinning == Pinning::None => Pinning::Excluded,
            (p, _) => p.clone(),
        };
        if snapshot.vms.iter().all(|vm| wanted(vm) == vm.pinning) {
            return self.engine.plan(snapshot);
        }
        let mut adjusted = snapshot.clone();
        for vm in &mut adjusted.vms {
            vm.pinning = wanted(vm);
        }
        self.engine.plan(&adjusted)
    }

    fn feedback(&mut self, action: &PlannedAction, outcome: &ActionOutcome) {
        self.engine.record_outcome(action, outcome);
    }

    /// The engine's knobs derived from the reloaded file (an engine configured apart
    /// from the daemon's, as the simulator's, is never reloaded).
    fn reconfigure(&mut self, cfg: &Config) {
        self.engine.reconfigure(engine_config(cfg));
        self.selection = cfg.clone();
    }

    fn probations(&self) -> Vec<Probation> {
        let state = self.engine.state();
        let window_ns = self.engine.config().probation_ns;
        let now_ns = state.last_now_ns.unwrap_or(0);
        state
            .units
            .iter()
            .filter_map(|(key, unit)| match &unit.phase {
                Phase::Probation { since_ns, from, .. } => Some(Probation {
                    vm: key.vm,
                    from: from.first().copied().unwrap_or_default(),
                    to: unit.home.first().copied().unwrap_or_default(),
                    started_ns: *since_ns,
                    window_ns,
                    remaining_ns: (since_ns + window_ns).saturating_sub(now_ns),
                }),
                Phase::Settled => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_knobs_reach_the_engine() {
        let cfg = Config {
            tick_ms: 500,
            probation_window_ms: 4_000,
            target_utilisation_pct: 70,
            target_locality_pct: 92,
            migration_rate_limit_bytes_per_s: 32 << 20,
            memory_headroom_bytes: 1 << 30,
            reserved_cpus: crate::model::CpuSet::parse_list("0,8-9").unwrap(),
            ..Config::default()
        };
        let e = engine_config(&cfg);
        assert_eq!(e.tick_ns, 500 * NS_PER_MS);
        assert_eq!(e.probation_ns, 4_000 * NS_PER_MS);
        assert_eq!(e.busy_floor_pct, 70.0);
        assert_eq!(e.locality_target_pct, 92.0);
        assert_eq!(e.free_headroom_bytes, 1 << 30);
        assert_eq!(e.reserved_cpus.to_string(), "0,8-9");
        assert_eq!(e.host_rate_bytes_per_s, 32 << 20);
        assert!(e.hot_rate_bytes_per_s <= 32 << 20 && e.cold_rate_bytes_per_s <= 32 << 20);
    }

    #[test]
    fn operator_choices_reach_the_engine() {
        use crate::daemon::config::{PinnedVms, VmSelector};
        use crate::model::Topology;
        let t = Topology::uniform(2, 4, 8 << 30);
        let vm = |pid: u32, pinning: Pinning| Vm {
            pid,
            vcpus: (0..2)
                .map(|i| crate::model::Vcpu {
                    index: i,
                    tid: pid * 10 + i,
                    ..Default::default()
                })
                .collect(),
            pinning,
            ..Default::default()
        };
        let snap = Snapshot {
            topology: t,
            vms: vec![
                vm(
                    1,
                    Pinning::Operator {
                        why: "vcpupin".into(),
                    },
                ),
                vm(2, Pinning::None),
            ],
            ..Default::default()
        };
        let placed = |cfg: &Config| -> Vec<u32> {
            let mut p = EnginePolicy::new(cfg);
            let mut v: Vec<u32> = p.plan(&snap).actions.iter().map(|a| a.vm).collect();
            v.dedup();
            v
        };
        // Default: the pinned VM is left alone, the other placed.
        assert_eq!(placed(&Config::default()), vec![2]);
        // pinned_vms = "balance": both are placed.
        let balance = Config {
            pinned_vms: PinnedVms::Balance,
            ..Config::default()
        };
        let mut both = placed(&balance);
        both.sort();
        assert_eq!(both, vec![1, 2]);
        // exclude_vms: VM 2 is not touched either.
        let exclude = Config {
            exclude_vms: vec![VmSelector::Pid(2)],
            ..Config::default()
        };
        assert!(placed(&exclude).is_empty());
    }

    #[test]
    fn daemon_and_engine_share_the_default_locality_target() {
        let from_daemon = engine_config(&Config::default()).locality_target_pct;
        assert_eq!(from_daemon, EngineConfig::default().locality_target_pct);
        assert_eq!(
            from_daemon,
            f64::from(crate::model::DEFAULT_TARGET_LOCALITY_PCT)
        );
    }

    /// Every engine knob the daemon maps keeps the engine's default under the
    /// daemon's defaults, except the host rate, which the operator's limit sets
    /// (256 MiB/s by default, below the engine's own 512 MiB/s).
    #[test]
    fn daemon_defaults_are_the_engine_defaults() {
        let cfg = Config::default();
        let engine = EngineConfig::default();
        assert_eq!(
            EngineConfig {
                host_rate_bytes_per_s: engine.host_rate_bytes_per_s,
                ..engine_config(&cfg)
            },
            engine
        );
        // The numbers the configuration documents.
        assert_eq!(cfg.tick_ms, 1000);
        assert_eq!(cfg.target_utilisation_pct, 85);
        assert_eq!(cfg.target_locality_pct, 90);
        assert_eq!(cfg.memory_headroom_bytes, 536_870_912);
        assert_eq!(cfg.probation_window_ms, 10_000);
        assert_eq!(cfg.migration_rate_limit_bytes_per_s, 256 << 20);
    }

    #[test]
    fn default_daemon_config_keeps_engine_rates_within_the_limit() {
        let e = engine_config(&Config::default());
        assert!(e.hot_rate_bytes_per_s <= e.host_rate_bytes_per_s);
        assert!(e.cold_rate_bytes_per_s <= e.hot_rate_bytes_per_s);
    }
}
