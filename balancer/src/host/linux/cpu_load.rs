//! CPU load per node from `/proc/stat`.
//!
//! Why it exists: per-VM CPU use is not CPU demand once a node is saturated (a VM
//! that waits for a CPU uses less than it wants), so the engine only moves vCPUs to a
//! node whose CPUs really sit idle, and numad-style advice weighs nodes by how busy
//! their CPUs are (other processes run too). The observer samples once per
//! observation; `vmbalancer advise` samples once when the daemon is not running. The
//! root is a parameter, so tests read fixture trees.
//!
//! The `cpuN` lines are parsed by hand, and only here: the `procfs` crate's
//! `KernelStats` keeps per-CPU times in a list without the CPU numbers, and the kernel
//! leaves offline CPUs out of the file, so with a CPU offline its positions no longer
//! name CPUs and load would be charged to the wrong node.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::Topology;

/// Why the host could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostViewError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
}

fn read(path: &Path) -> Result<String, HostViewError> {
    std::fs::read_to_string(path).map_err(|source| HostViewError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Busy jiffies and total jiffies per CPU from `/proc/stat`.
fn cpu_times(proc_root: &Path) -> Result<Vec<(u32, u64, u64)>, HostViewError> {
    let text = read(&proc_root.join("stat"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cpu")?;
            let (id, vals) = rest.split_once(' ')?;
            let id: u32 = id.parse().ok()?;
            let v: Vec<u64> = vals
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest is inside user)
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some((id, total.saturating_sub(idle), total))
        })
        .collect())
}

/// CPUs in use per node (indexed like `topology.nodes`) over `sample`.
pub fn busy_cpus_per_node(
    proc_root: &Path,
    topology: &Topology,
    sample: Duration,
) -> Result<Vec<f64>, HostViewError> {
    let a = cpu_times(proc_root)?;
    std::thread::sleep(sample);
    let b = cpu_times(proc_root)?;
    Ok(busy_between(&a, &b, topology))
}

fn busy_between(a: &[(u32, u64, u64)], b: &[(u32, u64, u64)], topology: &Topology) -> Vec<f64> {
    let mut busy = vec![0.0; topology.nodes.len()];
    for &(id, busy_b, total_b) in b {
        let Some(&(_, busy_a, total_a)) = a.iter().find(|(i, _, _)| *i == id) else {
            continue;
        };
        let total = total_b.saturating_sub(total_a);
        if total == 0 {
            continue;
        }
        let share = busy_b.saturating_sub(busy_a) as f64 / total as f64;
        if let Some(i) = topology
            .node_of_cpu(id)
            .and_then(|n| topology.node_index(n))
        {
            busy[i] += share;
        }
    }
    busy
}

/// CPU load per node between two calls, for a caller that already ticks (the
/// daemon): no sleeping, one read of `/proc/stat` per call.
#[derive(Debug)]
pub struct CpuSampler {
    proc_root: PathBuf,
    prev: Option<Vec<(u32, u64, u64)>>,
}

impl CpuSampler {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            prev: None,
        }
    }

    /// CPUs in use per node since the previous call; `None` on the first call or
    /// when `/proc/stat` cannot be read.
    pub fn sample(&mut self, topology: &Topology) -> Option<Vec<f64>> {
        let now = cpu_times(&self.proc_root).ok()?;
        let out = self
            .prev
            .as_ref()
            .map(|prev| busy_between(prev, &now, topology));
        self.prev = Some(now);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let t =
            crate::host::linux::topology::read_topology(&crate::host::linux::HostPaths::system())
                .unwrap();
        assert!(!t.nodes.is_empty());
        let busy = busy_cpus_per_node(Path::new("/proc"), &t, Duration::from_millis(50)).unwrap();
        assert_eq!(busy.len(), t.nodes.len());
        assert!(
            busy.iter()
                .all(|b| *b >= 0.0 && *b <= t.all_cpus().len() as f64 + 0.01)
        );
    }
}
