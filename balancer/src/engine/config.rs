//! Engine tunables. Plain serde data with documented defaults so the daemon's TOML
//! configuration can embed it as a table (`[engine]`), every field optional.

use serde::{Deserialize, Serialize};

use crate::model::{CpuSet, DEFAULT_TARGET_LOCALITY_PCT};

const MIB: u64 = 1 << 20;
const SEC_NS: u64 = 1_000_000_000;

/// How the engine decides. Every field has a default; see each field's doc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Act only when the spread of CPU load between the busiest and the idlest node
    /// exceeds this share of the mean load ratio. Default 10 %.
    pub imbalance_threshold_pct: f64,
    /// Do not rebalance when the busiest node uses less than this share of its CPUs:
    /// nobody waits for a CPU, so a move would only cost locality. Default 85 % (numad's
    /// target utilisation).
    pub busy_floor_pct: f64,
    /// Rebalance onto a node only while it has at least this many idle CPUs, as the
    /// host measured them (all processes counted); hosts that do not measure idle
    /// time skip the check. Default 0.5.
    pub min_idle_cpus: f64,
    /// A unit moved by rebalancing is not moved again within this window. Default 30 s.
    pub hysteresis_ns: u64,
    /// CPU-first probation: after a move, wait this long before memory follows (commit)
    /// or the CPUs go back (revert). Default 10 s.
    pub probation_ns: u64,
    /// Migration rate per VM while hot regions are remote. Default 256 MiB/s.
    pub hot_rate_bytes_per_s: u64,
    /// Migration rate per VM for the cold rest. Default 64 MiB/s.
    pub cold_rate_bytes_per_s: u64,
    /// Migration rate for the whole host, all VMs together. Default 512 MiB/s.
    pub host_rate_bytes_per_s: u64,
    /// Stop migrating a VM once this share of its memory is on its home nodes; the
    /// coldest remainder may stay. Default 90 % ([`DEFAULT_TARGET_LOCALITY_PCT`],
    /// numad's `-m` default, the same as the daemon's `target_locality_pct`).
    pub locality_target_pct: f64,
    /// Never plan memory onto a node whose free memory would drop below this. Default
    /// 512 MiB.
    pub free_headroom_bytes: u64,
    /// Rebalancing moves (a swap counts as one) per decision. Default 4.
    pub max_moves_per_tick: u32,
    /// The expected interval between decisions; budgets use the real gap between
    /// snapshots, clamped to [1/4, 5] x this (a woken tick comes early). Default 1 s.
    pub tick_ns: u64,
    /// CPU demand assumed per vCPU of a VM never seen running, for initial placement.
    /// Default 1.0 (a new VM is assumed busy).
    pub new_vcpu_demand: f64,
    /// Consider 1-for-1 and 1-for-2 swaps when no single move helps. Default true.
    pub swaps: bool,
    /// With KSM `merge_across_nodes=0`, prefer keeping VMs that share pages together.
    /// Default true.
    pub ksm_grouping: bool,
    /// Candidates kept per side when searching 1-for-2 swaps (bounds the search).
    /// Default 12.
    pub swap_candidates: usize,
    /// Recurrence awareness: when a CPU-first probation ends and the unit's earlier
    /// probations were reverted at least this many times within
    /// `recurrence_window_ns`, it keeps bursting: the need is judged on its peak
    /// demand, so the move commits and memory follows once (see `recurrence.rs`).
    /// A single short burst has no earlier revert, so it always reverts with zero
    /// bytes moved. 0 turns recurrence awareness off. Default 1: the second burst
    /// that needs a move within the window is judged lasting.
    pub recurrence_reverts: u32,
    /// How far back reverts count, and how long a remembered peak takes to fade to
    /// nothing once the unit stops reaching it. Default 600 s.
    pub recurrence_window_ns: u64,
    /// CPUs never given to VMs (numad's `-R`): they count for no node's capacity and
    /// never appear in a CPU set the engine plans, so a node keeps its other CPUs for
    /// VMs and a node whose CPUs are all reserved has no capacity at all. The daemon
    /// fills it from its own `reserved_cpus` (see `daemon::policy::engine_config`).
    /// Default none.
    pub reserved_cpus: CpuSet,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            imbalance_threshold_pct: 10.0,
            busy_floor_pct: 85.0,
            min_idle_cpus: 0.5,
            hysteresis_ns: 30 * SEC_NS,
            probation_ns: 10 * SEC_NS,
            hot_rate_bytes_per_s: 256 * MIB,
            cold_rate_bytes_per_s: 64 * MIB,
            host_rate_bytes_per_s: 512 * MIB,
            locality_target_pct: f64::from(DEFAULT_TARGET_LOCALITY_PCT),
            free_headroom_bytes: 512 * MIB,
            max_moves_per_tick: 4,
            tick_ns: SEC_NS,
            new_vcpu_demand: 1.0,
            swaps: true,
            ksm_grouping: true,
            swap_candidates: 12,
            recurrence_reverts: 1,
            recurrence_window_ns: 600 * SEC_NS,
            reserved_cpus: CpuSet::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_table_gives_defaults() {
        let c: EngineConfig = toml::from_str("").unwrap();
        assert_eq!(c, EngineConfig::default());
        let c: EngineConfig = toml::from_str("probation_ns = 5000000000").unwrap();
        assert_eq!(c.probation_ns, 5 * SEC_NS);
        assert_eq!(c.hysteresis_ns, EngineConfig::default().hysteresis_ns);
    }
}
