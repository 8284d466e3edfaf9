//! The simulated world: topology, VMs with CPU demand over time, a scheduler model
//! and a NUMA performance model. It advances one simulated second per [`World::step`];
//! nothing in it reads a clock or sleeps, and the same scenario and seed give the
//! same run.
//!
//! # What is modelled, per simulated second
//! 1. **Arrivals and departures** of VMs (scenario times).
//! 2. **Scheduler.** A vCPU thread sits on one node. A thread whose affinity spans
//!    several nodes is moved, with probability `scatter_per_s`, to a random allowed
//!    node (the wide periodic load balance of seed 004, blind to memory), and the
//!    node-level balance then moves random floating threads from the busiest to the
//!    idlest allowed node while their load ratios differ by more than
//!    `kernel_imbalance`. A thread outside its affinity goes to the least loaded
//!    allowed node. New VMs start on the least loaded node.
//! 3. **Page migration** queued by `MigrateMemory` runs at `migrate_bytes_per_s` per
//!    VM (hot pages first when regions were given), never beyond the target's free
//!    memory, and costs `migrate_cpu_s_per_gib` of CPU on the target node.
//! 4. **CPU.** Each thread gets `demand * min(1, capacity / load)` of its node.
//! 5. **First touch.** A guest touches new memory at its fault rate until its working
//!    set is resident; pages land on the nodes where its vCPUs ran (or the nearest
//!    allowed node with room).
//! 6. **Performance** ([`super::perf`]): throughput from CPU received and the
//!    distance-weighted remote share of accesses.
//!
//! All randomness comes from one seeded [`Rng`].

use crate::model::{ActionOutcome, CpuSet, PlannedAction};

use super::perf::{PerfParams, distance_weight};
use super::rng::Rng;
use super::scenario::{self, Scenario};

pub(super) const GIB: f64 = (1u64 << 30) as f64;
pub(super) const MIB: f64 = (1u64 << 20) as f64;
pub(super) const HUGE_2M: u64 = 2 << 20;
/// Guest address space of each VM starts here; cells follow each other.
pub(super) const GUEST_BASE: u64 = 0x7f00_0000_0000;

/// One vCPU thread.
#[derive(Clone, Debug)]
pub struct SimVcpu {
    pub cell: usize,
    pub node: usize,
    pub cpus: CpuSet,
    pub allowed: u64,
    pub demand: f64,
    pub received: f64,
}

/// One guest cell (the whole VM when it has no cells): its memory per node.
#[derive(Clone, Debug)]
pub struct SimCell {
    pub hot: Vec<f64>,
    pub cold: Vec<f64>,
    pub target_bytes: f64,
    pub mem_bytes: f64,
}

impl SimCell {
    fn resident(&self) -> f64 {
        self.hot.iter().sum::<f64>() + self.cold.iter().sum::<f64>()
    }
    pub(super) fn on(&self, n: usize) -> f64 {
        self.hot[n] + self.cold[n]
    }
}

/// One simulated VM.
#[derive(Clone, Debug)]
pub struct SimVm {
    pub pid: u32,
    pub name: String,
    pub group: usize,
    pub alive: bool,
    pub gone: bool,
    pub start_s: u32,
    pub end_s: Option<u32>,
    pub vcpus: Vec<SimVcpu>,
    pub cells: Vec<SimCell>,
    pub mems_allowed: u64,
    pub initial_node: Option<usize>,
    pub manual_node: usize,
}

#[derive(Clone, Debug)]
/// A page migration queued by `MigrateMemory`, running at the migration bandwidth.
pub(super) struct MigJob {
    pub(super) vm: usize,
    pub(super) cell: Option<usize>,
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) remaining: f64,
    pub(super) hot_first: bool,
    /// Bytes moved so far.
    pub(super) moved: f64,
    /// The action whose end is reported ([`World::ended_moves`]) when the daemon's
    /// applier answered `Started` for it.
    pub(super) reported: Option<PlannedAction>,
}

/// Per-second measurements of a run.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub throughput_mb_s: Vec<f64>,
    pub offnode_m_s: Vec<f64>,
    /// CPU-weighted share of accesses that were off-node.
    pub offnode_share: Vec<f64>,
    pub migrated_bytes: f64,
}

/// The simulated host.
pub struct World {
    pub scenario: Scenario,
    pub params: PerfParams,
    rng: Rng,
    /// Current simulated second.
    pub t: u32,
    pub nn: usize,
    pub cpn: u32,
    pub cap: Vec<f64>,
    pub mem_total: Vec<f64>,
    pub dist: Vec<Vec<u32>>,
    pub vms: Vec<SimVm>,
    pub(super) jobs: Vec<MigJob>,
    mig_budget_used: Vec<f64>,
    /// Memory moves run in the background, as the daemon's Linux applier runs them:
    /// `MigrateMemory` answers `Started` and the outcome comes when the job ends.
    pub(super) background_moves: bool,
    /// Background moves that ended and were not yet collected: pid, outcome.
    ended: Vec<(PlannedAction, ActionOutcome)>,
    pub series: Series,
}

impl World {
    /// Builds the host at t = 0. `keep_initial_binding`: VMs marked
    /// `bound_initially` start confined to their initial node (every policy but
    /// "none", which runs without cpusets).
    pub fn new(scenario: Scenario, params: PerfParams, keep_initial_binding: bool) -> Self {
        let h = &scenario.host;
        let nn = h.nodes as usize;
        let dist = match &h.distance {
            Some(d) => d.clone(),
            None => (0..nn)
                .map(|i| {
                    (0..nn)
                        .map(|j| if i == j { 10 } else { h.remote_distance })
                        .collect()
                })
                .collect(),
        };
        let mut vms = Vec::new();
        let mut rr = 0usize;
        for (gi, g) in scenario.vms.iter().enumerate() {
            for i in 0..g.count {
                let initial_node = (!g.initial_nodes.is_empty())
                    .then(|| g.initial_nodes[i as usize % g.initial_nodes.len()] as usize);
                let manual_node = if !g.manual_nodes.is_empty() {
                    g.manual_nodes[i as usize % g.manual_nodes.len()] as usize
                } else if let Some(n) = initial_node {
                    n
                } else {
                    let n = rr % nn;
                    rr += 1;
                    n
                };
                let ncells = g.cells.max(1) as usize;
                let all = CpuSet::first_n(h.nodes * h.cpus_per_node);
                let vcpus = (0..g.vcpus as usize)
                    .map(|v| SimVcpu {
                        cell: v * ncells / g.vcpus as usize,
                        node: 0,
                        cpus: all.clone(),
                        allowed: all_nodes(nn),
                        demand: 0.0,
                        received: 0.0,
                    })
                    .collect();
                let cells = (0..ncells)
                    .map(|_| SimCell {
                        hot: vec![0.0; nn],
                        cold: vec![0.0; nn],
                        target_bytes: g.resident_gib * GIB / ncells as f64,
                        mem_bytes: g.mem_gib * GIB / ncells as f64,
                    })
                    .collect();
                let mut vm = SimVm {
                    pid: 1000 + vms.len() as u32,
                    name: format!("{}-{:02}", g.name, i + 1),
                    group: gi,
                    alive: false,
                    gone: false,
                    start_s: g.start_s,
                    end_s: g.end_s,
                    vcpus,
                    cells,
                    mems_allowed: all_nodes(nn),
                    initial_node,
                    manual_node,
                };
                let bind = if g.operator_pinned {
                    Some(manual_node)
                } else if keep_initial_binding && g.bound_initially {
                    initial_node
                } else {
                    None
                };
                if let Some(n) = bind {
                    for v in &mut vm.vcpus {
                        v.cpus = node_cpus(n, h.cpus_per_node);
                        v.allowed = 1 << n;
                    }
                    vm.mems_allowed = 1 << n;
                }
                vms.push(vm);
            }
        }
        let cap = vec![h.cpus_per_node as f64; nn];
        let mem_total = vec![h.mem_per_node_gib * GIB; nn];
        let rng = Rng::new(scenario.seed);
        let cpn = h.cpus_per_node;
        let mut host = Self {
            scenario,
            params,
            rng,
            t: 0,
            nn,
            cpn,
            cap,
            mem_total,
            dist,
            vms,
            jobs: Vec::new(),
            mig_budget_used: Vec::new(),
            background_moves: false,
            ended: Vec::new(),
            series: Series::default(),
        };
        host.arrivals();
        host
    }

    pub(super) fn group(&self, vm: usize) -> &scenario::VmGroup {
        &self.scenario.vms[self.vms[vm].group]
    }

    /// Free bytes of node `n` (total minus every VM's memory there).
    pub fn free_bytes(&self, n: usize) -> f64 {
        let used: f64 = self
            .vms
            .iter()
            .filter(|v| v.alive)
            .flat_map(|v| v.cells.iter())
            .map(|c| c.on(n))
            .sum();
        (self.mem_total[n] - used).max(0.0)
    }

    pub(super) fn hugetlb_used(&self, n: usize) -> f64 {
        self.vms
            .iter()
            .enumerate()
            .filter(|(i, v)| v.alive && self.group(*i).hugepages)
            .flat_map(|(_, v)| v.cells.iter())
            .map(|c| c.on(n))
            .sum()
    }

    pub(super) fn node_load(&self) -> Vec<f64> {
        let mut load = vec![0.0; self.nn];
        for vm in self.vms.iter().filter(|v| v.alive) {
            for v in &vm.vcpus {
                load[v.node] += v.demand;
            }
        }
        load
    }

    fn arrivals(&mut self) {
        let t = self.t;
        for i in 0..self.vms.len() {
            let (start, end) = (self.vms[i].start_s, self.vms[i].end_s);
            if !self.vms[i].alive && !self.vms[i].gone && start <= t {
                self.vms[i].alive = true;
                let g = self.group(i).clone();
                for v in &mut self.vms[i].vcpus {
                    v.demand = g.demand_at(t);
                }
                // Kernel fork balancing: the least loaded allowed node.
                let load = self.node_load();
                let allowed = self.vms[i].vcpus[0].allowed;
                let start_node = self.vms[i].initial_node.unwrap_or_else(|| {
                    (0..self.nn)
                        .filter(|n| allowed & (1 << n) != 0)
                        .min_by(|&a, &b| load[a].total_cmp(&load[b]))
                        .unwrap_or(0)
                });
                for v in &mut self.vms[i].vcpus {
                    v.node = start_node;
                }
                let init = g.initial_resident_gib * GIB / self.vms[i].cells.len() as f64;
                let hot_share = self.params.hot_mem_share;
                let node = if self.vms[i].mems_allowed & (1 << start_node) != 0 {
                    start_node
                } else {
                    self.vms[i].mems_allowed.trailing_zeros() as usize
                };
                for c in &mut self.vms[i].cells {
                    c.hot[node] += init * hot_share;
                    c.cold[node] += init * (1.0 - hot_share);
                }
            }
            if self.vms[i].alive && end.is_some_and(|e| e <= t) {
                self.vms[i].alive = false;
                self.vms[i].gone = true;
                for c in &mut self.vms[i].cells {
                    c.hot.iter_mut().for_each(|b| *b = 0.0);
                    c.cold.iter_mut().for_each(|b| *b = 0.0);
                }
                let (gone, kept): (Vec<MigJob>, Vec<MigJob>) = std::mem::take(&mut self.jobs)
                    .into_iter()
                    .partition(|j| j.vm == i);
                self.jobs = kept;
                for j in gone {
                    self.end_job(&j, ActionOutcome::VmGone);
                }
            }
        }
    }

    /// Restricts where a VM's memory may be allocated (cpuset.mems, numactl
    /// --membind): used by the baselines that bind memory.
    pub fn set_mems(&mut self, pid: u32, nodes: u64) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.pid == pid)
            && nodes != 0
        {
            vm.mems_allowed = nodes;
        }
    }

    /// Moves all of a VM's memory to `node` instantly and for free: only the oracle
    /// (a reference, not a policy) uses this.
    pub fn teleport_memory(&mut self, pid: u32, cell: Option<usize>, node: usize) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.pid == pid) {
            for (ci, c) in vm.cells.iter_mut().enumerate() {
                if cell.is_some_and(|x| x != ci) {
                    continue;
                }
                let (h, k): (f64, f64) = (c.hot.iter().sum(), c.cold.iter().sum());
                c.hot.iter_mut().for_each(|b| *b = 0.0);
                c.cold.iter_mut().for_each(|b| *b = 0.0);
                c.hot[node] = h;
                c.cold[node] = k;
            }
        }
    }

    /// Index of the VM with this pid.
    pub fn vm_index(&self, pid: u32) -> Option<usize> {
        self.vms.iter().position(|v| v.pid == pid)
    }

    /// Bytes of migration still queued for a VM.
    pub fn queued_bytes(&self, pid: u32) -> f64 {
        let Some(i) = self.vm_index(pid) else {
            return 0.0;
        };
        self.jobs
            .iter()
            .filter(|j| j.vm == i)
            .map(|j| j.remaining)
            .sum()
    }

    /// Advances the host by one second.
    pub fn step(&mut self) {
        let t = self.t;
        // Demand.
        for i in 0..self.vms.len() {
            if !self.vms[i].alive {
                continue;
            }
            let d = self.group(i).demand_at(t);
            for v in &mut self.vms[i].vcpus {
                v.demand = d;
            }
        }
        self.schedule();
        let mig_cpu = self.run_migrations();
        // CPU shares.
        let load = self.node_load();
        for vm in self.vms.iter_mut().filter(|v| v.alive) {
            for v in &mut vm.vcpus {
                let n = v.node;
                let cap = (self.cap[n] - mig_cpu[n]).max(0.0);
                let share = if load[n] > cap && load[n] > 0.0 {
                    cap / load[n]
                } else {
                    1.0
                };
                v.received = v.demand * share;
            }
        }
        self.first_touch();
        self.measure();
        self.t += 1;
        self.arrivals();
    }

    fn schedule(&mut self) {
        let nn = self.nn;
        let p = self.params.scatter_per_s;
        let mut load = self.node_load();
        // Affinity violations and wide scatter.
        for i in 0..self.vms.len() {
            if !self.vms[i].alive {
                continue;
            }
            for j in 0..self.vms[i].vcpus.len() {
                let (allowed, node, d) = {
                    let v = &self.vms[i].vcpus[j];
                    (v.allowed, v.node, v.demand)
                };
                let new = if allowed & (1 << node) == 0 {
                    (0..nn)
                        .filter(|n| allowed & (1 << n) != 0)
                        .min_by(|&a, &b| {
                            (load[a] / self.cap[a]).total_cmp(&(load[b] / self.cap[b]))
                        })
                } else if allowed.count_ones() > 1 && self.rng.f64() < p {
                    let opts: Vec<usize> = (0..nn).filter(|n| allowed & (1 << n) != 0).collect();
                    Some(opts[self.rng.below(opts.len())])
                } else {
                    None
                };
                if let Some(n) = new {
                    load[node] -= d;
                    load[n] += d;
                    self.vms[i].vcpus[j].node = n;
                }
            }
        }
        // Node-level balance of floating threads.
        for _ in 0..4 * nn * 8 {
            let ratio = |n: usize, l: &[f64]| l[n] / self.cap[n];
            let hi = (0..nn).max_by(|&a, &b| ratio(a, &load).total_cmp(&ratio(b, &load)));
            let lo = (0..nn).min_by(|&a, &b| ratio(a, &load).total_cmp(&ratio(b, &load)));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                break;
            };
            let (rh, rl) = (ratio(hi, &load), ratio(lo, &load));
            if rh - rl <= self.params.kernel_imbalance * rh.max(0.01) || rh < 1.0 {
                break;
            }
            let cands: Vec<(usize, usize)> = self
                .vms
                .iter()
                .enumerate()
                .filter(|(_, v)| v.alive)
                .flat_map(|(i, v)| {
                    v.vcpus
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| {
                            c.node == hi && c.allowed & (1 << lo) != 0 && c.demand > 0.0
                        })
                        .map(move |(j, _)| (i, j))
                })
                .collect();
            if cands.is_empty() {
                break;
            }
            let (i, j) = cands[self.rng.below(cands.len())];
            let d = self.vms[i].vcpus[j].demand;
            if (load[lo] + d) / self.cap[lo] > rh {
                break;
            }
            load[hi] -= d;
            load[lo] += d;
            self.vms[i].vcpus[j].node = lo;
        }
    }

    /// Runs queued page migrations; returns CPU-seconds spent per node.
    fn run_migrations(&mut self) -> Vec<f64> {
        let mut cpu = vec![0.0; self.nn];
        self.mig_budget_used = vec![0.0; self.vms.len()];
        let bw = self.params.migrate_bytes_per_s;
        let mut free: Vec<f64> = (0..self.nn).map(|n| self.free_bytes(n)).collect();
        let jobs = std::mem::take(&mut self.jobs);
        let mut left = Vec::new();
        for mut job in jobs {
            if !self.vms[job.vm].alive {
                self.end_job(&job, ActionOutcome::VmGone);
                continue;
            }
            let budget = bw - self.mig_budget_used[job.vm];
            if budget <= 0.0 {
                left.push(job);
                continue;
            }
            let want = job.remaining.min(budget).min(free[job.to]);
            let mut moved = 0.0;
            let ncells = self.vms[job.vm].cells.len();
            let cells: Vec<usize> = match job.cell {
                Some(c) => vec![c],
                None => (0..ncells).collect(),
            };
            let total_from: f64 = cells
                .iter()
                .map(|&c| self.vms[job.vm].cells[c].on(job.from))
                .sum();
            if total_from <= 0.0 {
                self.end_job(&job, job_outcome(&job));
                continue;
            }
            for &ci in &cells {
                let c = &mut self.vms[job.vm].cells[ci];
                let share = if cells.len() == 1 {
                    want
                } else {
                    want * c.on(job.from) / total_from
                };
                let (h, k) = if job.hot_first {
                    let h = share.min(c.hot[job.from]);
                    (h, (share - h).min(c.cold[job.from]))
                } else {
                    let on = c.on(job.from).max(1.0);
                    let h = (share * c.hot[job.from] / on).min(c.hot[job.from]);
                    (h, (share - h).min(c.cold[job.from]))
                };
                c.hot[job.from] -= h;
                c.hot[job.to] += h;
                c.cold[job.from] -= k;
                c.cold[job.to] += k;
                moved += h + k;
            }
            free[job.to] -= moved;
            free[job.from] += moved;
            job.remaining -= moved;
            job.moved += moved;
            self.mig_budget_used[job.vm] += moved;
            self.series.migrated_bytes += moved;
            cpu[job.to] += moved / GIB * self.params.migrate_cpu_s_per_gib;
            let from_left: f64 = cells
                .iter()
                .map(|&c| self.vms[job.vm].cells[c].on(job.from))
                .sum();
            if job.remaining > 1.0 && from_left > 1.0 && moved > 0.0 {
                left.push(job);
            } else {
                self.end_job(&job, job_outcome(&job));
            }
        }
        self.jobs = left;
        cpu
    }

    /// Records the end of a job whose outcome the daemon's applier owes.
    fn end_job(&mut self, job: &MigJob, outcome: ActionOutcome) {
        if let Some(action) = &job.reported {
            self.ended.push((action.clone(), outcome));
        }
    }

    /// Outcomes of background moves that ended since the last call, in the order
    /// they ended (per VM, the order they were queued in).
    pub fn ended_moves(&mut self) -> Vec<(PlannedAction, ActionOutcome)> {
        std::mem::take(&mut self.ended)
    }

    fn first_touch(&mut self) {
        let nn = self.nn;
        let hot_share = self.params.hot_mem_share;
        let mut free: Vec<f64> = (0..nn).map(|n| self.free_bytes(n)).collect();
        for i in 0..self.vms.len() {
            if !self.vms[i].alive {
                continue;
            }
            let rate = self.group(i).fault_mib_s * MIB / self.vms[i].cells.len() as f64;
            let mems = self.vms[i].mems_allowed;
            for ci in 0..self.vms[i].cells.len() {
                let want = (self.vms[i].cells[ci].target_bytes - self.vms[i].cells[ci].resident())
                    .min(rate);
                if want <= 0.0 {
                    continue;
                }
                let mut run = vec![0.0; nn];
                for v in self.vms[i].vcpus.iter().filter(|v| v.cell == ci) {
                    run[v.node] += v.received.max(1e-3);
                }
                let total: f64 = run.iter().sum();
                for (n, &r) in run.iter().enumerate() {
                    if r <= 0.0 {
                        continue;
                    }
                    let mut bytes = want * r / total;
                    // Preferred node first, then the nearest allowed node with room.
                    let mut order: Vec<usize> = (0..nn).filter(|m| mems & (1 << m) != 0).collect();
                    order.sort_by_key(|&m| (self.dist[n][m], m));
                    for m in order {
                        if bytes <= 0.0 {
                            break;
                        }
                        let b = bytes.min(free[m]);
                        if b <= 0.0 {
                            continue;
                        }
                        free[m] -= b;
                        bytes -= b;
                        let c = &mut self.vms[i].cells[ci];
                        c.hot[m] += b * hot_share;
                        c.cold[m] += b * (1.0 - hot_share);
                    }
                }
            }
        }
    }

    /// Access pattern of one cell: share of its accesses to each node.
    fn access_share(&self, c: &SimCell) -> Vec<f64> {
        let (h, k): (f64, f64) = (c.hot.iter().sum(), c.cold.iter().sum());
        let ha = self.params.hot_access_share;
        (0..self.nn)
            .map(|m| {
                let hot = if h > 0.0 { c.hot[m] / h } else { 0.0 };
                let cold = if k > 0.0 { c.cold[m] / k } else { 0.0 };
                match (h > 0.0, k > 0.0) {
                    (true, true) => ha * hot + (1.0 - ha) * cold,
                    (true, false) => hot,
                    (false, true) => cold,
                    _ => 0.0,
                }
            })
            .collect()
    }

    /// Throughput, off-node rate and off-node share of one VM this second.
    pub fn vm_perf(&self, i: usize) -> (f64, f64, f64) {
        let vm = &self.vms[i];
        let p = &self.params;
        let (mut tp, mut off, mut cpu) = (0.0, 0.0, 0.0);
        for (ci, c) in vm.cells.iter().enumerate() {
            let acc = self.access_share(c);
            for v in vm.vcpus.iter().filter(|v| v.cell == ci) {
                let n = v.node;
                let remote_w: f64 = (0..self.nn)
                    .map(|m| acc[m] * distance_weight(self.dist[n][m]))
                    .sum();
                let offshare = if acc.iter().sum::<f64>() > 0.0 {
                    1.0 - acc[n]
                } else {
                    0.0
                };
                tp += p.k_mb_per_cpu_s * v.received / (1.0 + p.alpha * remote_w);
                off += p.accesses_m_per_cpu_s * v.received * offshare;
                cpu += v.received;
            }
        }
        (
            tp,
            off,
            if cpu > 0.0 {
                off / (p.accesses_m_per_cpu_s * cpu)
            } else {
                0.0
            },
        )
    }

    fn measure(&mut self) {
        let (mut tp, mut off, mut cpu_off, mut cpu) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..self.vms.len() {
            if !self.vms[i].alive {
                continue;
            }
            let (a, b, s) = self.vm_perf(i);
            let c: f64 = self.vms[i].vcpus.iter().map(|v| v.received).sum();
            tp += a;
            off += b;
            cpu_off += s * c;
            cpu += c;
        }
        self.series.throughput_mb_s.push(tp);
        self.series.offnode_m_s.push(off);
        self.series
            .offnode_share
            .push(if cpu > 0.0 { cpu_off / cpu } else { 0.0 });
    }

    /// Largest share of each live VM's memory on a single node (seed 004's
    /// numa_maps view), for checking the scatter model.
    pub fn largest_node_share(&self) -> Vec<f64> {
        self.vms
            .iter()
            .filter(|v| v.alive)
            .map(|v| {
                let per: Vec<f64> = (0..self.nn)
                    .map(|n| v.cells.iter().map(|c| c.on(n)).sum())
                    .collect();
                let tot: f64 = per.iter().sum();
                if tot > 0.0 {
                    per.iter().cloned().fold(0.0, f64::max) / tot
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// What a background move that ended reports: done when nothing it was asked to
/// move is left, else how far it got (the target filled up or the source drained).
fn job_outcome(job: &MigJob) -> ActionOutcome {
    if job.remaining <= 1.0 {
        ActionOutcome::Done {
            moved_bytes: job.moved as u64,
        }
    } else {
        ActionOutcome::Partial {
            moved_bytes: job.moved as u64,
            left_bytes: job.remaining as u64,
            why: "stopped early: the source drained or the target is full".into(),
        }
    }
}

/// Mask of nodes `0..nn`.
pub fn all_nodes(nn: usize) -> u64 {
    if nn >= 64 { u64::MAX } else { (1u64 << nn) - 1 }
}

/// CPUs of node `n` (numbered node-major).
pub fn node_cpus(n: usize, cpn: u32) -> CpuSet {
    (n as u32 * cpn..(n as u32 + 1) * cpn).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Applier, Observer};
    use crate::model::{Action, PlannedAction};

    /// Runs `secs` seconds; `bind` confines VM i to node i % nodes first.
    fn run_for(s: &Scenario, keep: bool, secs: u32, bind: bool) -> World {
        let mut host = World::new(s.clone(), PerfParams::default(), keep);
        if bind {
            let nn = host.nn;
            for (i, vm) in host.vms.iter_mut().enumerate() {
                let n = i % nn;
                for v in &mut vm.vcpus {
                    v.cpus = node_cpus(n, host.cpn);
                    v.allowed = 1 << n;
                }
            }
        }
        for _ in 0..secs {
            let _ = host.observe();
            host.step();
        }
        host
    }

    #[test]
    fn floating_vcpus_scatter_memory_and_bound_ones_keep_it_local() {
        let s = Scenario::load("seed-40vm").unwrap();
        let free = run_for(&s, false, 120, false);
        let shares = free.largest_node_share();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        assert!(mean < 0.8, "memory should scatter, largest share {mean}");
        assert!(free.series.offnode_share.last().unwrap() > &0.5);
        let bound = run_for(&s, false, 120, true);
        assert!(bound.largest_node_share().iter().all(|&x| x > 0.999));
        assert_eq!(*bound.series.offnode_share.last().unwrap(), 0.0);
    }

    #[test]
    fn observed_snapshot_matches_the_host() {
        let s = Scenario::load("big-vm").unwrap();
        let mut host = run_for(&s, true, 30, false);
        let snap = host.observe().unwrap();
        assert_eq!(snap.topology.nodes.len(), 4);
        assert_eq!(snap.topology.distance[0][1], 16);
        let big = snap.vms.iter().find(|v| v.name == "big-01").unwrap();
        assert_eq!(big.cells.len(), 2);
        assert_eq!(big.cells[1].vcpus, (6..12).collect::<Vec<u32>>());
        let cell_sum: u64 = big.cells.iter().flat_map(|c| &c.bytes_per_node).sum();
        let vm_sum = big.memory.resident_bytes();
        assert!(cell_sum.abs_diff(vm_sum) < 16, "{cell_sum} vs {vm_sum}");
        for n in &snap.topology.nodes {
            assert!(n.memory.free_bytes <= n.memory.total_bytes);
        }
    }

    #[test]
    fn migration_moves_hot_pages_first_at_the_bandwidth() {
        let s = Scenario::load("seed-20vm-squeezed").unwrap();
        let mut host = World::new(s, PerfParams::default(), true);
        let snap = host.observe().unwrap();
        let vm = &snap.vms[0];
        let from = vm
            .memory
            .bytes_per_node
            .iter()
            .position(|&b| b > 0)
            .unwrap();
        let to = (from + 2) % 4;
        let a = PlannedAction {
            vm: vm.pid,
            action: Action::MigrateMemory {
                from: from as u32,
                to: to as u32,
                regions: vec![(0, 1)],
                max_bytes: 1 << 40,
                within: None,
            },
            reason: crate::model::Reason::Locality {
                locality_pct: 0.0,
                target_pct: 95.0,
            },
        };
        assert!(matches!(
            host.apply(&snap, &a),
            ActionOutcome::Partial { .. }
        ));
        host.step();
        let c = &host.vms[0].cells[0];
        let moved = c.on(to);
        assert!(
            (moved - host.params.migrate_bytes_per_s).abs() < 1.0,
            "{moved}"
        );
        // Hot pages (20 % of 1.8 GiB = 368 MiB) all moved first.
        assert!(c.hot[from] < 1.0, "hot left behind: {}", c.hot[from]);
    }
}
