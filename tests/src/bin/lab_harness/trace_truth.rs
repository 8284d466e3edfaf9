//! The `trace_truth` assertion: runs `vmbalancer trace --once --json` next to the
//! running fake VMs and compares it with what the harness reads itself.
//!
//! Memory does not change once a fake VM placed it (no balancer runs), so one read
//! of guest RAM per node is enough. vCPUs can move, so the harness reads every
//! vCPU's CPU just before and just after trace and judges only those that stayed
//! (see `vmbalancer_tests::lab::compare`); with `pin_vcpus` they are first pinned
//! one CPU each, spread over the nodes, so none should move.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmbalancer_tests::lab::compare::{self, VcpuTruth, VmTruth};
use vmbalancer_tests::lab::scenario::{Assertion, Scenario};
use vmbalancer_tests::lab::truth::{self, NodeInfo};

use crate::checks::Outcome;
use crate::vms::RunningVm;

/// Pins vCPU k (over all VMs) to one CPU of node k mod n, so vCPUs cover every node.
fn pin_vcpus(nodes: &[NodeInfo], vcpus: &[(u32, u32)]) -> anyhow::Result<()> {
    let n = nodes.len().max(1);
    for (k, &(_, tid)) in vcpus.iter().enumerate() {
        let node = &nodes[k % n];
        if node.cpus.is_empty() {
            continue;
        }
        let cpu = node.cpus[(k / n) % node.cpus.len()];
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only
        // read/write that local set.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set)
        };
        if rc != 0 {
            bail!(
                "pinning vCPU thread {tid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Node id per vCPU thread from /proc/PID/task/TID/stat field 39.
fn vcpu_nodes(
    nodes: &[NodeInfo],
    cpu_node: &BTreeMap<u32, usize>,
    vcpus: &[(u32, u32)],
) -> BTreeMap<u32, Option<u32>> {
    let root = Path::new("/");
    vcpus
        .iter()
        .map(|&(pid, tid)| {
            let node = truth::read_task_stat(root, pid, tid)
                .ok()
                .and_then(|s| cpu_node.get(&s.processor))
                .map(|&i| nodes[i].id);
            (tid, node)
        })
        .collect()
}

/// Runs trace once; returns its last JSON line.
fn run_trace(timeout_s: f64) -> anyhow::Result<String> {
    let mut child = Command::new("vmbalancer")
        .args(["trace", "--once", "--json", "--interval", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting vmbalancer trace")?;
    let mut stdout = child.stdout.take().context("trace stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("vmbalancer trace did not finish within {timeout_s} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("vmbalancer trace exited with {status}");
    }
    out.lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .map(str::to_string)
        .context("vmbalancer trace printed no JSON line")
}

/// Runs a `trace_truth` assertion; one outcome per VM, then the overall one.
pub fn check(
    a: &Assertion,
    scenario: &Scenario,
    nodes: &[NodeInfo],
    running: &[RunningVm],
) -> Vec<Outcome> {
    let Assertion::TraceTruth {
        max_error_pct,
        min_vcpu_agree_pct,
        pin_vcpus,
        timeout_s,
    } = a
    else {
        return Vec::new();
    };
    let params = Params {
        max_error_pct: *max_error_pct,
        min_vcpu_agree_pct: *min_vcpu_agree_pct,
        pin: *pin_vcpus,
        timeout_s: *timeout_s,
    };
    match check_inner(scenario, nodes, running, &params) {
        Ok((mut per_vm, ok, detail)) => {
            per_vm.push(Outcome {
                name: a.label(),
                ok,
                allowed_failure: false,
                detail,
            });
            per_vm
        }
        Err(e) => vec![Outcome {
            name: a.label(),
            ok: false,
            allowed_failure: false,
            detail: format!("{e:#}"),
        }],
    }
}

struct Params {
    max_error_pct: f64,
    min_vcpu_agree_pct: f64,
    pin: bool,
    timeout_s: f64,
}

fn check_inner(
    scenario: &Scenario,
    nodes: &[NodeInfo],
    running: &[RunningVm],
    p: &Params,
) -> anyhow::Result<(Vec<Outcome>, bool, String)> {
    let (max_error_pct, min_vcpu_agree_pct, pin) = (p.max_error_pct, p.min_vcpu_agree_pct, p.pin);
    let root = Path::new("/");
    let n_nodes = nodes.iter().map(|n| n.id as usize + 1).max().unwrap_or(0);
    let cpu_node = truth::cpu_to_node(nodes);
    let configured: BTreeMap<String, u64> = scenario
        .instances()
        .into_iter()
        .map(|i| (i.name, i.spec.memory_mib << 20))
        .collect();

    let mut vcpus = Vec::new();
    for vm in running {
        for (tid, _) in truth::vcpu_threads(root, vm.pid)? {
            vcpus.push((vm.pid, tid));
        }
    }
    if pin {
        pin_vcpus(nodes, &vcpus)?;
        // Let every pinned thread run once on its CPU, so stat shows it.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let mut memory = BTreeMap::new();
    for vm in running {
        let bytes = configured.get(&vm.name).copied().unwrap_or(0);
        let per_node = truth::read_guest_ram_bytes_per_node(root, vm.pid, bytes, n_nodes)
            .with_context(|| format!("guest RAM of {}", vm.name))?;
        memory.insert(vm.pid, per_node);
    }
    let before = vcpu_nodes(nodes, &cpu_node, &vcpus);
    let line = run_trace(p.timeout_s)?;
    let after = vcpu_nodes(nodes, &cpu_node, &vcpus);
    let traced = compare::parse_trace_json(&line)?;

    let mut results = Vec::new();
    let mut per_vm = Vec::new();
    for vm in running {
        let t = VmTruth {
            name: vm.name.clone(),
            pid: vm.pid,
            guest_ram_bytes_per_node: memory.remove(&vm.pid).unwrap_or_default(),
            vcpus: vcpus
                .iter()
                .filter(|(pid, _)| *pid == vm.pid)
                .map(|&(_, tid)| VcpuTruth {
                    tid,
                    node_before: before.get(&tid).copied().flatten(),
                    node_after: after.get(&tid).copied().flatten(),
                })
                .collect(),
        };
        let c = compare::compare_vm(&t, traced.iter().find(|r| r.pid == vm.pid), max_error_pct);
        per_vm.push(Outcome {
            name: format!("trace vs truth: {}", vm.name),
            ok: c.memory_ok && c.vcpus_agree == c.vcpus_checked,
            // The overall check carries the vCPU tolerance; a VM line fails only
            // on memory.
            allowed_failure: c.memory_ok,
            detail: c.detail(),
        });
        results.push(c);
    }
    let (ok, agree_pct) = compare::all_agree(&results, min_vcpu_agree_pct);
    let worst_node = results
        .iter()
        .map(|c| c.max_node_error_pct)
        .fold(0.0, f64::max);
    let worst_total = results
        .iter()
        .map(|c| c.total_error_pct)
        .fold(0.0, f64::max);
    let moved: usize = results.iter().map(|c| c.vcpus_moved).sum();
    let checked: usize = results.iter().map(|c| c.vcpus_checked).sum();
    let detail = format!(
        "{} VMs: worst total error {worst_total:.3} %, worst node error {worst_node:.3} %; \
         vCPU nodes agree {agree_pct:.1} % of {checked} ({moved} moved during trace, \
         pinned: {pin})",
        results.len()
    );
    Ok((per_vm, ok, detail))
}
