//! The guest-to-host result protocol: one JSON object per console line, after a
//! unique prefix so kernel messages and program output never parse as results.
//!
//! `cargo xtask lab` mirrors the fields it reads (type, ok, summary numbers); keep
//! them stable.

use serde::{Deserialize, Serialize};

/// Every result line starts with this.
pub const PREFIX: &str = "@@VMBLAB@@ ";

/// Per-VM ground truth at one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmTruth {
    pub name: String,
    pub pid: u32,
    /// Bytes of the VM on each node.
    pub bytes_per_node: Vec<u64>,
    /// vCPU CPU time per node since the previous sample, in clock ticks.
    pub vcpu_ticks_per_node: Vec<u64>,
    /// The node each vCPU last ran on.
    pub vcpu_nodes: Vec<usize>,
    pub main_node: Option<usize>,
    pub locality: f64,
    /// Memory touches per second per vCPU since the previous sample.
    pub touches_per_vcpu_s: f64,
    /// Locality (on `main_node`) of the hot set of the guest RAM mapping (see
    /// `scenario::hot_pages`), from a per-page query (move_pages without target nodes).
    /// Only when the scenario asks for per-page truth (`hot_first`, `vm_pages_moved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_locality: Option<f64>,
    /// Locality of the rest of the guest RAM mapping (same source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_locality: Option<f64>,
    /// Pages of the guest RAM mapping found on another node than at the previous
    /// sample, summed since the first sample (a lower bound on pages moved: a page
    /// moved away and back between two samples is not seen). Same source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_moved: Option<u64>,
}

/// One sample of the whole guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub locality_mean: f64,
    pub locality_min: f64,
    /// vCPU load per node (CPUs busy with vCPU threads) since the previous sample.
    pub vcpu_load_per_node: Vec<f64>,
    pub vms: Vec<VmTruth>,
}

/// What a run measured, for comparison tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub balancer: String,
    pub kernel: String,
    pub vms: usize,
    /// (t_s, mean locality) at each sample.
    pub locality: Vec<(f64, f64)>,
    pub time_to_090_s: Option<f64>,
    pub time_to_095_s: Option<f64>,
    /// /proc/vmstat numa_pages_migrated delta over the run.
    pub numa_pages_migrated: u64,
    /// /proc/vmstat pgmigrate_success delta over the run.
    pub pgmigrate_success: u64,
    /// Mean over samples of least/most loaded node (vCPU load).
    pub cpu_balance: f64,
    /// Total memory touches by all vCPUs during the run.
    pub work_touches: u64,
    pub touches_per_vcpu_s: f64,
    pub run_s: f64,
}

/// One result line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The harness started.
    Start {
        scenario: String,
        balancer: String,
        kernel: String,
    },
    /// An assertion's outcome.
    Check {
        name: String,
        ok: bool,
        allowed_failure: bool,
        detail: String,
    },
    Sample(Sample),
    /// Something a balancer or the harness did worth showing (numad's log lines).
    Event {
        source: String,
        text: String,
    },
    Summary(Summary),
    /// A captured file for tests/fixtures (path relative to the guest root).
    Capture {
        path: String,
        data: String,
    },
    /// Last line: the scenario's verdict.
    Done {
        ok: bool,
        failed: Vec<String>,
    },
}

impl Record {
    /// The console line for this record.
    pub fn line(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// Parses a console line; `None` for lines that are not results.
    pub fn parse(line: &str) -> Option<Record> {
        let json = line.trim_end_matches('\r').split_once(PREFIX)?.1;
        serde_json::from_str(json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = Record::Done {
            ok: false,
            failed: vec!["nodes == 5".into()],
        };
        let line = r.line();
        assert!(line.starts_with(PREFIX));
        assert_eq!(Record::parse(&format!("junk {line}\r")), Some(r));
        assert_eq!(Record::parse("[ 1.0] kernel says hi"), None);
    }
}
