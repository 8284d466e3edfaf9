//! Safety checks every memory-moving decision goes through: a node must keep its free
//! memory headroom after what this plan already promised to it, and a huge-page VM
//! needs free huge pages of its own page size there. Checks return the refusal reason
//! so callers can report it instead of silently skipping.

use crate::model::RefusalReason;

use super::Ctx;

impl Ctx<'_> {
    /// Can `bytes` more of unit `u`'s memory go to node index `n`?
    pub fn memory_fits(&self, u: usize, n: usize, bytes: u64) -> Result<(), RefusalReason> {
        let unit = &self.units[u];
        let node = &self.snap.topology.nodes[n];
        if let Some(size) = unit.hugepage_size {
            let free = node
                .memory
                .hugepages
                .iter()
                .find(|p| p.page_size_bytes == size)
                .map(|p| p.free_pages.saturating_mul(size))
                .unwrap_or(0)
                .saturating_sub(self.reserved[n]);
            if free < bytes {
                return Err(RefusalReason::NoHugePages {
                    node: node.id,
                    page_size_bytes: size,
                });
            }
            return Ok(());
        }
        let free = self.nodes[n].free_bytes.saturating_sub(self.reserved[n]);
        if free < bytes.saturating_add(self.cfg.free_headroom_bytes) {
            return Err(RefusalReason::TargetMemoryFull {
                node: node.id,
                free_bytes: free,
                headroom_bytes: self.cfg.free_headroom_bytes,
            });
        }
        Ok(())
    }

    /// Bytes unit `u` still needs on node index `n` to live there entirely.
    pub fn bytes_to_bring(&self, u: usize, n: usize) -> u64 {
        let unit = &self.units[u];
        unit.need_bytes
            .saturating_sub(unit.bytes_per_node.get(n).copied().unwrap_or(0))
    }

    /// Room left on node index `n` for memory moves (0 when below the headroom).
    pub fn room_on(&self, u: usize, n: usize) -> u64 {
        let unit = &self.units[u];
        let node = &self.snap.topology.nodes[n];
        if let Some(size) = unit.hugepage_size {
            return node
                .memory
                .hugepages
                .iter()
                .find(|p| p.page_size_bytes == size)
                .map(|p| p.free_pages.saturating_mul(size))
                .unwrap_or(0)
                .saturating_sub(self.reserved[n]);
        }
        self.small_page_room_on(n)
    }

    /// Room left on node index `n` for small pages (0 when below the headroom).
    pub fn small_page_room_on(&self, n: usize) -> u64 {
        self.nodes[n]
            .free_bytes
            .saturating_sub(self.reserved[n])
            .saturating_sub(self.cfg.free_headroom_bytes)
    }
}
