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
use crate::model::{ActionOutcome, Plan, PlannedAction, Snapshot};

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
}

impl EnginePolicy {
    pub fn new(cfg: &Config) -> Self {
        Self {
            engine: Engine::new(engine_config(cfg)),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Policy for EnginePolicy {
    fn plan(&mut self, snapshot: &Snapshot) -> Plan {
        self.engine.plan(snapshot)
    }

    fn feedback(&mut self, action: &PlannedAction, outcome: &ActionOutcome) {
        self.engine.record_outcome(action, outcome);
    }

    fn probations(&self) -> Vec<Probation> {
        let state = self.engine.state();
        let window_ns = self.engine.config().probation_ns;
        let now_ns = state.last_now_ns.unwrap_or(0);
        state
            .units
            .iter()
            .filter_map(|(key, unit)| match &unit.phase {
                Phase::Probation { since_ns, from } => Some(Probation {
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
            ..Config::default()
        };
        let e = engine_config(&cfg);
        assert_eq!(e.tick_ns, 500 * NS_PER_MS);
        assert_eq!(e.probation_ns, 4_000 * NS_PER_MS);
        assert_eq!(e.busy_floor_pct, 70.0);
        assert_eq!(e.locality_target_pct, 92.0);
        assert_eq!(e.free_headroom_bytes, 1 << 30);
        assert_eq!(e.host_rate_bytes_per_s, 32 << 20);
        assert!(e.hot_rate_bytes_per_s <= 32 << 20 && e.cold_rate_bytes_per_s <= 32 << 20);
    }

    #[test]
    fn default_daemon_config_keeps_engine_rates_within_the_limit() {
        let e = engine_config(&Config::default());
        assert!(e.hot_rate_bytes_per_s <= e.host_rate_bytes_per_s);
        assert!(e.cold_rate_bytes_per_s <= e.hot_rate_bytes_per_s);
    }
}
