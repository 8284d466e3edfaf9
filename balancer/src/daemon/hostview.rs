//! A minimal reader of the host for advice: node CPUs, free memory, distances and
//! CPU load per node, straight from sysfs and `/proc/stat`.
//!
//! Why it exists: `vmbalancer advise` must answer even when the daemon is not running,
//! and it only needs the node table, not VM discovery. It is also an [`Observer`] of
//! a host without VMs, so the daemon can run (and be tested) before full observation
//! is plugged in. Roots are parameters, so tests read fixture trees.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::host::Observer;
use crate::model::{CpuSet, Node, NodeMemory, Snapshot, Topology};

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

/// Reads the node table under `sys_root` (`devices/system/node/nodeN`).
pub fn read_topology(sys_root: &Path) -> Result<Topology, HostViewError> {
    let base = sys_root.join("devices/system/node");
    let mut ids: Vec<u32> = std::fs::read_dir(&base)
        .map_err(|source| HostViewError::Io {
            path: base.clone(),
            source,
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        .collect();
    ids.sort_unstable();
    let mut nodes = Vec::new();
    let mut distance = Vec::new();
    for id in ids {
        let dir = base.join(format!("node{id}"));
        let cpulist = dir.join("cpulist");
        let cpus = CpuSet::parse_list(&read(&cpulist)?).map_err(|e| HostViewError::Format {
            path: cpulist.clone(),
            why: e.to_string(),
        })?;
        let meminfo_path = dir.join("meminfo");
        let meminfo = read(&meminfo_path)?;
        let field = |name: &str| -> Option<u64> {
            meminfo.lines().find_map(|l| {
                let rest = l.split_once(&format!(" {name}:"))?.1;
                Some(rest.split_whitespace().next()?.parse::<u64>().ok()? * 1024)
            })
        };
        let (Some(total_bytes), Some(free_bytes)) = (field("MemTotal"), field("MemFree")) else {
            return Err(HostViewError::Format {
                path: meminfo_path,
                why: "no MemTotal/MemFree".into(),
            });
        };
        let row = read(&dir.join("distance"))
            .ok()
            .map(|d| {
                d.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        distance.push(row);
        nodes.push(Node {
            id,
            smt_siblings: cpus.iter().map(|c| std::iter::once(c).collect()).collect(),
            cpus,
            memory: NodeMemory {
                total_bytes,
                free_bytes,
                file_bytes: field("FilePages").unwrap_or(0),
                hugepages: Vec::new(),
            },
        });
    }
    // A distance table is only used when it is square and matches the nodes.
    if distance.iter().any(|r: &Vec<u32>| r.len() != nodes.len()) {
        distance.clear();
    }
    Ok(Topology { nodes, distance })
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

/// An observer of nodes only (no VM discovery).
#[derive(Debug)]
pub struct HostView {
    sys_root: PathBuf,
    started: Instant,
}

impl HostView {
    pub fn new(sys_root: &Path) -> Self {
        Self {
            sys_root: sys_root.to_path_buf(),
            started: Instant::now(),
        }
    }
}

impl Observer for HostView {
    type Error = HostViewError;
    fn observe(&mut self) -> Result<Snapshot, HostViewError> {
        Ok(Snapshot {
            now_ns: self.started.elapsed().as_nanos() as u64,
            topology: read_topology(&self.sys_root)?,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        let root = std::env::temp_dir().join(format!("vmb-hostview-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (id, cpus, free_kb) in [(0, "0-1", 1000), (1, "2-3", 3000)] {
            let d = root.join(format!("devices/system/node/node{id}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
            std::fs::write(
                d.join("meminfo"),
                format!(
                    "Node {id} MemTotal:       4000 kB\nNode {id} MemFree:        {free_kb} kB\n\
                     Node {id} FilePages:      10 kB\n"
                ),
            )
            .unwrap();
            std::fs::write(
                d.join("distance"),
                if id == 0 { "10 21\n" } else { "21 10\n" },
            )
            .unwrap();
        }
        std::fs::create_dir_all(root.join("devices/system/node/possible-not-a-node")).unwrap();
        root
    }

    #[test]
    fn reads_fixture_nodes() {
        let root = fixture();
        let t = read_topology(&root).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[1].cpus.to_string(), "2-3");
        assert_eq!(t.nodes[1].memory.free_bytes, 3000 * 1024);
        assert_eq!(t.nodes[0].memory.file_bytes, 10 * 1024);
        assert_eq!(t.distance(0, 1), 21);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn reads_this_host() {
        let t = read_topology(Path::new("/sys")).unwrap();
        assert!(!t.nodes.is_empty());
        let busy = busy_cpus_per_node(Path::new("/proc"), &t, Duration::from_millis(50)).unwrap();
        assert_eq!(busy.len(), t.nodes.len());
        assert!(
            busy.iter()
                .all(|b| *b >= 0.0 && *b <= t.all_cpus().len() as f64 + 0.01)
        );
    }
}
