//! Emits, as capture records, the files vmbalancer's parsers read, so real
//! multi-node trees can be committed under tests/fixtures/ for parser tests.

use balancer::host::linux::cgroup;
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
        // The cpuset group the balancer reads for this VM, found by its own reader
        // of /proc/PID/cgroup.
        let paths = balancer::host::linux::HostPaths::system();
        if let Ok(Some(group)) = cgroup::read_task_cgroup(&paths, vm.pid, None) {
            let cg = cgroup::cgroup_dir(&paths, &group);
            if cg.is_dir() {
                grab_dir_files(
                    &cg.display().to_string(),
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
