//! Ground-truth readers: what the kernel itself says, from /proc and /sys.
//!
//! The lab judges a balancer by these numbers. Every kernel format is parsed by the
//! balancer's one parser of it (`numa_maps` and `maps`, per-thread `stat` through the
//! `procfs` crate, thread lists, the kernel's list format `0-3,8`), so no second hand
//! parser is left to disagree with it; those parsers are fuzzed and tested on captured
//! trees. What stays the lab's own is the judgement: which mapping is guest RAM, which
//! memory is the process's own, which node a VM's vCPUs ran on. The numbers it judges
//! by come from the kernel's own accounting, not from anything vmbalancer computes or
//! reports. Every reader takes a root directory, so the readers run on captured
//! fixture trees in tests.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use balancer::host::linux::numa_maps::{self, MappingKind, NumaMapping};
use balancer::model::CpuSet;

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

fn parse_err(what: &str, detail: impl std::fmt::Display) -> TruthError {
    TruthError::Parse {
        what: what.into(),
        detail: detail.to_string(),
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

/// The node (index into the online nodes) of each physical frame, from the memory
/// blocks sysfs lists under each node. The per-page query (move_pages(2) without
/// targets) reports no node for some mapped pages (under autoNUMA, a third of a
/// VM's guest RAM: tests/results/lab-demo.md); their frame numbers, from
/// `/proc/PID/pagemap`, still tell where they are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameNodes {
    /// (first frame, end frame, node index), sorted by first frame.
    ranges: Vec<(u64, u64, usize)>,
}

impl FrameNodes {
    /// From the memory block size and the blocks of each node (node index, block
    /// number).
    pub fn from_blocks(block_bytes: u64, blocks: &[(usize, u64)]) -> Self {
        let frames = (block_bytes / 4096).max(1);
        let mut ranges: Vec<(u64, u64, usize)> = blocks
            .iter()
            .map(|&(node, b)| (b * frames, (b + 1) * frames, node))
            .collect();
        ranges.sort_unstable();
        Self { ranges }
    }

    /// Reads `sys/devices/system/memory/block_size_bytes` and the `memoryN` entries of
    /// every online node in `nodes`.
    pub fn read(root: &Path, nodes: &[NodeInfo]) -> Result<Self, TruthError> {
        let size = read(root, "sys/devices/system/memory/block_size_bytes")?;
        let block_bytes = u64::from_str_radix(size.trim(), 16)
            .map_err(|_| parse_err("memory block size", size.trim()))?;
        let mut blocks = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let dir = root.join(format!("sys/devices/system/node/node{}", n.id));
            let entries = fs::read_dir(&dir).map_err(|source| TruthError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            for e in entries.flatten() {
                let name = e.file_name();
                if let Some(b) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("memory"))
                    .and_then(|b| b.parse::<u64>().ok())
                {
                    blocks.push((i, b));
                }
            }
        }
        Ok(Self::from_blocks(block_bytes, &blocks))
    }

    /// The node index of frame `pfn`, if a listed block holds it.
    pub fn node_of(&self, pfn: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.0 <= pfn).checked_sub(1)?;
        let (first, end, node) = self.ranges[i];
        (first..end).contains(&pfn).then_some(node)
    }
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

/// Parses a `numa_maps` text with the balancer's one parser of it; a bad line is an
/// error here too (a half-read file would under-count a VM).
fn parse_numa_maps(text: &str) -> Result<Vec<NumaMapping>, TruthError> {
    numa_maps::parse_numa_maps(text).map_err(|e| parse_err("numa_maps", e))
}

/// Adds a mapping's resident bytes per node into `out` (index = node id; nodes past
/// `out` are not the lab's and are left out).
fn add_bytes(out: &mut [u64], m: &NumaMapping) -> Result<(), TruthError> {
    let per_node = m.bytes_per_node().map_err(|e| parse_err("numa_maps", e))?;
    for (node, bytes) in per_node {
        if let Some(sum) = out.get_mut(node as usize) {
            *sum += bytes;
        }
    }
    Ok(())
}

fn sum_bytes_per_node<'a>(
    mappings: impl Iterator<Item = &'a NumaMapping>,
    n_nodes: usize,
) -> Result<Vec<u64>, TruthError> {
    let mut out = vec![0u64; n_nodes];
    for m in mappings {
        add_bytes(&mut out, m)?;
    }
    Ok(out)
}

/// Sums a `numa_maps` file into bytes per node (index = node id), honouring
/// each line's `kernelpagesize_kB` (a hugetlb mapping counts pages of its own
/// size: 2048 or 1048576 kB on x86).
pub fn numa_maps_bytes_per_node(text: &str, n_nodes: usize) -> Result<Vec<u64>, TruthError> {
    sum_bytes_per_node(parse_numa_maps(text)?.iter(), n_nodes)
}

/// Whether a mapping is the process's own memory: anonymous mappings (guest RAM,
/// heap, stacks), memfd and hugetlb (numa_maps names it `file=/anon_hugepage` or by
/// its hugetlbfs path, with the `huge` flag). Mappings of ordinary files (the program,
/// shared libraries) are left out: their pages are page cache shared with every other
/// process mapping the same file, which `move_pages` does not move for one process and
/// no balancer should.
fn is_private_memory(m: &NumaMapping) -> bool {
    !matches!(m.kind, MappingKind::File(_)) || m.is_memfd() || m.huge
}

/// Like [`numa_maps_bytes_per_node`], counting only the process's own memory
/// ([`is_private_memory`]): what the lab calls a VM's memory.
pub fn numa_maps_private_bytes_per_node(
    text: &str,
    n_nodes: usize,
) -> Result<Vec<u64>, TruthError> {
    let mappings = parse_numa_maps(text)?;
    sum_bytes_per_node(mappings.iter().filter(|m| is_private_memory(m)), n_nodes)
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

/// Where a fake VM whose threads are not named lists its vCPU threads (`tid index`
/// lines), so the lab's ground truth never depends on what vmbalancer has to find
/// out by itself (the QMP monitor).
pub fn vcpu_list_path(root: &Path, pid: u32) -> std::path::PathBuf {
    root.join(format!("run/lab/vcpus/{pid}"))
}

/// The vCPU threads of a qemu-like process: (tid, vCPU index) for every thread
/// named `CPU n/KVM` (or `CPU n/TCG` under emulation); for a fake VM without named
/// threads, the list it wrote at [`vcpu_list_path`].
pub fn vcpu_threads(root: &Path, pid: u32) -> Result<Vec<(u32, u32)>, TruthError> {
    let named = named_vcpu_threads(root, pid)?;
    if !named.is_empty() {
        return Ok(named);
    }
    let Ok(list) = fs::read_to_string(vcpu_list_path(root, pid)) else {
        return Ok(named);
    };
    let mut out: Vec<(u32, u32)> = list
        .lines()
        .filter_map(|l| {
            let (tid, idx) = l.split_once(' ')?;
            Some((tid.trim().parse().ok()?, idx.trim().parse().ok()?))
        })
        .collect();
    out.sort_by_key(|&(_, idx)| idx);
    Ok(out)
}

fn named_vcpu_threads(root: &Path, pid: u32) -> Result<Vec<(u32, u32)>, TruthError> {
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

/// Whether a `/proc/PID/maps` path is hugetlbfs memory: `MAP_HUGETLB` mappings show
/// as `/anon_hugepage`, and qemu's `memory-backend-file` on a hugetlbfs mount (libvirt's
/// `<hugepages/>`: `/dev/hugepages/libvirt/qemu/...`, where systemd mounts it) maps an
/// unlinked file under a `hugepages` directory.
fn is_hugetlb_path(path: &str) -> bool {
    path.starts_with("/anon_hugepage") || path.contains("/hugepages")
}

/// The mappings of a `/proc/PID/maps` text that may be guest RAM: anonymous (no
/// path) or hugetlbfs ([`is_hugetlb_path`]), as (start address, length in bytes).
fn ram_candidates(maps: &str) -> Result<Vec<(u64, u64)>, TruthError> {
    let entries = numa_maps::parse_maps(maps).map_err(|e| parse_err("maps", e))?;
    Ok(entries
        .iter()
        .filter(|e| e.path.is_empty() || is_hugetlb_path(&e.path))
        .map(|e| (e.start_addr, e.len_bytes()))
        .collect())
}

/// The start addresses of every mapping that may be guest RAM ([`ram_candidates`])
/// exactly `bytes` long: the candidates for a guest cell's backend, which only their
/// content tells apart.
pub fn ram_mappings_of(maps: &str, bytes: u64) -> Result<Vec<u64>, TruthError> {
    Ok(ram_candidates(maps)?
        .into_iter()
        .filter(|&(_, len)| len == bytes)
        .map(|(start, _)| start)
        .collect())
}

/// The guest RAM mapping of a VM, chosen from `/proc/PID/maps` text: the anonymous
/// (no path) or hugetlbfs ([`is_hugetlb_path`]) mapping exactly `configured_bytes`
/// long, else the smallest such one at least that long (the kernel may have merged a
/// neighbour). Returns (start address, length in bytes).
pub fn guest_ram_mapping(maps: &str, configured_bytes: u64) -> Result<(u64, u64), TruthError> {
    let mut best: Option<(u64, u64)> = None;
    for (start, len) in ram_candidates(maps)? {
        if len == configured_bytes {
            return Ok((start, len));
        }
        if len > configured_bytes && best.is_none_or(|(_, l)| len < l) {
            best = Some((start, len));
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
    let mappings = parse_numa_maps(numa_maps)?;
    let m = mappings
        .iter()
        .find(|m| m.start_addr == start)
        .ok_or_else(|| parse_err("numa_maps", format!("no line for mapping {start:#x}")))?;
    sum_bytes_per_node(std::iter::once(m), n_nodes)
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

/// A task's allowed CPUs (`Cpus_allowed_list` of `/proc/PID/task/TID/status`), read
/// with the balancer's one parser of that file.
pub fn read_cpus_allowed(root: &Path, pid: u32, tid: u32) -> Result<CpuSet, TruthError> {
    let text = read(root, &format!("proc/{pid}/task/{tid}/status"))?;
    balancer::host::linux::procfs::parse_status(&text)
        .map(|s| s.cpus_allowed)
        .map_err(|e| parse_err("status", e))
}

pub fn read_task_stat(root: &Path, pid: u32, tid: u32) -> Result<TaskStat, TruthError> {
    parse_task_stat(&read(root, &format!("proc/{pid}/task/{tid}/stat"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_placed_by_their_memory_block() {
        // 128 MiB blocks: 32768 frames each. Node 1 holds blocks 2 and 3.
        let f = FrameNodes::from_blocks(128 << 20, &[(1, 3), (0, 0), (0, 1), (1, 2)]);
        assert_eq!(f.node_of(0), Some(0));
        assert_eq!(f.node_of(2 * 32768 - 1), Some(0));
        assert_eq!(f.node_of(2 * 32768), Some(1));
        assert_eq!(f.node_of(4 * 32768 - 1), Some(1));
        assert_eq!(f.node_of(4 * 32768), None, "past the last block");
        assert_eq!(FrameNodes::default().node_of(5), None);
    }

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
        let b = numa_maps_bytes_per_node(text, 4).unwrap();
        assert_eq!(b, vec![6 * 4096, 3 * 2048 * 1024, 4 * 4096, 2 * 4096]);
        // 1 GiB hugetlb pages, as MAP_HUGETLB | MAP_HUGE_1GB maps them.
        let gib = "7f40000000 default file=/anon_hugepage\\040(deleted) huge dirty=2 N1=1 N3=1 kernelpagesize_kB=1048576\n";
        let b = numa_maps_private_bytes_per_node(gib, 4).unwrap();
        assert_eq!(b, vec![0, 1 << 30, 0, 1 << 30]);
    }

    #[test]
    fn private_memory_leaves_out_shared_files() {
        let text = "7f00 default anon=10 dirty=10 N0=6 N2=4 kernelpagesize_kB=4\n\
                    7f80 default file=/anon_hugepage\\040(deleted) huge dirty=3 N1=3 kernelpagesize_kB=2048\n\
                    5600 default file=/usr/bin/x mapped=2 mapmax=8 N3=2 kernelpagesize_kB=4\n\
                    5700 default heap anon=1 dirty=1 N3=1 kernelpagesize_kB=4\n\
                    7e00 default file=/memfd:ram\\040(deleted) dirty=2 N3=2 kernelpagesize_kB=4\n";
        let b = numa_maps_private_bytes_per_node(text, 4).unwrap();
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
        // hugetlbfs: libvirt's <hugepages/> backing file and MAP_HUGETLB.
        let huge = "7f0000000-7f8000000 rw-s 00000000 00:2f 1234   /dev/hugepages/libvirt/qemu/1-vm1/qemu_back_mem.pc.ram.Xa3 (deleted)\n\
                    7f8000000-7fa000000 rw-s 00000000 00:0f 99   /anon_hugepage (deleted)\n\
                    7fa000000-7fc000000 r--s 00000000 08:01 77   /usr/lib/big.so\n";
        assert_eq!(
            guest_ram_mapping(huge, 0x8000000).unwrap(),
            (0x7f0000000, 0x8000000)
        );
        assert_eq!(
            guest_ram_mapping(huge, 0x2000000).unwrap(),
            (0x7f8000000, 0x2000000)
        );
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
        let root = std::env::temp_dir().join(format!("vmb-truth-{}", std::process::id()));
        let task = root.join("proc/7/task/8");
        fs::create_dir_all(&task).unwrap();
        fs::write(
            task.join("status"),
            "Name:\tCPU 0/KVM\nTgid:\t7\nCpus_allowed:\tf\nCpus_allowed_list:\t0-1,3\n",
        )
        .unwrap();
        let cpus = read_cpus_allowed(&root, 7, 8).unwrap();
        assert_eq!(cpus.to_string(), "0-1,3");
        fs::write(task.join("status"), "Name:\tx\nTgid:\t7\n").unwrap();
        assert!(read_cpus_allowed(&root, 7, 8).is_err());
        fs::remove_dir_all(&root).unwrap();
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
