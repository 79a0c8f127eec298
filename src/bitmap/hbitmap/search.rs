//! Searches: the next dirty or clean granule, dirty areas, run status.

use super::chunk::{Part, Sparse};
use super::{HBitmap, CHUNK_BITS, CHUNK_GRANULES, CHUNK_MASK};

/// One chunk as a search sees it: its storage, or its state when it has none.
#[derive(Clone, Copy)]
enum ChunkRef<'a> {
    Part(&'a Part),
    Sparse(&'a Sparse),
    /// No storage, every granule dirty.
    Full,
    /// No storage, every granule clean.
    Clean,
}

impl ChunkRef<'_> {
    /// First local granule >= `local` of the chunk that is dirty (`clean` false) or clean.
    #[inline]
    fn find(self, local: u64, clean: bool) -> Option<u64> {
        match self {
            ChunkRef::Part(p) => p.find(local, clean),
            ChunkRef::Sparse(s) => s.find(local, clean),
            ChunkRef::Full => (!clean).then_some(local),
            ChunkRef::Clean => clean.then_some(local),
        }
    }

    /// The first dirty local granule >= `local` and the first clean one after it (None:
    /// dirty up to the chunk's end).
    #[inline]
    fn find_run(self, local: u64) -> Option<(u64, Option<u64>)> {
        match self {
            ChunkRef::Part(p) => {
                let s = p.find(local, false)?;
                Some((s, p.find(s, true)))
            }
            ChunkRef::Sparse(s) => s.find_run(local),
            ChunkRef::Full => Some((local, None)),
            ChunkRef::Clean => None,
        }
    }
}

impl HBitmap {
    /// Chunk `c` (< the number of chunks) as a search sees it.
    #[inline]
    fn chunk_ref(&self, c: usize) -> ChunkRef<'_> {
        match self.chunks.get(c) {
            Some(p) => ChunkRef::Part(p),
            None => match self.sp(c) {
                Some(s) => ChunkRef::Sparse(s),
                None if self.notfull.get(c) => ChunkRef::Clean,
                None => ChunkRef::Full,
            },
        }
    }

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
        let found = match self.chunk_ref(c).find(pos & CHUNK_MASK, clean) {
            Some(l) => ((c as u64) << CHUNK_BITS) | l,
            None => {
                let tower = if clean { &self.notfull } else { &self.nonempty };
                let n = tower.find(c + 1)?;
                if n >= self.chunks.len() {
                    return None;
                }
                ((n as u64) << CHUNK_BITS) | self.chunk_ref(n).find(0, clean)?
            }
        };
        (found < self.granules).then_some(found)
    }

    /// The first dirty run at or after granule `pos`, as granules [s, e) (e at most
    /// `granules`): its start and, when it ends in the same chunk, its end with one chunk
    /// lookup (and, in a sparse chunk, one hinted lookup of the entries: `Sparse::find_run`).
    #[inline]
    fn find_run(&self, pos: u64) -> Option<(u64, u64)> {
        if pos >= self.granules {
            return None;
        }
        let c = (pos >> CHUNK_BITS) as usize;
        if c >= self.chunks.len() {
            return None;
        }
        let (c, (s, e)) = match self.chunk_ref(c).find_run(pos & CHUNK_MASK) {
            Some(run) => (c, run),
            None => {
                let n = self.nonempty.find(c + 1)?;
                if n >= self.chunks.len() {
                    return None;
                }
                (n, self.chunk_ref(n).find_run(0)?)
            }
        };
        let base = (c as u64) << CHUNK_BITS;
        let s = base | s;
        if s >= self.granules {
            return None;
        }
        let e = match e {
            Some(e) => base | e,
            None => self
                .find(base + CHUNK_GRANULES, true)
                .unwrap_or(self.granules),
        };
        Some((s, e.min(self.granules)))
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
        let g = self.granularity_bits;
        let (rs, re) = self.find_run(start >> g)?;
        if rs > (end - 1) >> g {
            return None;
        }
        let s = start.max(rs << g);
        let limit = end.min(s.saturating_add(max_bytes));
        // The first clean granule after the run's start (it is after s: s is dirty) ends the
        // area when it comes before `limit`.
        let area_end = if re > (u64::MAX >> g) {
            limit
        } else {
            limit.min(re << g)
        };
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
