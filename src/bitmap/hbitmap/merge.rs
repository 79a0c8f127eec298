//! OR-ing one bitmap into another, and the containment test of the incremental store.

use super::chunk::{Part, Sparse};
use super::{words_for, HBitmap, CHUNK_WORDS};

impl HBitmap {
    /// self |= other. Sizes are equal (checked by the caller); granularities may differ: a
    /// coarser destination rounds outward.
    ///
    /// Equal granularities and sizes work chunk by chunk (only the source's dirty chunks are
    /// visited); otherwise each dirty run of `other` is set in bytes.
    pub fn merge_from(&mut self, other: &HBitmap) {
        if other.dirty == 0 {
            return;
        }
        if other.granularity_bits == self.granularity_bits && other.granules == self.granules {
            let mut c = 0;
            while let Some(n) = other.nonempty.find(c) {
                if n >= other.chunks.len() {
                    return;
                }
                match (other.chunks.get(n), other.sp(n)) {
                    (Some(src), _) => self.or_part(n, src),
                    (None, Some(src)) => self.or_sparse(n, src),
                    (None, None) => {
                        let cap = self.cap(n);
                        if cap > 0 {
                            self.fill_chunk(n, 0, cap - 1, true);
                        }
                    }
                }
                c = n + 1;
            }
        } else {
            let end = self.size.min(other.size);
            for (s, len) in other.dirty_runs(0, end) {
                self.set(s, len);
            }
        }
    }

    /// Whether every dirty granule of `other` in the bottom words w0..w1 is dirty in `self`
    /// too (so OR-ing `other` in there changes nothing). Same shape only (equal granularity
    /// and granule count): otherwise false (unknown). Works chunk by chunk: clean chunks of
    /// `other` and full chunks of `self` cost one lookup; partial ones compare words.
    pub fn contains_words(&self, other: &HBitmap, w0: u64, w1: u64) -> bool {
        if other.granularity_bits != self.granularity_bits || other.granules != self.granules {
            return false;
        }
        let w1 = w1.min(words_for(self.granules));
        let mut w = w0;
        while w < w1 {
            let c = (w / CHUNK_WORDS as u64) as usize;
            let seg_end = ((c as u64 + 1) * CHUNK_WORDS as u64).min(w1);
            let (lo, hi) = (
                (w % CHUNK_WORDS as u64) as usize,
                ((seg_end - 1) % CHUNK_WORDS as u64) as usize + 1,
            );
            let src_clean = other.stateless(c) && other.notfull.get(c);
            let dst_full = self.stateless(c) && !self.notfull.get(c);
            if !src_clean && !dst_full {
                let base = c as u64 * CHUNK_WORDS as u64;
                let extra = match (self.chunks.get(c), other.chunks.get(c), other.sp(c)) {
                    (Some(d), Some(s), _) => d.words[lo..hi]
                        .iter()
                        .zip(&s.words[lo..hi])
                        .fold(0u64, |acc, (&x, &y)| acc | (y & !x)),
                    // A sparse source: only its non-zero words.
                    (_, None, Some(s)) => s.entries[s.lower(lo)..]
                        .iter()
                        .take_while(|e| usize::from(e.0) < hi)
                        .fold(0u64, |acc, &(k, y)| {
                            let k = usize::from(k);
                            acc | (y & !self.chunk_word(c, k, base + k as u64))
                        }),
                    // A clean, full or sparse side: compare word by word.
                    _ => (w..seg_end).fold(0u64, |acc, i| {
                        let l = (i % CHUNK_WORDS as u64) as usize;
                        acc | (other.chunk_word(c, l, i) & !self.chunk_word(c, l, i))
                    }),
                };
                if extra != 0 {
                    return false;
                }
            }
            w = seg_end;
        }
        true
    }

    /// Chunk `c` |= `src` (a partial chunk of a bitmap of the same shape).
    fn or_part(&mut self, c: usize, src: &Part) {
        self.densify(c);
        match self.chunks.get_mut(c) {
            None if !self.notfull.get(c) => {} // already full
            None => {
                self.chunks.put(c, Box::new(src.clone()));
                self.nonempty.set(c);
                self.dirty += u64::from(src.count);
                self.settle(c);
            }
            Some(dst) => {
                let before = dst.count;
                dst.or_from(src);
                self.dirty += u64::from(dst.count - before);
                self.settle(c);
            }
        }
    }

    /// Chunk `c` |= `src` (a sparse chunk of a bitmap of the same shape).
    fn or_sparse(&mut self, c: usize, src: &Sparse) {
        if let Some(dst) = self.chunks.get_mut(c) {
            let before = dst.count;
            for &(k, v) in &src.entries {
                dst.or(usize::from(k), v);
            }
            self.dirty += u64::from(dst.count - before);
            self.settle(c);
            return;
        }
        if let Some(dst) = self.sp_mut(c) {
            let before = dst.count;
            for &(k, v) in &src.entries {
                dst.or(usize::from(k), v);
            }
            self.dirty += u64::from(dst.count - before);
            self.settle_sparse(c);
            return;
        }
        if self.notfull.get(c) {
            // Clean: a copy.
            self.put_sparse(c, Box::new(src.clone()));
            self.nonempty.set(c);
            self.dirty += u64::from(src.count);
            self.settle_sparse(c);
        }
    }
}
