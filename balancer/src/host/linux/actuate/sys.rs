//! Thin wrappers over the syscalls actuation needs, so the rest of the module deals
//! in `Result`s and typed sets instead of raw pointers and errno.
//!
//! move_pages(2) and migrate_pages(2) have no wrapper in libc or nix; they are called
//! through `libc::syscall` here and nowhere else.

use crate::model::{CpuSet, NodeId, NodeSet};

/// `MPOL_MF_MOVE` from <linux/mempolicy.h>: move pages used only by this process.
const MPOL_MF_MOVE: libc::c_int = 1 << 1;
/// `MPOL_MF_MOVE_ALL`: move pages shared with other processes too (needs
/// CAP_SYS_NICE).
const MPOL_MF_MOVE_ALL: libc::c_int = 1 << 2;

/// The base page size in bytes.
pub fn page_size_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

/// sched_setaffinity on one thread id.
pub fn set_affinity(tid: u32, cpus: &CpuSet) -> Result<(), nix::Error> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus.iter() {
        set.set(cpu as usize)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)
}

/// sched_getaffinity of one thread id.
pub fn get_affinity(tid: u32) -> Result<CpuSet, nix::Error> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid as i32))?;
    Ok((0..nix::sched::CpuSet::count() as u32)
        .filter(|&c| set.is_set(c as usize).unwrap_or(false))
        .collect())
}

/// move_pages(2). `nodes = None` only queries: `status[i]` receives the node of page
/// `i`, or a negative errno (`-ENOENT` for a page not present, `-EFAULT` unmapped).
/// With `nodes`, pages move and `status[i]` is the node the page is on afterwards or
/// a negative errno. Returns the syscall's return value (the number of pages not
/// moved on newer kernels) or the errno of a failure of the whole call.
pub fn move_pages(
    pid: u32,
    pages: &[u64],
    nodes: Option<&[i32]>,
    status: &mut [i32],
) -> Result<i64, nix::Error> {
    move_pages_flags(pid, pages, nodes, status, MPOL_MF_MOVE)
}

/// [`move_pages`] that also moves pages other processes map (`MPOL_MF_MOVE_ALL`).
/// The daemon never does (a page shared with another process is not the VM's to
/// move); a test harness placing a VM's memory by hand does.
pub fn move_pages_all(
    pid: u32,
    pages: &[u64],
    nodes: Option<&[i32]>,
    status: &mut [i32],
) -> Result<i64, nix::Error> {
    move_pages_flags(pid, pages, nodes, status, MPOL_MF_MOVE_ALL)
}

fn move_pages_flags(
    pid: u32,
    pages: &[u64],
    nodes: Option<&[i32]>,
    status: &mut [i32],
    flags: libc::c_int,
) -> Result<i64, nix::Error> {
    assert_eq!(pages.len(), status.len());
    if let Some(n) = nodes {
        assert_eq!(n.len(), pages.len());
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: the three arrays hold `pages.len()` elements of the kernel's expected
    // types (void *, int, int) and outlive the call; the kernel only writes `status`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid as libc::c_long,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(nix::Error::last())
    } else {
        Ok(r as i64)
    }
}

/// migrate_pages(2): moves every page of `pid` on `from` to `to`. Returns the number
/// of pages that could not be moved.
pub fn migrate_pages(pid: u32, from: &NodeSet, to: &NodeSet) -> Result<u64, nix::Error> {
    let words = |s: &NodeSet, n: usize| -> Vec<libc::c_ulong> {
        let mut w = vec![0 as libc::c_ulong; n];
        for id in s.iter() {
            w[(id / 64) as usize] |= 1 << (id % 64);
        }
        w
    };
    let max_id = from.iter().chain(to.iter()).max().unwrap_or(0) as usize;
    let n = max_id / 64 + 1;
    let (old, new) = (words(from, n), words(to, n));
    // SAFETY: both masks hold `n` words, i.e. `n * 64` bits, and `maxnode` says so
    // (plus one, as the kernel ignores the last bit); the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_migrate_pages,
            pid as libc::c_long,
            (n * 64 + 1) as libc::c_ulong,
            old.as_ptr(),
            new.as_ptr(),
        )
    };
    if r < 0 {
        Err(nix::Error::last())
    } else {
        Ok(r as u64)
    }
}

/// Sets the calling thread's nice value (Linux keeps one per thread; threads it
/// creates afterwards inherit it). Lowering it needs CAP_SYS_NICE.
pub fn set_own_nice(nice: i32) -> Result<(), nix::Error> {
    // SAFETY: no pointers; who = 0 names the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r < 0 {
        Err(nix::Error::last())
    } else {
        Ok(())
    }
}

/// The node set `{node}`.
pub fn one_node(node: NodeId) -> NodeSet {
    std::iter::once(node).collect()
}
