//! The eBPF programs as the observer's [`TelemetrySource`].
//!
//! The programs count per tracked thread and per VM, cumulatively; the observer knows
//! which threads exist. This adapter keeps the two in step: after each discovery pass
//! the programs' tracked-thread map is made equal to the discovered threads (new ones
//! tracked, gone ones untracked and their counters dropped, exited VMs forgotten), and
//! each snapshot gets the counters of its vCPUs, the kernel's NUMA moves of each VM and
//! its hot regions. A thread the programs have no room for (every one of their
//! [`MAX_TRACKED_THREADS`](balancer_common::MAX_TRACKED_THREADS) slots is held, or
//! freed too recently to be reused) is left out of telemetry, not of balancing: it is
//! retried every pass, with one warning per streak of refusals.
//!
//! Hot regions: the programs count page faults per 2 MiB region and never reset them,
//! so a region faulted heavily an hour ago would stay "hot" forever. Heat is therefore
//! kept here: each observation adds the new faults of a region to its heat after
//! halving the old heat every [`HEAT_HALF_LIFE_NS`] ([`decayed_heat`]); regions whose
//! heat falls below [`MIN_HEAT`] are dropped. The node of a region is where its pages
//! are: for the hottest [`NODE_QUERY_REGIONS`] regions it is asked of the kernel with a
//! query-only move_pages on a sample of their pages; for the others (and when the
//! query fails) it is the node whose CPUs faulted most in it, which is where the first
//! touch placed the pages under the default policy.
//!
//! Only host-virtual regions (`exceptions:page_fault_user`) are reported. Guest-physical
//! regions (`kvm:kvm_page_fault`) are counted by the programs but left out: mapping a
//! guest physical address to a host address needs the VM's memslot layout (guest
//! physical base, size and host virtual address of each slot), which only KVM and qemu
//! know (KVM_GET/SET_USER_MEMORY_REGION, qemu's `info mtree`), and no interface this
//! observer reads provides it.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::actuate::sys;
use super::telemetry_input::{
    FeatureStatus, NoTelemetry, TelemetrySource, TelemetryStatus, TrackedVm,
};
use crate::model::{HotRegion, NodeId, Snapshot, VmId};
use crate::telemetry::{
    Feature, FeatureState, ProgramCost, RegionHeat, RegionKind, Telemetry, TrackedThread,
};

/// Heat halves over this time without new faults.
pub const HEAT_HALF_LIFE_NS: u64 = 30_000_000_000;
/// Regions cooler than this are forgotten.
pub const MIN_HEAT: f64 = 0.5;
/// How many of a VM's hottest regions get their node from move_pages.
pub const NODE_QUERY_REGIONS: usize = 8;
/// Pages of a region sampled by that query (evenly spread).
const NODE_QUERY_PAGES: u64 = 64;

/// `heat` after `elapsed_ns` of exponential decay with half-life `half_life_ns`,
/// plus `new_faults` seen since.
pub fn decayed_heat(heat: f64, elapsed_ns: u64, half_life_ns: u64, new_faults: u64) -> f64 {
    let halvings = if half_life_ns == 0 {
        f64::INFINITY
    } else {
        elapsed_ns as f64 / half_life_ns as f64
    };
    heat * 0.5f64.powf(halvings) + new_faults as f64
}

/// What this adapter remembers of one region between observations.
#[derive(Clone, Debug)]
struct RegionState {
    /// The programs' cumulative fault count when last read.
    faults_total: u64,
    heat: f64,
    len_bytes: u64,
    /// Index into `faults_by_node` (a node id) with the most faults.
    majority_node: NodeId,
}

/// eBPF telemetry for [`LinuxObserver`](super::LinuxObserver).
pub struct EbpfTelemetry {
    telemetry: Telemetry,
    /// What we put into the tracked-thread map.
    tracked: HashMap<u32, TrackedThread>,
    vms: HashSet<VmId>,
    /// Per VM: region start address -> state.
    heat: HashMap<VmId, HashMap<u64, RegionState>>,
    last_fill_ns: Option<u64>,
    /// Threads the last pass could not track (e.g. the map was full).
    untracked: usize,
    /// Passes since the thread map itself was listed (see [`LIST_MAP_EVERY_PASSES`]);
    /// it starts there, so the first pass lists it.
    passes_since_listing: u32,
    /// The programs' wakes; armed at every fill, so the first event after an
    /// observation wakes the daemon.
    wake: Option<crate::telemetry::WakeChannel>,
}

/// The tracked-thread map is listed (two system calls per entry: thousands at 200
/// VMs) on the first pass, which finds entries left from before the daemon started,
/// and then every this many passes. In between, what this adapter wrote is the
/// map's content: the programs never add or remove its entries.
const LIST_MAP_EVERY_PASSES: u32 = 60;

impl EbpfTelemetry {
    pub fn new(mut telemetry: Telemetry) -> Self {
        Self {
            wake: telemetry.take_wake_channel(),
            telemetry,
            tracked: HashMap::new(),
            vms: HashSet::new(),
            heat: HashMap::new(),
            last_fill_ns: None,
            untracked: 0,
            passes_since_listing: LIST_MAP_EVERY_PASSES,
        }
    }

    /// Threads the last pass could not track (the programs' thread map was full).
    pub fn untracked_threads(&self) -> usize {
        self.untracked
    }

    /// Updates the heat of `vm`'s regions from the programs' current counts `raw`
    /// and returns them hottest first.
    fn hot_regions(&mut self, vm: VmId, raw: &[RegionHeat], elapsed_ns: u64) -> Vec<HotRegion> {
        let state = self.heat.entry(vm).or_default();
        let mut seen = HashSet::new();
        for r in raw.iter().filter(|r| r.kind == RegionKind::HostVirtual) {
            seen.insert(r.start_addr);
            let majority_node = (0..r.faults_by_node.len())
                .max_by_key(|&i| (r.faults_by_node[i], std::cmp::Reverse(i)))
                .unwrap_or(0) as NodeId;
            let s = state.entry(r.start_addr).or_insert(RegionState {
                faults_total: 0,
                heat: 0.0,
                len_bytes: r.len_bytes,
                majority_node,
            });
            // A smaller count means the LRU map evicted and re-created the region.
            let new = if r.faults_total >= s.faults_total {
                r.faults_total - s.faults_total
            } else {
                r.faults_total
            };
            s.heat = decayed_heat(s.heat, elapsed_ns, HEAT_HALF_LIFE_NS, new);
            s.faults_total = r.faults_total;
            s.majority_node = majority_node;
        }
        for (addr, s) in state.iter_mut() {
            if !seen.contains(addr) {
                s.heat = decayed_heat(s.heat, elapsed_ns, HEAT_HALF_LIFE_NS, 0);
            }
        }
        state.retain(|_, s| s.heat >= MIN_HEAT);
        let mut out: Vec<HotRegion> = state
            .iter()
            .map(|(&start_addr, s)| HotRegion {
                start_addr,
                len_bytes: s.len_bytes,
                node: s.majority_node,
                heat: s.heat,
            })
            .collect();
        out.sort_by(|a, b| {
            b.heat
                .total_cmp(&a.heat)
                .then(a.start_addr.cmp(&b.start_addr))
        });
        for r in out.iter_mut().take(NODE_QUERY_REGIONS) {
            if let Some(node) = pages_node(vm, r.start_addr, r.len_bytes) {
                r.node = node;
            }
        }
        out
    }
}

/// The node most sampled pages of a region are on, asked with a query-only
/// move_pages; `None` when nothing is resident or the query fails.
pub fn pages_node(pid: u32, start_addr: u64, len_bytes: u64) -> Option<NodeId> {
    regions_nodes(pid, &[start_addr], len_bytes, NODE_QUERY_PAGES)
        .pop()
        .flatten()
}

/// [`pages_node`] for many regions of one length at once: `samples` pages of each
/// region, all in one query-only move_pages call. One call per VM instead of one
/// per region: in the lab a VM's few hundred regions, asked one by one, took most
/// of a second of every tick.
pub fn regions_nodes(
    pid: u32,
    starts: &[u64],
    len_bytes: u64,
    samples: u64,
) -> Vec<Option<NodeId>> {
    let page = sys::page_size_bytes();
    let step = (len_bytes / samples.max(1)).max(page) / page * page;
    let per_region = (len_bytes / step).max(1) as usize;
    let pages: Vec<u64> = starts
        .iter()
        .flat_map(|&start| (0..per_region as u64).map(move |i| start + i * step))
        .collect();
    let mut status = vec![0i32; pages.len()];
    if sys::move_pages(pid, &pages, None, &mut status).is_err() {
        return vec![None; starts.len()];
    }
    status
        .chunks(per_region)
        .map(|region| {
            let mut counts: HashMap<i32, usize> = HashMap::new();
            for &s in region.iter().filter(|&&s| s >= 0) {
                *counts.entry(s).or_default() += 1;
            }
            counts
                .into_iter()
                .max_by_key(|&(node, n)| (n, std::cmp::Reverse(node)))
                .map(|(node, _)| node as NodeId)
        })
        .collect()
}

/// Programs that implement a feature (names in the eBPF object).
fn programs_of(feature: Feature) -> &'static [&'static str] {
    match feature {
        Feature::Migrations => &[
            "sched_migrate_task_btf",
            "sched_migrate_task_raw",
            "sched_migrate_task",
        ],
        Feature::OnCpuTime => &["sched_switch", "sched_switch_btf", "sched_switch_tp"],
        Feature::NumaHintingFaults => &[
            "task_numa_fault",
            "task_numa_fault_kprobe",
            "task_numa_fault_breakpoint",
        ],
        Feature::UserPageFaults => &["page_fault_user"],
        Feature::KvmPageFaults => &["kvm_page_fault"],
        Feature::NumaBalancingMoves => &["sched_move_numa", "sched_swap_numa"],
    }
}

impl TelemetrySource for EbpfTelemetry {
    fn cost(&self) -> Option<ProgramCost> {
        let all = self.telemetry.cost().ok()?;
        Some(all.iter().fold(
            ProgramCost {
                program: "all".into(),
                ..Default::default()
            },
            |mut t, c| {
                t.run_count += c.run_count;
                t.run_time_ns += c.run_time_ns;
                t
            },
        ))
    }

    fn status(&self) -> TelemetryStatus {
        let cost: Vec<ProgramCost> = self.telemetry.cost().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "reading program cost");
            Vec::new()
        });
        let features: Vec<FeatureStatus> = self
            .telemetry
            .feature_paths()
            .iter()
            .map(|paths| {
                let f = &paths.feature;
                let state = paths.state();
                let (count, ns) = cost
                    .iter()
                    .filter(|c| programs_of(*f).contains(&c.program.as_str()))
                    .fold((0u64, 0u64), |(n, t), c| {
                        (n + c.run_count, t + c.run_time_ns)
                    });
                let ns_per_event = (count > 0).then(|| {
                    ProgramCost {
                        program: String::new(),
                        run_count: count,
                        run_time_ns: ns,
                    }
                    .ns_per_event()
                });
                FeatureStatus {
                    name: f.name().to_owned(),
                    available: state == FeatureState::Active,
                    reason: match state {
                        FeatureState::Active => None,
                        FeatureState::Unavailable(r) => Some(r),
                    },
                    ns_per_event,
                    path: paths.active.clone(),
                    refused: paths.refused.clone(),
                }
            })
            .collect();
        TelemetryStatus {
            available: features.iter().any(|f| f.available),
            reason: None,
            features,
        }
    }

    fn track(&mut self, vms: &[TrackedVm]) {
        let mut wanted: HashMap<u32, TrackedThread> = HashMap::new();
        for vm in vms {
            for &(vcpu_index, tid) in &vm.vcpus {
                wanted.insert(
                    tid,
                    TrackedThread {
                        vm_pid: vm.pid,
                        vcpu_index,
                    },
                );
            }
            for &tid in &vm.other_threads {
                wanted.entry(tid).or_insert(TrackedThread {
                    vm_pid: vm.pid,
                    vcpu_index: TrackedThread::NOT_A_VCPU,
                });
            }
        }
        // The telemetry's own list is the truth (it may hold threads tracked before
        // we started), listed now and then (`LIST_MAP_EVERY_PASSES`).
        let mut present: HashSet<u32> = if self.passes_since_listing >= LIST_MAP_EVERY_PASSES {
            self.passes_since_listing = 0;
            self.telemetry.tracked().map_or_else(
                |e| {
                    tracing::debug!(error = %e, "listing tracked threads");
                    HashSet::new()
                },
                |v| v.into_iter().collect(),
            )
        } else {
            self.passes_since_listing += 1;
            HashSet::new()
        };
        present.extend(self.tracked.keys());
        for tid in present {
            if !wanted.contains_key(&tid) {
                if let Err(e) = self.telemetry.untrack(tid) {
                    tracing::warn!(tid, error = %e, "untracking a thread");
                }
                self.tracked.remove(&tid);
            }
        }
        let mut untracked = 0usize;
        let mut first_error = None;
        for (&tid, &thread) in &wanted {
            if self.tracked.get(&tid) == Some(&thread) {
                continue;
            }
            match self.telemetry.track(tid, thread) {
                Ok(()) => {
                    self.tracked.insert(tid, thread);
                }
                Err(e) => {
                    untracked += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        // One warning per failure streak (a full thread map fails every pass until
        // threads exit), not one per thread and pass; the threads are retried.
        match first_error {
            Some(e) if self.untracked == 0 => tracing::warn!(
                threads = untracked,
                error = %e,
                "threads not tracked by the eBPF programs (retried every pass)"
            ),
            Some(e) => {
                tracing::debug!(threads = untracked, error = %e, "threads still not tracked")
            }
            None if self.untracked > 0 => tracing::info!("every thread is tracked again"),
            None => {}
        }
        self.untracked = untracked;
        let now: HashSet<VmId> = vms.iter().map(|v| v.pid).collect();
        for &gone in self.vms.difference(&now) {
            if let Err(e) = self.telemetry.forget_vm(gone) {
                tracing::warn!(vm = gone, error = %e, "forgetting an exited VM");
            }
            self.heat.remove(&gone);
        }
        self.vms = now;
    }

    fn active(&self) -> bool {
        true
    }

    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.wake.as_ref().map(|w| w.as_fd())
    }

    fn take_wakes(&mut self) -> Vec<crate::telemetry::WakeEvent> {
        self.wake.as_mut().map_or_else(Vec::new, |w| w.drain())
    }

    fn fill(&mut self, snapshot: &mut Snapshot, quiet: &BTreeSet<VmId>) {
        self.telemetry.flush_logs();
        // What happened before this observation is in it: drop the wakes about it
        // and listen for what follows.
        if let Some(w) = self.wake.as_mut() {
            w.drain();
            if let Err(e) = w.arm() {
                tracing::debug!(error = %e, "arming the programs' wake");
            }
        }
        let node_ids: Vec<u32> = snapshot.topology.nodes.iter().map(|n| n.id).collect();
        let elapsed_ns = self
            .last_fill_ns
            .map_or(0, |t| snapshot.now_ns.saturating_sub(t));
        self.last_fill_ns = Some(snapshot.now_ns);
        let mut regions = if self.telemetry.has(Feature::UserPageFaults) {
            match self.telemetry.hot_regions_by_vm() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!(error = %e, "reading hot regions");
                    Some(Default::default())
                }
            }
        } else {
            None
        };
        for vm in &mut snapshot.vms {
            if let Some(by_vm) = regions.as_mut() {
                let raw = by_vm.remove(&vm.pid).unwrap_or_default();
                vm.hot_regions = self.hot_regions(vm.pid, &raw, elapsed_ns);
            }
            if quiet.contains(&vm.pid) {
                continue;
            }
            for v in &mut vm.vcpus {
                match self.telemetry.read_thread(v.tid) {
                    Ok(t) => v.telemetry = t.to_vcpu_telemetry(&node_ids),
                    Err(e) => tracing::debug!(tid = v.tid, error = %e, "reading a vCPU"),
                }
            }
            match self.telemetry.vm_numa_moves(vm.pid) {
                Ok(m) => vm.kernel_numa_moves = m.move_numa + m.swap_numa,
                Err(e) => tracing::debug!(vm = vm.pid, error = %e, "reading NUMA moves"),
            }
        }
    }
}

/// Loads the eBPF programs of the running kernel as a telemetry source; when they
/// cannot load, a source that says why (trace prints it, the daemon logs it and
/// balances from procfs alone).
pub fn load_or_explain() -> Box<dyn TelemetrySource> {
    match Telemetry::load() {
        Ok(t) => Box::new(EbpfTelemetry::new(t)),
        Err(e) => Box::new(NoTelemetry::new(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_halves_per_half_life_and_adds_new_faults() {
        assert_eq!(decayed_heat(8.0, 0, 10, 0), 8.0);
        assert_eq!(decayed_heat(8.0, 10, 10, 0), 4.0);
        assert_eq!(decayed_heat(8.0, 30, 10, 2), 3.0);
        assert!((decayed_heat(8.0, 5, 10, 0) - 8.0 / 2f64.sqrt()).abs() < 1e-9);
        // Old heat fades below any threshold; new faults always count in full.
        assert!(decayed_heat(1e6, 100 * HEAT_HALF_LIFE_NS, HEAT_HALF_LIFE_NS, 0) < MIN_HEAT);
        assert_eq!(decayed_heat(5.0, 1, 0, 7), 7.0);
    }
}
