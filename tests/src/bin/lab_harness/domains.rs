//! The stack guest's VMs: libvirt domains of real qemu running the lab's guest
//! payload (tests/guest/payload.c), defined and started as an operator would
//! (`virsh define` of a domain XML without pinning, `virsh start`), the starts in
//! parallel because each costs tens of seconds under emulation. Defined, not
//! transient: a scenario may destroy a domain and start it again. A VM group with
//! `cpu_nodes` is the exception: its domain XML carries the operator's pins
//! ([`pinning_xml`]), so libvirt itself binds it, as it would on a host.
//!
//! The rest of the harness knows VMs by their progress file (`vms::RunningVm`):
//! written by the fake VM itself in the busybox guest. A real guest cannot write
//! host files, so a relay thread per domain reads the payload's state block from
//! guest RAM (`/proc/PID/mem` at the guest RAM mapping + `STATE_GPA`) and writes the
//! same progress file once the payload has first-touched its RAM. Everything
//! downstream (readiness, touches per interval, the sampler) is then shared.
//!
//! Guest NUMA cells (`cells > 0`): the domain XML gives libvirt `<cpu><numa><cell/>`,
//! so qemu backs each cell with a RAM backend of its own, one host mapping each.
//! Those anonymous mappings are alike but for their content: the payload marks each
//! cell's base + `STATE_GPA` (the state block in cell 0, `CELL_MAGIC` and the cell's
//! id in the others), and [`ram_parts`] tells the mappings apart by reading there.
//! The relay reports them as the fake VM does (its progress file's `ram` list), so
//! the sampler judges each cell on its own, from the harness's own reading, not
//! from how vmbalancer located them.
//!
//! Initial placement ([`place`]): the payload first-touches its RAM wherever the
//! kernel puts it; the harness then moves the pages to the scenario's placement
//! with move_pages(2) (round-robin chunks for `scattered`), which leaves no memory
//! policy, cpuset or affinity behind that a balancer could mistake for an operator's
//! choice. A domain backed by huge pages (`hugetlb = true`) is placed the way seed
//! 002's guest was: qemu preallocates its huge pages at start, and they come from
//! the node pools that have free pages then. The harness reserves them only on the
//! VM's `node` before the start (`vms::setup_sysctls`) and moves nothing after, so
//! the kernel's own allocation decides, not a move_pages call. A domain with
//! `auto_placement = true` is placed by libvirt itself: `placement='auto'` makes it
//! run its `numad -w` helper at the start and bind the VM's CPUs and memory (strict)
//! to the advised nodes; its placement stays `default`, so nothing moves it either.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{BusyVcpus, Placement, Scenario, VmInstance, VmSpec};
use vmbalancer_tests::lab::truth::{self, NodeInfo};

use crate::emit;
use crate::vms::{RunningVm, VmProcess};

/// The domain template and the payload, as the image carries them.
const TEMPLATE: &str = "/lab/stack/domain.xml.in";
pub const PAYLOAD: &str = "/var/lib/libvirt/images/vmblab-payload.elf";
/// Where the payload keeps its state block (guest-physical; payload.c STATE_GPA),
/// and where each further guest cell keeps its marker (at the cell's base + this).
const STATE_GPA: u64 = 0x20_0000;
const STATE_MAGIC: u32 = 0x564d_424c;
const CELL_MAGIC: u32 = 0x4c4c_4543;
/// The state block's per-vCPU write counters (payload.c `cpu_touches`, one per
/// possible vCPU), and its duty cycle word after them, which the harness writes.
const CPU_TOUCHES_AT: usize = 32;
const DUTY_AT: usize = CPU_TOUCHES_AT + 8 * BusyVcpus::MAX_ALL as usize;
const STATE_BYTES: usize = DUTY_AT + 4;

/// When the balancer started: the domains' load phases count from here (see
/// `VmSpec::phases`). Unset, every domain keeps its first phase.
static PHASE_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Starts the domains' load phases (at the balancer's start, t = 0).
pub fn start_phases() {
    let _ = PHASE_EPOCH.set(Instant::now());
}

/// The duty cycle (whole %, 1..=100) of a domain with `phases` now.
fn duty_now(phases: &[vmbalancer_tests::lab::scenario::Phase]) -> u32 {
    let t_s = PHASE_EPOCH.get().map_or(0.0, |e| e.elapsed().as_secs_f64());
    let duty = vmbalancer_tests::lab::scenario::duty_pct_at(
        phases.iter().map(|p| (p.at_s, p.duty_pct)),
        t_s,
    );
    (duty.round() as u32).clamp(1, 100)
}

/// Writes the payload's duty cycle word (the state block is in the mapping at
/// `ram_start`).
fn write_duty(pid: u32, ram_start: u64, duty_pct: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    mem.seek(SeekFrom::Start(ram_start + STATE_GPA + DUTY_AT as u64))?;
    mem.write_all(&duty_pct.to_le_bytes())
}

/// Whether process `pid` exists and is not a zombie (the state after the comm's
/// closing parenthesis).
pub fn running(pid: u32) -> bool {
    balancer::host::linux::procfs::read_stat(Path::new("/proc"), pid).is_ok_and(|s| s.state != 'Z')
}

/// The payload's command line for `vm`.
fn cmdline(vm: &VmInstance) -> String {
    let s = &vm.spec;
    let duty = duty_at_start(&s.phases);
    let mut line = format!(
        "ram_mib={} hot_permille={} hot_offset_permille={} hot_access_pct={} duty_pct={}",
        s.memory_mib,
        (s.hot_fraction * 1000.0).round() as u32,
        (s.hot_offset * 1000.0).round() as u32,
        s.hot_access_pct.round() as u32,
        duty
    );
    if s.busy_vcpus == BusyVcpus::All {
        line.push_str(&format!(" cpus={}", s.vcpus));
    }
    if s.cells > 0 {
        line.push_str(&format!(" cells={}", s.cells));
    }
    line
}

/// A domain's duty cycle before the balancer starts: its first phase's.
fn duty_at_start(phases: &[vmbalancer_tests::lab::scenario::Phase]) -> u32 {
    phases
        .first()
        .map_or(100, |p| (p.duty_pct.round() as u32).clamp(1, 100))
}

/// libvirt's guest NUMA cells for a VM with `cells`: `<cpu><numa>` with one `<cell>`
/// per cell, vCPUs and memory split evenly in order (empty without cells).
fn cells_xml(spec: &VmSpec) -> String {
    if spec.cells == 0 {
        return String::new();
    }
    let per_cell_vcpus = spec.vcpus / spec.cells;
    let cell_mib = spec.memory_mib / u64::from(spec.cells);
    let mut xml = String::from("<cpu><numa>");
    for c in 0..spec.cells {
        let first = c * per_cell_vcpus;
        xml.push_str(&format!(
            "<cell id='{c}' cpus='{first}-{}' memory='{cell_mib}' unit='MiB'/>",
            first + per_cell_vcpus - 1
        ));
    }
    xml.push_str("</numa></cpu>");
    xml
}

/// libvirt's huge page backing for a VM with `hugetlb = true`: guest RAM on hugetlbfs
/// in 2 MiB pages, allocated when qemu starts (`prealloc`), from the pools the harness
/// reserved per node (see `vms::setup_sysctls`).
const HUGEPAGES_BACKING: &str = "<memoryBacking><hugepages><page size='2048' unit='KiB'/>\
                                 </hugepages><allocation mode='immediate'/></memoryBacking>";

/// libvirt's automatic placement for a VM with `auto_placement = true`: the `<vcpu>`
/// attribute and the `<numatune>` element (strict: memory only on the advised nodes).
const AUTO_VCPU_PLACEMENT: &str = " placement='auto'";
const AUTO_NUMATUNE: &str = "<numatune><memory mode='strict' placement='auto'/></numatune>";

/// The operator's pins for a VM with `cpu_nodes`, as an operator writes them for
/// libvirt: each vCPU pinned to one CPU of those nodes in turn (`<vcpupin>`, one to
/// one while there are CPUs enough), the emulator threads to all of them
/// (`<emulatorpin>`), and guest memory bound to the nodes
/// (`<numatune><memory mode='strict'>`: libvirt sets the cgroup's `cpuset.mems`, so
/// the first touch already lands there). Empty without `cpu_nodes`.
pub fn pinning_xml(vm: &VmInstance, nodes: &[NodeInfo]) -> anyhow::Result<String> {
    let wanted = &vm.spec.cpu_nodes;
    if wanted.is_empty() {
        return Ok(String::new());
    }
    let cpus: Vec<u32> = nodes
        .iter()
        .filter(|n| wanted.contains(&n.id))
        .flat_map(|n| n.cpus.iter().copied())
        .collect();
    if cpus.is_empty() {
        bail!("VM {}: no CPUs on nodes {wanted:?}", vm.name);
    }
    let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut xml = String::from("<cputune>");
    for v in 0..vm.spec.vcpus {
        let cpu = cpus[v as usize % cpus.len()];
        xml.push_str(&format!("<vcpupin vcpu='{v}' cpuset='{cpu}'/>"));
    }
    xml.push_str(&format!(
        "<emulatorpin cpuset='{}'/></cputune><numatune><memory mode='strict' nodeset='{}'/></numatune>",
        list(&cpus),
        list(wanted)
    ));
    Ok(xml)
}

/// The domain XML of `vm` from `template`; `pinning` from [`pinning_xml`].
pub fn domain_xml(template: &str, vm: &VmInstance, pinning: &str) -> String {
    let backing = if vm.spec.hugetlb {
        HUGEPAGES_BACKING
    } else {
        ""
    };
    let (vcpu_placement, numatune) = if vm.spec.auto_placement {
        (AUTO_VCPU_PLACEMENT, AUTO_NUMATUNE)
    } else {
        ("", "")
    };
    template
        .replace("@MEMORY_BACKING@", backing)
        .replace("@VCPU_PLACEMENT@", vcpu_placement)
        .replace("@NUMATUNE@", numatune)
        .replace("@PINNING@", pinning)
        .replace("@CPU@", &cells_xml(&vm.spec))
        .replace("@NAME@", &vm.name)
        .replace("@MEMORY_MIB@", &vm.spec.memory_mib.to_string())
        .replace("@VCPUS@", &vm.spec.vcpus.to_string())
        .replace("@KERNEL@", PAYLOAD)
        .replace("@CMDLINE@", &cmdline(vm))
}

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh")
        .args(args)
        .output()
        .context("running virsh")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pid of running domain `name` (libvirt's pid file).
pub fn domain_pid(name: &str) -> anyhow::Result<u32> {
    let path = format!("/run/libvirt/qemu/{name}.pid");
    fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {path}"))
}

/// Defines every VM of the scenario (`virsh define`: persistent, so a destroyed
/// domain can be started again, as an operator's can) and starts them in parallel
/// (`virsh start`); returns them once libvirt reports each running.
pub fn start_all(scenario: &Scenario, nodes: &[NodeInfo]) -> anyhow::Result<Vec<RunningVm>> {
    let template = fs::read_to_string(TEMPLATE).with_context(|| format!("reading {TEMPLATE}"))?;
    fs::create_dir_all("/run/lab")?;
    let start = Instant::now();
    let instances = scenario.instances();
    for vm in &instances {
        let xml = PathBuf::from(format!("/run/lab/{}.xml", vm.name));
        fs::write(&xml, domain_xml(&template, vm, &pinning_xml(vm, nodes)?))?;
        virsh(&["define", &xml.to_string_lossy()])?;
    }
    let mut children = Vec::new();
    for vm in &instances {
        let name = vm.name.clone();
        children.push(std::thread::spawn(move || {
            Command::new("virsh").arg("start").arg(&name).output()
        }));
    }
    let mut out = Vec::new();
    for (vm, child) in instances.iter().zip(children) {
        let o = child
            .join()
            .map_err(|_| anyhow::anyhow!("virsh thread panicked"))?
            .context("running virsh start")?;
        if !o.status.success() {
            bail!(
                "virsh start {}: {}",
                vm.name,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let pid = domain_pid(&vm.name)?;
        let progress = PathBuf::from(format!("/run/lab/{}.progress", vm.name));
        let _ = fs::remove_file(&progress);
        let memory_bytes = vm.spec.memory_mib << 20;
        spawn_relay(pid, vm.spec.clone(), progress.clone());
        out.push(RunningVm {
            name: vm.name.clone(),
            pid,
            vcpus: vm.spec.vcpus,
            progress,
            cpus: Vec::new(),
            start_cpus: Vec::new(),
            memory_bytes,
            hot_fraction: vm.spec.hot_fraction,
            hot_offset: vm.spec.hot_offset,
            hot_access_pct: vm.spec.hot_access_pct,
            process: VmProcess::Domain,
        });
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "{} libvirt domains started in {:.1} s",
            out.len(),
            start.elapsed().as_secs_f64()
        ),
    });
    Ok(out)
}

/// The payload's state block, read from the mapping of the VM's cell 0 (or of all
/// its RAM): whether it is ready, and the writes of each of its `vcpus` vCPUs.
fn read_state(pid: u32, ram_start: u64, vcpus: u32) -> Option<(bool, Vec<u64>)> {
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    mem.seek(SeekFrom::Start(ram_start + STATE_GPA)).ok()?;
    let mut buf = [0u8; STATE_BYTES];
    mem.read_exact(&mut buf).ok()?;
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap_or_default());
    if word(0) != STATE_MAGIC {
        return None;
    }
    let touches = (0..(vcpus.clamp(1, BusyVcpus::MAX_ALL) as usize))
        .map(|i| {
            let at = CPU_TOUCHES_AT + 8 * i;
            u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default())
        })
        .collect();
    Some((word(4) == 1, touches))
}

/// One host mapping of a domain's guest RAM: all of it, or one guest cell's, with
/// the vCPU indexes that work in it.
#[derive(Debug, Clone, PartialEq)]
pub struct RamPart {
    pub cell: Option<u32>,
    pub start: u64,
    pub len: u64,
    pub vcpus: Vec<u32>,
}

/// Where qemu `pid` maps the guest RAM of a VM of `spec`, in guest-physical order
/// (the first part holds the state block): the mapping of its configured size, or
/// one per guest cell told apart by the payload's markers (module doc). `None`
/// until every part is found.
pub fn ram_parts(pid: u32, spec: &VmSpec) -> Option<Vec<RamPart>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let memory_bytes = spec.memory_mib << 20;
    if spec.cells == 0 {
        let (start, len) = truth::guest_ram_mapping(&maps, memory_bytes).ok()?;
        return Some(vec![RamPart {
            cell: None,
            start,
            len,
            vcpus: (0..spec.vcpus).collect(),
        }]);
    }
    let cell_bytes = memory_bytes / u64::from(spec.cells);
    let mut found: Vec<Option<u64>> = vec![None; spec.cells as usize];
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    for start in truth::ram_mappings_of(&maps, cell_bytes).ok()? {
        let mut buf = [0u8; 8];
        if mem.seek(SeekFrom::Start(start + STATE_GPA)).is_err()
            || mem.read_exact(&mut buf).is_err()
        {
            continue;
        }
        let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap_or_default());
        let cell = match word(0) {
            STATE_MAGIC => 0,
            CELL_MAGIC => word(4),
            _ => continue,
        };
        if let Some(slot) = found.get_mut(cell as usize) {
            *slot = Some(start);
        }
    }
    let per_cell_vcpus = spec.vcpus / spec.cells;
    found
        .into_iter()
        .zip(0u32..)
        .map(|(start, c)| {
            Some(RamPart {
                cell: Some(c),
                start: start?,
                len: cell_bytes,
                vcpus: (c * per_cell_vcpus..(c + 1) * per_cell_vcpus).collect(),
            })
        })
        .collect()
}

/// Relays the payload's state to `progress` every 250 ms while qemu runs, in the
/// fake VM's format (`{"t_s": when the state was read, "touches": [per vCPU],
/// "ram": [{"cell", "start", "len", "vcpus"}]}`; with `busy_vcpus = "boot"` only the
/// boot vCPU's count grows), and writes the domain's load phases into the payload as
/// they come due.
fn spawn_relay(pid: u32, spec: VmSpec, progress: PathBuf) {
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let mut parts: Option<Vec<RamPart>> = None;
        let mut duty = duty_at_start(&spec.phases);
        while running(pid) {
            if parts.is_none() {
                parts = ram_parts(pid, &spec);
            }
            if let Some(parts) = &parts {
                let due = duty_now(&spec.phases);
                if due != duty {
                    match write_duty(pid, parts[0].start, due) {
                        Ok(()) => duty = due,
                        Err(e) => emit(&Record::Event {
                            source: "harness".into(),
                            text: format!("pid {pid}: writing the duty cycle {due} %: {e}"),
                        }),
                    }
                }
            }
            if let Some(parts) = &parts
                && let Some((true, touches)) = read_state(pid, parts[0].start, spec.vcpus)
            {
                let ram: Vec<serde_json::Value> = parts
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "cell": p.cell, "start": p.start, "len": p.len, "vcpus": p.vcpus,
                        })
                    })
                    .collect();
                let text = serde_json::json!({
                    "t_s": start.elapsed().as_secs_f64(),
                    "touches": touches,
                    "ram": ram,
                })
                .to_string();
                let tmp = progress.with_extension("tmp");
                if fs::write(&tmp, text).is_ok() {
                    let _ = fs::rename(&tmp, &progress);
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
}

/// The node page `i` of a VM's guest RAM goes to under `placement`, if any.
fn target_node(
    placement: Placement,
    node: u32,
    chunk_pages: u64,
    n_nodes: usize,
    i: u64,
) -> Option<i32> {
    match placement {
        Placement::Default => None,
        Placement::Node => Some(node as i32),
        Placement::Scattered => Some(((i / chunk_pages.max(1)) % n_nodes as u64) as i32),
        Placement::Interleave => Some((i % n_nodes as u64) as i32),
    }
}

/// Moves each VM's resident guest RAM to its scenario placement (see the module
/// doc), VMs in parallel.
pub fn place(scenario: &Scenario, vms: &[RunningVm], nodes: &[NodeInfo]) -> anyhow::Result<()> {
    let start = Instant::now();
    let instances = scenario.instances();
    // Where each domain's guest RAM is mapped, read once for the placement and the
    // description after it (placing moves pages, not mappings).
    let vm_parts: Vec<Option<Vec<RamPart>>> = vms
        .iter()
        .zip(&instances)
        .map(|(vm, i)| ram_parts(vm.pid, &i.spec))
        .collect();
    let mut jobs = Vec::new();
    for ((vm, spec), parts) in vms.iter().zip(&instances).zip(&vm_parts) {
        let spec = spec.spec.clone();
        // Huge pages are placed by where they were free when qemu preallocated them
        // (`vms::setup_sysctls` reserves them per node before the start), as on a
        // host: nothing moves them afterwards.
        if spec.placement == Placement::Default || spec.hugetlb {
            continue;
        }
        // Each part (all of guest RAM, or each cell's) is placed on its own, as the
        // fake VM places each cell's mapping.
        let parts = parts
            .as_ref()
            .with_context(|| format!("VM {}: guest RAM mappings not found", vm.name))?;
        for part in parts {
            let chunk_pages = (spec.chunk_mib << 20) / 4096;
            let n_nodes = nodes.len();
            let pid = vm.pid;
            let name = vm.name.clone();
            let (ram_start, pages) = (part.start, part.len / 4096);
            jobs.push(std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut moved = 0u64;
                const BATCH: u64 = 4096;
                for first in (0..pages).step_by(BATCH as usize) {
                    let n = BATCH.min(pages - first);
                    let mut addrs = Vec::with_capacity(n as usize);
                    let mut targets = Vec::with_capacity(n as usize);
                    for i in first..first + n {
                        if let Some(t) =
                            target_node(spec.placement, spec.node, chunk_pages, n_nodes, i)
                        {
                            addrs.push(ram_start + i * 4096);
                            targets.push(t);
                        }
                    }
                    let mut status = vec![0; addrs.len()];
                    if let Err(e) = balancer::host::linux::actuate::sys::move_pages_all(
                        pid,
                        &addrs,
                        Some(&targets),
                        &mut status,
                    ) {
                        bail!("VM {name}: move_pages: {e}");
                    }
                    moved += status.iter().filter(|&&s| s >= 0).count() as u64;
                }
                Ok(moved)
            }));
        }
    }
    let mut pages = 0;
    for j in jobs {
        pages += j
            .join()
            .map_err(|_| anyhow::anyhow!("placement thread panicked"))??;
    }
    for (vm, parts) in vms.iter().zip(&vm_parts) {
        describe(vm, parts.as_deref().unwrap_or_default(), nodes.len());
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "guest RAM of {} domains placed ({pages} pages) in {:.1} s",
            vms.len(),
            start.elapsed().as_secs_f64()
        ),
    });
    Ok(())
}

/// Reports where a domain's guest RAM lies and how its threads may run: the
/// ground truth a reader of the run needs to trust the placement.
fn describe(vm: &RunningVm, parts: &[RamPart], n_nodes: usize) {
    let root = Path::new("/");
    let numa_maps = truth::read_numa_maps(root, vm.pid).unwrap_or_default();
    let ram: Vec<String> = parts
        .iter()
        .map(|p| {
            let per_node = truth::numa_maps_mapping_bytes_per_node(&numa_maps, p.start, n_nodes)
                .map(|b| b.iter().map(|x| x >> 20).collect::<Vec<_>>());
            let cell = p.cell.map_or_else(String::new, |c| format!("cell {c} "));
            format!(
                "{cell}mapping {:#x}+{:#x}, MiB per node {per_node:?}",
                p.start, p.len
            )
        })
        .collect();
    let threads: Vec<String> = truth::vcpu_threads(root, vm.pid)
        .unwrap_or_default()
        .iter()
        .map(|&(tid, idx)| {
            format!(
                "vCPU{idx}=tid {tid} allowed {}",
                truth::read_cpus_allowed(root, vm.pid, tid)
                    .map_or_else(|e| e.to_string(), |c| c.to_string())
            )
        })
        .collect();
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "{} pid {}: guest RAM {}; {}",
            vm.name,
            vm.pid,
            ram.join("; "),
            threads.join(", ")
        ),
    });
}

/// Ends domain `name` (`virsh destroy`), reporting a failure as an event.
pub fn destroy(name: &str) {
    if let Err(e) = virsh(&["destroy", name]) {
        emit(&Record::Event {
            source: "harness".into(),
            text: format!("{e:#}"),
        });
    }
}

/// Whether `path` is readable by others (qemu runs as libvirt-qemu).
pub fn check_payload() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        fs::metadata(Path::new(PAYLOAD)).with_context(|| format!("no guest payload {PAYLOAD}"))?;
    if meta.permissions().mode() & 0o004 == 0 {
        bail!("{PAYLOAD} is not readable by the qemu user");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_chunks_go_round_robin() {
        let at = |i| target_node(Placement::Scattered, 0, 1024, 4, i);
        assert_eq!(at(0), Some(0));
        assert_eq!(at(1023), Some(0));
        assert_eq!(at(1024), Some(1));
        assert_eq!(at(4 * 1024), Some(0));
        assert_eq!(target_node(Placement::Default, 0, 1024, 4, 5), None);
        assert_eq!(target_node(Placement::Node, 2, 1024, 4, 5), Some(2));
    }

    #[test]
    fn template_is_filled() {
        let vm = VmInstance {
            id: 1,
            name: "vm1".into(),
            spec: Default::default(),
        };
        let xml = domain_xml(
            "<name>@NAME@</name><m>@MEMORY_MIB@</m><c>@CMDLINE@</c>",
            &vm,
            "",
        );
        assert!(xml.contains("<name>vm1</name>"), "{xml}");
        assert!(xml.contains("<m>256</m>"), "{xml}");
        assert!(
            xml.contains("hot_permille=250 hot_offset_permille=0 hot_access_pct=95"),
            "{xml}"
        );
        let template = "<memory>@MEMORY_MIB@</memory>@MEMORY_BACKING@<vcpu>";
        assert_eq!(domain_xml(template, &vm, ""), "<memory>256</memory><vcpu>");
        let huge = VmInstance {
            spec: VmSpec {
                hugetlb: true,
                ..Default::default()
            },
            ..vm.clone()
        };
        let xml = domain_xml(template, &huge, "");
        assert!(
            xml.contains("<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages><allocation mode='immediate'/></memoryBacking><vcpu>"),
            "{xml}"
        );
        let template = "<vcpu@VCPU_PLACEMENT@>@VCPUS@</vcpu>@NUMATUNE@";
        assert_eq!(domain_xml(template, &vm, ""), "<vcpu>2</vcpu>");
        let auto = VmInstance {
            spec: VmSpec {
                auto_placement: true,
                ..Default::default()
            },
            ..vm
        };
        assert_eq!(
            domain_xml(template, &auto, ""),
            "<vcpu placement='auto'>2</vcpu>\
             <numatune><memory mode='strict' placement='auto'/></numatune>"
        );
    }

    /// The template the image carries has every placeholder the harness fills.
    #[test]
    fn shipped_template_is_filled_completely() {
        let template = include_str!("../../../stack/domain.xml.in");
        let (_, body) = template.split_once("-->").unwrap();
        for auto_placement in [false, true] {
            let vm = VmInstance {
                id: 1,
                name: "vm1".into(),
                spec: VmSpec {
                    auto_placement,
                    ..Default::default()
                },
            };
            let xml = domain_xml(body, &vm, "");
            assert!(!xml.contains('@'), "{xml}");
            assert_eq!(xml.contains("placement='auto'"), auto_placement, "{xml}");
        }
    }

    #[test]
    fn cells_become_libvirt_cells_and_the_payload_runs_every_vcpu() {
        let vm = VmInstance {
            id: 1,
            name: "wide".into(),
            spec: VmSpec {
                vcpus: 4,
                cells: 2,
                memory_mib: 1024,
                busy_vcpus: BusyVcpus::All,
                ..Default::default()
            },
        };
        assert_eq!(
            domain_xml("@CPU@", &vm, ""),
            "<cpu><numa><cell id='0' cpus='0-1' memory='512' unit='MiB'/>\
             <cell id='1' cpus='2-3' memory='512' unit='MiB'/></numa></cpu>"
        );
        assert!(
            cmdline(&vm).ends_with(" cpus=4 cells=2"),
            "{}",
            cmdline(&vm)
        );
        let plain = VmInstance {
            spec: VmSpec::default(),
            ..vm
        };
        assert_eq!(domain_xml("@CPU@", &plain, ""), "");
        assert!(!cmdline(&plain).contains("cpus="), "{}", cmdline(&plain));
    }

    #[test]
    fn cpu_nodes_become_the_operators_pins() {
        let nodes: Vec<NodeInfo> = (0..4)
            .map(|id| NodeInfo {
                id,
                cpus: vec![2 * id, 2 * id + 1],
                distances: vec![],
            })
            .collect();
        let mut vm = VmInstance {
            id: 1,
            name: "pinned".into(),
            spec: VmSpec {
                vcpus: 3,
                cpu_nodes: vec![3],
                ..Default::default()
            },
        };
        let xml = pinning_xml(&vm, &nodes).unwrap();
        assert_eq!(
            xml,
            "<cputune><vcpupin vcpu='0' cpuset='6'/><vcpupin vcpu='1' cpuset='7'/>\
             <vcpupin vcpu='2' cpuset='6'/><emulatorpin cpuset='6,7'/></cputune>\
             <numatune><memory mode='strict' nodeset='3'/></numatune>"
        );
        // What the product reads back from it is the operator's pinning.
        let intent = balancer::host::linux::libvirt::parse_intent(&format!(
            "<domain>{}</domain>",
            domain_xml("@PINNING@", &vm, &xml)
        ))
        .unwrap();
        let why = intent.evidence().unwrap();
        assert!(
            why.contains("vcpupin 0->6 1->7 2->6") && why.contains("mode=strict nodeset=3"),
            "{why}"
        );
        vm.spec.cpu_nodes = vec![];
        assert_eq!(pinning_xml(&vm, &nodes).unwrap(), "");
        vm.spec.cpu_nodes = vec![9];
        assert!(pinning_xml(&vm, &nodes).is_err());
    }
}
