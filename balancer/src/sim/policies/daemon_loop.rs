//! vmbalancer in the simulator: the daemon's own loop ([`Daemon::tick`]) with the
//! simulated observer and actuator behind its traits, and the engine as its policy,
//! as `vmbalancer run` builds it. One tick per simulated second; no journal (the
//! world ends with the run, so there is nothing to recover), no control socket.
//!
//! What the daemon adds to the engine's plan shows here as it does on a host: the
//! configuration guard (operator-pinned VMs are refused before the actuator sees
//! them), no CPU change of a VM while its memory moves, and memory moves running in
//! the background whose outcomes reach the engine at the tick after they end.

use crate::daemon::config::Config;
use crate::daemon::policy::EnginePolicy;
use crate::daemon::run::{Daemon, Shutdown};
use crate::engine::EngineConfig;
use crate::model::PlannedAction;
use crate::sim::apply::SimActuator;
use crate::sim::observe::SimObserver;

use super::{Policy, SharedWorld};

/// The daemon driving the simulated world.
pub struct DaemonLoop {
    engine: EngineConfig,
    daemon: Option<Daemon<SimObserver, SimActuator, EnginePolicy>>,
}

impl DaemonLoop {
    /// The daemon with its default configuration and the engine configured by
    /// `engine` (the `[engine]` fields `vmbalancer simulate --engine-config` reads).
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            daemon: None,
        }
    }
}

impl DaemonLoop {
    /// The daemon, once the first tick built it (for its status document).
    pub fn daemon(&self) -> Option<&Daemon<SimObserver, SimActuator, EnginePolicy>> {
        self.daemon.as_ref()
    }
}

impl Policy for DaemonLoop {
    fn name(&self) -> &'static str {
        "vmbalancer"
    }

    fn tick(&mut self, world: &SharedWorld) -> Vec<PlannedAction> {
        let engine = &self.engine;
        let daemon = self.daemon.get_or_insert_with(|| {
            let cfg = Config::default();
            let policy = EnginePolicy::with_engine_config(&cfg, engine.clone());
            let mut d = Daemon::new(
                cfg,
                SimObserver(world.clone()),
                SimActuator::new(world.clone()),
                policy,
                None,
                Shutdown::new(),
                false,
            );
            d.begin();
            d
        });
        daemon.tick();
        daemon.actuator_mut().take_applied()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::model::{ActionOutcome, Reason};
    use crate::sim::World;
    use crate::sim::perf::PerfParams;
    use crate::sim::scenario::Scenario;

    /// The daemon's tick runs: every second is a tick, memory moves start in the
    /// background and their outcomes come back through the daemon's collection.
    #[test]
    fn the_daemon_ticks_and_collects_background_moves() {
        let s = Scenario::load("seed-20vm-squeezed").unwrap();
        let world = Rc::new(RefCell::new(World::new(s, PerfParams::default(), true)));
        let mut p = DaemonLoop::new(EngineConfig::default());
        let mut applied = Vec::new();
        for _ in 0..120 {
            applied.extend(p.tick(&world));
            world.borrow_mut().step();
        }
        let daemon = p.daemon.as_ref().unwrap();
        let shared = daemon.shared();
        let status = &shared.lock().unwrap().status;
        assert_eq!(status.daemon.ticks, 120);
        // In the background the world answers `Started`: a move's `Done` can only
        // have come back through the daemon's collection of ended moves.
        let memory = |d: &&crate::daemon::status::Decision| d.action.moves_memory();
        assert!(
            status
                .decisions
                .iter()
                .filter(memory)
                .any(|d| d.outcome == ActionOutcome::Started)
        );
        assert!(
            status.decisions.iter().filter(memory).any(
                |d| matches!(d.outcome, ActionOutcome::Done { moved_bytes } if moved_bytes > 0)
            )
        );
        assert!(
            applied
                .iter()
                .any(|a| matches!(a.reason, Reason::CpuImbalance { .. }))
        );
    }

    /// The daemon's configuration guard stands between the engine and the world:
    /// the operator-pinned VM of `overcommit` is never acted on.
    #[test]
    fn operator_pinned_vms_are_left_alone() {
        let s = Scenario::load("overcommit").unwrap();
        let world = Rc::new(RefCell::new(World::new(s, PerfParams::default(), true)));
        let pinned: Vec<u32> = {
            let w = world.borrow();
            (0..w.vms.len())
                .filter(|&i| w.scenario.vms[w.vms[i].group].operator_pinned)
                .map(|i| w.vms[i].pid)
                .collect()
        };
        assert!(!pinned.is_empty());
        let mut p = DaemonLoop::new(EngineConfig::default());
        for _ in 0..120 {
            let applied = p.tick(&world);
            assert!(applied.iter().all(|a| !pinned.contains(&a.vm)));
            world.borrow_mut().step();
        }
    }
}
