//! Samples ground truth about the running fake VMs.
//!
//! vCPU placement is polled every 250 ms (the CPU each vCPU last ran on and its
//! CPU time), so "where a VM runs" is CPU time per node over an interval, not one
//! instantaneous look. Memory placement is read from numa_maps at each sample.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use vmbalancer_tests::lab::metrics;
use vmbalancer_tests::lab::protocol::{Sample, Summary, VmTruth};
use vmbalancer_tests::lab::truth::{self, NodeInfo};

use crate::vms::RunningVm;

const POLL: Duration = Duration::from_millis(250);

struct Track {
    name: String,
    pid: u32,
    vcpus: u32,
    progress: std::path::PathBuf,
    threads: Vec<(u32, u32)>,
    last_ticks: HashMap<u32, u64>,
    interval_ticks: Vec<u64>,
    last_nodes: Vec<usize>,
    last_touches: u64,
    first_touches: Option<u64>,
}

pub struct Sampler {
    n_nodes: usize,
    cpu_node: BTreeMap<u32, usize>,
    clk_tck: f64,
    tracks: Vec<Track>,
    samples: Vec<Sample>,
    vmstat0: BTreeMap<String, u64>,
    interval_start: Instant,
}

fn read_touches(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("touches")?
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).sum())
        })
        .unwrap_or(0)
}

impl Sampler {
    pub fn new(nodes: &[NodeInfo], vms: &[RunningVm]) -> anyhow::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let clk_tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let tracks = vms
            .iter()
            .map(|v| Track {
                name: v.name.clone(),
                pid: v.pid,
                vcpus: v.vcpus,
                progress: v.progress.clone(),
                threads: Vec::new(),
                last_ticks: HashMap::new(),
                interval_ticks: vec![0; nodes.len()],
                last_nodes: Vec::new(),
                last_touches: read_touches(&v.progress),
                first_touches: None,
            })
            .collect();
        Ok(Self {
            n_nodes: nodes.len(),
            cpu_node: truth::cpu_to_node(nodes),
            clk_tck,
            tracks,
            samples: Vec::new(),
            vmstat0: truth::read_vmstat(Path::new("/"))?,
            interval_start: Instant::now(),
        })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn poll(&mut self) {
        let root = Path::new("/");
        for t in &mut self.tracks {
            if t.threads.len() < t.vcpus as usize {
                t.threads = truth::vcpu_threads(root, t.pid).unwrap_or_default();
            }
            t.last_nodes.clear();
            for &(tid, _) in &t.threads {
                let Ok(stat) = truth::read_task_stat(root, t.pid, tid) else {
                    continue;
                };
                let node = self.cpu_node.get(&stat.processor).copied().unwrap_or(0);
                let prev = t
                    .last_ticks
                    .insert(tid, stat.cpu_ticks)
                    .unwrap_or(stat.cpu_ticks);
                t.interval_ticks[node] += stat.cpu_ticks.saturating_sub(prev);
                t.last_nodes.push(node);
            }
        }
    }

    pub fn poll_for(&mut self, d: Duration) {
        self.poll_until(Instant::now() + d);
    }

    pub fn poll_until(&mut self, due: Instant) {
        loop {
            self.poll();
            let now = Instant::now();
            if now >= due {
                return;
            }
            std::thread::sleep(POLL.min(due - now));
        }
    }

    /// Takes a sample at `t_s` and starts a new interval.
    pub fn sample(&mut self, t_s: f64) -> Sample {
        let root = Path::new("/");
        let dt = self.interval_start.elapsed().as_secs_f64().max(1e-3);
        self.interval_start = Instant::now();
        if self.samples.is_empty()
            && let Ok(v) = truth::read_vmstat(root)
        {
            self.vmstat0 = v;
        }
        let mut load = vec![0.0; self.n_nodes];
        let mut vms = Vec::new();
        for t in &mut self.tracks {
            let bytes = truth::read_numa_maps(root, t.pid)
                .map(|m| truth::numa_maps_bytes_per_node(&m, self.n_nodes))
                .unwrap_or_else(|_| vec![0; self.n_nodes]);
            let main = metrics::main_node(&t.interval_ticks, &t.last_nodes);
            for (n, &ticks) in t.interval_ticks.iter().enumerate() {
                load[n] += ticks as f64 / self.clk_tck / dt;
            }
            let touches = read_touches(&t.progress);
            t.first_touches.get_or_insert(touches);
            let rate = touches.saturating_sub(t.last_touches) as f64 / dt / t.vcpus.max(1) as f64;
            t.last_touches = touches;
            vms.push(VmTruth {
                name: t.name.clone(),
                pid: t.pid,
                locality: metrics::locality(&bytes, main),
                bytes_per_node: bytes,
                vcpu_ticks_per_node: std::mem::replace(
                    &mut t.interval_ticks,
                    vec![0; self.n_nodes],
                ),
                vcpu_nodes: t.last_nodes.clone(),
                main_node: main,
                touches_per_vcpu_s: rate,
            });
        }
        let weighted: Vec<(f64, u64)> = vms
            .iter()
            .map(|v| (v.locality, v.bytes_per_node.iter().sum()))
            .collect();
        let sample = Sample {
            t_s,
            locality_mean: metrics::weighted_mean(&weighted),
            locality_min: vms.iter().map(|v| v.locality).fold(1.0, f64::min),
            vcpu_load_per_node: load,
            vms,
        };
        self.samples.push(sample.clone());
        sample
    }

    /// The run's summary, from the first sample (t = 0) to now.
    pub fn summary(&self, balancer: &str, kernel: &str, run_s: f64) -> Summary {
        let vmstat = truth::read_vmstat(Path::new("/")).unwrap_or_default();
        let delta = |k: &str| {
            vmstat
                .get(k)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.vmstat0.get(k).copied().unwrap_or(0))
        };
        let locality: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|s| (s.t_s, s.locality_mean))
            .collect();
        let balances: Vec<f64> = self
            .samples
            .iter()
            .skip(1)
            .map(|s| metrics::cpu_balance(&s.vcpu_load_per_node))
            .collect();
        let work: u64 = self
            .tracks
            .iter()
            .map(|t| {
                t.last_touches
                    .saturating_sub(t.first_touches.unwrap_or(t.last_touches))
            })
            .sum();
        let vcpus: u32 = self.tracks.iter().map(|t| t.vcpus).sum();
        let span_s = self.samples.last().map_or(0.0, |s| s.t_s).max(1e-3);
        Summary {
            balancer: balancer.into(),
            kernel: kernel.into(),
            vms: self.tracks.len(),
            time_to_090_s: metrics::time_to(&locality, 0.9),
            time_to_095_s: metrics::time_to(&locality, 0.95),
            locality,
            numa_pages_migrated: delta("numa_pages_migrated"),
            pgmigrate_success: delta("pgmigrate_success"),
            cpu_balance: if balances.is_empty() {
                1.0
            } else {
                balances.iter().sum::<f64>() / balances.len() as f64
            },
            work_touches: work,
            touches_per_vcpu_s: work as f64 / span_s / vcpus.max(1) as f64,
            run_s,
        }
    }
}
