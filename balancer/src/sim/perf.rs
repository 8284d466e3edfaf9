//! The performance model and its parameters.
//!
//! A guest cell's throughput in a second is
//!
//! ```text
//! T = k * cpu_s / (1 + alpha * remote_w)
//! ```
//!
//! where `cpu_s` is the CPU time its vCPUs received (so CPU overcommit on a node
//! lowers it), and `remote_w` is the distance-weighted remote share of its memory
//! accesses: `sum over run node n, memory node m of run(n) * access(m) *
//! (d(n,m) - 10) / 11`, which is 1.0 for all accesses one SLIT-21 hop away. Accesses
//! go `hot_access_share` to the hot `hot_mem_share` of memory, the rest to the cold
//! part. Off-node accesses per second are `a * cpu_s * offnode_share` (unweighted).
//!
//! Free parameters (`k`, `alpha`, `a`, and the scheduler's scatter rate) are fitted
//! ONLY on seed 004's 40-VM "no balancer" and "manual binding" figures by
//! `vmbalancer simulate --calibrate`; everything else is a fixed, stated assumption.

use serde::{Deserialize, Serialize};

/// Model parameters. Defaults are the calibrated values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerfParams {
    /// Throughput per CPU-second fully local (MB/s per CPU), fitted on manual binding.
    pub k_mb_per_cpu_s: f64,
    /// Slow-down per unit of distance-weighted remote share, fitted on no balancer.
    pub alpha: f64,
    /// Memory accesses per CPU-second, millions (fitted on no balancer's off-node rate).
    pub accesses_m_per_cpu_s: f64,
    /// Probability per second that the kernel's wide load balance moves a floating
    /// vCPU thread to another allowed node (fitted on the seed's numa_maps spread).
    pub scatter_per_s: f64,
    /// Share of memory that is hot (assumption).
    pub hot_mem_share: f64,
    /// Share of accesses that go to hot memory (assumption).
    pub hot_access_share: f64,
    /// Page migration bandwidth per VM, bytes/s (assumption: seed 004 moved a 2 GB VM
    /// in 4-7 s).
    pub migrate_bytes_per_s: f64,
    /// CPU-seconds spent per GiB migrated, charged to the target node (assumption).
    pub migrate_cpu_s_per_gib: f64,
    /// Kernel node-level load balance acts when node load ratios differ by more than
    /// this (assumption, like the NUMA domain's imbalance_pct of 125).
    pub kernel_imbalance: f64,
}

impl Default for PerfParams {
    fn default() -> Self {
        Self {
            k_mb_per_cpu_s: 236.2,
            alpha: 0.4193,
            accesses_m_per_cpu_s: 3.721,
            scatter_per_s: 0.05,
            hot_mem_share: 0.2,
            hot_access_share: 0.8,
            migrate_bytes_per_s: 400.0 * (1u64 << 20) as f64,
            migrate_cpu_s_per_gib: 0.5,
            kernel_imbalance: 0.25,
        }
    }
}

/// Distance weight of an access from node distance `d` (10 local, 21 -> 1.0).
pub fn distance_weight(d: u32) -> f64 {
    d.saturating_sub(10) as f64 / 11.0
}
