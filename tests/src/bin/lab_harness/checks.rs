//! Evaluates assertions and keeps the verdict.

use vmbalancer_tests::lab::protocol::{Record, Sample, Summary};
use vmbalancer_tests::lab::scenario::{Assertion, Balancer, Measure, Which};
use vmbalancer_tests::lab::truth::NodeInfo;
use vmbalancer_tests::lab::{judge, metrics};

use crate::consistency::Consistency;
use crate::{command, emit};

/// What the harness gathered about the run besides the samples.
pub struct RunFacts {
    pub balancer: Balancer,
    /// `vmbalancer status --json` at the end of the run, or why it failed.
    pub status: Option<Result<serde_json::Value, String>>,
    /// Notification messages (seconds since start, text), with `notify`.
    pub notifications: Option<Vec<(f64, String)>>,
    pub consistency: Option<Consistency>,
    /// /proc/vmstat oom_kill delta since before hogs and VMs started.
    pub oom_kills: u64,
    /// VMs no longer running at the end.
    pub dead_vms: Vec<String>,
    /// Where each VM's vCPUs were allowed over the run, and each VM's known load.
    pub placements: (Vec<judge::NodeHistory>, Vec<judge::KnownLoad>),
    /// The SLIT: one row of distances per node, in node order.
    pub distances: Vec<Vec<u32>>,
    /// KSM's counters when the balancer started and at the end, with `[ksm]`.
    pub ksm: Option<(crate::ksm::KsmFigures, crate::ksm::KsmFigures)>,
    /// VMs started by events: their `[[vms]]` entry, name, pid, and
    /// CLOCK_MONOTONIC (ns) at the start.
    pub late_starts: Vec<(String, String, u32, u64)>,
    /// VMs started with the scenario: their `[[vms]]` entry, name and pid.
    pub vm_pids: Vec<(String, String, u32)>,
    /// CLOCK_MONOTONIC (ns) when the balancer started (the samples' t = 0).
    pub t0_ns: Option<u64>,
}

/// One assertion's outcome.
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub allowed_failure: bool,
    pub detail: String,
}

fn outcome(a: &Assertion, ok: bool, detail: String) -> Outcome {
    Outcome {
        name: a.label(),
        ok,
        allowed_failure: false,
        detail,
    }
}

/// Every outcome so far; failures that are not allowed fail the scenario.
#[derive(Default)]
pub struct Verdict {
    failed: Vec<String>,
}

impl Verdict {
    pub fn record(&mut self, o: Outcome) {
        if !o.ok && !o.allowed_failure {
            self.failed.push(o.name.clone());
        }
        emit(&Record::Check {
            name: o.name,
            ok: o.ok,
            allowed_failure: o.allowed_failure,
            detail: o.detail,
        });
    }

    /// Emits the final line and returns whether the scenario passed.
    pub fn finish(self) -> bool {
        let ok = self.failed.is_empty();
        emit(&Record::Done {
            ok,
            failed: self.failed,
        });
        ok
    }
}

/// Checks that need no VMs: topology, files, commands.
pub fn boot_check(a: &Assertion, nodes: &[NodeInfo]) -> Outcome {
    match a {
        Assertion::Nodes { equals } => outcome(
            a,
            nodes.len() == *equals,
            format!(
                "{} online nodes: {:?}",
                nodes.len(),
                nodes.iter().map(|n| n.id).collect::<Vec<_>>()
            ),
        ),
        Assertion::Distances { matrix } => {
            let seen: Vec<Vec<u32>> = nodes.iter().map(|n| n.distances.clone()).collect();
            outcome(a, &seen == matrix, format!("SLIT {seen:?}"))
        }
        Assertion::PathExists { path } => {
            let ok = std::path::Path::new(path).exists();
            outcome(
                a,
                ok,
                if ok {
                    "present".into()
                } else {
                    "missing".into()
                },
            )
        }
        Assertion::Command {
            run,
            exit,
            timeout_s,
            allow_failure,
            uid,
            ..
        } => {
            let (status, tail) = command::run_shell(run, *timeout_s, *uid);
            let ok = status == Some(*exit);
            Outcome {
                name: a.label(),
                ok,
                allowed_failure: *allow_failure,
                detail: format!(
                    "exit {}; output tail: {tail}",
                    status.map_or("none (timed out or killed)".into(), |s| s.to_string())
                ),
            }
        }
        _ => outcome(a, false, "not a boot-time assertion".into()),
    }
}

fn sample_label(s: &Sample, at_s: Option<f64>) -> String {
    match at_s {
        Some(_) => format!("at t={} s", s.t_s),
        None => "at the last sample".into(),
    }
}

fn status_of(facts: &RunFacts) -> Result<&serde_json::Value, String> {
    match &facts.status {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(e.clone()),
        None => Err(format!("no status (balancer {})", facts.balancer.name())),
    }
}

/// Checks on the measured run. `None` for kinds handled by [`boot_check`].
pub fn run_check(
    a: &Assertion,
    summary: &Summary,
    samples: &[Sample],
    facts: &RunFacts,
) -> Option<Outcome> {
    let no_sample = |at_s: &Option<f64>| format!("no sample at or after {at_s:?} s");
    // `pass` decides on the value; a sample without the measure fails.
    let judged = |a: &Assertion,
                  measure: Measure,
                  which: Which,
                  at_s: Option<f64>,
                  pass: &dyn Fn(f64) -> bool| {
        let Some(s) = judge::sample_at(samples, at_s) else {
            return outcome(a, false, no_sample(&at_s));
        };
        match judge::locality_at(s, measure, which) {
            Some(v) => outcome(
                a,
                pass(v),
                format!(
                    "{measure:?} locality {which:?} {}: {v:.3}",
                    sample_label(s, at_s)
                ),
            ),
            None => outcome(
                a,
                false,
                format!("no {measure:?} locality {}", sample_label(s, at_s)),
            ),
        }
    };
    Some(match a {
        Assertion::Locality {
            min,
            which,
            at_s,
            measure,
        } => judged(a, *measure, *which, *at_s, &|v| v >= *min),
        Assertion::LocalityAtMost {
            max,
            which,
            at_s,
            measure,
        } => judged(a, *measure, *which, *at_s, &|v| v <= *max),
        Assertion::AccessLocality {
            min,
            which,
            within_s,
        } => {
            let reached = judge::first_time_at_least(samples, Measure::Access, *which, *min);
            let last = samples
                .last()
                .and_then(|s| judge::locality_at(s, Measure::Access, *which));
            let ok = reached.is_some_and(|t| within_s.is_none_or(|w| t <= w + 1e-9));
            outcome(
                a,
                ok,
                format!(
                    "access locality {which:?} reached {min} at {}; at the last sample {}",
                    reached.map_or("no sample".into(), |t| format!("t={t} s")),
                    last.map_or("unknown".into(), |v| format!("{v:.3}"))
                ),
            )
        }
        Assertion::PagesMigrated {
            min,
            max,
            max_misplaced_ratio,
        } => {
            let moved = summary.numa_pages_migrated.max(summary.pgmigrate_success);
            let mut ok = min.is_none_or(|m| moved >= m) && max.is_none_or(|m| moved <= m);
            let mut detail = format!("{moved} pages migrated");
            if let Some(r) = max_misplaced_ratio {
                let misplaced = judge::misplaced_pages_at_start(samples);
                let bar = (*r * misplaced as f64).floor() as u64;
                ok &= moved <= bar;
                detail.push_str(&format!(
                    "; {misplaced} pages misplaced at the start, bar {r} x = {bar}"
                ));
            }
            outcome(a, ok, detail)
        }
        Assertion::VmPagesMoved {
            vm,
            after_s,
            min,
            max,
        } => match judge::vm_pages_moved(samples, vm, *after_s) {
            Some(m) => outcome(
                a,
                min.is_none_or(|x| m >= x) && max.is_none_or(|x| m <= x),
                format!("{vm}: {m} pages seen moving between samples"),
            ),
            None => outcome(a, false, format!("no per-page truth for {vm}")),
        },
        Assertion::HotFirst {
            hot_min,
            cold_max,
            vm,
            after_s,
        } => {
            let (ok, detail) =
                judge::hot_first(samples, vm.as_deref(), *after_s, *hot_min, *cold_max);
            outcome(a, ok, detail)
        }
        Assertion::NodesUsed {
            min,
            at_s,
            min_load,
        } => match judge::sample_at(samples, *at_s) {
            Some(s) => {
                let n = judge::nodes_used(s, *min_load);
                let load: Vec<String> = s
                    .vcpu_load_per_node
                    .iter()
                    .map(|l| format!("{l:.1}"))
                    .collect();
                outcome(
                    a,
                    n >= *min,
                    format!(
                        "{n} nodes with >= {min_load} CPUs of vCPU load {} (load [{}])",
                        sample_label(s, *at_s),
                        load.join(" ")
                    ),
                )
            }
            None => outcome(a, false, no_sample(at_s)),
        },
        Assertion::CellLocality {
            min,
            measure,
            within_s,
        } => {
            let reached = samples
                .iter()
                .find(|s| judge::worst_cell(s, *measure).is_some_and(|(_, v)| v >= *min));
            let ok = reached.is_some_and(|s| within_s.is_none_or(|w| s.t_s <= w + 1e-9));
            let worst = |s: &Sample| {
                judge::worst_cell(s, *measure)
                    .map_or("unknown".into(), |(n, v)| format!("{v:.3} ({n})"))
            };
            outcome(
                a,
                ok,
                format!(
                    "worst cell reached {min} at {}; at the last sample {}",
                    reached.map_or("no sample".into(), |s| format!("t={} s", s.t_s)),
                    samples.last().map_or("none".into(), worst)
                ),
            )
        }
        Assertion::CellsNear { max_distance, at_s } => match judge::sample_at(samples, *at_s) {
            Some(s) => match judge::cells_near(s, &facts.distances, *max_distance) {
                Ok(d) => outcome(a, true, format!("{} {d}", sample_label(s, *at_s))),
                Err(d) => outcome(a, false, format!("{} {d}", sample_label(s, *at_s))),
            },
            None => outcome(a, false, no_sample(at_s)),
        },
        Assertion::MemoryOnNodeAtMost {
            node,
            max_share,
            vm,
        } => {
            let Some(last) = samples.last() else {
                return Some(outcome(a, false, "no samples".into()));
            };
            let mut worst: Option<(f64, &str)> = None;
            for v in last
                .vms
                .iter()
                .filter(|v| vm.as_ref().is_none_or(|n| n == &v.name))
            {
                let share = metrics::locality(&v.bytes_per_node, Some(*node));
                if worst.is_none_or(|(w, _)| share > w) {
                    worst = Some((share, &v.name));
                }
            }
            match worst {
                Some((share, name)) => outcome(
                    a,
                    share <= *max_share,
                    format!("most on node {node}: {name} with {share:.3}"),
                ),
                None => outcome(a, false, format!("no VM {vm:?}")),
            }
        }
        Assertion::Consistent { log_contains } => match &facts.consistency {
            None => outcome(a, false, "no consistency facts gathered".into()),
            Some(c) => {
                let mut bad = c.problems.clone();
                match &c.in_flight {
                    Ok(v) if v.is_empty() => {}
                    Ok(v) => bad.push(format!("journal: actions in flight for VMs {v:?}")),
                    Err(e) => bad.push(format!("journal unreadable: {e}")),
                }
                if !c.log.contains(log_contains.as_str()) {
                    bad.push(format!("log lacks {log_contains:?}"));
                }
                let detail = if bad.is_empty() {
                    format!("affinities, cpuset.mems, journal fine; log has {log_contains:?}")
                } else {
                    bad.join("; ")
                };
                outcome(a, bad.is_empty(), detail)
            }
        },
        Assertion::Decisions { reason, min, max } => match status_of(facts) {
            Ok(st) => {
                let n = judge::count_decisions(st, reason);
                let total = st
                    .get("decisions")
                    .and_then(|d| d.as_array())
                    .map_or(0, Vec::len);
                outcome(
                    a,
                    n >= *min && max.is_none_or(|m| n <= m),
                    format!("{n} {reason} among the {total} decisions in status"),
                )
            }
            Err(e) => outcome(a, false, e),
        },
        Assertion::KsmKept {
            min_ratio,
            min_start_pages,
        } => match facts.ksm {
            Some((start, end)) => {
                let ratio = end.pages_sharing as f64 / start.pages_sharing.max(1) as f64;
                outcome(
                    a,
                    start.pages_sharing >= *min_start_pages && ratio >= *min_ratio,
                    format!(
                        "pages_sharing {} at the start, {} at the end ({ratio:.2} of it); \
                         pages_shared {} -> {}",
                        start.pages_sharing,
                        end.pages_sharing,
                        start.pages_shared,
                        end.pages_shared
                    ),
                )
            }
            None => outcome(a, false, "the scenario has no [ksm] section".into()),
        },
        Assertion::SameNode { vms, at_s } => {
            let Some(s) = judge::sample_at(samples, *at_s) else {
                return Some(outcome(a, false, no_sample(at_s)));
            };
            let nodes: Vec<(String, Option<usize>)> = vms
                .iter()
                .map(|name| {
                    let node = s
                        .vms
                        .iter()
                        .find(|v| &v.name == name)
                        .and_then(|v| v.main_node);
                    (name.clone(), node)
                })
                .collect();
            let first = nodes.first().and_then(|n| n.1);
            let ok = first.is_some() && nodes.iter().all(|n| n.1 == first);
            let words: Vec<String> = nodes
                .iter()
                .map(|(name, n)| match n {
                    Some(n) => format!("{name} on node {n}"),
                    None => format!("{name} not seen"),
                })
                .collect();
            outcome(
                a,
                ok,
                format!("{}: {}", sample_label(s, *at_s), words.join(", ")),
            )
        }
        Assertion::TickLate { max_ms } => match status_of(facts) {
            Ok(st) => {
                let late_ms = st
                    .pointer("/daemon/max_tick_late_ns")
                    .and_then(|v| v.as_u64())
                    .map(|ns| ns as f64 / 1e6);
                let longest_ms = st
                    .pointer("/daemon/max_tick_ns")
                    .and_then(|v| v.as_u64())
                    .map_or(0.0, |ns| ns as f64 / 1e6);
                let moving_ms = st
                    .pointer("/daemon/max_tick_late_moving_ns")
                    .and_then(|v| v.as_u64())
                    .map_or(0.0, |ns| ns as f64 / 1e6);
                match late_ms {
                    Some(late) => outcome(
                        a,
                        late <= *max_ms,
                        format!(
                            "a tick started at most {late:.0} ms late ({moving_ms:.0} ms while \
                             memory moves ran); the longest tick took {longest_ms:.0} ms"
                        ),
                    ),
                    None => outcome(a, false, "status has no daemon.max_tick_late_ns".into()),
                }
            }
            Err(e) => outcome(a, false, e),
        },
        Assertion::Refusals { contains, min } => match status_of(facts) {
            Ok(st) => {
                let n = judge::count_refusals(st, contains);
                let has_list = st.get("refusals").is_some();
                outcome(
                    a,
                    n >= *min,
                    format!(
                        "{n} refusals containing {contains:?} in status{}",
                        if has_list {
                            ""
                        } else {
                            " (status has no `refusals` list: only refused decisions count)"
                        }
                    ),
                )
            }
            Err(e) => outcome(a, false, e),
        },
        Assertion::Notified { ready_within_s } => match &facts.notifications {
            None => outcome(a, false, "notify is off for this scenario".into()),
            Some(msgs) => {
                let ready = msgs.iter().find(|(_, m)| m.lines().any(|l| l == "READY=1"));
                let count = |k: &str| msgs.iter().filter(|(_, m)| m.contains(k)).count();
                let detail = format!(
                    "READY=1 at {}; {} messages ({} STATUS=, {} WATCHDOG=1)",
                    ready.map_or("never".into(), |(t, _)| format!("{t:.2} s")),
                    msgs.len(),
                    count("STATUS="),
                    count("WATCHDOG=1")
                );
                outcome(a, ready.is_some_and(|(t, _)| t <= ready_within_s), detail)
            }
        },
        Assertion::NoOom => {
            let ok = facts.oom_kills == 0 && facts.dead_vms.is_empty();
            outcome(
                a,
                ok,
                format!(
                    "{} OOM kills; VMs gone: {:?}",
                    facts.oom_kills, facts.dead_vms
                ),
            )
        }
        Assertion::WorkDone {
            min_touches_per_vcpu_s,
            after_s,
        } => {
            let worst = samples
                .iter()
                .skip(1)
                .filter(|s| after_s.is_none_or(|t| s.t_s > t))
                .flat_map(|s| {
                    s.vms
                        .iter()
                        .map(move |v| (v.touches_per_vcpu_s, s.t_s, &v.name))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let (rate, detail) = match worst {
                Some((r, t, name)) => (
                    r,
                    format!("slowest: {name} at t={t} s: {r:.0} touches/vCPU/s"),
                ),
                None => (0.0, "no samples".into()),
            };
            outcome(a, rate >= *min_touches_per_vcpu_s, detail)
        }
        Assertion::CheapestMove { min_candidates } => {
            let (histories, loads) = &facts.placements;
            match judge::cheapest_move(histories, loads, samples) {
                Err(why) => outcome(a, false, why),
                Ok(truth) => {
                    let mut ok = truth.holds() && truth.candidates.len() >= *min_candidates;
                    let mut detail = truth.describe();
                    if truth.candidates.len() < *min_candidates {
                        detail.push_str(&format!(
                            "; only {} VMs on the node",
                            truth.candidates.len()
                        ));
                    }
                    if facts.balancer == Balancer::Vmbalancer {
                        let said = status_of(facts).and_then(|st| judge::status_agrees(st, &truth));
                        ok &= said.is_ok();
                        detail.push_str("; ");
                        detail.push_str(&said.unwrap_or_else(|e| e));
                    }
                    outcome(a, ok, detail)
                }
            }
        }
        Assertion::MemoryOnNode {
            vm,
            node,
            min_share,
        } => {
            let found = samples
                .first()
                .and_then(|s| s.vms.iter().find(|v| &v.name == vm));
            match found {
                Some(v) => {
                    let total: u64 = v.bytes_per_node.iter().sum();
                    let share = metrics::locality(&v.bytes_per_node, Some(*node));
                    outcome(
                        a,
                        share >= *min_share,
                        format!("{share:.3} of {} MiB on node {node}", total >> 20),
                    )
                }
                None => outcome(a, false, format!("no VM named {vm}")),
            }
        }
        Assertion::Reaction {
            vm,
            max_s,
            after_s: Some(at_s),
        } => {
            // `at_s` is on the VMs' own clock (their phases'), which a fake VM starts
            // once its memory is placed, before the balancer: each VM's load changes
            // `at_s - clock_at_t0_s` after t = 0.
            let status = status_of(facts).ok();
            let first = facts
                .vm_pids
                .iter()
                .filter(|(entry, ..)| entry == vm)
                .filter_map(|(_, name, pid)| {
                    let clock_at_t0_s = facts
                        .placements
                        .1
                        .iter()
                        .find(|k| &k.name == name)
                        .map_or(0.0, |k| k.clock_at_t0_s);
                    let since_ns = facts.t0_ns? + ((at_s - clock_at_t0_s).max(0.0) * 1e9) as u64;
                    let t = vmbalancer_tests::lab::access::first_cpu_move(
                        status?,
                        Some(*pid),
                        since_ns,
                    )?;
                    Some((t, name.clone()))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            match first {
                Some((t, name)) => outcome(
                    a,
                    t <= *max_s,
                    format!(
                        "{name}: first CPU move {:.0} ms after its load changed (its clock's {at_s} s)",
                        t * 1e3
                    ),
                ),
                None => outcome(
                    a,
                    false,
                    format!("no CPU move of a {vm} VM after t = {at_s} s"),
                ),
            }
        }
        Assertion::Reaction {
            vm,
            max_s,
            after_s: None,
        } => {
            let status = status_of(facts).ok();
            let times: Vec<(String, Option<f64>)> = facts
                .late_starts
                .iter()
                .filter(|(entry, ..)| entry == vm)
                .map(|(_, name, pid, at_ns)| {
                    let t = status.and_then(|st| {
                        vmbalancer_tests::lab::access::first_cpu_move(st, Some(*pid), *at_ns)
                    });
                    (name.clone(), t)
                })
                .collect();
            let ok = !times.is_empty() && times.iter().all(|(_, t)| t.is_some_and(|t| t <= *max_s));
            let detail = if times.is_empty() {
                format!("no late VM {vm} was started")
            } else {
                times
                    .iter()
                    .map(|(n, t)| match t {
                        Some(t) => format!("{n}: first CPU move {:.0} ms after its start", t * 1e3),
                        None => format!("{n}: no CPU move"),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            outcome(a, ok, detail)
        }
        _ => return None,
    })
}
