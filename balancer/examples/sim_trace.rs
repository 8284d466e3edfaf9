//! Prints every action vmbalancer's engine plans on a simulated scenario, second by
//! second: `cargo run --release --example sim_trace -- bursty`.

use balancer::engine::{Engine, EngineConfig};
use balancer::host::{Applier, Observer};
use balancer::sim::World;
use balancer::sim::perf::PerfParams;
use balancer::sim::scenario::Scenario;

fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "bursty".into());
    let s = Scenario::load(&name)?;
    let mut host = World::new(s.clone(), PerfParams::default(), true);
    let mut e = Engine::new(EngineConfig::default());
    for _ in 0..s.duration_s {
        let snap = host.observe()?;
        let plan = e.plan(&snap);
        for a in &plan.actions {
            let out = host.apply(&snap, a);
            println!(
                "t={:>4} vm={} {:?} {:?} -> {:?}",
                host.t, a.vm, a.action, a.reason, out
            );
            e.record_outcome(a, &out);
        }
        for r in &plan.refusals {
            println!("t={:>4} refused {:?}", host.t, r);
        }
        host.step();
    }
    println!("{:?}", e.state().stats);
    Ok(())
}
