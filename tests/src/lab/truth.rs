//! Ground-truth readers: what the kernel itself says, from /proc and /sys.
//!
//! The lab judges a balancer by these numbers, so what it measures the balancer by
//! (memory per node from `numa_maps`, the guest RAM mapping) is read here with our
//! own small parsers rather than through vmbalancer's host layer: a bug there must not
//! be able to hide itself. Formats with one well-tested reader are the exception:
//! per-thread `stat` (the `procfs` crate's parser through the balancer's reader),
//! thread lists and the kernel's list format (`0-3,8`) go through the balancer, so no
//! second hand parser of them is left to disagree. Every reader takes a root directory, so the parsers run
//! on captured fixture trees in tests.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// Errors reading ground truth.
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("parsing {what}: {detail}")]
    Parse { what: String, detail: String },
}

fn read(root: &Path, rel: &str) -> Result<String, TruthError> {
    let path = root.join(rel.trim_start_matches('/'));
    fs::read_to_string(&path).map_err(|source| TruthError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn parse_err(what: &str, detail: impl Into<String>) -> TruthError {
    TruthError::Parse {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Parses the kernel list format (`0-3,8,10-11`) with the balancer's one parser of it
/// ([`balancer::model::IdSet::parse_list`]), in ascending order.
pub fn parse_list(text: &str) -> Result<Vec<u32>, TruthError> {
    balancer::model::IdSet::parse_list(text)
        .map(|set| set.iter().collect())
        .map_err(|e| parse_err("cpu/node list", format!("{text:?}: {e}")))
}

/// One online NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u32,
    pub cpus: Vec<u32>,
    /// SLIT row: distance to every online node, in node order.
    pub distances: Vec<u32>,
}

/// Reads the online nodes, their CPUs and distances.
pub fn read_nodes(root: &Path) -> Result<Vec<NodeInfo>, TruthError> {
    let online = parse_list(&read(root, "sys/devices/system/node/online")?)?;
    let mut nodes = Vec::new();
    for id in online {
        let dir = format!("sys/devices/system/node/node{id}");
        let cpus = parse_list(&read(root, &format!("{dir}/cpulist"))?)?;
        let distances = read(root, &format!("{dir}/distance"))?
            .split_whitespace()
            .map(|d| d.parse().map_err(|_| parse_err("node distance", d)))
            .collect::<Result<_, _>>()?;
        nodes.push(NodeInfo {
            id,
            cpus,
            distances,
        });
    }
    Ok(nodes)
}

/// Maps a CPU number to the index (into `nodes`) of the node holding it.
pub fn cpu_to_node(nodes: &[NodeInfo]) -> BTreeMap<u32, usize> {
    let mut map = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for &c in &n.cpus {
            map.insert(c, i);
        }
    }
    map
}

/// Sums a `numa_maps` file into bytes per node (index = node id), honouring
/// `kernelpagesize_kB` (hugetlb mappings count 2 MiB pages).
pub fn numa_maps_bytes_per_node(text: &str, n_nodes: usize) -> Vec<u64> {
    lines_bytes_per_node(text.lines(), n_nodes)
}

fn lines_bytes_per_node<'a>(lines: impl Iterator<Item = &'a str>, n_nodes: usize) -> Vec<u64> {
    let mut out = vec![0u64; n_nodes];
    for line in lines {
        let page_kb = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kernelpagesize_kB="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(4);
        for word in line.split_whitespace() {
            let Some(rest) = word.strip_prefix('N') else {
                continue;
            };
            let Some((node, count)) = rest.split_once('=') else {
                continue;
            };
            if let (Ok(node), Ok(count)) = (node.parse::<usize>(), count.parse::<u64>())
                && node < n_nodes
            {
                out[node] += count * page_kb * 1024;
            }
        }
    }
    out
}

/// Whether a `numa_maps` line is the process's own memory: anonymous mappings (guest
/// RAM, heap, stacks), memfd and hugetlb (numa_maps names it `file=/anon_hugepage` or
/// by its hugetlbfs path, with the `huge` flag). Mappings of ordinary files (the
/// program, shared libraries) are left out: their pages are page cache shared with
/// every other process mapping the same file, which `move_pages` does not move for
/// one process and no balancer should.
fn is_private_memory(line: &str) -> bool {
    let mut words = line.split_whitespace().skip(2);
    match words.find_map(|w| w.strip_prefix("file=")) {
        None => true,
        Some(path) => path.starts_with("/memfd:") || line.split_whitespace().any(|w| w == "huge"),
    }
}

/// Like [`numa_maps_bytes_per_node`], counting only the process's own memory
/// ([`is_private_memory`]): what the lab calls a VM's memory.
pub fn numa_maps_private_bytes_per_node(text: &str, n_nodes: usize) -> Vec<u64> {
    lines_bytes_per_node(text.lines().filter(|l| is_private_memory(l)), n_nodes)
}

/// The fields of `/proc/PID/task/TID/stat` the lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStat {
    /// Field 39: the CPU the task last ran on.
    pub processor: u32,
    /// Fields 14 + 15: user + system time, in clock ticks.
    pub cpu_ticks: u64,
}

/// Parses a stat line with the balancer's one reader of `stat` (the `procfs` crate's
/// parser behind a framing check). The CPU last run on is required here: the lab places
/// threads by it.
pub fn parse_task_stat(text: &str) -> Result<TaskStat, TruthError> {
    let stat = balancer::host::linux::procfs::parse_stat(text).map_err(|w| parse_err("stat", w))?;
    Ok(TaskStat {
        processor: stat
            .processor
            .ok_or_else(|| parse_err("stat", format!("field 39 missing in {text:?}")))?,
        cpu_ticks: stat.cpu_ticks(),
    })
}

/// `/proc/vmstat` as a map.
pub fn parse_vmstat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

pub fn read_vmstat(root: &Path) -> Result<BTreeMap<String, u64>, TruthError> {
    Ok(parse_vmstat(&read(root, "proc/vmstat")?))
}

/// The vCPU threads of a qemu-like process: (tid, vCPU index) for every thread
/// named `CPU n/KVM` (or `CPU n/TCG` under emulation).
pub fn vcpu_threads(root: &Path, pid: u32) -> Result<Vec<(u32, u32)>, TruthError> {
    let proc = root.join("proc");
    let tids =
        balancer::host::linux::procfs::list_tasks(&proc, pid).map_err(|e| TruthError::Io {
            path: proc.join(format!("{pid}/task")).display().to_string(),
            source: io::Error::other(e.to_string()),
        })?;
    let mut out = Vec::new();
    for tid in tids {
        let Ok(comm) = balancer::host::linux::procfs::read_task_comm(&proc, pid, tid) else {
            continue; // the thread exited
        };
        if let Some(idx) = parse_vcpu_comm(&comm) {
            out.push((tid, idx));
        }
    }
    out.sort_by_key(|&(_, idx)| idx);
    Ok(out)
}

/// `CPU 3/KVM` (or `CPU 3/TCG`, qemu's name under emulation) -> 3.
pub fn parse_vcpu_comm(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    rest.strip_suffix("/KVM")
        .or_else(|| rest.strip_suffix("/TCG"))?
        .parse()
        .ok()
}

pub fn read_numa_maps(root: &Path, pid: u32) -> Result<String, TruthError> {
    read(root, &format!("proc/{pid}/numa_maps"))
}

/// The guest RAM mapping of a fake VM, chosen from `/proc/PID/maps` text: the
/// anonymous mapping (no path) exactly `configured_bytes` long, else the smallest
/// anonymous one at least that long (the kernel may have merged a neighbour).
/// Returns (start address, length in bytes).
pub fn guest_ram_mapping(maps: &str, configured_bytes: u64) -> Result<(u64, u64), TruthError> {
    let mut best: Option<(u64, u64)> = None;
    for line in maps.lines() {
        let mut words = line.split_whitespace();
        let (Some(range), Some(_perms), Some(_off), Some(_dev), Some(inode)) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            continue;
        };
        if inode != "0" || words.next().is_some() {
            continue; // file-backed or named ([heap], [stack], ...)
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let len = b.saturating_sub(a);
        if len == configured_bytes {
            return Ok((a, len));
        }
        if len > configured_bytes && best.is_none_or(|(_, l)| len < l) {
            best = Some((a, len));
        }
    }
    best.ok_or_else(|| {
        parse_err(
            "maps",
            format!("no anonymous mapping of at least {configured_bytes} bytes"),
        )
    })
}

/// Bytes per node (index = node id) of the one `numa_maps` line starting at `start`.
pub fn numa_maps_mapping_bytes_per_node(
    numa_maps: &str,
    start: u64,
    n_nodes: usize,
) -> Result<Vec<u64>, TruthError> {
    let line = numa_maps
        .lines()
        .find(|l| {
            l.split_whitespace()
                .next()
                .and_then(|a| u64::from_str_radix(a, 16).ok())
                == Some(start)
        })
        .ok_or_else(|| parse_err("numa_maps", format!("no line for mapping {start:#x}")))?;
    Ok(numa_maps_bytes_per_node(line, n_nodes))
}

/// A fake VM's guest RAM per node (index = node id), read from /proc/PID/maps and
/// /proc/PID/numa_maps: the ground truth for the mapping that backs `-m`.
pub fn read_guest_ram_bytes_per_node(
    root: &Path,
    pid: u32,
    configured_bytes: u64,
    n_nodes: usize,
) -> Result<Vec<u64>, TruthError> {
    let maps = read(root, &format!("proc/{pid}/maps"))?;
    let (start, _) = guest_ram_mapping(&maps, configured_bytes)?;
    numa_maps_mapping_bytes_per_node(&read_numa_maps(root, pid)?, start, n_nodes)
}

/// The `Cpus_allowed_list` value of a `/proc/PID/task/TID/status` text: the CPUs the
/// task may run on, as the kernel lists them (`0-3,6`).
pub fn parse_cpus_allowed(status: &str) -> Option<&str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
}

/// A task's allowed CPUs (see [`parse_cpus_allowed`]).
pub fn read_cpus_allowed(root: &Path, pid: u32, tid: u32) -> Result<String, TruthError> {
    let text = read(root, &format!("proc/{pid}/task/{tid}/status"))?;
    parse_cpus_allowed(&text)
        .map(str::to_string)
        .ok_or_else(|| parse_err("status", "no Cpus_allowed_list"))
}

pub fn read_task_stat(root: &Path, pid: u32, tid: u32) -> Result<TaskStat, TruthError> {
    parse_task_stat(&read(root, &format!("proc/{pid}/task/{tid}/stat"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(parse_list("0-2,5\n").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("x").is_err());
    }

    #[test]
    fn numa_maps_honours_page_size() {
        let text = "7f00 default anon=10 dirty=10 N0=6 N2=4 kernelpagesize_kB=4\n\
                    7f80 default file=/anon_hugepage\\040(deleted) huge dirty=3 N1=3 kernelpagesize_kB=2048\n\
                    5600 default file=/usr/bin/x mapped=2 N3=2 kernelpagesize_kB=4\n";
        let b = numa_maps_bytes_per_node(text, 4);
        assert_eq!(b, vec![6 * 4096, 3 * 2048 * 1024, 4 * 4096, 2 * 4096]);
    }

    #[test]
    fn private_memory_leaves_out_shared_files() {
        let text = "7f00 default anon=10 dirty=10 N0=6 N2=4 kernelpagesize_kB=4\n\
                    7f80 default file=/anon_hugepage\\040(deleted) huge dirty=3 N1=3 kernelpagesize_kB=2048\n\
                    5600 default file=/usr/bin/x mapped=2 mapmax=8 N3=2 kernelpagesize_kB=4\n\
                    5700 default heap anon=1 dirty=1 N3=1 kernelpagesize_kB=4\n\
                    7e00 default file=/memfd:ram\\040(deleted) dirty=2 N3=2 kernelpagesize_kB=4\n";
        let b = numa_maps_private_bytes_per_node(text, 4);
        assert_eq!(b, vec![6 * 4096, 3 * 2048 * 1024, 4 * 4096, 3 * 4096]);
    }

    #[test]
    fn stat_with_odd_comm() {
        let mut line = String::from("42 (CPU 1/KVM) (x) S");
        // fields 4..=38 then processor (39)
        for f in 4..=52 {
            let v = match f {
                14 => 100,
                15 => 23,
                39 => 5,
                _ => 0,
            };
            line.push_str(&format!(" {v}"));
        }
        let s = parse_task_stat(&line).unwrap();
        assert_eq!(s.processor, 5);
        assert_eq!(s.cpu_ticks, 123);
        assert!(parse_task_stat("42 (x) S 1").is_err());
    }

    #[test]
    fn guest_ram_is_the_configured_anonymous_mapping() {
        let maps = "55d0-55e0 r-xp 00000000 00:10 42   /usr/bin/qemu-kvm\n\
                    7f0000000-7f8000000 rw-p 00000000 00:00 0 \n\
                    7f8000000-7f8200000 rw-p 00000000 00:00 0 \n\
                    7ffd000-7ffe000 rw-p 00000000 00:00 0   [stack]\n";
        assert_eq!(
            guest_ram_mapping(maps, 0x8000000).unwrap(),
            (0x7f0000000, 0x8000000)
        );
        // Merged with a neighbour: the smallest mapping that holds it.
        assert_eq!(
            guest_ram_mapping(maps, 0x100000).unwrap(),
            (0x7f8000000, 0x200000)
        );
        assert!(guest_ram_mapping(maps, 0x10000000).is_err());
        let numa = "7f0000000 default anon=3 dirty=3 N0=1 N3=2 kernelpagesize_kB=4\n\
                    7f8000000 default anon=9 N1=9 kernelpagesize_kB=4\n";
        assert_eq!(
            numa_maps_mapping_bytes_per_node(numa, 0x7f0000000, 4).unwrap(),
            vec![4096, 0, 0, 8192]
        );
        assert!(numa_maps_mapping_bytes_per_node(numa, 0x1000, 4).is_err());
    }

    #[test]
    fn allowed_cpus() {
        let status = "Name:\tCPU 0/KVM\nCpus_allowed:\tf\nCpus_allowed_list:\t0-1,3\nMems_allowed_list:\t0-3\n";
        assert_eq!(parse_cpus_allowed(status), Some("0-1,3"));
        assert_eq!(parse_cpus_allowed("Name:\tx\n"), None);
    }

    #[test]
    fn vcpu_names() {
        assert_eq!(parse_vcpu_comm("CPU 12/KVM"), Some(12));
        assert_eq!(parse_vcpu_comm("CPU 1/TCG"), Some(1));
        assert_eq!(parse_vcpu_comm("CPU 1/XYZ"), None);
        assert_eq!(parse_vcpu_comm("IO mon_iothread"), None);
    }

    #[test]
    fn vmstat() {
        let m = parse_vmstat("numa_pages_migrated 12\npgmigrate_success 30\n");
        assert_eq!(m["numa_pages_migrated"], 12);
        assert_eq!(m["pgmigrate_success"], 30);
    }
}
