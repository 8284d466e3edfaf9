//! Why the Linux applier refused an action ([`Refusal`]), or what differed from
//! what it asked for once applied ([`Shortfall`]): one variant per check, each naming
//! what it checked (CPUs, node, thread, cgroup directory).
//!
//! A refusal leaves the host as it was; a shortfall makes the action `Partial`. The
//! outcome the daemon records and `status` shows
//! ([`ActionOutcome`](crate::model::ActionOutcome)) keeps its reason as text: it is
//! data for operators and the journal, built from the
//! [`Display`](std::fmt::Display) of these variants.

use std::io;
use std::path::PathBuf;

use crate::model::{CpuSet, MemoryNotMovable, NodeId};

use super::super::HostError;

/// Why an action was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the target CPU set is empty")]
    EmptyCpuSet,
    #[error("CPUs {cpus} are not online (online: {online})")]
    CpusOffline { cpus: CpuSet, online: CpuSet },
    #[error("cannot read the online CPUs: {0}")]
    OnlineUnreadable(HostError),
    #[error("CPUs {cpus} are not in the topology")]
    CpusNotInTopology { cpus: CpuSet },
    #[error("CPUs {cpus} are reserved")]
    CpusReserved { cpus: CpuSet },
    #[error("vCPU {index} is not known")]
    UnknownVcpu { index: u32 },
    #[error("vCPU {index} has no cgroup")]
    VcpuWithoutCgroup { index: u32 },
    /// A cgroup file could not be read or written; `doing` is "reading", "writing"
    /// or "widening".
    #[error("{doing} {}{}", dir.display(), .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Cgroup {
        doing: &'static str,
        dir: PathBuf,
        source: Option<io::Error>,
    },
    #[error("thread {tid} may not run on {cpus} (its cpuset forbids it)")]
    CpusetForbids { tid: u32, cpus: CpuSet },
    #[error("sched_setaffinity on thread {tid}: {errno}")]
    Affinity { tid: u32, errno: nix::Error },
    #[error("its memory is never migrated: {0}")]
    NotMovable(MemoryNotMovable),
    #[error("source and target are both node {node}")]
    SameNode { node: NodeId },
    #[error("nothing to move (max_bytes is 0)")]
    NothingToMove,
    #[error("node {node} does not exist on this host")]
    NoSuchNode { node: NodeId },
    #[error(
        "node {node} has {free_pages} free huge pages of {page_size_bytes} bytes, \
         the move needs {need_pages}"
    )]
    NoHugePages {
        node: NodeId,
        free_pages: u64,
        page_size_bytes: u64,
        need_pages: u64,
    },
    #[error("node {node} has no readable memory information")]
    NoMemoryInfo { node: NodeId },
    #[error(
        "node {node} has {free_bytes} bytes free, the move needs {need_bytes} plus \
         {headroom_bytes} headroom"
    )]
    NoRoom {
        node: NodeId,
        free_bytes: u64,
        need_bytes: u64,
        headroom_bytes: u64,
    },
    #[error("guest RAM is not located, so the process's own memory cannot be told apart")]
    GuestRamUnlocated,
    #[error("{0}")]
    Maps(HostError),
    #[error("{}: memory_migrate: {source}", dir.display())]
    MemoryMigrate { dir: PathBuf, source: io::Error },
    #[error("widening {} mems: {source}", dir.display())]
    WidenMems { dir: PathBuf, source: io::Error },
}

/// What differed from the request after a CPU-set change or a restore, read back
/// from the host.
#[derive(Debug, thiserror::Error)]
pub enum Shortfall {
    #[error("{} enforces {effective}", group.display())]
    GroupEnforces { group: PathBuf, effective: CpuSet },
    #[error("vCPU {index} thread runs on {cpus}")]
    VcpuRunsOn { index: u32, cpus: CpuSet },
    #[error("thread {tid} runs on {cpus}")]
    ThreadRunsOn { tid: u32, cpus: CpuSet },
    #[error("thread {tid}: {errno}")]
    Affinity { tid: u32, errno: nix::Error },
    #[error("{}: {source}", dir.display())]
    Cgroup { dir: PathBuf, source: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_what_was_checked() {
        let cpus: CpuSet = "2-3".parse().unwrap();
        let room = Refusal::NoRoom {
            node: 1,
            free_bytes: 10,
            need_bytes: 8,
            headroom_bytes: 4,
        };
        assert_eq!(
            room.to_string(),
            "node 1 has 10 bytes free, the move needs 8 plus 4 headroom"
        );
        let read = Refusal::Cgroup {
            doing: "reading",
            dir: "/sys/fs/cgroup/machine.slice/vm".into(),
            source: None,
        };
        assert_eq!(read.to_string(), "reading /sys/fs/cgroup/machine.slice/vm");
        let write = Refusal::Cgroup {
            doing: "writing",
            dir: "/cg/vcpu0".into(),
            source: Some(io::Error::from_raw_os_error(libc::EBUSY)),
        };
        assert!(
            write.to_string().starts_with("writing /cg/vcpu0: "),
            "{write}"
        );
        assert_eq!(
            Refusal::CpusetForbids {
                tid: 7,
                cpus: cpus.clone()
            }
            .to_string(),
            "thread 7 may not run on 2-3 (its cpuset forbids it)"
        );
        assert_eq!(
            Shortfall::VcpuRunsOn { index: 1, cpus }.to_string(),
            "vCPU 1 thread runs on 2-3"
        );
    }
}
