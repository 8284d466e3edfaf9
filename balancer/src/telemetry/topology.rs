//! The CPU -> NUMA node table the programs use to tell a cross-node migration from a
//! local one, read from sysfs (`devices/system/node/node*/cpulist`) under a root
//! directory so tests can use fixture trees.

use std::path::Path;

use super::TelemetryError;
use crate::model::IdSet;

/// `(cpu, node)` for every CPU sysfs lists under a node, sorted by CPU. A kernel without
/// NUMA support has no `node/` directory: every possible CPU is then on node 0.
pub fn cpu_nodes(sys_root: &Path) -> Result<Vec<(u32, u32)>, TelemetryError> {
    let node_dir = sys_root.join("devices/system/node");
    let mut out = Vec::new();
    if node_dir.is_dir() {
        let entries = std::fs::read_dir(&node_dir)
            .map_err(|e| TelemetryError::io(format!("reading {}", node_dir.display()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| TelemetryError::io(format!("reading {}", node_dir.display()), e))?;
            let name = entry.file_name();
            let Some(node) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpus = read_list(&entry.path().join("cpulist"))?;
            out.extend(cpus.iter().map(|cpu| (cpu, node)));
        }
    } else {
        let possible = read_list(&sys_root.join("devices/system/cpu/possible"))?;
        out.extend(possible.iter().map(|cpu| (cpu, 0)));
    }
    out.sort_unstable();
    Ok(out)
}

fn read_list(path: &Path) -> Result<IdSet, TelemetryError> {
    let text = std::fs::read_to_string(path).map_err(|e| TelemetryError::Topology {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    IdSet::parse_list(text.trim()).map_err(|e| TelemetryError::Topology {
        path: path.to_owned(),
        reason: e.to_string(),
    })
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
        write(&root, "devices/system/node/node0/cpulist", "zero\n");
        assert!(matches!(
            cpu_nodes(&root),
            Err(TelemetryError::Topology { .. })
        ));
        std::fs::remove_dir_all(root).unwrap();
    }
}
