//! The read and control API over the programs' maps: which threads to track, what
//! was counted per thread and per VM, and what the programs cost. Per-CPU maps are
//! summed here, and per-CPU region counts are attributed to the node of their CPU.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapError, PerCpuHashMap};
use balancer_common::{
    OnCpuTime, REGION_KIND_GPA, REGION_SHIFT, RegionFaults, RegionKey, SlotOwner,
    TRACKED_SLOT_BITS, ThreadState, TrackedThread, VmNumaEvents, entry_of_slot, names,
    tracked_slot_entry,
};

use crate::host::linux::procfs::read_task_schedstat;

use super::{
    ProgramCost, RegionHeat, RegionKind, Telemetry, TelemetryError, ThreadTelemetry, VmNumaMoves,
    slots,
};

impl Telemetry {
    /// Starts watching thread `tid` (a vCPU, emulator or I/O thread of a VM).
    ///
    /// A thread not tracked yet gets a slot ([`super::slots`]) and the slot a fresh
    /// state before the programs can find it: the thread as its owner, zero counts
    /// and its on-CPU starting point, its run time so far (`/proc/TID/schedstat`),
    /// which the `sched_switch` programs subtract at its next switch-out (without it,
    /// no schedstat or the thread is gone, that switch-out only records the starting
    /// point). Only then goes its entry into the slot table (and the hash), so a
    /// program that finds the entry finds the slot ready.
    ///
    /// A thread already tracked for the same VM keeps its slot and counts (the
    /// programs keep nothing of `thread` but its VM). For another VM the id now
    /// names another process's thread: it starts again in a new slot.
    pub fn track(&mut self, tid: u32, thread: TrackedThread) -> Result<(), TelemetryError> {
        match self.slots.get(tid) {
            Some(held) if held.vm_pid == thread.vm_pid => return Ok(()),
            Some(_) => self.untrack(tid)?,
            None => {}
        }
        let slot = self
            .slots
            .assign(tid, thread.vm_pid, slots::wait_for_running_programs)
            .map_err(|e| TelemetryError::map(names::THREADS, e))?;
        if let Err(e) = self.publish(tid, slot, thread.vm_pid) {
            // Its entry may be half written: clear it, and let the slot wait out a
            // grace period like any freed one.
            let _ = self.set_slot_entry(tid, 0);
            let _ = self.remove::<u32, u32>(names::TRACKED, &tid);
            self.slots.release(tid);
            return Err(e);
        }
        Ok(())
    }

    /// Gives `slot` to thread `tid` with a fresh state, then publishes the thread's
    /// entry.
    fn publish(&mut self, tid: u32, slot: u32, vm_pid: u32) -> Result<(), TelemetryError> {
        let state = ThreadState {
            owner: SlotOwner { tid, vm_pid },
            on_cpu: OnCpuTime {
                last_runtime_ns: self.run_time_ns(tid).unwrap_or(OnCpuTime::NO_START),
                ..OnCpuTime::default()
            },
            ..ThreadState::default()
        };
        self.array_mut::<ThreadState>(names::THREADS)?
            .set(slot, state, 0)
            .map_err(|e| TelemetryError::map(names::THREADS, e))?;
        let entry = entry_of_slot(slot);
        let map = self
            .ebpf
            .map_mut(names::TRACKED)
            .ok_or_else(|| TelemetryError::map(names::TRACKED, "missing from the object"))?;
        let mut map: HashMap<_, u32, u32> =
            HashMap::try_from(map).map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        map.insert(tid, entry, 0)
            .map_err(|e| TelemetryError::map(names::TRACKED, e))?;
        self.set_slot_entry(tid, entry)
    }

    /// Thread `tid`'s run time so far, `None` when it cannot be read.
    fn run_time_ns(&self, tid: u32) -> Option<u64> {
        match read_task_schedstat(&self.proc_root, tid, tid) {
            Ok(s) => s.map(|s| s.run_ns),
            Err(e) => {
                tracing::debug!(tid, error = %e, "no on-CPU starting point for a tracked thread");
                None
            }
        }
    }

    /// Stops watching thread `tid` and forgets its counters. Unknown tids are fine.
    ///
    /// Its entry goes first, then its slot, which waits out a grace period before
    /// another thread gets it: a program that read the entry just before may still
    /// be counting into it.
    pub fn untrack(&mut self, tid: u32) -> Result<(), TelemetryError> {
        if self.slots.get(tid).is_none() {
            return Ok(());
        }
        self.set_slot_entry(tid, 0)?;
        self.remove::<u32, u32>(names::TRACKED, &tid)?;
        self.slots.release(tid);
        Ok(())
    }

    /// Writes thread `tid`'s entry of the slot table (0: not tracked). This process
    /// is its only writer (`&mut self`), so reading and writing back the word loses
    /// nothing. A thread id beyond the table has no entry: the programs look it up
    /// in the hash.
    fn set_slot_entry(&mut self, tid: u32, entry: u32) -> Result<(), TelemetryError> {
        let name = names::TRACKED_SLOTS;
        let mut words = self.array_mut::<u64>(name)?;
        let (word, shift) = tracked_slot_entry(tid);
        if word >= words.len() {
            return Ok(());
        }
        let old = words
            .get(&word, 0)
            .map_err(|e| TelemetryError::map(name, e))?;
        let new = with_entry(old, shift, entry);
        if new != old {
            words
                .set(word, new, 0)
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
        Ok(self.slots.tids().collect())
    }

    /// Everything the programs counted for thread `tid` since it was tracked
    /// (zeroes when nothing happened yet or the thread is not tracked). Per-node
    /// vectors have one entry per NUMA node of the host.
    pub fn read_thread(&self, tid: u32) -> Result<ThreadTelemetry, TelemetryError> {
        let s = match self.slots.get(tid) {
            Some(held) => self
                .array::<ThreadState>(names::THREADS)?
                .get(&held.slot, 0)
                .map_err(|e| TelemetryError::map(names::THREADS, e))?,
            None => ThreadState::default(),
        };
        let (m, c, f) = (s.migrations, s.on_cpu, s.numa_faults);
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

    fn array<V: aya::Pod>(
        &self,
        name: &str,
    ) -> Result<Array<&aya::maps::MapData, V>, TelemetryError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        Array::try_from(map).map_err(|e| TelemetryError::map(name, e))
    }

    fn array_mut<V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<Array<&mut aya::maps::MapData, V>, TelemetryError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| TelemetryError::map(name, "missing from the object"))?;
        Array::try_from(map).map_err(|e| TelemetryError::map(name, e))
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

/// `word` with the slot-table entry at bit `shift` replaced by `entry`.
fn with_entry(word: u64, shift: u32, entry: u32) -> u64 {
    let mask = ((1u64 << TRACKED_SLOT_BITS) - 1) << shift;
    (word & !mask) | ((u64::from(entry) << shift) & mask)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_replaces_only_its_own_bits() {
        let word = 0x4444_3333_2222_1111;
        assert_eq!(with_entry(word, 16, 0), 0x4444_3333_0000_1111);
        assert_eq!(with_entry(word, 48, 0xabcd), 0xabcd_3333_2222_1111);
        assert_eq!(with_entry(0, 0, entry_of_slot(0)), 1);
        // The programs' reading of it.
        for tid in [0u32, 1, 2, 3, 4099] {
            let (_, shift) = tracked_slot_entry(tid);
            let w = with_entry(u64::MAX, shift, 7);
            assert_eq!((w >> shift) & 0xffff, 7);
        }
    }
}
