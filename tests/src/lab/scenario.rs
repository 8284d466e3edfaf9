//! The scenario format: what a lab run starts, measures and asserts.
//!
//! Scenarios are data (TOML files under `tests/scenarios/`), so a new NUMA behaviour
//! is proven by writing a file, not code, and the same scenario can run under every
//! balancer for a comparison. Every field has a documented default.
//!
//! ```toml
//! description = "8 VMs x 2 vCPUs, memory scattered over all nodes"
//! balancer = "none"            # none | autonuma | numad | vmbalancer
//! duration_s = 60              # how long the VMs run once started
//! sample_every_s = 5           # ground-truth sampling period
//! cgroup = "v2"                # v2 | v1-cpuset: which cgroup hierarchy to mount
//! timeout_s = 400              # host side: kill the guest after this long
//! guest = "busybox"            # busybox (fake VMs) | stack (Debian, systemd, libvirt)
//!
//! [numad]
//! args = ["-i", "5"]           # numad options (it runs in the foreground, -F)
//! [vmbalancer]
//! args = ["run"]               # vmbalancer arguments; `--config FILE` is added
//! config = "..."               # when set, written to a file passed with --config
//! log_lines = 60               # last lines of its log reported when it stops
//! log_filter = "info,balancer::host::linux::write_heat=debug"  # VMBALANCER_LOG
//! notify = false               # NOTIFY_SOCKET: record READY=1/STATUS=/WATCHDOG=1
//! unit_like = false            # start as systemd/vmbalancer.service does
//!
//! [[events]]                   # balancer control during the run (vmbalancer only)
//! at_s = 12
//! wait_for_migration_s = 15    # first wait for a memory move in its journal
//! kill_balancer = "KILL"       # or start_balancer = true
//!
//! [[hogs]]                     # fill a node's memory before the VMs start
//! node = 2
//! leave_free_mib = 64
//!
//! [[vms]]
//! name = "vm"                  # with count > 1: vm1, vm2, ...
//! count = 8
//! vcpus = 2
//! memory_mib = 256
//! placement = "scattered"      # node | scattered | interleave | default
//! node = 0                     # for placement = "node"
//! chunk_mib = 4                # scattered: chunk size placed round-robin
//! hot_fraction = 0.25          # share of memory touched most
//! hot_offset = 0.0             # where that hot set starts (share of memory)
//! cpu_nodes = []               # start confined to these nodes' CPUs (pinning;
//!                              # stack guest: vcpupin, emulatorpin, strict numatune)
//! hot_access_pct = 95          # share of touches going to the hot set
//! hugetlb = false              # back memory with MAP_HUGETLB
//! hugetlb_page_mib = 2         # its huge page size: 2 or 1024 (1 GiB)
//! start_cpu_nodes = []         # held on these nodes' CPUs until the balancer starts
//! auto_placement = false       # stack: libvirt placement='auto' (numad -w advice)
//! debug_threads = true         # false: threads named like the process (plain qemu)
//! qemu_args = []               # more qemu options, `{name}` replaced
//! cells = 0                    # guest NUMA cells (vCPUs and memory split evenly)
//! busy_vcpus = "boot"          # stack guest: boot | all vCPUs run the payload
//! phases = [ { at_s = 0, duty_pct = 100 } ]
//!
//! [[assert]]                   # see [`Assertion`]
//! kind = "nodes"
//! equals = 4
//! [[assert]]
//! kind = "locality"
//! min = 0.95
//! measure = "access"           # pages (default) | access | hot
//! [[assert]]
//! kind = "cheapest_move"       # first VM moved off the busiest node is the
//! min_candidates = 3           # cheapest per CPU of the VMs there
//! [[assert]]
//! kind = "access_locality"     # access-weighted >= 0.95 by t = 20 s
//! min = 0.95
//! within_s = 20
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors reading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario: {0}")]
    Read(#[from] std::io::Error),
    #[error("invalid scenario TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// Which balancer runs during the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balancer {
    /// Nothing balances (kernel.numa_balancing=0).
    #[default]
    None,
    /// Kernel automatic NUMA balancing (kernel.numa_balancing=1).
    Autonuma,
    /// The `numad` daemon.
    Numad,
    /// `vmbalancer` with the scenario's arguments and configuration.
    Vmbalancer,
}

impl Balancer {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "autonuma" => Some(Self::Autonuma),
            "numad" => Some(Self::Numad),
            "vmbalancer" => Some(Self::Vmbalancer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Autonuma => "autonuma",
            Self::Numad => "numad",
            Self::Vmbalancer => "vmbalancer",
        }
    }
}

/// Which cgroup hierarchy the guest mounts at /sys/fs/cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CgroupMode {
    /// The unified hierarchy (cgroup2) with the cpuset controller enabled.
    #[default]
    #[serde(rename = "v2")]
    V2,
    /// A cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset (hybrid hosts).
    #[serde(rename = "v1-cpuset")]
    V1Cpuset,
}

/// Which guest the scenario runs in.
///
/// `busybox`: the small initramfs whose VMs are the project's fake qemu processes.
/// `stack`: a Debian root filesystem with systemd, libvirt and real qemu, where VMs
/// are libvirt domains running the lab's guest payload (tests/guest/), vmbalancer is
/// installed from its package and started by systemd, and numad comes from Debian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    #[default]
    Busybox,
    Stack,
}

/// Initial placement of a fake VM's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// First touch by an unpinned thread: wherever the kernel puts it.
    #[default]
    Default,
    /// All memory on `node`.
    Node,
    /// Chunks of `chunk_mib` placed on each node in turn.
    Scattered,
    /// Interleaved page by page over all nodes.
    Interleave,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Node => "node",
            Self::Scattered => "scattered",
            Self::Interleave => "interleave",
        }
    }
}

/// Which vCPUs of a stack guest's domain run the payload's writer (the busybox
/// guest's fake VM always runs every vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusyVcpus {
    /// The boot vCPU only: one busy thread per domain, what the stack scenarios
    /// written before the payload started its other vCPUs set their bars around.
    #[default]
    Boot,
    /// Every vCPU: the payload starts the others as a kernel starts a PC's
    /// application processors. Needed by a VM with guest cells, whose every cell
    /// must have vCPUs at work.
    All,
}

impl BusyVcpus {
    /// The most vCPUs the payload starts (its MAX_CPUS).
    pub const MAX_ALL: u32 = 16;
}

/// From `at_s` seconds after start, vCPUs are busy `duty_pct` % of the time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub at_s: f64,
    pub duty_pct: f64,
}

/// One kind of fake VM, started `count` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSpec {
    pub name: String,
    pub count: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub placement: Placement,
    pub node: u32,
    pub chunk_mib: u64,
    pub hot_fraction: f64,
    /// Where the hot set starts, as a fraction of guest RAM (0: at its start; the
    /// hot set is moved back to fit). See [`hot_pages`].
    pub hot_offset: f64,
    pub hot_access_pct: f64,
    pub hugetlb: bool,
    /// The huge page size of a `hugetlb` VM, MiB: 2 (the default) or 1024. Its
    /// pages come from the pool of that size; the scenario reserves them
    /// ([`Scenario::free_huge_pages_per_node`], `kernel_args` for 1 GiB pages).
    pub hugetlb_page_mib: u64,
    /// Back guest RAM with 4 KiB pages only (MADV_NOHUGEPAGE), as qemu on a host
    /// whose transparent huge pages are off. Default false: THP where the kernel can.
    pub small_pages: bool,
    /// The duty cycle over time. A fake VM counts `at_s` on its own clock, from its
    /// start. A stack guest's domain counts it from the balancer's start (t = 0): its
    /// start, placement and the package install take tens of seconds under
    /// emulation, and a load change timed from the domain's start would land anywhere
    /// in them. The harness writes each phase's duty into the payload's state block.
    pub phases: Vec<Phase>,
    /// Put the VM in a libvirt-style cgroup `machine.slice/machine-qemu\x2dN\x2dNAME.scope`.
    pub cgroup: bool,
    /// Start the VM with every thread's affinity set to these nodes' CPUs (as
    /// `taskset` or libvirt's `placement` would). Empty: all CPUs. Balancers see this
    /// as operator pinning. In the stack guest the domain XML says it, as an operator
    /// pins a libvirt domain: each vCPU `vcpupin`ned to one of those CPUs in turn,
    /// `emulatorpin` to all of them and `<numatune><memory mode='strict'>` on the
    /// nodes (the memory is then where the kernel puts it under that binding: give the
    /// group `placement = "default"`).
    pub cpu_nodes: Vec<u32>,
    /// Busybox guest: once its memory is placed, every thread of the VM is held on
    /// these nodes' CPUs (the `with_vms` commands and the t = 0 sample see it there)
    /// and let go (affinity back to every CPU) right before the balancer starts, so
    /// its vCPUs run away from memory the kernel placed without anyone's pinning: the
    /// seed 002 start, made certain rather than left to the scheduler. Balancers meet
    /// an unconfined VM. Empty: wherever it started.
    pub start_cpu_nodes: Vec<u32>,
    /// Pass `debug-threads=on` in `-name`, so the vCPU threads are named `CPU n/KVM`
    /// (as libvirt always does). False: every thread is named like the process, as
    /// a plain qemu started by hand.
    pub debug_threads: bool,
    /// More qemu options, appended to the command line as given (e.g. `-qmp
    /// unix:/run/lab/vm.qmp,server=on,wait=off`, `-object sev-guest,id=sev0`).
    /// `{name}` is replaced by the instance's name.
    pub qemu_args: Vec<String>,
    /// Guest NUMA cells, as libvirt's `<cpu><numa><cell .../>` gives them to qemu
    /// (`-object memory-backend-ram` + `-numa node,...,memdev=` per cell): vCPUs and
    /// memory split evenly, cell N holding the N-th run of vCPUs. 0: no guest NUMA.
    /// `placement` applies to each cell's memory on its own.
    pub cells: u32,
    /// Stack guest: which vCPUs run the payload's writer ([`BusyVcpus`]).
    pub busy_vcpus: BusyVcpus,
    /// Identical content: VMs with the same non-empty key hold the same pages in the
    /// first `same_content_fraction` of their guest RAM (guests booted from one
    /// image), which their vCPUs only read, so KSM can merge them and they stay
    /// merged. Empty: every page of the VM is its own.
    pub same_content: String,
    pub same_content_fraction: f64,
    /// Stack guest: the domain asks libvirt to place it (`<vcpu placement='auto'>`
    /// and `<numatune><memory mode='strict' placement='auto'/>`), so libvirt runs
    /// its `numad -w NCPUS:MB` helper before the start and binds the VM's CPUs and
    /// memory to the nodes printed. The balancer (the advisor) then runs before the
    /// domains start ([`Scenario::advisor_first`]).
    pub auto_placement: bool,
    /// Started by an event's `start_vm` while the balancer runs, not with the
    /// others: a new VM arriving. Not sampled (the run's truth is about the VMs
    /// there from the start); judged by `reaction`.
    pub late: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            name: "vm".into(),
            count: 1,
            vcpus: 2,
            memory_mib: 256,
            placement: Placement::Default,
            node: 0,
            chunk_mib: 4,
            hot_fraction: 0.25,
            hot_offset: 0.0,
            hot_access_pct: 95.0,
            hugetlb: false,
            hugetlb_page_mib: 2,
            small_pages: false,
            phases: vec![Phase {
                at_s: 0.0,
                duty_pct: 100.0,
            }],
            cgroup: true,
            cpu_nodes: Vec::new(),
            start_cpu_nodes: Vec::new(),
            debug_threads: true,
            qemu_args: Vec::new(),
            cells: 0,
            busy_vcpus: BusyVcpus::Boot,
            same_content: String::new(),
            same_content_fraction: 0.5,
            auto_placement: false,
            late: false,
        }
    }
}

/// One fake VM instance after expanding `count`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInstance {
    /// 1-based, as libvirt numbers domains.
    pub id: u32,
    pub name: String,
    pub spec: VmSpec,
}

/// Settings of the numad balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NumadSpec {
    pub args: Vec<String>,
}

impl Default for NumadSpec {
    fn default() -> Self {
        Self {
            args: vec!["-i".into(), "5".into(), "-l".into(), "6".into()],
        }
    }
}

/// Settings of the vmbalancer balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmbalancerSpec {
    pub args: Vec<String>,
    /// Configuration file content; when set it is written to a file and
    /// `--config FILE` is appended to `args`.
    pub config: Option<String>,
    /// How many of the last lines of vmbalancer's log are reported when it stops.
    /// Default 60; raise it with a `--log` filter of `debug` to study a run.
    pub log_lines: usize,
    /// Its log filter (`VMBALANCER_LOG`, as `RUST_LOG`), to study a run; in the
    /// stack guest it goes to the service through a unit drop-in.
    pub log_filter: Option<String>,
    /// Start it as systemd would a `Type=notify` service: a notification socket in
    /// `$NOTIFY_SOCKET` whose READY=1/STATUS=/WATCHDOG=1 messages are recorded.
    pub notify: bool,
    /// Start it as the shipped unit does: `ExecStart`'s arguments (`run --config
    /// /etc/vmbalancer/config.toml`, `config` written there), the unit's directory
    /// environment (`STATE_DIRECTORY`, `RUNTIME_DIRECTORY` mode 0700,
    /// `CONFIGURATION_DIRECTORY`); `args` are then ignored.
    pub unit_like: bool,
    /// `WATCHDOG_USEC` passed with `notify` (0: none, as the shipped unit).
    pub watchdog_usec: u64,
}

impl Default for VmbalancerSpec {
    fn default() -> Self {
        Self {
            args: vec!["run".into()],
            config: None,
            log_lines: 60,
            log_filter: None,
            notify: false,
            unit_like: false,
            watchdog_usec: 0,
        }
    }
}

/// What is compared for a sampled value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// The page-weighted mean over all VMs.
    #[default]
    Mean,
    /// The worst VM.
    Min,
}

/// Which locality an assertion judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Page-weighted: the share of each VM's memory on its main node.
    #[default]
    Pages,
    /// Access-weighted: the estimated share of each VM's memory accesses that are
    /// local (see [`crate::lab::access`]).
    Access,
    /// The hot set's locality alone.
    Hot,
}

/// A checked claim. Boot-time kinds run before any VM starts; run-time kinds are
/// evaluated on the samples after the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Assertion {
    /// The number of online NUMA nodes.
    Nodes { equals: usize },
    /// The SLIT distance matrix (one row per node).
    Distances { matrix: Vec<Vec<u32>> },
    /// A path exists in the guest.
    PathExists { path: String },
    /// A shell command (busybox sh -c) exits with `exit`. With `allow_failure`, a
    /// mismatch is reported but does not fail the scenario (for capabilities that
    /// are still being built, so the step lights up once they work).
    Command {
        run: String,
        #[serde(default)]
        exit: i32,
        #[serde(default = "default_command_timeout")]
        timeout_s: f64,
        #[serde(default)]
        allow_failure: bool,
        /// When true the command runs after the VMs started (before sampling).
        #[serde(default)]
        with_vms: bool,
        /// Runs at this time of the run (seconds after the balancer started), while
        /// the balancer runs; implies `with_vms`.
        #[serde(default)]
        at_s: Option<f64>,
        /// Runs as this uid (and the same gid), e.g. 65534 (nobody).
        #[serde(default)]
        uid: Option<u32>,
        /// Skipped unless vmbalancer is the balancer (it talks to the daemon).
        #[serde(default)]
        vmbalancer_only: bool,
    },
    /// Locality (of `measure`, default page-weighted) is at least `min` (0..1) at the
    /// first sample at or after `at_s` (default: the last sample).
    Locality {
        min: f64,
        #[serde(default)]
        which: Which,
        #[serde(default)]
        at_s: Option<f64>,
        #[serde(default)]
        measure: Measure,
    },
    /// Locality (of `measure`) is at most `max` (0..1) at the first sample at or
    /// after `at_s` (default: the last sample): proves a baseline really starts
    /// badly placed.
    LocalityAtMost {
        max: f64,
        #[serde(default)]
        which: Which,
        #[serde(default)]
        at_s: Option<f64>,
        #[serde(default)]
        measure: Measure,
    },
    /// Access-weighted locality reaches `min` (0..1) at some sample no later than
    /// `within_s` seconds after the balancer started (default: by the last sample):
    /// "the VMs feel >= 0.95 local within 20 s".
    AccessLocality {
        min: f64,
        #[serde(default)]
        which: Which,
        #[serde(default)]
        within_s: Option<f64>,
    },
    /// Pages migrated during the run (numa_pages_migrated + pgmigrate_success
    /// deltas, whichever is larger) is within bounds. With `max_misplaced_ratio`,
    /// also at most that ratio times the pages misplaced at the start (see
    /// [`crate::lab::judge::misplaced_pages_at_start`] for the exact definition).
    PagesMigrated {
        #[serde(default)]
        min: Option<u64>,
        #[serde(default)]
        max: Option<u64>,
        #[serde(default)]
        max_misplaced_ratio: Option<f64>,
    },
    /// Pages of one VM's guest RAM seen on another node than at the previous
    /// sample, summed over the run or, with `after_s`, from the first sample at or
    /// after `after_s` to the end (per-page ground truth, see
    /// `VmTruth::pages_moved`), is within bounds.
    VmPagesMoved {
        vm: String,
        #[serde(default)]
        after_s: Option<f64>,
        #[serde(default)]
        min: Option<u64>,
        #[serde(default)]
        max: Option<u64>,
    },
    /// Memory follows hot set first: on the samples at or after `after_s`, from the
    /// first at which the cold part's locality is below `cold_max` to the first
    /// later one at which it reaches `cold_max`, hot-set locality reaches `hot_min`
    /// (see [`crate::lab::judge::hot_first_one`]). Judged for `vm`, or (without
    /// `vm`) for every VM whose cold part went from below `cold_max` to it; at
    /// least one such VM must exist.
    HotFirst {
        #[serde(default = "default_hot_min")]
        hot_min: f64,
        #[serde(default = "default_cold_max")]
        cold_max: f64,
        #[serde(default)]
        vm: Option<String>,
        #[serde(default)]
        after_s: Option<f64>,
    },
    /// At the first sample at or after `at_s` (default: the last), vCPUs ran on at
    /// least `min` nodes, a node counting when its vCPU load over the interval was
    /// at least `min_load` CPUs.
    NodesUsed {
        min: usize,
        #[serde(default)]
        at_s: Option<f64>,
        #[serde(default = "default_min_load")]
        min_load: f64,
    },
    /// Locality of every guest cell, a VM without cells counting as one cell
    /// (pages: its memory on the node its own vCPUs ran on most; access: the
    /// access-weighted estimate, see `lab::access`): the worst of them reaches `min`
    /// at some sample no later than `within_s` (default: by the last sample).
    CellLocality {
        min: f64,
        #[serde(default)]
        measure: Measure,
        #[serde(default)]
        within_s: Option<f64>,
    },
    /// At the first sample at or after `at_s` (default: the last), the guest cells
    /// of each VM with cells run on different nodes (each cell's main node), no two
    /// of them farther apart than `max_distance` in the SLIT.
    CellsNear {
        max_distance: u32,
        #[serde(default)]
        at_s: Option<f64>,
    },
    /// At the last sample, at most `max_share` of each VM's memory (or only `vm`'s)
    /// is on `node`: nothing half-moved onto a node that had no room.
    MemoryOnNodeAtMost {
        node: usize,
        max_share: f64,
        #[serde(default)]
        vm: Option<String>,
    },
    /// After the run (vmbalancer only): every vCPU thread's affinity is non-empty and
    /// within the online CPUs, each VM cgroup's cpuset.mems is non-empty, vmbalancer's
    /// journal (`STATE_DIR/journal.json`) has no action in flight, and its log
    /// contains `log_contains` (the line it prints after recovering its journal).
    Consistent {
        #[serde(default = "default_recovery_line")]
        log_contains: String,
    },
    /// vmbalancer only: decisions in `vmbalancer status --json` (taken at the end of
    /// the run, before it stops) whose reason is `reason` number in [min, max].
    Decisions {
        reason: String,
        #[serde(default = "default_one")]
        min: u64,
        #[serde(default)]
        max: Option<u64>,
    },
    /// vmbalancer only: refusals shown in `vmbalancer status --json` (decisions with
    /// a `Refused` outcome, and a top-level `refusals` list if the daemon has one)
    /// whose JSON text contains `contains`: at least `min`.
    Refusals {
        contains: String,
        #[serde(default = "default_one")]
        min: u64,
    },
    /// KSM's `pages_sharing` (`/sys/kernel/mm/ksm`) at the end of the run is at least
    /// `min_ratio` of its value when the balancer started, which is at least
    /// `min_start_pages` (the scenario really had merged pages to keep).
    KsmKept {
        min_ratio: f64,
        #[serde(default = "default_one")]
        min_start_pages: u64,
    },
    /// At the first sample at or after `at_s` (default: the last), the vCPUs of the
    /// listed VMs ran on one node (each VM's main node the same).
    SameNode {
        vms: Vec<String>,
        #[serde(default)]
        at_s: Option<f64>,
    },
    /// vmbalancer only: no tick of the daemon started more than `max_ms` after it
    /// was due (`daemon.max_tick_late_ns` in `vmbalancer status --json` at the end
    /// of the run), so memory moves never held the loop.
    TickLate { max_ms: f64 },
    /// vmbalancer only, with `[vmbalancer] notify = true`: READY=1 arrived on the
    /// notification socket within `ready_within_s` of its start.
    Notified { ready_within_s: f64 },
    /// No OOM kill during the run (/proc/vmstat oom_kill unchanged since before the
    /// hogs started) and every VM still alive at the end.
    NoOom,
    /// Every VM reported progress (its vCPUs did work) in every sample interval, or
    /// only in those ending after `after_s`: a VM whose guest RAM is one 1 GiB huge
    /// page does nothing while the page is copied to another node (every access
    /// waits for the copy), which takes tens of seconds under emulation.
    WorkDone {
        min_touches_per_vcpu_s: f64,
        #[serde(default)]
        after_s: Option<f64>,
    },
    /// At the first sample (right after placement), at least `min_share` of VM
    /// `vm`'s memory is on `node`: proves initial placement and numa_maps reading.
    MemoryOnNode {
        vm: String,
        node: usize,
        min_share: f64,
    },
    /// The first VM whose vCPUs were moved off the most loaded node (by the VMs'
    /// known loads: vCPUs x duty cycle) is, of the VMs confined to that node, the one
    /// with the fewest resident bytes (numa_maps) per CPU of known load: seed 004's
    /// cheapest move. At least `min_candidates` VMs must have been on the node. Under
    /// vmbalancer, `status --json` must also list that search with every one of them
    /// and the same VM chosen. See [`crate::lab::judge::cheapest_move`].
    CheapestMove {
        #[serde(default = "default_min_candidates")]
        min_candidates: usize,
    },
    /// `vmbalancer trace --once --json` agrees with the harness's ground truth,
    /// checked once after the VMs started (before sampling): each VM's guest RAM in
    /// total and per node within `max_error_pct` % of its guest RAM, and at least
    /// `min_vcpu_agree_pct` % of vCPUs on the node the kernel reports. With
    /// `pin_vcpus` the harness first pins each vCPU thread to one CPU (spread over
    /// the nodes) so vCPUs cannot migrate between trace's read and the harness's.
    TraceTruth {
        #[serde(default = "default_trace_error_pct")]
        max_error_pct: f64,
        #[serde(default = "default_vcpu_agree_pct")]
        min_vcpu_agree_pct: f64,
        #[serde(default = "default_true")]
        pin_vcpus: bool,
        #[serde(default = "default_command_timeout")]
        timeout_s: f64,
    },
    /// The eBPF programs agree with what a worker thread of the harness measures of
    /// itself on the guest's nodes (`lab_harness/ebpf_truth.rs`): migrations and
    /// cross-node migrations exactly, on-CPU time per node and, with
    /// `hinting_faults`, NUMA hinting faults and pages migrated under automatic
    /// balancing against `/proc/vmstat`, within `max_error_pct` %; user page faults
    /// exactly. Checked once, right after the boot checks and before any VM starts.
    EbpfTruth {
        #[serde(default = "default_ebpf_error_pct")]
        max_error_pct: f64,
        #[serde(default = "default_true")]
        hinting_faults: bool,
    },
    /// vmbalancer's first applied CPU move of each `late` VM of entry `vm` comes at
    /// most `max_s` after the harness started it (`status --json` decision times
    /// against the harness's clock, both CLOCK_MONOTONIC). With `after_s`, the VMs
    /// of entry `vm` are running ones and the time counts from `after_s` on each
    /// VM's own clock (when one of its load phases begins): the first applied CPU
    /// move of any of them from then on comes at most `max_s` later.
    Reaction {
        vm: String,
        max_s: f64,
        #[serde(default)]
        after_s: Option<f64>,
    },
}

fn default_ebpf_error_pct() -> f64 {
    5.0
}

fn default_min_candidates() -> usize {
    2
}

fn default_hot_min() -> f64 {
    0.9
}

fn default_cold_max() -> f64 {
    0.5
}

fn default_min_load() -> f64 {
    0.5
}

fn default_one() -> u64 {
    1
}

fn default_recovery_line() -> String {
    "journal recovered".into()
}

fn default_trace_error_pct() -> f64 {
    2.0
}

fn default_vcpu_agree_pct() -> f64 {
    98.0
}

fn default_true() -> bool {
    true
}

fn default_command_timeout() -> f64 {
    60.0
}

impl Assertion {
    /// A short name for reports.
    pub fn label(&self) -> String {
        match self {
            Assertion::Nodes { equals } => format!("nodes == {equals}"),
            Assertion::Distances { .. } => "SLIT distances".into(),
            Assertion::PathExists { path } => format!("exists {path}"),
            Assertion::Command { run, exit, uid, .. } => match uid {
                Some(u) => format!("`{run}` as uid {u} exits {exit}"),
                None => format!("`{run}` exits {exit}"),
            },
            Assertion::Locality {
                min,
                which,
                at_s,
                measure,
            } => format!(
                "{}locality {which:?} >= {min}{}",
                measure_label(*measure),
                at_label(*at_s)
            ),
            Assertion::LocalityAtMost {
                max,
                which,
                at_s,
                measure,
            } => format!(
                "{}locality {which:?} <= {max}{}",
                measure_label(*measure),
                at_label(*at_s)
            ),
            Assertion::AccessLocality {
                min,
                which,
                within_s,
            } => format!(
                "access locality {which:?} >= {min}{}",
                within_s.map_or(String::new(), |t| format!(" within {t} s"))
            ),
            Assertion::PagesMigrated {
                min,
                max,
                max_misplaced_ratio,
            } => match max_misplaced_ratio {
                Some(r) => format!("pages migrated in [{min:?}, {max:?}], <= {r} x misplaced"),
                None => format!("pages migrated in [{min:?}, {max:?}]"),
            },
            Assertion::VmPagesMoved {
                vm,
                after_s,
                min,
                max,
            } => format!(
                "{vm}: pages moved{} in [{min:?}, {max:?}]",
                after_s.map_or(String::new(), |t| format!(" after {t} s"))
            ),
            Assertion::HotFirst {
                hot_min,
                cold_max,
                vm,
                ..
            } => format!(
                "{}hot set >= {hot_min} local before the cold part reaches {cold_max}",
                vm.as_ref().map_or(String::new(), |v| format!("{v}: "))
            ),
            Assertion::NodesUsed { min, at_s, .. } => {
                format!("vCPUs on >= {min} nodes{}", at_label(*at_s))
            }
            Assertion::MemoryOnNodeAtMost {
                node,
                max_share,
                vm,
            } => format!(
                "{}: <= {max_share} of memory on node {node} at the end",
                vm.as_deref().unwrap_or("every VM")
            ),
            Assertion::CellLocality {
                min,
                measure,
                within_s,
            } => format!(
                "every cell's {}locality >= {min}{}",
                measure_label(*measure),
                within_s.map_or(String::new(), |t| format!(" within {t} s"))
            ),
            Assertion::CellsNear { max_distance, at_s } => format!(
                "guest cells on distinct nodes <= {max_distance} apart{}",
                at_label(*at_s)
            ),
            Assertion::Consistent { .. } => "consistent state after recovery".into(),
            Assertion::Decisions { reason, min, max } => {
                format!("status decisions {reason} in [{min}, {max:?}]")
            }
            Assertion::Refusals { contains, min } => {
                format!("status refusals containing {contains:?} >= {min}")
            }
            Assertion::TickLate { max_ms } => format!("no tick started > {max_ms} ms late"),
            Assertion::KsmKept {
                min_ratio,
                min_start_pages,
            } => format!(
                "KSM pages_sharing at the end >= {min_ratio} x at the start (>= {min_start_pages})"
            ),
            Assertion::SameNode { vms, at_s } => {
                format!("{} on one node{}", vms.join(", "), at_label(*at_s))
            }
            Assertion::Notified { ready_within_s } => {
                format!("READY=1 within {ready_within_s} s")
            }
            Assertion::NoOom => "no OOM kill, every VM alive".into(),
            Assertion::WorkDone {
                min_touches_per_vcpu_s,
                after_s: None,
            } => format!("work >= {min_touches_per_vcpu_s} touches/vCPU/s"),
            Assertion::WorkDone {
                min_touches_per_vcpu_s,
                after_s: Some(t),
            } => format!("work >= {min_touches_per_vcpu_s} touches/vCPU/s after {t} s"),
            Assertion::MemoryOnNode {
                vm,
                node,
                min_share,
            } => format!("{vm}: >= {min_share} of memory on node {node} at start"),
            Assertion::CheapestMove { min_candidates } => format!(
                "first VM moved off the busiest node has the fewest resident bytes per CPU \
                 (of >= {min_candidates} there)"
            ),
            Assertion::TraceTruth {
                max_error_pct,
                min_vcpu_agree_pct,
                ..
            } => format!(
                "trace agrees with ground truth (memory within {max_error_pct} %, \
                 >= {min_vcpu_agree_pct} % of vCPU nodes)"
            ),
            Assertion::EbpfTruth { max_error_pct, .. } => {
                format!("eBPF telemetry agrees with ground truth (within {max_error_pct} %)")
            }
            Assertion::Reaction {
                vm,
                max_s,
                after_s: None,
            } => format!("first CPU move of {vm} <= {max_s} s after it started"),
            Assertion::Reaction {
                vm,
                max_s,
                after_s: Some(at),
            } => {
                format!("first CPU move of a {vm} VM <= {max_s} s after its load changes at {at} s")
            }
        }
    }

    /// True for kinds checked before VMs start.
    pub fn is_boot_time(&self) -> bool {
        match self {
            Assertion::Nodes { .. }
            | Assertion::Distances { .. }
            | Assertion::PathExists { .. } => true,
            Assertion::Command { with_vms, at_s, .. } => !with_vms && at_s.is_none(),
            _ => false,
        }
    }

    /// True for kinds that only make sense when vmbalancer is the balancer.
    pub fn needs_vmbalancer(&self) -> bool {
        matches!(
            self,
            Assertion::Consistent { .. }
                | Assertion::Decisions { .. }
                | Assertion::Refusals { .. }
                | Assertion::TickLate { .. }
                | Assertion::Notified { .. }
                | Assertion::Reaction { .. }
                | Assertion::Command {
                    vmbalancer_only: true,
                    ..
                }
        )
    }
}

/// The label's prefix: none for page-weighted locality, so existing checks keep
/// their names.
fn measure_label(m: Measure) -> &'static str {
    match m {
        Measure::Pages => "",
        Measure::Access => "access ",
        Measure::Hot => "hot-set ",
    }
}

fn at_label(at_s: Option<f64>) -> String {
    at_s.map_or(String::new(), |t| format!(" at {t} s"))
}

/// Something done to the balancer during the run, `at_s` seconds after it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_s: f64,
    /// Sends this signal (`KILL`, `TERM`, ...) to vmbalancer.
    #[serde(default)]
    pub kill_balancer: Option<String>,
    /// Before the signal, wait up to this long for vmbalancer's journal to show a
    /// memory move in flight, so the signal lands mid-migration.
    #[serde(default)]
    pub wait_for_migration_s: Option<f64>,
    /// Starts vmbalancer again with the same arguments, environment and
    /// configuration; its log is appended to.
    #[serde(default)]
    pub start_balancer: bool,
    /// After the wait, before the signal: a shell command (`sh -c`), e.g. `virsh
    /// destroy vm2` in the middle of a memory move. Its exit status is reported.
    #[serde(default)]
    pub run: Option<String>,
    /// Starts the `late` VMs of the `[[vms]]` entry of this name (fake VMs).
    #[serde(default)]
    pub start_vm: Option<String>,
}

/// A process that fills one node's memory before the VMs start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hog {
    pub node: u32,
    /// Allocate until the node has at most this much free memory.
    pub leave_free_mib: u64,
}

/// The hot set of guest RAM of `pages` pages, as page indexes: `hot_fraction` of
/// the pages (at least one) starting at `hot_offset` of the way in, moved back so
/// it ends at the last page at the latest. The fake VM touches these and the
/// harness measures their locality, so both use this one definition.
pub fn hot_pages(pages: usize, hot_fraction: f64, hot_offset: f64) -> std::ops::Range<usize> {
    if pages == 0 {
        return 0..0;
    }
    let len = ((pages as f64 * hot_fraction) as usize).clamp(1, pages);
    let start = ((pages as f64 * hot_offset) as usize).min(pages - len);
    start..start + len
}

/// The duty cycle (%) at `t_s` seconds of a VM's own clock: the last phase started
/// at or before it, 0 before the first. The fake VM runs by it and the harness
/// computes known loads with it.
pub fn duty_pct_at(phases: impl IntoIterator<Item = (f64, f64)>, t_s: f64) -> f64 {
    phases
        .into_iter()
        .take_while(|(at, _)| *at <= t_s)
        .last()
        .map_or(0.0, |(_, d)| d)
}

/// The number of a signal named without its `SIG` prefix.
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "KILL" => 9,
        "TERM" => 15,
        "INT" => 2,
        "STOP" => 19,
        "CONT" => 18,
        _ => return None,
    })
}

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub description: String,
    pub balancer: Balancer,
    pub duration_s: f64,
    pub sample_every_s: f64,
    pub cgroup: CgroupMode,
    /// Host side: the guest is killed after this many seconds.
    pub timeout_s: f64,
    /// Balancers `cargo xtask lab demo`/`--compare` use when none are given.
    pub compare: Vec<Balancer>,
    pub numad: NumadSpec,
    pub vmbalancer: VmbalancerSpec,
    pub vms: Vec<VmSpec>,
    #[serde(rename = "assert")]
    pub assertions: Vec<Assertion>,
    /// Extra sysctls written before the run (`"vm.foo" = "1"`).
    pub sysctl: BTreeMap<String, String>,
    /// Balancer control during the run (vmbalancer only).
    pub events: Vec<Event>,
    /// Memory hogs started before the VMs.
    pub hogs: Vec<Hog>,
    /// The guest image the scenario runs in.
    pub guest: Guest,
    /// Kernel samepage merging for the run; absent: left as the kernel booted (off).
    pub ksm: Option<KsmSpec>,
    /// Host side, busybox guest: appended to the guest kernel's command line (e.g.
    /// `hugepagesz=1G hugepages=0:1,1:1`: 1 GiB huge pages are reserved reliably only
    /// at boot, before the node's memory fragments).
    pub kernel_args: String,
    /// Host side, busybox guest: memory of each guest node in MiB (0: the lab's
    /// usual 2048). A node of 2 GiB holds at most one 1 GiB page besides the kernel's
    /// own memory.
    pub node_memory_mib: u64,
    /// Free huge pages (of the hugetlb VMs' page size) reserved on each node (index:
    /// node) besides each VM's own on its `node`, before the VMs start. Given, or
    /// with huge pages other than 2 MiB, each pool holds exactly that: the VMs'
    /// pages and these (the stack guest always reserves so, with none free).
    pub free_huge_pages_per_node: Vec<u64>,
}

/// KSM settings (`/sys/kernel/mm/ksm`) written before the VMs start, then `run=1`.
/// `merge_across_nodes` can only change while nothing is merged, so it is written
/// first. Before the balancer starts, the harness waits up to `settle_timeout_s` for
/// `pages_sharing` to reach `settle_pages_sharing` and stop growing, so the balancer
/// meets merged pages rather than a merge under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KsmSpec {
    pub merge_across_nodes: u32,
    /// Pages ksmd scans per wake-up (kernel default 100).
    pub pages_to_scan: Option<u64>,
    /// ksmd's sleep between wake-ups (kernel default 20 ms).
    pub sleep_millisecs: Option<u64>,
    pub settle_pages_sharing: u64,
    pub settle_timeout_s: f64,
    /// The fake VMs touch nothing until the merge settled (their phases start
    /// then): set-up, not the case. Beside busy vCPUs on every emulated CPU, ksmd
    /// got too little CPU to merge the scenario's pages in minutes.
    pub idle_vms_while_merging: bool,
}

/// The file whose presence holds the fake VMs' vCPUs idle
/// ([`KsmSpec::idle_vms_while_merging`]).
pub const VM_HOLD_FILE: &str = "/run/lab/vm-hold";

impl Default for KsmSpec {
    fn default() -> Self {
        Self {
            merge_across_nodes: 1,
            pages_to_scan: None,
            sleep_millisecs: None,
            settle_pages_sharing: 1,
            settle_timeout_s: 120.0,
            idle_vms_while_merging: false,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            description: String::new(),
            balancer: Balancer::None,
            duration_s: 60.0,
            sample_every_s: 5.0,
            cgroup: CgroupMode::V2,
            timeout_s: 300.0,
            compare: vec![Balancer::None, Balancer::Autonuma, Balancer::Numad],
            numad: NumadSpec::default(),
            vmbalancer: VmbalancerSpec::default(),
            vms: Vec::new(),
            assertions: Vec::new(),
            sysctl: BTreeMap::new(),
            events: Vec::new(),
            hogs: Vec::new(),
            guest: Guest::Busybox,
            ksm: None,
            kernel_args: String::new(),
            node_memory_mib: 0,
            free_huge_pages_per_node: Vec::new(),
        }
    }
}

impl Scenario {
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(ScenarioError::Parse)?;
        s.validate()?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(ScenarioError::Read)?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if self.sample_every_s.is_nan() || self.sample_every_s <= 0.0 {
            return bad(format!(
                "sample_every_s must be > 0, got {}",
                self.sample_every_s
            ));
        }
        if self.duration_s.is_nan() || self.duration_s < 0.0 {
            return bad(format!("duration_s must be >= 0, got {}", self.duration_s));
        }
        for e in &self.events {
            if e.at_s.is_nan() || e.at_s < 0.0 {
                return bad(format!("event at_s must be >= 0, got {}", e.at_s));
            }
            if let Some(sig) = &e.kill_balancer
                && signal_number(sig).is_none()
            {
                return bad(format!(
                    "unknown signal {sig:?} (KILL, TERM, INT, STOP, CONT)"
                ));
            }
            if e.kill_balancer.is_none()
                && !e.start_balancer
                && e.run.is_none()
                && e.start_vm.is_none()
            {
                return bad(format!(
                    "event at {} s does nothing (kill_balancer, start_balancer, run or start_vm)",
                    e.at_s
                ));
            }
            if let Some(name) = &e.start_vm
                && !self.vms.iter().any(|v| v.late && &v.name == name)
            {
                return bad(format!(
                    "start_vm {name:?} names no [[vms]] entry with late = true"
                ));
            }
        }
        let mut sizes: Vec<u64> = self
            .vms
            .iter()
            .filter(|v| v.hugetlb)
            .map(|v| v.hugetlb_page_mib)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.len() > 1 {
            return bad(format!(
                "hugetlb VMs of one scenario share one page size (one pool to reserve), got {sizes:?} MiB"
            ));
        }
        for vm in &self.vms {
            if vm.vcpus == 0 || vm.memory_mib == 0 || vm.count == 0 {
                return bad(format!(
                    "VM {:?}: vcpus, memory_mib and count must be > 0",
                    vm.name
                ));
            }
            if !(0.0..=1.0).contains(&vm.hot_fraction) {
                return bad(format!("VM {:?}: hot_fraction must be in 0..=1", vm.name));
            }
            if !(0.0..=1.0).contains(&vm.hot_offset) {
                return bad(format!("VM {:?}: hot_offset must be in 0..=1", vm.name));
            }
            if !(0.0..=100.0).contains(&vm.hot_access_pct) {
                return bad(format!(
                    "VM {:?}: hot_access_pct must be in 0..=100",
                    vm.name
                ));
            }
            if vm.cells > 0
                && (vm.cells > vm.vcpus
                    || vm.vcpus % vm.cells != 0
                    || vm.memory_mib % u64::from(vm.cells) != 0)
            {
                return bad(format!(
                    "VM {:?}: {} cells must split its {} vCPUs and {} MiB evenly",
                    vm.name, vm.cells, vm.vcpus, vm.memory_mib
                ));
            }
            if self.guest == Guest::Stack && vm.cells > 0 && vm.busy_vcpus != BusyVcpus::All {
                return bad(format!(
                    "VM {:?}: in the stack guest a VM with cells needs busy_vcpus = \"all\" \
                     (with the boot vCPU alone at work, every other cell would sit idle)",
                    vm.name
                ));
            }
            if vm.busy_vcpus == BusyVcpus::All && vm.vcpus > BusyVcpus::MAX_ALL {
                return bad(format!(
                    "VM {:?}: busy_vcpus = \"all\" runs at most {} vCPUs",
                    vm.name,
                    BusyVcpus::MAX_ALL
                ));
            }
            if vm.auto_placement
                && (self.guest != Guest::Stack || vm.placement != Placement::Default)
            {
                return bad(format!(
                    "VM {:?}: auto_placement needs guest = \"stack\" and placement = \"default\" \
                     (libvirt places the memory)",
                    vm.name
                ));
            }
            if vm.hugetlb && !matches!(vm.hugetlb_page_mib, 2 | 1024) {
                return bad(format!(
                    "VM {:?}: hugetlb_page_mib must be 2 or 1024, got {}",
                    vm.name, vm.hugetlb_page_mib
                ));
            }
            if vm.hugetlb && vm.memory_mib % vm.hugetlb_page_mib != 0 {
                return bad(format!(
                    "VM {:?}: memory_mib {} is not a whole number of {} MiB huge pages",
                    vm.name, vm.memory_mib, vm.hugetlb_page_mib
                ));
            }
            if !vm.start_cpu_nodes.is_empty()
                && (!vm.cpu_nodes.is_empty() || self.guest == Guest::Stack)
            {
                return bad(format!(
                    "VM {:?}: start_cpu_nodes is for an unpinned fake VM (no cpu_nodes, busybox guest)",
                    vm.name
                ));
            }
            if vm.chunk_mib == 0 {
                return bad(format!("VM {:?}: chunk_mib must be > 0", vm.name));
            }
            if vm.late
                && (self.guest == Guest::Stack
                    || !self
                        .events
                        .iter()
                        .any(|e| e.start_vm.as_ref() == Some(&vm.name)))
            {
                return bad(format!(
                    "VM {:?}: a late VM is a fake VM (busybox guest) that an event's start_vm \
                     starts",
                    vm.name
                ));
            }
            if vm.phases.is_empty()
                || vm
                    .phases
                    .iter()
                    .any(|p| !(0.0..=100.0).contains(&p.duty_pct))
            {
                return bad(format!("VM {:?}: phases need duty_pct in 0..=100", vm.name));
            }
        }
        Ok(())
    }

    /// Expands `count` into named instances (`vm1`, `vm2`, ... when count > 1): the
    /// VMs that start with the run (not the `late` ones).
    pub fn instances(&self) -> Vec<VmInstance> {
        self.expand(false)
    }

    /// The huge page size of the scenario's hugetlb VMs (one size, see `validate`),
    /// bytes; `None` without any.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.vms
            .iter()
            .find(|v| v.hugetlb)
            .map(|v| v.hugetlb_page_mib << 20)
    }

    /// The `late` VMs of the entry `name`, numbered after all the others.
    pub fn late_instances(&self, name: &str) -> Vec<VmInstance> {
        let first = self.instances().len() as u32;
        self.expand(true)
            .into_iter()
            .filter(|v| v.spec.name == name)
            .map(|mut v| {
                v.id += first;
                v
            })
            .collect()
    }

    fn expand(&self, late: bool) -> Vec<VmInstance> {
        let mut out = Vec::new();
        for spec in self.vms.iter().filter(|v| v.late == late) {
            for i in 1..=spec.count {
                let name = if spec.count > 1 {
                    format!("{}{i}", spec.name)
                } else {
                    spec.name.clone()
                };
                out.push(VmInstance {
                    id: out.len() as u32 + 1,
                    name,
                    spec: spec.clone(),
                });
            }
        }
        out
    }

    /// Whether the balancer must run before the VMs start: libvirt asks for
    /// placement advice (`numad -w`) when it starts a domain with
    /// `auto_placement`, so the advisor is an operator's running service by then.
    /// The run's clock (t = 0) then starts once the VMs are ready, not at the
    /// balancer's start.
    pub fn advisor_first(&self) -> bool {
        self.vms.iter().any(|v| v.auto_placement)
    }

    /// Sample times in seconds after the VMs started, ending at `duration_s`.
    pub fn sample_times_s(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let mut t = 0.0;
        while t < self.duration_s - 1e-9 {
            out.push(t);
            t += self.sample_every_s;
        }
        out.push(self.duration_s);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        description = "x"
        balancer = "numad"
        duration_s = 20
        sample_every_s = 10
        [[vms]]
        name = "vm"
        count = 2
        placement = "scattered"
        phases = [ { at_s = 0, duty_pct = 50 }, { at_s = 10, duty_pct = 100 } ]
        [[assert]]
        kind = "nodes"
        equals = 4
        [[assert]]
        kind = "command"
        run = "true"
        allow_failure = true
        [[assert]]
        kind = "locality"
        min = 0.9
        which = "min"
    "#;

    #[test]
    fn parses_and_expands() {
        let s = Scenario::from_toml(EXAMPLE).unwrap();
        assert_eq!(s.balancer, Balancer::Numad);
        let vms = s.instances();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].name, "vm1");
        assert_eq!(vms[1].id, 2);
        assert_eq!(vms[0].spec.placement, Placement::Scattered);
        assert_eq!(s.sample_times_s(), vec![0.0, 10.0, 20.0]);
        assert!(s.assertions[0].is_boot_time());
        assert!(s.assertions[1].is_boot_time());
        assert!(!s.assertions[2].is_boot_time());
    }

    #[test]
    fn ebpf_truth_defaults() {
        let s = Scenario::from_toml("[[assert]]\nkind = \"ebpf_truth\"").unwrap();
        assert_eq!(
            s.assertions[0],
            Assertion::EbpfTruth {
                max_error_pct: 5.0,
                hinting_faults: true,
            }
        );
        assert!(!s.assertions[0].is_boot_time());
    }

    #[test]
    fn trace_truth_defaults() {
        let s = Scenario::from_toml("[[assert]]\nkind = \"trace_truth\"").unwrap();
        assert_eq!(
            s.assertions[0],
            Assertion::TraceTruth {
                max_error_pct: 2.0,
                min_vcpu_agree_pct: 98.0,
                pin_vcpus: true,
                timeout_s: 60.0,
            }
        );
        assert!(!s.assertions[0].is_boot_time());
    }

    #[test]
    fn events_hogs_and_new_assertions() {
        let s = Scenario::from_toml(
            r#"
            [vmbalancer]
            notify = true
            unit_like = true
            [[events]]
            at_s = 10
            kill_balancer = "KILL"
            [[events]]
            at_s = 12
            start_balancer = true
            [[hogs]]
            node = 2
            leave_free_mib = 64
            [[assert]]
            kind = "locality"
            min = 0.95
            at_s = 30
            [[assert]]
            kind = "hot_first"
            [[assert]]
            kind = "decisions"
            reason = "ProbationReverted"
            [[assert]]
            kind = "command"
            run = "vmbalancer status"
            uid = 65534
            at_s = 8
            exit = 1
            [[assert]]
            kind = "consistent"
        "#,
        )
        .unwrap();
        assert!(s.vmbalancer.notify && s.vmbalancer.unit_like);
        assert_eq!(s.events[0].kill_balancer.as_deref(), Some("KILL"));
        assert!(s.events[1].start_balancer);
        assert_eq!(s.hogs[0].leave_free_mib, 64);
        assert_eq!(
            s.assertions[1],
            Assertion::HotFirst {
                hot_min: 0.9,
                cold_max: 0.5,
                vm: None,
                after_s: None,
            }
        );
        assert_eq!(
            s.assertions[2],
            Assertion::Decisions {
                reason: "ProbationReverted".into(),
                min: 1,
                max: None
            }
        );
        // A timed command runs during the run, not at boot.
        assert!(!s.assertions[3].is_boot_time());
        assert!(s.assertions[4].needs_vmbalancer());
        assert_eq!(
            s.assertions[4],
            Assertion::Consistent {
                log_contains: "journal recovered".into()
            }
        );
        assert!(Scenario::from_toml("[[events]]\nat_s = 1\nkill_balancer = \"HUP\"").is_err());
        assert!(Scenario::from_toml("[[events]]\nat_s = 1").is_err());
    }

    #[test]
    fn locality_measures() {
        let s = Scenario::from_toml(
            r#"
            [[assert]]
            kind = "locality"
            min = 0.95
            at_s = 30
            [[assert]]
            kind = "locality"
            min = 0.95
            measure = "access"
            [[assert]]
            kind = "locality_at_most"
            max = 0.5
            measure = "hot"
            at_s = 0
            [[assert]]
            kind = "access_locality"
            min = 0.95
            within_s = 20
        "#,
        )
        .unwrap();
        // Without `measure`, page-weighted, under the name it always had.
        assert_eq!(
            s.assertions[0],
            Assertion::Locality {
                min: 0.95,
                which: Which::Mean,
                at_s: Some(30.0),
                measure: Measure::Pages
            }
        );
        assert_eq!(s.assertions[0].label(), "locality Mean >= 0.95 at 30 s");
        assert_eq!(s.assertions[1].label(), "access locality Mean >= 0.95");
        assert_eq!(
            s.assertions[2].label(),
            "hot-set locality Mean <= 0.5 at 0 s"
        );
        assert_eq!(
            s.assertions[3].label(),
            "access locality Mean >= 0.95 within 20 s"
        );
        assert!(!s.assertions[3].is_boot_time());
        assert!(
            Scenario::from_toml("[[assert]]\nkind = \"locality\"\nmin = 1\nmeasure = \"x\"")
                .is_err()
        );
    }

    #[test]
    fn guest_cells() {
        let s = Scenario::from_toml(
            r#"
            [[vms]]
            vcpus = 4
            memory_mib = 1024
            cells = 2
            [[assert]]
            kind = "cell_locality"
            min = 0.9
            measure = "access"
            within_s = 30
            [[assert]]
            kind = "cells_near"
            max_distance = 21
        "#,
        )
        .unwrap();
        assert_eq!(s.vms[0].cells, 2);
        assert_eq!(
            s.assertions[0].label(),
            "every cell's access locality >= 0.9 within 30 s"
        );
        assert_eq!(
            s.assertions[1],
            Assertion::CellsNear {
                max_distance: 21,
                at_s: None
            }
        );
        for bad in [
            "vcpus = 4\ncells = 3",
            "vcpus = 2\ncells = 4",
            "memory_mib = 255\ncells = 2",
        ] {
            assert!(
                Scenario::from_toml(&format!("[[vms]]\n{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn auto_placement_is_for_libvirt_domains() {
        let s = Scenario::from_toml("guest = \"stack\"\n[[vms]]\nauto_placement = true").unwrap();
        assert!(s.advisor_first());
        assert!(
            !Scenario::from_toml("guest = \"stack\"\n[[vms]]")
                .unwrap()
                .advisor_first()
        );
        for bad in [
            "[[vms]]\nauto_placement = true",
            "guest = \"stack\"\n[[vms]]\nauto_placement = true\nplacement = \"scattered\"",
        ] {
            assert!(Scenario::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hot_set_ranges() {
        assert_eq!(hot_pages(100, 0.25, 0.0), 0..25);
        assert_eq!(hot_pages(100, 0.25, 0.5), 50..75);
        assert_eq!(hot_pages(100, 0.25, 1.0), 75..100);
        assert_eq!(hot_pages(100, 0.0, 0.3), 30..31);
        assert_eq!(hot_pages(0, 0.25, 0.0), 0..0);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Scenario::from_toml("sample_every_s = 0").is_err());
        assert!(Scenario::from_toml("[[vms]]\nhot_fraction = 2.0").is_err());
        assert!(Scenario::from_toml("bogus = 1").is_err());
        assert!(Scenario::from_toml("[[assert]]\nkind = \"nope\"").is_err());
    }

    #[test]
    fn every_committed_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n > 0, "no scenarios in {}", dir.display());
    }
}
