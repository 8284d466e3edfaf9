//! The facts behind the `consistent` assertion, read from the host: every vCPU
//! thread's affinity non-empty and within the online CPUs, every VM cgroup's
//! cpuset.mems non-empty (read while vmbalancer still runs, so its own restore on
//! exit cannot hide a broken state), and, once it stopped, its journal and log.

use std::path::Path;

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

fn affinity(tid: u32) -> std::io::Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::sched_getaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &mut set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect())
}

/// The cpuset memory nodes file of a thread's cgroup, from /proc/PID/task/TID/cgroup:
/// `cpuset.mems.effective` on cgroup v2, `cpuset.mems` on a v1 cpuset hierarchy.
fn mems_file(pid: u32, tid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrl.split(',').any(|c| c == "cpuset") {
            return Some(format!("/sys/fs/cgroup/cpuset{path}/cpuset.mems"));
        }
        if ctrl.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Some(format!("/sys/fs/cgroup{path}/cpuset.mems.effective"));
        }
    }
    None
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
            match affinity(tid) {
                Ok(cpus) if cpus.is_empty() => {
                    problems.push(format!("{} thread {tid}: empty affinity", vm.name))
                }
                Ok(cpus) => {
                    let outside: Vec<u32> =
                        cpus.into_iter().filter(|c| !online.contains(c)).collect();
                    if !outside.is_empty() {
                        problems.push(format!(
                            "{} thread {tid}: affinity has offline CPUs {outside:?}",
                            vm.name
                        ));
                    }
                }
                Err(e) => problems.push(format!("{} thread {tid}: affinity: {e}", vm.name)),
            }
            if let Some(f) = mems_file(vm.pid, tid)
                && let Ok(mems) = std::fs::read_to_string(&f)
                && mems.trim().is_empty()
            {
                problems.push(format!("{} thread {tid}: empty {f}", vm.name));
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
