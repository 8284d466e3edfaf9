//! The daemon: one tick loop, plus the control socket, metrics and sd_notify around it.
//!
//! Why a blocking loop inside tokio: actuation is a sequence of syscalls that may
//! sleep for the migration rate limit, and the policy is plain computation, so the
//! loop runs on one blocking thread ([`Daemon::run_blocking`]) and the async side
//! only serves the control socket, the metrics page, signals and the watchdog. They
//! share a [`SharedState`] (the status document and the last snapshot) and one
//! cancellation signal ([`Shutdown`]): SIGTERM/SIGINT set it, the loop stops between
//! ticks, a memory move stops at its next batch boundary (the Linux applier watches
//! the same flag), and on the way out the original CPU sets are restored when the
//! configuration asks for it.
//!
//! SIGHUP (`systemctl reload`) asks the loop to read the configuration again before
//! its next tick ([`Daemon::with_reload`], the rules in [`super::config`]): a bad
//! file changes nothing and is reported in the log, the status and systemd's status
//! line. Without a reader (tests, the simulator) SIGHUP is only logged: its default
//! action would kill the daemon on the spot, leaving the VMs it moved as they are,
//! and systemd counts a SIGHUP death as a clean exit that `Restart=on-failure` does
//! not restart.
//!
//! Each tick: observe -> drop exited VMs from the journal -> plan -> each action
//! screened (excluded/pinned VMs are refused here, whatever the policy says) and
//! adopted -> one journal write for all that go -> apply each (reads back) -> one
//! journal write closing those that ended -> feedback -> status.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::advice;
use super::config::{Config, ConfigError};
use super::control::{self, Handler, Request, Response};
use super::journal::{self, Journal, JournalError};
use super::notify::Notifier;
use super::status::{self, Decision, StatusDoc};
use super::{Actuator, Policy};
use crate::host::Observer;
use crate::model::{ActionOutcome, Plan, PlannedAction, Snapshot, Vm};
use crate::model::{MigrationProgress, OriginalSets, VmId};

/// The one stop signal, visible to threads (flag + condvar) and tasks (watch).
#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    pair: Arc<(Mutex<bool>, Condvar)>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
    /// Readable once stopped, for a loop that polls other descriptors too
    /// ([`super::wake`]); `None` if the kernel would not give an eventfd.
    fd: Option<Arc<nix::sys::eventfd::EventFd>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            flag: Arc::new(AtomicBool::new(false)),
            pair: Arc::new((Mutex::new(false), Condvar::new())),
            tx: Arc::new(tokio::sync::watch::channel(false).0),
            fd: nix::sys::eventfd::EventFd::from_flags(
                nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                    | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
            )
            .map_err(|e| tracing::debug!(error = %e, "no eventfd: the loop sleeps between ticks"))
            .ok()
            .map(Arc::new),
        }
    }

    /// Readable once stopped (never read, so it stays readable).
    pub fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fd.as_deref().map(|f| f.as_fd())
    }

    /// Stops everything (idempotent).
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let (m, cv) = &*self.pair;
        if let Ok(mut g) = m.lock() {
            *g = true;
        }
        cv.notify_all();
        self.tx.send_replace(true);
        if let Some(fd) = &self.fd {
            let _ = fd.write(1);
        }
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for appliers that stop at batch boundaries.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Sleeps up to `d`; true when stopped meanwhile.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let (m, cv) = &*self.pair;
        let Ok(g) = m.lock() else {
            return self.is_set();
        };
        match cv.wait_timeout_while(g, d, |stopped| !*stopped) {
            Ok((g, _)) => *g,
            Err(_) => self.is_set(),
        }
    }

    /// Resolves once stopped.
    pub async fn stopped(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// How long the way out waits for background memory moves to reach a batch
/// boundary. A batch is at most `migration_batch_pages` pages, well under a second
/// of copying; the unit's stop timeout is longer.
const STOP_MOVES_WAIT: Duration = Duration::from_secs(10);

/// State shared between the loop and the async side.
#[derive(Default)]
pub struct Shared {
    pub status: StatusDoc,
    pub snapshot: Option<Snapshot>,
    /// Live progress of the applier's memory moves.
    pub progress: Option<Arc<Mutex<Vec<MigrationProgress>>>>,
    /// CPUs in use per node (all processes), averaged over `advice::LOAD_WINDOW`,
    /// for advice.
    pub node_busy_cpus: Option<Vec<f64>>,
    /// Placement advice given lately, held against its nodes until it expires
    /// (`advice::HOLD`).
    pub advice_held: Vec<(Instant, advice::Held)>,
}

pub type SharedState = Arc<Mutex<Shared>>;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("prometheus endpoint: {0}")]
    Prometheus(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("the tick loop failed: {0}")]
    Loop(String),
}

/// What one tick did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TickReport {
    pub observed: bool,
    pub planned: usize,
    pub applied: usize,
    pub refused_by_config: usize,
}

/// A policy that never acts: the daemon observes, serves status and advice, and
/// changes nothing. Used until a balancing policy is plugged in.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoActions;

impl Policy for NoActions {
    fn plan(&mut self, _snapshot: &Snapshot) -> Plan {
        Plan::default()
    }
    fn feedback(&mut self, _action: &PlannedAction, _outcome: &ActionOutcome) {}
}

/// Why the configuration leaves a VM alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unmanaged {
    #[error("pinned by the operator ({0})")]
    Pinned(String),
    #[error("excluded")]
    Excluded,
    #[error("excluded by include_vms/exclude_vms")]
    NotSelected,
}

/// Whether the configuration lets the daemon move `vm`, and why not.
pub fn manage_verdict(cfg: &Config, vm: &Vm) -> Result<(), Unmanaged> {
    if cfg.manages(vm) {
        return Ok(());
    }
    Err(match &vm.pinning {
        crate::model::Pinning::Operator { why } => Unmanaged::Pinned(why.clone()),
        crate::model::Pinning::Excluded => Unmanaged::Excluded,
        crate::model::Pinning::None => Unmanaged::NotSelected,
    })
}

/// Logs a search that chose a VM to move off a busy node, with every candidate's
/// figures (MiB, CPUs, MiB per CPU and verdict), as `status` shows them.
fn log_choice(choice: &crate::model::MoveChoice) {
    let mib = |b: f64| b / f64::from(1u32 << 20);
    let candidates: Vec<String> = choice
        .candidates
        .iter()
        .map(|k| {
            format!(
                "vm {} resident {:.0} MiB, {:.2} CPUs, {} MiB/CPU: {}",
                k.vm,
                mib(k.resident_bytes as f64),
                k.cpus_gained,
                k.bytes_per_cpu
                    .map_or("-".into(), |b| format!("{:.0}", mib(b))),
                status::verdict_text(&k.verdict)
            )
        })
        .collect();
    tracing::info!(
        from = choice.from,
        chosen = ?choice.chosen,
        candidates = %candidates.join("; "),
        "cheapest move"
    );
}

/// The tick loop and what it drives.
pub struct Daemon<O, A, P> {
    cfg: Config,
    observer: O,
    actuator: A,
    policy: P,
    journal: Option<Journal>,
    shared: SharedState,
    shutdown: Shutdown,
    started: Instant,
    dry_run: bool,
    observe_failing: bool,
    heartbeat_ms: Arc<AtomicU64>,
    /// Memory moves running or queued in the background, by VM, in the order they
    /// were handed over: the action and when it was planned. A VM's journal entry
    /// stays open until the last ends.
    moving: std::collections::BTreeMap<u32, std::collections::VecDeque<(PlannedAction, u64)>>,
    /// Where READY/STATUS/WATCHDOG go; none unless [`Daemon::with_notify`] names one.
    notifier: Notifier,
    /// How often to send WATCHDOG=1, when systemd asked for it.
    watchdog_every: Option<Duration>,
    /// Nice value of the loop's thread (`None`: leave it as started).
    loop_nice: Option<i32>,
    /// Reads the configuration again (file and flags) on SIGHUP.
    reloader: Option<Reloader>,
    /// Recent tick durations, for their percentiles in status.
    tick_durations: status::TickDurations,
    /// CPUs in use per node over the last ticks, for placement advice.
    busy_window: advice::LoadWindow,
    /// Reload requests, taken by the loop before its next tick.
    reloads: Reloads,
}

/// Reads the configuration as at start (the file, then the command line's flags).
pub type Reloader = Box<dyn FnMut() -> Result<Config, ConfigError> + Send>;

/// What a reload did: the keys changed now and those waiting for a restart; or why
/// nothing changed.
pub type ReloadResult = Result<(Vec<String>, Vec<String>), String>;

/// Reload requests (SIGHUP, the control socket's `reload`) and their results. The
/// loop takes the requests before its next tick; a control request waits here for
/// the result of its own request or a later one.
#[derive(Clone, Default)]
pub struct Reloads {
    book: Arc<(Mutex<ReloadBook>, Condvar)>,
}

#[derive(Default)]
struct ReloadBook {
    asked: u64,
    done: u64,
    last: Option<ReloadResult>,
}

impl Reloads {
    /// Asks for a reload; the ticket to [`Reloads::wait`] for.
    pub fn ask(&self) -> u64 {
        let mut b = self.book.0.lock().unwrap_or_else(|p| p.into_inner());
        b.asked += 1;
        b.asked
    }

    /// The result of the reload that served `ticket`; `None` after `timeout`.
    pub fn wait(&self, ticket: u64, timeout: Duration) -> Option<ReloadResult> {
        let (m, cv) = &*self.book;
        let b = m.lock().unwrap_or_else(|p| p.into_inner());
        let (b, _) = cv
            .wait_timeout_while(b, timeout, |b| b.done < ticket)
            .unwrap_or_else(|p| p.into_inner());
        (b.done >= ticket).then(|| b.last.clone()).flatten()
    }

    /// The newest ticket not yet served, for the loop.
    fn pending(&self) -> Option<u64> {
        let b = self.book.0.lock().unwrap_or_else(|p| p.into_inner());
        (b.asked > b.done).then_some(b.asked)
    }

    /// Every ticket up to `upto` was served with `result`.
    fn served(&self, upto: u64, result: ReloadResult) {
        let (m, cv) = &*self.book;
        let mut b = m.lock().unwrap_or_else(|p| p.into_inner());
        b.done = b.done.max(upto);
        b.last = Some(result);
        cv.notify_all();
    }
}

impl<O: Observer, A: Actuator, P: Policy> Daemon<O, A, P> {
    /// `journal` is `None` in dry runs (nothing on the host changes, not even the
    /// state directory).
    pub fn new(
        cfg: Config,
        observer: O,
        actuator: A,
        policy: P,
        journal: Option<Journal>,
        shutdown: Shutdown,
        dry_run: bool,
    ) -> Self {
        let shared = SharedState::default();
        if let Ok(mut s) = shared.lock() {
            s.status.daemon = status::DaemonInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
                dry_run,
                tick_ms: cfg.tick_ms,
                ..Default::default()
            };
        }
        Self {
            observer,
            actuator,
            policy,
            journal,
            shared,
            shutdown,
            started: Instant::now(),
            dry_run,
            observe_failing: false,
            heartbeat_ms: Arc::new(AtomicU64::new(0)),
            moving: std::collections::BTreeMap::new(),
            loop_nice: None,
            notifier: Notifier::default(),
            watchdog_every: None,
            reloader: None,
            tick_durations: status::TickDurations::default(),
            busy_window: advice::LoadWindow::new(Duration::from_millis(cfg.tick_ms)),
            reloads: Reloads::default(),
            cfg,
        }
    }

    /// SIGHUP reloads the configuration with `read` (see the module doc).
    pub fn with_reload(mut self, read: Reloader) -> Self {
        self.reloader = Some(read);
        self
    }

    /// Where reloads are asked for (SIGHUP, the control socket).
    pub fn reloads(&self) -> Reloads {
        self.reloads.clone()
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Reads the configuration again and runs on it from the next tick; a file that
    /// does not validate leaves everything as it was.
    pub fn reload(&mut self, notifier: &Notifier) -> ReloadResult {
        let Some(read) = self.reloader.as_mut() else {
            tracing::warn!("reload asked: this daemon has no configuration file to read again");
            return Err("this daemon has no configuration file to read again".into());
        };
        match read().and_then(|new| self.cfg.reloaded(new)) {
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded: running on the previous one");
                let _ = notifier.status(&format!("configuration not reloaded: {e}"));
                if let Ok(mut s) = self.shared.lock() {
                    s.status.daemon.reload_failures += 1;
                    s.status.daemon.last_reload_error = Some(e.to_string());
                }
                Err(e.to_string())
            }
            Ok(r) => {
                if !r.needs_restart.is_empty() {
                    tracing::warn!(
                        keys = ?r.needs_restart,
                        "these settings change at the next start; running on their previous values"
                    );
                }
                tracing::info!(changed = ?r.changed, "configuration reloaded");
                self.retune(r.config);
                if let Ok(mut s) = self.shared.lock() {
                    let d = &mut s.status.daemon;
                    d.reloads += 1;
                    d.last_reload_error = None;
                    d.restart_pending = r.needs_restart.clone();
                }
                Ok((r.changed, r.needs_restart))
            }
        }
    }

    /// Runs on `cfg` from now on: the loop's own knobs, the policy, the observer and
    /// the applier.
    fn retune(&mut self, cfg: Config) {
        let tunables = crate::host::Tunables {
            locality_target_pct: cfg.target_locality_pct,
            reserved_cpus: cfg.reserved_cpus.clone(),
            rate_limit_bytes_per_s: cfg.migration_rate_limit_bytes_per_s,
            headroom_bytes: cfg.memory_headroom_bytes,
        };
        self.policy.reconfigure(&cfg);
        self.observer.retune(&tunables);
        self.actuator.retune(&tunables);
        if let Ok(mut s) = self.shared.lock() {
            s.status.daemon.tick_ms = cfg.tick_ms;
        }
        self.cfg = cfg;
    }

    /// Tells systemd (or whoever listens on the notifier's socket) when the daemon is
    /// ready and what it does, and sends WATCHDOG=1 every `watchdog_every`. The
    /// entry point reads both from the environment ([`Notifier::from_env`],
    /// [`super::notify::watchdog_interval`]); nothing below it does.
    pub fn with_notify(mut self, notifier: Notifier, watchdog_every: Option<Duration>) -> Self {
        self.notifier = notifier;
        self.watchdog_every = watchdog_every;
        self
    }

    /// Runs the loop's thread at `nice`: the same priority as the page movers it
    /// starts, which would otherwise starve it on a host whose CPUs are all busy
    /// (in the lab every tick then started up to two seconds late, all of it
    /// spent waiting for a CPU to observe the host).
    pub fn with_loop_nice(mut self, nice: i32) -> Self {
        self.loop_nice = Some(nice);
        self
    }

    /// Gives the status handler live access to the applier's migration progress.
    pub fn with_progress(self, handle: Arc<Mutex<Vec<MigrationProgress>>>) -> Self {
        if let Ok(mut s) = self.shared.lock() {
            s.progress = Some(handle);
        }
        self
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    pub fn actuator(&self) -> &A {
        &self.actuator
    }

    pub fn actuator_mut(&mut self) -> &mut A {
        &mut self.actuator
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Finishes or reverts what a previous run left in flight.
    pub fn recover(&mut self) -> Result<Vec<(u32, journal::Recovery, ActionOutcome)>, DaemonError> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(Vec::new());
        };
        if journal.entries().is_empty() {
            return Ok(Vec::new());
        }
        // VMs an earlier run adopted are ours: their narrowed sets are not pinning.
        for &vm in journal.entries().keys() {
            self.observer.note_adopted(vm);
        }
        let snap = match self.observer.observe() {
            Ok(s) => s,
            Err(e) => {
                return Err(DaemonError::Loop(format!(
                    "cannot observe the host to recover the journal: {e}"
                )));
            }
        };
        let online = snap.topology.all_cpus();
        let mem_nodes = snap.topology.memory_nodes();
        Ok(journal::recover(
            journal,
            &mut self.actuator,
            &snap,
            &online,
            &mem_nodes,
        )?)
    }

    /// One observe-plan-apply round.
    pub fn tick(&mut self) -> TickReport {
        let t0 = Instant::now();
        let mut report = TickReport::default();
        let mut decisions = self.collect_moves(None);
        let snap = match self.observer.observe() {
            Ok(s) => {
                if self.observe_failing {
                    tracing::info!("host observation works again");
                }
                self.observe_failing = false;
                s
            }
            Err(e) => {
                // One warning per failure streak, not one per tick.
                if !self.observe_failing {
                    tracing::warn!(error = %e, "cannot observe the host");
                } else {
                    tracing::debug!(error = %e, "cannot observe the host");
                }
                self.observe_failing = true;
                if let Ok(mut s) = self.shared.lock() {
                    s.status.daemon.observe_errors += 1;
                    s.status.push_decisions(decisions, self.cfg.status_history);
                }
                return report;
            }
        };
        report.observed = true;
        let observe_ns = t0.elapsed().as_nanos() as u64;
        self.forget_exited(&snap);
        self.release_operator_pinned(&snap);

        let plan: Plan = self.policy.plan(&snap);
        let plan_ns = t0.elapsed().as_nanos() as u64 - observe_ns;
        report.planned = plan.actions.len();
        for refusal in &plan.refusals {
            tracing::debug!(vm = ?refusal.vm, why = ?refusal.why, "policy refused");
        }
        for choice in plan.cpu_choices.iter().filter(|c| c.chosen.is_some()) {
            log_choice(choice);
        }
        decisions.extend(self.carry_out(&snap, &plan.actions, &mut report));

        tracing::debug!(
            observe_ns,
            plan_ns,
            tick_ns = t0.elapsed().as_nanos() as u64,
            actions = plan.actions.len(),
            refusals = plan.refusals.len(),
            "tick"
        );
        let (cpu_ns, rss) = status::self_usage();
        let vms = status::vm_statuses(&snap, |vm| manage_verdict(&self.cfg, vm));
        let probations = self.policy.probations();
        let counters = self.actuator.counters();
        // CPUs in use per node, as the observer measured them (all processes).
        let busy: Option<Vec<f64>> = snap
            .topology
            .nodes
            .iter()
            .map(|n| {
                n.idle_cpus
                    .map(|idle| (n.cpus.len() as f64 - idle).max(0.0))
            })
            .collect();
        let ebpf = self.observer.program_cost().map(|c| status::EbpfCost {
            run_time_ns: c.run_time_ns,
            run_count: c.run_count,
            events_lost: 0,
        });
        let mut new_refusals = Vec::new();
        if let Ok(mut s) = self.shared.lock() {
            s.status.ebpf = ebpf;
            if let Some(b) = busy {
                self.busy_window.push(b);
                s.node_busy_cpus = self.busy_window.mean();
            }
            s.status.push_decisions(decisions, self.cfg.status_history);
            s.status.vms = vms;
            new_refusals = s
                .status
                .note_refusals(snap.now_ns, &plan.refusals)
                .into_iter()
                .map(|r| {
                    let name =
                        r.vm.and_then(|pid| snap.vms.iter().find(|v| v.pid == pid))
                            .map(|v| v.name.clone());
                    (r.vm, name, r.why.to_string())
                })
                .collect();
            s.status
                .push_cpu_choices(snap.now_ns, &plan.cpu_choices, self.cfg.status_history);
            s.status.probations = probations;
            s.status.counters = counters;
            let d = &mut s.status.daemon;
            d.ticks += 1;
            d.uptime_ms = self.started.elapsed().as_millis() as u64;
            d.last_tick_ns = t0.elapsed().as_nanos() as u64;
            d.max_tick_ns = d.max_tick_ns.max(d.last_tick_ns);
            (d.tick_p50_ns, d.tick_p99_ns) = self.tick_durations.push(d.last_tick_ns);
            d.cpu_time_ns = cpu_ns;
            d.rss_bytes = rss;
            s.snapshot = Some(snap);
        }
        // Once per kind and VM while status shows it: what is missing, and where.
        for (vm, name, why) in new_refusals {
            tracing::info!(vm = ?vm, name = ?name, "refused: {why}");
        }
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        report
    }

    /// Carries out a tick's actions: each is screened, then all that may go are
    /// journaled in one write (no journal, no change: a crash must always be
    /// recoverable), then applied in the plan's order, then the ones that ended at
    /// once are closed in one more write. Returns the decisions, in the plan's order.
    fn carry_out(
        &mut self,
        snap: &Snapshot,
        actions: &[PlannedAction],
        report: &mut TickReport,
    ) -> Vec<Decision> {
        let mut outcomes: Vec<Option<ActionOutcome>> = vec![None; actions.len()];
        let mut go: Vec<(usize, OriginalSets)> = Vec::new();
        let mut moves_memory: BTreeSet<VmId> = BTreeSet::new();
        for (i, action) in actions.iter().enumerate() {
            match self.screen(snap, action, &moves_memory, report) {
                Ok(original) => {
                    if action.action.moves_memory() {
                        moves_memory.insert(action.vm);
                    }
                    go.push((i, original));
                }
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        if let Some(j) = self.journal.as_mut()
            && !go.is_empty()
            && let Err(e) = j.begin_all(
                go.iter().map(|(i, o)| (o.clone(), &actions[*i])),
                snap.now_ns,
            )
        {
            tracing::error!(error = %e, "journal not writable, actions not applied");
            for (i, _) in go.drain(..) {
                outcomes[i] = Some(ActionOutcome::Refused {
                    why: format!("journal not writable: {e}"),
                });
            }
        }
        let mut ended: Vec<(VmId, ActionOutcome)> = Vec::new();
        for (i, _) in go {
            let action = &actions[i];
            if self.shutdown.is_set() {
                // Journaled but not applied: closed below, and not learned from.
                ended.push((action.vm, ActionOutcome::Done { moved_bytes: 0 }));
                continue;
            }
            report.applied += 1;
            let outcome = self.actuator.apply(snap, action);
            tracing::info!(vm = action.vm, action = ?action.action, reason = ?action.reason, ?outcome, "applied");
            if outcome == ActionOutcome::Started {
                self.moving
                    .entry(action.vm)
                    .or_default()
                    .push_back((action.clone(), snap.now_ns));
            } else {
                ended.push((action.vm, outcome.clone()));
            }
            outcomes[i] = Some(outcome);
        }
        self.end_actions(&ended);
        actions
            .iter()
            .zip(outcomes)
            .filter_map(|(action, outcome)| Some(self.learn(action, outcome?, snap.now_ns)))
            .collect()
    }

    /// Whether an action may go: the VM is there, no memory move of it runs (or
    /// started earlier in this tick, in `moves_memory`) under a CPU change, the
    /// configuration manages it. Its original sets when it may.
    fn screen(
        &mut self,
        snap: &Snapshot,
        action: &PlannedAction,
        moves_memory: &BTreeSet<VmId>,
        report: &mut TickReport,
    ) -> Result<OriginalSets, ActionOutcome> {
        let Some(vm) = snap.vms.iter().find(|v| v.pid == action.vm) else {
            return Err(ActionOutcome::VmGone);
        };
        let memory_moving = self.moving.contains_key(&vm.pid) || moves_memory.contains(&vm.pid);
        if memory_moving && !action.action.moves_memory() {
            // No CPU change under a memory move: the journal entry belongs to the
            // move until it ends. (Further memory moves of the VM queue behind it:
            // the engine plans one per source node, all towards the same home.)
            return Err(ActionOutcome::Refused {
                why: format!("a memory move of VM {} is still running", vm.pid),
            });
        }
        if let Err(why) = manage_verdict(&self.cfg, vm) {
            report.refused_by_config += 1;
            tracing::debug!(vm = vm.pid, %why, "action on an unmanaged VM dropped");
            return Err(ActionOutcome::Refused {
                why: format!("VM {} is left alone: {why}", vm.pid),
            });
        }
        let Some(original) = self.actuator.adopt(vm) else {
            return Err(ActionOutcome::VmGone);
        };
        if !self.dry_run {
            self.observer.note_adopted(vm.pid);
        }
        Ok(original)
    }

    /// Feeds an outcome back to the policy and the observer; the decision for status.
    fn learn(&mut self, action: &PlannedAction, outcome: ActionOutcome, at_ns: u64) -> Decision {
        self.policy.feedback(action, &outcome);
        self.observer.note_outcome(action, &outcome);
        Decision {
            at_ns,
            vm: action.vm,
            action: action.action.clone(),
            reason: action.reason.clone(),
            outcome,
        }
    }

    /// Background moves that ended (with `wait`, waiting that long for all of them):
    /// their journal entries end and the policy learns their outcomes.
    fn collect_moves(&mut self, wait: Option<Duration>) -> Vec<Decision> {
        if self.moving.is_empty() {
            return Vec::new();
        }
        let mut decisions = Vec::new();
        let mut ended = Vec::new();
        for (done, outcome) in self.actuator.ended_moves(wait) {
            let vm = done.vm;
            let Some(queue) = self.moving.get_mut(&vm) else {
                continue;
            };
            // Moves of one VM run side by side and end in any order: the one that
            // ended is the first queued that is the same action.
            let at = queue.iter().position(|(a, _)| *a == done).unwrap_or(0);
            let Some((action, at_ns)) = queue.remove(at) else {
                continue;
            };
            if queue.is_empty() {
                self.moving.remove(&vm);
                ended.push((vm, outcome.clone()));
            }
            tracing::info!(vm, action = ?action.action, ?outcome, "memory move ended");
            decisions.push(self.learn(&action, outcome, at_ns));
        }
        self.end_actions(&ended);
        decisions
    }

    /// Closes the journal entries of actions that ended, in one write. A VM whose
    /// memory move still runs keeps its entry (the move owns it until it ends).
    fn end_actions(&mut self, ended: &[(VmId, ActionOutcome)]) {
        let vms: Vec<VmId> = ended
            .iter()
            .map(|(vm, _)| *vm)
            .filter(|vm| !self.moving.contains_key(vm))
            .collect();
        if let Some(j) = self.journal.as_mut()
            && !vms.is_empty()
            && let Err(e) = j.end_all(&vms)
        {
            tracing::error!(error = %e, "journal not writable");
        }
        for (vm, outcome) in ended {
            if *outcome == ActionOutcome::VmGone {
                self.forget(*vm);
            }
        }
    }

    fn forget(&mut self, vm: u32) {
        self.actuator.forget(vm);
        if let Some(j) = self.journal.as_mut()
            && let Err(e) = j.forget(vm)
        {
            tracing::error!(error = %e, "journal not writable");
        }
    }

    /// Drops journal entries of VMs that exited.
    fn forget_exited(&mut self, snap: &Snapshot) {
        let Some(j) = self.journal.as_ref() else {
            return;
        };
        let gone: Vec<u32> = j
            .entries()
            .values()
            .filter(|e| !snap.vms.iter().any(|v| v.pid == e.original.vm))
            .filter(|e| !self.actuator.alive(&e.original))
            .map(|e| e.original.vm)
            .collect();
        for vm in gone {
            tracing::debug!(vm, "VM exited");
            self.forget(vm);
        }
    }

    /// Lets go of held VMs the operator has pinned since (`virsh vcpupin`, numatune):
    /// the sets the operator's pin covers are the operator's now and stay as they are;
    /// the CPU sets vmbalancer changed that the pin does not cover (e.g. the emulator
    /// group after a `vcpupin` of the vCPUs only) are put back as on exit (with
    /// `restore_on_exit`), so nothing of vmbalancer's stays behind looking like the
    /// operator's. The VM then leaves the journal. A VM whose memory move is still
    /// running is let go when it ends.
    fn release_operator_pinned(&mut self, snap: &Snapshot) {
        let Some(j) = self.journal.as_ref() else {
            return;
        };
        let pinned: Vec<(&crate::model::Vm, String, crate::model::OriginalSets)> = snap
            .vms
            .iter()
            .filter(|vm| !self.moving.contains_key(&vm.pid))
            .filter_map(|vm| match (&vm.pinning, j.entries().get(&vm.pid)) {
                (crate::model::Pinning::Operator { why }, Some(entry)) => {
                    Some((vm, why.clone(), entry.original.clone()))
                }
                _ => None,
            })
            .collect();
        for (vm, why, original) in pinned {
            let put_back = self.cfg.restore_on_exit && !self.dry_run;
            let outcome =
                put_back.then(|| self.actuator.release(&original.released(&vm.operator_pins)));
            match outcome {
                Some(put_back) => tracing::info!(
                    vm = vm.pid,
                    name = %vm.name,
                    %why,
                    ?put_back,
                    "the operator pinned a VM vmbalancer held: letting go of it; its pins stay as the operator set them, the CPU sets vmbalancer set that they do not cover are put back"
                ),
                None => tracing::info!(
                    vm = vm.pid,
                    name = %vm.name,
                    %why,
                    "the operator pinned a VM vmbalancer held: letting go of it; every set stays as it is (restore_on_exit is off)"
                ),
            }
            self.forget(vm.pid);
        }
    }

    /// Starts ticking, after recovery (which finishes moves at once): from now on
    /// memory moves no longer hold the tick.
    pub fn begin(&mut self) {
        if !self.dry_run {
            self.actuator.move_in_background();
        }
    }

    /// Ticks until the shutdown signal, then [`Daemon::finish`]es.
    pub fn run_blocking(&mut self, notifier: &Notifier) {
        self.begin();
        if let Some(nice) = self.loop_nice
            && let Err(e) = crate::host::linux::actuate::sys::set_own_nice(nice)
        {
            tracing::warn!(nice, error = %e, "the tick loop keeps its priority");
        }
        let mut ready = false;
        let mut due: Option<Instant> = None;
        let mut moves_began: Option<Instant> = None;
        while !self.shutdown.is_set() {
            if let Some(upto) = self.reloads.pending() {
                let result = self.reload(notifier);
                self.reloads.served(upto, result);
            }
            let tick = Duration::from_millis(self.cfg.tick_ms);
            let start = Instant::now();
            if let Some(d) = due
                && let Ok(mut s) = self.shared.lock()
            {
                let late = start.saturating_duration_since(d);
                let late_moving =
                    moves_began.map(|since| start.saturating_duration_since(d.max(since)));
                s.status.daemon.note_tick_late(
                    late.as_nanos() as u64,
                    late_moving.map(|l| l.as_nanos() as u64),
                );
            }
            due = Some(start + tick);
            let r = self.tick();
            // Moves started in this tick (or still running from earlier ones) run from
            // about now; the tick that started them is not late because of them.
            moves_began = match (self.moving.is_empty(), moves_began) {
                (true, _) => None,
                (false, None) => Some(Instant::now()),
                (false, since) => since,
            };
            if !ready {
                let _ = notifier.ready(&format!(
                    "{}balancing {} VMs",
                    if self.dry_run { "dry run: " } else { "" },
                    self.vm_count()
                ));
                ready = true;
            } else if r.applied > 0 {
                let _ = notifier.status(&format!(
                    "{} VMs, {} actions applied in the last tick",
                    self.vm_count(),
                    r.applied
                ));
            }
            let listen = self.cfg.wake_on_events;
            match super::wake::wait(&mut self.observer, &self.shutdown, start, tick, listen) {
                super::wake::Waited::Stop => break,
                super::wake::Waited::Due => {}
                super::wake::Waited::Woken(wakes) => self.note_wakes(&wakes, start.elapsed()),
            }
        }
        let _ = notifier.stopping();
        self.finish();
    }

    /// Counts and logs what woke the loop, `after` the start of the previous tick.
    fn note_wakes(&mut self, wakes: &[crate::host::Wake], after: Duration) {
        tracing::debug!(
            ?wakes,
            after_ms = after.as_millis() as u64,
            "woken before the tick"
        );
        if let Ok(mut s) = self.shared.lock() {
            let d = &mut s.status.daemon;
            d.woken_ticks += 1;
            for w in wakes {
                *d.wakes.entry(w.kind().to_owned()).or_default() += 1;
            }
        }
    }

    fn vm_count(&self) -> usize {
        self.shared.lock().map_or(0, |s| s.status.vms.len())
    }

    /// On the way out: restores original CPU sets when configured (and forgets those
    /// VMs in the journal, as nothing of ours is left on them), else keeps the journal
    /// so a later run can still restore.
    pub fn finish(&mut self) {
        // Moves still running stop at their next batch boundary (the stop flag is
        // set); their journal entries end with what they moved.
        let ended = self.collect_moves(Some(STOP_MOVES_WAIT));
        if let Ok(mut s) = self.shared.lock() {
            s.status.push_decisions(ended, self.cfg.status_history);
        }
        if !self.moving.is_empty() {
            tracing::warn!(
                vms = ?self.moving.keys().collect::<Vec<_>>(),
                "memory moves did not stop in time; the journal finishes them at the next start"
            );
        }
        if !self.cfg.restore_on_exit || self.dry_run {
            return;
        }
        let Some(j) = self.journal.as_ref() else {
            return;
        };
        let entries: Vec<_> = j.entries().values().map(|e| e.original.clone()).collect();
        for o in entries {
            let out = self.actuator.restore(
                &o,
                crate::model::RestoreWhat {
                    cpus: true,
                    mems: false,
                },
            );
            tracing::info!(vm = o.vm, ?out, "restored original CPU sets");
            if matches!(out, ActionOutcome::Done { .. } | ActionOutcome::VmGone)
                && let Some(j) = self.journal.as_mut()
                && let Err(e) = j.forget(o.vm)
            {
                tracing::error!(error = %e, "journal not writable");
            }
        }
    }
}

/// Answers control requests from the shared state; a reload waits up to `reload_wait`
/// for the loop to carry it out.
pub fn handler(
    shared: SharedState,
    params: advice::Params,
    reloads: Reloads,
    reload_wait: Duration,
) -> Arc<dyn Handler> {
    Arc::new(move |req: Request| match req {
        Request::Reload => {
            let ticket = reloads.ask();
            match reloads.wait(ticket, reload_wait) {
                Some(Ok((changed, needs_restart))) => Response::Reloaded {
                    changed,
                    needs_restart,
                },
                Some(Err(error)) => Response::Error { error },
                None => Response::Error {
                    error: format!(
                        "the tick loop did not take the reload within {} s",
                        reload_wait.as_secs()
                    ),
                },
            }
        }
        Request::Status => {
            let Ok(s) = shared.lock() else {
                return unavailable();
            };
            let mut doc = s.status.clone();
            if let Some(p) = s
                .progress
                .as_ref()
                .and_then(|p| p.lock().ok().map(|g| g.clone()))
            {
                doc.migrations = p;
            }
            Response::Status(Box::new(doc))
        }
        Request::Advise { cpus, mem_mb } => {
            let Ok(mut guard) = shared.lock() else {
                return unavailable();
            };
            // One lock for the answer and its hold: requests of a batch see each other.
            let s = &mut *guard;
            let Some(snap) = s.snapshot.as_ref() else {
                return Response::Error {
                    error: "no snapshot yet".into(),
                };
            };
            let req = advice::Request {
                cpus: cpus.max(1),
                mem_bytes: mem_mb.saturating_mul(1 << 20),
            };
            // Measured load of the whole host when known, else the VMs' demand.
            let load = s
                .node_busy_cpus
                .clone()
                .filter(|b| b.len() == snap.topology.nodes.len())
                .unwrap_or_else(|| advice::load_from_vms(snap));
            s.advice_held.retain(|(at, _)| at.elapsed() < advice::HOLD);
            let held: Vec<advice::Held> = s.advice_held.iter().map(|(_, h)| h.clone()).collect();
            let nodes = advice::advise(snap, &req, &load, &held, &params);
            tracing::info!(
                held = held.len(),
                "placement advice: {} CPUs, {mem_mb} MiB -> node(s) {nodes}",
                req.cpus
            );
            s.advice_held.push((
                Instant::now(),
                advice::Held {
                    nodes: nodes.clone(),
                    cpus: f64::from(req.cpus),
                    mem_bytes: req.mem_bytes,
                },
            ));
            let given = status::AdviceGiven {
                at_uptime_ms: s.status.daemon.uptime_ms,
                cpus: req.cpus,
                mem_mb,
                nodes: nodes.to_string(),
                held_before: held.len(),
            };
            s.status.advice.push_back(given);
            while s.status.advice.len() > status::ADVICE_KEPT {
                s.status.advice.pop_front();
            }
            Response::Advice {
                nodes: nodes.to_string(),
            }
        }
    })
}

fn unavailable() -> Response {
    Response::Error {
        error: "daemon state unavailable".into(),
    }
}

/// Runs the daemon until SIGTERM/SIGINT (or `shutdown` from elsewhere): control
/// socket, optional metrics, sd_notify, and the tick loop on a blocking thread.
pub async fn run<O, A, P>(mut daemon: Daemon<O, A, P>) -> Result<(), DaemonError>
where
    O: Observer + Send + 'static,
    A: Actuator + Send + 'static,
    P: Policy + Send + 'static,
{
    let cfg = daemon.cfg.clone();
    let shutdown = daemon.shutdown.clone();
    let shared = daemon.shared();
    let params = advice::Params {
        target_utilisation_pct: cfg.target_utilisation_pct,
        headroom_bytes: cfg.memory_headroom_bytes,
        reserved_cpus: cfg.reserved_cpus.clone(),
    };
    let socket_path = cfg.control_socket_path();
    let access = cfg.socket_access()?;
    let reloads = daemon.reloads();
    // A tick (at most a minute), plus the tick that may be running when asked.
    let reload_wait =
        Duration::from_millis(cfg.tick_ms.saturating_mul(2)) + Duration::from_secs(30);
    let listener = control::bind(&socket_path, &access)?;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let s = shutdown.clone();
        let socket_path = socket_path.clone();
        tasks.spawn(async move {
            control::serve(
                listener,
                socket_path,
                access,
                handler(shared.clone(), params, reloads, reload_wait),
                async move { s.stopped().await },
            )
            .await;
            Ok(())
        });
    }
    if let Some(addr) = cfg.prometheus_addr().ok().flatten() {
        let s = shutdown.clone();
        let shared = daemon.shared();
        let page = Arc::new(move || {
            shared
                .lock()
                .map(|s| super::prometheus::render(&s.status))
                .unwrap_or_default()
        });
        let listener_ok = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(DaemonError::Prometheus)?;
        drop(listener_ok);
        tasks.spawn(async move {
            super::prometheus::serve(addr, page, async move { s.stopped().await })
                .await
                .map_err(DaemonError::Prometheus)
        });
    }
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
        let s = shutdown.clone();
        let reloads = daemon.reloads();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reading the configuration again before the next tick");
                        reloads.ask();
                        continue;
                    }
                    _ = s.stopped() => {}
                }
                break;
            }
            s.trigger();
            Ok(())
        });
    }
    let notifier = daemon.notifier.clone();
    if let Some(every) = daemon.watchdog_every {
        let s = shutdown.clone();
        let beat = daemon.heartbeat_ms.clone();
        let started = daemon.started;
        let stale_ms = (every.as_millis() as u64 * 2).max(cfg.tick_ms * 3);
        let n = notifier.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = s.stopped() => return Ok(()),
                    _ = tokio::time::sleep(every) => {}
                }
                let age = (started.elapsed().as_millis() as u64)
                    .saturating_sub(beat.load(Ordering::Relaxed));
                // Only a loop that still ticks keeps the watchdog quiet.
                if age <= stale_ms {
                    let _ = n.watchdog();
                }
            }
        });
    }
    let looped = tokio::task::spawn_blocking(move || {
        match daemon.recover() {
            Ok(done) if !done.is_empty() => {
                tracing::info!(entries = done.len(), "journal recovered")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "journal recovery failed"),
        }
        daemon.run_blocking(&notifier);
    })
    .await;
    shutdown.trigger();
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            first_err.get_or_insert(e);
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    if let Err(e) = looped {
        return Err(DaemonError::Loop(e.to_string()));
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests;
