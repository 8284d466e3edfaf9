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
#[ignore = "needs root: trace loads eBPF programs"]
fn trace_once_json_shows_ebpf_run_time_of_the_vcpus() {
    vmbalancer_tests::require_root();
    let vm = MiniQemu::start("ebpf");
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
    let tel = &r["telemetry"];
    assert_eq!(
        tel["available"], true,
        "root on a 6.x kernel with BTF: {tel}"
    );
    let feature = |name: &str| {
        tel["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("feature {name} listed: {tel}"))
            .clone()
    };
    let on_cpu = feature("on-cpu-time");
    assert_eq!(on_cpu["available"], true, "{on_cpu}");
    // sched_switch fires thousands of times a second; the kernel measured its cost.
    assert!(on_cpu["ns_per_event"].as_f64().unwrap() > 0.0, "{on_cpu}");
    assert_eq!(feature("migrations")["available"], true);

    let j = &r["vms"][0];
    assert_eq!(j["pid"], vm.pid);
    let vcpus = j["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    for v in vcpus {
        // Each vCPU writes its 32 MiB every 20 ms: it ran during the interval, and
        // this host has one node, so all of it on node 0.
        assert!(v["run_ns_total"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["run_pct_per_node"], serde_json::json!([100.0]), "{v}");
        assert!(v["migrations"].is_u64(), "{v}");
        assert_eq!(v["cross_node_migrations"], 0, "one node: {v}");
    }
    assert!(j["migrations_per_s"].is_f64(), "{j}");
    assert_eq!(j["cross_node_migrations_per_s"], 0.0, "{j}");
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

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn ebpf_source_heats_faulted_regions_and_decays_them() {
    use balancer::host::linux::ebpf_source::HEAT_HALF_LIFE_NS;
    use balancer::host::linux::{EbpfTelemetry, TelemetrySource, TrackedVm};
    use balancer::model::{Node, Snapshot, Topology, Vcpu, Vm};
    use balancer::telemetry::Telemetry;

    vmbalancer_tests::require_root();
    let mut src = EbpfTelemetry::new(Telemetry::load().expect("load eBPF telemetry"));
    // This process plays the VM and one of its threads the vCPU that faults.
    let pid = std::process::id();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        go_rx.recv().unwrap();
        let len = 8 * MIB as usize;
        // A fresh mapping only this thread touches, one fault per 4 KiB page (not
        // one per transparent huge page). It is leaked so its pages stay resident
        // while the test queries their node.
        let p = vmbalancer_tests::anon::map(len, Some(libc::MADV_NOHUGEPAGE)).unwrap();
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len, inside the mapping.
            unsafe { p.add(off).write_volatile(1) };
        }
        (p as u64, len as u64)
    });
    let tid = tid_rx.recv().unwrap();
    src.track(&[TrackedVm {
        pid,
        vcpus: vec![(0, tid)],
        other_threads: Vec::new(),
    }]);
    go_tx.send(()).unwrap();
    let (start, len) = worker.join().unwrap();

    let mut snap = Snapshot {
        now_ns: 1_000,
        topology: Topology {
            nodes: vec![Node {
                id: 0,
                ..Default::default()
            }],
            ..Default::default()
        },
        vms: vec![Vm {
            pid,
            vcpus: vec![Vcpu {
                index: 0,
                tid,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    src.fill(&mut snap, &Default::default());
    let ours = |s: &Snapshot| -> Vec<(u64, f64, u32)> {
        s.vms[0]
            .hot_regions
            .iter()
            .filter(|r| r.start_addr < start + len && r.start_addr + r.len_bytes > start)
            .map(|r| (r.start_addr, r.heat, r.node))
            .collect()
    };
    let first = ours(&snap);
    let heat: f64 = first.iter().map(|r| r.1).sum();
    // Every page of the mapping faulted once, after tracking began; no decay yet.
    assert_eq!(heat, (len / 4096) as f64, "{first:?}");
    assert!(first.len() >= 4, "8 MiB spans at least four 2 MiB regions");
    assert!(first.iter().all(|r| r.2 == 0), "one node: {first:?}");
    assert!(snap.vms[0].vcpus[0].telemetry.run_ns_per_node[0] > 0);

    // One half-life later, with no new faults there, the heat has halved.
    snap.now_ns += HEAT_HALF_LIFE_NS;
    src.fill(&mut snap, &Default::default());
    let second = ours(&snap);
    assert_eq!(second.len(), first.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!((a.0, a.1 / 2.0), (b.0, b.1));
    }
    src.track(&[]);
}

#[test]
fn observer_locates_each_guest_cell_of_the_fake_vm() {
    // Two guest cells as libvirt writes them: two RAM backends, two `-numa node`s.
    let name = format!("cells-{}", std::process::id());
    let progress = std::env::temp_dir().join(format!("{name}.progress"));
    let _ = std::fs::remove_file(&progress);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake_qemu"))
        .args([
            "-name",
            &format!("guest={name},debug-threads=on"),
            "-smp",
            "4",
            "-m",
            "64M",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"ram-node0","size":33554432}"#,
            "-numa",
            "node,nodeid=0,cpus=0-1,memdev=ram-node0",
            "-object",
            "memory-backend-ram,id=ram-node1,size=32M",
            "-numa",
            "node,nodeid=1,cpus=2-3,memdev=ram-node1",
            "-lab-phases",
            "0:5",
            "-lab-progress",
        ])
        .arg(&progress)
        .spawn()
        .expect("start fake_qemu");
    let started = std::time::Instant::now();
    while !progress.exists() {
        assert!(
            started.elapsed().as_secs() < 30,
            "fake_qemu never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress).unwrap()).unwrap();
    let mut o = LinuxObserver::new(HostPaths::system(), ObserverConfig::default()).unwrap();
    let s = o.observe().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&progress);
    let vm = s
        .vms
        .iter()
        .find(|v| v.pid == child.id())
        .expect("the fake VM is observed");
    assert_eq!(vm.cells.len(), 2, "{vm:?}");
    for (cell, ram) in vm.cells.iter().zip(report["ram"].as_array().unwrap()) {
        assert_eq!(u64::from(cell.id), ram["cell"].as_u64().unwrap());
        assert_eq!(cell.vcpus, vec![2 * cell.id, 2 * cell.id + 1]);
        // The observer's pick of the cell's mapping is the one the VM made for it.
        assert_eq!(
            cell.addr_range,
            Some((ram["start"].as_u64().unwrap(), 32 * MIB)),
            "cell {}",
            cell.id
        );
        // All of it touched at start-up, on this host's one node.
        assert_eq!(cell.bytes_per_node.iter().sum::<u64>(), 32 * MIB);
    }
}

/// Moves thread `tid` onto CPU `cpu` alone.
fn pin(tid: u32, cpu: usize) {
    vmbalancer_tests::anon::pin_thread(tid, cpu as u32).unwrap();
}

/// The wakes the observer reports within `limit`, waited for with the daemon's own
/// wait between ticks (a tick of `limit`): none when the tick came first.
fn wakes_within(o: &mut LinuxObserver, limit: std::time::Duration) -> Vec<balancer::host::Wake> {
    use balancer::daemon::{run::Shutdown, wake};
    match wake::wait(o, &Shutdown::new(), std::time::Instant::now(), limit, true) {
        wake::Waited::Woken(w) => w,
        _ => Vec::new(),
    }
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn a_vcpu_moved_to_another_node_wakes_the_observer_once_per_observation() {
    use balancer::host::Wake;
    use balancer::host::linux::EbpfTelemetry;
    use balancer::telemetry::{LoadOptions, Telemetry};
    use std::time::Duration;

    vmbalancer_tests::require_root();
    // The programs' CPU-to-node table from a made-up tree where each CPU is a node:
    // moving a thread between two CPUs is then a cross-node move to them.
    let (sys_root, cpus) = vmbalancer_tests::fake_sys::one_node_per_cpu("wake");
    vmbalancer_tests::require(cpus.len() >= 2, "two CPUs to move a thread between");
    let (a, b) = (cpus[0], cpus[1]);
    let telemetry = Telemetry::load_with(&LoadOptions {
        sys_root,
        ..LoadOptions::default()
    })
    .expect("load eBPF telemetry");
    let mut o = LinuxObserver::new(HostPaths::system(), ObserverConfig::default())
        .unwrap()
        .with_telemetry(Box::new(EbpfTelemetry::new(telemetry)));
    let vm = MiniQemu::start("wake");
    let (_, tid) = vm.vcpu_tids()[0];
    // Every thread of the VM on one CPU: any tracked thread the scheduler moved
    // across the made-up nodes would take the one wake of an observation.
    for t in std::fs::read_dir(format!("/proc/{}/task", vm.pid)).unwrap() {
        let t: u32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        pin(t, a);
    }
    // A sleeping thread moves when it next wakes: the main thread within 200 ms.
    std::thread::sleep(Duration::from_millis(500));
    // The first observation finds the VM and tracks its threads.
    o.observe().unwrap();
    // The scheduler's move (here an affinity change by someone else than the
    // balancer) wakes the observer, naming the VM, the thread and both nodes.
    // Each observation arms one wake; other tests' VMs on this host may take one
    // first, so a few rounds are allowed.
    let moved_and_woken = |o: &mut LinuxObserver| {
        for _ in 0..5 {
            o.observe().unwrap();
            let _ = o.take_wakes();
            let on = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid as i32)).unwrap();
            let (from, to) = if on.is_set(a).unwrap() {
                (a, b)
            } else {
                (b, a)
            };
            pin(tid, to);
            let want = Wake::CrossNode {
                vm: vm.pid,
                tid,
                from: from as u32,
                to: to as u32,
            };
            let got = wakes_within(o, Duration::from_secs(2));
            if got.contains(&want) {
                return Ok(());
            }
            eprintln!("want {want:?}, got {got:?}: again");
        }
        Err("no wake for the vCPU's move in 5 observations")
    };
    moved_and_woken(&mut o).unwrap();

    // Until the next observation, more moves wake no one, whoever moves.
    pin(tid, a);
    pin(tid, b);
    let quiet = wakes_within(&mut o, Duration::from_millis(500));
    assert!(
        quiet.iter().all(|w| !matches!(w, Wake::CrossNode { .. })),
        "woken again before observing: {quiet:?}"
    );

    // Observing arms it again.
    moved_and_woken(&mut o).unwrap();
}
