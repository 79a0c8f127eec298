//! The chunk table: the state of each chunk (clean, full, sparse, partial) and the
//! transitions between states that keep every chunk canonical.

use super::chunk::{Part, Sparse, SPARSE_BACK, SPARSE_MAX};
use super::{words_for, HBitmap, CHUNK_BITS, CHUNK_GRANULES, CHUNK_MASK};

impl HBitmap {
    /// The storage of chunk `c` if it is sparse.
    #[inline]
    pub(super) fn sp(&self, c: usize) -> Option<&Sparse> {
        self.sparse.get(c)
    }

    #[inline]
    pub(super) fn sp_mut(&mut self, c: usize) -> Option<&mut Sparse> {
        self.sparse.get_mut(c)
    }

    /// Removes chunk `c`'s sparse storage, if any.
    #[inline]
    pub(super) fn take_sparse(&mut self, c: usize) -> Option<Box<Sparse>> {
        self.sparse.take(c)
    }

    /// Makes `s` chunk `c`'s storage (it must have no partial storage).
    pub(super) fn put_sparse(&mut self, c: usize, s: Box<Sparse>) {
        self.sparse.put(c, s);
    }

    /// True when chunk `c` has no storage (clean or full).
    #[inline]
    pub(super) fn stateless(&self, c: usize) -> bool {
        !self.chunks.is_some(c) && self.sp(c).is_none()
    }

    /// Dirty granules of chunk `c`.
    pub(super) fn chunk_dirty(&self, c: usize) -> u64 {
        match (self.chunks.get(c), self.sp(c)) {
            (Some(p), _) => u64::from(p.count),
            (None, Some(s)) => u64::from(s.count),
            (None, None) if self.notfull.get(c) => 0,
            (None, None) => self.cap(c),
        }
    }

    /// Turns a sparse chunk `c` into a partial one (nothing for other states).
    pub(super) fn densify(&mut self, c: usize) {
        if let Some(s) = self.take_sparse(c) {
            self.chunks.put(c, s.to_part());
        }
    }

    /// Word `l` (global index `i`) of chunk `c`, whatever its state.
    #[inline]
    pub(super) fn chunk_word(&self, c: usize, l: usize, i: u64) -> u64 {
        match (self.chunks.get(c), self.sp(c)) {
            (Some(p), _) => p.words[l],
            (None, Some(s)) => s.word(l),
            (None, None) => self.stateless_word(c, i),
        }
    }

    /// Granules of chunk `c` that lie inside the bitmap.
    #[inline]
    pub(super) fn cap(&self, c: usize) -> u64 {
        let base = (c as u64) << CHUNK_BITS;
        self.granules.saturating_sub(base).min(CHUNK_GRANULES)
    }

    /// Mask of the valid bits of the last bottom word.
    pub(super) fn last_word_mask(&self) -> u64 {
        match self.granules % 64 {
            0 if self.granules == 0 => 0,
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }

    /// Frees chunk `c`'s storage when it has become clean or full.
    #[inline]
    pub(super) fn settle(&mut self, c: usize) {
        let cap = self.cap(c);
        let Some(p) = self.chunks.get(c) else {
            self.settle_sparse(c);
            return;
        };
        let n = u64::from(p.count);
        if n == 0 {
            self.chunks.take(c);
            self.nonempty.clear(c);
        } else if n == cap {
            self.chunks.take(c);
            self.notfull.clear(c);
        }
    }

    /// Frees a sparse chunk `c` that has become clean or full, and makes one that has grown
    /// past [`SPARSE_MAX`] words partial.
    #[cold]
    pub(super) fn settle_sparse(&mut self, c: usize) {
        let cap = self.cap(c);
        let Some(s) = self.sp(c) else {
            return;
        };
        let (n, len) = (u64::from(s.count), s.entries.len());
        if n == 0 {
            self.take_sparse(c);
            self.nonempty.clear(c);
        } else if n == cap {
            self.take_sparse(c);
            self.notfull.clear(c);
        } else if len > SPARSE_MAX {
            self.densify(c);
        } else if s.entries.capacity() > 2 * len.max(8) {
            if let Some(s) = self.sp_mut(c) {
                s.entries.shrink_to_fit();
            }
        }
    }

    /// The storage of chunk `c` as a partial chunk: allocated (clean or full contents) if it
    /// has none, converted if it is sparse.
    #[inline]
    pub(super) fn part_mut(&mut self, c: usize) -> &mut Part {
        self.densify(c);
        if !self.chunks.is_some(c) {
            let part = if self.notfull.get(c) {
                self.nonempty.set(c);
                Part::zeroed()
            } else {
                self.notfull.set(c);
                Part::ones(self.cap(c))
            };
            self.chunks.put(c, part);
        }
        match self.chunks.get_mut(c) {
            Some(p) => p,
            None => unreachable!("allocated above"),
        }
    }

    /// Sets (`value`) or clears the local granules lo..=hi (< cap) of chunk `c`.
    #[inline]
    pub(super) fn fill_chunk(&mut self, c: usize, lo: u64, hi: u64, value: bool) {
        let cap = self.cap(c);
        if lo == 0 && hi + 1 >= cap {
            // The whole chunk: a state change, no storage.
            let before = self.chunk_dirty(c);
            self.chunks.take(c);
            self.take_sparse(c);
            if value {
                self.dirty += cap - before;
                self.nonempty.set(c);
                self.notfull.clear(c);
            } else {
                self.dirty -= before;
                self.nonempty.clear(c);
                self.notfull.set(c);
            }
            return;
        }
        let words = ((hi >> 6) - (lo >> 6) + 1) as usize;
        if let Some(s) = self.sp_mut(c) {
            if !value || s.entries.len() + words <= SPARSE_MAX {
                let changed = s.fill(lo, hi, value);
                if value {
                    self.dirty += changed;
                } else {
                    self.dirty -= changed;
                }
                self.settle_sparse(c);
                return;
            }
        } else if !self.chunks.is_some(c) {
            if self.notfull.get(c) != value {
                // Setting in a full chunk, or clearing in a clean one.
                return;
            }
            if value && words <= SPARSE_MAX {
                // A first set in a clean chunk: a sparse chunk.
                let mut s = Box::<Sparse>::default();
                let changed = s.fill(lo, hi, true);
                self.dirty += changed;
                self.put_sparse(c, s);
                self.nonempty.set(c);
                self.settle_sparse(c);
                return;
            }
        }
        let changed = self.part_mut(c).fill(lo, hi, value);
        if value {
            self.dirty += changed;
        } else {
            self.dirty -= changed;
            // A partial chunk left with little dirt goes back to sparse.
            if let Some(p) = self.chunks.get(c) {
                if p.count > 0 && p.count <= SPARSE_BACK {
                    let s = Box::new(Sparse::from_part(p));
                    self.chunks.take(c);
                    self.put_sparse(c, s);
                    self.settle_sparse(c);
                    return;
                }
            }
        }
        self.settle(c);
    }

    /// Sets (`value`) or clears the granules first..=last (< granules), chunk by chunk,
    /// visiting only chunks that can change (through the towers).
    pub(super) fn fill_granules(&mut self, first: u64, last: u64, value: bool) {
        let (fc, lc) = (
            (first >> CHUNK_BITS) as usize,
            (last >> CHUNK_BITS) as usize,
        );
        if fc == lc {
            self.fill_chunk(fc, first & CHUNK_MASK, last & CHUNK_MASK, value);
            return;
        }
        let mut c = fc;
        loop {
            let tower = if value { &self.notfull } else { &self.nonempty };
            let Some(n) = tower.find(c) else {
                return;
            };
            if n > lc {
                return;
            }
            let lo = if n == fc { first & CHUNK_MASK } else { 0 };
            let hi = if n == lc {
                last & CHUNK_MASK
            } else {
                CHUNK_MASK
            };
            self.fill_chunk(n, lo, hi, value);
            c = n + 1;
        }
    }

    /// Bottom word `w` (< words_for(granules)) of a chunk without storage.
    #[inline]
    pub(super) fn stateless_word(&self, c: usize, w: u64) -> u64 {
        if self.notfull.get(c) {
            0
        } else if w + 1 == words_for(self.granules) {
            self.last_word_mask()
        } else {
            !0
        }
    }
}
