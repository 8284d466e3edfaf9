//! Evaluates assertions and keeps the verdict.

use vmbalancer_tests::lab::protocol::{Record, Sample, Summary};
use vmbalancer_tests::lab::scenario::{Assertion, Which};
use vmbalancer_tests::lab::truth::NodeInfo;

use crate::{command, emit};

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
            ..
        } => {
            let (status, tail) = command::run_shell(run, *timeout_s);
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

/// Checks on the measured run. `None` for kinds handled by [`boot_check`].
pub fn run_check(a: &Assertion, summary: &Summary, samples: &[Sample]) -> Option<Outcome> {
    let last = samples.last();
    let loc = |which: &Which| {
        last.map_or(0.0, |s| match which {
            Which::Mean => s.locality_mean,
            Which::Min => s.locality_min,
        })
    };
    Some(match a {
        Assertion::Locality { min, which } => {
            let v = loc(which);
            outcome(
                a,
                v >= *min,
                format!("locality {which:?} at the last sample: {v:.3}"),
            )
        }
        Assertion::LocalityAtMost { max, which } => {
            let v = loc(which);
            outcome(
                a,
                v <= *max,
                format!("locality {which:?} at the last sample: {v:.3}"),
            )
        }
        Assertion::PagesMigrated { min, max } => {
            let moved = summary.numa_pages_migrated.max(summary.pgmigrate_success);
            let ok = min.is_none_or(|m| moved >= m) && max.is_none_or(|m| moved <= m);
            outcome(a, ok, format!("{moved} pages migrated"))
        }
        Assertion::WorkDone {
            min_touches_per_vcpu_s,
        } => {
            let worst = samples
                .iter()
                .skip(1)
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
                    let on = v.bytes_per_node.get(*node).copied().unwrap_or(0);
                    let share = if total == 0 {
                        0.0
                    } else {
                        on as f64 / total as f64
                    };
                    outcome(
                        a,
                        share >= *min_share,
                        format!("{share:.3} of {} MiB on node {node}", total >> 20),
                    )
                }
                None => outcome(a, false, format!("no VM named {vm}")),
            }
        }
        _ => return None,
    })
}
