//! Prints every decision vmbalancer's daemon makes on a simulated scenario, second by
//! second, as its status document records them (action, reason, outcome; a memory
//! move's outcome arrives when it ends): `cargo run --release --example sim_trace --
//! bursty`.

use std::cell::RefCell;
use std::rc::Rc;

use balancer::engine::EngineConfig;
use balancer::sim::World;
use balancer::sim::perf::PerfParams;
use balancer::sim::policies::{DaemonLoop, Policy};
use balancer::sim::scenario::Scenario;

fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "bursty".into());
    let s = Scenario::load(&name)?;
    let world = Rc::new(RefCell::new(World::new(
        s.clone(),
        PerfParams::default(),
        true,
    )));
    let mut vmbalancer = DaemonLoop::new(EngineConfig::default());
    for _ in 0..s.duration_s {
        vmbalancer.tick(&world);
        let t = world.borrow().t;
        if let Some(daemon) = vmbalancer.daemon() {
            let shared = daemon.shared();
            let mut shared = shared
                .lock()
                .map_err(|_| anyhow::anyhow!("daemon state poisoned"))?;
            // Taken, so each decision prints once.
            for d in std::mem::take(&mut shared.status.decisions) {
                println!(
                    "t={t:>4} vm={} {:?} {:?} -> {:?}",
                    d.vm, d.action, d.reason, d.outcome
                );
            }
        }
        world.borrow_mut().step();
    }
    if let Some(daemon) = vmbalancer.daemon() {
        println!("{:?}", daemon.policy().engine().state().stats);
    }
    Ok(())
}
