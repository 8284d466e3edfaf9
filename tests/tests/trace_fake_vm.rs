//! `vmbalancer trace` and the Linux observer on this host, with a qemu-like process
//! running (`mini_qemu`: comm `qemu-kvm`, two `CPU n/KVM` threads, 64 MiB of touched
//! anonymous guest RAM).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use balancer::host::Observer;
use balancer::host::linux::{HostPaths, LinuxObserver, ObserverConfig};

const MIB: u64 = 1 << 20;

/// A running mini_qemu, killed on drop.
struct MiniQemu {
    child: Child,
    pid: u32,
    name: String,
}

impl MiniQemu {
    fn start(tag: &str) -> Self {
        let name = format!("trace-{tag}-{}", std::process::id());
        let mut child = Command::new(env!("CARGO_BIN_EXE_mini_qemu"))
            .args([
                "-name",
                &format!("guest={name},debug-threads=on"),
                "-smp",
                "2",
                "-m",
                "64",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mini_qemu");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("mini_qemu said {line:?}"));
        assert_eq!(pid, child.id());
        Self { child, pid, name }
    }

    /// (vCPU index, tid) of its `CPU n/KVM` threads, from /proc.
    fn vcpu_tids(&self) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(format!("/proc/{}/task", self.pid)).unwrap() {
            let tid: u32 = e.unwrap().file_name().to_str().unwrap().parse().unwrap();
            let comm =
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid)).unwrap();
            if let Some(n) = comm
                .trim()
                .strip_prefix("CPU ")
                .and_then(|r| r.strip_suffix("/KVM"))
            {
                v.push((n.parse().unwrap(), tid));
            }
        }
        v.sort();
        v
    }
}

impl Drop for MiniQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn trace_once_json_lists_the_fake_vm() {
    let vm = MiniQemu::start("json");
    let out = Command::new(env!("CARGO_BIN_EXE_vmbalancer_cli"))
        .args([
            "trace",
            "--once",
            "--json",
            "--interval",
            "1",
            "--vm",
            &vm.name,
        ])
        .output()
        .expect("run vmbalancer trace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{r}");
    let j = &vms[0];
    assert_eq!(j["pid"], vm.pid);
    assert_eq!(j["name"], vm.name.as_str());
    let tids: Vec<(u32, u32)> = j["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["index"].as_u64().unwrap() as u32,
                v["tid"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    assert_eq!(tids, vm.vcpu_tids());
    assert_eq!(tids.len(), 2);
    // This host has one node: all 64 MiB of guest RAM is resident there.
    assert_eq!(r["nodes"][0]["id"], 0);
    assert_eq!(j["configured_bytes"], 64 * MIB);
    assert_eq!(j["memory_bytes_per_node"][0], 64 * MIB);
    assert_eq!(j["locality_pct"], 100.0);
    for v in j["vcpus"].as_array().unwrap() {
        assert_eq!(v["node"], 0);
    }
    assert!(
        j["cpu_pct"].as_f64().unwrap() > 0.0,
        "the vCPUs write memory: {j}"
    );
    // Without eBPF it says so, and the telemetry-only fields are null.
    if r["telemetry"]["available"] == false {
        assert!(r["telemetry"]["reason"].is_string());
        assert!(j["cross_node_migrations_per_s"].is_null());
    }
}

#[test]
fn observer_notices_start_and_exit_without_rescanning() {
    let mut o = LinuxObserver::new(HostPaths::system(), ObserverConfig::default()).unwrap();
    o.observe().unwrap();
    let scans = o.counters().full_scans;
    let vm = MiniQemu::start("events");
    let s = o.observe().unwrap();
    let found = s
        .vms
        .iter()
        .find(|v| v.pid == vm.pid)
        .expect("new VM found");
    assert_eq!(found.vcpus.len(), 2);
    assert_eq!(found.memory.bytes_per_node.iter().sum::<u64>(), 64 * MIB);
    if o.proc_events_unavailable().is_none() && o.counters().proc_event_overflows == 0 {
        // Found from connector events; a busy host may overflow the socket, and then
        // the observer rightly rescans.
        assert_eq!(
            o.counters().full_scans,
            scans,
            "found from connector events"
        );
    }
    let pid = vm.pid;
    drop(vm);
    let s = o.observe().unwrap();
    assert!(s.vms.iter().all(|v| v.pid != pid), "exited VM dropped");
}

#[test]
fn captured_live_tree_reads_back_the_same() {
    let vm = MiniQemu::start("capture");
    let out = std::env::temp_dir().join(format!("vmb-live-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let st = Command::new(env!("CARGO_BIN_EXE_capture_fixture"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let mut o = LinuxObserver::new(HostPaths::under(&out), ObserverConfig::default()).unwrap();
    let s = o.observe().unwrap();
    let got = s.vms.iter().find(|v| v.pid == vm.pid).expect("captured VM");
    let tids: Vec<(u32, u32)> = got.vcpus.iter().map(|v| (v.index, v.tid)).collect();
    assert_eq!(tids, vm.vcpu_tids());
    assert_eq!(got.memory.bytes_per_node[0], 64 * MIB);
    assert_eq!(got.name, vm.name);
    let _ = std::fs::remove_dir_all(&out);
}
