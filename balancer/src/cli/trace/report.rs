//! Turns two consecutive snapshots into the trace report (the `--json` object and the
//! table's content) and the operator warnings. Pure: no I/O, no clock.

use serde::Serialize;

use crate::host::linux::{ObserverCounters, TelemetryStatus};
use crate::model::{HugePagePool, NodeId, Pinning, Snapshot, Topology, Vcpu, Vm};

/// Version of the JSON schema documented in the `trace` module.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub schema: u32,
    pub time_unix_ms: u64,
    pub interval_s: f64,
    pub telemetry: TelemetryStatus,
    pub discovery: DiscoveryInfo,
    pub settings: SettingsReport,
    pub nodes: Vec<NodeReport>,
    pub vms: Vec<VmReport>,
    pub warnings: Vec<Warning>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiscoveryInfo {
    /// `"proc connector"` or `"rescan"`.
    pub new_process_detection: String,
    /// Why not the connector, when not.
    pub rescan_reason: Option<String>,
    pub counters: ObserverCounters,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingsReport {
    pub numa_balancing: bool,
    pub ksm_running: bool,
    pub ksm_merge_across_nodes: bool,
    pub ksm_pages_sharing: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub id: NodeId,
    pub cpus: String,
    pub mem_total_bytes: u64,
    pub mem_free_bytes: u64,
    pub file_bytes: u64,
    pub hugepages: Vec<HugePagePool>,
    /// Guest RAM of the listed VMs on this node.
    pub vm_bytes: u64,
    /// vCPUs of the listed VMs that last ran on this node.
    pub vcpus: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmReport {
    pub pid: u32,
    pub name: String,
    /// `none`, `operator` or `excluded`.
    pub pinning: String,
    pub pinning_reason: Option<String>,
    pub cgroup: Option<String>,
    pub backing: String,
    pub configured_bytes: u64,
    /// Guest RAM per node, aligned with `nodes`.
    pub memory_bytes_per_node: Vec<u64>,
    pub memory_bytes: u64,
    /// Non-guest-RAM resident memory per node, aligned with `nodes`.
    pub overhead_bytes_per_node: Vec<u64>,
    /// Its anonymous part (vCPU stacks, heap: what `MigrateProcessMemory` moves), per
    /// node, aligned with `nodes`.
    pub own_overhead_bytes_per_node: Vec<u64>,
    /// Age of the per-node figures (numa_maps is read at a bounded rate).
    pub memory_age_s: f64,
    /// CPU use of all threads, 100 = one CPU.
    pub cpu_pct: f64,
    /// Share of guest RAM on the nodes where the vCPUs run (weighted by vCPU use).
    pub locality_pct: Option<f64>,
    /// Share of NUMA hinting faults on remote memory (telemetry).
    pub remote_fault_pct: Option<f64>,
    /// Cross-node migrations of vCPU threads per second (telemetry).
    pub cross_node_migrations_per_s: Option<f64>,
    pub migrations_per_s: Option<f64>,
    /// The kernel's own NUMA task moves per second (telemetry).
    pub kernel_numa_moves_per_s: Option<f64>,
    pub vcpus: Vec<VcpuReport>,
    pub other_threads: Vec<u32>,
    pub hot_regions: Vec<HotRegionReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    pub index: u32,
    pub tid: u32,
    pub cpu: Option<u32>,
    pub node: Option<NodeId>,
    pub affinity: String,
    pub cpu_pct: f64,
    /// Share of the interval's run time on each node, aligned with `nodes` (telemetry).
    pub run_pct_per_node: Option<Vec<f64>>,
    pub run_ns_total: Option<u64>,
    pub migrations: Option<u64>,
    pub cross_node_migrations: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HotRegionReport {
    pub start_addr: String,
    pub len_bytes: u64,
    pub node: NodeId,
    pub heat: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Warning {
    /// `memory_remote_from_vcpus`, `autonuma_with_pinning`, `ksm_across_nodes`,
    /// `vm_wider_than_node`.
    pub kind: String,
    pub vm: Option<u32>,
    pub message: String,
}

/// Inputs besides the snapshots.
pub struct ReportContext<'a> {
    pub time_unix_ms: u64,
    pub telemetry: TelemetryStatus,
    pub rescan_reason: Option<&'a str>,
    pub counters: ObserverCounters,
    /// `--vm` filters: names or pids; empty = every VM.
    pub filters: &'a [String],
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole * 1000.0).round() / 10.0
    } else {
        0.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Whether `vm` passes the `--vm` filters.
pub fn selected(vm: &Vm, filters: &[String]) -> bool {
    filters.is_empty()
        || filters
            .iter()
            .any(|f| f == &vm.name || f.parse::<u32>().is_ok_and(|p| p == vm.pid))
}

/// Per-node weight of where a vCPU ran: run time per node over the interval when
/// telemetry has it, else its last CPU's node weighted by its CPU use.
fn vcpu_node_weights(t: &Topology, v: &Vcpu, prev: Option<&Vcpu>) -> Vec<f64> {
    let mut w = vec![0.0; t.nodes.len()];
    let run = &v.telemetry.run_ns_per_node;
    if run.len() == w.len() && run.iter().any(|&r| r > 0) {
        let before = prev
            .map(|p| p.telemetry.run_ns_per_node.as_slice())
            .unwrap_or(&[]);
        for (i, r) in run.iter().enumerate() {
            w[i] = r.saturating_sub(before.get(i).copied().unwrap_or(0)) as f64;
        }
        if w.iter().any(|&x| x > 0.0) {
            return w;
        }
    }
    if let Some(i) = v
        .last_cpu
        .and_then(|c| t.node_of_cpu(c))
        .and_then(|n| t.node_index(n))
    {
        w[i] = v.cpu_demand.max(0.01);
    }
    w
}

fn vm_report(
    t: &Topology,
    vm: &Vm,
    prev: Option<&Vm>,
    now_ns: u64,
    dt_s: f64,
    telemetry: bool,
) -> VmReport {
    let mem_total = vm.memory.resident_bytes();
    let prev_vcpu = |tid: u32| prev.and_then(|p| p.vcpus.iter().find(|v| v.tid == tid));
    let mut run_weights = vec![0.0; t.nodes.len()];
    let mut vcpus = Vec::new();
    let (mut mig, mut cross, mut faults, mut remote) = (0u64, 0u64, 0u64, 0u64);
    for v in &vm.vcpus {
        let p = prev_vcpu(v.tid);
        let w = vcpu_node_weights(t, v, p);
        for (acc, x) in run_weights.iter_mut().zip(&w) {
            *acc += x;
        }
        let tel = &v.telemetry;
        let ptel = p.map(|p| p.telemetry.clone()).unwrap_or_default();
        mig += tel.migrations.saturating_sub(ptel.migrations);
        cross += tel
            .cross_node_migrations
            .saturating_sub(ptel.cross_node_migrations);
        let f: u64 = tel.numa_faults_per_node.iter().sum();
        let pf: u64 = ptel.numa_faults_per_node.iter().sum();
        faults += f.saturating_sub(pf);
        remote += tel
            .numa_faults_remote
            .saturating_sub(ptel.numa_faults_remote);
        let has_run = tel.run_ns_per_node.len() == t.nodes.len();
        vcpus.push(VcpuReport {
            index: v.index,
            tid: v.tid,
            cpu: v.last_cpu,
            node: v.last_cpu.and_then(|c| t.node_of_cpu(c)),
            affinity: v.affinity.to_string(),
            cpu_pct: round1(v.cpu_demand * 100.0),
            run_pct_per_node: (telemetry && has_run).then(|| {
                let total: f64 = w.iter().sum();
                w.iter().map(|&x| pct(x, total)).collect()
            }),
            run_ns_total: (telemetry && has_run).then(|| tel.run_ns_per_node.iter().sum()),
            migrations: telemetry.then_some(tel.migrations),
            cross_node_migrations: telemetry.then_some(tel.cross_node_migrations),
        });
    }
    let weight_total: f64 = run_weights.iter().sum();
    let locality_pct = (weight_total > 0.0)
        .then(|| {
            crate::model::local_share(&vm.memory.bytes_per_node, |i| {
                run_weights.get(i).map_or(0.0, |w| w / weight_total)
            })
        })
        .flatten()
        .map(|s| pct(s, 1.0));
    let rate = |n: u64| (telemetry && dt_s > 0.0).then(|| round1(n as f64 / dt_s));
    let (pinning, pinning_reason) = match &vm.pinning {
        Pinning::None => ("none", None),
        Pinning::Operator { why } => ("operator", Some(why.clone())),
        Pinning::Excluded => ("excluded", None),
    };
    VmReport {
        pid: vm.pid,
        name: vm.name.clone(),
        pinning: pinning.to_string(),
        pinning_reason,
        cgroup: vm.cgroup.clone(),
        backing: match &vm.memory.backing {
            crate::model::MemoryBacking::HugeTlb { page_size_bytes } => {
                format!("hugetlb-{}kB", page_size_bytes / 1024)
            }
            b => format!("{b:?}").to_lowercase(),
        },
        configured_bytes: vm.memory.configured_bytes,
        memory_bytes_per_node: vm.memory.bytes_per_node.clone(),
        memory_bytes: mem_total,
        overhead_bytes_per_node: vm.memory.overhead_bytes_per_node.clone(),
        own_overhead_bytes_per_node: vm.memory.own_overhead_bytes_per_node.clone(),
        memory_age_s: round1(now_ns.saturating_sub(vm.memory.measured_at_ns) as f64 / 1e9),
        cpu_pct: round1(vm.threads_cpu_demand * 100.0),
        locality_pct,
        remote_fault_pct: (telemetry && faults > 0).then(|| pct(remote as f64, faults as f64)),
        cross_node_migrations_per_s: rate(cross),
        migrations_per_s: rate(mig),
        kernel_numa_moves_per_s: rate(
            vm.kernel_numa_moves
                .saturating_sub(prev.map(|p| p.kernel_numa_moves).unwrap_or(0)),
        ),
        vcpus,
        other_threads: vm.other_threads.clone(),
        hot_regions: vm
            .hot_regions
            .iter()
            .take(5)
            .map(|h| HotRegionReport {
                start_addr: format!("{:#x}", h.start_addr),
                len_bytes: h.len_bytes,
                node: h.node,
                heat: round1(h.heat),
            })
            .collect(),
    }
}

/// Builds the report of the interval from `prev` to `cur`.
pub fn build(prev: Option<&Snapshot>, cur: &Snapshot, ctx: ReportContext<'_>) -> TraceReport {
    let t = &cur.topology;
    let dt_s = prev.map_or(0.0, |p| cur.now_ns.saturating_sub(p.now_ns) as f64 / 1e9);
    let telemetry = ctx.telemetry.available;
    let vms: Vec<&Vm> = cur
        .vms
        .iter()
        .filter(|v| selected(v, ctx.filters))
        .collect();
    let reports: Vec<VmReport> = vms
        .iter()
        .map(|vm| {
            let p = prev.and_then(|p| p.vms.iter().find(|x| x.pid == vm.pid));
            vm_report(t, vm, p, cur.now_ns, dt_s, telemetry)
        })
        .collect();
    let nodes = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeReport {
            id: n.id,
            cpus: n.cpus.to_string(),
            mem_total_bytes: n.memory.total_bytes,
            mem_free_bytes: n.memory.free_bytes,
            file_bytes: n.memory.file_bytes,
            hugepages: n.memory.hugepages.clone(),
            vm_bytes: reports
                .iter()
                .map(|r| r.memory_bytes_per_node.get(i).copied().unwrap_or(0))
                .sum(),
            vcpus: reports
                .iter()
                .flat_map(|r| &r.vcpus)
                .filter(|v| v.node == Some(n.id))
                .count() as u32,
        })
        .collect();
    let warnings = warnings(cur, &vms);
    TraceReport {
        schema: SCHEMA_VERSION,
        time_unix_ms: ctx.time_unix_ms,
        interval_s: (dt_s * 100.0).round() / 100.0,
        telemetry: ctx.telemetry,
        discovery: DiscoveryInfo {
            new_process_detection: if ctx.rescan_reason.is_none() {
                "proc connector".into()
            } else {
                "rescan".into()
            },
            rescan_reason: ctx.rescan_reason.map(str::to_string),
            counters: ctx.counters,
        },
        settings: SettingsReport {
            numa_balancing: cur.settings.numa_balancing,
            ksm_running: cur.settings.ksm.running,
            ksm_merge_across_nodes: cur.settings.ksm.merge_across_nodes,
            ksm_pages_sharing: cur.settings.ksm.pages_sharing,
        },
        nodes,
        vms: reports,
        warnings,
    }
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The plain-word warnings for an operator.
pub fn warnings(s: &Snapshot, vms: &[&Vm]) -> Vec<Warning> {
    let t = &s.topology;
    let multi = t.nodes.len() > 1;
    let mut out = Vec::new();
    for vm in vms {
        let total = vm.memory.resident_bytes();
        // Where the vCPUs run, by count of vCPUs per node of their last CPU.
        let mut vcpu_nodes = vec![0u32; t.nodes.len()];
        for v in &vm.vcpus {
            if let Some(i) = v
                .last_cpu
                .and_then(|c| t.node_of_cpu(c))
                .and_then(|n| t.node_index(n))
            {
                vcpu_nodes[i] += 1;
            }
        }
        let placed: u32 = vcpu_nodes.iter().sum();
        if multi && total > 0 && placed > 0 {
            let (cpu_i, &cpu_n) = vcpu_nodes
                .iter()
                .enumerate()
                .max_by_key(|(i, n)| (**n, usize::MAX - i))
                .unwrap_or((0, &0));
            let (mem_i, &mem_b) = vm
                .memory
                .bytes_per_node
                .iter()
                .enumerate()
                .max_by_key(|(i, b)| (**b, usize::MAX - i))
                .unwrap_or((0, &0));
            let local_pct = crate::model::local_share_on(&vm.memory.bytes_per_node, |i| i == cpu_i)
                .map_or(0.0, |s| s * 100.0);
            if cpu_i != mem_i && cpu_n * 2 > placed && mem_b * 2 > total {
                out.push(Warning {
                    kind: "memory_remote_from_vcpus".into(),
                    vm: Some(vm.pid),
                    message: format!(
                        "VM {} runs {cpu_n} of its {placed} vCPUs on node {} but {:.0}% of its memory ({}) is on node {}; only {:.0}% is local. Its memory should follow its vCPUs (or the vCPUs the memory).",
                        vm.name,
                        t.nodes[cpu_i].id,
                        mem_b as f64 / total as f64 * 100.0,
                        gib(mem_b),
                        t.nodes[mem_i].id,
                        local_pct,
                    ),
                });
            }
        }
        if multi {
            let max_cpus = t.nodes.iter().map(|n| n.cpus.len()).max().unwrap_or(0);
            let max_mem = t
                .nodes
                .iter()
                .map(|n| n.memory.total_bytes)
                .max()
                .unwrap_or(0);
            let too_many_cpus = vm.vcpus.len() > max_cpus;
            let too_much_mem = vm.memory.configured_bytes > max_mem;
            if too_many_cpus || too_much_mem {
                let why = match (too_many_cpus, too_much_mem) {
                    (true, true) => format!(
                        "{} vCPUs and {} of RAM, the largest node has {max_cpus} CPUs and {}",
                        vm.vcpus.len(),
                        gib(vm.memory.configured_bytes),
                        gib(max_mem)
                    ),
                    (true, false) => format!(
                        "{} vCPUs, the largest node has {max_cpus} CPUs",
                        vm.vcpus.len()
                    ),
                    _ => format!(
                        "{} of RAM, the largest node has {}",
                        gib(vm.memory.configured_bytes),
                        gib(max_mem)
                    ),
                };
                out.push(Warning {
                    kind: "vm_wider_than_node".into(),
                    vm: Some(vm.pid),
                    message: format!(
                        "VM {} is wider than any node ({why}): part of it is always remote; give it guest NUMA cells that match the host nodes.",
                        vm.name
                    ),
                });
            }
        }
    }
    let pinned: Vec<&str> = vms
        .iter()
        .filter(|v| matches!(v.pinning, Pinning::Operator { .. }))
        .map(|v| v.name.as_str())
        .collect();
    if s.settings.numa_balancing && !pinned.is_empty() {
        out.push(Warning {
            kind: "autonuma_with_pinning".into(),
            vm: None,
            message: format!(
                "Automatic NUMA balancing (kernel.numa_balancing) is on while {} VM(s) are pinned by the operator ({}): the kernel keeps scanning and faulting their memory and may fight the pinning. Consider `sysctl kernel.numa_balancing=0`.",
                pinned.len(),
                pinned.join(", ")
            ),
        });
    }
    if multi && s.settings.ksm.running && s.settings.ksm.merge_across_nodes {
        out.push(Warning {
            kind: "ksm_across_nodes".into(),
            vm: None,
            message: format!(
                "KSM is merging pages across nodes (merge_across_nodes=1, {} pages sharing): a merged page is remote for every VM but one. Set /sys/kernel/mm/ksm/merge_across_nodes to 0 (needs run=2 first).",
                s.settings.ksm.pages_sharing
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CpuSet, HotRegion, VcpuTelemetry, VmMemory};

    fn snapshot(now_ns: u64, run: [u64; 2], cross: u64, faults: [u64; 2], remote: u64) -> Snapshot {
        let vcpu = Vcpu {
            index: 0,
            tid: 11,
            affinity: CpuSet::parse_list("0-3").unwrap(),
            last_cpu: Some(2),
            cpu_demand: 0.5,
            telemetry: VcpuTelemetry {
                run_ns_per_node: run.to_vec(),
                migrations: cross * 2,
                cross_node_migrations: cross,
                numa_faults_per_node: faults.to_vec(),
                numa_faults_remote: remote,
            },
        };
        Snapshot {
            now_ns,
            topology: Topology::uniform(2, 2, 8 << 30),
            vms: vec![Vm {
                pid: 10,
                name: "a".into(),
                vcpus: vec![vcpu],
                memory: VmMemory {
                    bytes_per_node: vec![1 << 30, 3 << 30],
                    configured_bytes: 4 << 30,
                    ..Default::default()
                },
                hot_regions: vec![HotRegion {
                    start_addr: 0x7f00_0000_0000,
                    len_bytes: 2 << 20,
                    node: 1,
                    heat: 12.34,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn ctx(available: bool) -> ReportContext<'static> {
        ReportContext {
            time_unix_ms: 0,
            telemetry: TelemetryStatus {
                available,
                reason: (!available).then(|| "test".to_string()),
                features: Vec::new(),
            },
            rescan_reason: None,
            counters: ObserverCounters::default(),
            filters: &[],
        }
    }

    #[test]
    fn telemetry_rates_and_run_time_locality() {
        let prev = snapshot(0, [0, 0], 0, [0, 0], 0);
        // Over 2 s: ran 3/4 of the time on node 0, 4 cross-node migrations,
        // 10 hinting faults of which 6 remote.
        let cur = snapshot(2_000_000_000, [3_000, 1_000], 4, [4, 6], 6);
        let r = build(Some(&prev), &cur, ctx(true));
        let vm = &r.vms[0];
        assert_eq!(vm.cross_node_migrations_per_s, Some(2.0));
        assert_eq!(vm.migrations_per_s, Some(4.0));
        assert_eq!(vm.remote_fault_pct, Some(60.0));
        assert_eq!(vm.vcpus[0].run_pct_per_node, Some(vec![75.0, 25.0]));
        // 75 % of run time on node 0 (1/4 of memory) + 25 % on node 1 (3/4).
        assert_eq!(vm.locality_pct, Some(37.5));
        assert_eq!(vm.hot_regions[0].start_addr, "0x7f0000000000");
        assert_eq!(r.interval_s, 2.0);

        // Without telemetry: no invented numbers; locality from the last CPU (node 1).
        let r = build(Some(&prev), &cur, ctx(false));
        let vm = &r.vms[0];
        assert_eq!(vm.cross_node_migrations_per_s, None);
        assert_eq!(vm.remote_fault_pct, None);
        assert_eq!(vm.vcpus[0].run_pct_per_node, None);
        assert_eq!(vm.vcpus[0].node, Some(1));
    }

    #[test]
    fn seed_002_warning_and_filters() {
        let mut s = snapshot(0, [0, 0], 0, [0, 0], 0);
        s.vms[0].vcpus[0].last_cpu = Some(0);
        let vms: Vec<&Vm> = s.vms.iter().collect();
        let w = warnings(&s, &vms);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].kind, "memory_remote_from_vcpus");
        assert!(
            w[0].message.contains("75% of its memory"),
            "{}",
            w[0].message
        );
        // Memory local: no warning.
        s.vms[0].memory.bytes_per_node = vec![3 << 30, 1 << 30];
        let vms: Vec<&Vm> = s.vms.iter().collect();
        assert!(warnings(&s, &vms).is_empty());
        assert!(selected(&s.vms[0], &["10".into()]));
        assert!(selected(&s.vms[0], &["a".into()]));
        assert!(!selected(&s.vms[0], &["b".into(), "11".into()]));
    }
}
