//! Starts and stops the fake VMs, with the cgroups and sysctls around them.
//!
//! VMs go into libvirt-style scopes (`machine.slice/machine-qemu\x2dN\x2dNAME.scope`)
//! so cgroup-aware discovery sees the same layout as on a libvirt host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::emit;
use anyhow::{Context, bail};
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{CgroupMode, Guest, Scenario, VM_HOLD_FILE, VmInstance};
use vmbalancer_tests::lab::truth::NodeInfo;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A started fake VM.
pub struct RunningVm {
    pub name: String,
    pub pid: u32,
    pub vcpus: u32,
    pub progress: PathBuf,
    /// CPUs the VM's threads are confined to once started (empty: all).
    pub cpus: Vec<u32>,
    /// CPUs the VM's threads are moved to once started and then let go from
    /// (`start_cpu_nodes`; empty: none).
    pub start_cpus: Vec<u32>,
    /// Configured guest RAM (`-m`).
    pub memory_bytes: u64,
    /// The share of guest RAM, from its start, that vCPUs touch most.
    pub hot_fraction: f64,
    /// Where the hot set starts (fraction of guest RAM).
    pub hot_offset: f64,
    /// Share (%) of vCPU touches aimed at the hot set.
    pub hot_access_pct: f64,
    pub process: VmProcess,
}

/// What runs a VM: a fake qemu the harness started, or a libvirt domain's qemu.
pub enum VmProcess {
    Fake(Child),
    Domain,
}

impl RunningVm {
    /// Whether the VM's process is still running.
    pub fn alive(&mut self) -> bool {
        match &mut self.process {
            VmProcess::Fake(child) => matches!(child.try_wait(), Ok(None)),
            VmProcess::Domain => crate::domains::running(self.pid),
        }
    }

    /// Why the VM's process ended, if it did.
    fn exit_status(&mut self) -> Option<String> {
        match &mut self.process {
            VmProcess::Fake(child) => child.try_wait().ok().flatten().map(|s| s.to_string()),
            VmProcess::Domain => (!crate::domains::running(self.pid)).then(|| "qemu gone".into()),
        }
    }
}

fn write(path: impl AsRef<Path>, value: &str) -> anyhow::Result<()> {
    let path = path.as_ref();
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn mount(fstype: &str, source: &str, target: &str, options: Option<&str>) -> anyhow::Result<()> {
    fs::create_dir_all(target)?;
    let mut cmd = Command::new("mount");
    cmd.args(["-t", fstype]);
    if let Some(o) = options {
        cmd.args(["-o", o]);
    }
    let status = cmd
        .args([source, target])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mount -t {fstype} {source} {target} failed");
    }
    Ok(())
}

/// Mounts the scenario's cgroup hierarchy and creates `machine.slice`.
pub fn setup_cgroups(mode: CgroupMode) -> anyhow::Result<()> {
    match mode {
        CgroupMode::V2 => {
            mount("cgroup2", "cgroup2", CGROUP_ROOT, None)?;
            write(
                format!("{CGROUP_ROOT}/cgroup.subtree_control"),
                "+cpuset +cpu",
            )?;
            fs::create_dir_all(format!("{CGROUP_ROOT}/machine.slice"))?;
            write(
                format!("{CGROUP_ROOT}/machine.slice/cgroup.subtree_control"),
                "+cpuset +cpu",
            )?;
        }
        CgroupMode::V1Cpuset => {
            mount("tmpfs", "cgroup", CGROUP_ROOT, None)?;
            let dir = format!("{CGROUP_ROOT}/cpuset");
            mount("cgroup", "cpuset", &dir, Some("cpuset"))?;
            make_v1_cpuset(&dir, "machine.slice")?;
        }
    }
    Ok(())
}

/// v1 cpusets start empty: copy the parent's CPUs and memory nodes.
fn make_v1_cpuset(parent: &str, child: &str) -> anyhow::Result<String> {
    let dir = format!("{parent}/{child}");
    fs::create_dir_all(&dir)?;
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let v = fs::read_to_string(format!("{parent}/{f}"))?;
        write(format!("{dir}/{f}"), v.trim())?;
    }
    Ok(dir)
}

fn scope_name(vm: &VmInstance) -> String {
    format!("machine-qemu\\x2d{}\\x2d{}.scope", vm.id, vm.name)
}

fn join_cgroup(mode: CgroupMode, vm: &VmInstance, pid: u32) -> anyhow::Result<()> {
    let dir = match mode {
        CgroupMode::V2 => {
            let d = format!("{CGROUP_ROOT}/machine.slice/{}", scope_name(vm));
            fs::create_dir_all(&d)?;
            d
        }
        CgroupMode::V1Cpuset => make_v1_cpuset(
            &format!("{CGROUP_ROOT}/cpuset/machine.slice"),
            &scope_name(vm),
        )?,
    };
    write(format!("{dir}/cgroup.procs"), &pid.to_string())
}

fn sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    write(format!("/proc/sys/{}", path.replace('.', "/")), value)
}

/// Turns automatic NUMA balancing off (balancers turn it on), applies the
/// scenario's sysctls and reserves huge pages for hugetlb-backed VMs.
pub fn setup_sysctls(scenario: &Scenario, nodes: &[NodeInfo]) -> anyhow::Result<()> {
    sysctl("kernel.numa_balancing", "0")?;
    for (k, v) in &scenario.sysctl {
        sysctl(k, v)?;
    }
    let Some(page_bytes) = scenario.huge_page_bytes() else {
        return Ok(());
    };
    if scenario.guest == Guest::Stack
        || page_bytes != TWO_MIB
        || !scenario.free_huge_pages_per_node.is_empty()
    {
        return reserve_hugepages_per_vm_node(scenario, nodes, page_bytes);
    }
    let huge_mib: u64 = scenario
        .instances()
        .iter()
        .filter(|v| v.spec.hugetlb)
        .map(|v| v.spec.memory_mib.div_ceil(2) * 2)
        .sum();
    if huge_mib > 0 {
        // Enough on every node for any placement, within each node's 2 GiB.
        let per_node = (huge_mib / 2).min(768);
        for n in nodes {
            write(hugepages_path(n.id, TWO_MIB), &per_node.to_string())?;
        }
    }
    Ok(())
}

const TWO_MIB: u64 = 2 << 20;

/// The pool of `page_bytes` huge pages of node `id` in sysfs.
fn hugepages_path(id: u32, page_bytes: u64) -> String {
    format!(
        "/sys/devices/system/node/node{id}/hugepages/hugepages-{}kB/nr_hugepages",
        page_bytes >> 10
    )
}

/// Each huge-page VM's pages reserved on its `node`, plus the scenario's
/// `free_huge_pages_per_node`, and nothing else in that page size's pools.
///
/// Stack guest: every other node's pool empty, so qemu's preallocation at start takes
/// the pages on the VM's node whatever CPU its allocating threads run on (see
/// `domains`); a scenario makes pages free elsewhere afterwards (a `with_vms` command
/// writing the same files). 1 GiB pages: a pool can shrink at runtime but seldom
/// grow (1 GiB of free contiguous memory on a node whose kernel memory is scattered:
/// the lab's nodes never had it), so the scenario reserves them at boot
/// (`kernel_args`) and this trims the pools to what it asks and fails, naming the
/// node, where the boot reserved too few.
fn reserve_hugepages_per_vm_node(
    scenario: &Scenario,
    nodes: &[NodeInfo],
    page_bytes: u64,
) -> anyhow::Result<()> {
    let page_mib = page_bytes >> 20;
    let mut pages = vec![0u64; nodes.len()];
    for vm in scenario.instances().iter().filter(|v| v.spec.hugetlb) {
        let i = nodes
            .iter()
            .position(|n| n.id == vm.spec.node)
            .with_context(|| format!("VM {}: no node {}", vm.name, vm.spec.node))?;
        pages[i] += vm.spec.memory_mib.div_ceil(page_mib);
    }
    for (i, free) in scenario.free_huge_pages_per_node.iter().enumerate() {
        let slot = pages
            .get_mut(i)
            .with_context(|| format!("free_huge_pages_per_node: no node index {i}"))?;
        *slot += free;
    }
    if pages.iter().all(|&p| p == 0) {
        return Ok(());
    }
    for (n, want) in nodes.iter().zip(&pages) {
        let path = hugepages_path(n.id, page_bytes);
        write(&path, &want.to_string())?;
        let got: u64 = std::fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
        if got != *want {
            anyhow::bail!(
                "node {}: {got} huge pages of {page_mib} MiB reserved, {want} asked",
                n.id
            );
        }
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "{page_mib} MiB huge pages reserved per node before the VMs start: {pages:?}"
        ),
    });
    Ok(())
}

fn qemu_args(vm: &VmInstance, progress: &Path, hold: bool) -> Vec<String> {
    let s = &vm.spec;
    let phases: Vec<String> = s
        .phases
        .iter()
        .map(|p| format!("{}:{}", p.at_s, p.duty_pct))
        .collect();
    let mut args: Vec<String> = vec![
        "-name".into(),
        if s.debug_threads {
            format!("guest={},debug-threads=on", vm.name)
        } else {
            format!("guest={}", vm.name)
        },
        "-machine".into(),
        "pc-q35-7.2,accel=kvm".into(),
        "-smp".into(),
        format!("{},sockets=1,cores={},threads=1", s.vcpus, s.vcpus),
        "-m".into(),
        format!("{}M", s.memory_mib),
        "-uuid".into(),
        format!("00000000-0000-4000-8000-{:012x}", vm.id),
        "-nodefaults".into(),
        "-lab-placement".into(),
        s.placement.name().into(),
        "-lab-node".into(),
        s.node.to_string(),
        "-lab-chunk-mib".into(),
        s.chunk_mib.to_string(),
        "-lab-hot-fraction".into(),
        s.hot_fraction.to_string(),
        "-lab-hot-offset".into(),
        s.hot_offset.to_string(),
        "-lab-hot-pct".into(),
        s.hot_access_pct.to_string(),
        "-lab-phases".into(),
        phases.join(","),
        "-lab-progress".into(),
        progress.display().to_string(),
    ];
    // Guest NUMA cells as libvirt writes `<cpu><numa><cell .../>` for qemu: a RAM
    // backend per cell (JSON -object, as libvirt does for current qemu) and a
    // `-numa node` naming it.
    let per_cell_vcpus = s.vcpus / s.cells.max(1);
    for c in 0..s.cells {
        let bytes = (s.memory_mib << 20) / u64::from(s.cells);
        args.push("-object".into());
        args.push(format!(
            r#"{{"qom-type":"memory-backend-ram","id":"ram-node{c}","size":{bytes}}}"#
        ));
        let first = c * per_cell_vcpus;
        args.push("-numa".into());
        args.push(format!(
            "node,nodeid={c},cpus={first}-{},memdev=ram-node{c}",
            first + per_cell_vcpus - 1
        ));
    }
    if s.hugetlb {
        args.push("-lab-hugetlb".into());
        args.push("-lab-hugetlb-page-mib".into());
        args.push(s.hugetlb_page_mib.to_string());
    }
    if s.small_pages {
        args.push("-lab-small-pages".into());
    }
    if hold {
        args.push("-lab-hold".into());
        args.push(VM_HOLD_FILE.into());
    }
    if !s.same_content.is_empty() {
        args.push("-lab-same-content".into());
        args.push(format!("{}:{}", s.same_content, s.same_content_fraction));
    }
    args.extend(s.qemu_args.iter().map(|a| a.replace("{name}", &vm.name)));
    args
}

/// Starts every VM of the scenario as `/usr/bin/qemu-kvm` (the fake VM).
pub fn start_all(scenario: &Scenario, nodes: &[NodeInfo]) -> anyhow::Result<Vec<RunningVm>> {
    fs::create_dir_all("/run/lab")?;
    let hold = scenario
        .ksm
        .as_ref()
        .is_some_and(|k| k.idle_vms_while_merging);
    if hold {
        fs::write(VM_HOLD_FILE, b"").context("creating the VMs' hold file")?;
    }
    scenario
        .instances()
        .iter()
        .map(|vm| start_one(scenario, nodes, vm, hold))
        .collect()
}

/// Starts one fake VM; with `hold`, idle while [`VM_HOLD_FILE`] exists.
pub fn start_one(
    scenario: &Scenario,
    nodes: &[NodeInfo],
    vm: &VmInstance,
    hold: bool,
) -> anyhow::Result<RunningVm> {
    let progress = PathBuf::from(format!("/run/lab/{}.progress", vm.name));
    let _ = fs::remove_file(&progress);
    let cpus_of = |ids: &[u32]| -> anyhow::Result<Vec<u32>> {
        let cpus: Vec<u32> = nodes
            .iter()
            .filter(|n| ids.contains(&n.id))
            .flat_map(|n| n.cpus.iter().copied())
            .collect();
        if !ids.is_empty() && cpus.is_empty() {
            bail!("VM {}: no CPUs on nodes {ids:?}", vm.name);
        }
        Ok(cpus)
    };
    let cpus = cpus_of(&vm.spec.cpu_nodes)?;
    let start_cpus = cpus_of(&vm.spec.start_cpu_nodes)?;
    let mut cmd = Command::new("/usr/bin/qemu-kvm");
    let child = cmd
        .args(qemu_args(vm, &progress, hold))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting fake VM {}", vm.name))?;
    let pid = child.id();
    if vm.spec.cgroup {
        join_cgroup(scenario.cgroup, vm, pid)?;
    }
    Ok(RunningVm {
        name: vm.name.clone(),
        pid,
        vcpus: vm.spec.vcpus,
        progress,
        cpus,
        start_cpus,
        memory_bytes: vm.spec.memory_mib << 20,
        hot_fraction: vm.spec.hot_fraction,
        hot_offset: vm.spec.hot_offset,
        hot_access_pct: vm.spec.hot_access_pct,
        process: VmProcess::Fake(child),
    })
}

/// Waits until every VM placed its memory (its progress file appeared); fails
/// at once if a VM exited (e.g. no huge pages for a hugetlb VM).
pub fn wait_ready(vms: &mut [RunningVm], limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        for vm in vms.iter_mut() {
            if let Some(status) = vm.exit_status() {
                bail!(
                    "VM {} exited during start-up ({status}); see its message above",
                    vm.name
                );
            }
        }
        let waiting: Vec<&str> = vms
            .iter()
            .filter(|v| !v.progress.exists())
            .map(|v| v.name.as_str())
            .collect();
        if waiting.is_empty() {
            crate::emit(&vmbalancer_tests::lab::protocol::Record::Event {
                source: "harness".into(),
                text: format!(
                    "{} VMs placed their memory in {:.1} s",
                    vms.len(),
                    start.elapsed().as_secs_f64()
                ),
            });
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("VMs {waiting:?} did not place their memory within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets every thread of each VM with `cpu_nodes` to those nodes' CPUs. Done once the
/// VMs are ready (their vCPU threads exist) and after they joined their cgroups:
/// attaching a task to a cpuset resets its affinity to the cpuset's CPUs.
///
/// A VM with `start_cpu_nodes` is held on those nodes' CPUs the same way until
/// [`let_go`], so the `with_vms` commands (`vmbalancer trace`) and the t = 0 sample
/// see it running there.
pub fn confine(vms: &[RunningVm]) -> anyhow::Result<()> {
    for vm in vms.iter().filter(|v| !v.cpus.is_empty()) {
        set_affinity(vm, &vm.cpus)?;
        crate::emit(&vmbalancer_tests::lab::protocol::Record::Event {
            source: "harness".into(),
            text: format!("{} confined to CPUs {:?}", vm.name, vm.cpus),
        });
    }
    for vm in vms.iter().filter(|v| !v.start_cpus.is_empty()) {
        set_affinity(vm, &vm.start_cpus)?;
        crate::emit(&vmbalancer_tests::lab::protocol::Record::Event {
            source: "harness".into(),
            text: format!(
                "{} held on CPUs {:?} until the balancer starts",
                vm.name, vm.start_cpus
            ),
        });
    }
    Ok(())
}

/// Lets the VMs with `start_cpu_nodes` go, right before the balancer starts: their
/// affinity back to every CPU of `nodes`. Widening a running thread's affinity does
/// not move it, so each goes on where it was held until the scheduler or the
/// balancer moves it, and no balancer meets a confined VM.
pub fn let_go(vms: &[RunningVm], nodes: &[NodeInfo]) -> anyhow::Result<()> {
    let all: Vec<u32> = nodes.iter().flat_map(|n| n.cpus.iter().copied()).collect();
    for vm in vms.iter().filter(|v| !v.start_cpus.is_empty()) {
        set_affinity(vm, &all)?;
        crate::emit(&vmbalancer_tests::lab::protocol::Record::Event {
            source: "harness".into(),
            text: format!("{} let go from CPUs {:?}", vm.name, vm.start_cpus),
        });
    }
    Ok(())
}

/// Sets the affinity of every thread of `vm` to `cpus`.
fn set_affinity(vm: &RunningVm, cpus: &[u32]) -> anyhow::Result<()> {
    let set: balancer::model::CpuSet = cpus.iter().copied().collect();
    for tid in balancer::host::linux::procfs::list_tasks(Path::new("/proc"), vm.pid)? {
        balancer::host::linux::actuate::sys::set_affinity(tid, &set)
            .with_context(|| format!("VM {}: sched_setaffinity of thread {tid}", vm.name))?;
    }
    Ok(())
}

pub fn stop_all(vms: Vec<RunningVm>) {
    for vm in vms {
        match vm.process {
            VmProcess::Fake(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            VmProcess::Domain => crate::domains::destroy(&vm.name),
        }
    }
}
