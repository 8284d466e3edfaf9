//! The status document: what `vmbalancer status` prints and Prometheus exports.
//!
//! One serde struct, filled by the tick loop and served as JSON over the control
//! socket, so the human output, `--json` and the metrics all show the same numbers.

use std::collections::VecDeque;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::model::{
    Action, ActionOutcome, CandidateVerdict, CpuSet, MoveChoice, NodeId, NodeSet, Reason, Snapshot,
    VmId,
};
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
    /// The searches that moved a VM's CPUs off a busy node, most recent last (as
    /// many as `decisions` keeps): every VM that was on the node with the figures
    /// the engine weighed (resident bytes, CPUs gained, bytes per CPU) and why it
    /// won or lost.
    #[serde(default)]
    pub cpu_choices: VecDeque<TimedChoice>,
    pub counters: QuietCounters,
    /// Cost of the eBPF programs, when telemetry is loaded.
    pub ebpf: Option<EbpfCost>,
    /// Placement advice answered (`vmbalancer advise`, libvirt's `numad -w`), most
    /// recent last, at most [`ADVICE_KEPT`].
    #[serde(default)]
    pub advice: VecDeque<AdviceGiven>,
}

/// How many answers of placement advice status keeps.
pub const ADVICE_KEPT: usize = 32;

/// One answer of placement advice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdviceGiven {
    /// Daemon uptime at the last tick before it answered.
    pub at_uptime_ms: u64,
    pub cpus: u32,
    pub mem_mb: u64,
    /// The advised node list, as printed for libvirt.
    pub nodes: String,
    /// Earlier answers still held against their nodes when this one was given.
    pub held_before: usize,
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
    /// The same, counted only from when memory moves of the daemon were running
    /// (a tick late before any move began is not late because of them): a move runs
    /// on the mover's threads and must not hold the loop.
    #[serde(default)]
    pub max_tick_late_moving_ns: u64,
    /// Ticks started early because the observer reported a wake
    /// (`daemon::wake`).
    #[serde(default)]
    pub woken_ticks: u64,
    /// The wakes behind them, by kind (`host::Wake::kind`).
    #[serde(default)]
    pub wakes: std::collections::BTreeMap<String, u64>,
    /// Median and 99th percentile of the last [`TICK_WINDOW`] ticks' durations.
    #[serde(default)]
    pub tick_p50_ns: u64,
    #[serde(default)]
    pub tick_p99_ns: u64,
    /// Observations that failed (host-wide errors).
    pub observe_errors: u64,
    /// User + system CPU time of the daemon (`/proc/self/stat`).
    pub cpu_time_ns: u64,
    /// Resident memory of the daemon (`/proc/self/statm`).
    pub rss_bytes: u64,
    /// Configuration reloads that took effect (SIGHUP).
    #[serde(default)]
    pub reloads: u64,
    /// Reloads refused because the file did not validate.
    #[serde(default)]
    pub reload_failures: u64,
    /// Why the last reload was refused, until one succeeds.
    #[serde(default)]
    pub last_reload_error: Option<String>,
    /// Keys the last reload changed that wait for a restart.
    #[serde(default)]
    pub restart_pending: Vec<String>,
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
    /// How the vCPU threads were found (thread names, QMP), or that they are unknown
    /// and why (then the VM is balanced as a whole process).
    #[serde(default)]
    pub vcpus_found: String,
    /// Why the VM's memory is never migrated, when it is not (confidential guest).
    #[serde(default)]
    pub memory_not_movable: Option<String>,
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

/// A search for a CPU move, with the observer clock of its tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimedChoice {
    pub at_ns: u64,
    #[serde(flatten)]
    pub choice: MoveChoice,
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
    /// the same VM; those not seen for [`REFUSAL_MEMORY_NS`] are dropped. Returns the
    /// refusals of a kind status did not show for that VM yet, for the log to say
    /// once what status keeps saying (figures such as an imbalance change every tick).
    pub fn note_refusals<'r>(
        &mut self,
        now_ns: u64,
        refusals: &'r [crate::model::Refusal],
    ) -> Vec<&'r crate::model::Refusal> {
        let kind = |w: &crate::model::RefusalReason| std::mem::discriminant(w);
        self.refusals
            .retain(|r| now_ns.saturating_sub(r.at_ns) <= REFUSAL_MEMORY_NS);
        let mut news = Vec::new();
        for r in refusals {
            let shown = self
                .refusals
                .iter()
                .any(|old| old.vm == r.vm && kind(&old.why) == kind(&r.why));
            if !shown {
                news.push(r);
            }
            self.refusals
                .retain(|old| !(old.vm == r.vm && kind(&old.why) == kind(&r.why)));
            self.refusals.push(RecentRefusal {
                at_ns: now_ns,
                vm: r.vm,
                why: r.why.clone(),
            });
        }
        news
    }

    /// Appends decisions in order, keeping the last `keep`.
    pub fn push_decisions(&mut self, ds: impl IntoIterator<Item = Decision>, keep: usize) {
        self.decisions.extend(ds);
        while self.decisions.len() > keep {
            self.decisions.pop_front();
        }
    }

    /// Appends this tick's searches that chose a VM to move, keeping the last `keep`.
    pub fn push_cpu_choices(&mut self, at_ns: u64, choices: &[MoveChoice], keep: usize) {
        self.cpu_choices
            .extend(
                choices
                    .iter()
                    .filter(|c| c.chosen.is_some())
                    .map(|c| TimedChoice {
                        at_ns,
                        choice: c.clone(),
                    }),
            );
        while self.cpu_choices.len() > keep {
            self.cpu_choices.pop_front();
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
            let cpus = if vm.vcpus_known() {
                vm.vcpus
                    .iter()
                    .fold(CpuSet::new(), |acc, v| acc.union(&v.affinity))
            } else {
                vm.process_affinity.clone()
            };
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
                vcpus_found: vm.vcpu_discovery.to_string(),
                memory_not_movable: vm.memory.not_movable.as_ref().map(|n| n.to_string()),
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

/// How many recent ticks the percentiles of [`DaemonInfo`] cover (4 minutes at the
/// default tick).
pub const TICK_WINDOW: usize = 256;

/// The durations of the last [`TICK_WINDOW`] ticks, for their percentiles.
#[derive(Clone, Debug, Default)]
pub struct TickDurations {
    recent_ns: std::collections::VecDeque<u64>,
}

impl TickDurations {
    /// Adds a tick and returns the window's (p50, p99), nearest-rank.
    pub fn push(&mut self, tick_ns: u64) -> (u64, u64) {
        if self.recent_ns.len() == TICK_WINDOW {
            self.recent_ns.pop_front();
        }
        self.recent_ns.push_back(tick_ns);
        let mut sorted: Vec<u64> = self.recent_ns.iter().copied().collect();
        sorted.sort_unstable();
        let rank =
            |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        (rank(0.50), rank(0.99))
    }
}

impl DaemonInfo {
    /// Records how late a tick started, and how much of that came while memory
    /// moves of the daemon ran (`None`: none ran).
    pub fn note_tick_late(&mut self, late_ns: u64, late_moving_ns: Option<u64>) {
        self.max_tick_late_ns = self.max_tick_late_ns.max(late_ns);
        if let Some(ns) = late_moving_ns {
            self.max_tick_late_moving_ns = self.max_tick_late_moving_ns.max(ns);
        }
    }
}

/// The human-readable form of `vmbalancer status`.
pub fn render_text(doc: &StatusDoc) -> String {
    let mut s = String::new();
    let d = &doc.daemon;
    let _ = writeln!(
        s,
        "vmbalancer {} (pid {}){}: up {:.0} s, {} ticks of {} ms, last tick {:.2} ms \
         (p50 {:.2} ms, p99 {:.2} ms, longest {:.0} ms, started at most {:.0} ms late, \
         {:.0} ms while moving memory)",
        d.version,
        d.pid,
        if d.dry_run { ", DRY RUN" } else { "" },
        d.uptime_ms as f64 / 1000.0,
        d.ticks,
        d.tick_ms,
        d.last_tick_ns as f64 / 1e6,
        d.tick_p50_ns as f64 / 1e6,
        d.tick_p99_ns as f64 / 1e6,
        d.max_tick_ns as f64 / 1e6,
        d.max_tick_late_ns as f64 / 1e6,
        d.max_tick_late_moving_ns as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "daemon cost: {:.2} s CPU, {} resident; observe errors {}",
        d.cpu_time_ns as f64 / 1e9,
        mib(d.rss_bytes),
        d.observe_errors
    );
    if d.woken_ticks > 0 {
        let kinds: Vec<String> = d.wakes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(
            s,
            "woken early by kernel events: {} ticks ({})",
            d.woken_ticks,
            kinds.join(", ")
        );
    }
    if d.reloads + d.reload_failures > 0 {
        let _ = writeln!(
            s,
            "configuration: reloaded {} times, {} refused{}{}",
            d.reloads,
            d.reload_failures,
            d.last_reload_error
                .as_ref()
                .map(|e| format!("; the last was refused: {e}"))
                .unwrap_or_default(),
            if d.restart_pending.is_empty() {
                String::new()
            } else {
                format!("; waiting for a restart: {}", d.restart_pending.join(", "))
            }
        );
    }
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
        if !vm.vcpus_found.is_empty() {
            let _ = writeln!(s, "          {}", vm.vcpus_found);
        }
        if let Some(why) = &vm.memory_not_movable {
            let _ = writeln!(
                s,
                "          memory never migrated: {why}; vCPUs stay where it is"
            );
        }
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
            let _ = writeln!(s, "  {who}: {}", r.why);
        }
    }
    if !doc.advice.is_empty() {
        let _ = writeln!(s, "\nPlacement advice given ({}):", doc.advice.len());
        for a in &doc.advice {
            let _ = writeln!(
                s,
                "  at {:.1} s: {} CPUs, {} MiB -> node(s) {} ({} earlier answers held)",
                a.at_uptime_ms as f64 / 1000.0,
                a.cpus,
                a.mem_mb,
                a.nodes,
                a.held_before
            );
        }
    }
    if let Some(c) = doc.cpu_choices.back() {
        render_choice(&mut s, doc, c);
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

/// Why a candidate won or lost, in words.
pub fn verdict_text(v: &CandidateVerdict) -> String {
    match v {
        CandidateVerdict::Chosen => "chosen: fewest bytes per CPU".into(),
        CandidateVerdict::Costlier { than } => format!("costlier per CPU than vm {than}"),
        CandidateVerdict::TooLittleGain { gain, best_gain } => {
            format!("helps too little (gain {gain:.2}, under a quarter of the best {best_gain:.2})")
        }
        CandidateVerdict::NoHelpfulTarget => "no node it could go to would help".into(),
        CandidateVerdict::MemoryBlocked { why } => {
            format!("no memory where it would help: {why:?}")
        }
        CandidateVerdict::NotMovable { why } => format!("not movable: {why}"),
        CandidateVerdict::Idle => "uses no CPU".into(),
    }
}

/// The latest CPU move's candidates, one line each.
fn render_choice(s: &mut String, doc: &StatusDoc, c: &TimedChoice) {
    let name = |pid: VmId| {
        doc.vms
            .iter()
            .find(|v| v.pid == pid)
            .map_or(String::new(), |v| v.name.clone())
    };
    let ch = &c.choice;
    let _ = writeln!(
        s,
        "\nLatest CPU move off node {} (imbalance {:.0} %): {}",
        ch.from,
        ch.imbalance_pct,
        ch.chosen
            .map_or("none".into(), |v| format!("vm {v} {}", name(v)))
    );
    let _ = writeln!(
        s,
        "  {:>7} {:<16} {:>10} {:>6} {:>4} {:>10} {:>12}  verdict",
        "vm", "name", "resident", "CPUs", "to", "to move", "per CPU"
    );
    for k in &ch.candidates {
        let who = match k.cell {
            Some(cell) => format!("{} cell {cell}", name(k.vm)),
            None => name(k.vm),
        };
        let _ = writeln!(
            s,
            "  {:>7} {:<16} {:>10} {:>6.2} {:>4} {:>10} {:>12}  {}",
            k.vm,
            who,
            mib(k.resident_bytes),
            k.cpus_gained,
            k.to.map_or("-".into(), |n| n.to_string()),
            mib(k.bytes_to_move),
            k.bytes_per_cpu
                .map_or("-".into(), |b| format!("{}/CPU", mib(b as u64))),
            verdict_text(&k.verdict)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_percentiles_cover_the_recent_window() {
        let mut t = TickDurations::default();
        assert_eq!(t.push(7), (7, 7));
        for ns in 1..=100 {
            t.push(ns);
        }
        // 102 values: 7, 1..=100 and 1000. Nearest rank: p50 is the 51st (50, as 7 is
        // there twice), p99 the 101st (100); the one slow tick does not move p99.
        assert_eq!(t.push(1000), (50, 100));
        for _ in 0..TICK_WINDOW {
            t.push(5);
        }
        assert_eq!(t.push(5), (5, 5), "old ticks leave the window");
    }

    #[test]
    fn lateness_while_moving_is_kept_apart() {
        let mut d = DaemonInfo::default();
        d.note_tick_late(1_300_000_000, None);
        d.note_tick_late(90_000_000, Some(80_000_000));
        d.note_tick_late(20_000_000, Some(20_000_000));
        assert_eq!(d.max_tick_late_ns, 1_300_000_000);
        assert_eq!(d.max_tick_late_moving_ns, 80_000_000);
        let doc = StatusDoc {
            daemon: d,
            ..Default::default()
        };
        let text = render_text(&doc);
        assert!(
            text.contains("started at most 1300 ms late, 80 ms while moving memory"),
            "{text}"
        );
        // A status written before the field existed still reads.
        let json = serde_json::to_value(&doc).unwrap();
        let mut old = json.clone();
        old["daemon"]
            .as_object_mut()
            .unwrap()
            .remove("max_tick_late_moving_ns");
        let back: StatusDoc = serde_json::from_value(old).unwrap();
        assert_eq!(back.daemon.max_tick_late_moving_ns, 0);
    }
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
        assert_eq!(doc.note_refusals(1_000, &[full(7), full(8)]).len(), 2);
        // A tick without refusals keeps them; the same kind again replaces, not adds,
        // and is not new for the log.
        assert!(doc.note_refusals(2_000, &[]).is_empty());
        assert!(doc.note_refusals(3_000, &[full(7)]).is_empty());
        assert_eq!(doc.refusals.len(), 2);
        assert!(render_text(&doc).contains("vm 7: node 2 has"));
        // Past the memory, only what was seen lately is left.
        doc.note_refusals(1_000 + REFUSAL_MEMORY_NS + 1, &[]);
        assert_eq!(doc.refusals.len(), 1);
        assert_eq!(doc.refusals[0].vm, Some(7));
    }

    #[test]
    fn cpu_choices_kept_and_shown_with_their_figures() {
        use crate::model::{CandidateVerdict, MoveCandidate, MoveChoice};
        let mib = 1u64 << 20;
        let cand = |vm, resident_mib: u64, cpus: f64, verdict| MoveCandidate {
            vm,
            cell: None,
            resident_bytes: resident_mib * mib,
            cpus_gained: cpus,
            to: Some(3),
            bytes_to_move: resident_mib * mib,
            bytes_per_cpu: Some((resident_mib * mib) as f64 / cpus),
            verdict,
        };
        let choice = |chosen| MoveChoice {
            from: 0,
            imbalance_pct: 120.0,
            chosen,
            candidates: vec![
                cand(7, 512, 2.0, CandidateVerdict::Chosen),
                cand(8, 128, 0.25, CandidateVerdict::Costlier { than: 7 }),
            ],
        };
        let mut doc = StatusDoc::default();
        doc.vms.push(VmStatus {
            pid: 7,
            name: "db".into(),
            ..Default::default()
        });
        // Searches that moved nothing are not kept; the last `keep` are.
        doc.push_cpu_choices(1, &[choice(None), choice(Some(7))], 2);
        doc.push_cpu_choices(2, &[choice(Some(7)), choice(Some(7))], 2);
        assert_eq!(doc.cpu_choices.len(), 2);
        assert_eq!(doc.cpu_choices[0].at_ns, 2);
        let text = render_text(&doc);
        assert!(
            text.contains("Latest CPU move off node 0 (imbalance 120 %): vm 7 db"),
            "{text}"
        );
        assert!(
            text.contains("256 MiB/CPU  chosen: fewest bytes per CPU"),
            "{text}"
        );
        assert!(
            text.contains("512 MiB/CPU  costlier per CPU than vm 7"),
            "{text}"
        );
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            json.pointer("/cpu_choices/0/chosen"),
            Some(&serde_json::json!(7))
        );
        assert_eq!(
            json.pointer("/cpu_choices/0/candidates/1/cpus_gained"),
            Some(&serde_json::json!(0.25))
        );
        // A daemon without the field still parses.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("cpu_choices");
        assert!(
            serde_json::from_value::<StatusDoc>(old)
                .unwrap()
                .cpu_choices
                .is_empty()
        );
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
        // A plain qemu whose vCPUs are unknown, and a confidential guest.
        let mut plain = snap.vms[0].clone();
        plain.pid = 43;
        plain.vcpus.clear();
        plain.process_affinity = CpuSet::parse_list("0-1").unwrap();
        plain.vcpu_discovery = crate::model::VcpuDiscovery::Unknown {
            why: "threads are not named".into(),
        };
        plain.memory.not_movable = Some(crate::model::MemoryNotMovable {
            kind: "tdx-guest".into(),
            option: "-object tdx-guest,id=t".into(),
        });
        snap.vms.push(plain);
        let vms = vm_statuses(&snap, |_| Err(crate::daemon::run::Unmanaged::Excluded));
        assert_eq!(vms[1].home_nodes.to_string(), "0");
        let text = render_text(&StatusDoc {
            vms: vms.clone(),
            ..Default::default()
        });
        assert!(text.contains("vCPUs by thread names"), "{text}");
        assert!(
            text.contains("vCPUs unknown (threads are not named): balanced as a whole process"),
            "{text}"
        );
        assert!(
            text.contains(
                "memory never migrated: confidential guest, tdx-guest (-object tdx-guest,id=t)"
            ),
            "{text}"
        );
        let vms = vms[..1].to_vec();
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
