//! Which guest RAM a VM writes, from the kernel's soft-dirty bits, for VMs whose
//! memory is away from their vCPUs.
//!
//! Why: hot-first migration needs to know the hot regions of memory that is already
//! resident. Page faults (eBPF) only show memory being touched for the first time,
//! and NUMA hinting faults exist only while the kernel's own balancing runs. The
//! soft-dirty bit works on any kernel with `CONFIG_MEM_SOFT_DIRTY`: writing `4` to
//! `/proc/PID/clear_refs` clears it for the whole process, and `/proc/PID/pagemap`
//! (bit 55) then shows which pages were written since. Each 2 MiB region's count of
//! written pages is its heat.
//!
//! Cost and scope: clearing write-protects the VM's pages, so its next write to each
//! page takes a minor fault. That is paid only by VMs with at least
//! [`REMOTE_SHARE`] of their guest RAM off the nodes their vCPUs run on (those whose
//! memory may move), once per [`SAMPLE_NS`]. Pages only read are not seen.
//!
//! Limit: with transparent huge pages one write marks the whole 2 MiB region, so a
//! region written even a few times per sample looks as hot as one written all the
//! time. Heat then tells written from untouched regions, not hot from warm (in the
//! lab's `burst-lasting`, every region of the VM looked written).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::model::{HotRegion, NodeId, Snapshot, Vm};

/// A VM is sampled while at least this share of its guest RAM is off its vCPUs' nodes.
pub const REMOTE_SHARE: f64 = 0.05;
/// Time between clearing the bits and reading them (and between two samples).
pub const SAMPLE_NS: u64 = 2_000_000_000;
/// Region size heat is counted in (the huge page size).
pub const REGION_BYTES: u64 = 2 << 20;
const PAGE_BYTES: u64 = 4096;
const SOFT_DIRTY_BIT: u64 = 1 << 55;

/// Per-VM sampling state.
#[derive(Debug, Default)]
struct VmState {
    /// When the bits were last cleared.
    cleared_ns: u64,
    /// Regions found written in the last completed sample.
    regions: Vec<(u64, f64)>,
}

/// Soft-dirty sampling of the VMs that need it.
#[derive(Debug)]
pub struct WriteHeat {
    proc_root: PathBuf,
    vms: BTreeMap<u32, VmState>,
    /// Set once clearing failed (no soft-dirty support): stop trying.
    unsupported: bool,
}

impl WriteHeat {
    pub fn new(proc_root: &Path) -> Self {
        let supported = soft_dirty_works();
        if !supported {
            tracing::info!(
                "soft-dirty bits unsupported by this kernel: no write heat for resident memory"
            );
        }
        Self {
            proc_root: proc_root.to_path_buf(),
            vms: BTreeMap::new(),
            unsupported: !supported,
        }
    }

    /// Updates the samples and adds the written regions to VMs that have no hot
    /// regions from other sources. `node_of` tells a region's node (one page queried).
    pub fn fill(&mut self, snapshot: &mut Snapshot, node_of: impl Fn(u32, u64) -> Option<NodeId>) {
        self.vms
            .retain(|pid, _| snapshot.vms.iter().any(|v| v.pid == *pid));
        if self.unsupported {
            return;
        }
        let now = snapshot.now_ns;
        let topology = &snapshot.topology;
        for vm in &mut snapshot.vms {
            if remote_share(vm, topology) < REMOTE_SHARE || vm.memory.guest_ranges.is_empty() {
                self.vms.remove(&vm.pid);
                continue;
            }
            let state = self.vms.entry(vm.pid).or_default();
            if state.cleared_ns == 0 || now.saturating_sub(state.cleared_ns) >= SAMPLE_NS {
                if state.cleared_ns != 0 {
                    match written_regions(&self.proc_root, vm.pid, &vm.memory.guest_ranges) {
                        Ok(r) => state.regions = r,
                        Err(e) => tracing::debug!(vm = vm.pid, error = %e, "pagemap not readable"),
                    }
                }
                match std::fs::write(self.proc_root.join(format!("{}/clear_refs", vm.pid)), "4") {
                    Ok(()) => state.cleared_ns = now.max(1),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::info!(
                            "soft-dirty bits unsupported: no write heat for resident memory"
                        );
                        self.unsupported = true;
                        return;
                    }
                    Err(e) => tracing::debug!(vm = vm.pid, error = %e, "clear_refs not writable"),
                }
            }
            if vm.hot_regions.is_empty() && !state.regions.is_empty() {
                vm.hot_regions = state
                    .regions
                    .iter()
                    .filter_map(|&(start, heat)| {
                        Some(HotRegion {
                            start_addr: start,
                            len_bytes: REGION_BYTES,
                            node: node_of(vm.pid, start)?,
                            heat,
                        })
                    })
                    .collect();
                vm.hot_regions.sort_by(|a, b| {
                    b.heat
                        .total_cmp(&a.heat)
                        .then(a.start_addr.cmp(&b.start_addr))
                });
            }
        }
    }
}

/// Whether the running kernel tracks soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`): a
/// kernel without it accepts the clear but never sets the bit. Tried on a page of
/// this process.
pub fn soft_dirty_works() -> bool {
    let mut page = vec![0u8; 2 * PAGE_BYTES as usize];
    let addr = (page.as_ptr() as u64).div_ceil(PAGE_BYTES) * PAGE_BYTES;
    let off = (addr - page.as_ptr() as u64) as usize;
    page[off] = 1;
    if std::fs::write("/proc/self/clear_refs", "4").is_err() {
        return false;
    }
    // SAFETY: `off` is inside `page`; volatile so the write after the clear happens.
    unsafe { std::ptr::write_volatile(page.as_mut_ptr().add(off), 2) };
    let Ok(file) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut e = [0u8; 8];
    let ok = file.read_exact_at(&mut e, addr / PAGE_BYTES * 8).is_ok()
        && u64::from_le_bytes(e) & SOFT_DIRTY_BIT != 0;
    std::hint::black_box(&page);
    ok
}

/// Share of the VM's guest RAM not on the nodes its vCPUs last ran on.
fn remote_share(vm: &Vm, topology: &crate::model::Topology) -> f64 {
    let total: u64 = vm.memory.bytes_per_node.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mut local = vec![false; vm.memory.bytes_per_node.len()];
    for v in &vm.vcpus {
        if let Some(i) = v
            .last_cpu
            .and_then(|c| topology.node_of_cpu(c))
            .and_then(|n| topology.node_index(n))
            && let Some(l) = local.get_mut(i)
        {
            *l = true;
        }
    }
    let near: u64 = vm
        .memory
        .bytes_per_node
        .iter()
        .zip(&local)
        .filter(|(_, l)| **l)
        .map(|(b, _)| *b)
        .sum();
    1.0 - near as f64 / total as f64
}

/// Regions of `ranges` with pages written since the last clear, and how many.
fn written_regions(
    proc_root: &Path,
    pid: u32,
    ranges: &[(u64, u64)],
) -> std::io::Result<Vec<(u64, f64)>> {
    let file = File::open(proc_root.join(format!("{pid}/pagemap")))?;
    let mut out = Vec::new();
    for &(start, len) in ranges {
        let mut region = start / REGION_BYTES * REGION_BYTES;
        let end = start.saturating_add(len);
        let mut buf = vec![0u8; (REGION_BYTES / PAGE_BYTES * 8) as usize];
        while region < end {
            let first = region.max(start);
            let last = (region + REGION_BYTES).min(end);
            let pages = ((last - first) / PAGE_BYTES) as usize;
            let bytes = &mut buf[..pages * 8];
            file.read_exact_at(bytes, first / PAGE_BYTES * 8)?;
            let written = bytes
                .chunks_exact(8)
                .filter(|e| {
                    u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])
                        & SOFT_DIRTY_BIT
                        != 0
                })
                .count();
            if written > 0 {
                out.push((region.max(start), written as f64));
            }
            region += REGION_BYTES;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_region_this_process_wrote() {
        // Two 2 MiB-aligned regions; write only into the second after clearing.
        let len = 4 * REGION_BYTES as usize;
        let mut buf = vec![0u8; len];
        let base = (buf.as_mut_ptr() as u64).div_ceil(REGION_BYTES) * REGION_BYTES;
        let off = (base - buf.as_ptr() as u64) as usize;
        for i in (0..len).step_by(4096) {
            buf[i] = 1;
        }
        let me = std::process::id();
        if !soft_dirty_works() {
            eprintln!("soft-dirty bits unsupported by this kernel: nothing to check");
            return;
        }
        std::fs::write(format!("/proc/{me}/clear_refs"), "4").unwrap();
        for i in (off + REGION_BYTES as usize..off + 2 * REGION_BYTES as usize).step_by(4096) {
            // SAFETY: i < len; volatile so each write really happens after the clear.
            unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 2) };
        }
        let r = written_regions(Path::new("/proc"), me, &[(base, 2 * REGION_BYTES)]).unwrap();
        assert!(
            r.iter()
                .any(|&(s, n)| s == base + REGION_BYTES && n >= 500.0),
            "{r:?}"
        );
        assert!(!r.iter().any(|&(s, n)| s == base && n > 16.0), "{r:?}");
        std::hint::black_box(&buf);
    }
}
