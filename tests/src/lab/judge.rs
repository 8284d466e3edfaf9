//! Pure judgements on a run: which sample an assertion looks at, pages misplaced at
//! the start, hot-set-first ordering, nodes in use, and what vmbalancer's status and
//! journal documents say.
//!
//! Kept apart from the harness (which reads /proc and runs commands) so every
//! definition an assertion relies on is written down once and tested on synthetic
//! samples and documents.

use serde_json::Value;

use super::protocol::{CellTruth, Sample, VmTruth};
use super::scenario::{Measure, Which};

/// Bytes per page in [`misplaced_pages_at_start`] (the kernel's base page; the
/// migration counters count base pages).
pub const PAGE_BYTES: u64 = 4096;

/// A node is among a VM's end nodes when it had at least this share of the VM's vCPU
/// time in the last interval.
pub const END_NODE_MIN_SHARE: f64 = 0.2;

/// The first sample at or after `at_s`, or the last sample without `at_s`.
pub fn sample_at(samples: &[Sample], at_s: Option<f64>) -> Option<&Sample> {
    match at_s {
        None => samples.last(),
        Some(t) => samples.iter().find(|s| s.t_s >= t - 1e-9),
    }
}

/// The locality an assertion judges at a sample: `measure` as the mean over VMs
/// (page-weighted for pages, access-weighted means otherwise) or the worst VM.
/// `None` when the sample does not carry that measure (access-weighted and hot-set
/// locality need per-page truth, which an older guest did not send).
pub fn locality_at(s: &Sample, measure: Measure, which: Which) -> Option<f64> {
    let worst = |f: fn(&VmTruth) -> Option<f64>| {
        s.vms
            .iter()
            .map(f)
            .collect::<Option<Vec<f64>>>()
            .filter(|v| !v.is_empty())
            .map(|v| v.into_iter().fold(1.0, f64::min))
    };
    match (measure, which) {
        (Measure::Pages, Which::Mean) => Some(s.locality_mean),
        (Measure::Pages, Which::Min) => Some(s.locality_min),
        (Measure::Access, Which::Mean) => s.access_locality_mean,
        (Measure::Access, Which::Min) => worst(|v| v.access_locality),
        (Measure::Hot, Which::Mean) => s.hot_locality_mean,
        (Measure::Hot, Which::Min) => worst(|v| v.hot_locality),
    }
}

/// The first sample time at which `measure` (see [`locality_at`]) is at least `min`.
pub fn first_time_at_least(
    samples: &[Sample],
    measure: Measure,
    which: Which,
    min: f64,
) -> Option<f64> {
    samples
        .iter()
        .find(|s| locality_at(s, measure, which).is_some_and(|v| v >= min))
        .map(|s| s.t_s)
}

/// The nodes where a VM's vCPUs are at a sample: nodes with at least
/// [`END_NODE_MIN_SHARE`] of its vCPU time over the interval before it; when the
/// vCPUs did not run, the nodes they last ran on.
pub fn vcpu_home_nodes(vm: &VmTruth) -> Vec<usize> {
    let total: u64 = vm.vcpu_ticks_per_node.iter().sum();
    if total == 0 {
        let mut n = vm.vcpu_nodes.clone();
        n.sort_unstable();
        n.dedup();
        return n;
    }
    vm.vcpu_ticks_per_node
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t as f64 >= END_NODE_MIN_SHARE * total as f64)
        .map(|(n, _)| n)
        .collect()
}

/// Pages misplaced at the start: the fewest page moves that turn each VM's memory
/// layout at the first sample (t = 0) into its layout at the last sample, i.e. for
/// each node the pages that left it, `sum over nodes of max(0, start - end)`, in
/// [`PAGE_BYTES`] pages, summed over VMs (the process's own memory in numa_maps: guest
/// RAM, heap and stacks; shared program and library pages are not counted). A balancer that moves every page at most once moves
/// exactly these. Judged on memory, not on where vCPUs ran last: the last interval
/// may include the balancer's exit, when CPU sets are put back.
pub fn misplaced_pages_at_start(samples: &[Sample]) -> u64 {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return 0;
    };
    last.vms
        .iter()
        .filter_map(|end| {
            let start = first.vms.iter().find(|v| v.name == end.name)?;
            let left: u64 = start
                .bytes_per_node
                .iter()
                .enumerate()
                .map(|(n, &b)| b.saturating_sub(end.bytes_per_node.get(n).copied().unwrap_or(0)))
                .sum();
            Some(left / PAGE_BYTES)
        })
        .sum()
}

/// Pages of `vm` seen moving from the first sample at or after `after_s` (default:
/// the first sample) to the last; `None` without per-page truth for it.
pub fn vm_pages_moved(samples: &[Sample], vm: &str, after_s: Option<f64>) -> Option<u64> {
    let moved = |s: &Sample| s.vms.iter().find(|v| v.name == vm)?.pages_moved;
    let end = moved(samples.last()?)?;
    let start = moved(sample_at(samples, Some(after_s.unwrap_or(f64::MIN)))?)?;
    Some(end.saturating_sub(start))
}

/// vCPU nodes in use at a sample: nodes whose vCPU load was at least `min_load` CPUs.
pub fn nodes_used(sample: &Sample, min_load: f64) -> usize {
    sample
        .vcpu_load_per_node
        .iter()
        .filter(|&&l| l >= min_load)
        .count()
}

/// Hot-set-first for one VM, on the samples at or after `after_s`: from the first
/// sample whose cold-part locality is below `cold_max` (the VM's memory is not
/// home) to the first later sample at which it reaches `cold_max`, the hot set must
/// reach `hot_min` at some sample (the crossing sample included). Ok(detail) when
/// it did, Err(detail) when the cold part got there first, `None` when the cold part
/// never went from below `cold_max` to `cold_max` (nothing to judge).
pub fn hot_first_one(
    samples: &[Sample],
    vm: &str,
    after_s: Option<f64>,
    hot_min: f64,
    cold_max: f64,
) -> Option<Result<String, String>> {
    let from = after_s.unwrap_or(f64::MIN) - 1e-9;
    let series: Vec<(f64, f64, f64)> = samples
        .iter()
        .filter(|s| s.t_s >= from)
        .filter_map(|s| {
            let v = s.vms.iter().find(|v| v.name == vm)?;
            Some((s.t_s, v.hot_locality?, v.cold_locality?))
        })
        .collect();
    let below = series.iter().position(|&(_, _, c)| c < cold_max)?;
    let cold_at = below
        + series[below..]
            .iter()
            .position(|&(_, _, c)| c >= cold_max)?;
    let (t_cold, _, c) = series[cold_at];
    let hot_at = series[below..=cold_at]
        .iter()
        .find(|&&(_, h, _)| h >= hot_min)
        .map(|&(t, h, _)| (t, h));
    Some(match hot_at {
        Some((t_hot, h)) => Ok(format!(
            "{vm}: hot set {h:.2} at t={t_hot} s, cold part {c:.2} at t={t_cold} s"
        )),
        None => Err(format!(
            "{vm}: cold part reached {c:.2} at t={t_cold} s while the hot set was at {:.2}",
            series[cold_at].1
        )),
    })
}

/// Hot-set-first over a run: for `vm`, or for every VM with something to judge.
/// Returns (ok, detail).
pub fn hot_first(
    samples: &[Sample],
    vm: Option<&str>,
    after_s: Option<f64>,
    hot_min: f64,
    cold_max: f64,
) -> (bool, String) {
    let names: Vec<String> = match vm {
        Some(v) => vec![v.to_string()],
        None => samples
            .first()
            .map(|s| s.vms.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default(),
    };
    let judged: Vec<Result<String, String>> = names
        .iter()
        .filter_map(|n| hot_first_one(samples, n, after_s, hot_min, cold_max))
        .collect();
    if judged.is_empty() {
        let last: Vec<String> = samples
            .last()
            .map(|s| {
                s.vms
                    .iter()
                    .filter(|v| vm.is_none_or(|n| n == v.name))
                    .map(|v| {
                        format!(
                            "{} hot {:.2} cold {:.2}",
                            v.name,
                            v.hot_locality.unwrap_or(f64::NAN),
                            v.cold_locality.unwrap_or(f64::NAN)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return (
            false,
            format!(
                "no VM's cold part went from below {cold_max} to {cold_max}; at the end: {}",
                last.join(", ")
            ),
        );
    }
    let ok = judged.iter().all(Result::is_ok);
    let detail: Vec<String> = judged
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| e))
        .collect();
    (ok, detail.join("; "))
}

/// The variant name of an externally tagged enum value (`"X"` or `{"X": {...}}`).
fn variant(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(m) if m.len() == 1 => m.keys().next().map(String::as_str),
        _ => None,
    }
}

/// Decisions in a `vmbalancer status --json` document whose reason is `reason`.
pub fn count_decisions(status: &Value, reason: &str) -> u64 {
    status
        .get("decisions")
        .and_then(Value::as_array)
        .map_or(0, |d| {
            d.iter()
                .filter(|d| d.get("reason").and_then(variant) == Some(reason))
                .count() as u64
        })
}

/// Refusals in a status document whose JSON text contains `contains`: decisions
/// whose outcome is `Refused`, plus entries of a top-level `refusals` list.
pub fn count_refusals(status: &Value, contains: &str) -> u64 {
    let refused = status
        .get("decisions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("outcome").and_then(variant) == Some("Refused"));
    let listed = status
        .get("refusals")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    refused
        .chain(listed)
        .filter(|r| r.to_string().contains(contains))
        .count() as u64
}

/// VMs (journal keys) with an action still in flight in vmbalancer's journal.
pub fn journal_in_flight(journal: &Value) -> Vec<String> {
    journal
        .get("entries")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.get("in_flight").is_some_and(|f| !f.is_null()))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// VMs whose in-flight journal action is a memory move (`MigrateMemory`).
pub fn journal_migrating(journal: &Value) -> Vec<String> {
    journal
        .get("entries")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| {
                    e.pointer("/in_flight/action/action")
                        .and_then(variant)
                        .is_some_and(|a| a == "MigrateMemory")
                })
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The nodes a VM's vCPU threads were allowed on over the run: `(t_s, nodes)` from
/// t = 0 (the balancer's start), one entry per change, as the harness polled them.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeHistory {
    pub name: String,
    pub pid: u32,
    pub changes: Vec<(f64, Vec<usize>)>,
}

impl NodeHistory {
    /// The nodes just before `t_s` (the last entry earlier than it).
    pub fn nodes_before(&self, t_s: f64) -> Option<&[usize]> {
        self.changes
            .iter()
            .take_while(|(t, _)| *t < t_s - 1e-9)
            .last()
            .map(|(_, n)| n.as_slice())
    }

    /// Moves off one node: `(t_s, from, to nodes)` for each change whose previous
    /// set was exactly one node.
    pub fn moves(&self) -> Vec<(f64, usize, Vec<usize>)> {
        self.changes
            .windows(2)
            .filter_map(|w| match w[0].1.as_slice() {
                [from] if w[1].1 != w[0].1 => Some((w[1].0, *from, w[1].1.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A VM's known CPU load: its vCPUs times its duty cycle on its own clock, which
/// read `clock_at_t0_s` when the balancer started.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownLoad {
    pub name: String,
    pub vcpus: u32,
    /// `(at_s, duty_pct)` on the VM's clock.
    pub phases: Vec<(f64, f64)>,
    pub clock_at_t0_s: f64,
}

impl KnownLoad {
    /// CPUs it wants at `t_s` after the balancer started.
    pub fn cpus_at(&self, t_s: f64) -> f64 {
        let duty =
            super::scenario::duty_pct_at(self.phases.iter().copied(), t_s + self.clock_at_t0_s);
        f64::from(self.vcpus) * duty / 100.0
    }
}

/// One VM on the busiest node with the harness's own figures.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateTruth {
    pub name: String,
    pub pid: u32,
    /// Its resident memory (numa_maps, all nodes) at the last sample before the move.
    pub resident_bytes: u64,
    /// Its known load when it moved, in CPUs.
    pub cpus: f64,
}

impl CandidateTruth {
    pub fn bytes_per_cpu(&self) -> Option<f64> {
        (self.cpus > 0.0).then(|| self.resident_bytes as f64 / self.cpus)
    }
}

/// The first move off the busiest node and the VMs that were there, as the harness
/// saw them.
#[derive(Clone, Debug, PartialEq)]
pub struct CheapestMove {
    /// Seconds after t = 0 when the harness saw the move.
    pub t_s: f64,
    pub from: usize,
    pub to: Vec<usize>,
    /// Known load on `from` just before, in CPUs.
    pub load_cpus: f64,
    pub moved: String,
    /// The VMs confined to `from` just before, cheapest per CPU first.
    pub candidates: Vec<CandidateTruth>,
    /// Moves off other nodes seen before it: `(t_s, vm, from)`.
    pub earlier_elsewhere: Vec<(f64, String, usize)>,
}

impl CheapestMove {
    /// The cheapest VM per CPU of known load (idle VMs cannot win).
    pub fn cheapest(&self) -> Option<&CandidateTruth> {
        self.candidates.first().filter(|c| c.cpus > 0.0)
    }

    /// Whether the VM moved is the cheapest one and the first move off any node.
    pub fn holds(&self) -> bool {
        self.earlier_elsewhere.is_empty() && self.cheapest().is_some_and(|c| c.name == self.moved)
    }

    /// The figures in words, one VM after the other.
    pub fn describe(&self) -> String {
        let mib = |b: f64| b / f64::from(1u32 << 20);
        let vms: Vec<String> = self
            .candidates
            .iter()
            .map(|c| {
                format!(
                    "{} {:.0} MiB / {:.2} CPUs = {}{}",
                    c.name,
                    mib(c.resident_bytes as f64),
                    c.cpus,
                    c.bytes_per_cpu()
                        .map_or("idle".into(), |b| format!("{:.0} MiB/CPU", mib(b))),
                    if c.name == self.moved { " (moved)" } else { "" }
                )
            })
            .collect();
        let mut out = format!(
            "node {} with {:.2} CPUs of known load: {} moved first, at t={:.1} s to node(s) {:?}; \
             harness figures: {}",
            self.from,
            self.load_cpus,
            self.moved,
            self.t_s,
            self.to,
            vms.join(", ")
        );
        for (t, vm, from) in &self.earlier_elsewhere {
            out.push_str(&format!(
                "; but {vm} moved off node {from} before, at t={t:.1} s"
            ));
        }
        out
    }
}

/// Judges seed 004's cheapest move on the harness's own records: the node with the
/// most known load among those VMs were confined to when the first move off a
/// single node happened; the first VM moved off it; the VMs confined to it just
/// before, with their resident bytes from the last sample before the move and their
/// known loads. Err(why) when no VM was moved off a node, or none off the busiest.
pub fn cheapest_move(
    histories: &[NodeHistory],
    loads: &[KnownLoad],
    samples: &[Sample],
) -> Result<CheapestMove, String> {
    let mut moves: Vec<(f64, &NodeHistory, usize, Vec<usize>)> = histories
        .iter()
        .flat_map(|h| h.moves().into_iter().map(move |(t, f, to)| (t, h, f, to)))
        .collect();
    moves.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.name.cmp(&b.1.name)));
    let t_first = moves
        .first()
        .ok_or("no VM's vCPUs were moved off a node")?
        .0;
    let load_of = |name: &str, t: f64| {
        loads
            .iter()
            .find(|l| l.name == name)
            .map_or(0.0, |l| l.cpus_at(t))
    };
    let on_node = |node: usize, t: f64| -> Vec<&NodeHistory> {
        histories
            .iter()
            .filter(|h| h.nodes_before(t) == Some(&[node][..]))
            .collect()
    };
    // The busiest node when the first move came, of those VMs were confined to.
    let mut nodes: Vec<usize> = histories
        .iter()
        .filter_map(|h| match h.nodes_before(t_first) {
            Some([n]) => Some(*n),
            _ => None,
        })
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let node_load = |n: usize| -> f64 {
        on_node(n, t_first)
            .iter()
            .map(|h| load_of(&h.name, t_first))
            .sum()
    };
    let from = nodes
        .into_iter()
        .max_by(|&a, &b| node_load(a).total_cmp(&node_load(b)).then(b.cmp(&a)))
        .ok_or("no VM was confined to one node when the first move came")?;
    let (t, moved, _, to) = moves
        .iter()
        .find(|m| m.2 == from)
        .ok_or_else(|| {
            format!(
                "no VM moved off node {from}, the busiest ({:.2} CPUs of known load)",
                node_load(from)
            )
        })?
        .clone();
    let before = samples
        .iter()
        .rev()
        .find(|s| s.t_s <= t + 1e-9)
        .or(samples.first());
    let mut candidates: Vec<CandidateTruth> = on_node(from, t)
        .into_iter()
        .map(|h| CandidateTruth {
            name: h.name.clone(),
            pid: h.pid,
            resident_bytes: before
                .and_then(|s| s.vms.iter().find(|v| v.name == h.name))
                .map_or(0, |v| v.bytes_per_node.iter().sum()),
            cpus: load_of(&h.name, t),
        })
        .collect();
    candidates.sort_by(|a, b| {
        let price = |c: &CandidateTruth| c.bytes_per_cpu().unwrap_or(f64::INFINITY);
        price(a).total_cmp(&price(b)).then(a.name.cmp(&b.name))
    });
    let earlier_elsewhere = moves
        .iter()
        .take_while(|m| m.0 < t - 1e-9)
        .filter(|m| m.2 != from)
        .map(|m| (m.0, m.1.name.clone(), m.2))
        .collect();
    Ok(CheapestMove {
        t_s: t,
        from,
        to,
        load_cpus: node_load(from),
        moved: moved.name.clone(),
        candidates,
        earlier_elsewhere,
    })
}

/// The earliest search in a `vmbalancer status --json` document that moved a VM
/// (`cpu_choices`), as JSON.
pub fn first_cpu_choice(status: &Value) -> Option<&Value> {
    status
        .get("cpu_choices")?
        .as_array()?
        .iter()
        .filter(|c| c.get("chosen").is_some_and(|v| !v.is_null()))
        .min_by_key(|c| c.get("at_ns").and_then(Value::as_u64).unwrap_or(u64::MAX))
}

/// What status says of the search behind `truth`'s move: Ok(figures) when it chose
/// the same VM and lists every VM the harness found on the node, Err(why) if not.
pub fn status_agrees(status: &Value, truth: &CheapestMove) -> Result<String, String> {
    let choice = first_cpu_choice(status).ok_or("status lists no CPU move search (cpu_choices)")?;
    let pid_of = |name: &str| {
        truth
            .candidates
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.pid)
    };
    let chosen = choice.get("chosen").and_then(Value::as_u64);
    let cands: Vec<&Value> = choice
        .get("candidates")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let figures: Vec<String> = cands
        .iter()
        .map(|k| {
            let num = |f: &str| k.get(f).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let mib = |b: f64| b / f64::from(1u32 << 20);
            format!(
                "vm {} {:.0} MiB / {:.2} CPUs = {:.0} MiB/CPU, {}",
                k.get("vm").map_or("?".into(), Value::to_string),
                mib(num("resident_bytes")),
                num("cpus_gained"),
                mib(num("bytes_per_cpu")),
                k.get("verdict")
                    .map_or("?".into(), |v| variant(v).unwrap_or("?").to_string())
            )
        })
        .collect();
    let text = format!("status: chose vm {chosen:?}; {}", figures.join(", "));
    if chosen != pid_of(&truth.moved).map(u64::from) {
        return Err(format!("{text}; the harness saw {} move", truth.moved));
    }
    let listed = |pid: u32| {
        cands
            .iter()
            .any(|k| k.get("vm").and_then(Value::as_u64) == Some(u64::from(pid)))
    };
    let missing: Vec<&str> = truth
        .candidates
        .iter()
        .filter(|c| !listed(c.pid))
        .map(|c| c.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(format!("{text}; status lacks {missing:?}"));
    }
    Ok(text)
}

/// Every guest cell's locality at a sample, a VM without cells as one cell:
/// (`vm` or `vm/cellN`, value). `None` when one lacks the measure (access-weighted
/// locality needs per-page truth). Hot-set locality is judged as access-weighted
/// for cells (cells carry no hot-set figure of their own).
pub fn cell_localities(s: &Sample, measure: Measure) -> Option<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for vm in &s.vms {
        if vm.cells.is_empty() {
            let v = match measure {
                Measure::Pages => Some(vm.locality),
                Measure::Access | Measure::Hot => vm.access_locality,
            };
            out.push((vm.name.clone(), v?));
        }
        for c in &vm.cells {
            let v = match measure {
                Measure::Pages => Some(c.locality),
                Measure::Access | Measure::Hot => c.access_locality,
            };
            out.push((format!("{}/cell{}", vm.name, c.id), v?));
        }
    }
    Some(out)
}

/// The worst of [`cell_localities`] (1 when there is nothing to judge).
pub fn worst_cell(s: &Sample, measure: Measure) -> Option<(String, f64)> {
    cell_localities(s, measure)?
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .or_else(|| Some((String::new(), 1.0)))
}

/// Where each VM's guest cells run at a sample, and whether they are apart and near:
/// Ok(description) when every VM's cells have distinct main nodes no farther apart
/// than `max_distance` in `distances` (SLIT rows, node index order); Err(why) else.
pub fn cells_near(s: &Sample, distances: &[Vec<u32>], max_distance: u32) -> Result<String, String> {
    let mut seen = Vec::new();
    for vm in s.vms.iter().filter(|v| !v.cells.is_empty()) {
        let nodes: Vec<usize> = vm
            .cells
            .iter()
            .map(|c: &CellTruth| c.main_node)
            .collect::<Option<_>>()
            .ok_or_else(|| format!("{}: a cell's vCPUs did not run", vm.name))?;
        let mut far = 0;
        for (i, &a) in nodes.iter().enumerate() {
            for &b in &nodes[i + 1..] {
                if a == b {
                    return Err(format!(
                        "{}: two cells on node {a} (cells on {nodes:?})",
                        vm.name
                    ));
                }
                let d = distances
                    .get(a)
                    .and_then(|r| r.get(b))
                    .copied()
                    .ok_or_else(|| format!("no SLIT distance {a} -> {b}"))?;
                far = far.max(d);
            }
        }
        if far > max_distance {
            return Err(format!(
                "{}: cells on nodes {nodes:?}, {far} apart",
                vm.name
            ));
        }
        seen.push(format!(
            "{}: cells on nodes {nodes:?} ({far} apart)",
            vm.name
        ));
    }
    if seen.is_empty() {
        return Err("no VM with guest cells".into());
    }
    Ok(seen.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, bytes: [u64; 4], ticks: [u64; 4]) -> VmTruth {
        VmTruth {
            name: name.into(),
            pid: 1,
            bytes_per_node: bytes.to_vec(),
            vcpu_ticks_per_node: ticks.to_vec(),
            vcpu_nodes: vec![],
            main_node: None,
            locality: 0.0,
            touches_per_vcpu_s: 0.0,
            hot_locality: None,
            cold_locality: None,
            pages_moved: None,
            queried_present_share: None,
            access_locality: None,
            offnode_accesses_per_s: None,
            cells: Vec::new(),
        }
    }

    fn sample(t_s: f64, vms: Vec<VmTruth>) -> Sample {
        Sample {
            t_s,
            locality_mean: t_s / 100.0,
            locality_min: 0.0,
            vcpu_load_per_node: vec![0.0; 4],
            vms,
            access_locality_mean: None,
            hot_locality_mean: None,
            offnode_accesses_per_s: None,
        }
    }

    fn hc(t_s: f64, hot: f64, cold: f64) -> Sample {
        let mut v = vm("a", [0; 4], [0; 4]);
        v.hot_locality = Some(hot);
        v.cold_locality = Some(cold);
        sample(t_s, vec![v])
    }

    fn cell(id: u32, main: Option<usize>, loc: f64) -> CellTruth {
        CellTruth {
            id,
            bytes_per_node: vec![],
            main_node: main,
            locality: loc,
            access_locality: Some(loc + 0.05),
        }
    }

    #[test]
    fn cells_are_judged_one_by_one() {
        let mut wide = vm("wide", [0; 4], [0; 4]);
        wide.locality = 0.9;
        wide.cells = vec![cell(0, Some(0), 0.95), cell(1, Some(1), 0.6)];
        let mut small = vm("small", [0; 4], [0; 4]);
        small.locality = 0.8;
        small.access_locality = Some(0.99);
        let s = sample(5.0, vec![wide, small]);
        let pages = cell_localities(&s, Measure::Pages).unwrap();
        assert_eq!(
            pages,
            vec![
                ("wide/cell0".to_string(), 0.95),
                ("wide/cell1".to_string(), 0.6),
                ("small".to_string(), 0.8)
            ]
        );
        assert_eq!(worst_cell(&s, Measure::Pages).unwrap().0, "wide/cell1");
        let access = worst_cell(&s, Measure::Access).unwrap();
        assert_eq!(access.0, "wide/cell1");
        assert!((access.1 - 0.65).abs() < 1e-9);
        // A VM without per-page truth: no access figure.
        let mut s2 = s.clone();
        s2.vms[1].access_locality = None;
        assert!(cell_localities(&s2, Measure::Access).is_none());
    }

    #[test]
    fn cells_near_on_a_ring() {
        // The lab's ring: neighbours 21, across 31.
        let slit = vec![
            vec![10, 21, 31, 21],
            vec![21, 10, 21, 31],
            vec![31, 21, 10, 21],
            vec![21, 31, 21, 10],
        ];
        let with = |a: Option<usize>, b: Option<usize>| {
            let mut v = vm("wide", [0; 4], [0; 4]);
            v.cells = vec![cell(0, a, 1.0), cell(1, b, 1.0)];
            sample(5.0, vec![v, vm("small", [0; 4], [0; 4])])
        };
        assert!(cells_near(&with(Some(0), Some(1)), &slit, 21).is_ok());
        assert!(cells_near(&with(Some(3), Some(0)), &slit, 21).is_ok());
        let across = cells_near(&with(Some(0), Some(2)), &slit, 21).unwrap_err();
        assert!(across.contains("31 apart"), "{across}");
        assert!(cells_near(&with(Some(1), Some(1)), &slit, 21).is_err());
        assert!(cells_near(&with(Some(1), None), &slit, 21).is_err());
        assert!(cells_near(&sample(0.0, vec![]), &slit, 21).is_err());
    }

    #[test]
    fn sample_at_picks_first_at_or_after() {
        let s: Vec<Sample> = [0.0, 5.0, 10.0, 15.0]
            .iter()
            .map(|&t| sample(t, vec![]))
            .collect();
        assert_eq!(sample_at(&s, None).unwrap().t_s, 15.0);
        assert_eq!(sample_at(&s, Some(5.0)).unwrap().t_s, 5.0);
        assert_eq!(sample_at(&s, Some(6.0)).unwrap().t_s, 10.0);
        assert!(sample_at(&s, Some(16.0)).is_none());
        assert!(sample_at(&[], None).is_none());
    }

    #[test]
    fn locality_measures_table() {
        let mut a = vm("a", [0; 4], [0; 4]);
        (a.hot_locality, a.access_locality) = (Some(1.0), Some(0.97));
        let mut b = vm("b", [0; 4], [0; 4]);
        (b.hot_locality, b.access_locality) = (Some(0.5), Some(0.6));
        let mut s = sample(10.0, vec![a, b.clone()]);
        s.locality_mean = 0.4;
        s.locality_min = 0.3;
        s.access_locality_mean = Some(0.785);
        s.hot_locality_mean = Some(0.75);
        // (measure, which, value)
        let cases = [
            (Measure::Pages, Which::Mean, Some(0.4)),
            (Measure::Pages, Which::Min, Some(0.3)),
            (Measure::Access, Which::Mean, Some(0.785)),
            (Measure::Access, Which::Min, Some(0.6)),
            (Measure::Hot, Which::Mean, Some(0.75)),
            (Measure::Hot, Which::Min, Some(0.5)),
        ];
        for (m, w, want) in cases {
            assert_eq!(locality_at(&s, m, w), want, "{m:?} {w:?}");
        }
        // An older guest's sample: no access-weighted values, nothing to judge.
        let old = sample(0.0, vec![vm("a", [0; 4], [0; 4])]);
        assert_eq!(locality_at(&old, Measure::Access, Which::Mean), None);
        assert_eq!(locality_at(&old, Measure::Hot, Which::Min), None);
        // One VM without it: the worst VM is unknown, not the best of the rest.
        let half = sample(0.0, vec![b, vm("c", [0; 4], [0; 4])]);
        assert_eq!(locality_at(&half, Measure::Access, Which::Min), None);

        let series: Vec<Sample> = [(0.0, 0.25), (5.0, 0.9), (10.0, 0.96), (15.0, 0.99)]
            .iter()
            .map(|&(t, v)| {
                let mut s = sample(t, vec![]);
                s.access_locality_mean = Some(v);
                s
            })
            .collect();
        let at = |min| first_time_at_least(&series, Measure::Access, Which::Mean, min);
        assert_eq!(at(0.95), Some(10.0));
        assert_eq!(at(0.25), Some(0.0));
        assert_eq!(at(0.999), None);
    }

    #[test]
    fn home_nodes_by_cpu_share() {
        assert_eq!(vcpu_home_nodes(&vm("a", [0; 4], [10, 0, 90, 0])), vec![2]);
        assert_eq!(
            vcpu_home_nodes(&vm("a", [0; 4], [50, 0, 50, 0])),
            vec![0, 2]
        );
        let mut idle = vm("a", [0; 4], [0; 4]);
        idle.vcpu_nodes = vec![3, 1, 3];
        assert_eq!(vcpu_home_nodes(&idle), vec![1, 3]);
    }

    #[test]
    fn misplaced_counts_the_fewest_moves_from_start_to_end_layout() {
        let mib = 1 << 20;
        let first = sample(
            0.0,
            vec![
                vm("a", [mib, mib, mib, mib], [1, 1, 1, 1]),
                vm("b", [4 * mib, 0, 0, 0], [1, 0, 0, 0]),
            ],
        );
        let last = sample(
            30.0,
            vec![
                vm("a", [4 * mib, 0, 0, 0], [0, 0, 9, 1]),
                vm("b", [4 * mib, 0, 0, 0], [5, 5, 0, 0]),
            ],
        );
        // a gathered on node 0: 3 MiB left nodes 1-3; b did not move.
        assert_eq!(misplaced_pages_at_start(&[first, last]), 3 * 256);
        assert_eq!(misplaced_pages_at_start(&[]), 0);
    }

    #[test]
    fn pages_moved_window() {
        let s: Vec<Sample> = [(0.0, 0), (5.0, 100), (10.0, 100), (15.0, 130)]
            .iter()
            .map(|&(t, m)| {
                let mut v = vm("a", [0; 4], [0; 4]);
                v.pages_moved = Some(m);
                sample(t, vec![v])
            })
            .collect();
        assert_eq!(vm_pages_moved(&s, "a", None), Some(130));
        assert_eq!(vm_pages_moved(&s, "a", Some(5.0)), Some(30));
        assert_eq!(vm_pages_moved(&s, "a", Some(7.0)), Some(30));
        assert_eq!(vm_pages_moved(&s, "b", None), None);
    }

    #[test]
    fn nodes_in_use() {
        let mut s = sample(0.0, vec![]);
        s.vcpu_load_per_node = vec![2.0, 0.4, 0.5, 1.0];
        assert_eq!(nodes_used(&s, 0.5), 3);
        assert_eq!(nodes_used(&s, 0.1), 4);
    }

    /// (hot, cold) locality per sample, and the expected judgement.
    type HotColdCase<'a> = (&'a [(f64, f64)], Option<bool>);

    #[test]
    fn hot_first_table() {
        // (series of (hot, cold), expected: None = nothing to judge, Some(ok))
        let cases: &[HotColdCase<'_>] = &[
            // hot set home first, then the cold part: ok.
            (
                &[(0.25, 0.25), (0.6, 0.3), (0.95, 0.35), (0.97, 0.55)],
                Some(true),
            ),
            // hot set reaches the bar at the same sample: ok (at or before).
            (&[(0.25, 0.25), (0.92, 0.5)], Some(true)),
            // cold part first: fail.
            (&[(0.25, 0.25), (0.5, 0.6), (0.95, 0.9)], Some(false)),
            // cold part never reaches 0.5: nothing to judge.
            (&[(0.25, 0.25), (1.0, 0.3)], None),
            // local all along: nothing to judge.
            (&[(1.0, 1.0), (1.0, 1.0)], None),
            // local, then the vCPUs move (memory now remote), then memory follows
            // hot first: judged from the move on.
            (
                &[(1.0, 1.0), (0.0, 0.0), (0.95, 0.2), (1.0, 0.7)],
                Some(true),
            ),
            // the same, cold first.
            (
                &[(1.0, 1.0), (0.0, 0.0), (0.3, 0.6), (1.0, 1.0)],
                Some(false),
            ),
        ];
        for (series, want) in cases {
            let s: Vec<Sample> = series
                .iter()
                .enumerate()
                .map(|(i, &(h, c))| hc(i as f64 * 5.0, h, c))
                .collect();
            let got = hot_first_one(&s, "a", None, 0.9, 0.5).map(|r| r.is_ok());
            assert_eq!(got, *want, "{series:?}");
        }
        let s = vec![hc(0.0, 0.25, 0.25), hc(5.0, 1.0, 0.3)];
        assert!(!hot_first(&s, None, None, 0.9, 0.5).0);
        let s = vec![hc(0.0, 0.25, 0.25), hc(5.0, 1.0, 0.6)];
        assert!(hot_first(&s, None, None, 0.9, 0.5).0);
        assert!(hot_first(&s, Some("a"), None, 0.9, 0.5).0);
        assert!(!hot_first(&s, Some("zz"), None, 0.9, 0.5).0);
        // An early crossing (cold first) is ignored when judging from after_s on.
        let s = vec![
            hc(0.0, 0.0, 0.0),
            hc(5.0, 0.3, 0.8),
            hc(10.0, 0.0, 0.0),
            hc(15.0, 0.95, 0.1),
            hc(20.0, 1.0, 0.9),
        ];
        assert!(!hot_first(&s, None, None, 0.9, 0.5).0);
        assert!(hot_first(&s, None, Some(8.0), 0.9, 0.5).0);
    }

    #[test]
    fn status_documents() {
        let status: Value = serde_json::from_str(
            r#"{"decisions": [
                {"at_ns": 1, "vm": 7, "action": {}, "reason": {"ProbationReverted": {"node": 1}},
                 "outcome": {"Done": {"moved_bytes": 0}}},
                {"at_ns": 2, "vm": 7, "action": {}, "reason": {"CpuImbalance": {"from": 0, "to": 1, "imbalance_pct": 50.0}},
                 "outcome": {"Refused": {"why": "node 2 lacks free memory"}}},
                {"at_ns": 3, "vm": 8, "action": {}, "reason": {"ProbationReverted": {"node": 0}},
                 "outcome": "VmGone"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(count_decisions(&status, "ProbationReverted"), 2);
        assert_eq!(count_decisions(&status, "Locality"), 0);
        assert_eq!(count_refusals(&status, "free memory"), 1);
        assert_eq!(count_refusals(&status, "ProbationReverted"), 0);
        let with_list: Value = serde_json::from_str(
            r#"{"refusals": [{"vm": 3, "why": {"TargetMemoryFull": {"node": 2}}}]}"#,
        )
        .unwrap();
        assert_eq!(count_refusals(&with_list, "TargetMemoryFull"), 1);
        assert_eq!(count_decisions(&Value::Null, "X"), 0);
    }

    fn hist(name: &str, pid: u32, changes: &[(f64, &[usize])]) -> NodeHistory {
        NodeHistory {
            name: name.into(),
            pid,
            changes: changes.iter().map(|(t, n)| (*t, n.to_vec())).collect(),
        }
    }

    fn load(name: &str, vcpus: u32, busy_pct: f64) -> KnownLoad {
        KnownLoad {
            name: name.into(),
            vcpus,
            // Quiet until 30 s of the VM's clock, which read 5 s at t = 0.
            phases: vec![(0.0, 10.0), (30.0, busy_pct)],
            clock_at_t0_s: 5.0,
        }
    }

    /// A move seen by the harness: (t_s, VM, to node).
    type Move<'a> = (f64, &'a str, usize);

    /// db, web and mail placed on node 0 at 1 s, other VMs on node 1; `moves` are
    /// (t, vm, to) after that.
    fn cheapest_case(moves: &[Move<'_>]) -> (Vec<NodeHistory>, Vec<KnownLoad>, Vec<Sample>) {
        let all: &[usize] = &[0, 1, 2, 3];
        let mut hs = Vec::new();
        for (pid, name, node) in [(1, "db", 0), (2, "web", 0), (3, "mail", 0), (4, "quiet", 1)] {
            let mut changes: Vec<(f64, Vec<usize>)> = vec![(0.0, all.to_vec()), (1.0, vec![node])];
            for &(t, _, to) in moves.iter().filter(|m| m.1 == name) {
                changes.push((t, vec![to]));
            }
            hs.push(NodeHistory {
                name: name.into(),
                pid,
                changes,
            });
        }
        let loads = vec![
            load("db", 2, 100.0),
            load("web", 1, 100.0),
            load("mail", 1, 25.0),
            load("quiet", 2, 10.0),
        ];
        let mib = 1 << 20;
        let samples = [0.0, 21.0, 24.0]
            .iter()
            .map(|&t| {
                sample(
                    t,
                    vec![
                        vm("db", [512 * mib, 0, 0, 0], [0; 4]),
                        vm("web", [384 * mib, 0, 0, 0], [0; 4]),
                        vm("mail", [128 * mib, 0, 0, 0], [0; 4]),
                        vm("quiet", [0, 256 * mib, 0, 0], [0; 4]),
                    ],
                )
            })
            .collect();
        (hs, loads, samples)
    }

    #[test]
    fn node_history_moves_and_state() {
        let h = hist(
            "a",
            1,
            &[(0.0, &[0, 1]), (1.0, &[0]), (9.0, &[2]), (12.0, &[2, 3])],
        );
        assert_eq!(h.nodes_before(1.0), Some(&[0, 1][..]));
        assert_eq!(h.nodes_before(5.0), Some(&[0][..]));
        assert_eq!(h.nodes_before(0.0), None);
        // Placement (from all nodes) is not a move; a widening off one node is.
        assert_eq!(h.moves(), vec![(9.0, 0, vec![2]), (12.0, 2, vec![2, 3])]);
        let l = load("db", 2, 100.0);
        assert_eq!(l.cpus_at(20.0), 0.2);
        assert_eq!(l.cpus_at(25.0), 2.0);
    }

    #[test]
    fn cheapest_move_table() {
        // (moves, holds, moved)
        let cases: &[(&[Move<'_>], bool, &str)] = &[
            // db: 256 MiB per CPU, web 384, mail 512: db first is right.
            (&[(26.0, "db", 2)], true, "db"),
            // Same poll as a quiet VM elsewhere: still first off the busy node.
            (&[(26.0, "db", 2), (26.0, "quiet", 3)], true, "db"),
            // mail (fewest bytes, most per CPU) first: wrong.
            (&[(26.0, "mail", 2), (27.0, "db", 3)], false, "mail"),
            // A move elsewhere before any off node 0: wrong.
            (&[(25.5, "quiet", 3), (26.0, "db", 2)], false, "db"),
        ];
        for (moves, holds, moved) in cases {
            let (hs, loads, samples) = cheapest_case(moves);
            let m = cheapest_move(&hs, &loads, &samples).unwrap();
            assert_eq!(m.from, 0, "{moves:?}");
            assert_eq!(m.moved, *moved, "{moves:?}");
            assert_eq!(m.holds(), *holds, "{moves:?}: {}", m.describe());
            let names: Vec<&str> = m.candidates.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, vec!["db", "web", "mail"]);
            assert!(
                m.describe()
                    .contains("db 512 MiB / 2.00 CPUs = 256 MiB/CPU"),
                "{}",
                m.describe()
            );
        }
        let (hs, loads, samples) = cheapest_case(&[]);
        assert!(cheapest_move(&hs, &loads, &samples).is_err());
    }

    #[test]
    fn status_agreement() {
        let (hs, loads, samples) = cheapest_case(&[(26.0, "db", 2)]);
        let truth = cheapest_move(&hs, &loads, &samples).unwrap();
        let doc = |chosen: u32, listed: &[u32]| -> Value {
            let cands: Vec<Value> = listed
                .iter()
                .map(|&vm| {
                    serde_json::json!({"vm": vm, "resident_bytes": 1u64 << 29, "cpus_gained": 2.0,
                        "bytes_per_cpu": (1u64 << 28) as f64, "verdict": "Chosen"})
                })
                .collect();
            serde_json::json!({"cpu_choices": [
                {"at_ns": 9, "from": 1, "chosen": 4, "candidates": []},
                {"at_ns": 5, "from": 0, "chosen": chosen, "candidates": cands},
                {"at_ns": 1, "from": 0, "chosen": null, "candidates": []}
            ]})
        };
        let ok = status_agrees(&doc(1, &[1, 2, 3]), &truth).unwrap();
        assert!(
            ok.contains("vm 1 512 MiB / 2.00 CPUs = 256 MiB/CPU, Chosen"),
            "{ok}"
        );
        assert!(status_agrees(&doc(3, &[1, 2, 3]), &truth).is_err());
        assert!(
            status_agrees(&doc(1, &[1, 2]), &truth)
                .unwrap_err()
                .contains("mail")
        );
        assert!(status_agrees(&Value::Null, &truth).is_err());
    }

    #[test]
    fn journal_entries_in_flight() {
        let j: Value = serde_json::from_str(
            r#"{"version": 1, "entries": {
                "10": {"original": {}, "in_flight": null},
                "11": {"original": {}, "in_flight": {"action": {}, "started_ns": 5}},
                "13": {"original": {}, "in_flight": {"action": {"vm": 13,
                    "action": {"MigrateMemory": {"from": 0, "to": 1}}, "reason": "x"},
                    "started_ns": 6}},
                "12": {"original": {}}
            }}"#,
        )
        .unwrap();
        assert_eq!(
            journal_in_flight(&j),
            vec!["11".to_string(), "13".to_string()]
        );
        assert_eq!(journal_migrating(&j), vec!["13".to_string()]);
        assert!(journal_in_flight(&Value::Null).is_empty());
    }
}
