//! Moving a VM's threads to a CPU set, and reading the result back.
//!
//! libvirt VMs: the target set is written to the `vcpuN` groups (and `emulator` when
//! the whole VM moves), after widening the parent groups if they do not allow it yet
//! (cgroup v1 requires a child's set to be inside its parent's). Plain processes:
//! sched_setaffinity on each thread listed in `/proc/PID/task` now, so threads that
//! appeared since the snapshot follow too. A failure other than a vanished thread or
//! group rolls back what was already changed, so the VM never ends half-moved.

use std::io;
use std::path::PathBuf;

use super::cgroup::{self, SetKind};
use super::{LinuxApplier, Refusal, Shortfall, list_threads, online_cpus, sys};
use crate::model::{ActionOutcome, CpuSet, Snapshot, Vm};

/// Applies `SetCpus`.
pub fn set_cpus(
    a: &mut LinuxApplier,
    snapshot: &Snapshot,
    vm: &Vm,
    vcpus: Option<&[u32]>,
    cpus: &CpuSet,
) -> ActionOutcome {
    if cpus.is_empty() {
        return a.refuse(vm.pid, Refusal::EmptyCpuSet);
    }
    match online_cpus(&a.cfg.sys_root) {
        Ok(online) if !cpus.is_subset(&online) => {
            return a.refuse(
                vm.pid,
                Refusal::CpusOffline {
                    cpus: cpus.difference(&online),
                    online,
                },
            );
        }
        Ok(_) => {}
        Err(e) => return a.refuse(vm.pid, Refusal::OnlineUnreadable(e)),
    }
    let known = snapshot.topology.all_cpus();
    if !known.is_empty() && !cpus.is_subset(&known) {
        return a.refuse(
            vm.pid,
            Refusal::CpusNotInTopology {
                cpus: cpus.difference(&known),
            },
        );
    }
    if let Some(why) = reserved_refusal(cpus, &a.cfg.reserved_cpus) {
        return a.refuse(vm.pid, why);
    }
    if let Some(list) = vcpus
        && let Some(missing) = list
            .iter()
            .find(|i| !vm.vcpus.iter().any(|v| v.index == **i))
    {
        return a.refuse(vm.pid, Refusal::UnknownVcpu { index: *missing });
    }
    if let Some((_, groups)) = a.vm_groups(vm) {
        set_cpus_cgroup(a, vm, vcpus, cpus, groups)
    } else {
        set_cpus_threads(a, vm, vcpus, cpus)
    }
}

/// Why `cpus` may not be given to a VM when `reserved` are kept from VMs; `None`
/// when it may. The engine already leaves reserved CPUs out of its plans; this is
/// the guard for any other planner (and for a configuration changed under it).
pub fn reserved_refusal(cpus: &CpuSet, reserved: &CpuSet) -> Option<Refusal> {
    cpus.intersects(reserved).then(|| Refusal::CpusReserved {
        cpus: cpus.intersection(reserved),
    })
}

fn set_cpus_cgroup(
    a: &mut LinuxApplier,
    vm: &Vm,
    vcpus: Option<&[u32]>,
    cpus: &CpuSet,
    groups: cgroup::LibvirtGroups,
) -> ActionOutcome {
    let mut targets: Vec<PathBuf> = Vec::new();
    match vcpus {
        Some(list) => {
            for i in list {
                match groups.vcpu(*i) {
                    Some(p) => targets.push(p.to_path_buf()),
                    None => return a.refuse(vm.pid, Refusal::VcpuWithoutCgroup { index: *i }),
                }
            }
        }
        None => {
            targets.extend(groups.vcpus.iter().map(|(_, p)| p.clone()));
            targets.extend(groups.emulator.clone());
        }
    }
    // (group, set before) of every write, for rollback.
    let mut written: Vec<(PathBuf, CpuSet)> = Vec::new();
    let mut failure: Option<Refusal> = None;
    let cgroup_failure = |doing, dir: &PathBuf, source| Refusal::Cgroup {
        doing,
        dir: dir.clone(),
        source,
    };
    for parent in &groups.parents {
        match cgroup::read_effective(parent, SetKind::Cpus) {
            Ok(eff) if cpus.is_subset(&eff) => {}
            Ok(_) => {
                let (Ok(cur), Ok(base)) = (
                    cgroup::read_set(parent, SetKind::Cpus),
                    cgroup::widen_base(parent, SetKind::Cpus),
                ) else {
                    failure = Some(cgroup_failure("reading", parent, None));
                    break;
                };
                match cgroup::write_set(parent, SetKind::Cpus, &base.union(cpus)) {
                    Ok(()) => written.push((parent.clone(), cur)),
                    Err(e) => {
                        failure = Some(cgroup_failure("widening", parent, Some(e)));
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The VM's group went away: the VM is exiting.
                a.counters.cgroups_gone += 1;
                return a.gone(vm.pid);
            }
            Err(e) => {
                failure = Some(cgroup_failure("reading", parent, Some(e)));
                break;
            }
        }
    }
    if failure.is_none() {
        for t in &targets {
            let before = match cgroup::read_set(t, SetKind::Cpus) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    a.counters.cgroups_gone += 1;
                    tracing::debug!(group = %t.display(), "cgroup removed under us");
                    continue;
                }
                Err(e) => {
                    failure = Some(cgroup_failure("reading", t, Some(e)));
                    break;
                }
            };
            match cgroup::write_set(t, SetKind::Cpus, cpus) {
                Ok(()) => written.push((t.clone(), before)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    a.counters.cgroups_gone += 1;
                }
                Err(e) => {
                    failure = Some(cgroup_failure("writing", t, Some(e)));
                    break;
                }
            }
        }
    }
    if let Some(why) = failure {
        // Children were written after parents: undo in reverse order.
        if let Some(fs) = a.cpuset.clone() {
            for (dir, before) in written.iter().rev() {
                let _ = cgroup::write_recorded(&fs, dir, SetKind::Cpus, before);
            }
        }
        return a.refuse(vm.pid, why);
    }
    // What this applier set, so letting go of the VM can tell its sets from others'.
    for (dir, _) in &written {
        if let Ok(now) = cgroup::read_set(dir, SetKind::Cpus) {
            a.written_cpus.insert(dir.clone(), now);
        }
    }
    // Read back: the groups' sets and the vCPU threads' affinity.
    let mut wrong = Vec::new();
    let mut verified = 0;
    for t in &targets {
        match cgroup::read_effective(t, SetKind::Cpus) {
            Ok(eff) if !eff.is_empty() && eff.is_subset(cpus) => verified += 1,
            Ok(effective) => wrong.push(Shortfall::GroupEnforces {
                group: t.clone(),
                effective,
            }),
            Err(_) => a.counters.cgroups_gone += 1,
        }
    }
    for v in &vm.vcpus {
        if vcpus.is_some_and(|l| !l.contains(&v.index)) {
            continue;
        }
        match sys::get_affinity(v.tid) {
            Ok(set) if set.is_subset(cpus) => {}
            Ok(set) => wrong.push(Shortfall::VcpuRunsOn {
                index: v.index,
                cpus: set,
            }),
            Err(_) => a.counters.threads_gone += 1,
        }
    }
    if verified == 0 && wrong.is_empty() {
        return a.gone(vm.pid);
    }
    super::cpu_change_outcome(wrong)
}

fn set_cpus_threads(
    a: &mut LinuxApplier,
    vm: &Vm,
    vcpus: Option<&[u32]>,
    cpus: &CpuSet,
) -> ActionOutcome {
    let tids: Vec<u32> = match vcpus {
        Some(list) => vm
            .vcpus
            .iter()
            .filter(|v| list.contains(&v.index))
            .map(|v| v.tid)
            .collect(),
        None => match list_threads(&a.cfg.proc_root, vm.pid) {
            Ok(t) => t,
            Err(_) => return a.gone(vm.pid),
        },
    };
    let mut done: Vec<(u32, CpuSet)> = Vec::new();
    for &tid in &tids {
        let before = match sys::get_affinity(tid) {
            Ok(s) => s,
            Err(_) => {
                a.counters.threads_gone += 1;
                tracing::debug!(vm = vm.pid, tid, "thread vanished");
                continue;
            }
        };
        match sys::set_affinity(tid, cpus) {
            Ok(()) => done.push((tid, before)),
            Err(nix::Error::ESRCH) => {
                a.counters.threads_gone += 1;
                tracing::debug!(vm = vm.pid, tid, "thread vanished");
            }
            Err(e) => {
                for (t, b) in done.iter().rev() {
                    let _ = sys::set_affinity(*t, b);
                }
                let why = if e == nix::Error::EINVAL {
                    Refusal::CpusetForbids {
                        tid,
                        cpus: cpus.clone(),
                    }
                } else {
                    Refusal::Affinity { tid, errno: e }
                };
                return a.refuse(vm.pid, why);
            }
        }
    }
    if done.is_empty() {
        return a.gone(vm.pid);
    }
    let mut wrong = Vec::new();
    for (tid, _) in &done {
        match sys::get_affinity(*tid) {
            Ok(set) if &set == cpus => {}
            Ok(set) => wrong.push(Shortfall::ThreadRunsOn {
                tid: *tid,
                cpus: set,
            }),
            Err(_) => a.counters.threads_gone += 1,
        }
    }
    super::cpu_change_outcome(wrong)
}
