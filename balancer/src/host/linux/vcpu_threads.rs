//! Which threads of a qemu process are its vCPUs, and how that was found.
//!
//! First by name (`CPU n/KVM`, [`super::discovery::classify_thread`]): free, and what
//! every libvirt VM gives. When no thread is so named, by asking the VM's QMP monitor
//! ([`super::qmp`]), once: vCPU threads live as long as the VM, so the answer is kept
//! and asked again only when a thread it lists is gone. A monitor that does not
//! answer is asked again after [`RETRY_NS`], not every tick, since each attempt may
//! wait for its deadline and a monitor that is held by its owner stays held for a
//! while. When neither works the VM's vCPUs are unknown, and it is said why.

use std::collections::{BTreeMap, HashSet};

use super::discovery::classify_thread;
use super::qmp::{QmpError, QmpSocket, QmpVcpu};
use crate::model::{ThreadKind, VcpuDiscovery};

/// How long a VM whose monitor did not answer waits before it is asked again.
pub const RETRY_NS: u64 = 60_000_000_000;

/// What is known of one VM's vCPU threads between observations.
#[derive(Clone, Debug, Default)]
pub enum VcpuThreads {
    /// Not asked yet (or named threads, which need no memory).
    #[default]
    Fresh,
    /// The monitor's answer: vCPU index by thread id.
    Qmp {
        socket: QmpSocket,
        index_by_tid: BTreeMap<u32, u32>,
    },
    /// Not found; asked again from `retry_at_ns` (observer clock).
    Unknown { why: String, retry_at_ns: u64 },
}

impl VcpuThreads {
    /// The vCPU index of each vCPU thread among `threads` (`(tid, comm)`), and how it
    /// was found. `ask` asks one monitor (the real one is [`super::qmp::query_vcpus`]).
    pub fn find(
        &mut self,
        pid: u32,
        threads: &[(u32, String)],
        sockets: &[QmpSocket],
        now_ns: u64,
        mut ask: impl FnMut(&QmpSocket) -> Result<Vec<QmpVcpu>, QmpError>,
    ) -> (VcpuDiscovery, BTreeMap<u32, u32>) {
        let named: BTreeMap<u32, u32> = threads
            .iter()
            .filter_map(|(tid, comm)| match classify_thread(pid, *tid, comm) {
                ThreadKind::Vcpu(i) => Some((*tid, i)),
                _ => None,
            })
            .collect();
        if !named.is_empty() {
            *self = VcpuThreads::Fresh;
            return (VcpuDiscovery::ThreadNames, named);
        }
        let alive: HashSet<u32> = threads.iter().map(|(t, _)| *t).collect();
        match self {
            VcpuThreads::Qmp {
                socket,
                index_by_tid,
            } => {
                if index_by_tid.keys().all(|t| alive.contains(t)) {
                    let socket = socket.to_string();
                    return (VcpuDiscovery::Qmp { socket }, index_by_tid.clone());
                }
                tracing::debug!(
                    pid,
                    "a vCPU thread the monitor listed is gone; asking again"
                );
            }
            VcpuThreads::Unknown { why, retry_at_ns } if now_ns < *retry_at_ns => {
                let why = why.clone();
                return (VcpuDiscovery::Unknown { why }, BTreeMap::new());
            }
            _ => {}
        }
        let unnamed = "threads are not named (no -name debug-threads=on)";
        if sockets.is_empty() {
            let why = format!("{unnamed} and the command line gives no QMP unix socket");
            *self = VcpuThreads::Unknown {
                why: why.clone(),
                retry_at_ns: u64::MAX,
            };
            return (VcpuDiscovery::Unknown { why }, BTreeMap::new());
        }
        let mut failures = Vec::new();
        for socket in sockets {
            match ask(socket) {
                Ok(vcpus) if vcpus.iter().all(|v| alive.contains(&v.tid)) => {
                    let index_by_tid: BTreeMap<u32, u32> =
                        vcpus.iter().map(|v| (v.tid, v.index)).collect();
                    tracing::info!(pid, %socket, vcpus = vcpus.len(), "vCPU threads from QMP query-cpus-fast");
                    *self = VcpuThreads::Qmp {
                        socket: socket.clone(),
                        index_by_tid: index_by_tid.clone(),
                    };
                    let socket = socket.to_string();
                    return (VcpuDiscovery::Qmp { socket }, index_by_tid);
                }
                Ok(_) => failures.push(format!(
                    "QMP {socket} names threads that are not this process's"
                )),
                Err(e) => failures.push(format!("QMP {socket}: {e}")),
            }
        }
        let why = format!("{unnamed}; {}", failures.join("; "));
        tracing::info!(
            pid,
            why,
            "vCPUs unknown; the VM is balanced as a whole process"
        );
        *self = VcpuThreads::Unknown {
            why: why.clone(),
            retry_at_ns: now_ns.saturating_add(RETRY_NS),
        };
        (VcpuDiscovery::Unknown { why }, BTreeMap::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(list: &[(u32, &str)]) -> Vec<(u32, String)> {
        list.iter().map(|(t, c)| (*t, c.to_string())).collect()
    }

    fn sock() -> QmpSocket {
        QmpSocket {
            path: "/run/q.sock".into(),
            abstract_ns: false,
        }
    }

    #[test]
    fn names_first_then_the_monitor_once() {
        let mut v = VcpuThreads::default();
        let mut asked = 0;
        // Named threads: the monitor is not asked.
        let named = threads(&[(10, "qemu-kvm"), (11, "CPU 0/KVM"), (12, "CPU 1/KVM")]);
        let (how, map) = v.find(10, &named, &[sock()], 0, |_| {
            asked += 1;
            Ok(vec![])
        });
        assert_eq!(how, VcpuDiscovery::ThreadNames);
        assert_eq!(map, BTreeMap::from([(11, 0), (12, 1)]));
        assert_eq!(asked, 0);

        // Plain qemu: asked once, then the answer is kept.
        let plain = threads(&[
            (10, "qemu-system-x86"),
            (11, "qemu-system-x86"),
            (12, "qemu-system-x86"),
            (13, "qemu-system-x86"),
        ]);
        let answer = || {
            Ok(vec![
                QmpVcpu { index: 0, tid: 12 },
                QmpVcpu { index: 1, tid: 13 },
            ])
        };
        for now in [0, 1_000, 2_000] {
            let (how, map) = v.find(10, &plain, &[sock()], now, |_| {
                asked += 1;
                answer()
            });
            assert_eq!(
                how,
                VcpuDiscovery::Qmp {
                    socket: "/run/q.sock".into()
                }
            );
            assert_eq!(map, BTreeMap::from([(12, 0), (13, 1)]));
        }
        assert_eq!(asked, 1);
        // A listed thread is gone (the VM was reset with new threads): asked again.
        let renewed = threads(&[(10, "q"), (11, "q"), (14, "q"), (15, "q")]);
        let (_, map) = v.find(10, &renewed, &[sock()], 3_000, |_| {
            asked += 1;
            Ok(vec![
                QmpVcpu { index: 0, tid: 14 },
                QmpVcpu { index: 1, tid: 15 },
            ])
        });
        assert_eq!(asked, 2);
        assert_eq!(map, BTreeMap::from([(14, 0), (15, 1)]));
    }

    #[test]
    fn unknown_says_why_and_is_not_asked_every_tick() {
        let plain = threads(&[(10, "q"), (11, "q")]);
        let mut v = VcpuThreads::default();
        let (how, map) = v.find(10, &plain, &[], 0, |_| unreachable!());
        assert!(map.is_empty());
        let VcpuDiscovery::Unknown { why } = how else {
            panic!("{how:?}")
        };
        assert!(why.contains("no QMP unix socket"), "{why}");

        let mut v = VcpuThreads::default();
        let asked = std::cell::Cell::new(0);
        let busy = |_: &QmpSocket| {
            asked.set(asked.get() + 1);
            Err(QmpError::Busy)
        };
        let (how, _) = v.find(10, &plain, &[sock()], 0, busy);
        assert!(how.to_string().contains("busy"), "{how}");
        assert!(
            how.to_string().contains("balanced as a whole process"),
            "{how}"
        );
        v.find(10, &plain, &[sock()], RETRY_NS - 1, busy);
        assert_eq!(asked.get(), 1);
        v.find(10, &plain, &[sock()], RETRY_NS, busy);
        assert_eq!(asked.get(), 2);

        // A monitor naming threads the process does not have is not believed.
        let mut v = VcpuThreads::default();
        let (how, map) = v.find(10, &plain, &[sock()], 0, |_| {
            Ok(vec![QmpVcpu { index: 0, tid: 999 }])
        });
        assert!(map.is_empty());
        assert!(how.to_string().contains("not this process's"), "{how}");
    }
}
