//! numad-compatible placement advice (`vmbalancer advise -w NCPUS[:MB]`), pure.
//!
//! libvirt's `placement='auto'` runs `numad -w NCPUS:MB` and pins the new VM's CPUs
//! and memory to the node list printed on stdout (`2-3,6`). This module answers the
//! same question from a [`Snapshot`]: the smallest set of nodes, chosen nearest to
//! the roomiest node, whose spare CPU capacity (below the target utilisation, minus
//! reserved CPUs and current load) and free memory (above the headroom) fit the
//! request. When no set fits, all nodes with room are advised, as numad does rather
//! than refusing to start a VM.
//!
//! Load per node comes from the caller (measured `/proc/stat` deltas, or the vCPU
//! demand of the snapshot's VMs via [`load_from_vms`]), so this stays free of I/O.
//! The daemon averages its measurements over [`LOAD_WINDOW`] ([`LoadWindow`]): the
//! binding libvirt makes from the advice lasts, so the load that decides it should
//! be the load that lasts, not the last second's (libvirt itself, busy starting the
//! very VMs that ask, would otherwise rule out whichever node it ran on). numad's
//! figure spans its polling interval, 5 to 15 s.
//!
//! Advice given is held against its nodes ([`Held`]): libvirt binds the VM at once,
//! but its vCPU load and its memory show in the host's figures only once the guest
//! runs and touches its RAM, seconds to a minute later. Without holding, VMs started
//! together (an operator's `virsh start` loop, a cloud booting a batch) all ask
//! while the host still looks as it did, and all get the same roomiest node; numad
//! behaves that way. The daemon keeps each answer for [`HOLD`] and counts it as
//! used CPUs and memory on the advised nodes (shared evenly among them) when it
//! answers the next request. Once the VM shows in the figures, its held share
//! counts twice until the hold ends: advice in that window errs towards other
//! nodes, which is the side numad also errs on for new VMs (it never underestimates
//! a pre-placement request).

use std::collections::VecDeque;
use std::time::Duration;

use crate::model::{CpuSet, NodeId, NodeSet, Snapshot};

/// How long given advice is held against its nodes (see the module doc): longer
/// than a VM's start and its guest's first minute on a loaded host.
pub const HOLD: Duration = Duration::from_secs(60);

/// How far back the load behind the daemon's advice looks (numad's longest default
/// polling interval).
pub const LOAD_WINDOW: Duration = Duration::from_secs(15);

/// CPUs in use per node, measured once per tick, averaged over [`LOAD_WINDOW`].
#[derive(Clone, Debug, Default)]
pub struct LoadWindow {
    samples: VecDeque<Vec<f64>>,
    keep: usize,
}

impl LoadWindow {
    /// A window of measurements taken every `tick`.
    pub fn new(tick: Duration) -> Self {
        let keep = LOAD_WINDOW.as_millis() / tick.as_millis().max(1);
        Self {
            samples: VecDeque::new(),
            keep: (keep as usize).max(1),
        }
    }

    /// Adds one tick's measurement; one for another number of nodes starts over.
    pub fn push(&mut self, busy_cpus: Vec<f64>) {
        if self
            .samples
            .front()
            .is_some_and(|s| s.len() != busy_cpus.len())
        {
            self.samples.clear();
        }
        self.samples.push_back(busy_cpus);
        while self.samples.len() > self.keep {
            self.samples.pop_front();
        }
    }

    /// The mean per node of the measurements in the window, if any.
    pub fn mean(&self) -> Option<Vec<f64>> {
        let first = self.samples.front()?;
        let n = self.samples.len() as f64;
        Some(
            (0..first.len())
                .map(|i| self.samples.iter().map(|s| s[i]).sum::<f64>() / n)
                .collect(),
        )
    }
}

/// Advice given and not yet expired: `cpus` and `mem_bytes` counted as used on
/// `nodes`, shared evenly among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    pub nodes: NodeSet,
    pub cpus: f64,
    pub mem_bytes: u64,
}

/// A `-w NCPUS[:MB]` request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub cpus: u32,
    pub mem_bytes: u64,
}

use serde::{Deserialize, Serialize};

/// Why a request could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad -w value {0:?}: expected NCPUS[:MB], e.g. 2:1024")]
    Syntax(String),
    #[error("bad -w value {0:?}: the CPU count must be at least 1")]
    NoCpus(String),
}

impl Request {
    /// Parses numad's `NCPUS[:MB]`.
    pub fn parse(s: &str) -> Result<Self, RequestError> {
        let bad = || RequestError::Syntax(s.to_string());
        let (c, m) = match s.trim().split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (s.trim(), None),
        };
        let cpus: u32 = c.trim().parse().map_err(|_| bad())?;
        if cpus == 0 {
            return Err(RequestError::NoCpus(s.to_string()));
        }
        let mb: u64 = match m {
            Some(m) => m.trim().parse().map_err(|_| bad())?,
            None => 0,
        };
        Ok(Self {
            cpus,
            mem_bytes: mb.checked_mul(1 << 20).ok_or_else(bad)?,
        })
    }
}

/// Knobs shared with the daemon's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub target_utilisation_pct: u32,
    pub headroom_bytes: u64,
    pub reserved_cpus: CpuSet,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            target_utilisation_pct: 85,
            headroom_bytes: 512 << 20,
            reserved_cpus: CpuSet::new(),
        }
    }
}

/// CPUs in use per node (indexed like `topology.nodes`) from the snapshot's VMs:
/// each vCPU's demand on the node of the CPU it last ran on.
pub fn load_from_vms(snapshot: &Snapshot) -> Vec<f64> {
    let topo = &snapshot.topology;
    let mut load = vec![0.0; topo.nodes.len()];
    for v in snapshot.vms.iter().flat_map(|vm| &vm.vcpus) {
        let node = v
            .last_cpu
            .and_then(|c| topo.node_of_cpu(c))
            .or_else(|| v.affinity.first().and_then(|c| topo.node_of_cpu(c)));
        if let Some(i) = node.and_then(|n| topo.node_index(n)) {
            load[i] += v.cpu_demand.max(0.0);
        }
    }
    load
}

/// CPUs and bytes that `held` advice counts on `node`: each advice's request shared
/// evenly among its nodes.
fn held_on(held: &[Held], node: NodeId) -> (f64, u64) {
    held.iter()
        .filter(|h| h.nodes.contains(node))
        .fold((0.0, 0), |(cpus, bytes), h| {
            let n = h.nodes.len().max(1);
            (cpus + h.cpus / n as f64, bytes + h.mem_bytes / n as u64)
        })
}

#[derive(Clone, Copy, Debug)]
struct Room {
    id: NodeId,
    cpus: f64,
    mem_bytes: u64,
}

/// The advised node list; `busy_cpus` is CPUs in use per node, indexed like
/// `snapshot.topology.nodes` (missing entries count as idle), and `held` the advice
/// given lately whose VMs may not show in those figures yet. Empty only when the
/// snapshot has no nodes.
pub fn advise(
    snapshot: &Snapshot,
    req: &Request,
    busy_cpus: &[f64],
    held: &[Held],
    p: &Params,
) -> NodeSet {
    let topo = &snapshot.topology;
    let rooms: Vec<Room> = topo
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let usable = n.cpus.difference(&p.reserved_cpus).len() as f64;
            let capacity = usable * p.target_utilisation_pct as f64 / 100.0;
            let busy = busy_cpus.get(i).copied().unwrap_or(0.0);
            let (held_cpus, held_bytes) = held_on(held, n.id);
            Room {
                id: n.id,
                cpus: (capacity - busy - held_cpus).max(0.0),
                mem_bytes: n
                    .memory
                    .free_bytes
                    .saturating_sub(p.headroom_bytes)
                    .saturating_sub(held_bytes),
            }
        })
        .collect();
    if rooms.is_empty() {
        return NodeSet::new();
    }
    let need_cpus = req.cpus as f64;
    // numad's "magnitude": spare CPUs times spare memory; more is roomier.
    let magnitude = |r: &Room| r.cpus * r.mem_bytes as f64;
    let roomier = |a: &Room, b: &Room| {
        magnitude(a)
            .partial_cmp(&magnitude(b))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.id.cmp(&a.id))
    };
    let fits = |cpus: f64, mem: u64| cpus + 1e-9 >= need_cpus && mem >= req.mem_bytes;
    // One node when one fits: the roomiest of those (ties: lowest id).
    if let Some(r) = rooms
        .iter()
        .filter(|r| fits(r.cpus, r.mem_bytes))
        .max_by(|a, b| roomier(a, b))
    {
        return std::iter::once(r.id).collect();
    }
    let best = *rooms
        .iter()
        .max_by(|a, b| roomier(a, b))
        .expect("rooms is not empty");
    // Grow from the best node, nearest first, then roomiest.
    let mut chosen = vec![best];
    let mut rest: Vec<Room> = rooms.iter().filter(|r| r.id != best.id).copied().collect();
    rest.sort_by(|a, b| {
        topo.distance(best.id, a.id)
            .cmp(&topo.distance(best.id, b.id))
            .then(roomier(b, a))
    });
    for r in rest {
        if r.cpus <= 0.0 && r.mem_bytes == 0 {
            continue;
        }
        chosen.push(r);
        let cpus: f64 = chosen.iter().map(|r| r.cpus).sum();
        let mem: u64 = chosen.iter().map(|r| r.mem_bytes).sum();
        if fits(cpus, mem) {
            break;
        }
    }
    chosen.iter().map(|r| r.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Topology;

    const GIB: u64 = 1 << 30;

    fn snap(free_gib: &[u64]) -> Snapshot {
        let mut topo = Topology::uniform(free_gib.len() as u32, 4, 16 * GIB);
        for (n, f) in topo.nodes.iter_mut().zip(free_gib) {
            n.memory.free_bytes = f * GIB;
        }
        Snapshot {
            topology: topo,
            ..Default::default()
        }
    }

    #[test]
    fn parses_numad_requests() {
        assert_eq!(
            Request::parse("2:1024").unwrap(),
            Request {
                cpus: 2,
                mem_bytes: GIB
            }
        );
        assert_eq!(Request::parse("4").unwrap().mem_bytes, 0);
        assert!(matches!(
            Request::parse("0:10"),
            Err(RequestError::NoCpus(_))
        ));
        for bad in ["", "x", "2:", "2:x", "-1", "2:99999999999999999999"] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn advice_table() {
        let p = Params::default();
        // (free GiB per node, busy CPUs per node, request, advice)
        for (free, busy, req, want) in [
            // Roomiest node by memory wins when CPUs are equal.
            (vec![4, 10, 6, 2], vec![0.0; 4], "2:2048", "1"),
            // Node 1 has memory but its CPUs are busy (4 * 0.85 - 3 = 0.4 spare).
            (vec![4, 10, 6, 2], vec![0.0, 3.0, 0.0, 0.0], "2:2048", "2"),
            // Too big for one node: grows to the nearest nodes until it fits.
            (vec![8, 8, 8, 8], vec![0.0; 4], "6:1024", "0-1"),
            (vec![8, 8, 8, 8], vec![0.0; 4], "2:20480", "0-2"),
            // Cannot fit anywhere: every node with room.
            (vec![1, 1, 1, 1], vec![0.0; 4], "64:65536", "0-3"),
        ] {
            let s = snap(&free);
            let r = Request::parse(req).unwrap();
            assert_eq!(
                advise(&s, &r, &busy, &[], &p).to_string(),
                want,
                "{free:?} {busy:?} {req}"
            );
        }
        assert!(
            advise(
                &Snapshot::default(),
                &Request::parse("1").unwrap(),
                &[],
                &[],
                &p
            )
            .is_empty()
        );
    }

    #[test]
    fn reserved_cpus_and_distance() {
        let mut s = snap(&[8, 8, 8, 8]);
        // Node 0 is nearer to node 3 than to 1 and 2.
        s.topology.distance = vec![
            vec![10, 31, 31, 21],
            vec![31, 10, 21, 31],
            vec![31, 21, 10, 31],
            vec![21, 31, 31, 10],
        ];
        let p = Params {
            reserved_cpus: CpuSet::parse_list("4-7").unwrap(),
            ..Params::default()
        };
        let r = Request::parse("5:1024").unwrap();
        // Node 1 has no usable CPUs; node 0 first (ties by id), then its nearest, 3.
        assert_eq!(advise(&s, &r, &[0.0; 4], &[], &p).to_string(), "0,3");
    }

    /// VMs started together: each answer is held against its node, so the next
    /// request of the same batch goes elsewhere while there is room, as the lab's
    /// 4 domains of 1 vCPU on 4 nodes of 2 CPUs (85 % target: 1.7 CPUs each).
    #[test]
    fn held_advice_spreads_a_batch() {
        let mut s = Snapshot {
            topology: Topology::uniform(4, 2, 2 * GIB),
            ..Default::default()
        };
        for (n, free_mib) in s.topology.nodes.iter_mut().zip([1300, 1900, 1800, 1850]) {
            n.memory.free_bytes = free_mib << 20;
        }
        let p = Params::default();
        let r = Request::parse("1:256").unwrap();
        let busy = [0.2, 0.1, 0.0, 0.1];
        let mut held = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..4 {
            let nodes = advise(&s, &r, &busy, &held, &p);
            held.push(Held {
                nodes: nodes.clone(),
                cpus: f64::from(r.cpus),
                mem_bytes: r.mem_bytes,
            });
            answers.push(nodes.to_string());
        }
        // Roomiest first (CPUs x memory), each node once.
        assert_eq!(answers, ["1", "2", "3", "0"]);
        // Without holding, the batch would have piled onto one node.
        assert_eq!(advise(&s, &r, &busy, &[], &p).to_string(), "1");
        // A fifth no longer fits one node: the roomiest and the next share it.
        assert_eq!(advise(&s, &r, &busy, &held, &p).to_string(), "1-2");
        // Held advice over two nodes counts half on each.
        let two = Held {
            nodes: NodeSet::parse_list("0-1").unwrap(),
            cpus: 2.0,
            mem_bytes: 512 << 20,
        };
        assert_eq!(held_on(std::slice::from_ref(&two), 1), (1.0, 256 << 20));
        assert_eq!(held_on(&[two], 2), (0.0, 0));
    }

    /// A second of libvirt starting VMs on node 0 weighs a fifteenth of the window.
    #[test]
    fn load_is_averaged_over_the_window() {
        let mut w = LoadWindow::new(Duration::from_secs(1));
        assert_eq!(w.mean(), None);
        for _ in 0..14 {
            w.push(vec![0.1, 0.0]);
        }
        w.push(vec![1.6, 0.0]);
        let m = w.mean().unwrap();
        assert!((m[0] - 0.2).abs() < 1e-9, "{m:?}");
        // Older than the window: gone.
        for _ in 0..15 {
            w.push(vec![0.5, 1.0]);
        }
        assert_eq!(w.mean(), Some(vec![0.5, 1.0]));
        // A node came or went: the old figures no longer line up.
        w.push(vec![0.0, 0.0, 2.0]);
        assert_eq!(w.mean(), Some(vec![0.0, 0.0, 2.0]));
        // A tick longer than the window keeps the last measurement.
        let mut w = LoadWindow::new(Duration::from_secs(60));
        w.push(vec![1.0]);
        w.push(vec![0.0]);
        assert_eq!(w.mean(), Some(vec![0.0]));
    }

    #[test]
    fn load_from_vm_demand() {
        use crate::model::{Vcpu, Vm};
        let mut s = snap(&[8, 8]);
        s.vms.push(Vm {
            vcpus: vec![
                Vcpu {
                    last_cpu: Some(5),
                    cpu_demand: 0.75,
                    ..Default::default()
                },
                Vcpu {
                    affinity: CpuSet::parse_list("0-3").unwrap(),
                    cpu_demand: 0.5,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        assert_eq!(load_from_vms(&s), vec![0.5, 0.75]);
    }
}
