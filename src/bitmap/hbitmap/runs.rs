//! The maximal dirty runs of a range ([`DirtyRuns`]).

use super::{HBitmap, CHUNK_BITS, CHUNK_GRANULES};

impl HBitmap {
    /// The maximal dirty runs of [start, min(end, size)) in order, as (offset, length) in bytes
    /// (clamped to the range; a run may end inside the last, partial granule at the size).
    pub fn dirty_runs(&self, start: u64, end: u64) -> DirtyRuns<'_> {
        let end = end.min(self.size);
        let (first, end_g) = if start < end {
            (
                start >> self.granularity_bits,
                ((end - 1) >> self.granularity_bits) + 1,
            )
        } else {
            (0, 0)
        };
        DirtyRuns {
            bitmap: self,
            start,
            end,
            first,
            end_g,
            chunk: (first >> CHUNK_BITS) as usize,
            open: None,
            out: Vec::new(),
            next_out: 0,
        }
    }
}

/// Iterator over the maximal dirty runs of a range, as (offset, length) in bytes (see
/// [`DirtyBitmap::dirty_runs`](crate::bitmap::DirtyBitmap::dirty_runs)).
///
/// Works a chunk at a time: the non-zero words of a partial chunk are visited through its
/// summaries (their addresses do not depend on the words' contents, so the memory loads
/// overlap), runs are joined across words and chunks and buffered.
#[derive(Clone, Debug)]
pub struct DirtyRuns<'a> {
    bitmap: &'a HBitmap,
    /// Byte bounds of the range (end clamped to the size).
    start: u64,
    end: u64,
    /// Granule bounds [first, end_g).
    first: u64,
    end_g: u64,
    /// Next chunk to look at.
    chunk: usize,
    /// The run being built, in granules [s, e).
    open: Option<(u64, u64)>,
    /// Closed runs in granules, yielded from `next_out`.
    out: Vec<(u64, u64)>,
    next_out: usize,
}

impl DirtyRuns<'_> {
    #[inline]
    fn add(&mut self, s: u64, e: u64) {
        match &mut self.open {
            Some((_, oe)) if *oe == s => *oe = e,
            open => {
                if let Some(run) = open.replace((s, e)) {
                    self.out.push(run);
                }
            }
        }
    }

    /// Adds the runs of the granules [lo, hi) of the next chunk with a dirty granule; false when
    /// there is none in the range.
    fn fill(&mut self) -> bool {
        let bm = self.bitmap;
        if self.first >= self.end_g {
            return false;
        }
        let last_chunk = ((self.end_g - 1) >> CHUNK_BITS) as usize;
        let Some(c) = bm.nonempty.find(self.chunk).filter(|&c| c <= last_chunk) else {
            return false;
        };
        self.chunk = c + 1;
        let base = (c as u64) << CHUNK_BITS;
        let lo = self.first.max(base);
        let hi = self.end_g.min(base + CHUNK_GRANULES);
        let (lw, hw) = (((lo - base) >> 6) as usize, ((hi - 1 - base) >> 6) as usize);
        let Some(p) = bm.chunks.get(c) else {
            if let Some(s) = bm.sp(c) {
                for &(w, x) in &s.entries[s.lower(lw)..] {
                    let w = usize::from(w);
                    if w > hw {
                        break;
                    }
                    self.add_word(w, lw, hw, base, lo, hi, x);
                }
                return true;
            }
            // A full chunk.
            self.add(lo, hi);
            return true;
        };
        let mut groups = p.any2 & !((1u64 << (lw >> 6)) - 1);
        while groups != 0 {
            let g = groups.trailing_zeros() as usize;
            groups &= groups - 1;
            if g > hw >> 6 {
                break;
            }
            let mut ws = p.any1[g];
            while ws != 0 {
                let w = (g << 6) | ws.trailing_zeros() as usize;
                ws &= ws - 1;
                if w < lw {
                    continue;
                }
                if w > hw {
                    break;
                }
                self.add_word(w, lw, hw, base, lo, hi, p.words[w]);
            }
        }
        true
    }

    /// Adds the runs of word `w` (value `x`) of the chunk at granule `base`, clipped to the
    /// granules [lo, hi) (words lw..=hw).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn add_word(&mut self, w: usize, lw: usize, hw: usize, base: u64, lo: u64, hi: u64, x: u64) {
        let wbase = base + ((w as u64) << 6);
        let mut x = x;
        if w == lw {
            x &= !0u64 << ((lo - base) & 63);
        }
        if w == hw {
            x &= !0u64 >> (63 - ((hi - 1 - base) & 63));
        }
        while x != 0 {
            let s = x.trailing_zeros();
            let rest = !x & (!0u64 << s);
            let e = if rest == 0 { 64 } else { rest.trailing_zeros() };
            self.add(wbase + u64::from(s), wbase + u64::from(e));
            x = if e == 64 { 0 } else { x & (!0u64 << e) };
        }
    }
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    #[inline]
    fn next(&mut self) -> Option<(u64, u64)> {
        loop {
            if let Some(&(s, e)) = self.out.get(self.next_out) {
                self.next_out += 1;
                let g = self.bitmap.granularity_bits;
                let sb = self.start.max(s << g);
                let eb = self.end.min(e.checked_shl(g).unwrap_or(u64::MAX));
                return Some((sb, eb - sb));
            }
            self.out.clear();
            self.next_out = 0;
            if !self.fill() {
                let run = self.open.take()?;
                self.out.push(run);
            }
        }
    }
}
