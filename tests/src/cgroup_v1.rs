//! A cgroup v1 cpuset group tree in libvirt's layout (`vcpu0`, `vcpu1`, `emulator`
//! under the VM's group), made for one test and removed when dropped, the way a VM's
//! group goes away: its threads leave to the root group first.

use std::path::{Path, PathBuf};

/// The group `root/name` and the threads put into it.
pub struct V1Group {
    pub dir: PathBuf,
    tids: Vec<u32>,
}

impl V1Group {
    /// Creates `root/name` and its `vcpu0`, `vcpu1` and `emulator` groups, each on
    /// `cpus` and `mems`, and puts thread `tids[i]` into `vcpu{i}` (libvirt's v1
    /// layout: each vCPU thread in its own group). Panics on any failed write.
    pub fn create(root: &Path, name: &str, cpus: &str, mems: &str, tids: &[u32]) -> Self {
        let group = Self {
            dir: root.join(name),
            tids: tids.to_vec(),
        };
        for sub in ["", "vcpu0", "vcpu1", "emulator"] {
            let d = group.dir.join(sub);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpuset.cpus"), cpus.trim()).unwrap();
            std::fs::write(d.join("cpuset.mems"), mems.trim()).unwrap();
        }
        for (i, tid) in tids.iter().enumerate() {
            std::fs::write(group.dir.join(format!("vcpu{i}/tasks")), tid.to_string()).unwrap();
        }
        group
    }
}

impl Drop for V1Group {
    fn drop(&mut self) {
        let Some(root) = self.dir.parent() else {
            return;
        };
        for tid in &self.tids {
            let _ = std::fs::write(root.join("tasks"), tid.to_string());
        }
        for sub in ["vcpu0", "vcpu1", "emulator"] {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
