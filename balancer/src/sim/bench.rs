//! Benchmark of one engine decision on synthetic hosts of 10/100/1000 VMs and
//! 2/4/8 nodes. The snapshot is deliberately hard: VMs already confined to nodes with
//! node 0 overloaded and a third of every VM's memory remote, so the decision runs
//! the full move and swap searches and plans migrations.

use std::time::Instant;

use serde::Serialize;

use crate::engine::{Engine, EngineConfig, Phase};
use crate::model::{CpuSet, HotRegion, Node, NodeMemory, Snapshot, Topology, Vcpu, Vm, VmMemory};

use super::rng::Rng;

const GIB: u64 = 1 << 30;

/// Timing of one size.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub vms: usize,
    pub nodes: usize,
    pub iterations: usize,
    pub median_us: f64,
    pub p90_us: f64,
    pub actions: usize,
    /// A warm engine's next decision one second later (steady state).
    pub steady_median_us: f64,
    /// Worst case of recurrence awareness: that next decision with every unit's
    /// probation ending, each with an earlier revert and a remembered peak, so every
    /// one is judged on the peak view.
    pub recurring_median_us: f64,
}

/// A synthetic snapshot of `vms` 4-vCPU VMs on `nodes` nodes.
pub fn snapshot(vms: usize, nodes: usize, seed: u64) -> Snapshot {
    let mut rng = Rng::new(seed);
    let cpn = ((vms * 4) / nodes / 2).max(8) as u32;
    let mut topo = Topology::uniform(nodes as u32, cpn, 64 * GIB * (vms as u64 / 10 + 1));
    for n in &mut topo.nodes {
        n.memory.free_bytes = n.memory.total_bytes / 2;
    }
    let node_cpus: Vec<CpuSet> = topo.nodes.iter().map(|n: &Node| n.cpus.clone()).collect();
    let mut out = Vec::with_capacity(vms);
    for i in 0..vms {
        // Node 0 gets twice its share.
        let home = if i % (nodes + 1) < 2 {
            0
        } else {
            i % (nodes + 1) - 1
        };
        let home = home.min(nodes - 1);
        let mut bytes = vec![0u64; nodes];
        bytes[home] = 2 * GIB;
        bytes[(home + 1 + rng.below(nodes.max(2) - 1)) % nodes] += GIB;
        let vcpus = (0..4)
            .map(|j| Vcpu {
                index: j,
                tid: (i * 10 + j as usize) as u32,
                affinity: node_cpus[home].clone(),
                last_cpu: node_cpus[home].first(),
                cpu_demand: 0.5 + rng.f64() * 0.5,
                telemetry: Default::default(),
            })
            .collect();
        let hot_regions = (0..nodes)
            .filter(|&n| bytes[n] > 0)
            .map(|n| HotRegion {
                start_addr: (i as u64) << 40 | (n as u64) << 32,
                len_bytes: bytes[n] / 5,
                node: n as u32,
                heat: rng.f64() * 100.0,
            })
            .collect();
        out.push(Vm {
            pid: 10_000 + i as u32,
            name: format!("vm{i}"),
            vcpus,
            memory: VmMemory {
                bytes_per_node: bytes,
                configured_bytes: 4 * GIB,
                ..Default::default()
            },
            hot_regions,
            mems_allowed: (0..nodes as u32).collect(),
            ..Default::default()
        });
    }
    let _ = NodeMemory::default();
    Snapshot {
        now_ns: 100_000_000_000,
        topology: topo,
        vms: out,
        settings: Default::default(),
    }
}

/// Times `iterations` decisions of a fresh engine (adoption, rebalancing with swaps
/// considered, migrations) on the snapshot of each size.
pub fn run(sizes: &[(usize, usize)], iterations: usize) -> Vec<BenchRow> {
    sizes
        .iter()
        .map(|&(vms, nodes)| {
            let snap = snapshot(vms, nodes, 42);
            let mut times = Vec::with_capacity(iterations);
            let mut actions = 0;
            for _ in 0..iterations {
                let mut engine = Engine::new(EngineConfig::default());
                let t0 = Instant::now();
                let plan = engine.plan(&snap);
                times.push(t0.elapsed().as_secs_f64() * 1e6);
                actions = plan.actions.len();
                std::hint::black_box(plan);
            }
            times.sort_by(f64::total_cmp);
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
            let mut warm = Engine::new(EngineConfig::default());
            warm.plan(&snap);
            let mut next = snap.clone();
            next.now_ns += 1_000_000_000;
            let mut steady: Vec<f64> = (0..iterations)
                .map(|_| {
                    let mut e = warm.clone();
                    let t0 = Instant::now();
                    std::hint::black_box(e.plan(&next));
                    t0.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            steady.sort_by(f64::total_cmp);
            let cfg = EngineConfig::default();
            let mut state = warm.state().clone();
            for st in state.units.values_mut() {
                let other = (st.home[0] + 1) % nodes as u32;
                st.phase = Phase::probation(next.now_ns - cfg.probation_ns, vec![other]);
                st.bursts.reverts_ns = vec![next.now_ns - 60_000_000_000];
                st.bursts.peak_demand = 4.0;
                st.bursts.peak_ns = next.now_ns - 5_000_000_000;
            }
            let rec = Engine::with_state(cfg.clone(), state);
            let mut recurring: Vec<f64> = (0..iterations)
                .map(|_| {
                    let mut e = rec.clone();
                    let t0 = Instant::now();
                    std::hint::black_box(e.plan(&next));
                    t0.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            recurring.sort_by(f64::total_cmp);
            BenchRow {
                vms,
                nodes,
                iterations,
                median_us: pct(0.5),
                p90_us: pct(0.9),
                actions,
                steady_median_us: steady[steady.len() / 2],
                recurring_median_us: recurring[recurring.len() / 2],
            }
        })
        .collect()
}
