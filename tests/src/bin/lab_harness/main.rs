//! The lab's in-guest harness: runs one scenario inside the 4-node guest and
//! reports over the serial console (see `vmbalancer_tests::lab::protocol`).
//!
//! Order of a run: boot-time assertions (topology, BTF, commands) -> cgroup and
//! sysctl setup -> fake VMs started and their memory placed -> the balancer's
//! package installed (stack guest) -> `with_vms` commands and `trace_truth` -> the
//! balancer starts (t = 0) -> ground truth sampled until
//! `duration_s` (with the scenario's balancer events and timed commands in between)
//! -> `vmbalancer status --json` and the consistency facts -> balancer stopped ->
//! summary and run-time assertions -> verdict. Memory hogs, when the scenario has
//! any, fill their nodes before the VMs start. With domains that ask libvirt for
//! automatic placement (`auto_placement`), the balancer is installed and started
//! before the VMs (it is the advisor libvirt asks), and t = 0 is when sampling
//! starts. The exit status is 0 only if every assertion that may fail the scenario
//! held.

mod balancer;
mod bench_mover;
mod capture;
mod checks;
mod command;
mod consistency;
mod domains;
mod ebpf_truth;
mod hog;
mod ksm;
mod sampler;
mod trace_truth;
mod vms;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{Assertion, Balancer, Event, Guest, Scenario, signal_number};
use vmbalancer_tests::lab::{access, truth};

#[derive(Debug, Parser)]
#[command(
    name = "lab-harness",
    about = "Runs one NUMA lab scenario in the guest"
)]
struct Args {
    /// The scenario file.
    #[arg(long)]
    scenario: PathBuf,
    /// The scenario's name, for reports.
    #[arg(long, default_value = "scenario")]
    name: String,
    /// Overrides the scenario's balancer.
    #[arg(long)]
    balancer: Option<String>,
    /// The kernel generation label, for reports.
    #[arg(long, default_value = "")]
    kernel: String,
    /// Capture the files vmbalancer parses this many seconds after t = 0, then stop.
    #[arg(long)]
    capture_at_s: Option<f64>,
    /// How many VMs' /proc trees to capture.
    #[arg(long, default_value_t = 3)]
    capture_vms: usize,
    /// Run the mover benchmark (see `bench_mover`) instead of the scenario's VMs.
    #[arg(long)]
    bench_mover: bool,
}

/// Prints one result line on the console.
pub fn emit(record: &Record) {
    println!("{}", record.line());
}

fn main() {
    // A memory hog is this program started again (see `hog`).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--hog") {
        let ready = PathBuf::from(argv.get(4).map_or("/run/lab/hog.ready", String::as_str));
        if let Err(e) = hog::run(argv.get(2).map_or("", String::as_str), &ready) {
            eprintln!("memory hog: {e:#}");
        }
        std::process::exit(1);
    }
    let ok = match run() {
        Ok(ok) => ok,
        Err(e) => {
            emit(&Record::Check {
                name: "harness".into(),
                ok: false,
                allowed_failure: false,
                detail: format!("{e:#}"),
            });
            emit(&Record::Done {
                ok: false,
                failed: vec!["harness".into()],
            });
            false
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    let scenario = Scenario::load(&args.scenario)
        .with_context(|| format!("loading {}", args.scenario.display()))?;
    let balancer = match &args.balancer {
        Some(b) => Balancer::parse(b).with_context(|| format!("unknown balancer {b:?}"))?,
        None => scenario.balancer,
    };
    emit(&Record::Start {
        scenario: args.name.clone(),
        balancer: balancer.name().into(),
        kernel: args.kernel.clone(),
    });
    let mut verdict = checks::Verdict::default();
    let root = std::path::Path::new("/");
    let nodes = truth::read_nodes(root).context("reading the guest's NUMA topology")?;

    for a in scenario.assertions.iter().filter(|a| a.is_boot_time()) {
        verdict.record(checks::boot_check(a, &nodes));
    }
    // The eBPF programs against the harness's own worker: no VM needed, and nothing
    // else running is what its ground truth wants.
    for a in &scenario.assertions {
        if let Assertion::EbpfTruth { .. } = a {
            for o in ebpf_truth::check(a, &nodes) {
                verdict.record(o);
            }
        }
    }
    if args.bench_mover {
        let ok = bench_mover::run(&nodes)?;
        verdict.record(checks::Outcome {
            name: "bench-mover".into(),
            ok,
            allowed_failure: false,
            detail: "every method left >= 99 % of guest RAM on the target nodes".into(),
        });
        return Ok(verdict.finish());
    }
    if scenario.vms.is_empty() {
        // A check that needs VMs in a scenario without any is a scenario error,
        // not a pass.
        for a in &scenario.assertions {
            if !a.is_boot_time() && !matches!(a, Assertion::EbpfTruth { .. }) {
                verdict.record(checks::Outcome {
                    name: a.label(),
                    ok: false,
                    allowed_failure: false,
                    detail: "this check needs VMs and the scenario has none".into(),
                });
            }
        }
        return Ok(verdict.finish());
    }

    let stack = scenario.guest == Guest::Stack;
    if !stack {
        // systemd mounted the stack guest's cgroups and libvirt made its groups.
        vms::setup_cgroups(scenario.cgroup)?;
    }
    vms::setup_sysctls(&scenario, &nodes)?;
    if let Some(k) = &scenario.ksm {
        ksm::setup(k)?;
    }
    let oom_kills0 = oom_kills();
    std::fs::create_dir_all("/run/lab")?;
    let hogs = hog::start_all(&scenario.hogs)?;
    // The advisor libvirt asks at each domain's start must already run, as on an
    // operator's host: installed, wired in as libvirt's `numad`, started.
    let mut early_guard = None;
    if scenario.advisor_first() {
        balancer::prepare(balancer, &scenario)?;
        early_guard = Some(balancer::start(balancer, &scenario)?);
    }
    let mut running = if stack {
        domains::check_payload()?;
        domains::start_all(&scenario, &nodes)?
    } else {
        vms::start_all(&scenario, &nodes)?
    };
    // A libvirt domain's start and first touch take tens of seconds under emulation.
    let ready_limit_s = if stack { 300 } else { 180 };
    vms::wait_ready(&mut running, Duration::from_secs(ready_limit_s))?;
    if stack {
        domains::place(&scenario, &running, &nodes)?;
    }
    vms::confine(&running)?;
    // Merging takes a while: the balancer (and `trace` below) meets it done.
    let ksm_start = match &scenario.ksm {
        Some(k) => {
            let settled = ksm::settle(k)?;
            if k.idle_vms_while_merging {
                std::fs::remove_file(vmbalancer_tests::lab::scenario::VM_HOLD_FILE)
                    .context("releasing the VMs' hold")?;
                emit(&Record::Event {
                    source: "harness".into(),
                    text: "the VMs' vCPUs start working now (idle while KSM merged)".into(),
                });
            }
            Some(settled)
        }
        None => None,
    };
    // Installed before the `with_vms` commands, so they can run the operator's
    // tools (`vmbalancer trace`) on the VMs as the balancer will first see them.
    if early_guard.is_none() {
        balancer::prepare(balancer, &scenario)?;
    }

    for a in scenario.assertions.iter().filter(|a| !a.is_boot_time()) {
        match a {
            Assertion::Command { at_s: None, .. }
                if a.needs_vmbalancer() && balancer != Balancer::Vmbalancer =>
            {
                emit(&Record::Event {
                    source: "harness".into(),
                    text: format!("check skipped under {}: {}", balancer.name(), a.label()),
                });
            }
            Assertion::Command { at_s: None, .. } => verdict.record(checks::boot_check(a, &nodes)),
            Assertion::TraceTruth { .. } => {
                for o in trace_truth::check(a, &scenario, &nodes, &running) {
                    verdict.record(o);
                }
            }
            _ => {}
        }
    }

    let per_page = scenario.assertions.iter().any(|a| {
        matches!(
            a,
            Assertion::HotFirst { .. } | Assertion::VmPagesMoved { .. }
        )
    });
    let mut sampler = sampler::Sampler::new(&nodes, &running, per_page)?;
    // One second of vCPU history, so the first sample knows where vCPUs run.
    sampler.poll_for(Duration::from_secs(1));
    // The t = 0 layout is the one the balancer meets, sampled before it starts: a
    // daemon under systemd (Type=notify) is through its first tick, and may have
    // begun to move, by the time `systemctl start` returns. An advisor started
    // before the VMs has acted already; its t = 0 is the first sample after. The
    // clock starts after that sample, so its reading time is not the balancer's.
    let mut first_sample = early_guard.is_none().then(|| sampler.sample(0.0));
    sampler.start_clock();
    domains::start_phases();
    let t0 = Instant::now();
    vms::let_go(&running, &nodes)?;
    let mut guard = match early_guard {
        Some(g) => g,
        None => balancer::start(balancer, &scenario)?,
    };
    // Refusals are judged on every sample's status, not only the last one.
    let watch_refusals = balancer == Balancer::Vmbalancer
        && scenario
            .assertions
            .iter()
            .any(|a| matches!(a, Assertion::Refusals { .. }));
    let end_s = args.capture_at_s.unwrap_or(scenario.duration_s);
    // VMs started by events: the VM, its `[[vms]]` entry, and CLOCK_MONOTONIC when
    // it was started.
    let mut late: Vec<(vms::RunningVm, String, u64)> = Vec::new();
    for step in timeline(&scenario, end_s) {
        let due = t0 + Duration::from_secs_f64(step.at_s());
        sampler.poll_until(due);
        match step {
            Step::Sample(t) => {
                let sample = if t == 0.0
                    && let Some(s) = first_sample.take()
                {
                    s
                } else {
                    sampler.sample(t)
                };
                emit(&Record::Sample(sample));
                if watch_refusals {
                    guard.note_refusals();
                }
            }
            Step::Event(e) => {
                if balancer != Balancer::Vmbalancer {
                    emit(&Record::Event {
                        source: "harness".into(),
                        text: format!(
                            "event at {} s skipped: balancer {}",
                            e.at_s,
                            balancer.name()
                        ),
                    });
                    continue;
                }
                if let Some(w) = e.wait_for_migration_s {
                    guard.wait_for_migration(Duration::from_secs_f64(w));
                }
                if let Some(cmd) = &e.run {
                    run_event_command(cmd);
                }
                for vm in e
                    .start_vm
                    .iter()
                    .flat_map(|name| scenario.late_instances(name))
                {
                    let at_ns = vmbalancer_tests::clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
                    let started = vms::start_one(&scenario, &nodes, &vm, false)?;
                    emit(&Record::Event {
                        source: "harness".into(),
                        text: format!("started late VM {} (pid {})", started.name, started.pid),
                    });
                    late.push((started, vm.spec.name.clone(), at_ns));
                }
                if let Some(sig) = &e.kill_balancer {
                    guard.kill(signal_number(sig).unwrap_or(libc::SIGKILL));
                }
                if e.start_balancer {
                    guard.restart()?;
                }
            }
            Step::Command(a) if a.needs_vmbalancer() && balancer != Balancer::Vmbalancer => {
                emit(&Record::Event {
                    source: "harness".into(),
                    text: format!("check skipped under {}: {}", balancer.name(), a.label()),
                });
            }
            Step::Command(a) => verdict.record(checks::boot_check(a, &nodes)),
        }
    }
    if args.capture_at_s.is_some() {
        capture::emit_tree(&nodes, &running, args.capture_vms);
    }
    let run_s = t0.elapsed().as_secs_f64();
    let ksm_figures = match ksm_start {
        Some(start) => {
            let end = ksm::figures()?;
            emit(&Record::Event {
                source: "harness".into(),
                text: format!(
                    "KSM pages_sharing {} -> {}, pages_shared {} -> {} (balancer start -> end)",
                    start.pages_sharing, end.pages_sharing, start.pages_shared, end.pages_shared
                ),
            });
            Some((start, end))
        }
        None => None,
    };
    let wants = |f: fn(&Assertion) -> bool| scenario.assertions.iter().any(f);
    let mut consistency = None;
    if balancer == Balancer::Vmbalancer {
        guard.take_status();
        if stack {
            report_status_vms(guard.status.as_ref());
        }
        if wants(|a| matches!(a, Assertion::Consistent { .. })) {
            consistency = Some(consistency::running_problems(&running));
        }
    }
    let balancer_cpu_s = guard.cpu_s();
    if let Some(cpu_s) = balancer_cpu_s {
        emit(&Record::Event {
            source: "harness".into(),
            text: format!(
                "{} used {cpu_s:.2} s of CPU in {run_s:.1} s ({:.1} % of one CPU)",
                balancer.name(),
                cpu_s / run_s.max(1e-9) * 100.0
            ),
        });
    }
    guard.stop();
    let mut facts = checks::RunFacts {
        balancer,
        status: guard.status.take(),
        notifications: guard.notifications(),
        consistency: None,
        oom_kills: oom_kills().saturating_sub(oom_kills0),
        dead_vms: running
            .iter_mut()
            .filter_map(|v| (!v.alive()).then(|| v.name.clone()))
            .collect(),
        placements: sampler.placements(|name| {
            scenario
                .instances()
                .into_iter()
                .find(|v| v.name == name)
                .map(|v| v.spec.phases.iter().map(|p| (p.at_s, p.duty_pct)).collect())
                .unwrap_or_default()
        }),
        distances: nodes.iter().map(|n| n.distances.clone()).collect(),
        ksm: ksm_figures,
        late_starts: late
            .iter()
            .map(|(v, entry, at_ns)| (entry.clone(), v.name.clone(), v.pid, *at_ns))
            .collect(),
        vm_pids: {
            let instances = scenario.instances();
            running
                .iter()
                .filter_map(|v| {
                    let entry = instances.iter().find(|i| i.name == v.name)?;
                    Some((entry.spec.name.clone(), v.name.clone(), v.pid))
                })
                .collect()
        },
        t0_ns: sampler.t0_monotonic_ns(),
    };
    if let Some(problems) = consistency {
        facts.consistency = Some(consistency::after_stop(problems, &guard.state_dir));
    }
    let (query_total_s, query_max_s) = sampler.query_cost_s();
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "per-page queries took {query_total_s:.2} s over {} samples (longest {query_max_s:.2} s)",
            sampler.samples().len()
        ),
    });
    let mut summary = sampler.summary(balancer.name(), &args.kernel, run_s);
    summary.balancer_cpu_s = balancer_cpu_s;
    if let (Some(Ok(status)), Some(t0_ns)) = (&facts.status, sampler.t0_monotonic_ns()) {
        summary.first_cpu_move_status_s = access::first_cpu_move_in_status(status, t0_ns);
        summary.tick_late_moving_s = status
            .pointer("/daemon/max_tick_late_moving_ns")
            .and_then(serde_json::Value::as_u64)
            .map(|ns| ns as f64 / 1e9);
    }
    emit(&Record::Summary(Box::new(summary.clone())));
    for a in scenario.assertions.iter().filter(|a| !a.is_boot_time()) {
        if a.needs_vmbalancer()
            && balancer != Balancer::Vmbalancer
            && !matches!(a, Assertion::Command { .. })
        {
            emit(&Record::Event {
                source: "harness".into(),
                text: format!("check skipped under {}: {}", balancer.name(), a.label()),
            });
            continue;
        }
        if let Some(outcome) = checks::run_check(a, &summary, sampler.samples(), &facts) {
            verdict.record(outcome);
        }
    }
    vms::stop_all(running);
    vms::stop_all(late.into_iter().map(|(v, ..)| v).collect());
    drop(hogs);
    Ok(verdict.finish())
}

/// Runs a scenario event's shell command and reports how it ended.
fn run_event_command(cmd: &str) {
    let out = std::process::Command::new("sh").args(["-c", cmd]).output();
    let text = match out {
        Ok(o) => format!(
            "`{cmd}`: {}; {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("`{cmd}` did not start: {e}"),
    };
    emit(&Record::Event {
        source: "harness".into(),
        text,
    });
}

/// One line per VM of `vmbalancer status --json`: what the daemon thinks of each.
fn report_status_vms(status: Option<&Result<serde_json::Value, String>>) {
    let Some(Ok(status)) = status else {
        return;
    };
    for vm in status
        .get("vms")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let field = |k: &str| vm.get(k).map_or("-".to_string(), |v| v.to_string());
        emit(&Record::Event {
            source: "status".into(),
            text: format!(
                "{} pid {}: managed {} ({}), cpus {}, locality {} %",
                field("name"),
                field("pid"),
                field("managed"),
                field("unmanaged_why"),
                field("cpus"),
                field("locality_pct")
            ),
        });
    }
}

/// /proc/vmstat `oom_kill` (0 when unreadable).
fn oom_kills() -> u64 {
    truth::read_vmstat(std::path::Path::new("/"))
        .ok()
        .and_then(|v| v.get("oom_kill").copied())
        .unwrap_or(0)
}

/// One thing to do at a time of the run.
enum Step<'a> {
    Sample(f64),
    Event(&'a Event),
    Command(&'a Assertion),
}

impl Step<'_> {
    fn at_s(&self) -> f64 {
        match self {
            Step::Sample(t) => *t,
            Step::Event(e) => e.at_s,
            Step::Command(Assertion::Command { at_s, .. }) => at_s.unwrap_or(0.0),
            Step::Command(_) => 0.0,
        }
    }
}

/// Samples, balancer events and timed commands up to `end_s`, in time order (at
/// equal times: events, then commands, then the sample).
fn timeline(scenario: &Scenario, end_s: f64) -> Vec<Step<'_>> {
    let mut steps: Vec<Step<'_>> = scenario.events.iter().map(Step::Event).collect();
    steps.extend(
        scenario
            .assertions
            .iter()
            .filter(|a| matches!(a, Assertion::Command { at_s: Some(_), .. }))
            .map(Step::Command),
    );
    steps.extend(scenario.sample_times_s().into_iter().map(Step::Sample));
    steps.retain(|s| s.at_s() <= end_s + 1e-9);
    let rank = |s: &Step<'_>| match s {
        Step::Event(_) => 0,
        Step::Command(_) => 1,
        Step::Sample(_) => 2,
    };
    steps.sort_by(|a, b| a.at_s().total_cmp(&b.at_s()).then(rank(a).cmp(&rank(b))));
    steps
}
