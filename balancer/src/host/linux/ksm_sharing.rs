//! Which VMs share KSM pages with which, and about how many, from the page tables.
//!
//! Why: with `merge_across_nodes=0` the engine keeps VMs that share merged pages on
//! one node (`Vm::ksm_shared_pages`): a VM moved away from its partners leaves the
//! merged pages behind (a page mapped by several processes is not moved by
//! `move_pages`/`migrate_pages` without `MPOL_MF_MOVE_ALL`) and they turn remote.
//! The kernel counts merging per host (`/sys/kernel/mm/ksm/pages_sharing`) and per
//! process (`/proc/PID/ksm_merging_pages`, or `ksm_stat`, kernel 6.1 on), but never
//! says *with whom* a process shares. The page tables do: two VMs share a KSM page
//! when both map the same physical frame and `/proc/kpageflags` marks that frame
//! `KPF_KSM` (bit 21). `/proc/PID/pagemap` gives each guest page's frame number
//! (root only: without `CAP_SYS_ADMIN` the frame numbers read as 0).
//!
//! Cost: this is a slow, sampled reading, never on every tick. A round runs at most
//! every [`ROUND_EVERY_NS`], only while KSM runs and `pages_sharing > 0`, and only
//! for VMs with merged pages (when the kernel says how many; an older kernel without
//! the per-process counter gets all VMs read). Per VM and round at most
//! [`MAX_PAGES_PER_ROUND`] guest pages are read (2 MiB of pagemap, one read per
//! 2 MiB of guest RAM); a bigger VM is covered over several rounds from where the
//! last stopped. Only pages mapped by more than one process (pagemap's "exclusively
//! mapped" bit clear) can be KSM pages shared between VMs; of those, only frames in
//! a fixed pseudo-random 1 in [`FRAME_SAMPLE_EVERY`] (chosen by frame number, so the
//! same frames are sampled in every VM) have their flags read, one 8-byte read
//! each. Shared pages are counted on that sample and scaled back up.
//!
//! The bits are decoded by the `procfs` crate (`PageInfo`, `PhysicalPageFlags`).
//! Its readers (`Process::pagemap`, `KPageFlags`) are not used: they read through a
//! buffered reader one entry at a time, so each sparse frame look-up refills an
//! 8 KiB buffer and makes the kernel compute a thousand entries for one. Here the
//! pagemap is read in 2 MiB-of-guest runs and kpageflags one entry per sampled
//! frame, with positioned reads.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ::procfs::PhysicalPageFlags;
use ::procfs::process::{MemoryPageFlags, PageInfo};

use crate::model::{Snapshot, VmId};

/// Shortest time between two rounds: KSM itself merges slowly (its default scan
/// rate is 100 pages every 20 ms), so who shares with whom changes over minutes.
pub const ROUND_EVERY_NS: u64 = 30_000_000_000;
/// Most guest pages of one VM read in a round (1 GiB of guest RAM).
pub const MAX_PAGES_PER_ROUND: u64 = 262_144;
/// One frame in this many has its flags read (chosen by frame number).
pub const FRAME_SAMPLE_EVERY: u64 = 8;
/// Pagemap entries read at once (2 MiB of guest RAM).
const RUN_PAGES: u64 = 512;
const PAGE_BYTES: u64 = 4096;

/// What went wrong reading the page tables of one VM or the frame flags.
#[derive(Debug, thiserror::Error)]
pub enum KsmSharingError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: ends before {what} (at byte {offset})")]
    Short {
        path: PathBuf,
        what: String,
        offset: u64,
    },
    #[error("{path}: {what}")]
    Parse { path: PathBuf, what: String },
}

impl KsmSharingError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Positioned read of `buf.len()` bytes at `offset`; a file that ends first is a
/// [`KsmSharingError::Short`] naming `what` was wanted.
fn read_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<(), KsmSharingError> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(KsmSharingError::Short {
            path: path.to_path_buf(),
            what: what(),
            offset,
        }),
        Err(e) => Err(KsmSharingError::io(path, e)),
    }
}

/// The pages of a process KSM merged: `/proc/PID/ksm_merging_pages`, else the
/// `ksm_merging_pages` line of `/proc/PID/ksm_stat`. `Ok(None)` when the kernel has
/// neither (the count is unknown, not zero).
pub fn read_merging_pages(proc_root: &Path, pid: u32) -> Result<Option<u64>, KsmSharingError> {
    let dir = proc_root.join(pid.to_string());
    let parse = |path: &Path, text: &str| {
        text.trim()
            .parse::<u64>()
            .map_err(|_| KsmSharingError::Parse {
                path: path.to_path_buf(),
                what: format!("not a page count: {:?}", text.trim()),
            })
    };
    let single = dir.join("ksm_merging_pages");
    match std::fs::read_to_string(&single) {
        Ok(text) => return parse(&single, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KsmSharingError::io(&single, e)),
    }
    let stat = dir.join("ksm_stat");
    let text = match std::fs::read_to_string(&stat) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KsmSharingError::io(&stat, e)),
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ksm_merging_pages") {
            return parse(&stat, v).map(Some);
        }
    }
    Ok(None)
}

/// Whether frame `pfn` is in the fixed sample (same answer for every VM).
/// A multiplicative hash, judged on its high bits, so the sample does not follow
/// the frame number's low bits (huge page alignment).
fn sampled_frame(pfn: u64) -> bool {
    pfn.wrapping_mul(0x9E37_79B9_7F4A_7C15) < u64::MAX / FRAME_SAMPLE_EVERY
}

/// Reads up to `budget_pages` of `ranges` (guest RAM as (start address, bytes))
/// from page `cursor` on (counted across the ranges in order). Returns the sampled
/// KSM frames seen, the next cursor and whether the end was reached (the cursor
/// then wraps to 0).
pub fn scan_ksm_frames(
    pagemap: (&File, &Path),
    kpageflags: (&File, &Path),
    ranges: &[(u64, u64)],
    cursor: u64,
    budget_pages: u64,
) -> Result<(BTreeSet<u64>, u64, bool), KsmSharingError> {
    let (pm, pm_path) = pagemap;
    let (kf, kf_path) = kpageflags;
    let mut frames = BTreeSet::new();
    let mut flags_cache: BTreeMap<u64, bool> = BTreeMap::new();
    let mut left = budget_pages;
    let mut skip = cursor;
    let mut done = 0u64;
    let mut buf = vec![0u8; (RUN_PAGES * 8) as usize];
    for &(start, len) in ranges {
        let pages = len / PAGE_BYTES;
        if skip >= pages {
            skip -= pages;
            done += pages;
            continue;
        }
        let mut page = skip;
        done += skip;
        skip = 0;
        while page < pages {
            if left == 0 {
                return Ok((frames, done, false));
            }
            let n = (pages - page).min(RUN_PAGES).min(left);
            let first_vpn = start / PAGE_BYTES + page;
            let bytes = &mut buf[..(n * 8) as usize];
            read_at(pm, pm_path, bytes, first_vpn * 8, || {
                format!("the entries of pages {first_vpn:#x}..{:#x}", first_vpn + n)
            })?;
            for e in bytes.chunks_exact(8) {
                let raw = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                let PageInfo::MemoryPage(flags) = PageInfo::parse_info(raw) else {
                    continue;
                };
                let pfn = flags.get_page_frame_number().0;
                if !flags.contains(MemoryPageFlags::PRESENT)
                    || flags.contains(MemoryPageFlags::MMAP_EXCLUSIVE)
                    || pfn == 0
                    || !sampled_frame(pfn)
                {
                    continue;
                }
                let ksm = match flags_cache.get(&pfn) {
                    Some(&k) => k,
                    None => {
                        let mut f = [0u8; 8];
                        read_at(kf, kf_path, &mut f, pfn * 8, || {
                            format!("the flags of frame {pfn:#x}")
                        })?;
                        let k = PhysicalPageFlags::parse_info(u64::from_ne_bytes(f))
                            .contains(PhysicalPageFlags::KSM);
                        flags_cache.insert(pfn, k);
                        k
                    }
                };
                if ksm {
                    frames.insert(pfn);
                }
            }
            page += n;
            done += n;
            left -= n;
        }
    }
    Ok((frames, 0, true))
}

/// Pages each pair of VMs shares, estimated from their sampled KSM frames: the
/// frames both map, scaled by [`FRAME_SAMPLE_EVERY`]. Symmetric; pairs sharing none
/// are left out. Counted frame by frame (the VMs mapping each), so the work grows
/// with the frames and their sharers, not with the square of the VMs.
pub fn shared_pages<'a>(
    frames: impl IntoIterator<Item = (VmId, &'a BTreeSet<u64>)>,
) -> BTreeMap<VmId, Vec<(VmId, u64)>> {
    let mut mappers: BTreeMap<u64, Vec<VmId>> = BTreeMap::new();
    for (vm, set) in frames {
        for &f in set {
            mappers.entry(f).or_default().push(vm);
        }
    }
    let mut pairs: BTreeMap<(VmId, VmId), u64> = BTreeMap::new();
    for vms in mappers.values().filter(|v| v.len() > 1) {
        for (i, &a) in vms.iter().enumerate() {
            for &b in &vms[i + 1..] {
                *pairs.entry((a.min(b), a.max(b))).or_default() += 1;
            }
        }
    }
    let mut out: BTreeMap<VmId, Vec<(VmId, u64)>> = BTreeMap::new();
    for ((a, b), both) in pairs {
        let pages = both * FRAME_SAMPLE_EVERY;
        out.entry(a).or_default().push((b, pages));
        out.entry(b).or_default().push((a, pages));
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Per-VM state between rounds.
#[derive(Debug, Default)]
struct VmFrames {
    /// Where the next round starts (page index across the guest ranges).
    cursor: u64,
    /// Frames seen so far in the pass under way.
    pass: BTreeSet<u64>,
    /// Frames of the last complete pass, if one completed.
    last: Option<BTreeSet<u64>>,
    /// Merged pages by the kernel's count, when it has one.
    merging_pages: Option<u64>,
}

impl VmFrames {
    /// The frames that stand for the VM: the last complete pass, else the pass so far.
    fn frames(&self) -> &BTreeSet<u64> {
        self.last.as_ref().unwrap_or(&self.pass)
    }
}

/// The sampled KSM sharing between VMs, kept between rounds.
#[derive(Debug)]
pub struct KsmSharing {
    proc_root: PathBuf,
    vms: BTreeMap<VmId, VmFrames>,
    /// What [`shared_pages`] made of the last round, given to every snapshot until
    /// the next.
    shared: BTreeMap<VmId, Vec<(VmId, u64)>>,
    last_round_ns: Option<u64>,
    /// Set once `/proc/kpageflags` could not be opened (no root): stop trying.
    unavailable: Option<String>,
}

impl KsmSharing {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            vms: BTreeMap::new(),
            shared: BTreeMap::new(),
            last_round_ns: None,
            unavailable: None,
        }
    }

    /// Runs a round when one is due and fills each VM's `ksm_shared_pages` and
    /// `ksm_merging_pages` from the latest readings. With KSM stopped or nothing
    /// merged, every VM shares nothing and the state is dropped.
    pub fn fill(&mut self, snapshot: &mut Snapshot) {
        let ksm = &snapshot.settings.ksm;
        if !ksm.running || ksm.pages_sharing == 0 || self.unavailable.is_some() {
            self.vms.clear();
            self.shared.clear();
            self.last_round_ns = None;
            for vm in &mut snapshot.vms {
                vm.ksm_shared_pages.clear();
                vm.ksm_merging_pages = None;
            }
            return;
        }
        self.vms
            .retain(|pid, _| snapshot.vms.iter().any(|v| v.pid == *pid));
        let now = snapshot.now_ns;
        if self
            .last_round_ns
            .is_none_or(|t| now.saturating_sub(t) >= ROUND_EVERY_NS)
        {
            self.last_round_ns = Some(now);
            if let Err(e) = self.round(snapshot) {
                tracing::info!(error = %e, "KSM sharing between VMs cannot be read; not trying again");
                self.unavailable = Some(e.to_string());
                self.vms.clear();
            }
            self.shared = shared_pages(self.vms.iter().map(|(pid, f)| (*pid, f.frames())));
        }
        for vm in &mut snapshot.vms {
            // A partner that exited since the round is no partner.
            vm.ksm_shared_pages = self
                .shared
                .get(&vm.pid)
                .map(|v| {
                    v.iter()
                        .copied()
                        .filter(|(o, _)| self.vms.contains_key(o))
                        .collect()
                })
                .unwrap_or_default();
            vm.ksm_merging_pages = self.vms.get(&vm.pid).and_then(|f| f.merging_pages);
        }
    }

    /// One round over the VMs with merged pages. Only a missing `/proc/kpageflags`
    /// fails the round; a VM whose files cannot be read is skipped (it exited, or
    /// its page tables changed under the read) with a debug line.
    fn round(&mut self, snapshot: &Snapshot) -> Result<(), KsmSharingError> {
        let kf_path = self.proc_root.join("kpageflags");
        let kf = File::open(&kf_path).map_err(|e| KsmSharingError::io(&kf_path, e))?;
        let started = std::time::Instant::now();
        let mut read_vms = 0;
        for vm in &snapshot.vms {
            let merging = match read_merging_pages(&self.proc_root, vm.pid) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(vm = vm.pid, error = %e, "cannot read the VM's KSM count");
                    None
                }
            };
            if merging == Some(0) || vm.memory.guest_ranges.is_empty() {
                self.vms.remove(&vm.pid);
                continue;
            }
            let state = self.vms.entry(vm.pid).or_default();
            state.merging_pages = merging;
            let pm_path = self.proc_root.join(format!("{}/pagemap", vm.pid));
            let scanned = File::open(&pm_path)
                .map_err(|e| KsmSharingError::io(&pm_path, e))
                .and_then(|pm| {
                    scan_ksm_frames(
                        (&pm, &pm_path),
                        (&kf, &kf_path),
                        &vm.memory.guest_ranges,
                        state.cursor,
                        MAX_PAGES_PER_ROUND,
                    )
                });
            match scanned {
                Ok((frames, cursor, wrapped)) => {
                    read_vms += 1;
                    state.pass.extend(frames);
                    state.cursor = cursor;
                    if wrapped {
                        state.last = Some(std::mem::take(&mut state.pass));
                    }
                }
                Err(e) => {
                    tracing::debug!(vm = vm.pid, error = %e, "cannot read the VM's page frames");
                    self.vms.remove(&vm.pid);
                }
            }
        }
        tracing::debug!(
            vms = read_vms,
            took_us = started.elapsed().as_micros() as u64,
            "KSM sharing round"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESENT: u64 = 1 << 63;
    const EXCLUSIVE: u64 = 1 << 56;
    const KPF_KSM: u64 = 1 << 21;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ksm-sharing-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_u64s(path: &Path, values: &[u64]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
    }

    /// Sampled frame numbers, in order.
    fn sampled(n: usize) -> Vec<u64> {
        (1..).filter(|&p| sampled_frame(p)).take(n).collect()
    }

    /// A /proc with `kpageflags` marking `ksm` frames, and one pagemap per VM
    /// (guest RAM at page 16, entries given).
    fn proc_tree(tag: &str, ksm: &[u64], vms: &[(u32, Vec<u64>)]) -> PathBuf {
        let root = tempdir(tag);
        let max = ksm
            .iter()
            .copied()
            .chain(vms.iter().flat_map(|v| &v.1).map(|e| e & ((1 << 55) - 1)))
            .max()
            .unwrap_or(0);
        let mut flags = vec![0u64; max as usize + 1];
        for &f in ksm {
            flags[f as usize] = KPF_KSM;
        }
        write_u64s(&root.join("kpageflags"), &flags);
        for (pid, entries) in vms {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let mut all = vec![0u64; 16];
            all.extend(entries);
            write_u64s(&dir.join("pagemap"), &all);
        }
        root
    }

    fn scan(
        root: &Path,
        pid: u32,
        pages: u64,
        cursor: u64,
        budget: u64,
    ) -> (BTreeSet<u64>, u64, bool) {
        let pm_path = root.join(format!("{pid}/pagemap"));
        let kf_path = root.join("kpageflags");
        let pm = File::open(&pm_path).unwrap();
        let kf = File::open(&kf_path).unwrap();
        scan_ksm_frames(
            (&pm, &pm_path),
            (&kf, &kf_path),
            &[(16 * PAGE_BYTES, pages * PAGE_BYTES)],
            cursor,
            budget,
        )
        .unwrap()
    }

    #[test]
    fn counts_frames_both_vms_map_that_are_ksm() {
        let f = sampled(6);
        // Frames f0..f3 are KSM pages; f4 is shared but not KSM (a file page);
        // f5 is KSM but VM 2 maps it exclusively (merged with itself only... and
        // exclusive means one mapping: not shared).
        let ksm = [f[0], f[1], f[2], f[3], f[5]];
        let vm1 = vec![
            PRESENT | f[0],
            PRESENT | f[1],
            PRESENT | f[2],
            PRESENT | f[4],
            0, // not present
        ];
        let vm2 = vec![
            PRESENT | f[1],
            PRESENT | f[2],
            PRESENT | f[4],
            PRESENT | EXCLUSIVE | f[5],
        ];
        let vm3 = vec![PRESENT | f[0], PRESENT | f[3]];
        let root = proc_tree("pairs", &ksm, &[(1, vm1), (2, vm2), (3, vm3)]);
        let mut frames = BTreeMap::new();
        frames.insert(1, scan(&root, 1, 5, 0, 100).0);
        frames.insert(2, scan(&root, 2, 4, 0, 100).0);
        frames.insert(3, scan(&root, 3, 2, 0, 100).0);
        assert_eq!(frames[&1], BTreeSet::from([f[0], f[1], f[2]]));
        assert_eq!(frames[&2], BTreeSet::from([f[1], f[2]]));
        let shared = shared_pages(frames.iter().map(|(p, f)| (*p, f)));
        let k = FRAME_SAMPLE_EVERY;
        assert_eq!(shared[&1], vec![(2, 2 * k), (3, k)]);
        assert_eq!(shared[&2], vec![(1, 2 * k)]);
        assert_eq!(shared[&3], vec![(1, k)]);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn frames_outside_the_sample_are_not_looked_up() {
        let unsampled = (1..).find(|&p| !sampled_frame(p)).unwrap();
        // kpageflags is too short for the frame: reading it would fail.
        let root = tempdir("unsampled");
        write_u64s(&root.join("kpageflags"), &[0]);
        std::fs::create_dir_all(root.join("7")).unwrap();
        let mut pm = vec![0u64; 16];
        pm.push(PRESENT | unsampled);
        write_u64s(&root.join("7/pagemap"), &pm);
        assert!(scan(&root, 7, 1, 0, 10).0.is_empty());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_big_vm_is_read_over_several_rounds() {
        let f = sampled(10);
        let vm: Vec<u64> = f.iter().map(|&p| PRESENT | p).collect();
        let root = proc_tree("rounds", &f, &[(4, vm)]);
        let (a, cursor, wrapped) = scan(&root, 4, 10, 0, 4);
        assert_eq!((a.len(), cursor, wrapped), (4, 4, false));
        let (b, cursor, wrapped) = scan(&root, 4, 10, cursor, 4);
        assert_eq!((b.len(), cursor, wrapped), (4, 8, false));
        let (c, cursor, wrapped) = scan(&root, 4, 10, cursor, 4);
        assert_eq!((c.len(), cursor, wrapped), (2, 0, true));
        let all: BTreeSet<u64> = a.into_iter().chain(b).chain(c).collect();
        assert_eq!(all, f.into_iter().collect());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn short_files_are_clear_errors() {
        let f = sampled(1);
        // The pagemap ends before guest RAM does.
        let root = proc_tree("short", &f, &[(5, vec![PRESENT | f[0]])]);
        let pm_path = root.join("5/pagemap");
        let kf_path = root.join("kpageflags");
        let (pm, kf) = (File::open(&pm_path).unwrap(), File::open(&kf_path).unwrap());
        let err = scan_ksm_frames(
            (&pm, &pm_path),
            (&kf, &kf_path),
            &[(16 * PAGE_BYTES, 3 * PAGE_BYTES)],
            0,
            10,
        )
        .unwrap_err();
        assert!(matches!(err, KsmSharingError::Short { .. }), "{err}");
        assert!(
            err.to_string().contains("ends before the entries of pages"),
            "{err}"
        );
        // A frame beyond the end of kpageflags.
        std::fs::write(&kf_path, [0u8; 3]).unwrap();
        let kf = File::open(&kf_path).unwrap();
        let err = scan_ksm_frames(
            (&pm, &pm_path),
            (&kf, &kf_path),
            &[(16 * PAGE_BYTES, PAGE_BYTES)],
            0,
            10,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ends before the flags of frame"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn merging_pages_from_either_file() {
        let root = tempdir("merging");
        std::fs::create_dir_all(root.join("1")).unwrap();
        std::fs::write(root.join("1/ksm_merging_pages"), "4242\n").unwrap();
        assert_eq!(read_merging_pages(&root, 1).unwrap(), Some(4242));
        std::fs::create_dir_all(root.join("2")).unwrap();
        std::fs::write(
            root.join("2/ksm_stat"),
            "ksm_rmap_items 100\nksm_merging_pages 77\nksm_process_profit 0\n",
        )
        .unwrap();
        assert_eq!(read_merging_pages(&root, 2).unwrap(), Some(77));
        std::fs::create_dir_all(root.join("3")).unwrap();
        assert_eq!(read_merging_pages(&root, 3).unwrap(), None);
        std::fs::write(root.join("3/ksm_merging_pages"), "lots\n").unwrap();
        let err = read_merging_pages(&root, 3).unwrap_err();
        assert!(err.to_string().contains("not a page count"), "{err}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn fill_shares_nothing_while_ksm_is_stopped() {
        let mut snap = Snapshot::default();
        snap.vms.push(crate::model::Vm {
            pid: 1,
            ksm_shared_pages: vec![(2, 5)],
            ..Default::default()
        });
        let mut s = KsmSharing::new(Path::new("/nonexistent"));
        s.fill(&mut snap);
        assert!(snap.vms[0].ksm_shared_pages.is_empty());
        assert!(s.unavailable.is_none(), "nothing read while KSM is stopped");
        // KSM running with pages merged but no kpageflags: unavailable, said once.
        snap.settings.ksm.running = true;
        snap.settings.ksm.pages_sharing = 10;
        snap.vms[0].memory.guest_ranges = vec![(0, PAGE_BYTES)];
        snap.vms[0].ksm_shared_pages = vec![(2, 5)];
        s.fill(&mut snap);
        assert!(
            s.unavailable
                .as_deref()
                .is_some_and(|w| w.contains("kpageflags"))
        );
        assert!(snap.vms[0].ksm_shared_pages.is_empty());
    }
}
