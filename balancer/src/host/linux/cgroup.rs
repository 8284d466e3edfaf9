//! Where a VM sits in the cgroup tree, and the cpusets that confine it.
//!
//! libvirt puts each VM in a machine scope (`/machine.slice/machine-qemu\x2dN\x2dNAME.scope`)
//! and, with cgroup-based pinning, each vCPU in its own child (`libvirt/vcpuN`, or
//! `vcpuN` directly under the scope in older releases) and the emulator threads in
//! `libvirt/emulator`. `vcpupin`, `emulatorpin` and `numatune` are written into those
//! children's `cpuset.cpus` / `cpuset.mems`. This module finds the cpuset directory of
//! a process or thread on both cgroup versions:
//!
//! - v1 (or hybrid): the `/proc/PID/cgroup` line whose controller list holds `cpuset`,
//!   under `<cgroup mount>/cpuset`; files `cpuset.{cpus,mems,effective_cpus,effective_mems}`;
//! - v2: the `0::PATH` line, under the mount itself (unified) or `unified/` (hybrid);
//!   files `cpuset.{cpus,mems,cpus.effective,mems.effective}`.
//!
//! `/proc/PID/cgroup` is parsed by the `procfs` crate; the cgroup files themselves
//! (no crate reads cpuset files under a chosen root) are read here by hand, once.

use std::path::{Path, PathBuf};

use ::procfs::FromRead;
use ::procfs::ProcessCGroups;

use super::procfs::ProcTextError;
use super::{HostError, HostPaths, read_small};
use crate::model::{CpuSet, NodeSet};

/// The cgroup version a path belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The cpuset cgroup of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCgroup {
    pub version: CgroupVersion,
    /// Path relative to the hierarchy root, as `/proc/PID/cgroup` prints it.
    pub path: String,
}

/// Parses `/proc/PID/cgroup` (with the `procfs` crate's parser) and returns the cgroup
/// that governs cpusets: the v1 `cpuset` hierarchy when mounted, else the v2 one.
/// Blank lines are skipped; any other line that is not `ID:CONTROLLERS:PATH` is an
/// error.
pub fn parse_proc_cgroup(text: &str) -> Result<Option<TaskCgroup>, ProcTextError> {
    let lines: String = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| [l, "\n"])
        .collect();
    let groups = ProcessCGroups::from_read(lines.as_bytes())
        .map_err(|e| ProcTextError::refused("cgroup list", e))?;
    let mut v2 = None;
    for g in groups {
        if g.controllers.iter().any(|c| c == "cpuset") {
            return Ok(Some(TaskCgroup {
                version: CgroupVersion::V1,
                path: g.pathname,
            }));
        }
        if g.controllers.is_empty() {
            v2 = Some(TaskCgroup {
                version: CgroupVersion::V2,
                path: g.pathname,
            });
        }
    }
    Ok(v2)
}

/// Reads the cpuset cgroup of a process (`tid == None`) or one of its threads.
pub fn read_task_cgroup(
    paths: &HostPaths,
    pid: u32,
    tid: Option<u32>,
) -> Result<Option<TaskCgroup>, HostError> {
    let mut p = paths.proc.join(pid.to_string());
    if let Some(t) = tid {
        p = p.join("task").join(t.to_string());
    }
    let path = p.join("cgroup");
    let text = read_small(&path).map_err(|e| {
        if e.is_vanished() {
            HostError::Vanished { pid }
        } else {
            e
        }
    })?;
    parse_proc_cgroup(&text).map_err(|w| HostError::parse(&path, w))
}

/// The cpuset configuration of one cgroup directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cpuset {
    /// What is written in the group (empty on v2 means "inherit from the parent").
    pub cpus: CpuSet,
    pub mems: NodeSet,
    /// What the kernel applies after intersecting with the ancestors.
    pub effective_cpus: CpuSet,
    pub effective_mems: NodeSet,
}

/// The directory of a task cgroup under the cgroup mount.
pub fn cgroup_dir(paths: &HostPaths, cg: &TaskCgroup) -> PathBuf {
    let rel = cg.path.trim_start_matches('/');
    match cg.version {
        CgroupVersion::V1 => paths.cgroup.join("cpuset").join(rel),
        CgroupVersion::V2 => {
            // Unified mount at the root, or the hybrid layout's `unified/`.
            let direct = paths.cgroup.join(rel);
            let hybrid = paths.cgroup.join("unified").join(rel);
            if paths.cgroup.join("cgroup.controllers").exists()
                || direct.exists()
                || !hybrid.exists()
            {
                direct
            } else {
                hybrid
            }
        }
    }
}

/// Reads a group's cpuset; `None` when the cpuset controller is not enabled there
/// (v2 without `+cpuset` in the parent's subtree_control) or the group is gone.
pub fn read_cpuset(paths: &HostPaths, cg: &TaskCgroup) -> Result<Option<Cpuset>, HostError> {
    let dir = cgroup_dir(paths, cg);
    let names = match cg.version {
        CgroupVersion::V1 => [
            "cpuset.cpus",
            "cpuset.mems",
            "cpuset.effective_cpus",
            "cpuset.effective_mems",
        ],
        CgroupVersion::V2 => [
            "cpuset.cpus",
            "cpuset.mems",
            "cpuset.cpus.effective",
            "cpuset.mems.effective",
        ],
    };
    let mut sets = Vec::with_capacity(4);
    for name in names {
        match super::read_idset(&dir.join(name)) {
            Ok(s) => sets.push(s),
            Err(e) if e.is_vanished() => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let effective_mems = sets.pop().unwrap_or_default();
    let effective_cpus = sets.pop().unwrap_or_default();
    let mems = sets.pop().unwrap_or_default();
    let cpus = sets.pop().unwrap_or_default();
    Ok(Some(Cpuset {
        cpus,
        mems,
        effective_cpus,
        effective_mems,
    }))
}

/// What a thread's cgroup path says about its role in a libvirt layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LibvirtRole {
    Vcpu(u32),
    Emulator,
    IoThread(u32),
}

/// Splits a libvirt thread cgroup path into the VM's own group and the thread's role:
/// `/machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/vcpu2` ->
/// (`/machine.slice/machine-qemu\x2d1\x2dvm1.scope`, `Vcpu(2)`).
pub fn split_libvirt_path(path: &str) -> (String, Option<LibvirtRole>) {
    let (parent, last) = match path.rsplit_once('/') {
        Some(p) => p,
        None => return (path.to_string(), None),
    };
    let role = if let Some(n) = last.strip_prefix("vcpu") {
        n.parse().ok().map(LibvirtRole::Vcpu)
    } else if let Some(n) = last.strip_prefix("iothread") {
        n.parse().ok().map(LibvirtRole::IoThread)
    } else if last == "emulator" {
        Some(LibvirtRole::Emulator)
    } else {
        None
    };
    match role {
        Some(r) => {
            let vm = parent.strip_suffix("/libvirt").unwrap_or(parent);
            (vm.to_string(), Some(r))
        }
        None => (
            path.strip_suffix("/libvirt").unwrap_or(path).to_string(),
            None,
        ),
    }
}

/// The VM name in a libvirt machine scope path, unescaping systemd's `\x2d`:
/// `.../machine-qemu\x2d3\x2dweb\x2d01.scope` -> `web-01`.
pub fn machine_scope_name(path: &str) -> Option<String> {
    let scope = path
        .split('/')
        .find(|c| c.starts_with("machine-") && c.ends_with(".scope"))?;
    let inner = scope.strip_prefix("machine-")?.strip_suffix(".scope")?;
    let unescaped = unescape_systemd(inner);
    // `qemu-ID-NAME`: drop the driver and the numeric id.
    let rest = unescaped.strip_prefix("qemu-")?;
    match rest.split_once('-') {
        Some((id, name)) if id.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => {
            Some(name.to_string())
        }
        _ => Some(rest.to_string()),
    }
}

fn unescape_systemd(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 2..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(v) = hex
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The VM-level group of a libvirt layout given any of its thread paths.
pub fn vm_group(path: &str) -> String {
    split_libvirt_path(path).0
}

/// True when `path` exists under the cgroup mount for the given version (used to skip
/// dangling `/proc/PID/cgroup` entries of exited groups).
pub fn exists(paths: &HostPaths, cg: &TaskCgroup) -> bool {
    Path::new(&cgroup_dir(paths, cg)).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_cpuset_hierarchy() {
        let v1 = "12:pids:/machine.slice\n5:cpuset:/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt/vcpu0\n\
                  1:name=systemd:/machine.slice/x.scope\n0::/machine.slice/x.scope\n";
        let cg = parse_proc_cgroup(v1).unwrap().unwrap();
        assert_eq!(cg.version, CgroupVersion::V1);
        assert!(cg.path.ends_with("libvirt/vcpu0"));
        let v2 = "0::/machine.slice/machine-qemu\\x2d2\\x2dweb.scope/libvirt/emulator\n";
        let cg = parse_proc_cgroup(v2).unwrap().unwrap();
        assert_eq!(cg.version, CgroupVersion::V2);
        assert!(parse_proc_cgroup("garbage").is_err());
        assert!(parse_proc_cgroup("x:cpuset:/a\n").is_err());
        assert!(parse_proc_cgroup("5:cpuset\n").is_err());
        assert_eq!(parse_proc_cgroup("").unwrap(), None);
        assert_eq!(parse_proc_cgroup("\n\n").unwrap(), None);
        // Blank lines between entries are skipped.
        let spaced = "12:pids:/a\n\n0::/b\n";
        assert_eq!(parse_proc_cgroup(spaced).unwrap().unwrap().path, "/b");
    }

    #[test]
    fn libvirt_paths() {
        let p = "/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d01.scope/libvirt/vcpu12";
        let (vm, role) = split_libvirt_path(p);
        assert_eq!(vm, "/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d01.scope");
        assert_eq!(role, Some(LibvirtRole::Vcpu(12)));
        assert_eq!(machine_scope_name(p).as_deref(), Some("web-01"));
        let (vm, role) =
            split_libvirt_path("/machine.slice/machine-qemu\\x2d3\\x2dx.scope/emulator");
        assert_eq!(vm, "/machine.slice/machine-qemu\\x2d3\\x2dx.scope");
        assert_eq!(role, Some(LibvirtRole::Emulator));
        assert_eq!(split_libvirt_path("/user.slice/session-1.scope").1, None);
        assert_eq!(machine_scope_name("/user.slice"), None);
    }
}
