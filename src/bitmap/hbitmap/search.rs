//! Searches: the next dirty or clean granule, dirty areas, run status.

use super::{HBitmap, CHUNK_BITS, CHUNK_MASK};

impl HBitmap {
    /// First granule index >= `pos` and < `granules` that is dirty (`clean` false) or clean
    /// (`clean` true).
    #[inline]
    pub(super) fn find(&self, pos: u64, clean: bool) -> Option<u64> {
        if pos >= self.granules {
            return None;
        }
        let c = (pos >> CHUNK_BITS) as usize;
        if c >= self.chunks.len() {
            return None;
        }
        let here = match self.chunks.get(c) {
            Some(p) => p
                .find(pos & CHUNK_MASK, clean)
                .map(|l| ((c as u64) << CHUNK_BITS) | l),
            None => match self.sp(c) {
                Some(s) => s
                    .find(pos & CHUNK_MASK, clean)
                    .map(|l| ((c as u64) << CHUNK_BITS) | l),
                // A full chunk (notfull clear) answers a dirty search, a clean one a clean
                // search.
                None => (self.notfull.get(c) == clean).then_some(pos),
            },
        };
        let found = match here {
            Some(k) => k,
            None => {
                let tower = if clean { &self.notfull } else { &self.nonempty };
                let n = tower.find(c + 1)?;
                if n >= self.chunks.len() {
                    return None;
                }
                let base = (n as u64) << CHUNK_BITS;
                match self.chunks.get(n) {
                    Some(p) => base | p.find(0, clean)?,
                    None => match self.sp(n) {
                        Some(s) => base | s.find(0, clean)?,
                        None => base,
                    },
                }
            }
        };
        (found < self.granules).then_some(found)
    }

    /// Shared bounds of next_dirty / next_zero: (first granule, end granule exclusive).
    fn search_bounds(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        if start >= self.size || bytes == 0 {
            return None;
        }
        let end = start.saturating_add(bytes).min(self.size);
        Some((
            start >> self.granularity_bits,
            ((end - 1) >> self.granularity_bits) + 1,
        ))
    }

    /// First dirty byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_dirty(&self, start: u64, bytes: u64) -> Option<u64> {
        let (first, end) = self.search_bounds(start, bytes)?;
        let k = self.find(first, false)?;
        (k < end).then(|| start.max(k << self.granularity_bits))
    }
    /// First clean byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_zero(&self, start: u64, bytes: u64) -> Option<u64> {
        let (first, end) = self.search_bounds(start, bytes)?;
        let k = self.find(first, true)?;
        (k < end).then(|| start.max(k << self.granularity_bits))
    }
    /// QEMU's next_dirty_area: the first dirty run in [start, min(end, size)), at most
    /// `max_bytes` long, as (offset, length).
    pub fn next_dirty_area(&self, start: u64, end: u64, max_bytes: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        if start >= end || max_bytes == 0 {
            return None;
        }
        let s = self.next_dirty(start, end - start)?;
        let limit = end.min(s.saturating_add(max_bytes));
        // A clean granule before `limit` ends the run earlier (s itself is dirty, so z > s).
        let area_end = self.next_zero(s, limit - s).unwrap_or(limit);
        Some((s, area_end - s))
    }
    /// Dirty state at `start` and the length of the run with that state, capped at `bytes`
    /// and at the end of the bitmap. (false, 0) if `start` is at or past the end.
    pub fn status(&self, start: u64, bytes: u64) -> (bool, u64) {
        if start >= self.size {
            return (false, 0);
        }
        let dirty = self.get(start);
        if bytes == 0 {
            return (dirty, 0);
        }
        let end = start.saturating_add(bytes).min(self.size);
        let change = if dirty {
            self.next_zero(start, end - start)
        } else {
            self.next_dirty(start, end - start)
        };
        (dirty, change.unwrap_or(end) - start)
    }
}
