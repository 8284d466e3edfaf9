//! The status document: what `vmbalancer status` prints and Prometheus exports.
//!
//! One serde struct, filled by the tick loop and served as JSON over the control
//! socket, so the human output, `--json` and the metrics all show the same numbers.

use std::collections::VecDeque;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::model::{Action, ActionOutcome, CpuSet, NodeId, NodeSet, Reason, Snapshot, VmId};
use crate::model::{MigrationProgress, QuietCounters};

/// Everything `vmbalancer status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    pub daemon: DaemonInfo,
    pub vms: Vec<VmStatus>,
    pub probations: Vec<Probation>,
    pub migrations: Vec<MigrationProgress>,
    /// Most recent last.
    pub decisions: VecDeque<Decision>,
    /// What the policy declined to do lately, and why (e.g. a node without free
    /// memory above the headroom): the latest of each kind per VM, for
    /// [`REFUSAL_MEMORY_NS`] after it was last seen.
    pub refusals: Vec<RecentRefusal>,
    pub counters: QuietCounters,
    /// Cost of the eBPF programs, when telemetry is loaded.
    pub ebpf: Option<EbpfCost>,
}

/// The daemon itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub version: String,
    pub dry_run: bool,
    pub tick_ms: u64,
    pub ticks: u64,
    pub uptime_ms: u64,
    /// Duration of the last tick (observe + plan + apply).
    pub last_tick_ns: u64,
    /// Longest tick so far (observe + plan + apply, memory moves included).
    #[serde(default)]
    pub max_tick_ns: u64,
    /// Most a tick started after it was due (one tick after the previous start).
    #[serde(default)]
    pub max_tick_late_ns: u64,
    /// Observations that failed (host-wide errors).
    pub observe_errors: u64,
    /// User + system CPU time of the daemon (`/proc/self/stat`).
    pub cpu_time_ns: u64,
    /// Resident memory of the daemon (`/proc/self/statm`).
    pub rss_bytes: u64,
}

/// One VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub pid: VmId,
    pub name: String,
    /// Whether vmbalancer may move it (configuration and pinning).
    pub managed: bool,
    /// Why not, when it may not.
    pub unmanaged_why: Option<String>,
    /// Nodes the VM's vCPUs may run on.
    pub home_nodes: NodeSet,
    /// CPUs the VM's vCPUs may run on (union).
    pub cpus: CpuSet,
    /// `(node, bytes)` of resident memory.
    pub memory_bytes_per_node: Vec<(NodeId, u64)>,
    /// Share of resident memory on the home nodes.
    pub locality_pct: Option<f64>,
}

/// A CPU-first move waiting to be committed or reverted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    pub vm: VmId,
    pub from: NodeId,
    pub to: NodeId,
    pub started_ns: u64,
    pub window_ns: u64,
    pub remaining_ns: u64,
}

/// One applied (or refused) action with its reason and outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Observer clock of the tick.
    pub at_ns: u64,
    pub vm: VmId,
    pub action: Action,
    pub reason: Reason,
    pub outcome: ActionOutcome,
}

/// What the eBPF programs cost (from the kernel's run time statistics).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EbpfCost {
    pub run_time_ns: u64,
    pub run_count: u64,
    pub events_lost: u64,
}

/// How long a refusal stays in status after the policy last gave it. Refusals come
/// and go between ticks (a move is planned on one tick and refused on the next), so
/// the last tick alone would often show none.
pub const REFUSAL_MEMORY_NS: u64 = 30_000_000_000;

/// A refusal of the policy, with when it was last given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecentRefusal {
    pub at_ns: u64,
    pub vm: Option<crate::model::VmId>,
    pub why: crate::model::RefusalReason,
}

impl StatusDoc {
    /// Records this tick's refusals: each replaces an older one of the same kind for
    /// the same VM; those not seen for [`REFUSAL_MEMORY_NS`] are dropped.
    pub fn note_refusals(&mut self, now_ns: u64, refusals: &[crate::model::Refusal]) {
        let kind = |w: &crate::model::RefusalReason| std::mem::discriminant(w);
        for r in refusals {
            self.refusals
                .retain(|old| !(old.vm == r.vm && kind(&old.why) == kind(&r.why)));
            self.refusals.push(RecentRefusal {
                at_ns: now_ns,
                vm: r.vm,
                why: r.why.clone(),
            });
        }
        self.refusals
            .retain(|r| now_ns.saturating_sub(r.at_ns) <= REFUSAL_MEMORY_NS);
    }

    /// Appends a decision, keeping at most `keep`.
    /// Appends decisions in order, keeping the last `keep`.
    pub fn push_decisions(&mut self, ds: impl IntoIterator<Item = Decision>, keep: usize) {
        self.decisions.extend(ds);
        while self.decisions.len() > keep {
            self.decisions.pop_front();
        }
    }
}

/// The per-VM view of a snapshot. `managed` tells, per VM, whether the daemon may move
/// it and why not.
pub fn vm_statuses(
    snapshot: &Snapshot,
    managed: impl Fn(&crate::model::Vm) -> Result<(), super::run::Unmanaged>,
) -> Vec<VmStatus> {
    let topo = &snapshot.topology;
    snapshot
        .vms
        .iter()
        .map(|vm| {
            let cpus = vm
                .vcpus
                .iter()
                .fold(CpuSet::new(), |acc, v| acc.union(&v.affinity));
            let home_nodes: NodeSet = topo
                .nodes
                .iter()
                .filter(|n| n.cpus.intersects(&cpus))
                .map(|n| n.id)
                .collect();
            let memory_bytes_per_node: Vec<(NodeId, u64)> = topo
                .nodes
                .iter()
                .zip(&vm.memory.bytes_per_node)
                .map(|(n, b)| (n.id, *b))
                .collect();
            let bytes: Vec<u64> = memory_bytes_per_node.iter().map(|(_, b)| *b).collect();
            let locality_pct = crate::model::local_share_on(&bytes, |i| {
                home_nodes.contains(memory_bytes_per_node[i].0)
            })
            .map(|s| 100.0 * s);
            let verdict = managed(vm);
            VmStatus {
                pid: vm.pid,
                name: vm.name.clone(),
                managed: verdict.is_ok(),
                unmanaged_why: verdict.err().map(|why| why.to_string()),
                home_nodes,
                cpus,
                memory_bytes_per_node,
                locality_pct,
            }
        })
        .collect()
}

/// The daemon's own CPU time and resident memory, from `/proc/self` (`stat` through
/// the host layer's reader, `statm` through the `procfs` crate); 0 when unreadable.
pub fn self_usage() -> (u64, u64) {
    use crate::host::linux::procfs;
    let hz = procfs::clock_ticks_per_s().max(1);
    let page = crate::host::linux::actuate::sys::page_size_bytes();
    let cpu_ns = procfs::read_stat(std::path::Path::new("/proc"), std::process::id())
        .map_or(0, |s| {
            (u128::from(s.cpu_ticks()) * 1_000_000_000 / u128::from(hz)) as u64
        });
    let rss = ::procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map_or(0, |m| m.resident.saturating_mul(page));
    (cpu_ns, rss)
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

/// The human-readable form of `vmbalancer status`.
pub fn render_text(doc: &StatusDoc) -> String {
    let mut s = String::new();
    let d = &doc.daemon;
    let _ = writeln!(
        s,
        "vmbalancer {} (pid {}){}: up {:.0} s, {} ticks of {} ms, last tick {:.2} ms \
         (longest {:.0} ms, started at most {:.0} ms late)",
        d.version,
        d.pid,
        if d.dry_run { ", DRY RUN" } else { "" },
        d.uptime_ms as f64 / 1000.0,
        d.ticks,
        d.tick_ms,
        d.last_tick_ns as f64 / 1e6,
        d.max_tick_ns as f64 / 1e6,
        d.max_tick_late_ns as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "daemon cost: {:.2} s CPU, {} resident; observe errors {}",
        d.cpu_time_ns as f64 / 1e9,
        mib(d.rss_bytes),
        d.observe_errors
    );
    match &doc.ebpf {
        Some(e) => {
            let _ = writeln!(
                s,
                "eBPF cost: {:.3} s in {} runs, {} events lost",
                e.run_time_ns as f64 / 1e9,
                e.run_count,
                e.events_lost
            );
        }
        None => {
            let _ = writeln!(s, "eBPF cost: telemetry not loaded");
        }
    }
    let c = &doc.counters;
    let _ = writeln!(
        s,
        "handled quietly: {} VMs gone, {} threads gone, {} cgroups gone; {} refused",
        c.vm_gone, c.threads_gone, c.cgroups_gone, c.refused
    );
    let _ = writeln!(s, "\nVMs ({}):", doc.vms.len());
    for vm in &doc.vms {
        let mem: Vec<String> = vm
            .memory_bytes_per_node
            .iter()
            .map(|(n, b)| format!("N{n}={}", mib(*b)))
            .collect();
        let _ = writeln!(
            s,
            "  {:>7} {:<20} home {:<6} cpus {:<10} local {:>5} mem {}{}",
            vm.pid,
            vm.name,
            vm.home_nodes.to_string(),
            vm.cpus.to_string(),
            vm.locality_pct.map_or("-".into(), |p| format!("{p:.0}%")),
            mem.join(" "),
            vm.unmanaged_why
                .as_ref()
                .map_or(String::new(), |w| format!("  [left alone: {w}]"))
        );
    }
    let _ = writeln!(s, "\nProbation ({}):", doc.probations.len());
    for p in &doc.probations {
        let _ = writeln!(
            s,
            "  vm {} node {} -> {}: {:.1} s of {:.1} s left",
            p.vm,
            p.from,
            p.to,
            p.remaining_ns as f64 / 1e9,
            p.window_ns as f64 / 1e9
        );
    }
    let _ = writeln!(s, "\nMigrations in flight ({}):", doc.migrations.len());
    for m in &doc.migrations {
        let _ = writeln!(
            s,
            "  vm {} node {} -> {}: {} moved, {} left",
            m.vm,
            m.from,
            m.to,
            mib(m.moved_bytes),
            mib(m.left_bytes)
        );
    }
    if !doc.refusals.is_empty() {
        let _ = writeln!(s, "\nRefused lately ({}):", doc.refusals.len());
        for r in &doc.refusals {
            let who = r.vm.map_or("host".to_string(), |v| format!("vm {v}"));
            let _ = writeln!(s, "  {who}: {:?}", r.why);
        }
    }
    let _ = writeln!(s, "\nLast decisions ({}):", doc.decisions.len());
    for dcs in doc.decisions.iter().rev() {
        let _ = writeln!(
            s,
            "  vm {}: {:?} because {:?} -> {:?}",
            dcs.vm, dcs.action, dcs.reason, dcs.outcome
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Topology, Vcpu, Vm, VmMemory};

    #[test]
    fn refusals_stay_for_a_while_one_per_kind_and_vm() {
        use crate::model::{Refusal, RefusalReason};
        let full = |vm| Refusal {
            vm: Some(vm),
            why: RefusalReason::TargetMemoryFull {
                node: 2,
                free_bytes: 1,
                headroom_bytes: 2,
            },
        };
        let mut doc = StatusDoc::default();
        doc.note_refusals(1_000, &[full(7), full(8)]);
        // A tick without refusals keeps them; the same kind again replaces, not adds.
        doc.note_refusals(2_000, &[]);
        doc.note_refusals(3_000, &[full(7)]);
        assert_eq!(doc.refusals.len(), 2);
        assert!(render_text(&doc).contains("TargetMemoryFull"));
        // Past the memory, only what was seen lately is left.
        doc.note_refusals(1_000 + REFUSAL_MEMORY_NS + 1, &[]);
        assert_eq!(doc.refusals.len(), 1);
        assert_eq!(doc.refusals[0].vm, Some(7));
    }

    #[test]
    fn vm_view_and_text() {
        let mut snap = Snapshot {
            topology: Topology::uniform(2, 2, 8 << 30),
            ..Default::default()
        };
        snap.vms.push(Vm {
            pid: 42,
            name: "web".into(),
            vcpus: vec![Vcpu {
                affinity: CpuSet::parse_list("2-3").unwrap(),
                ..Default::default()
            }],
            memory: VmMemory {
                bytes_per_node: vec![1 << 30, 3 << 30],
                ..Default::default()
            },
            ..Default::default()
        });
        let vms = vm_statuses(&snap, |_| Err(crate::daemon::run::Unmanaged::Excluded));
        assert_eq!(vms[0].home_nodes.to_string(), "1");
        assert_eq!(vms[0].locality_pct, Some(75.0));
        assert!(!vms[0].managed);
        let mut doc = StatusDoc {
            vms,
            ..Default::default()
        };
        for i in 0..5 {
            doc.push_decisions(
                [Decision {
                    at_ns: i,
                    vm: 42,
                    action: Action::SetCpus {
                        vcpus: None,
                        cpus: CpuSet::parse_list("0-1").unwrap(),
                    },
                    reason: Reason::InitialPlacement { node: 0 },
                    outcome: ActionOutcome::Refused {
                        why: "node 0 is full".into(),
                    },
                }],
                3,
            );
        }
        assert_eq!(doc.decisions.len(), 3);
        assert_eq!(doc.decisions[0].at_ns, 2);
        let text = render_text(&doc);
        assert!(text.contains("left alone: excluded"), "{text}");
        assert!(text.contains("node 0 is full"), "{text}");
        let json = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<StatusDoc>(&json).unwrap(), doc);
        let (cpu, rss) = self_usage();
        assert!(rss > 0);
        let _ = cpu;
    }
}
