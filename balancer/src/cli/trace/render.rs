//! The human-readable table of `vmbalancer trace`: memory per node per VM in MiB (the
//! layout of `numastat -c qemu-kvm`), then CPU use, locality and where each vCPU runs,
//! node totals in a footer, and warnings in plain words.

use std::fmt::Write;

use super::report::TraceReport;
use crate::host::linux::TelemetryStatus;

fn mib(b: u64) -> u64 {
    (b + (1 << 19)) >> 20
}

/// `a/b/c` MiB per node.
fn per_node_mib(bytes: &[u64]) -> String {
    let each: Vec<String> = bytes.iter().map(|&b| mib(b).to_string()).collect();
    each.join("/")
}

fn opt(x: Option<f64>, suffix: &str) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.1}{suffix}"))
}

/// Renders the eBPF feature matrix: one line per feature with the path that runs it,
/// then one indented line per path the kernel refused.
pub fn features(t: &TelemetryStatus) -> String {
    let mut o = String::new();
    if let Some(why) = t.reason.as_deref().filter(|_| !t.available) {
        let _ = writeln!(o, "eBPF telemetry unavailable: {why}");
    }
    let _ = writeln!(o, "{:<22} {:<12} path", "FEATURE", "STATE");
    for f in &t.features {
        let (state, path) = match &f.path {
            Some(p) => ("active", p.as_str()),
            None => ("unavailable", "-"),
        };
        let _ = writeln!(o, "{:<22} {:<12} {}", f.name, state, path);
        for r in &f.refused {
            let _ = writeln!(o, "{:<22}   refused: {}: {}", "", r.path, r.reason);
        }
    }
    o
}

/// Renders one report as text.
pub fn render(r: &TraceReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "vmbalancer trace: {} VM(s), {} node(s), interval {:.1} s (observe only: nothing is changed)",
        r.vms.len(),
        r.nodes.len(),
        r.interval_s
    );
    if r.telemetry.available {
        let off: Vec<String> = r
            .telemetry
            .features
            .iter()
            .filter(|f| !f.available)
            .map(|f| {
                format!(
                    "{} ({})",
                    f.name,
                    f.reason.as_deref().unwrap_or("unavailable")
                )
            })
            .collect();
        if off.is_empty() {
            let _ = writeln!(o, "eBPF telemetry: on");
        } else {
            let _ = writeln!(o, "eBPF telemetry: on, without {}", off.join(", "));
        }
    } else {
        let _ = writeln!(
            o,
            "eBPF telemetry: unavailable ({}); showing what procfs gives",
            r.telemetry.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    let _ = writeln!(o);
    let _ = write!(o, "{:>8} {:<16}", "PID", "VM");
    for n in &r.nodes {
        let _ = write!(o, " {:>8}", format!("Node {}", n.id));
    }
    let _ = writeln!(
        o,
        " {:>8} {:>7} {:>7} {:>7} {:>7}  Pinned",
        "Total", "CPU%", "Local%", "Rem.flt", "XNmig/s"
    );
    let _ = writeln!(o, "{:>8} (MiB)", "");
    for vm in &r.vms {
        let _ = write!(o, "{:>8} {:<16}", vm.pid, truncate(&vm.name, 16));
        for b in &vm.memory_bytes_per_node {
            let _ = write!(o, " {:>8}", mib(*b));
        }
        let _ = writeln!(
            o,
            " {:>8} {:>7.1} {:>7} {:>7} {:>7}  {}",
            mib(vm.memory_bytes),
            vm.cpu_pct,
            opt(vm.locality_pct, ""),
            opt(vm.remote_fault_pct, "%"),
            opt(vm.cross_node_migrations_per_s, ""),
            vm.pinning
        );
        let vcpus: Vec<String> = vm
            .vcpus
            .iter()
            .map(|v| {
                format!(
                    "{}:tid {} cpu {} node {} {:.0}%",
                    v.index,
                    v.tid,
                    v.cpu.map_or("-".into(), |c| c.to_string()),
                    v.node.map_or("-".into(), |n| n.to_string()),
                    v.cpu_pct
                )
            })
            .collect();
        for chunk in vcpus.chunks(3) {
            let _ = writeln!(o, "{:>8}   vCPU {}", "", chunk.join(" | "));
        }
        let _ = writeln!(
            o,
            "{:>8}   {} backing, {} MiB configured, overhead {} MiB (anonymous per node {}), memory read {:.1} s ago",
            "",
            vm.backing,
            mib(vm.configured_bytes),
            mib(vm.overhead_bytes_per_node.iter().sum()),
            per_node_mib(&vm.own_overhead_bytes_per_node),
            vm.memory_age_s
        );
        if let Some(why) = &vm.pinning_reason {
            let _ = writeln!(o, "{:>8}   pinned: {why}", "");
        }
        match (vm.vcpus_found_by.as_str(), &vm.vcpus_found_detail) {
            ("qmp", Some(socket)) => {
                let _ = writeln!(o, "{:>8}   vCPUs from QMP query-cpus-fast ({socket})", "");
            }
            ("unknown", Some(why)) => {
                let _ = writeln!(
                    o,
                    "{:>8}   vCPUs unknown: {why}; balanced as a whole process",
                    ""
                );
            }
            _ => {}
        }
        if let Some(why) = &vm.memory_not_movable {
            let _ = writeln!(o, "{:>8}   memory never migrated: {why}", "");
        }
        if vm.ksm_merging_pages.is_some() || !vm.ksm_partners.is_empty() {
            let merged = vm.ksm_merging_pages.map_or("KSM".to_string(), |p| {
                format!("KSM merged {p} pages ({} MiB)", mib(p * 4096))
            });
            let partners: Vec<String> = vm
                .ksm_partners
                .iter()
                .map(|p| format!("{} (~{} MiB)", p.name, mib(p.pages * 4096)))
                .collect();
            let with = if partners.is_empty() {
                "shared with no other VM seen".to_string()
            } else {
                format!("shared with {}", partners.join(", "))
            };
            let _ = writeln!(o, "{:>8}   {merged}, {with}", "");
        }
        for h in vm.hot_regions.iter().take(3) {
            let _ = writeln!(
                o,
                "{:>8}   hot {} +{} MiB on node {} (heat {:.1})",
                "",
                h.start_addr,
                mib(h.len_bytes),
                h.node,
                h.heat
            );
        }
    }
    let _ = write!(o, "{:>8} {:<16}", "", "VMs total");
    for n in &r.nodes {
        let _ = write!(o, " {:>8}", mib(n.vm_bytes));
    }
    let _ = writeln!(o);
    let _ = write!(o, "{:>8} {:<16}", "", "Node free");
    for n in &r.nodes {
        let _ = write!(o, " {:>8}", mib(n.mem_free_bytes));
    }
    let _ = writeln!(o);
    let _ = write!(o, "{:>8} {:<16}", "", "Node total");
    for n in &r.nodes {
        let _ = write!(o, " {:>8}", mib(n.mem_total_bytes));
    }
    let _ = writeln!(o);
    let mut sizes: Vec<u64> = r
        .nodes
        .iter()
        .flat_map(|n| &n.hugepages)
        .filter(|p| p.total_pages > 0)
        .map(|p| p.page_size_bytes)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for size in sizes {
        let _ = write!(
            o,
            "{:>8} {:<16}",
            "",
            format!("Huge {} free", human_size(size))
        );
        for n in &r.nodes {
            let pool = n.hugepages.iter().find(|p| p.page_size_bytes == size);
            let cell = pool.map_or("-".to_string(), |p| {
                format!("{}/{}", p.free_pages, p.total_pages)
            });
            let _ = write!(o, " {cell:>8}");
        }
        let _ = writeln!(o);
    }
    let _ = write!(o, "{:>8} {:<16}", "", "vCPUs on node");
    for n in &r.nodes {
        let _ = write!(o, " {:>8}", n.vcpus);
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "\nautoNUMA: {}  KSM: {}{}",
        if r.settings.numa_balancing {
            "on"
        } else {
            "off"
        },
        if r.settings.ksm_running {
            "running"
        } else {
            "off"
        },
        if r.settings.ksm_running && r.settings.ksm_merge_across_nodes {
            " (merging across nodes)"
        } else {
            ""
        }
    );
    if !r.warnings.is_empty() {
        let _ = writeln!(o, "\nWarnings:");
        for w in &r.warnings {
            let _ = writeln!(o, "  - {}", w.message);
        }
    }
    o
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{}G", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('~')).collect()
    }
}
