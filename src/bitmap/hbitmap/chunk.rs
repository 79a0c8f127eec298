//! The two kinds of chunk with storage: partial ([`Part`]: words with summaries) and sparse
//! ([`Sparse`]: a short list of non-zero words).

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};

use super::CHUNK_WORDS;

/// Groups of 64 words per chunk (bits of the chunk's top summary word).
pub(super) const GROUPS: usize = CHUNK_WORDS / 64;
const _: () = assert!(GROUPS >= 1 && GROUPS <= 64);
/// Valid bits of a chunk's top summary word.
pub(super) const GROUP_MASK: u64 = if GROUPS == 64 {
    !0
} else {
    (1u64 << GROUPS) - 1
};

/// The storage of a partially dirty chunk.
#[derive(Clone)]
pub(super) struct Part {
    /// One bit per granule of the chunk; bits past the bitmap's end are zero.
    pub(super) words: [u64; CHUNK_WORDS],
    /// Bit w % 64 of `any1[w / 64]`: `words[w] != 0`.
    pub(super) any1: [u64; GROUPS],
    /// Bit w % 64 of `full1[w / 64]`: `words[w] == !0`.
    pub(super) full1: [u64; GROUPS],
    /// Bit g: `any1[g] != 0`.
    pub(super) any2: u64,
    /// Bit g: `full1[g] == !0`.
    pub(super) full2: u64,
    /// Set bits in `words`.
    pub(super) count: u32,
}

/// Mask of bits lo..=hi (0 <= lo <= hi <= 63) of a word.
#[inline]
pub(super) fn bit_range_mask(lo: u64, hi: u64) -> u64 {
    (!0u64 << lo) & (!0u64 >> (63 - hi))
}

/// Mask of the bits strictly above bit `b` (0 <= b <= 63).
#[inline]
fn above(b: u64) -> u64 {
    (!0u64 << b) << 1
}

impl Part {
    pub(super) fn zeroed() -> Box<Part> {
        Box::new(Part {
            words: [0; CHUNK_WORDS],
            any1: [0; GROUPS],
            full1: [0; GROUPS],
            any2: 0,
            full2: 0,
            count: 0,
        })
    }

    /// A chunk with its first `cap` granules dirty (cap <= CHUNK_GRANULES).
    pub(super) fn ones(cap: u64) -> Box<Part> {
        let mut p = Part::zeroed();
        if cap > 0 {
            p.fill(0, cap - 1, true);
        }
        p
    }

    /// words[w] |= mask; returns the number of bits that changed.
    #[inline]
    pub(super) fn or(&mut self, w: usize, mask: u64) -> u32 {
        let old = self.words[w];
        let new = old | mask;
        if new == old {
            return 0;
        }
        self.words[w] = new;
        let (g, b) = (w >> 6, w & 63);
        if old == 0 {
            if self.any1[g] == 0 {
                self.any2 |= 1 << g;
            }
            self.any1[g] |= 1 << b;
        }
        if new == !0 {
            self.full1[g] |= 1 << b;
            if self.full1[g] == !0 {
                self.full2 |= 1 << g;
            }
        }
        let changed = (new ^ old).count_ones();
        self.count += changed;
        changed
    }

    /// words[w] &= !mask; returns the number of bits that changed.
    #[inline]
    pub(super) fn andnot(&mut self, w: usize, mask: u64) -> u32 {
        let old = self.words[w];
        let new = old & !mask;
        if new == old {
            return 0;
        }
        self.words[w] = new;
        let (g, b) = (w >> 6, w & 63);
        if new == 0 {
            self.any1[g] &= !(1 << b);
            if self.any1[g] == 0 {
                self.any2 &= !(1 << g);
            }
        }
        if old == !0 {
            if self.full1[g] == !0 {
                self.full2 &= !(1 << g);
            }
            self.full1[g] &= !(1 << b);
        }
        let changed = (new ^ old).count_ones();
        self.count -= changed;
        changed
    }

    /// Sets (`value`) or clears the local granules lo..=hi; returns the number changed.
    pub(super) fn fill(&mut self, lo: u64, hi: u64, value: bool) -> u64 {
        let (fw, lw) = (lo >> 6, hi >> 6);
        let mut changed = 0u64;
        for w in fw..=lw {
            let l = if w == fw { lo & 63 } else { 0 };
            let h = if w == lw { hi & 63 } else { 63 };
            let mask = bit_range_mask(l, h);
            changed += u64::from(if value {
                self.or(w as usize, mask)
            } else {
                self.andnot(w as usize, mask)
            });
        }
        changed
    }

    /// First local granule >= `pos` that is dirty (`clean` false) or clean (`clean` true).
    /// Padding bits past the bitmap's end count as clean: callers compare with the end.
    #[inline]
    pub(super) fn find(&self, pos: u64, clean: bool) -> Option<u64> {
        let flip = if clean { !0u64 } else { 0 };
        let (l1, l2) = if clean {
            (&self.full1, self.full2)
        } else {
            (&self.any1, self.any2)
        };
        let w = (pos >> 6) as usize & (CHUNK_WORDS - 1);
        let bits = (self.words[w] ^ flip) & (!0u64 << (pos & 63));
        if bits != 0 {
            return Some(((w as u64) << 6) | u64::from(bits.trailing_zeros()));
        }
        let g = w >> 6;
        let cand = (l1[g] ^ flip) & above((w & 63) as u64);
        let w2 = if cand != 0 {
            (g << 6) | cand.trailing_zeros() as usize
        } else {
            let groups = (l2 ^ flip) & GROUP_MASK & above(g as u64);
            if groups == 0 {
                return None;
            }
            let g2 = groups.trailing_zeros() as usize;
            (g2 << 6) | (l1[g2] ^ flip).trailing_zeros() as usize
        };
        let word = self.words[w2] ^ flip;
        Some(((w2 as u64) << 6) | u64::from(word.trailing_zeros()))
    }

    /// self |= src, summaries recomputed for the groups `src` has bits in. Written as separate
    /// simple loops over a group (OR, popcounts, summary bits) so that each vectorizes.
    pub(super) fn or_from(&mut self, src: &Part) {
        for g in 0..GROUPS {
            if src.any1[g] == 0 {
                continue;
            }
            let dw = &mut self.words[g * 64..g * 64 + 64];
            let sw = &src.words[g * 64..g * 64 + 64];
            let (mut added, mut fulls) = (0u32, 0u32);
            for (d, s) in dw.iter_mut().zip(sw) {
                added += (*s & !*d).count_ones();
                *d |= *s;
                fulls += u32::from(*d == !0);
            }
            self.count += added;
            // A word is non-zero after the OR iff it was before or the source's was.
            self.any1[g] |= src.any1[g];
            self.full1[g] = if fulls == 0 {
                0
            } else {
                dw.iter()
                    .enumerate()
                    .fold(0, |f, (j, &w)| f | (u64::from(w == !0) << j))
            };
        }
        self.resummarize_top();
    }

    /// Recomputes the group summaries of groups g0..g1 (not `any2`/`full2`).
    pub(super) fn resummarize_groups_only(&mut self, g0: usize, g1: usize) {
        // Counting first (vectorizes) settles the common all/none cases without the per-word
        // bit loop.
        let mask = |ws: &[u64], full: bool| -> u64 {
            let flip = if full { !0u64 } else { 0 };
            ws.iter()
                .enumerate()
                .fold(0u64, |m, (j, &w)| m | (u64::from(w ^ flip != 0) << j))
        };
        for g in g0..g1 {
            let ws = &self.words[g * 64..g * 64 + 64];
            let (mut nz, mut ff) = (0u32, 0u32);
            for &w in ws {
                nz += u32::from(w != 0);
                ff += u32::from(w == !0);
            }
            self.any1[g] = match nz {
                0 => 0,
                64 => !0,
                _ => mask(ws, false),
            };
            self.full1[g] = match ff {
                0 => 0,
                64 => !0,
                _ => !mask(ws, true),
            };
        }
    }

    /// Recomputes every summary and the count from the words (groups g0..g1 and the top;
    /// the count over the whole chunk).
    pub(super) fn resummarize_groups(&mut self, g0: usize, g1: usize) {
        self.resummarize_groups_only(g0, g1);
        self.count = self.words.iter().map(|w| w.count_ones()).sum();
        self.resummarize_top();
    }

    /// Recomputes `any2` and `full2` from the group summaries.
    pub(super) fn resummarize_top(&mut self) {
        let (mut a, mut f) = (0u64, 0u64);
        for g in 0..GROUPS {
            a |= u64::from(self.any1[g] != 0) << g;
            f |= u64::from(self.full1[g] == !0) << g;
        }
        self.any2 = a;
        self.full2 = f;
    }
}

/// Most non-zero words a sparse chunk keeps; one more makes it partial (a [`Part`]).
pub(super) const SPARSE_MAX: usize = 128;
/// A partial chunk with at most this many dirty granules is turned back into a sparse one by
/// a reset (hysteresis: a set that grows a sparse chunk past [`SPARSE_MAX`] words makes it
/// partial, so only a clear shrink goes back).
pub(super) const SPARSE_BACK: u32 = 32;

/// Entries a hinted search of a sparse chunk steps over from its hint before it falls back to
/// a binary search of the rest.
const HINT_STEPS: usize = 4;

/// The entry of a sparse chunk where its last search stopped: a walk's next search (the end of
/// the run just found, the next run) starts there and is one or two steps instead of a binary
/// search over up to [`SPARSE_MAX`] entries. Only a hint: [`Sparse::lower_hinted`] checks it
/// against the sorted entries before starting from it, so a hint that any change left stale
/// (entries inserted or removed before it, the list rebuilt or emptied) costs a binary search,
/// never a wrong answer. A relaxed atomic, because searches take `&self`.
#[derive(Default)]
pub(super) struct SearchHint(AtomicU16);

impl SearchHint {
    #[inline]
    fn get(&self) -> usize {
        usize::from(self.0.load(Relaxed))
    }
    #[inline]
    fn set(&self, i: usize) {
        self.0.store(i as u16, Relaxed);
    }
}

impl Clone for SearchHint {
    fn clone(&self) -> Self {
        SearchHint(AtomicU16::new(self.0.load(Relaxed)))
    }
}

/// The storage of a sparsely dirty chunk: its non-zero words as (word index, word), sorted by
/// index, at most [`SPARSE_MAX`] of them between operations.
#[derive(Clone, Default)]
pub(super) struct Sparse {
    pub(super) entries: Vec<(u16, u64)>,
    /// Set bits in the words.
    pub(super) count: u32,
    /// Where the last search stopped.
    pub(super) hint: SearchHint,
}

impl Sparse {
    /// A sparse chunk of these entries (sorted by word index, words non-zero) with `count` set
    /// bits.
    pub(super) fn new(entries: Vec<(u16, u64)>, count: u32) -> Sparse {
        Sparse {
            entries,
            count,
            hint: SearchHint::default(),
        }
    }

    /// As [`Sparse::lower`], starting from the search hint when every entry before it has a
    /// smaller word index than `w` (checked on the entry just before it, the entries being
    /// sorted): up to [`HINT_STEPS`] steps forward, then a binary search of the rest. A hint
    /// past the answer gives a binary search of the whole list.
    #[inline]
    pub(super) fn lower_hinted(&self, w: usize) -> usize {
        let e = &self.entries;
        let h = self.hint.get().min(e.len());
        if h > 0 && usize::from(e[h - 1].0) >= w {
            return self.lower(w);
        }
        let stop = (h + HINT_STEPS).min(e.len());
        let mut i = h;
        while i < stop {
            if usize::from(e[i].0) >= w {
                return i;
            }
            i += 1;
        }
        i + e[i..].partition_point(|x| usize::from(x.0) < w)
    }

    /// Index of the first entry with word index >= `w`.
    #[inline]
    pub(super) fn lower(&self, w: usize) -> usize {
        // From the chunk's start (a walk entering the chunk): the first entry, without the
        // binary search's chain of dependent loads through a list not in cache yet.
        match self.entries.first() {
            Some(e) if usize::from(e.0) < w => {
                self.entries.partition_point(|e| usize::from(e.0) < w)
            }
            _ => 0,
        }
    }

    /// Word `w` of the chunk.
    #[inline]
    pub(super) fn word(&self, w: usize) -> u64 {
        let i = self.lower(w);
        match self.entries.get(i) {
            Some(&(k, v)) if usize::from(k) == w => v,
            _ => 0,
        }
    }

    /// words[w] |= mask; returns the number of bits that changed. (May grow past SPARSE_MAX:
    /// the caller settles the chunk.)
    pub(super) fn or(&mut self, w: usize, mask: u64) -> u32 {
        if mask == 0 {
            return 0;
        }
        let i = self.lower(w);
        let changed = match self.entries.get_mut(i) {
            Some((k, v)) if usize::from(*k) == w => {
                let c = (mask & !*v).count_ones();
                *v |= mask;
                c
            }
            _ => {
                self.entries.insert(i, (w as u16, mask));
                mask.count_ones()
            }
        };
        self.count += changed;
        changed
    }

    /// Sets (`value`) or clears the local granules lo..=hi; returns the number changed.
    pub(super) fn fill(&mut self, lo: u64, hi: u64, value: bool) -> u64 {
        let (fw, lw) = (lo >> 6, hi >> 6);
        let mask_of = |w: u64| {
            let l = if w == fw { lo & 63 } else { 0 };
            let h = if w == lw { hi & 63 } else { 63 };
            bit_range_mask(l, h)
        };
        let mut changed = 0u64;
        if value {
            for w in fw..=lw {
                changed += u64::from(self.or(w as usize, mask_of(w)));
            }
        } else {
            let i = self.lower(fw as usize);
            for e in self.entries[i..].iter_mut() {
                let w = u64::from(e.0);
                if w > lw {
                    break;
                }
                let m = mask_of(w);
                changed += u64::from((e.1 & m).count_ones());
                e.1 &= !m;
            }
            self.entries.retain(|e| e.1 != 0);
            self.count -= changed as u32;
        }
        changed
    }

    /// First local granule >= `pos` that is dirty (`clean` false) or clean (`clean` true), as
    /// [`Part::find`] (words past the chunk are not searched).
    /// Starts from the search hint ([`Sparse::lower_hinted`]) and leaves it at the entry of
    /// the answer.
    pub(super) fn find(&self, pos: u64, clean: bool) -> Option<u64> {
        let mut w = (pos >> 6) as usize;
        let mut m = !0u64 << (pos & 63);
        let start = self.lower_hinted(w);
        if !clean {
            for (i, &(k, v)) in self.entries.iter().enumerate().skip(start) {
                let bits = if usize::from(k) == w { v & m } else { v };
                if bits != 0 {
                    self.hint.set(i);
                    return Some((u64::from(k) << 6) | u64::from(bits.trailing_zeros()));
                }
            }
            return None;
        }
        let mut i = start;
        while w < CHUNK_WORDS {
            let (v, listed) = match self.entries.get(i) {
                Some(&(k, v)) if usize::from(k) == w => (v, true),
                _ => (0, false),
            };
            let bits = !v & m;
            if bits != 0 {
                self.hint.set(i);
                return Some(((w as u64) << 6) | u64::from(bits.trailing_zeros()));
            }
            if listed {
                i += 1;
            }
            w += 1;
            m = !0;
        }
        None
    }

    /// The first dirty local granule >= `pos` and the first clean one after it (None: dirty
    /// up to the chunk's end): [`Sparse::find`] for a dirty then a clean granule, with one
    /// hinted lookup. Leaves the hint at the entry of the run's end.
    pub(super) fn find_run(&self, pos: u64) -> Option<(u64, Option<u64>)> {
        let w = (pos >> 6) as usize;
        let e = &self.entries;
        let mut i = self.lower_hinted(w);
        let (k, bits) = loop {
            let &(k, v) = e.get(i)?;
            let k = usize::from(k);
            let bits = if k == w { v & (!0u64 << (pos & 63)) } else { v };
            if bits != 0 {
                break (k, bits);
            }
            i += 1;
        };
        let b = bits.trailing_zeros();
        let start = ((k as u64) << 6) | u64::from(b);
        // The end: the first clean bit from the start on, in its word or in the words listed
        // right after it; a word not listed is clean.
        let (mut cw, mut v, mut m) = (k, e[i].1, !0u64 << b);
        loop {
            let clean = !v & m;
            if clean != 0 {
                self.hint.set(i);
                return Some((
                    start,
                    Some(((cw as u64) << 6) | u64::from(clean.trailing_zeros())),
                ));
            }
            cw += 1;
            i += 1;
            if cw >= CHUNK_WORDS {
                self.hint.set(i);
                return Some((start, None));
            }
            match e.get(i) {
                Some(&(k, x)) if usize::from(k) == cw => (v, m) = (x, !0),
                _ => {
                    self.hint.set(i);
                    return Some((start, Some((cw as u64) << 6)));
                }
            }
        }
    }

    /// The same contents as a partial chunk.
    pub(super) fn to_part(&self) -> Box<Part> {
        let mut p = Part::zeroed();
        for &(k, v) in &self.entries {
            p.words[usize::from(k)] = v;
        }
        p.resummarize_groups(0, GROUPS);
        p
    }

    /// The non-zero words of a partial chunk, through its summaries.
    pub(super) fn from_part(p: &Part) -> Sparse {
        let mut entries = Vec::new();
        let mut groups = p.any2;
        while groups != 0 {
            let g = groups.trailing_zeros() as usize;
            groups &= groups - 1;
            let mut ws = p.any1[g];
            while ws != 0 {
                let w = (g << 6) | ws.trailing_zeros() as usize;
                ws &= ws - 1;
                entries.push((w as u16, p.words[w]));
            }
        }
        Sparse::new(entries, p.count)
    }

    /// Writes the words lo..lo + dst.len() / 8 of the chunk into `dst` (little-endian).
    pub(super) fn store_le(&self, lo: usize, dst: &mut [u8]) {
        dst.fill(0);
        let hi = lo + dst.len() / 8;
        for &(k, v) in &self.entries[self.lower(lo)..] {
            let k = usize::from(k);
            if k >= hi {
                break;
            }
            dst[(k - lo) * 8..(k - lo) * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Sparse>() + self.entries.capacity() * std::mem::size_of::<(u16, u64)>()
    }
}
