//! The lab's in-guest harness: runs one scenario inside the 4-node guest and
//! reports over the serial console (see `vmbalancer_tests::lab::protocol`).
//!
//! Order of a run: boot-time assertions (topology, BTF, commands) -> cgroup and
//! sysctl setup -> fake VMs started and their memory placed -> `with_vms` commands
//! and `trace_truth` -> the balancer starts (t = 0) -> ground truth sampled until
//! `duration_s` -> balancer stopped -> summary and run-time assertions -> verdict.
//! The exit status is 0 only if every assertion that may fail the scenario held.

mod balancer;
mod capture;
mod checks;
mod command;
mod sampler;
mod trace_truth;
mod vms;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{Assertion, Balancer, Scenario};
use vmbalancer_tests::lab::truth;

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
}

/// Prints one result line on the console.
pub fn emit(record: &Record) {
    println!("{}", record.line());
}

fn main() {
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
    if scenario.vms.is_empty() {
        return Ok(verdict.finish());
    }

    vms::setup_cgroups(scenario.cgroup)?;
    vms::setup_sysctls(&scenario, &nodes)?;
    let mut running = vms::start_all(&scenario, &nodes)?;
    vms::wait_ready(&mut running, Duration::from_secs(180))?;

    for a in scenario.assertions.iter().filter(|a| !a.is_boot_time()) {
        match a {
            Assertion::Command { .. } => verdict.record(checks::boot_check(a, &nodes)),
            Assertion::TraceTruth { .. } => {
                for o in trace_truth::check(a, &scenario, &nodes, &running) {
                    verdict.record(o);
                }
            }
            _ => {}
        }
    }

    let mut sampler = sampler::Sampler::new(&nodes, &running)?;
    // One second of vCPU history, so the first sample knows where vCPUs run.
    sampler.poll_for(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut guard = balancer::start(balancer, &scenario)?;
    let end_s = args.capture_at_s.unwrap_or(scenario.duration_s);
    let mut times = scenario.sample_times_s();
    times.retain(|&t| t <= end_s + 1e-9);
    for t in times {
        let due = t0 + Duration::from_secs_f64(t);
        sampler.poll_until(due);
        let sample = sampler.sample(t);
        emit(&Record::Sample(sample));
    }
    if args.capture_at_s.is_some() {
        capture::emit_tree(&nodes, &running, args.capture_vms);
    }
    let run_s = t0.elapsed().as_secs_f64();
    guard.stop();
    let summary = sampler.summary(balancer.name(), &args.kernel, run_s);
    emit(&Record::Summary(summary.clone()));
    for a in scenario.assertions.iter().filter(|a| !a.is_boot_time()) {
        if let Some(outcome) = checks::run_check(a, &summary, sampler.samples()) {
            verdict.record(outcome);
        }
    }
    vms::stop_all(running);
    Ok(verdict.finish())
}
