//! Compares what `vmbalancer trace` reports with the lab's own ground truth.
//!
//! Trace is what an operator reads to decide whether a host is NUMA-healthy, so its
//! numbers must be the kernel's numbers. The harness reads the same facts itself
//! (guest RAM per node from numa_maps, each vCPU's last CPU from its stat file) and
//! this module, pure and unit-tested, decides whether the two agree: memory within a
//! tolerance of the VM's guest RAM on every node and in total, and every vCPU on the
//! node the kernel says, except vCPUs that visibly moved while trace was sampling
//! (the harness reads them before and after, and a disagreement there is counted
//! apart, not blamed on trace).

use serde_json::Value;

/// What the harness read itself for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTruth {
    pub name: String,
    pub pid: u32,
    /// Guest RAM resident per node, indexed by node id.
    pub guest_ram_bytes_per_node: Vec<u64>,
    pub vcpus: Vec<VcpuTruth>,
}

/// One vCPU's node as read before and after trace ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTruth {
    pub tid: u32,
    pub node_before: Option<u32>,
    pub node_after: Option<u32>,
}

/// What trace reported for one VM, with arrays re-indexed by node id.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTrace {
    pub pid: u32,
    pub memory_bytes_per_node: Vec<u64>,
    /// (tid, node) per vCPU.
    pub vcpus: Vec<(u32, Option<u32>)>,
}

/// The outcome for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmComparison {
    pub name: String,
    /// Guest RAM by the harness, the reference for percentages.
    pub truth_bytes: u64,
    pub trace_bytes: u64,
    /// |trace - truth| of the total, in % of the VM's guest RAM.
    pub total_error_pct: f64,
    /// The worst node's |trace - truth|, in % of the VM's guest RAM.
    pub max_node_error_pct: f64,
    pub memory_ok: bool,
    /// vCPUs whose node was read unchanged before and after trace.
    pub vcpus_checked: usize,
    /// Of those, the ones trace placed on the same node.
    pub vcpus_agree: usize,
    /// vCPUs that changed node between the two reads (not judged).
    pub vcpus_moved: usize,
    /// Plain-words disagreements, for the report.
    pub problems: Vec<String>,
}

impl VmComparison {
    /// One line for a check's detail.
    pub fn detail(&self) -> String {
        let mut s = format!(
            "guest RAM truth {} KiB, trace {} KiB; total error {:.3} %, worst node {:.3} %; \
             vCPUs on the same node {}/{} ({} moved during trace)",
            self.truth_bytes >> 10,
            self.trace_bytes >> 10,
            self.total_error_pct,
            self.max_node_error_pct,
            self.vcpus_agree,
            self.vcpus_checked,
            self.vcpus_moved,
        );
        if !self.problems.is_empty() {
            s.push_str("; ");
            s.push_str(&self.problems.join("; "));
        }
        s
    }
}

fn pct(diff: u64, of: u64) -> f64 {
    if of == 0 {
        if diff == 0 { 0.0 } else { f64::INFINITY }
    } else {
        diff as f64 * 100.0 / of as f64
    }
}

/// Compares one VM. `trace` is `None` when trace did not list the VM at all.
pub fn compare_vm(truth: &VmTruth, trace: Option<&VmTrace>, max_error_pct: f64) -> VmComparison {
    let truth_bytes: u64 = truth.guest_ram_bytes_per_node.iter().sum();
    let mut out = VmComparison {
        name: truth.name.clone(),
        truth_bytes,
        trace_bytes: 0,
        total_error_pct: 0.0,
        max_node_error_pct: 0.0,
        memory_ok: false,
        vcpus_checked: 0,
        vcpus_agree: 0,
        vcpus_moved: 0,
        problems: Vec::new(),
    };
    let Some(trace) = trace else {
        out.problems
            .push(format!("trace did not list pid {}", truth.pid));
        out.total_error_pct = f64::INFINITY;
        out.max_node_error_pct = f64::INFINITY;
        out.vcpus_checked = truth
            .vcpus
            .iter()
            .filter(|v| v.node_before.is_some() && v.node_before == v.node_after)
            .count();
        return out;
    };
    out.trace_bytes = trace.memory_bytes_per_node.iter().sum();
    out.total_error_pct = pct(out.trace_bytes.abs_diff(truth_bytes), truth_bytes);
    if out.total_error_pct > max_error_pct {
        out.problems.push(format!(
            "total: trace {} KiB, truth {} KiB ({:.2} %)",
            out.trace_bytes >> 10,
            truth_bytes >> 10,
            out.total_error_pct
        ));
    }
    let n = truth
        .guest_ram_bytes_per_node
        .len()
        .max(trace.memory_bytes_per_node.len());
    for node in 0..n {
        let t = truth
            .guest_ram_bytes_per_node
            .get(node)
            .copied()
            .unwrap_or(0);
        let r = trace.memory_bytes_per_node.get(node).copied().unwrap_or(0);
        let e = pct(r.abs_diff(t), truth_bytes);
        if e > max_error_pct {
            out.problems.push(format!(
                "node {node}: trace {} KiB, truth {} KiB ({e:.2} %)",
                r >> 10,
                t >> 10
            ));
        }
        out.max_node_error_pct = out.max_node_error_pct.max(e);
    }
    out.memory_ok = out.total_error_pct <= max_error_pct && out.max_node_error_pct <= max_error_pct;
    for v in &truth.vcpus {
        if v.node_before.is_none() || v.node_before != v.node_after {
            out.vcpus_moved += 1;
            continue;
        }
        out.vcpus_checked += 1;
        let seen = trace
            .vcpus
            .iter()
            .find(|(tid, _)| *tid == v.tid)
            .map(|&(_, node)| node);
        match seen {
            Some(node) if node == v.node_before => out.vcpus_agree += 1,
            Some(node) => out.problems.push(format!(
                "vCPU tid {}: trace node {node:?}, kernel node {:?}",
                v.tid, v.node_before
            )),
            None => out
                .problems
                .push(format!("vCPU tid {} missing from trace", v.tid)),
        }
    }
    out
}

/// The verdict over all VMs: every VM's memory within tolerance, and at least
/// `min_vcpu_agree_pct` of the judged vCPUs on the same node (and at least one
/// vCPU judged, so a run where everything moved proves nothing and fails).
pub fn all_agree(vms: &[VmComparison], min_vcpu_agree_pct: f64) -> (bool, f64) {
    let checked: usize = vms.iter().map(|v| v.vcpus_checked).sum();
    let agree: usize = vms.iter().map(|v| v.vcpus_agree).sum();
    let agree_pct = if checked == 0 {
        0.0
    } else {
        agree as f64 * 100.0 / checked as f64
    };
    let ok = !vms.is_empty()
        && vms.iter().all(|v| v.memory_ok)
        && checked > 0
        && agree_pct >= min_vcpu_agree_pct;
    (ok, agree_pct)
}

/// Errors reading trace's JSON.
#[derive(Debug, thiserror::Error)]
pub enum TraceJsonError {
    #[error("trace output is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("trace JSON: {0}")]
    Shape(String),
}

fn shape(m: impl Into<String>) -> TraceJsonError {
    TraceJsonError::Shape(m.into())
}

fn as_u32(v: &Value, what: &str) -> Result<u32, TraceJsonError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| shape(format!("{what} is not a u32: {v}")))
}

/// Parses one `vmbalancer trace --json` line (schema 1) into per-VM readings with
/// per-node arrays indexed by node id (trace aligns them with its `nodes` list).
pub fn parse_trace_json(line: &str) -> Result<Vec<VmTrace>, TraceJsonError> {
    let v: Value = serde_json::from_str(line.trim())?;
    if v["schema"].as_u64() != Some(1) {
        return Err(shape(format!("schema {} (expected 1)", v["schema"])));
    }
    let node_ids = v["nodes"]
        .as_array()
        .ok_or_else(|| shape("no `nodes` array"))?
        .iter()
        .map(|n| as_u32(&n["id"], "nodes[].id"))
        .collect::<Result<Vec<_>, _>>()?;
    let width = node_ids.iter().max().map_or(0, |&m| m as usize + 1);
    let mut out = Vec::new();
    for vm in v["vms"].as_array().ok_or_else(|| shape("no `vms` array"))? {
        let pid = as_u32(&vm["pid"], "vms[].pid")?;
        let per_node = vm["memory_bytes_per_node"]
            .as_array()
            .ok_or_else(|| shape(format!("pid {pid}: no memory_bytes_per_node")))?;
        if per_node.len() != node_ids.len() {
            return Err(shape(format!(
                "pid {pid}: memory_bytes_per_node has {} entries for {} nodes",
                per_node.len(),
                node_ids.len()
            )));
        }
        let mut memory_bytes_per_node = vec![0u64; width];
        for (i, b) in per_node.iter().enumerate() {
            memory_bytes_per_node[node_ids[i] as usize] = b
                .as_u64()
                .ok_or_else(|| shape(format!("pid {pid}: bad byte count {b}")))?;
        }
        let mut vcpus = Vec::new();
        for c in vm["vcpus"]
            .as_array()
            .ok_or_else(|| shape(format!("pid {pid}: no vcpus")))?
        {
            let tid = as_u32(&c["tid"], "vcpus[].tid")?;
            let node = if c["node"].is_null() {
                None
            } else {
                Some(as_u32(&c["node"], "vcpus[].node")?)
            };
            vcpus.push((tid, node));
        }
        out.push(VmTrace {
            pid,
            memory_bytes_per_node,
            vcpus,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn truth(per_node_mib: [u64; 4], vcpus: &[(u32, Option<u32>, Option<u32>)]) -> VmTruth {
        VmTruth {
            name: "vm1".into(),
            pid: 100,
            guest_ram_bytes_per_node: per_node_mib.iter().map(|m| m * MIB).collect(),
            vcpus: vcpus
                .iter()
                .map(|&(tid, b, a)| VcpuTruth {
                    tid,
                    node_before: b,
                    node_after: a,
                })
                .collect(),
        }
    }

    fn trace(per_node_bytes: [u64; 4], vcpus: &[(u32, Option<u32>)]) -> VmTrace {
        VmTrace {
            pid: 100,
            memory_bytes_per_node: per_node_bytes.to_vec(),
            vcpus: vcpus.to_vec(),
        }
    }

    #[test]
    fn table() {
        let vc = [(11, Some(0), Some(0)), (12, Some(2), Some(2))];
        // (case, trace bytes per node, trace vCPU nodes, memory_ok, vCPUs agreeing)
        type Case = (&'static str, [u64; 4], [Option<u32>; 2], bool, usize);
        let cases: Vec<Case> = vec![
            ("exact", [32 * MIB; 4], [Some(0), Some(2)], true, 2),
            // 2 % of 128 MiB is 2.56 MiB: 2.5 MiB off on one node still passes.
            (
                "within 2 %",
                [32 * MIB + 5 * MIB / 2, 32 * MIB, 32 * MIB, 32 * MIB],
                [Some(0), Some(2)],
                true,
                2,
            ),
            // 4 MiB moved from node 0 to node 1: total right, nodes 3.1 % off.
            (
                "wrong split",
                [28 * MIB, 36 * MIB, 32 * MIB, 32 * MIB],
                [Some(0), Some(2)],
                false,
                2,
            ),
            // Overhead counted as guest RAM: every node +1 MiB, total +3.1 %.
            ("wrong total", [33 * MIB; 4], [Some(0), Some(2)], false, 2),
            (
                "vCPU on wrong node",
                [32 * MIB; 4],
                [Some(0), Some(1)],
                true,
                1,
            ),
            ("vCPU node unknown", [32 * MIB; 4], [None, Some(2)], true, 1),
        ];
        for (case, mem, nodes, memory_ok, agree) in cases {
            let t = truth([32; 4], &vc);
            let r = trace(mem, &[(11, nodes[0]), (12, nodes[1])]);
            let c = compare_vm(&t, Some(&r), 2.0);
            assert_eq!(c.memory_ok, memory_ok, "{case}: {c:?}");
            assert_eq!(c.vcpus_checked, 2, "{case}");
            assert_eq!(c.vcpus_agree, agree, "{case}: {c:?}");
            assert_eq!(c.problems.is_empty(), memory_ok && agree == 2, "{case}");
        }
    }

    #[test]
    fn moved_vcpus_are_counted_not_judged() {
        let t = truth(
            [32; 4],
            &[
                (11, Some(0), Some(3)),
                (12, Some(2), Some(2)),
                (13, None, None),
            ],
        );
        let r = trace(
            [32 * MIB; 4],
            &[(11, Some(1)), (12, Some(2)), (13, Some(0))],
        );
        let c = compare_vm(&t, Some(&r), 2.0);
        assert_eq!((c.vcpus_checked, c.vcpus_agree, c.vcpus_moved), (1, 1, 2));
        assert!(all_agree(&[c], 98.0).0);
    }

    /// A deliberately wrong expectation must fail: trace claiming the VM's memory
    /// all on node 0 while it is scattered, or a VM trace never listed.
    #[test]
    fn wrong_expectations_fail() {
        let t = truth([32; 4], &[(11, Some(0), Some(0))]);
        let r = trace([128 * MIB, 0, 0, 0], &[(11, Some(0))]);
        let c = compare_vm(&t, Some(&r), 2.0);
        assert!(!c.memory_ok);
        assert!((c.max_node_error_pct - 75.0).abs() < 1e-9, "{c:?}");
        assert!(!all_agree(&[c], 98.0).0);

        let missing = compare_vm(&t, None, 2.0);
        assert!(!missing.memory_ok);
        assert!(!all_agree(&[missing], 98.0).0);

        // 1 of 2 vCPUs wrong is 50 % < 98 %.
        let t2 = truth([32; 4], &[(11, Some(0), Some(0)), (12, Some(1), Some(1))]);
        let r2 = trace([32 * MIB; 4], &[(11, Some(0)), (12, Some(3))]);
        let (ok, pct) = all_agree(&[compare_vm(&t2, Some(&r2), 2.0)], 98.0);
        assert!(!ok);
        assert!((pct - 50.0).abs() < 1e-9);
        // Nothing judged proves nothing.
        assert!(!all_agree(&[], 98.0).0);
    }

    #[test]
    fn parses_trace_json() {
        let line = r#"{"schema":1,"nodes":[{"id":0},{"id":1},{"id":3}],
            "vms":[{"pid":7,"memory_bytes_per_node":[10,20,30],
            "vcpus":[{"tid":8,"node":3},{"tid":9,"node":null}]}]}"#
            .replace('\n', "");
        let vms = parse_trace_json(&line).unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].pid, 7);
        assert_eq!(vms[0].memory_bytes_per_node, vec![10, 20, 0, 30]);
        assert_eq!(vms[0].vcpus, vec![(8, Some(3)), (9, None)]);
        assert!(parse_trace_json(r#"{"schema":2}"#).is_err());
        assert!(parse_trace_json("not json").is_err());
        let short = r#"{"schema":1,"nodes":[{"id":0}],"vms":[{"pid":1,"memory_bytes_per_node":[],"vcpus":[]}]}"#;
        assert!(parse_trace_json(short).is_err());
    }
}
