//! Turns two consecutive snapshots into the trace report (the `--json` object and the
//! table's content) and the operator warnings. Pure: no I/O, no clock.

use serde::Serialize;

use crate::host::linux::{ObserverCounters, TelemetryStatus};
use crate::model::{
    HugePagePool, MemoryBacking, NodeId, Pinning, Snapshot, Topology, Vcpu, VcpuDiscovery, Vm,
    size_words,
};

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
    /// How the vCPU threads were found: `thread names`, `qmp` or `unknown`.
    pub vcpus_found_by: String,
    /// The QMP socket, or why the vCPUs are unknown.
    pub vcpus_found_detail: Option<String>,
    /// Why the guest's memory is never migrated, when it is not.
    pub memory_not_movable: Option<String>,
    pub other_threads: Vec<u32>,
    pub hot_regions: Vec<HotRegionReport>,
    /// Pages of this VM KSM merged (the kernel's per-process count), when known.
    pub ksm_merging_pages: Option<u64>,
    /// VMs this one shares KSM pages with, most pages first (sampled estimate).
    pub ksm_partners: Vec<KsmPartnerReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KsmPartnerReport {
    pub pid: u32,
    pub name: String,
    /// Estimated pages both map (4 KiB each).
    pub pages: u64,
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
    /// `vm_wider_than_node`, `vcpus_unknown`, `memory_not_movable`.
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
    all: &[Vm],
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
            MemoryBacking::HugeTlb { page_size_bytes } => {
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
        vcpus_found_by: match &vm.vcpu_discovery {
            VcpuDiscovery::ThreadNames => "thread names",
            VcpuDiscovery::Qmp { .. } => "qmp",
            VcpuDiscovery::Unknown { .. } => "unknown",
        }
        .to_string(),
        vcpus_found_detail: match &vm.vcpu_discovery {
            VcpuDiscovery::ThreadNames => None,
            VcpuDiscovery::Qmp { socket } => Some(socket.clone()),
            VcpuDiscovery::Unknown { why } => Some(why.clone()),
        },
        memory_not_movable: vm.memory.not_movable.as_ref().map(|n| n.to_string()),
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
        ksm_merging_pages: vm.ksm_merging_pages,
        ksm_partners: ksm_partners(all, vm),
    }
}

/// `vm`'s KSM partners with their names, most shared pages first.
fn ksm_partners(all: &[Vm], vm: &Vm) -> Vec<KsmPartnerReport> {
    let mut out: Vec<KsmPartnerReport> = vm
        .ksm_shared_pages
        .iter()
        .map(|&(pid, pages)| KsmPartnerReport {
            pid,
            name: all
                .iter()
                .find(|v| v.pid == pid)
                .map_or_else(|| pid.to_string(), |v| v.name.clone()),
            pages,
        })
        .collect();
    out.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.pid.cmp(&b.pid)));
    out
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
            vm_report(t, &cur.vms, vm, p, cur.now_ns, dt_s, telemetry)
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

/// The seed 002 case in words: a guest on hugetlbfs whose huge pages were taken on
/// node index `mem_i` while its vCPUs run on node index `cpu_i`. Says the page size,
/// how many of its pages each of the two nodes holds, and whether the vCPUs' node
/// has enough free huge pages of that size for the memory to follow (a hugetlb page
/// can only move into a free huge page of its own size on the target node).
fn hugetlb_words(t: &Topology, vm: &Vm, cpu_i: usize, mem_i: usize, page_bytes: u64) -> String {
    let size = size_words(page_bytes);
    let page = page_bytes.max(1);
    let on = |i: usize| vm.memory.bytes_per_node.get(i).copied().unwrap_or(0) / page;
    let (cpu_id, mem_id) = (t.nodes[cpu_i].id, t.nodes[mem_i].id);
    let need = vm
        .memory
        .resident_bytes()
        .div_ceil(page)
        .saturating_sub(on(cpu_i));
    let free = t.nodes[cpu_i]
        .memory
        .hugepages
        .iter()
        .find(|p| p.page_size_bytes == page_bytes)
        .map(|p| p.free_pages);
    let head = format!(
        "Its guest RAM is on hugetlbfs in {size} huge pages: {} of them on node {mem_id}, {} on node {cpu_id} where its vCPUs run.",
        on(mem_i),
        on(cpu_i)
    );
    match free {
        Some(f) if f >= need => format!(
            "{head} Node {cpu_id} has {f} free {size} huge pages, enough for the {need} that would move: the memory can follow the vCPUs."
        ),
        Some(f) => format!(
            "{head} Node {cpu_id} has only {f} free {size} huge pages where {need} are needed: the memory cannot follow until more are reserved there (nr_hugepages of node {cpu_id}); the vCPUs can go to node {mem_id} instead."
        ),
        None => format!(
            "{head} Node {cpu_id} has no {size} huge page pool: the memory cannot follow; the vCPUs can go to node {mem_id} instead."
        ),
    }
}

/// The plain-word warnings for an operator.
pub fn warnings(s: &Snapshot, vms: &[&Vm]) -> Vec<Warning> {
    let t = &s.topology;
    let multi = t.nodes.len() > 1;
    let mut out = Vec::new();
    for vm in vms {
        if let VcpuDiscovery::Unknown { why } = &vm.vcpu_discovery {
            out.push(Warning {
                kind: "vcpus_unknown".into(),
                vm: Some(vm.pid),
                message: format!(
                    "VM {}: its vCPU threads are unknown ({why}); it is balanced as a whole process. Start qemu with -name NAME,debug-threads=on, or give it a QMP socket (-qmp unix:PATH,server=on,wait=off).",
                    vm.name
                ),
            });
        }
        if let Some(fixed) = &vm.memory.not_movable {
            out.push(Warning {
                kind: "memory_not_movable".into(),
                vm: Some(vm.pid),
                message: format!(
                    "VM {}: its memory is never migrated ({fixed}); vmbalancer only places its vCPUs on the nodes holding its memory.",
                    vm.name
                ),
            });
        }
        let total = vm.memory.resident_bytes();
        // Where the vCPUs run: the node of each vCPU's last CPU, weighted by its CPU
        // use, so a guest's idle vCPUs (halted, last seen anywhere) do not outvote
        // the busy ones.
        let mut vcpu_nodes = vec![0u32; t.nodes.len()];
        let mut vcpu_use = vec![0.0f64; t.nodes.len()];
        for v in &vm.vcpus {
            if let Some(i) = v
                .last_cpu
                .and_then(|c| t.node_of_cpu(c))
                .and_then(|n| t.node_index(n))
            {
                vcpu_nodes[i] += 1;
                vcpu_use[i] += v.cpu_demand.max(0.01);
            }
        }
        let placed: u32 = vcpu_nodes.iter().sum();
        let use_total: f64 = vcpu_use.iter().sum();
        if multi && total > 0 && placed > 0 {
            let cpu_i = (0..vcpu_use.len())
                .rev()
                .max_by(|&a, &b| vcpu_use[a].total_cmp(&vcpu_use[b]))
                .unwrap_or(0);
            let cpu_n = vcpu_nodes[cpu_i];
            let (mem_i, &mem_b) = vm
                .memory
                .bytes_per_node
                .iter()
                .enumerate()
                .max_by_key(|(i, b)| (**b, usize::MAX - i))
                .unwrap_or((0, &0));
            let local_pct = crate::model::local_share_on(&vm.memory.bytes_per_node, |i| i == cpu_i)
                .map_or(0.0, |s| s * 100.0);
            if cpu_i != mem_i && vcpu_use[cpu_i] * 2.0 > use_total && mem_b * 2 > total {
                let advice = match vm.memory.backing {
                    MemoryBacking::HugeTlb { page_size_bytes } => {
                        hugetlb_words(t, vm, cpu_i, mem_i, page_size_bytes)
                    }
                    _ => "Its memory should follow its vCPUs (or the vCPUs the memory).".into(),
                };
                out.push(Warning {
                    kind: "memory_remote_from_vcpus".into(),
                    vm: Some(vm.pid),
                    message: format!(
                        "VM {} runs {cpu_n} of its {placed} vCPUs on node {} ({:.0}% of their CPU use) but {:.0}% of its memory ({}) is on node {}; only {:.0}% is local. {advice}",
                        vm.name,
                        t.nodes[cpu_i].id,
                        vcpu_use[cpu_i] / use_total * 100.0,
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
                "KSM is merging pages across nodes (merge_across_nodes=1, {} pages sharing): a merged page is remote for every VM but one.{} vmbalancer does not group VMs by shared pages in this mode. Set /sys/kernel/mm/ksm/merge_across_nodes to 0 (needs run=2 first).",
                s.settings.ksm.pages_sharing,
                ksm_pairs_words(vms)
            ),
        });
    }
    out
}

/// " VMs a and b share about N MiB; ..." for the VMs listed, each pair once.
fn ksm_pairs_words(vms: &[&Vm]) -> String {
    let mut pairs = Vec::new();
    for vm in vms {
        for &(other, pages) in &vm.ksm_shared_pages {
            let Some(o) = vms.iter().find(|v| v.pid == other) else {
                continue;
            };
            if vm.pid < other {
                pairs.push(format!(
                    "{} and {} share about {} MiB",
                    vm.name,
                    o.name,
                    (pages * 4096) >> 20
                ));
            }
        }
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!(" VMs sharing merged pages: {}.", pairs.join("; "))
    }
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

    #[test]
    fn ksm_partners_and_the_across_nodes_warning_name_the_sharers() {
        let mut s = snapshot(0, [0, 0], 0, [0, 0], 0);
        s.vms[0].vcpus[0].last_cpu = Some(0);
        s.vms[0].memory.bytes_per_node = vec![3 << 30, 1 << 30];
        let mut b = s.vms[0].clone();
        (b.pid, b.name) = (20, "b".into());
        s.vms[0].ksm_shared_pages = vec![(20, 49_152)];
        s.vms[0].ksm_merging_pages = Some(49_152);
        b.ksm_shared_pages = vec![(10, 49_152)];
        s.vms.push(b);
        s.settings.ksm.running = true;
        s.settings.ksm.merge_across_nodes = true;
        s.settings.ksm.pages_sharing = 49_152;
        let r = build(None, &s, ctx(false));
        let p = &r.vms[0].ksm_partners;
        assert_eq!((p.len(), p[0].name.as_str(), p[0].pages), (1, "b", 49_152));
        assert_eq!(r.vms[0].ksm_merging_pages, Some(49_152));
        let w: Vec<&Warning> = r
            .warnings
            .iter()
            .filter(|w| w.kind == "ksm_across_nodes")
            .collect();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].message.contains("a and b share about 192 MiB"),
            "{}",
            w[0].message
        );
        let text = super::super::render::render(&r);
        assert!(
            text.contains("KSM merged 49152 pages (192 MiB), shared with b (~192 MiB)"),
            "{text}"
        );
        // Merging per node: no warning, the partners still shown.
        s.settings.ksm.merge_across_nodes = false;
        let r = build(None, &s, ctx(false));
        assert!(r.warnings.iter().all(|w| w.kind != "ksm_across_nodes"));
        assert_eq!(r.vms[1].ksm_partners[0].name, "a");
    }

    #[test]
    fn seed_002_hugetlb_in_words() {
        // Busy vCPU 0 on node 0, idle vCPU 1 last seen on node 1 (it must not
        // outvote the busy one); all 128 huge pages of 2 MiB on node 1.
        let mut s = snapshot(0, [0, 0], 0, [0, 0], 0);
        let vm = &mut s.vms[0];
        vm.vcpus[0].last_cpu = Some(0);
        let mut idle = vm.vcpus[0].clone();
        (idle.index, idle.tid, idle.last_cpu, idle.cpu_demand) = (1, 12, Some(2), 0.0);
        vm.vcpus.push(idle);
        vm.memory.bytes_per_node = vec![0, 256 << 20];
        vm.memory.backing = MemoryBacking::HugeTlb {
            page_size_bytes: 2 << 20,
        };
        let pool = |free_pages| HugePagePool {
            page_size_bytes: 2 << 20,
            total_pages: 200,
            free_pages,
        };
        let message = |s: &Snapshot| {
            let vms: Vec<&Vm> = s.vms.iter().collect();
            let w = warnings(s, &vms);
            assert_eq!(w.len(), 1, "{w:?}");
            w[0].message.clone()
        };
        let m = message(&s);
        assert!(
            m.contains("runs 1 of its 2 vCPUs on node 0 (98% of their CPU use)"),
            "{m}"
        );
        assert!(
            m.contains("2 MiB huge pages: 128 of them on node 1, 0 on node 0"),
            "{m}"
        );
        assert!(m.contains("Node 0 has no 2 MiB huge page pool"), "{m}");
        s.topology.nodes[0].memory.hugepages = vec![pool(10)];
        let m = message(&s);
        assert!(
            m.contains("Node 0 has only 10 free 2 MiB huge pages where 128 are needed"),
            "{m}"
        );
        assert!(m.contains("the vCPUs can go to node 1 instead"), "{m}");
        s.topology.nodes[0].memory.hugepages = vec![pool(128)];
        let m = message(&s);
        assert!(
            m.contains("Node 0 has 128 free 2 MiB huge pages, enough for the 128"),
            "{m}"
        );
    }
}
