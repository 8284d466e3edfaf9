//! The loop against a scripted policy, a scripted observer and a recording applier.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;

use super::*;
use crate::host::Applier;
use crate::host::linux::actuate::cpus::reserved_refusal;
use crate::model::{Action, CpuSet, Pinning, Reason, Topology};
use crate::model::{GroupSets, OperatorPins, OriginalSets, QuietCounters, RestoreWhat};

#[derive(Debug)]
struct Boom;
impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sysfs vanished")
    }
}
impl std::error::Error for Boom {}

/// Returns its snapshots in order, then repeats the last; `None` entries fail.
struct Scripted {
    snaps: VecDeque<Option<Snapshot>>,
    last: Option<Snapshot>,
}
impl Observer for Scripted {
    type Error = Boom;
    fn observe(&mut self) -> Result<Snapshot, Boom> {
        match self.snaps.pop_front() {
            Some(Some(s)) => {
                self.last = Some(s.clone());
                Ok(s)
            }
            Some(None) => Err(Boom),
            None => self.last.clone().ok_or(Boom),
        }
    }

    /// The cost a loaded eBPF program set would report.
    fn program_cost(&self) -> Option<crate::telemetry::ProgramCost> {
        Some(crate::telemetry::ProgramCost {
            program: "all".into(),
            run_count: 3,
            run_time_ns: 1500,
        })
    }
}

#[derive(Default, Clone)]
struct Record {
    applied: Arc<Mutex<Vec<PlannedAction>>>,
    restored: Arc<Mutex<Vec<(u32, RestoreWhat)>>>,
    /// The record each restore was given.
    restored_sets: Arc<Mutex<Vec<OriginalSets>>>,
    in_flight_seen: Arc<Mutex<Vec<bool>>>,
}

struct Fake {
    rec: Record,
    outcome: ActionOutcome,
    alive: BTreeSet<u32>,
    journal: Option<PathBuf>,
    /// Refuses CPU sets touching these, with the Linux applier's own guard.
    reserved: CpuSet,
    /// The cpuset groups each adopted VM is recorded with.
    groups: Vec<GroupSets>,
}

/// Outcomes of background moves the test lets end, by VM.
type EndedQueue = Arc<Mutex<Vec<(PlannedAction, ActionOutcome)>>>;
impl Applier for Fake {
    fn apply(&mut self, _s: &Snapshot, a: &PlannedAction) -> ActionOutcome {
        if let Action::SetCpus { cpus, .. } = &a.action
            && let Some(why) = reserved_refusal(cpus, &self.reserved)
        {
            return ActionOutcome::Refused {
                why: why.to_string(),
            };
        }
        // The journal must name the action before the host changes.
        if let Some(p) = &self.journal {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            self.rec
                .in_flight_seen
                .lock()
                .unwrap()
                .push(text.contains("\"in_flight\": {"));
        }
        self.rec.applied.lock().unwrap().push(a.clone());
        self.outcome.clone()
    }

    fn retune(&mut self, t: &crate::host::Tunables) {
        self.reserved = t.reserved_cpus.clone();
    }
}
impl Actuator for Fake {
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        self.alive.contains(&vm.pid).then(|| OriginalSets {
            vm: vm.pid,
            start_time_ticks: 7,
            threads: [(vm.pid, CpuSet::parse_list("0-3").unwrap())].into(),
            groups: self.groups.clone(),
        })
    }
    fn readopt(&mut self, _o: OriginalSets) {}
    fn restore(&mut self, o: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        self.rec.restored.lock().unwrap().push((o.vm, what));
        self.rec.restored_sets.lock().unwrap().push(o.clone());
        ActionOutcome::Done { moved_bytes: 0 }
    }
    fn alive(&self, o: &OriginalSets) -> bool {
        self.alive.contains(&o.vm)
    }
    fn forget(&mut self, _vm: u32) {}
    fn counters(&self) -> QuietCounters {
        QuietCounters {
            refused: 1,
            ..Default::default()
        }
    }
}

impl Fake {
    /// A host where the VMs `alive` live and every action is `Done`; it checks no
    /// journal and reserves no CPU.
    fn new(rec: &Record, alive: impl IntoIterator<Item = u32>) -> Self {
        Self {
            rec: rec.clone(),
            outcome: ActionOutcome::Done { moved_bytes: 0 },
            alive: alive.into_iter().collect(),
            journal: None,
            reserved: CpuSet::new(),
            groups: Vec::new(),
        }
    }
}

impl Scripted {
    fn new(snaps: impl IntoIterator<Item = Option<Snapshot>>) -> Self {
        Self {
            snaps: snaps.into_iter().collect(),
            last: None,
        }
    }
}

/// A daemon of `cfg` over the test's observer, host and policy, with its own
/// shutdown signal, not a dry run.
fn daemon<O: Observer, A: Actuator, P: Policy>(
    cfg: &Config,
    observer: O,
    host: A,
    policy: P,
    journal: Option<Journal>,
) -> Daemon<O, A, P> {
    Daemon::new(
        cfg.clone(),
        observer,
        host,
        policy,
        journal,
        Shutdown::new(),
        false,
    )
}

/// Moves memory in the background: memory actions answer `Started` and end when
/// the test pushes their outcome.
struct Background {
    inner: Fake,
    ended: EndedQueue,
    waited: Arc<Mutex<Vec<Option<Duration>>>>,
}
impl Applier for Background {
    fn apply(&mut self, s: &Snapshot, a: &PlannedAction) -> ActionOutcome {
        let o = self.inner.apply(s, a);
        if a.action.moves_memory() {
            ActionOutcome::Started
        } else {
            o
        }
    }
}
impl Actuator for Background {
    fn adopt(&mut self, vm: &Vm) -> Option<OriginalSets> {
        self.inner.adopt(vm)
    }
    fn readopt(&mut self, o: OriginalSets) {
        self.inner.readopt(o)
    }
    fn restore(&mut self, o: &OriginalSets, what: RestoreWhat) -> ActionOutcome {
        self.inner.restore(o, what)
    }
    fn alive(&self, o: &OriginalSets) -> bool {
        self.inner.alive(o)
    }
    fn forget(&mut self, vm: u32) {
        self.inner.forget(vm)
    }
    fn counters(&self) -> QuietCounters {
        self.inner.counters()
    }
    fn ended_moves(&mut self, wait: Option<Duration>) -> Vec<(PlannedAction, ActionOutcome)> {
        self.waited.lock().unwrap().push(wait);
        std::mem::take(&mut *self.ended.lock().unwrap())
    }
}

fn mem(vm: u32) -> PlannedAction {
    mem_from(vm, 0)
}

fn mem_from(vm: u32, from: u32) -> PlannedAction {
    PlannedAction {
        vm,
        action: Action::MigrateMemory {
            from,
            to: 1,
            regions: vec![],
            max_bytes: 1 << 20,
            within: None,
        },
        reason: Reason::Locality {
            locality_pct: 25.0,
            target_pct: 90.0,
        },
    }
}

#[test]
fn background_moves_keep_their_journal_entry_until_they_end() {
    let dir = temp("background");
    let cfg = test_config(&dir);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let ended: EndedQueue = Arc::default();
    let waited = Arc::new(Mutex::new(Vec::new()));
    let host = Background {
        inner: Fake::new(&rec, [1, 2]),
        ended: ended.clone(),
        waited: waited.clone(),
    };
    let vms = vec![vm(1, "web", Pinning::None), vm(2, "db", Pinning::None)];
    let observer = Scripted::new([Some(snap(vms))]);
    let policy = ScriptedPolicy::new([
        vec![mem(1), mem_from(1, 2), cpus(1, "2-3"), cpus(2, "2-3")],
        vec![mem(2)],
    ]);
    let feedback = policy.feedback.clone();
    let mut d = daemon(&cfg, observer, host, policy, Some(journal));

    d.tick();
    // The moves run (the second queued behind the first): the journal entry stays in
    // flight, and no CPU change of that VM starts meanwhile; other VMs go on.
    let fb = feedback.lock().unwrap().clone();
    assert_eq!(fb[0], (1, ActionOutcome::Started));
    assert_eq!(fb[1], (1, ActionOutcome::Started));
    assert!(matches!(&fb[2].1, ActionOutcome::Refused { why } if why.contains("still running")));
    assert_eq!(fb[3], (2, ActionOutcome::Done { moved_bytes: 0 }));
    assert!(d.journal().unwrap().entries()[&1].in_flight.is_some());
    assert!(d.journal().unwrap().entries()[&2].in_flight.is_none());

    // The second ends first (moves run side by side): the entry stays open for the
    // first, and the outcome is told with the action that ended.
    ended
        .lock()
        .unwrap()
        .push((mem_from(1, 2), ActionOutcome::Done { moved_bytes: 4096 }));
    d.tick();
    let fb = feedback.lock().unwrap().clone();
    assert_eq!(fb[4], (1, ActionOutcome::Done { moved_bytes: 4096 }));
    assert_eq!(fb[5], (2, ActionOutcome::Started));
    assert!(d.journal().unwrap().entries()[&1].in_flight.is_some());
    // The other ends between two ticks: the next tick closes the entry.
    ended
        .lock()
        .unwrap()
        .push((mem(1), ActionOutcome::Done { moved_bytes: 8192 }));
    d.tick();
    assert_eq!(
        feedback.lock().unwrap()[6],
        (1, ActionOutcome::Done { moved_bytes: 8192 })
    );
    assert!(d.journal().unwrap().entries()[&1].in_flight.is_none());
    {
        let s = d.shared();
        let s = s.lock().unwrap();
        let ended_with = |bytes| {
            s.status
                .decisions
                .iter()
                .find(|x| x.vm == 1 && x.outcome == ActionOutcome::Done { moved_bytes: bytes })
                .map(|x| x.action.clone())
        };
        assert_eq!(ended_with(4096), Some(mem_from(1, 2).action));
        assert_eq!(ended_with(8192), Some(mem(1).action));
    }

    // On the way out the daemon waits for the move still running (bounded).
    ended.lock().unwrap().push((
        mem(2),
        ActionOutcome::Partial {
            moved_bytes: 0,
            left_bytes: 1 << 20,
            why: "stopped at a batch boundary by shutdown".into(),
        },
    ));
    d.finish();
    assert_eq!(waited.lock().unwrap().last(), Some(&Some(STOP_MOVES_WAIT)));
    assert!(
        d.journal()
            .is_none_or(|j| j.entries().get(&2).is_none_or(|e| e.in_flight.is_none()))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tick_journals_its_actions_in_one_write_and_closes_them_in_one_more() {
    let dir = temp("one-write");
    let cfg = test_config(&dir);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let host = Background {
        inner: Fake {
            journal: Some(journal.path().to_path_buf()),
            ..Fake::new(&rec, [1, 2, 3, 4])
        },
        ended: Arc::default(),
        waited: Arc::default(),
    };
    let vms = (1..=4)
        .map(|p| vm(p, &format!("vm{p}"), Pinning::None))
        .collect();
    let observer = Scripted::new([Some(snap(vms))]);
    // A memory move, then a CPU change of the same VM in the same tick: the CPU
    // change waits for the move, as it would behind a move of an earlier tick.
    let policy = ScriptedPolicy::new([vec![
        cpus(1, "2-3"),
        cpus(2, "0-1"),
        mem(3),
        cpus(3, "2-3"),
        mem(4),
        mem(4),
    ]]);
    let feedback = policy.feedback.clone();
    let mut d = daemon(&cfg, observer, host, policy, Some(journal));

    d.tick();
    // Every action that went was in the journal before the host changed.
    assert_eq!(*rec.in_flight_seen.lock().unwrap(), vec![true; 5]);
    // One write for the five that went, one closing the two CPU changes.
    assert_eq!(d.journal().unwrap().writes(), 2);
    let fb = feedback.lock().unwrap().clone();
    assert_eq!(fb.len(), 6);
    assert!(matches!(&fb[3].1, ActionOutcome::Refused { why } if why.contains("still running")));
    let entries = d.journal().unwrap().entries();
    assert!(entries[&1].in_flight.is_none());
    assert!(entries[&2].in_flight.is_none());
    assert!(entries[&3].in_flight.is_some());
    assert!(entries[&4].in_flight.is_some());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Plans one scripted plan per tick and keeps the feedback.
#[derive(Default)]
struct ScriptedPolicy {
    plans: VecDeque<Plan>,
    feedback: Arc<Mutex<Vec<(u32, ActionOutcome)>>>,
}
impl ScriptedPolicy {
    /// Plans `plans` (each a plan's actions), one a tick, then nothing.
    fn new(plans: impl IntoIterator<Item = Vec<PlannedAction>>) -> Self {
        Self {
            plans: plans
                .into_iter()
                .map(|actions| Plan {
                    actions,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}
impl Policy for ScriptedPolicy {
    fn plan(&mut self, _s: &Snapshot) -> Plan {
        self.plans.pop_front().unwrap_or_default()
    }
    fn feedback(&mut self, a: &PlannedAction, o: &ActionOutcome) {
        self.feedback.lock().unwrap().push((a.vm, o.clone()));
    }
}

fn vm(pid: u32, name: &str, pinning: Pinning) -> Vm {
    Vm {
        pid,
        name: name.into(),
        pinning,
        ..Default::default()
    }
}

fn snap(vms: Vec<Vm>) -> Snapshot {
    Snapshot {
        now_ns: 5,
        topology: Topology::uniform(2, 2, 8 << 30),
        vms,
        ..Default::default()
    }
}

fn cpus(vm: u32, list: &str) -> PlannedAction {
    PlannedAction {
        vm,
        action: Action::SetCpus {
            vcpus: None,
            cpus: CpuSet::parse_list(list).unwrap(),
        },
        reason: Reason::CpuImbalance {
            from: 0,
            to: 1,
            imbalance_pct: 40.0,
        },
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmb-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn test_config(dir: &std::path::Path) -> Config {
    Config {
        tick_ms: 100,
        probation_window_ms: 1000,
        state_dir: dir.join("state"),
        runtime_dir: dir.join("run"),
        exclude_vms: vec![super::super::config::VmSelector::Name("secret-*".into())],
        ..Config::default()
    }
}

#[test]
fn tick_applies_guards_journals_and_reports() {
    let dir = temp("tick");
    let cfg = test_config(&dir);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let fake = Fake {
        journal: Some(journal.path().to_path_buf()),
        ..Fake::new(&rec, [1, 2, 3])
    };
    let vms = vec![
        vm(1, "web", Pinning::None),
        vm(2, "secret-db", Pinning::None),
        vm(
            3,
            "pinned",
            Pinning::Operator {
                why: "vcpupin".into(),
            },
        ),
    ];
    let observer = Scripted::new([None, Some(snap(vms.clone())), Some(snap(vec![]))]);
    let policy = ScriptedPolicy::new([vec![
        cpus(1, "2-3"),
        cpus(2, "2-3"),
        cpus(3, "2-3"),
        cpus(9, "0"),
    ]]);
    let feedback = policy.feedback.clone();
    let mut d = daemon(&cfg, observer, fake, policy, Some(journal));

    // A failing observation is counted, nothing is planned.
    assert_eq!(d.tick(), TickReport::default());
    let r = d.tick();
    assert_eq!(
        r,
        TickReport {
            observed: true,
            planned: 4,
            applied: 1,
            refused_by_config: 2
        }
    );
    assert_eq!(*rec.applied.lock().unwrap(), vec![cpus(1, "2-3")]);
    assert_eq!(*rec.in_flight_seen.lock().unwrap(), vec![true]);
    let fb = feedback.lock().unwrap().clone();
    assert_eq!(fb.len(), 4);
    assert_eq!(fb[0], (1, ActionOutcome::Done { moved_bytes: 0 }));
    assert!(matches!(&fb[1].1, ActionOutcome::Refused { why } if why.contains("excluded")));
    assert!(matches!(&fb[2].1, ActionOutcome::Refused { why } if why.contains("vcpupin")));
    assert_eq!(fb[3], (9, ActionOutcome::VmGone));
    // After the action the journal keeps the original sets but nothing in flight.
    let j = d.journal().unwrap();
    assert!(j.entries()[&1].in_flight.is_none());
    let shared = d.shared();
    {
        let s = shared.lock().unwrap();
        assert_eq!(s.status.daemon.ticks, 1);
        assert_eq!(s.status.daemon.observe_errors, 1);
        assert_eq!(s.status.decisions.len(), 4);
        assert_eq!(s.status.vms.len(), 3);
        assert!(!s.status.vms[2].managed);
        assert_eq!(s.status.counters.refused, 1);
        assert_eq!(s.status.ebpf.as_ref().map(|e| e.run_count), Some(3));
    }
    // Status and advice through the control handler.
    let h = handler(
        shared.clone(),
        advice::Params::default(),
        Reloads::default(),
        Duration::from_millis(100),
    );
    assert!(matches!(h.handle(Request::Status), Response::Status(doc) if doc.daemon.ticks == 1));
    assert_eq!(
        h.handle(Request::Advise { cpus: 1, mem_mb: 1 }),
        Response::Advice { nodes: "0".into() }
    );
    // The answer is held against node 0 (2 CPUs at 85 %: 0.7 left), so the next
    // VM of a batch started together goes to node 1, and a third fits neither alone.
    assert_eq!(
        h.handle(Request::Advise { cpus: 1, mem_mb: 1 }),
        Response::Advice { nodes: "1".into() }
    );
    assert_eq!(
        h.handle(Request::Advise { cpus: 1, mem_mb: 1 }),
        Response::Advice {
            nodes: "0-1".into()
        }
    );
    {
        let s = shared.lock().unwrap();
        let given: Vec<(&str, usize)> = s
            .status
            .advice
            .iter()
            .map(|a| (a.nodes.as_str(), a.held_before))
            .collect();
        assert_eq!(given, [("0", 0), ("1", 1), ("0-1", 2)]);
        assert_eq!(s.advice_held.len(), 3);
    }
    // No loop takes the reload here: the request says so instead of hanging.
    assert!(
        matches!(h.handle(Request::Reload), Response::Error { error } if error.contains("did not take")),
    );

    // VM 1 exits: its journal entry goes once the host says it is gone.
    d.actuator.alive.remove(&1);
    d.tick();
    assert!(d.journal().unwrap().entries().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn crash_recovery_finishes_or_reverts_through_the_actuator() {
    let dir = temp("recover");
    let cfg = test_config(&dir);
    {
        // The "crashed" run: two VMs adopted, actions in flight.
        let mut j = Journal::open(&cfg.state_dir).unwrap();
        let mut fake = Fake::new(&Record::default(), [1, 2, 3]);
        for v in [1, 2, 3] {
            j.adopt(fake.adopt(&vm(v, "x", Pinning::None)).unwrap())
                .unwrap();
        }
        j.begin(&cpus(1, "2-3"), 1).unwrap(); // valid target: finish
        j.begin(&cpus(2, "6-7"), 1).unwrap(); // CPUs gone: revert
        j.begin(&cpus(3, "0"), 1).unwrap(); // VM gone: forget
    }
    let rec = Record::default();
    let fake = Fake::new(&rec, [1, 2]);
    let observer = Scripted::new([Some(snap(vec![
        vm(1, "a", Pinning::None),
        vm(2, "b", Pinning::None),
    ]))]);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let mut d = daemon(
        &cfg,
        observer,
        fake,
        ScriptedPolicy::default(),
        Some(journal),
    );
    let done = d.recover().unwrap();
    assert_eq!(done.len(), 3);
    assert_eq!(*rec.applied.lock().unwrap(), vec![cpus(1, "2-3")]);
    assert_eq!(
        *rec.restored.lock().unwrap(),
        vec![(
            2,
            RestoreWhat {
                cpus: true,
                mems: false
            }
        )]
    );
    let j = Journal::open(&cfg.state_dir).unwrap();
    assert_eq!(j.entries().keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert!(j.entries().values().all(|e| e.in_flight.is_none()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn async_run_serves_status_and_restores_on_shutdown() {
    let dir = temp("async");
    let cfg = test_config(&dir);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let fake = Fake::new(&rec, [1]);
    let observer = Scripted::new([Some(snap(vec![vm(1, "web", Pinning::None)]))]);
    let policy = ScriptedPolicy::new([vec![cpus(1, "0-1")]]);
    let shutdown = Shutdown::new();
    let d = Daemon::new(
        cfg.clone(),
        observer,
        fake,
        policy,
        Some(journal),
        shutdown.clone(),
        false,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let handle = rt.spawn(run(d));
    let sock = cfg.control_socket_path();
    let mut ticks = 0;
    for _ in 0..100 {
        if let Ok(Response::Status(doc)) =
            control::request(&sock, &Request::Status, Duration::from_secs(2))
            && doc.daemon.ticks >= 2
        {
            ticks = doc.daemon.ticks;
            assert_eq!(doc.decisions.len(), 1);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ticks >= 2, "the daemon did not tick");
    shutdown.trigger();
    rt.block_on(handle).unwrap().unwrap();
    assert!(!sock.exists(), "socket removed on exit");
    assert_eq!(rec.applied.lock().unwrap().len(), 1);
    // restore_on_exit (default true): the adopted VM got its CPUs back.
    assert_eq!(rec.restored.lock().unwrap().len(), 1);
    assert!(Journal::open(&cfg.state_dir).unwrap().entries().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shutdown_wakes_sleepers() {
    let s = Shutdown::new();
    let s2 = s.clone();
    let t = std::thread::spawn(move || s2.wait_timeout(Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(20));
    s.trigger();
    assert!(t.join().unwrap());
    assert!(s.flag().load(Ordering::SeqCst));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(s.stopped());
}

/// Two busy 2-vCPU VMs confined to node 1 (CPUs 4-7) of a 2 x 4-CPU host.
fn crowded_node_1() -> Snapshot {
    let t = Topology::uniform(2, 4, 8 << 30);
    let busy = |pid: u32| Vm {
        pid,
        name: format!("vm{pid}"),
        vcpus: (0..2)
            .map(|i| crate::model::Vcpu {
                index: i,
                tid: pid * 10 + i,
                affinity: CpuSet::parse_list("4-7").unwrap(),
                last_cpu: Some(4 + i),
                cpu_demand: 1.0,
                ..Default::default()
            })
            .collect(),
        memory: crate::model::VmMemory {
            bytes_per_node: vec![0, 1 << 30],
            configured_bytes: 1 << 30,
            ..Default::default()
        },
        ..Default::default()
    };
    Snapshot {
        now_ns: 5,
        topology: t,
        vms: vec![busy(1), busy(2)],
        ..Default::default()
    }
}

/// The CPU moves of the last tick with their outcomes, from the status document.
fn cpu_decisions<O: Observer, A: Actuator, P: Policy>(
    d: &Daemon<O, A, P>,
) -> Vec<(String, ActionOutcome)> {
    let shared = d.shared();
    let s = shared.lock().unwrap();
    s.status
        .decisions
        .iter()
        .filter_map(|dec| match &dec.action {
            Action::SetCpus { cpus, .. } => Some((cpus.to_string(), dec.outcome.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn reserved_cpu_node_still_takes_a_vm_on_its_other_cpus() {
    // `-R 0`: node 0 (CPUs 0-3) keeps CPU 0 for the host. Node 1 is crowded, so one VM
    // must move to node 0, and the host (with the Linux applier's guard) must accept
    // the set the daemon's engine plans.
    let dir = temp("reserved");
    let cfg = Config {
        reserved_cpus: CpuSet::parse_list("0").unwrap(),
        ..test_config(&dir)
    };
    let host = |rec: &Record| Fake {
        reserved: cfg.reserved_cpus.clone(),
        ..Fake::new(rec, [1, 2])
    };
    let observer = || Scripted::new([Some(crowded_node_1())]);
    let rec = Record::default();
    let mut d = daemon(
        &cfg,
        observer(),
        host(&rec),
        super::super::policy::EnginePolicy::new(&cfg),
        None,
    );
    let r = d.tick();
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(
        cpu_decisions(&d),
        vec![("1-3".to_string(), ActionOutcome::Done { moved_bytes: 0 })]
    );
    assert_eq!(rec.applied.lock().unwrap().len(), 1);

    // An engine that does not hear of the reservation plans the whole node, and the
    // guard refuses it: the VM could never move to node 0.
    let rec = Record::default();
    let mut d = daemon(
        &cfg,
        observer(),
        host(&rec),
        super::super::policy::EnginePolicy::new(&Config {
            reserved_cpus: CpuSet::new(),
            ..cfg.clone()
        }),
        None,
    );
    d.tick();
    let decisions = cpu_decisions(&d);
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].0, "0-3");
    assert!(
        matches!(&decisions[0].1, ActionOutcome::Refused { why } if why.contains("reserved")),
        "{decisions:?}"
    );
    assert!(rec.applied.lock().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reload_takes_a_valid_file_and_keeps_running_on_a_bad_one() {
    // The daemon starts without reserved CPUs; the operator reserves CPU 0 (numad's
    // `-R 0`) and reloads. A bad file first: nothing changes. Then a good one: the
    // engine and the applier's guard both hear of CPU 0, and the state directory,
    // which only a restart changes, keeps its running value.
    let dir = temp("reload");
    let cfg = test_config(&dir);
    let file = dir.join("config.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let reader: Reloader = {
        let file = file.clone();
        Box::new(move || {
            let text = std::fs::read_to_string(&file).unwrap();
            Config::from_toml(&text, &file)
        })
    };
    let rec = Record::default();
    let mut d = daemon(
        &cfg,
        Scripted::new([Some(crowded_node_1())]),
        Fake::new(&rec, [1, 2]),
        super::super::policy::EnginePolicy::new(&cfg),
        None,
    )
    .with_reload(reader);
    let notifier = Notifier::default();

    std::fs::write(&file, "tick_ms = 5\nreserved_cpus = \"0\"\n").unwrap();
    let refused = d.reload(&notifier).unwrap_err();
    assert!(refused.contains("tick_ms"), "{refused}");
    assert_eq!(d.config(), &cfg, "a bad file changes nothing");
    {
        let shared = d.shared();
        let s = shared.lock().unwrap();
        assert_eq!(s.status.daemon.reload_failures, 1);
        let why = s.status.daemon.last_reload_error.clone().unwrap();
        assert!(why.contains("tick_ms"), "{why}");
    }

    std::fs::write(
        &file,
        format!(
            "tick_ms = 200\nprobation_window_ms = 1000\nreserved_cpus = \"0\"\n\
             exclude_vms = [\"secret-*\"]\nruntime_dir = {:?}\nstate_dir = \"/nowhere\"\n",
            cfg.runtime_dir
        ),
    )
    .unwrap();
    let (changed, needs_restart) = d.reload(&notifier).unwrap();
    assert!(
        changed.contains(&"reserved_cpus".to_string()),
        "{changed:?}"
    );
    assert_eq!(needs_restart, vec!["state_dir".to_string()]);
    assert_eq!(d.config().tick_ms, 200);
    assert_eq!(d.config().reserved_cpus.to_string(), "0");
    assert_eq!(d.config().state_dir, cfg.state_dir, "restart-only key kept");
    {
        let shared = d.shared();
        let s = shared.lock().unwrap();
        let info = &s.status.daemon;
        assert_eq!((info.reloads, info.reload_failures), (1, 1));
        assert_eq!(info.last_reload_error, None);
        assert_eq!(info.restart_pending, vec!["state_dir".to_string()]);
        assert_eq!(info.tick_ms, 200);
    }
    // Node 1 is crowded: the move to node 0 now leaves CPU 0 out, and the guard,
    // retuned too, accepts it.
    let r = d.tick();
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(
        cpu_decisions(&d),
        vec![("1-3".to_string(), ActionOutcome::Done { moved_bytes: 0 })]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_vm_the_operator_pins_after_adoption_is_let_go_keeping_the_pins() {
    let dir = temp("letgo");
    let cfg = test_config(&dir);
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let group = |name: &str| GroupSets {
        dir: PathBuf::from(format!(
            "/sys/fs/cgroup/machine.slice/vm.scope/libvirt/{name}"
        )),
        cpus: CpuSet::new(),
        mems: CpuSet::new(),
        memory_migrate: None,
    };
    let fake = Fake {
        groups: vec![group("emulator"), group("vcpu0"), group("vcpu1")],
        ..Fake::new(&rec, [1])
    };
    // `virsh vcpupin` of both vCPUs: the libvirt XML covers them, not the emulator.
    let pinned = Vm {
        pinning: Pinning::Operator {
            why: "libvirt domain XML: vcpupin 0->3 1->3".into(),
        },
        operator_pins: OperatorPins {
            vcpus: vec![0, 1],
            ..OperatorPins::default()
        },
        ..vm(1, "web", Pinning::None)
    };
    let observer = Scripted::new([
        Some(snap(vec![vm(1, "web", Pinning::None)])),
        Some(snap(vec![pinned.clone()])),
        Some(snap(vec![pinned])),
    ]);
    let policy = ScriptedPolicy::new([vec![cpus(1, "0-1")]]);
    let mut d = daemon(&cfg, observer, fake, policy, Some(journal));
    d.tick();
    assert!(d.journal().unwrap().entries().contains_key(&1), "held");
    assert!(rec.restored.lock().unwrap().is_empty());
    // The next observation says the operator pinned it.
    d.tick();
    assert!(d.journal().unwrap().entries().is_empty(), "let go");
    {
        let shared = d.shared();
        let s = shared.lock().unwrap();
        assert!(!s.status.vms[0].managed);
        let why = s.status.vms[0].unmanaged_why.as_deref().unwrap_or("");
        assert!(why.contains("vcpupin 0->3"), "{why}");
    }
    // The CPU sets vmbalancer changed that the pins do not cover go back, once; the
    // vCPU groups, now the operator's, are not touched, nor any thread.
    let sets = rec.restored_sets.lock().unwrap().clone();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let names: Vec<_> = sets[0]
        .groups
        .iter()
        .map(|g| g.dir.file_name().unwrap())
        .collect();
    assert_eq!(names, ["emulator"]);
    assert!(sets[0].threads.is_empty());
    assert_eq!(
        rec.restored.lock().unwrap()[0],
        (
            1,
            RestoreWhat {
                cpus: true,
                mems: false
            }
        )
    );
    // Let go for good: later ticks and the exit put nothing back.
    d.tick();
    d.finish();
    assert_eq!(rec.restored.lock().unwrap().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_restore_on_exit_letting_go_puts_nothing_back() {
    let dir = temp("letgo-keep");
    let cfg = Config {
        restore_on_exit: false,
        ..test_config(&dir)
    };
    let journal = Journal::open(&cfg.state_dir).unwrap();
    let rec = Record::default();
    let pinned = Pinning::Operator {
        why: "libvirt domain XML: vcpupin 0->3".into(),
    };
    let observer = Scripted::new([
        Some(snap(vec![vm(1, "web", Pinning::None)])),
        Some(snap(vec![vm(1, "web", pinned)])),
    ]);
    let policy = ScriptedPolicy::new([vec![cpus(1, "0-1")]]);
    let mut d = daemon(&cfg, observer, Fake::new(&rec, [1]), policy, Some(journal));
    d.tick();
    d.tick();
    assert!(d.journal().unwrap().entries().is_empty(), "let go");
    d.finish();
    assert!(rec.restored.lock().unwrap().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Observes like [`Scripted`], but blocks while `stall` is set (a tick loop stuck in
/// a kernel file read).
struct Stallable {
    inner: Scripted,
    stall: Arc<AtomicBool>,
}
impl Observer for Stallable {
    type Error = Boom;
    fn observe(&mut self) -> Result<Snapshot, Boom> {
        while self.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.inner.observe()
    }
}

/// What arrives on the notification socket within `window`, one datagram a string.
fn datagrams(sock: &std::os::unix::net::UnixDatagram, window: Duration) -> Vec<String> {
    let end = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn watchdog_is_fed_only_while_the_loop_ticks() {
    let dir = temp("watchdog");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = test_config(&dir);
    let notify_path = dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let observer = Stallable {
        inner: Scripted::new([Some(snap(vec![vm(1, "web", Pinning::None)]))]),
        stall: stall.clone(),
    };
    let fake = Fake::new(&Record::default(), [1]);
    let shutdown = Shutdown::new();
    let every = Duration::from_millis(50);
    let d = Daemon::new(
        cfg.clone(),
        observer,
        fake,
        ScriptedPolicy::default(),
        None,
        shutdown.clone(),
        true,
    )
    .with_notify(Notifier::new(Some(notify_path.as_os_str())), Some(every));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let handle = rt.spawn(run(d));

    let ticking = datagrams(&listener, Duration::from_millis(800));
    assert!(
        ticking.iter().any(|m| m.starts_with("READY=1")),
        "{ticking:?}"
    );
    let fed = ticking.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(fed >= 5, "every 50 ms while ticking: {ticking:?}");

    // Stuck loop: after the stale limit (3 ticks of 100 ms here) no more WATCHDOG=1,
    // so systemd's watchdog fires.
    stall.store(true, Ordering::SeqCst);
    let _ = datagrams(&listener, Duration::from_millis(500));
    let stuck = datagrams(&listener, Duration::from_millis(500));
    assert!(!stuck.iter().any(|m| m == "WATCHDOG=1"), "{stuck:?}");

    // Unstuck: fed again.
    stall.store(false, Ordering::SeqCst);
    let again = datagrams(&listener, Duration::from_millis(500));
    assert!(again.iter().any(|m| m == "WATCHDOG=1"), "{again:?}");

    shutdown.trigger();
    rt.block_on(handle).unwrap().unwrap();
    let last = datagrams(&listener, Duration::from_millis(200));
    assert!(last.iter().any(|m| m == "STOPPING=1"), "{last:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
