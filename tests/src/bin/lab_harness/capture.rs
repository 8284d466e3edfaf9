//! Emits, as capture records, the files vmbalancer's parsers read, so real
//! multi-node trees can be committed under tests/fixtures/ for parser tests.

use std::path::Path;

use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::truth::NodeInfo;

use crate::emit;
use crate::vms::RunningVm;

fn grab(path: &str) {
    if let Ok(bytes) = std::fs::read(path) {
        emit(&Record::Capture {
            path: path.trim_start_matches('/').to_string(),
            data: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
}

fn grab_dir_files(dir: &str, names: &[&str]) {
    for n in names {
        grab(&format!("{dir}/{n}"));
    }
}

/// Captures the topology, the vmstat counters and the /proc and cgroup files of
/// the first `max_vms` VMs.
pub fn emit_tree(nodes: &[NodeInfo], vms: &[RunningVm], max_vms: usize) {
    let sys = "/sys/devices/system/node";
    grab_dir_files(
        sys,
        &[
            "online",
            "possible",
            "has_cpu",
            "has_memory",
            "has_normal_memory",
        ],
    );
    grab("/sys/devices/system/cpu/online");
    grab("/sys/devices/system/cpu/possible");
    for n in nodes {
        grab_dir_files(
            &format!("{sys}/node{}", n.id),
            &["cpulist", "cpumap", "distance", "meminfo", "numastat"],
        );
        grab(&format!(
            "{sys}/node{}/hugepages/hugepages-2048kB/nr_hugepages",
            n.id
        ));
        grab(&format!(
            "{sys}/node{}/hugepages/hugepages-2048kB/free_hugepages",
            n.id
        ));
    }
    grab("/proc/vmstat");
    grab("/proc/meminfo");
    grab("/proc/sys/kernel/numa_balancing");
    for vm in vms.iter().take(max_vms) {
        let dir = format!("/proc/{}", vm.pid);
        grab_dir_files(
            &dir,
            &["numa_maps", "status", "stat", "cmdline", "comm", "cgroup"],
        );
        if let Ok(entries) = std::fs::read_dir(format!("{dir}/task")) {
            for e in entries.flatten() {
                let t = e.path();
                grab_dir_files(&t.display().to_string(), &["comm", "stat"]);
            }
        }
        for line in std::fs::read_to_string(format!("{dir}/cgroup"))
            .unwrap_or_default()
            .lines()
        {
            // v2: `0::/path`; v1: `N:cpuset:/path`.
            let mut parts = line.splitn(3, ':');
            let (_, ctrl, rel) = (parts.next(), parts.next(), parts.next());
            let base = match ctrl {
                Some("") => "/sys/fs/cgroup".to_string(),
                Some(c) if c.split(',').any(|c| c == "cpuset") => "/sys/fs/cgroup/cpuset".into(),
                _ => continue,
            };
            let cg = format!("{base}{}", rel.unwrap_or("/"));
            if Path::new(&cg).is_dir() {
                grab_dir_files(
                    &cg,
                    &[
                        "cgroup.procs",
                        "tasks",
                        "cpuset.cpus",
                        "cpuset.mems",
                        "cpuset.cpus.effective",
                        "cpuset.mems.effective",
                        "cpuset.effective_cpus",
                        "cpuset.effective_mems",
                        "cpu.stat",
                    ],
                );
            }
        }
    }
}
