//! The read and control API over the programs' maps: which threads to track, what
//! was counted per thread and per VM, and what the programs cost. Per-CPU maps are
//! summed here, and per-CPU region counts are attributed to the node of their CPU.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapError, PerCpuHashMap};
use balancer_common::{
    MigrationCounts, NumaFaults, OnCpuTime, REGION_KIND_GPA, REGION_SHIFT, RegionFaults, RegionKey,
    TrackedThread, VmNumaEvents, names, tracked_bit,
};

use crate::host::linux::procfs::read_task_schedstat;

use super::{
    ProgramCost, RegionHeat, RegionKind, Telemetry, TelemetryError, ThreadTelemetry, VmNumaMoves,
};

impl Telemetry {
    /// Starts watching thread `tid` (a vCPU, emulator or I/O thread of a VM).
    ///
    /// The thread goes into the hash first and into the bitmap second (untracking
    /// goes the other way), so a program that finds the bit always finds the thread.
    ///
    /// A thread not tracked yet gets its on-CPU starting point here: its run time so
    /// far (`/proc/TID/schedstat`), which the `sched_switch` programs subtract at its
    /// next switch-out. Without it (no schedstat, the thread is gone) that switch-out
    /// only records the starting point.
    pub fn track(&mut self, tid: u32, thread: TrackedThread) -> Result<(), TelemetryError> {
        let already = match self
            .hash::<u32, TrackedThread>(names::TRACKED)?
            .get(&tid, 0)
        {
            Ok(_) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(TelemetryError::map(names::TRACKED, e)),
        };
        if !already {
            self.start_on_cpu(tid)?;
        }
        let map = self
            .ebpf
            .map_mut(names::TRACKED)
            .ok_or_else(|| TelemetryError::map(names::TRACKED, "missing from the object"))?;
        let mut map: HashMap<_, u32, TrackedThread> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        map.insert(tid, thread, 0)
            .map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        self.set_tracked_bit(tid, true)
    }

    /// Sets thread `tid`'s on-CPU counters to zero from its current run time.
    fn start_on_cpu(&mut self, tid: u32) -> Result<(), TelemetryError> {
        let run_ns = match read_task_schedstat(&self.proc_root, tid, tid) {
            Ok(Some(s)) => s.run_ns,
            Ok(None) => {
                self.remove::<u32, OnCpuTime>(names::ON_CPU, &tid)?;
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(tid, error = %e, "no on-CPU starting point for a tracked thread");
                self.remove::<u32, OnCpuTime>(names::ON_CPU, &tid)?;
                return Ok(());
            }
        };
        let name = names::ON_CPU;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        let mut map: HashMap<_, u32, OnCpuTime> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))?;
        let start = OnCpuTime {
            last_runtime_ns: run_ns,
            ..OnCpuTime::default()
        };
        map.insert(tid, start, 0)
            .map_err(|e| TelemetryError::map(name, e))
    }

    /// Stops watching thread `tid` and forgets its counters. Unknown tids are fine.
    pub fn untrack(&mut self, tid: u32) -> Result<(), TelemetryError> {
        self.set_tracked_bit(tid, false)?;
        self.remove::<u32, TrackedThread>(names::TRACKED, &tid)?;
        self.remove::<u32, MigrationCounts>(names::MIGRATIONS, &tid)?;
        self.remove::<u32, OnCpuTime>(names::ON_CPU, &tid)?;
        self.remove::<u32, NumaFaults>(names::NUMA_FAULTS, &tid)
    }

    /// Sets or clears `tid`'s bit in the tracked-thread bitmap. This process is its
    /// only writer (`&mut self`), so reading and writing back the word loses nothing.
    /// A thread id beyond the bitmap has no bit: the programs look it up in the hash.
    fn set_tracked_bit(&mut self, tid: u32, on: bool) -> Result<(), TelemetryError> {
        let name = names::TRACKED_BITS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        let mut bits: Array<_, u64> =
            Array::try_from(map).map_err(|e| TelemetryError::map(name, e))?;
        let (word, mask) = tracked_bit(tid);
        if word >= bits.len() {
            return Ok(());
        }
        let old = bits
            .get(&word, 0)
            .map_err(|e| TelemetryError::map(name, e))?;
        let new = if on { old | mask } else { old & !mask };
        if new != old {
            bits.set(word, new, 0)
                .map_err(|e| TelemetryError::map(name, e))?;
        }
        Ok(())
    }

    /// Forgets the per-VM counters of a VM that exited (its threads are untracked
    /// separately).
    pub fn forget_vm(&mut self, vm_pid: u32) -> Result<(), TelemetryError> {
        let keys: Vec<RegionKey> = {
            let map = self.per_cpu::<RegionKey, RegionFaults>(names::HOT_REGIONS)?;
            map.keys()
                .filter_map(Result::ok)
                .filter(|k| k.vm_pid == vm_pid)
                .collect()
        };
        for k in keys {
            self.remove_per_cpu::<RegionKey, RegionFaults>(names::HOT_REGIONS, &k)?;
        }
        self.remove_per_cpu::<u32, VmNumaEvents>(names::VM_NUMA_EVENTS, &vm_pid)
    }

    /// Tracked thread ids, in no particular order.
    pub fn tracked(&self) -> Result<Vec<u32>, TelemetryError> {
        let map = self.hash::<u32, TrackedThread>(names::TRACKED)?;
        map.keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TelemetryError::map(names::TRACKED, e))
    }

    /// Everything the programs counted for thread `tid` since it was tracked
    /// (zeroes when nothing happened yet or the thread is not tracked). Per-node
    /// vectors have one entry per NUMA node of the host.
    pub fn read_thread(&self, tid: u32) -> Result<ThreadTelemetry, TelemetryError> {
        let m: MigrationCounts = self.get_or_default(names::MIGRATIONS, tid)?;
        let c: OnCpuTime = self.get_or_default(names::ON_CPU, tid)?;
        let f: NumaFaults = self.get_or_default(names::NUMA_FAULTS, tid)?;
        let n = self.node_count;
        Ok(ThreadTelemetry {
            migrations: m.migrations,
            cross_node_migrations: m.cross_node,
            on_cpu_ns_by_node: c.ns_by_node[..n].to_vec(),
            on_cpu_total_ns: c.total_ns,
            numa_faults_by_mem_node: f.faults_by_mem_node[..n].to_vec(),
            numa_faults_local: f.local_faults,
            numa_faults_remote: f.remote_faults,
            numa_migrated_pages: f.migrated_pages,
            numa_fault_pages: f.pages,
        })
    }

    /// The 2 MiB regions each VM's tracked threads faulted on (user page faults by
    /// host virtual address, KVM faults by guest physical address), by VM pid,
    /// hottest first. The LRU map keeps the most recently faulted regions of all VMs.
    ///
    /// One pass over the map for all VMs: reading a hash map costs two system calls
    /// per entry, and a pass per VM made a tick's cost grow with VMs x regions (in
    /// the lab, 8 VMs of 384 MiB: most of a second of every tick).
    pub fn hot_regions_by_vm(&self) -> Result<BTreeMap<u32, Vec<RegionHeat>>, TelemetryError> {
        let map = self.per_cpu::<RegionKey, RegionFaults>(names::HOT_REGIONS)?;
        let mut out: BTreeMap<u32, Vec<RegionHeat>> = BTreeMap::new();
        for item in map.iter() {
            let (key, per_cpu) = match item {
                Ok(kv) => kv,
                // Evicted between listing the key and reading it.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(TelemetryError::map(names::HOT_REGIONS, e)),
            };
            let mut heat = RegionHeat {
                kind: if key.kind == REGION_KIND_GPA {
                    RegionKind::GuestPhysical
                } else {
                    RegionKind::HostVirtual
                },
                start_addr: key.region << REGION_SHIFT,
                len_bytes: 1 << REGION_SHIFT,
                faults_by_node: vec![0; self.node_count],
                faults_total: 0,
            };
            for (cpu, v) in per_cpu.iter().enumerate() {
                heat.faults_total += v.faults;
                let node = self.cpu_node.get(cpu).copied().flatten();
                if let Some(slot) = node.and_then(|n| heat.faults_by_node.get_mut(n as usize)) {
                    *slot += v.faults;
                }
            }
            if heat.faults_total > 0 {
                out.entry(key.vm_pid).or_default().push(heat);
            }
        }
        for regions in out.values_mut() {
            regions.sort_by(|a, b| {
                b.faults_total
                    .cmp(&a.faults_total)
                    .then(a.start_addr.cmp(&b.start_addr))
            });
        }
        Ok(out)
    }

    /// Moves and swaps the kernel's automatic NUMA balancing made with the threads of
    /// VM `vm_pid`.
    pub fn vm_numa_moves(&self, vm_pid: u32) -> Result<VmNumaMoves, TelemetryError> {
        let map = self.per_cpu::<u32, VmNumaEvents>(names::VM_NUMA_EVENTS)?;
        let per_cpu = match map.get(&vm_pid, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(VmNumaMoves::default()),
            Err(e) => return Err(TelemetryError::map(names::VM_NUMA_EVENTS, e)),
        };
        Ok(per_cpu
            .iter()
            .fold(VmNumaMoves::default(), |acc, v| VmNumaMoves {
                move_numa: acc.move_numa + v.move_numa,
                swap_numa: acc.swap_numa + v.swap_numa,
            }))
    }

    /// Run time per program as measured by the kernel (`kernel.bpf_stats_enabled`,
    /// switched on while this value lives), for the programs that are attached.
    pub fn cost(&self) -> Result<Vec<ProgramCost>, TelemetryError> {
        let mut out = Vec::new();
        for (name, program) in self.ebpf.programs() {
            let Ok(info) = program.info() else {
                // Not loaded: its feature is unavailable on this kernel.
                continue;
            };
            out.push(ProgramCost {
                program: name.to_owned(),
                run_count: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            });
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(out)
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
    ) -> Result<HashMap<&aya::maps::MapData, K, V>, TelemetryError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        HashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))
    }

    fn per_cpu<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
    ) -> Result<PerCpuHashMap<&aya::maps::MapData, K, V>, TelemetryError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        PerCpuHashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))
    }

    fn get_or_default<V: aya::Pod + Default>(
        &self,
        name: &str,
        tid: u32,
    ) -> Result<V, TelemetryError> {
        match self.hash::<u32, V>(name)?.get(&tid, 0) {
            Ok(v) => Ok(v),
            Err(MapError::KeyNotFound) => Ok(V::default()),
            Err(e) => Err(TelemetryError::map(name, e)),
        }
    }

    fn remove<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        key: &K,
    ) -> Result<(), TelemetryError> {
        let Some(map) = self.ebpf.map_mut(name) else {
            return Ok(());
        };
        let mut map: HashMap<_, K, V> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))?;
        removed(name, map.remove(key))
    }

    fn remove_per_cpu<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        key: &K,
    ) -> Result<(), TelemetryError> {
        let Some(map) = self.ebpf.map_mut(name) else {
            return Ok(());
        };
        let mut map: PerCpuHashMap<_, K, V> =
            PerCpuHashMap::try_from(map).map_err(|e| TelemetryError::map(name, e))?;
        removed(name, map.remove(key))
    }
}

/// A missing key: `KeyNotFound` from lookups, `ENOENT` from `bpf_map_delete_elem`.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A removal that found nothing to remove is not an error: the thread or VM was
/// never seen by the programs, or is already gone.
fn removed(name: &str, result: Result<(), MapError>) -> Result<(), TelemetryError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(TelemetryError::map(name, e)),
        _ => Ok(()),
    }
}
