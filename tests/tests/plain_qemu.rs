//! The Linux observer on this host with fake VMs started as plain qemu (threads not
//! named): vCPU threads from the QMP monitor when the command line gives one, else
//! "vCPUs unknown" and the whole process; a confidential guest's mark from its
//! command line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use balancer::host::Observer;
use balancer::host::linux::{HostPaths, LinuxObserver, ObserverConfig};
use balancer::model::{Snapshot, VcpuDiscovery, Vm};

/// A running fake VM in its own scratch directory, killed and cleaned on drop.
struct FakeVm {
    child: Child,
    dir: PathBuf,
}

impl FakeVm {
    fn start(tag: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("plain-qemu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let progress = dir.join("vm.progress");
        let mut args: Vec<String> = [
            "-name",
            &format!("guest={tag}"),
            "-smp",
            "2",
            "-m",
            "16",
            "-lab-phases",
            "0:5",
            "-lab-progress",
            progress.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(
            extra
                .iter()
                .map(|a| a.replace("{dir}", dir.to_str().unwrap())),
        );
        let child = Command::new(env!("CARGO_BIN_EXE_fake_qemu"))
            .args(&args)
            .spawn()
            .expect("start fake_qemu");
        let vm = Self { child, dir };
        let t = Instant::now();
        while !progress.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "fake_qemu never got ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (tid, index) of its vCPU threads, as it listed them itself.
    fn listed_vcpus(&self) -> Vec<(u32, u32)> {
        std::fs::read_to_string(self.dir.join("vcpus").join(self.pid().to_string()))
            .unwrap()
            .lines()
            .map(|l| {
                let (t, i) = l.split_once(' ').unwrap();
                (t.parse().unwrap(), i.parse().unwrap())
            })
            .collect()
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn observe_twice() -> Snapshot {
    let cfg = ObserverConfig {
        use_proc_events: false,
        write_heat: false,
        ..Default::default()
    };
    let mut obs = LinuxObserver::new(HostPaths::default(), cfg).unwrap();
    obs.observe().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    obs.observe().unwrap()
}

fn find(s: &Snapshot, pid: u32) -> &Vm {
    s.vms
        .iter()
        .find(|v| v.pid == pid)
        .unwrap_or_else(|| panic!("VM {pid} not observed"))
}

#[test]
fn plain_qemu_vcpus_from_qmp_or_unknown_and_confidential_marks() {
    let with_qmp = FakeVm::start(
        "withqmp",
        &[
            "-qmp",
            "unix:{dir}/qmp.sock,server=on,wait=off",
            "-object",
            "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1",
            "-machine",
            "q35,confidential-guest-support=sev0",
        ],
    );
    let bare = FakeVm::start("bare", &[]);
    let snap = observe_twice();

    let vm = find(&snap, with_qmp.pid());
    assert_eq!(
        vm.vcpu_discovery,
        VcpuDiscovery::Qmp {
            socket: format!("{}/qmp.sock", with_qmp.dir.display())
        }
    );
    let mut seen: Vec<(u32, u32)> = vm.vcpus.iter().map(|v| (v.tid, v.index)).collect();
    seen.sort_by_key(|&(_, i)| i);
    assert_eq!(seen, with_qmp.listed_vcpus());
    assert!(vm.vcpus.iter().all(|v| !v.affinity.is_empty()));
    // Every thread is named like the process: no vCPU by name.
    for tid in vm.vcpus.iter().map(|v| v.tid) {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.pid)).unwrap();
        assert_eq!(comm.trim(), "qemu-kvm");
    }
    let fixed = vm.memory.not_movable.as_ref().expect("confidential mark");
    assert_eq!(fixed.kind, "sev-guest");

    let vm = find(&snap, bare.pid());
    assert!(vm.vcpus.is_empty());
    assert!(!vm.vcpus_known());
    assert!(
        vm.vcpu_discovery.to_string().contains("no QMP unix socket"),
        "{}",
        vm.vcpu_discovery
    );
    assert_eq!(vm.configured_vcpus, 2);
    assert!(!vm.process_affinity.is_empty());
    assert!(vm.memory.not_movable.is_none());
    assert!(Path::new(&bare.dir).join("vcpus").exists());
}
