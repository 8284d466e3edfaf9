//! Safety checks every memory-moving decision goes through: a node must keep its free
//! memory headroom after what this plan already promised to it, and a huge-page VM
//! needs free huge pages of its own page size there. Checks return the refusal reason
//! so callers can report it instead of silently skipping.
//!
//! Free huge pages are also promised across decisions: a huge-page unit homed on a
//! node its pages have not reached yet will take that node's free huge pages when its
//! memory follows (a later decision), so no other unit is offered them meanwhile.
//! Small pages need no such promise: free memory changes all the time and the
//! headroom absorbs what is on its way, where a huge page pool changes only when an
//! operator resizes it, and a page given twice is a move that must fail.

use crate::model::RefusalReason;

use super::Ctx;

impl Ctx<'_> {
    /// Promises each managed huge-page unit's home node the huge pages its memory
    /// still needs there (see the module doc). Called once the units are classified.
    pub(super) fn promise_huge_pages(&mut self) {
        for u in 0..self.units.len() {
            let home = self.home[u];
            if !self.managed[u] || self.units[u].hugepage_size.is_none() || home.count_ones() != 1 {
                continue;
            }
            let n = home.trailing_zeros() as usize;
            let bring = self.bytes_to_bring(u, n);
            if bring > 0 {
                self.promised[n] += bring;
                self.promise[u] = Some((n, bring));
            }
        }
    }

    /// Drops what is promised to unit `u` on its home node, up to `bytes` (its memory
    /// is planned to move there now, or the unit leaves: `u64::MAX`).
    pub(super) fn release_promise(&mut self, u: usize, bytes: u64) {
        if let Some((n, p)) = self.promise[u] {
            let take = p.min(bytes);
            self.promised[n] -= take;
            self.promise[u] = (p > take).then_some((n, p - take));
        }
    }

    /// Free bytes in node index `n`'s pool of `size` huge pages left for unit `u`:
    /// minus what this plan reserved there and what is promised to other units.
    fn huge_room_on(&self, u: usize, n: usize, size: u64) -> u64 {
        let own = match self.promise[u] {
            Some((m, p)) if m == n => p,
            _ => 0,
        };
        self.snap.topology.nodes[n]
            .memory
            .hugepages
            .iter()
            .find(|p| p.page_size_bytes == size)
            .map(|p| p.free_pages.saturating_mul(size))
            .unwrap_or(0)
            .saturating_sub(self.reserved[n])
            .saturating_sub(self.promised[n] - own)
    }

    /// Can `bytes` more of unit `u`'s memory go to node index `n`?
    pub fn memory_fits(&self, u: usize, n: usize, bytes: u64) -> Result<(), RefusalReason> {
        let unit = &self.units[u];
        let node = &self.snap.topology.nodes[n];
        if let Some(size) = unit.hugepage_size {
            let free = self.huge_room_on(u, n, size);
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
        match self.units[u].hugepage_size {
            Some(size) => self.huge_room_on(u, n, size),
            None => self.small_page_room_on(n),
        }
    }

    /// Room left on node index `n` for small pages (0 when below the headroom).
    pub fn small_page_room_on(&self, n: usize) -> u64 {
        self.nodes[n]
            .free_bytes
            .saturating_sub(self.reserved[n])
            .saturating_sub(self.cfg.free_headroom_bytes)
    }
}
