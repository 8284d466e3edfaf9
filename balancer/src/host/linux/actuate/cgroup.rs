//! The cpuset controller of a VM's cgroup, in both cgroup versions.
//!
//! libvirt puts each VM in its own cgroup with one child per vCPU (`vcpuN`) and one
//! for the emulator threads, under a `libvirt/` folder on cgroup v2 and directly in
//! the VM's group on v1. Restricting a libvirt VM through sched_setaffinity would be
//! undone by libvirt and may be refused by the cpuset, so CPU sets of such VMs are
//! written to these groups.
//!
//! The two versions differ in what writing `cpuset.mems` does: on v2 the kernel
//! migrates every page of the group's tasks that is outside the new set, at once and
//! unthrottled; on v1 it does so only when `cpuset.memory_migrate` is 1. Callers
//! therefore only ever widen `mems` during a move and narrow it when nothing is left
//! outside the narrowed set.

use std::io;
use std::path::{Path, PathBuf};

use crate::model::IdSet;

/// Which cpuset interface a host has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpusetFs {
    /// cgroup v1: the cpuset hierarchy's mount point (e.g. `/sys/fs/cgroup/cpuset`).
    V1(PathBuf),
    /// cgroup v2: the unified mount point.
    V2(PathBuf),
}

impl CpusetFs {
    /// Finds the cpuset interface under a cgroup root: a v1 `cpuset/` hierarchy, or a
    /// v2 mount with the cpuset controller (the root itself or `unified/` on hybrid
    /// hosts, whose v2 tree rarely has controllers).
    pub fn detect(cgroup_root: &Path) -> Option<Self> {
        let v1 = cgroup_root.join("cpuset");
        if v1.join("cpuset.cpus").exists() {
            return Some(Self::V1(v1));
        }
        for dir in [cgroup_root.to_path_buf(), cgroup_root.join("unified")] {
            let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"));
            if controllers.is_ok_and(|c| c.split_whitespace().any(|w| w == "cpuset")) {
                return Some(Self::V2(dir));
            }
        }
        None
    }

    pub fn mount(&self) -> &Path {
        match self {
            Self::V1(p) | Self::V2(p) => p,
        }
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Self::V2(_))
    }

    /// Absolute directory of a cgroup given relative to the mount (`/machine/x` or
    /// `machine/x`).
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.mount().join(rel.trim_start_matches('/'))
    }

    /// Whether a group has its own cpuset files (on v2 only when the controller is
    /// enabled for it).
    pub fn has_cpuset(&self, dir: &Path) -> bool {
        dir.join("cpuset.cpus").exists()
    }

    /// `memory_migrate` of a v1 group; `None` on v2 where it does not exist.
    pub fn memory_migrate(&self, dir: &Path) -> io::Result<Option<bool>> {
        if self.is_v2() {
            return Ok(None);
        }
        let v = std::fs::read_to_string(dir.join("cpuset.memory_migrate"))?;
        Ok(Some(v.trim() == "1"))
    }

    pub fn set_memory_migrate(&self, dir: &Path, on: bool) -> io::Result<()> {
        if self.is_v2() {
            return Ok(());
        }
        std::fs::write(
            dir.join("cpuset.memory_migrate"),
            if on { "1\n" } else { "0\n" },
        )
    }
}

/// Which set of a cpuset group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    Cpus,
    Mems,
}

impl SetKind {
    fn file(self) -> &'static str {
        match self {
            Self::Cpus => "cpuset.cpus",
            Self::Mems => "cpuset.mems",
        }
    }
    /// The enforced set: `cpuset.cpus.effective` on v2, `cpuset.effective_cpus` on v1.
    fn effective_files(self) -> [&'static str; 2] {
        match self {
            Self::Cpus => ["cpuset.cpus.effective", "cpuset.effective_cpus"],
            Self::Mems => ["cpuset.mems.effective", "cpuset.effective_mems"],
        }
    }
}

/// Reads `cpuset.cpus` or `cpuset.mems` as configured.
pub fn read_set(dir: &Path, kind: SetKind) -> io::Result<IdSet> {
    let text = std::fs::read_to_string(dir.join(kind.file()))?;
    IdSet::parse_list(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads the set the kernel actually enforces (`effective_*`), falling back to the
/// configured one where the file does not exist.
pub fn read_effective(dir: &Path, kind: SetKind) -> io::Result<IdSet> {
    for name in kind.effective_files() {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => {
                return IdSet::parse_list(&text)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    read_set(dir, kind)
}

/// Writes a set; an empty set is refused here so no caller can empty a group.
pub fn write_set(dir: &Path, kind: SetKind, set: &IdSet) -> io::Result<()> {
    if set.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to write an empty {}", kind.file()),
        ));
    }
    std::fs::write(dir.join(kind.file()), format!("{set}\n"))
}

/// Writes a set recorded earlier (a rollback or restore). On cgroup v2 an empty
/// configured set means "the parent's" and is put back as such (an empty write
/// resets it); the kernel refuses that for a group with tasks whose set is not empty
/// (ENOSPC), and then the parent's effective set is written, which is the same set
/// today. On v1 an empty set is refused like any other write.
pub fn write_recorded(fs: &CpusetFs, dir: &Path, kind: SetKind, set: &IdSet) -> io::Result<()> {
    if set.is_empty() && fs.is_v2() {
        return match std::fs::write(dir.join(kind.file()), "\n") {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let parent = dir.parent().unwrap_or(dir);
                write_set(dir, kind, &read_effective(parent, kind)?)
            }
            other => other,
        };
    }
    write_set(dir, kind, set)
}

/// The set to widen from: the configured one, or on cgroup v2 when that is empty
/// (inherited), the effective one, so widening never narrows an inherited set.
pub fn widen_base(dir: &Path, kind: SetKind) -> io::Result<IdSet> {
    let configured = read_set(dir, kind)?;
    if configured.is_empty() {
        read_effective(dir, kind)
    } else {
        Ok(configured)
    }
}

/// The cpuset groups libvirt made for one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LibvirtGroups {
    /// The groups between the VM's group and the thread groups, outermost first
    /// (the VM's group, then `libvirt/` on v2).
    pub parents: Vec<PathBuf>,
    /// `(vCPU index, group)`.
    pub vcpus: Vec<(u32, PathBuf)>,
    pub emulator: Option<PathBuf>,
}

impl LibvirtGroups {
    /// Looks for `vcpuN`/`emulator` children under `vm_dir` or `vm_dir/libvirt`.
    /// `None` when the VM has no per-thread groups (a plain qemu process).
    pub fn find(fs: &CpusetFs, vm_dir: &Path) -> Option<Self> {
        for (base, parents) in [
            (
                vm_dir.join("libvirt"),
                vec![vm_dir.to_path_buf(), vm_dir.join("libvirt")],
            ),
            (vm_dir.to_path_buf(), vec![vm_dir.to_path_buf()]),
        ] {
            let Ok(entries) = std::fs::read_dir(&base) else {
                continue;
            };
            let mut groups = Self {
                parents: parents.clone(),
                ..Self::default()
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if !fs.has_cpuset(&path) {
                    continue;
                }
                if name == "emulator" {
                    groups.emulator = Some(path);
                } else if let Some(i) = name.strip_prefix("vcpu").and_then(|n| n.parse().ok()) {
                    groups.vcpus.push((i, path));
                }
            }
            if !groups.vcpus.is_empty() {
                groups.vcpus.sort();
                groups.parents.retain(|p| fs.has_cpuset(p));
                return Some(groups);
            }
        }
        None
    }

    pub fn vcpu(&self, index: u32) -> Option<&Path> {
        self.vcpus
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, p)| p.as_path())
    }

    /// Every group, parents first.
    pub fn all(&self) -> Vec<PathBuf> {
        let mut v = self.parents.clone();
        v.extend(self.vcpus.iter().map(|(_, p)| p.clone()));
        v.extend(self.emulator.clone());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmb-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn group(dir: &Path, cpus: &str, mems: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cpuset.cpus"), cpus).unwrap();
        std::fs::write(dir.join("cpuset.mems"), mems).unwrap();
    }

    #[test]
    fn finds_libvirt_v2_groups_and_refuses_empty_writes() {
        let root = tree("v2");
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu memory\n").unwrap();
        let fs = CpusetFs::detect(&root).unwrap();
        assert!(fs.is_v2());
        let vm = fs.dir("/machine.slice/machine-qemu\\x2d1\\x2dvm.scope");
        group(&vm, "0-7", "0-1");
        group(&vm.join("libvirt"), "0-7", "0-1");
        group(&vm.join("libvirt/vcpu0"), "0-3", "0");
        group(&vm.join("libvirt/vcpu1"), "0-3", "0");
        group(&vm.join("libvirt/emulator"), "0-7", "0-1");
        let g = LibvirtGroups::find(&fs, &vm).unwrap();
        assert_eq!(g.parents, vec![vm.clone(), vm.join("libvirt")]);
        assert_eq!(g.vcpus.len(), 2);
        assert_eq!(g.vcpu(1), Some(vm.join("libvirt/vcpu1").as_path()));
        assert!(g.emulator.is_some());
        assert_eq!(
            read_set(g.vcpu(0).unwrap(), SetKind::Cpus)
                .unwrap()
                .to_string(),
            "0-3"
        );
        // No effective file in the fixture: falls back to the configured set.
        assert_eq!(
            read_effective(&vm, SetKind::Mems).unwrap().to_string(),
            "0-1"
        );
        assert!(write_set(&vm, SetKind::Cpus, &IdSet::new()).is_err());
        write_set(&vm, SetKind::Cpus, &IdSet::parse_list("2-3").unwrap()).unwrap();
        assert_eq!(read_set(&vm, SetKind::Cpus).unwrap().to_string(), "2-3");
        assert_eq!(fs.memory_migrate(&vm).unwrap(), None);
        // v2: an inherited (empty) set widens from the effective one and is restored
        // as inherited.
        let emu = g.emulator.clone().unwrap();
        std::fs::write(emu.join("cpuset.mems"), "").unwrap();
        std::fs::write(emu.join("cpuset.mems.effective"), "0-1\n").unwrap();
        assert_eq!(widen_base(&emu, SetKind::Mems).unwrap().to_string(), "0-1");
        write_recorded(&fs, &emu, SetKind::Mems, &IdSet::new()).unwrap();
        assert_eq!(
            std::fs::read_to_string(emu.join("cpuset.mems")).unwrap(),
            "\n"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn finds_v1_groups_without_libvirt_folder() {
        let root = tree("v1");
        let fs_root = root.join("cpuset");
        group(&fs_root, "0-7", "0-1");
        let fs = CpusetFs::detect(&root).unwrap();
        assert_eq!(fs, CpusetFs::V1(fs_root.clone()));
        let vm = fs.dir("machine/qemu-1-vm.libvirt-qemu");
        group(&vm, "0-7", "0-1");
        group(&vm.join("vcpu0"), "0-3", "0");
        group(&vm.join("emulator"), "0-7", "0");
        std::fs::write(vm.join("cpuset.memory_migrate"), "1\n").unwrap();
        let g = LibvirtGroups::find(&fs, &vm).unwrap();
        assert_eq!(g.parents, vec![vm.clone()]);
        assert_eq!(g.all().len(), 3);
        assert_eq!(fs.memory_migrate(&vm).unwrap(), Some(true));
        fs.set_memory_migrate(&vm, false).unwrap();
        assert_eq!(fs.memory_migrate(&vm).unwrap(), Some(false));
        assert!(write_recorded(&fs, &vm, SetKind::Cpus, &IdSet::new()).is_err());
        // A plain group without vcpu children is not a libvirt VM.
        let plain = fs.dir("plain");
        group(&plain, "0-1", "0");
        assert_eq!(LibvirtGroups::find(&fs, &plain), None);
        std::fs::remove_dir_all(root).unwrap();
    }
}
