//! Scenario files: the host and the VMs a simulation runs, as TOML.
//!
//! The committed scenarios live in `balancer/scenarios/*.toml` and are compiled into
//! the binary, so `--scenario seed-40vm` works from any directory; any other argument
//! is read as a file path.

use serde::{Deserialize, Serialize};

/// A whole simulation setup.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Simulated seconds.
    pub duration_s: u32,
    /// Seed of the simulator's random generator (scheduler scatter, random nodes).
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub host: HostSpec,
    #[serde(rename = "vm")]
    pub vms: Vec<VmGroup>,
    /// Figures measured on the real machine this scenario describes (seed 004).
    #[serde(default)]
    pub seed_figures: Option<SeedFigures>,
}

fn default_seed() -> u64 {
    4
}

/// Measured figures a scenario reproduces (for calibration and held-out checks).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFigures {
    pub none_mb_s: Option<f64>,
    pub manual_mb_s: Option<f64>,
    pub vmbalanced_mb_s: Option<f64>,
    pub none_offnode_m_s: Option<f64>,
    pub manual_offnode_m_s: Option<f64>,
    pub vmbalanced_offnode_m_s: Option<f64>,
}

/// The simulated machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub nodes: u32,
    pub cpus_per_node: u32,
    pub mem_per_node_gib: f64,
    /// SLIT distance between different nodes (10 is local). Ignored with `distance`.
    #[serde(default = "default_remote")]
    pub remote_distance: u32,
    /// Full SLIT matrix, when nodes are not all equally far.
    #[serde(default)]
    pub distance: Option<Vec<Vec<u32>>>,
    /// Free 2 MiB huge pages per node (0: none).
    #[serde(default)]
    pub hugepages_2m_per_node: u64,
    /// KSM settings reported to policies.
    #[serde(default)]
    pub ksm_merge_across_nodes: bool,
    #[serde(default)]
    pub ksm_running: bool,
}

fn default_remote() -> u32 {
    21
}

/// A group of identical VMs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGroup {
    #[serde(default = "one")]
    pub count: u32,
    /// Name prefix; VMs are named `prefix-NN`.
    pub name: String,
    pub vcpus: u32,
    pub mem_gib: f64,
    /// Memory the guest touches (the host-resident working set), GiB.
    pub resident_gib: f64,
    /// Resident at start (already faulted), GiB; placed on `initial_nodes`, else
    /// faulted where the vCPUs run.
    #[serde(default)]
    pub initial_resident_gib: f64,
    /// Rate at which the guest touches new memory, MiB/s.
    #[serde(default = "default_fault")]
    pub fault_mib_s: f64,
    /// CPU demand of each vCPU (1.0 = a whole CPU).
    pub demand: f64,
    /// Optional periodic bursts.
    #[serde(default)]
    pub burst: Option<Burst>,
    /// Arrival and departure times, seconds.
    #[serde(default)]
    pub start_s: u32,
    #[serde(default)]
    pub end_s: Option<u32>,
    /// Nodes the VMs start on (cycled over the group): their vCPUs run there and
    /// their initial memory is there. Empty: nowhere in particular.
    #[serde(default)]
    pub initial_nodes: Vec<u32>,
    /// Whether the VMs start confined (cpuset) to their initial node, as left by a
    /// previous placement. `none` still lets them float (no balancer, no cpuset).
    #[serde(default)]
    pub bound_initially: bool,
    /// Nodes a manual binding puts them on (cycled); empty: `initial_nodes`, else
    /// round-robin over all nodes (10 VMs per node in seed 004).
    #[serde(default)]
    pub manual_nodes: Vec<u32>,
    /// Guest NUMA cells (0 or 1: none). vCPUs and memory are split evenly.
    #[serde(default)]
    pub cells: u32,
    /// Backed by 2 MiB hugetlbfs pages.
    #[serde(default)]
    pub hugepages: bool,
    /// Pinned by the operator to `manual_nodes` for every policy.
    #[serde(default)]
    pub operator_pinned: bool,
    /// VMs of the same KSM group share this many MiB of merged pages with each other.
    #[serde(default)]
    pub ksm_group: Option<u32>,
    #[serde(default)]
    pub ksm_shared_mib: u64,
}

fn one() -> u32 {
    1
}

fn default_fault() -> f64 {
    100.0
}

/// Demand switches to `demand` for `length_s` every `period_s`, starting at `phase_s`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    pub period_s: u32,
    pub length_s: u32,
    #[serde(default)]
    pub phase_s: u32,
    pub demand: f64,
}

/// The committed scenarios, compiled in.
pub const BUILTIN: &[(&str, &str)] = &[
    ("seed-40vm", include_str!("../../scenarios/seed-40vm.toml")),
    (
        "seed-20vm-squeezed",
        include_str!("../../scenarios/seed-20vm-squeezed.toml"),
    ),
    ("bursty", include_str!("../../scenarios/bursty.toml")),
    (
        "burst-once",
        include_str!("../../scenarios/burst-once.toml"),
    ),
    (
        "bursty-long",
        include_str!("../../scenarios/bursty-long.toml"),
    ),
    (
        "memory-heavy",
        include_str!("../../scenarios/memory-heavy.toml"),
    ),
    ("big-vm", include_str!("../../scenarios/big-vm.toml")),
    (
        "overcommit",
        include_str!("../../scenarios/overcommit.toml"),
    ),
    ("arrivals", include_str!("../../scenarios/arrivals.toml")),
];

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(
        "{path} is not a built-in scenario ({known}) and reading it as a file failed: {source}"
    )]
    Read {
        path: String,
        known: String,
        source: std::io::Error,
    },
    #[error("parsing scenario {name}: {source}")]
    Parse {
        name: String,
        source: toml::de::Error,
    },
    #[error("scenario {name} is invalid: {why}")]
    Invalid { name: String, why: String },
}

impl Scenario {
    /// A built-in scenario by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ScenarioError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(name_or_path, text);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|source| ScenarioError::Read {
            path: name_or_path.to_string(),
            known: BUILTIN
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })?;
        Self::parse(name_or_path, &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            name: name.to_string(),
            source,
        })?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |why: String| {
            Err(ScenarioError::Invalid {
                name: self.name.clone(),
                why,
            })
        };
        let h = &self.host;
        if h.nodes == 0 || h.nodes > 64 || h.cpus_per_node == 0 {
            return bad("host needs 1..=64 nodes with at least one CPU each".into());
        }
        if let Some(d) = &h.distance
            && (d.len() != h.nodes as usize || d.iter().any(|r| r.len() != h.nodes as usize))
        {
            return bad("distance must be a nodes x nodes matrix".into());
        }
        if self.duration_s == 0 {
            return bad("duration_s must be positive".into());
        }
        for g in &self.vms {
            if g.vcpus == 0 || g.mem_gib <= 0.0 || g.resident_gib > g.mem_gib {
                return bad(format!(
                    "vm group {}: vcpus > 0, 0 < resident <= mem",
                    g.name
                ));
            }
            if g.initial_nodes
                .iter()
                .chain(&g.manual_nodes)
                .any(|&n| n >= h.nodes)
            {
                return bad(format!("vm group {}: node out of range", g.name));
            }
            if g.cells > 1 && g.vcpus % g.cells != 0 {
                return bad(format!("vm group {}: vcpus must divide into cells", g.name));
            }
        }
        Ok(())
    }
}

impl VmGroup {
    /// Demand of one vCPU at second `t`.
    pub fn demand_at(&self, t: u32) -> f64 {
        if let Some(b) = &self.burst
            && b.period_s > 0
            && t >= b.phase_s
            && (t - b.phase_s) % b.period_s < b.length_s
        {
            return b.demand;
        }
        self.demand
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_scenario_parses() {
        for (name, _) in BUILTIN {
            let s = Scenario::load(name).unwrap();
            assert!(!s.vms.is_empty(), "{name}");
        }
    }

    #[test]
    fn bursts_follow_their_period() {
        let g = VmGroup {
            count: 1,
            name: "b".into(),
            vcpus: 1,
            mem_gib: 1.0,
            resident_gib: 1.0,
            initial_resident_gib: 0.0,
            fault_mib_s: 1.0,
            demand: 0.2,
            burst: Some(Burst {
                period_s: 10,
                length_s: 3,
                phase_s: 5,
                demand: 1.0,
            }),
            start_s: 0,
            end_s: None,
            initial_nodes: vec![],
            bound_initially: false,
            manual_nodes: vec![],
            cells: 0,
            hugepages: false,
            operator_pinned: false,
            ksm_group: None,
            ksm_shared_mib: 0,
        };
        let got: Vec<f64> = (0..16).map(|t| g.demand_at(t)).collect();
        assert_eq!(got[4], 0.2);
        assert_eq!(got[5], 1.0);
        assert_eq!(got[7], 1.0);
        assert_eq!(got[8], 0.2);
        assert_eq!(got[15], 1.0);
    }
}
