//! The CPU -> NUMA node table the programs use to tell a cross-node migration from a
//! local one. The node CPU lists come from the host layer's one reader of sysfs
//! (`devices/system/node/{online,nodeN/cpulist}`, [`read_node_cpus`]) under a root
//! directory, so tests can use fixture trees.

use std::path::Path;

use super::TelemetryError;
use crate::host::linux::HostError;
use crate::host::linux::topology::read_node_cpus;

/// `(cpu, node)` for every CPU sysfs lists under an online node (offline CPUs
/// included: a CPU brought online later is already in the table), sorted by CPU. A
/// kernel without NUMA support has no `node/` directory: every possible CPU is then on
/// node 0.
pub fn cpu_nodes(sys_root: &Path) -> Result<Vec<(u32, u32)>, TelemetryError> {
    let topology_error = |e: HostError| TelemetryError::Topology {
        path: sys_root.join("devices/system/node"),
        reason: e.to_string(),
    };
    let mut out: Vec<(u32, u32)> = match read_node_cpus(sys_root).map_err(topology_error)? {
        Some(nodes) => nodes
            .iter()
            .flat_map(|(node, cpus)| cpus.iter().map(move |cpu| (cpu, *node)))
            .collect(),
        None => {
            let path = sys_root.join("devices/system/cpu/possible");
            let possible = crate::host::linux::read_idset(&path).map_err(topology_error)?;
            possible.iter().map(|cpu| (cpu, 0)).collect()
        }
    };
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("vmbalancer-topology-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn four_nodes_from_sysfs() {
        let root = tempdir("four");
        for (n, list) in ["0-1,8", "2-3", "4-5", "6-7"].iter().enumerate() {
            write(
                &root,
                &format!("devices/system/node/node{n}/cpulist"),
                &format!("{list}\n"),
            );
        }
        write(&root, "devices/system/node/online", "0-3\n");
        let t = cpu_nodes(&root).unwrap();
        assert_eq!(t.len(), 9);
        assert_eq!(t[0], (0, 0));
        assert_eq!(t[3], (3, 1));
        assert_eq!(t[8], (8, 0));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_numa_means_node_zero() {
        let root = tempdir("flat");
        write(&root, "devices/system/cpu/possible", "0-3\n");
        assert_eq!(
            cpu_nodes(&root).unwrap(),
            vec![(0, 0), (1, 0), (2, 0), (3, 0)]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_list_is_an_error() {
        let root = tempdir("bad");
        write(&root, "devices/system/node/online", "0\n");
        write(&root, "devices/system/node/node0/cpulist", "zero\n");
        assert!(matches!(
            cpu_nodes(&root),
            Err(TelemetryError::Topology { .. })
        ));
        std::fs::remove_dir_all(root).unwrap();
    }
}
