//! The host's NUMA shape from sysfs, and the host-wide settings that change balancing.
//!
//! Sources: `devices/system/node/{online,nodeN/{cpulist,distance,meminfo,hugepages}}`,
//! `devices/system/cpu/{online,cpuN/topology/thread_siblings_list}`,
//! `kernel/mm/ksm/{run,merge_across_nodes,pages_sharing}` and
//! `/proc/sys/kernel/numa_balancing`. The shape (nodes, CPUs, distances) changes only on
//! hotplug; the memory figures change all the time, so [`refresh_node_memory`] re-reads
//! just those.
//!
//! Each file has one reader here, used by the observer, the applier (its check for
//! room on the target node re-reads [`read_node_meminfo`]) and the eBPF loader (its
//! CPU -> node table comes from [`read_node_cpus`]). No crate reads sysfs node files,
//! so they are parsed by hand. `/proc/meminfo` (hosts without NUMA) goes through the
//! same [`parse_meminfo`] rather than the `procfs` crate's `Meminfo`, which multiplies
//! kB by 1024 unchecked (a wrap in release builds, a panic in debug ones) and requires
//! fields this reader does not use.

use std::path::Path;

use super::{FormatError, HostError, HostPaths, read_idset, read_small, read_u64};
use crate::model::{CpuSet, HostSettings, HugePagePool, KsmState, Node, NodeMemory, Topology};

fn node_dir(sys: &Path) -> std::path::PathBuf {
    sys.join("devices/system/node")
}

/// Reads the whole topology: nodes with CPUs or memory, SMT siblings, distances, memory.
/// A host without `devices/system/node` (kernel without NUMA) is one node 0 holding
/// every online CPU and `/proc/meminfo`.
pub fn read_topology(paths: &HostPaths) -> Result<Topology, HostError> {
    let sys = &paths.sys;
    let online_cpus = read_idset(&sys.join("devices/system/cpu/online"))?;
    let Some(node_cpus) = read_node_cpus(sys)? else {
        return single_node_fallback(paths, online_cpus);
    };
    let online_nodes: crate::model::IdSet = node_cpus.iter().map(|(id, _)| *id).collect();
    let mut nodes = Vec::new();
    let mut rows = Vec::new();
    for (id, node_cpus) in node_cpus {
        let dir = node_dir(sys).join(format!("node{id}"));
        let cpus = node_cpus.intersection(&online_cpus);
        let memory = read_node_memory(sys, id)?;
        if cpus.is_empty() && memory.total_bytes == 0 {
            continue;
        }
        let smt_siblings = cpus
            .iter()
            .map(|cpu| read_siblings(sys, cpu))
            .collect::<Result<Vec<_>, _>>()?;
        let distance_path = dir.join("distance");
        let row: Vec<u32> = read_small(&distance_path)?
            .split_ascii_whitespace()
            .map(|t| t.parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| HostError::parse(&distance_path, FormatError::DistanceNotNumber))?;
        if row.len() <= online_nodes.iter().max().unwrap_or(0) as usize {
            // The row is indexed by node id over all possible ids up to the highest
            // online one; shorter means a truncated file.
            return Err(HostError::parse(
                &distance_path,
                FormatError::ShortDistanceRow {
                    found: row.len(),
                    nodes: online_nodes,
                },
            ));
        }
        rows.push(row);
        nodes.push(Node {
            id,
            cpus,
            smt_siblings,
            memory,
            idle_cpus: None,
        });
    }
    // Keep only the columns of the kept nodes, in node order.
    let distance = rows
        .iter()
        .map(|row| nodes.iter().map(|n| row[n.id as usize]).collect())
        .collect();
    Ok(Topology { nodes, distance })
}

/// Reads `/proc/meminfo`: the memory of a host without NUMA support.
fn read_host_meminfo(paths: &HostPaths) -> Result<NodeMemory, HostError> {
    let path = paths.proc.join("meminfo");
    let text = read_small(&path)?;
    parse_meminfo(&text, None).map_err(|w| HostError::parse(&path, w))
}

/// The online nodes and the CPUs sysfs lists under each (`node/online`,
/// `node/nodeN/cpulist`, offline CPUs included), in node order; `None` on a kernel
/// without NUMA support (no `devices/system/node`).
pub fn read_node_cpus(sys: &Path) -> Result<Option<Vec<(u32, CpuSet)>>, HostError> {
    let dir = node_dir(sys);
    if !dir.exists() {
        return Ok(None);
    }
    read_idset(&dir.join("online"))?
        .iter()
        .map(|id| Ok((id, read_idset(&dir.join(format!("node{id}/cpulist")))?)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn single_node_fallback(paths: &HostPaths, cpus: CpuSet) -> Result<Topology, HostError> {
    let memory = read_host_meminfo(paths)?;
    let smt_siblings = cpus
        .iter()
        .map(|cpu| read_siblings(&paths.sys, cpu))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Topology {
        nodes: vec![Node {
            id: 0,
            cpus,
            smt_siblings,
            memory,
            idle_cpus: None,
        }],
        distance: vec![vec![10]],
    })
}

fn read_siblings(sys: &Path, cpu: u32) -> Result<CpuSet, HostError> {
    let path = sys.join(format!(
        "devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
    ));
    match read_idset(&path) {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) => Ok(std::iter::once(cpu).collect()),
        // Some virtual machines lack the topology directory: each CPU its own core.
        Err(e) if e.is_vanished() => Ok(std::iter::once(cpu).collect()),
        Err(e) => Err(e),
    }
}

/// What is wrong with a meminfo text; [`HostError::Parse`] adds the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeminfoError {
    #[error("{key}: not a number of kB: {found:?}")]
    NotKb { key: String, found: String },
    #[error("{key}: {kb} kB overflows")]
    Overflow { key: String, kb: u64 },
    #[error("MemTotal or MemFree missing")]
    Missing,
}

/// Parses a node meminfo (`Node 0 MemTotal:  24563832 kB`) or, with `node == None`,
/// `/proc/meminfo` (`MemTotal:  24563832 kB`). MemTotal and MemFree are required.
pub fn parse_meminfo(text: &str, node: Option<u32>) -> Result<NodeMemory, MeminfoError> {
    let mut mem = NodeMemory::default();
    let (mut total, mut free) = (false, false);
    for line in text.lines() {
        let mut rest = line.trim();
        if let Some(n) = node {
            let prefix = format!("Node {n} ");
            match rest.strip_prefix(&prefix) {
                Some(r) => rest = r.trim_start(),
                None => continue,
            }
        }
        let Some((key, value)) = rest.split_once(':') else {
            continue;
        };
        let field = match key {
            "MemTotal" => &mut mem.total_bytes,
            "MemFree" => &mut mem.free_bytes,
            "FilePages" | "Cached" => &mut mem.file_bytes,
            _ => continue,
        };
        let v = value.trim();
        let kb: u64 = v
            .strip_suffix("kB")
            .unwrap_or(v)
            .trim()
            .parse()
            .map_err(|_| MeminfoError::NotKb {
                key: key.to_string(),
                found: v.to_string(),
            })?;
        *field = kb.checked_mul(1024).ok_or_else(|| MeminfoError::Overflow {
            key: key.to_string(),
            kb,
        })?;
        total |= key == "MemTotal";
        free |= key == "MemFree";
    }
    if !total || !free {
        return Err(MeminfoError::Missing);
    }
    Ok(mem)
}

/// Reads `devices/system/node/nodeN/meminfo` (huge page pools left empty): the one
/// reader of that file, for the observer and for the applier's check for room.
pub fn read_node_meminfo(sys: &Path, id: u32) -> Result<NodeMemory, HostError> {
    let path = node_dir(sys).join(format!("node{id}")).join("meminfo");
    let text = read_small(&path)?;
    parse_meminfo(&text, Some(id)).map_err(|w| HostError::parse(&path, w))
}

fn read_node_memory(sys: &Path, id: u32) -> Result<NodeMemory, HostError> {
    let mut mem = read_node_meminfo(sys, id)?;
    mem.hugepages = read_hugepages(&node_dir(sys).join(format!("node{id}/hugepages")))?;
    Ok(mem)
}

/// Reads `hugepages/hugepages-<size>kB/{nr,free}_hugepages`, one pool per size,
/// smallest size first. No directory means no huge pages.
fn read_hugepages(dir: &Path) -> Result<Vec<HugePagePool>, HostError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut pools = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(kb) = name
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
        else {
            continue;
        };
        let kb: u64 = kb
            .parse()
            .map_err(|_| HostError::parse(&entry.path(), FormatError::HugePageSizeName))?;
        pools.push(HugePagePool {
            page_size_bytes: kb.saturating_mul(1024),
            total_pages: read_u64(&entry.path().join("nr_hugepages"))?,
            free_pages: read_u64(&entry.path().join("free_hugepages"))?,
        });
    }
    pools.sort_by_key(|p| p.page_size_bytes);
    Ok(pools)
}

/// Re-reads the live memory figures of the nodes of `topology`.
pub fn refresh_node_memory(paths: &HostPaths, topology: &mut Topology) -> Result<(), HostError> {
    let dir = node_dir(&paths.sys);
    if !dir.exists() {
        if let Some(n) = topology.nodes.first_mut() {
            n.memory = read_host_meminfo(paths)?;
        }
        return Ok(());
    }
    for node in &mut topology.nodes {
        node.memory = read_node_memory(&paths.sys, node.id)?;
    }
    Ok(())
}

/// Reads KSM and automatic NUMA balancing. Missing files (KSM or NUMA balancing not
/// built into the kernel) read as "off".
pub fn read_settings(paths: &HostPaths) -> Result<HostSettings, HostError> {
    let opt = |path: &Path| -> Result<Option<u64>, HostError> {
        match read_u64(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_vanished() => Ok(None),
            Err(e) => Err(e),
        }
    };
    let ksm = paths.sys.join("kernel/mm/ksm");
    // numa_balancing: bit 0 = NUMA_BALANCING_NORMAL (the balancing that moves tasks and
    // pages between nodes); bit 1 = memory tiering only.
    let numa_balancing = opt(&paths.proc.join("sys/kernel/numa_balancing"))?.unwrap_or(0);
    Ok(HostSettings {
        numa_balancing: numa_balancing & 1 != 0,
        ksm: KsmState {
            // run: 0 stopped, 1 running, 2 stopped and unmerged.
            running: opt(&ksm.join("run"))?.unwrap_or(0) == 1,
            merge_across_nodes: opt(&ksm.join("merge_across_nodes"))?.unwrap_or(0) == 1,
            pages_sharing: opt(&ksm.join("pages_sharing"))?.unwrap_or(0),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_meminfo() {
        let text = "Node 1 MemTotal:       16315912 kB\nNode 1 MemFree:        12000000 kB\n\
                    Node 1 MemUsed:         4315912 kB\nNode 1 FilePages:        1000000 kB\n\
                    Node 1 HugePages_Total:     0\n";
        let m = parse_meminfo(text, Some(1)).unwrap();
        assert_eq!(m.total_bytes, 16315912 * 1024);
        assert_eq!(m.free_bytes, 12000000 * 1024);
        assert_eq!(m.file_bytes, 1000000 * 1024);
        // Lines of another node are not ours.
        assert!(parse_meminfo(text, Some(0)).is_err());
    }

    #[test]
    fn refuses_malformed_meminfo() {
        assert_eq!(
            parse_meminfo("Node 0 MemTotal: 12 kB\n", Some(0)),
            Err(MeminfoError::Missing)
        );
        assert_eq!(
            parse_meminfo("Node 0 MemTotal: x kB\nNode 0 MemFree: 1 kB\n", Some(0))
                .unwrap_err()
                .to_string(),
            "MemTotal: not a number of kB: \"x kB\""
        );
        assert!(
            parse_meminfo(
                "Node 0 MemTotal: 99999999999999999999 kB\nNode 0 MemFree: 1 kB\n",
                Some(0)
            )
            .is_err()
        );
        assert_eq!(
            parse_meminfo(
                "Node 0 MemTotal: 18446744073709551615 kB\nNode 0 MemFree: 1 kB\n",
                Some(0)
            ),
            Err(MeminfoError::Overflow {
                key: "MemTotal".into(),
                kb: u64::MAX
            })
        );
    }
}
