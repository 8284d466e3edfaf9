//! The NUMA lab's result protocol: how the in-guest harness reports to the host.
//!
//! The harness (`lab_harness` in `vmbalancer-tests`) prints these records on the
//! guest's serial console and `cargo xtask lab` reads them back from the console
//! log. The two sides are different crates with different constraints: the harness
//! crate depends on the balancer library (and through it on the eBPF toolchain),
//! while xtask must build first and fast, before any of that exists. Each side
//! used to keep its own copy of the types, and the copies could drift apart
//! silently. This crate holds the one definition of the wire format, with nothing
//! heavier than serde, so both sides depend on it and cannot disagree.
//!
//! The format: one JSON object per console line, after [`PREFIX`], so kernel
//! messages and program output never parse as results. The object's `type` field
//! names the record ([`Record`]). Readers ignore fields they do not know and read
//! record types they do not know as [`Record::Other`], so a guest may report more
//! than the host understands without breaking it. Field names, the `type` tags and
//! the rules for optional fields are the wire format: renaming one breaks the host
//! reading an older or newer guest's lines.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every result line starts with this (it may follow other text on the same line,
/// e.g. a terminal escape sequence).
pub const PREFIX: &str = "@@VMBLAB@@ ";

/// Per-VM ground truth at one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmTruth {
    pub name: String,
    pub pid: u32,
    /// Bytes of the VM's own memory on each node (anonymous, memfd and hugetlb
    /// mappings of its process: guest RAM, heap, stacks; not shared program and
    /// library pages).
    pub bytes_per_node: Vec<u64>,
    /// vCPU CPU time per node since the previous sample, in clock ticks.
    pub vcpu_ticks_per_node: Vec<u64>,
    /// The node each vCPU last ran on.
    pub vcpu_nodes: Vec<usize>,
    pub main_node: Option<usize>,
    pub locality: f64,
    /// Memory touches per second per vCPU since the previous sample.
    pub touches_per_vcpu_s: f64,
    /// Locality (on `main_node`) of the hot set of the guest RAM mapping (the
    /// harness's `scenario::hot_pages`), from a per-page query (move_pages without
    /// target nodes). Only when the scenario asks for per-page truth (`hot_first`,
    /// `vm_pages_moved`).
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
    /// Share of the queried guest RAM pages whose node is known, from the per-page
    /// query or, where it gives none, from the page's frame number (the hot and cold
    /// localities are shares of those). Below 1 for pages not mapped yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queried_present_share: Option<f64>,
    /// Access-weighted locality: the estimated share of the VM's memory accesses
    /// that land on `main_node`, from its known hot/cold access split and the
    /// hot-set and cold-part localities (see `vmbalancer_tests::lab::access`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_locality: Option<f64>,
    /// Estimated off-node memory accesses per second since the previous sample: the
    /// VM's touch rate (all vCPUs) times `1 - access_locality`. An estimate from the
    /// known access split, not a hardware counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offnode_accesses_per_s: Option<f64>,
    /// Each guest NUMA cell's own truth, for a VM with cells (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellTruth>,
}

/// One guest NUMA cell at one sample: its memory backend's mapping (as the VM
/// reports where it is) and its own vCPU threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellTruth {
    /// The cell's `nodeid`.
    pub id: u32,
    /// Bytes of the cell's mapping on each node (its `numa_maps` line).
    pub bytes_per_node: Vec<u64>,
    /// The node the cell's vCPUs ran on most since the previous sample.
    pub main_node: Option<usize>,
    /// Share of the cell's memory on `main_node`.
    pub locality: f64,
    /// Access-weighted locality of the cell (its hot set and cold part, as for a
    /// VM), when per-page truth was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_locality: Option<f64>,
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
    /// Mean of the VMs' `access_locality`, weighted by each VM's touches in the
    /// interval (equally when no VM reported touches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_locality_mean: Option<f64>,
    /// Mean of the VMs' `hot_locality`, with the same weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_locality_mean: Option<f64>,
    /// Sum of the VMs' `offnode_accesses_per_s` (an estimate, not a hardware counter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offnode_accesses_per_s: Option<f64>,
}

/// What a run measured, for comparison tables. The access-weighted and reaction-time
/// fields came later: they are left out of the line when empty, and read as empty
/// from an older guest's line.
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
    /// (t_s, access-weighted mean locality) at each sample with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_locality: Vec<(f64, f64)>,
    /// (t_s, hot-set mean locality) at each sample with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot_locality: Vec<(f64, f64)>,
    /// (t_s, estimated off-node accesses per second over all VMs) at each sample.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offnode_accesses_per_s: Vec<(f64, f64)>,
    /// First sample time at which access-weighted locality reached 0.95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_time_to_095_s: Option<f64>,
    /// First sample time at which hot-set locality reached 0.95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_time_to_095_s: Option<f64>,
    /// Seconds after the balancer started until a vCPU thread's allowed CPUs first
    /// changed, from the harness's 250 ms polling (`None`: never seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_cpu_move_affinity_s: Option<f64>,
    /// vmbalancer only: seconds after it started until its first CPU move
    /// (`SetCpus` decision) in `vmbalancer status --json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_cpu_move_status_s: Option<f64>,
    /// vmbalancer only: most a tick of its loop started after it was due while its
    /// memory moves were running (`daemon.max_tick_late_moving_ns` in `status --json`
    /// at the end), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick_late_moving_s: Option<f64>,
    /// CPU time (user + system, every thread) of the balancer's own process over the
    /// run, seconds: vmbalancer's daemon or numad (`None` for autoNUMA, whose work
    /// runs in the VMs' threads and kernel workers, and for no balancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer_cpu_s: Option<f64>,
}

/// One measurement of the mover benchmark (`cargo xtask lab bench-mover`): one way
/// of moving the guest RAM of one layout's VMs to other nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoverBench {
    /// The layout: page size, VM size and count (e.g. `4k 256M x1`).
    pub layout: String,
    /// How the pages were moved (e.g. `migratepages`, `vmbalancer`).
    pub method: String,
    /// Base pages the kernel migrated (/proc/vmstat pgmigrate_success delta).
    pub pages: u64,
    /// Wall time from the first call to the last return.
    pub seconds: f64,
    /// Share of the VMs' guest RAM on the target nodes afterwards.
    pub on_target: f64,
    /// Calls into the kernel that moved pages (syscalls or processes).
    pub calls: u64,
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
    Summary(Box<Summary>),
    MoverBench(MoverBench),
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
    /// A record type this build does not know (written by a newer harness). Only
    /// ever read, never written by the harness.
    #[serde(other)]
    Other,
}

impl Record {
    /// The console line for this record (without a line end).
    pub fn line(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }
}

/// Parses one console line: `Ok(None)` for a line without [`PREFIX`] (kernel
/// messages, program output), the record for a result line, and an error for a
/// result line whose JSON does not read as a record (a cut or interleaved line, or a
/// known record type with a missing or mistyped field). A trailing `\r` (serial
/// consoles end lines with CR LF) is ignored.
pub fn parse_line(line: &str) -> Result<Option<Record>, MalformedLine> {
    let Some((_, json)) = line.split_once(PREFIX) else {
        return Ok(None);
    };
    let json = json.trim_end_matches(['\r', '\n']);
    serde_json::from_str(json)
        .map(Some)
        .map_err(|source| MalformedLine {
            json: json.to_string(),
            source,
        })
}

/// A console line with the result prefix that holds no readable record.
#[derive(Debug)]
pub struct MalformedLine {
    json: String,
    source: serde_json::Error,
}

impl MalformedLine {
    /// Longest excerpt of the line shown in the message, in characters.
    const EXCERPT_CHARS: usize = 120;

    /// Everything after the prefix, as it was on the console.
    pub fn json(&self) -> &str {
        &self.json
    }
}

impl fmt::Display for MalformedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed lab result line ({}): ", self.source)?;
        match self.json.char_indices().nth(Self::EXCERPT_CHARS) {
            Some((cut, _)) => write!(f, "{}...", &self.json[..cut]),
            None => f.write_str(&self.json),
        }
    }
}

impl std::error::Error for MalformedLine {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests;
