//! The facts behind the `consistent` assertion, read from the host: every vCPU
//! thread's affinity non-empty and within the online CPUs, every VM cgroup's
//! cpuset.mems non-empty (read while vmbalancer still runs, so its own restore on
//! exit cannot hide a broken state), and, once it stopped, its journal and log.

use std::path::Path;

use balancer::host::linux::actuate::sys::get_affinity;
use balancer::host::linux::{HostPaths, cgroup};
use balancer::model::NodeSet;

use vmbalancer_tests::lab::judge;
use vmbalancer_tests::lab::truth;

use crate::balancer::VMBALANCER_LOG;
use crate::vms::RunningVm;

/// What was found.
pub struct Consistency {
    /// Broken sets, one line each.
    pub problems: Vec<String>,
    /// VMs with an action in flight in the journal, or why it could not be read.
    pub in_flight: Result<Vec<String>, String>,
    /// vmbalancer's whole log (all its starts).
    pub log: String,
}

/// The memory nodes a thread's cpuset cgroup lets it use (`None` when it has no
/// cpuset group with the controller enabled), read with the balancer's readers of
/// `/proc/PID/task/TID/cgroup` and of the cpuset files. A thread that exited has none.
fn cgroup_mems(pid: u32, tid: u32) -> Option<NodeSet> {
    let paths = HostPaths::system();
    let cg = cgroup::read_task_cgroup(&paths, pid, Some(tid)).ok()??;
    Some(cgroup::read_cpuset(&paths, &cg).ok()??.effective_mems)
}

/// Affinity and cgroup problems of the running VMs.
pub fn running_problems(vms: &[RunningVm]) -> Vec<String> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| truth::parse_list(t.trim()).ok())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for vm in vms {
        let Ok(tasks) = balancer::host::linux::procfs::list_tasks(Path::new("/proc"), vm.pid)
        else {
            problems.push(format!("{}: gone", vm.name));
            continue;
        };
        for tid in tasks {
            match get_affinity(tid) {
                Ok(cpus) if cpus.is_empty() => {
                    problems.push(format!("{} thread {tid}: empty affinity", vm.name))
                }
                Ok(cpus) => {
                    let outside: Vec<u32> = cpus.iter().filter(|c| !online.contains(c)).collect();
                    if !outside.is_empty() {
                        problems.push(format!(
                            "{} thread {tid}: affinity has offline CPUs {outside:?}",
                            vm.name
                        ));
                    }
                }
                Err(e) => problems.push(format!("{} thread {tid}: affinity: {e}", vm.name)),
            }
            if let Some(mems) = cgroup_mems(vm.pid, tid)
                && mems.is_empty()
            {
                problems.push(format!(
                    "{} thread {tid}: empty cgroup cpuset mems",
                    vm.name
                ));
            }
        }
    }
    problems
}

/// Adds the journal and log, read after vmbalancer stopped.
pub fn after_stop(problems: Vec<String>, state_dir: &Path) -> Consistency {
    let path = state_dir.join("journal.json");
    let in_flight = std::fs::read(&path)
        .map_err(|e| format!("{}: {e}", path.display()))
        .and_then(|b| {
            serde_json::from_slice::<serde_json::Value>(&b)
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .map(|j| judge::journal_in_flight(&j));
    Consistency {
        problems,
        in_flight,
        log: std::fs::read_to_string(VMBALANCER_LOG).unwrap_or_default(),
    }
}
