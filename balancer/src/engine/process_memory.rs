//! The process's own memory follows guest RAM home, last.
//!
//! A qemu process holds more than guest RAM: its vCPU threads' stacks (used on every
//! exit from the guest), the heap, and other anonymous mappings. They are faulted in
//! wherever the threads first ran, so once a VM's vCPUs and guest RAM are home they
//! are the last remote memory its vCPU threads touch. In the lab each fake VM's vCPU
//! stacks are transparent huge pages: 2-4 MiB per VM left on the node where the VM
//! started, after every guest page had moved.
//!
//! When a whole-VM unit (no guest NUMA cells) is settled on a single home node, its
//! guest RAM has reached the locality target and no move of it is running, each
//! remote node holding at least [`MIN_REMOTE_BYTES`] of the process's own memory
//! gets one `MigrateProcessMemory` to the home node, at the cold rate, within the
//! room above the headroom and what guest RAM left of the host-wide budget. Shared program and library pages are not the process's
//! own (they are page cache of every process mapping them) and are never moved.
//!
//! Pages that do not move (pinned, or faulted back by a thread running elsewhere)
//! would be planned again every decision, each time a scan of the process's mappings;
//! so a VM is tried at most once per [`RETRY_NS`]. VMs with guest cells or spanning
//! several nodes have no single home for their threads' memory and are left alone.

use crate::model::{Action, Reason};

use super::Ctx;
use super::Phase;
use super::view::mask_nodes;

/// Remote own memory below this is not worth a scan of the process's mappings.
pub const MIN_REMOTE_BYTES: u64 = 1 << 20;

/// The shortest time between two process-memory moves of one VM.
pub const RETRY_NS: u64 = 60_000_000_000;

impl Ctx<'_> {
    pub(super) fn migrate_process_memory(&mut self) {
        let secs = self.dt_ns as f64 / 1e9;
        let rate_bytes = (self.cfg.cold_rate_bytes_per_s as f64 * secs) as u64;
        let target = self.cfg.locality_target_pct / 100.0;
        let now = self.now;
        self.state
            .process_memory_after_ns
            .retain(|_, after| *after > now);
        for u in 0..self.units.len() {
            let unit = &self.units[u];
            let vm = unit.key.vm;
            if unit.key.cell.is_some()
                || !self.managed[u]
                || self.touched[u]
                || unit.memory_fixed
                || self.state.memory_moving(vm, None)
                || self.state.process_memory_after_ns.contains_key(&vm)
                || unit.resident_bytes == 0
                || rate_bytes == 0
            {
                continue;
            }
            if !self
                .state
                .units
                .get(&unit.key)
                .is_some_and(|st| matches!(st.phase, Phase::Settled))
            {
                continue;
            }
            let mut homes = mask_nodes(self.home[u]);
            let (Some(home), None) = (homes.next(), homes.next()) else {
                continue;
            };
            let local =
                crate::model::local_share_on(&unit.bytes_per_node, |n| n == home).unwrap_or(0.0);
            if local < target {
                continue;
            }
            let own = &self.snap.vms[unit.vm_idx]
                .memory
                .own_overhead_bytes_per_node;
            let mut sources: Vec<(usize, u64)> = own
                .iter()
                .copied()
                .enumerate()
                .filter(|&(n, b)| n != home && n < self.nodes.len() && b >= MIN_REMOTE_BYTES)
                .collect();
            sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut budget = rate_bytes;
            for (src, bytes) in sources {
                // Own memory is small pages even for a huge-page VM: plain free memory.
                let room = self.small_page_room_on(home);
                let max_bytes = bytes.min(budget).min(room).min(self.host_budget_bytes);
                if max_bytes == 0 {
                    break;
                }
                budget -= max_bytes;
                self.host_budget_bytes -= max_bytes;
                let (from, to) = (self.node_id(src), self.node_id(home));
                self.push_memory_move(
                    u,
                    home,
                    max_bytes,
                    Action::MigrateProcessMemory {
                        from,
                        to,
                        max_bytes,
                    },
                    Reason::ProcessMemory {
                        from,
                        remote_bytes: bytes,
                    },
                );
                self.state
                    .process_memory_after_ns
                    .insert(vm, now.saturating_add(RETRY_NS));
            }
        }
    }
}
