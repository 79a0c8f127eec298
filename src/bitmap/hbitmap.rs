//! The hierarchical bitmap engine (our own design after QEMU's HBitmap idea).
//!
//! Items are bytes of the virtual disk. One bit of the bottom level covers `1 << granularity_bits`
//! bytes (a granule). Callers (crate::bitmap::DirtyBitmap) validate arguments before calling; the
//! engine clamps ranges to the size and never panics on any input combination.
//!
//! # Design: chunks with their own summaries, under a table of chunk states
//!
//! The bitmap is cut into chunks of [`CHUNK_GRANULES`] (2^16) granules, 1024 bottom words
//! (8 KiB). A chunk is in one of four states:
//!
//! * **clean**: no storage at all (`chunks[c]` is `None`, `nonempty` bit clear);
//! * **full**: every granule of the chunk dirty, also no storage (`None`, `notfull` bit clear);
//! * **sparse**: a [`Sparse`] — at most [`SPARSE_MAX`] (128) non-zero words as a sorted list of
//!   (word index, word) pairs (16 bytes each, so at most 2 KiB) and the chunk's dirty count,
//!   in a side table (`sparse[c]`, allocated with the first sparse chunk, freed with the last,
//!   so that the chunk table stays one pointer per chunk);
//! * **partial**: a [`Part`] — the 1024 words plus two small summary levels ("word non-zero",
//!   "word all ones", and one word above each) and the chunk's dirty count.
//!
//! Every operation leaves chunks in canonical form: a sparse or partial chunk whose count falls
//! to zero is freed (clean), one whose count reaches its capacity is freed (full). A first set
//! in a clean chunk makes it sparse (when it spans at most SPARSE_MAX words); a sparse chunk that
//! would grow past SPARSE_MAX words becomes partial; a reset that leaves a partial chunk with at
//! most [`SPARSE_BACK`] (32) dirty granules makes it sparse again (cheap through its summaries;
//! the gap between 32 and 128 words avoids flapping). [`HBitmap::load_words_le`] builds sparse
//! chunks straight from the incoming words (no 8 KiB chunk allocated or touched). So memory
//! follows the dirt: a clean or fully dirty region of any size costs one table pointer per 2^16
//! granules, a sparse chunk 16 bytes per non-zero word, and a partial chunk its flat size plus
//! about 3.3% (summaries). Searches in a sparse chunk are binary searches and list walks
//! (at most 128 entries); other operations on it touch only its list, except those that would
//! make it dense (a large set, deserialize_part, merging a partial source), which convert it to
//! a partial chunk first.
//!
//! Above the chunks, two bit vectors over chunk indices, each with "word non-zero" summary levels
//! (64 times smaller each, up to one word): `nonempty` (chunk has a dirty granule) and `notfull`
//! (chunk has a clean granule). A search for the next dirty (clean) granule looks in its own
//! chunk through the chunk summaries (at most three word reads), then jumps with the `nonempty`
//! (`notfull`) tower to the next chunk that can contain one, in O(levels) word reads whatever
//! the distance — so both next_dirty in a sparse bitmap and next_zero in a full one are O(1)-ish,
//! and a fully dirty region is skipped in one step (QEMU's HBitmap summarizes only "non-zero",
//! so its next_zero scans a dirty region word by word).
//!
//! The total dirty count is maintained incrementally (popcount of changed bits), so `count` and
//! `is_empty` are O(1). Updates of whole chunks (set/reset/merge/deserialize covering a chunk)
//! switch its state without touching words. Merging same-shaped bitmaps works chunk by chunk:
//! clean source chunks are skipped through the tower, a full source chunk makes the destination
//! chunk full, a partial one is copied (clean destination) or OR-ed group by group with the
//! destination's summaries recomputed on the way. The engine keeps every summary and count exact
//! at all times, including during deserialize_* sequences (`deserialize_finish` has nothing left
//! to do).
//!
//! Cost model (what a caller on the write path should know): setting granules in a partial
//! chunk costs a few word operations; the first set in a clean chunk allocates a small sparse
//! list; a set in a sparse chunk costs a binary search and an insertion into at most 128
//! entries, and the set that grows it past 128 words allocates one `Part` (about 8.3 KiB); a
//! reset inside a full chunk allocates one filled with ones.
//! Sets in full chunks and resets in clean chunks cost nothing beyond the table lookup.

use std::fmt;

use super::sha256::{to_hex, Sha256};

/// Largest number of granules a bitmap may track (2^41, as QEMU's HBitmap on 64-bit hosts).
pub const MAX_GRANULES: u64 = 1 << 41;

/// log2 of the granules per chunk.
const CHUNK_BITS: u32 = 16;
/// Granules per chunk.
pub const CHUNK_GRANULES: u64 = 1 << CHUNK_BITS;
/// Mask of a granule index within its chunk.
const CHUNK_MASK: u64 = CHUNK_GRANULES - 1;
/// Bottom words per chunk.
const CHUNK_WORDS: usize = 1 << (CHUNK_BITS - 6);
/// The bytes of a full chunk, for `load_words_le`'s full-chunk test.
static ONES_CHUNK_BYTES: [u8; CHUNK_WORDS * 8] = [0xff; CHUNK_WORDS * 8];
/// Groups of 64 words per chunk (bits of the chunk's top summary word).
const GROUPS: usize = CHUNK_WORDS / 64;
const _: () = assert!(GROUPS >= 1 && GROUPS <= 64);
/// Valid bits of a chunk's top summary word.
const GROUP_MASK: u64 = if GROUPS == 64 {
    !0
} else {
    (1u64 << GROUPS) - 1
};

/// All-zero and all-one bytes of one chunk, fed to SHA-256 for chunks without storage.
static ZERO_BYTES: [u8; CHUNK_WORDS * 8] = [0; CHUNK_WORDS * 8];
static ONE_BYTES: [u8; CHUNK_WORDS * 8] = [0xff; CHUNK_WORDS * 8];

/// The storage of a partially dirty chunk.
#[derive(Clone)]
struct Part {
    /// One bit per granule of the chunk; bits past the bitmap's end are zero.
    words: [u64; CHUNK_WORDS],
    /// Bit w % 64 of `any1[w / 64]`: `words[w] != 0`.
    any1: [u64; GROUPS],
    /// Bit w % 64 of `full1[w / 64]`: `words[w] == !0`.
    full1: [u64; GROUPS],
    /// Bit g: `any1[g] != 0`.
    any2: u64,
    /// Bit g: `full1[g] == !0`.
    full2: u64,
    /// Set bits in `words`.
    count: u32,
}

/// Mask of bits lo..=hi (0 <= lo <= hi <= 63) of a word.
#[inline]
fn bit_range_mask(lo: u64, hi: u64) -> u64 {
    (!0u64 << lo) & (!0u64 >> (63 - hi))
}

/// Mask of the bits strictly above bit `b` (0 <= b <= 63).
#[inline]
fn above(b: u64) -> u64 {
    (!0u64 << b) << 1
}

impl Part {
    fn zeroed() -> Box<Part> {
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
    fn ones(cap: u64) -> Box<Part> {
        let mut p = Part::zeroed();
        if cap > 0 {
            p.fill(0, cap - 1, true);
        }
        p
    }

    /// words[w] |= mask; returns the number of bits that changed.
    #[inline]
    fn or(&mut self, w: usize, mask: u64) -> u32 {
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
    fn andnot(&mut self, w: usize, mask: u64) -> u32 {
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
    fn fill(&mut self, lo: u64, hi: u64, value: bool) -> u64 {
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
    fn find(&self, pos: u64, clean: bool) -> Option<u64> {
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
    fn or_from(&mut self, src: &Part) {
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
    fn resummarize_groups_only(&mut self, g0: usize, g1: usize) {
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
    fn resummarize_groups(&mut self, g0: usize, g1: usize) {
        self.resummarize_groups_only(g0, g1);
        self.count = self.words.iter().map(|w| w.count_ones()).sum();
        self.resummarize_top();
    }

    /// Recomputes `any2` and `full2` from the group summaries.
    fn resummarize_top(&mut self) {
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
const SPARSE_MAX: usize = 128;
/// A partial chunk with at most this many dirty granules is turned back into a sparse one by
/// a reset (hysteresis: a set that grows a sparse chunk past [`SPARSE_MAX`] words makes it
/// partial, so only a clear shrink goes back).
const SPARSE_BACK: u32 = 32;

/// The storage of a sparsely dirty chunk: its non-zero words as (word index, word), sorted by
/// index, at most [`SPARSE_MAX`] of them between operations.
#[derive(Clone, Default)]
struct Sparse {
    entries: Vec<(u16, u64)>,
    /// Set bits in the words.
    count: u32,
}

impl Sparse {
    /// Index of the first entry with word index >= `w`.
    #[inline]
    fn lower(&self, w: usize) -> usize {
        self.entries.partition_point(|e| usize::from(e.0) < w)
    }

    /// Word `w` of the chunk.
    #[inline]
    fn word(&self, w: usize) -> u64 {
        let i = self.lower(w);
        match self.entries.get(i) {
            Some(&(k, v)) if usize::from(k) == w => v,
            _ => 0,
        }
    }

    /// words[w] |= mask; returns the number of bits that changed. (May grow past SPARSE_MAX:
    /// the caller settles the chunk.)
    fn or(&mut self, w: usize, mask: u64) -> u32 {
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
    fn fill(&mut self, lo: u64, hi: u64, value: bool) -> u64 {
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
    fn find(&self, pos: u64, clean: bool) -> Option<u64> {
        let mut w = (pos >> 6) as usize;
        let mut m = !0u64 << (pos & 63);
        let mut i = self.lower(w);
        if !clean {
            for &(k, v) in &self.entries[i..] {
                let bits = if usize::from(k) == w { v & m } else { v };
                if bits != 0 {
                    return Some((u64::from(k) << 6) | u64::from(bits.trailing_zeros()));
                }
            }
            return None;
        }
        while w < CHUNK_WORDS {
            let v = match self.entries.get(i) {
                Some(&(k, v)) if usize::from(k) == w => {
                    i += 1;
                    v
                }
                _ => 0,
            };
            let bits = !v & m;
            if bits != 0 {
                return Some(((w as u64) << 6) | u64::from(bits.trailing_zeros()));
            }
            w += 1;
            m = !0;
        }
        None
    }

    /// The same contents as a partial chunk.
    fn to_part(&self) -> Box<Part> {
        let mut p = Part::zeroed();
        for &(k, v) in &self.entries {
            p.words[usize::from(k)] = v;
        }
        p.resummarize_groups(0, GROUPS);
        p
    }

    /// The non-zero words of a partial chunk, through its summaries.
    fn from_part(p: &Part) -> Sparse {
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
        Sparse {
            entries,
            count: p.count,
        }
    }

    /// Writes the words lo..lo + dst.len() / 8 of the chunk into `dst` (little-endian).
    fn store_le(&self, lo: usize, dst: &mut [u8]) {
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

    fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Sparse>() + self.entries.capacity() * std::mem::size_of::<(u16, u64)>()
    }
}

/// A bit vector with "word non-zero" summary levels, for finding set bits fast.
#[derive(Clone, Default)]
struct Tower {
    /// `levels[0]` is the bit vector; bit n of `levels[l + 1]` is set iff word n of `levels[l]`
    /// is non-zero. The last level has one word.
    levels: Vec<Vec<u64>>,
}

impl Tower {
    /// `bits` bits, all clear (`ones` false) or all set.
    fn new(bits: usize, ones: bool) -> Tower {
        let words = bits.div_ceil(64).max(1);
        let mut v = vec![0u64; words];
        if ones {
            v.fill(!0);
            if bits % 64 != 0 {
                v[words - 1] = (1u64 << (bits % 64)) - 1;
            }
            if bits == 0 {
                v[0] = 0;
            }
        }
        Tower::from_bits(v)
    }

    /// A tower over the given bottom level (at least one word).
    fn from_bits(bits: Vec<u64>) -> Tower {
        let mut levels = vec![bits];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            let mut up = vec![0u64; last.len().div_ceil(64)];
            for (o, chunk) in up.iter_mut().zip(last.chunks(64)) {
                *o = chunk
                    .iter()
                    .enumerate()
                    .fold(0, |v, (i, &w)| v | (u64::from(w != 0) << i));
            }
            levels.push(up);
        }
        Tower { levels }
    }

    #[inline]
    fn get(&self, idx: usize) -> bool {
        self.levels[0]
            .get(idx >> 6)
            .is_some_and(|w| (w >> (idx & 63)) & 1 != 0)
    }

    #[inline]
    fn set(&mut self, mut idx: usize) {
        for level in &mut self.levels {
            let Some(word) = level.get_mut(idx >> 6) else {
                return;
            };
            let was = *word;
            *word |= 1u64 << (idx & 63);
            if was != 0 {
                return;
            }
            idx >>= 6;
        }
    }

    #[inline]
    fn clear(&mut self, mut idx: usize) {
        for level in &mut self.levels {
            let Some(word) = level.get_mut(idx >> 6) else {
                return;
            };
            *word &= !(1u64 << (idx & 63));
            if *word != 0 {
                return;
            }
            idx >>= 6;
        }
    }

    /// First set bit >= `pos`.
    fn find(&self, pos: usize) -> Option<usize> {
        let top = self.levels.len() - 1;
        let mut level = 0usize;
        let mut idx = pos;
        loop {
            let w = idx >> 6;
            let word = *self.levels[level].get(w)?;
            let bits = word & (!0u64 << (idx & 63));
            if bits != 0 {
                let mut found = (w << 6) | bits.trailing_zeros() as usize;
                while level > 0 {
                    level -= 1;
                    let word = *self.levels[level].get(found)?;
                    found = (found << 6) | word.trailing_zeros() as usize;
                }
                return Some(found);
            }
            if level == top {
                return None;
            }
            level += 1;
            idx = w + 1;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.levels.capacity() * std::mem::size_of::<Vec<u64>>()
            + self.levels.iter().map(|l| l.capacity() * 8).sum::<usize>()
    }
}

/// A hierarchical dirty bitmap over `size` bytes.
#[derive(Clone)]
pub struct HBitmap {
    /// Covered length in bytes.
    size: u64,
    /// log2 of the granularity (clamped to 63).
    gbits: u32,
    /// ceil(size / granularity).
    granules: u64,
    /// Number of dirty granules.
    dirty: u64,
    /// Net change of `dirty` made by deserialize_* calls since the last deserialize_finish:
    /// like QEMU, the visible count ignores them until the finish.
    deser_delta: i64,
    /// One slot per chunk (`chunk_count(granules)`): `Some` for partial chunks only.
    chunks: Vec<Option<Box<Part>>>,
    /// Empty until the first sparse chunk, then one slot per chunk: `Some` for sparse chunks
    /// only (their `chunks` slot is `None`). Kept apart so that the chunk table stays one
    /// pointer per chunk.
    sparse: Vec<Option<Box<Sparse>>>,
    /// Number of `Some` slots in `sparse` (the table is freed when it falls to zero).
    sparse_live: usize,
    /// Bit c: chunk c has a dirty granule.
    nonempty: Tower,
    /// Bit c: chunk c has a clean granule (the chunk of a zero-granule bitmap counts as clean).
    notfull: Tower,
}

impl fmt::Debug for HBitmap {
    // Manual impl: the derived one would print every word of a possibly huge bitmap.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HBitmap")
            .field("size", &self.size)
            .field("granularity_bits", &self.gbits)
            .field("granules", &self.granules)
            .field("dirty_granules", &self.dirty)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

/// Number of bottom words for `granules` bits (at least one, like QEMU).
fn words_for(granules: u64) -> u64 {
    granules.div_ceil(64).max(1)
}

/// Number of chunks for `granules` (at least one).
fn chunk_count(granules: u64) -> usize {
    usize::try_from(granules.div_ceil(CHUNK_GRANULES).max(1)).unwrap_or(usize::MAX)
}

impl HBitmap {
    /// A clean bitmap of `size` bytes with granules of `1 << granularity_bits` bytes.
    /// `granularity_bits` < 64 and ceil(size / granule) <= MAX_GRANULES (checked by the caller).
    /// (A `granularity_bits` >= 64 is clamped to 63 rather than panicking.)
    pub fn new(size: u64, granularity_bits: u32) -> Self {
        let gbits = granularity_bits.min(63);
        let granules = size.div_ceil(1u64 << gbits);
        let n = chunk_count(granules);
        HBitmap {
            size,
            gbits,
            granules,
            dirty: 0,
            deser_delta: 0,
            chunks: vec![None; n],
            sparse: Vec::new(),
            sparse_live: 0,
            nonempty: Tower::new(n, false),
            notfull: Tower::new(n, true),
        }
    }
    /// Covered length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// log2 of the granularity.
    pub fn granularity_bits(&self) -> u32 {
        self.gbits
    }
    /// Number of granules: ceil(size / granularity).
    pub fn granules(&self) -> u64 {
        self.granules
    }
    /// Number of dirty granules (O(1)). Like QEMU, changes made by deserialize_* show only after
    /// deserialize_finish (the bits themselves and the searches see them at once).
    pub fn dirty_granules(&self) -> u64 {
        (self.dirty as i64).wrapping_sub(self.deser_delta).max(0) as u64
    }
    /// Dirty granules times granularity, in bytes (may exceed size by less than a granule). O(1).
    /// (Saturates at u64::MAX, only reachable for sizes within a granule of u64::MAX.)
    pub fn count(&self) -> u64 {
        let dirty = self.dirty_granules();
        if dirty > (u64::MAX >> self.gbits) {
            u64::MAX
        } else {
            dirty << self.gbits
        }
    }
    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.dirty_granules() == 0
    }

    /// Heap memory owned by the bitmap in bytes: the chunk table, the chunk towers and the
    /// storage of partial chunks (allocator overhead not included). O(chunks).
    pub fn heap_bytes(&self) -> usize {
        let parts = self.chunks.iter().filter(|c| c.is_some()).count();
        self.chunks.capacity() * std::mem::size_of::<Option<Box<Part>>>()
            + parts * std::mem::size_of::<Part>()
            + self.sparse.capacity() * std::mem::size_of::<Option<Box<Sparse>>>()
            + self
                .sparse
                .iter()
                .flatten()
                .map(|s| s.heap_bytes())
                .sum::<usize>()
            + self.nonempty.heap_bytes()
            + self.notfull.heap_bytes()
    }

    /// Number of chunks with storage (partially dirty chunks, sparse ones included). O(chunks).
    pub fn allocated_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
            + self.sparse.iter().filter(|c| c.is_some()).count()
    }

    /// Number of sparse chunks (partially dirty chunks kept as a list of words). O(chunks).
    pub fn sparse_chunks(&self) -> usize {
        self.sparse.iter().filter(|c| c.is_some()).count()
    }

    /// The storage of chunk `c` if it is sparse.
    #[inline]
    fn sp(&self, c: usize) -> Option<&Sparse> {
        self.sparse.get(c).and_then(|s| s.as_deref())
    }

    #[inline]
    fn sp_mut(&mut self, c: usize) -> Option<&mut Sparse> {
        self.sparse.get_mut(c).and_then(|s| s.as_deref_mut())
    }

    /// Removes chunk `c`'s sparse storage, if any.
    #[inline]
    fn take_sparse(&mut self, c: usize) -> Option<Box<Sparse>> {
        let s = self.sparse.get_mut(c).and_then(|s| s.take());
        if s.is_some() {
            self.sparse_live -= 1;
            if self.sparse_live == 0 {
                self.sparse = Vec::new();
            }
        }
        s
    }

    /// Makes `s` chunk `c`'s storage (its `chunks` slot must be `None`).
    fn put_sparse(&mut self, c: usize, s: Box<Sparse>) {
        if self.sparse.is_empty() {
            self.sparse = vec![None; self.chunks.len()];
        }
        if self.sparse[c].replace(s).is_none() {
            self.sparse_live += 1;
        }
    }

    /// True when chunk `c` has no storage (clean or full).
    #[inline]
    fn stateless(&self, c: usize) -> bool {
        self.chunks[c].is_none() && self.sp(c).is_none()
    }

    /// Dirty granules of chunk `c`.
    fn chunk_dirty(&self, c: usize) -> u64 {
        match (&self.chunks[c], self.sp(c)) {
            (Some(p), _) => u64::from(p.count),
            (None, Some(s)) => u64::from(s.count),
            (None, None) if self.notfull.get(c) => 0,
            (None, None) => self.cap(c),
        }
    }

    /// Turns a sparse chunk `c` into a partial one (nothing for other states).
    fn densify(&mut self, c: usize) {
        if let Some(s) = self.take_sparse(c) {
            self.chunks[c] = Some(s.to_part());
        }
    }

    /// Word `l` (global index `i`) of chunk `c`, whatever its state.
    #[inline]
    fn chunk_word(&self, c: usize, l: usize, i: u64) -> u64 {
        match (&self.chunks[c], self.sp(c)) {
            (Some(p), _) => p.words[l],
            (None, Some(s)) => s.word(l),
            (None, None) => self.stateless_word(c, i),
        }
    }

    /// Granules of chunk `c` that lie inside the bitmap.
    #[inline]
    fn cap(&self, c: usize) -> u64 {
        let base = (c as u64) << CHUNK_BITS;
        self.granules.saturating_sub(base).min(CHUNK_GRANULES)
    }

    /// The granules [first, last] intersecting [start, start + bytes), clamped; None if empty.
    fn granule_span(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        if bytes == 0 || start >= self.size {
            return None;
        }
        let first = start >> self.gbits;
        let last = (start.saturating_add(bytes - 1) >> self.gbits).min(self.granules - 1);
        Some((first, last))
    }

    /// Mask of the valid bits of the last bottom word.
    fn last_word_mask(&self) -> u64 {
        match self.granules % 64 {
            0 if self.granules == 0 => 0,
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }

    /// Frees chunk `c`'s storage when it has become clean or full.
    #[inline]
    fn settle(&mut self, c: usize) {
        let cap = self.cap(c);
        let Some(p) = &self.chunks[c] else {
            self.settle_sparse(c);
            return;
        };
        let n = u64::from(p.count);
        if n == 0 {
            self.chunks[c] = None;
            self.nonempty.clear(c);
        } else if n == cap {
            self.chunks[c] = None;
            self.notfull.clear(c);
        }
    }

    /// Frees a sparse chunk `c` that has become clean or full, and makes one that has grown
    /// past [`SPARSE_MAX`] words partial.
    #[cold]
    fn settle_sparse(&mut self, c: usize) {
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
    fn part_mut(&mut self, c: usize) -> &mut Part {
        self.densify(c);
        if self.chunks[c].is_none() {
            let part = if self.notfull.get(c) {
                self.nonempty.set(c);
                Part::zeroed()
            } else {
                self.notfull.set(c);
                Part::ones(self.cap(c))
            };
            self.chunks[c] = Some(part);
        }
        match &mut self.chunks[c] {
            Some(p) => p,
            None => unreachable!("allocated above"),
        }
    }

    /// Sets (`value`) or clears the local granules lo..=hi (< cap) of chunk `c`.
    #[inline]
    fn fill_chunk(&mut self, c: usize, lo: u64, hi: u64, value: bool) {
        let cap = self.cap(c);
        if lo == 0 && hi + 1 >= cap {
            // The whole chunk: a state change, no storage.
            let before = self.chunk_dirty(c);
            self.chunks[c] = None;
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
        } else if self.chunks[c].is_none() {
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
            if let Some(p) = &self.chunks[c] {
                if p.count > 0 && p.count <= SPARSE_BACK {
                    let s = Box::new(Sparse::from_part(p));
                    self.chunks[c] = None;
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
    fn fill_granules(&mut self, first: u64, last: u64, value: bool) {
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

    /// Sets every granule that intersects [start, start + bytes) (rounded outward), clamped to size.
    #[inline]
    pub fn set(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.granule_span(start, bytes) {
            // Fast path: one word of a partial chunk (the common guest write).
            if first >> 6 == last >> 6 {
                let c = (first >> CHUNK_BITS) as usize;
                if let Some(Some(p)) = self.chunks.get_mut(c) {
                    let w = ((first & CHUNK_MASK) >> 6) as usize;
                    let added = p.or(w, bit_range_mask(first & 63, last & 63));
                    if added != 0 {
                        self.dirty += u64::from(added);
                        self.settle(c);
                    }
                    return;
                }
            }
            self.fill_granules(first, last, true);
        }
    }
    /// Clears every granule that intersects [start, start + bytes), clamped to size.
    /// (Alignment is checked by the caller.)
    pub fn reset(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.granule_span(start, bytes) {
            self.fill_granules(first, last, false);
        }
    }
    /// Clears everything and frees all chunk storage. O(chunks).
    pub fn reset_all(&mut self) {
        let n = self.chunks.len();
        self.chunks = vec![None; n];
        self.sparse = Vec::new();
        self.sparse_live = 0;
        self.nonempty = Tower::new(n, false);
        self.notfull = Tower::new(n, true);
        self.dirty = 0;
        self.deser_delta = 0;
    }
    /// Whether the granule containing byte `offset` is dirty (false beyond the end).
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let k = offset >> self.gbits;
        let c = (k >> CHUNK_BITS) as usize;
        match self.chunks.get(c) {
            Some(Some(p)) => (p.words[((k & CHUNK_MASK) >> 6) as usize] >> (k & 63)) & 1 != 0,
            Some(None) => match self.sp(c) {
                Some(s) => (s.word(((k & CHUNK_MASK) >> 6) as usize) >> (k & 63)) & 1 != 0,
                None => !self.notfull.get(c),
            },
            None => false,
        }
    }

    /// First granule index >= `pos` and < `granules` that is dirty (`clean` false) or clean
    /// (`clean` true).
    #[inline]
    fn find(&self, pos: u64, clean: bool) -> Option<u64> {
        if pos >= self.granules {
            return None;
        }
        let c = (pos >> CHUNK_BITS) as usize;
        let here = match self.chunks.get(c)? {
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
                let base = (n as u64) << CHUNK_BITS;
                match self.chunks.get(n)? {
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
        Some((start >> self.gbits, ((end - 1) >> self.gbits) + 1))
    }

    /// First dirty byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_dirty(&self, start: u64, bytes: u64) -> Option<u64> {
        let (first, end) = self.search_bounds(start, bytes)?;
        let k = self.find(first, false)?;
        (k < end).then(|| start.max(k << self.gbits))
    }
    /// First clean byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_zero(&self, start: u64, bytes: u64) -> Option<u64> {
        let (first, end) = self.search_bounds(start, bytes)?;
        let k = self.find(first, true)?;
        (k < end).then(|| start.max(k << self.gbits))
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
    /// The maximal dirty runs of [start, min(end, size)) in order, as (offset, length) in bytes
    /// (clamped to the range; a run may end inside the last, partial granule at the size).
    pub fn dirty_runs(&self, start: u64, end: u64) -> DirtyRuns<'_> {
        let end = end.min(self.size);
        let (first, end_g) = if start < end {
            (start >> self.gbits, ((end - 1) >> self.gbits) + 1)
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
    /// self |= other. Sizes are equal (checked by the caller); granularities may differ: a
    /// coarser destination rounds outward.
    ///
    /// Equal granularities and sizes work chunk by chunk (only the source's dirty chunks are
    /// visited); otherwise each dirty run of `other` is set in bytes.
    pub fn merge_from(&mut self, other: &HBitmap) {
        if other.dirty == 0 {
            return;
        }
        if other.gbits == self.gbits && other.granules == self.granules {
            let mut c = 0;
            while let Some(n) = other.nonempty.find(c) {
                match other.chunks.get(n) {
                    Some(Some(src)) => self.or_part(n, src),
                    Some(None) if other.sp(n).is_some() => {
                        if let Some(src) = other.sp(n) {
                            self.or_sparse(n, src);
                        }
                    }
                    Some(None) => {
                        let cap = self.cap(n);
                        if cap > 0 {
                            self.fill_chunk(n, 0, cap - 1, true);
                        }
                    }
                    None => return,
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
        if other.gbits != self.gbits || other.granules != self.granules {
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
                let extra = match (&self.chunks[c], &other.chunks[c], other.sp(c)) {
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
        match &mut self.chunks[c] {
            None if !self.notfull.get(c) => {} // already full
            None => {
                self.chunks[c] = Some(Box::new(src.clone()));
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
        if let Some(dst) = &mut self.chunks[c] {
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

    /// Resizes to `new_size` bytes: new granules are clean; granules entirely beyond the new end
    /// are dropped (their storage freed). O(chunks).
    pub fn truncate(&mut self, new_size: u64) {
        let new_granules = new_size.div_ceil(1u64 << self.gbits);
        self.size = new_size;
        if new_granules == self.granules {
            return;
        }
        let old_n = self.chunks.len();
        if new_granules < self.granules {
            self.fill_granules(new_granules, self.granules - 1, false);
        } else {
            // A full last chunk whose capacity grows keeps only its old granules dirty.
            let c = old_n - 1;
            let cap = self.cap(c);
            if self.chunks[c].is_none() && !self.notfull.get(c) && cap < CHUNK_GRANULES {
                self.chunks[c] = Some(Part::ones(cap));
                self.notfull.set(c);
            }
        }
        self.granules = new_granules;
        let n = chunk_count(new_granules);
        if !self.sparse.is_empty() {
            self.sparse.resize(n, None);
            self.sparse.shrink_to_fit();
        }
        if n < old_n {
            self.chunks.truncate(n);
            self.chunks.shrink_to_fit();
        } else if n > old_n {
            // Zeroed allocation: the new tail of the table costs no resident memory.
            let mut grown: Vec<Option<Box<Part>>> = vec![None; n];
            for (slot, part) in grown.iter_mut().zip(self.chunks.drain(..)) {
                *slot = part;
            }
            self.chunks = grown;
        }
        let resize = |tower: &mut Tower, fill_new: bool| {
            let mut bits = std::mem::take(&mut tower.levels[0]);
            bits.resize(n.div_ceil(64).max(1), 0);
            if fill_new {
                for i in old_n.min(n)..n {
                    bits[i >> 6] |= 1 << (i & 63);
                }
            }
            if n % 64 != 0 {
                bits[n >> 6] &= (1u64 << (n % 64)) - 1;
            }
            bits.truncate(n.div_ceil(64).max(1));
            *tower = Tower::from_bits(bits);
        };
        resize(&mut self.nonempty, false);
        resize(&mut self.notfull, true);
        // The new last chunk may have become full (its capacity shrank).
        self.settle(n - 1);
    }
    /// 64 granules in bytes: every serialization chunk starts at a multiple of this.
    /// (Saturates at u64::MAX for granularities of 2^58 bytes and more, which QEMU cannot
    /// serialize either.)
    pub fn serialization_align(&self) -> u64 {
        1u64.checked_shl(self.gbits + 6).unwrap_or(u64::MAX)
    }

    /// Bottom words [first, last] spanned by [start, start + bytes), not clamped to the size.
    fn word_span(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        if bytes == 0 {
            return None;
        }
        let first = (start >> self.gbits) >> 6;
        let last = (start.saturating_add(bytes - 1) >> self.gbits) >> 6;
        Some((first, last))
    }

    /// The span's bottom words that exist, as an index range, with the span's word count.
    fn existing_words(&self, start: u64, bytes: u64) -> (std::ops::Range<u64>, u64) {
        match self.word_span(start, bytes) {
            None => (0..0, 0),
            Some((first, last)) => {
                let len = words_for(self.granules);
                (first.min(len)..(last + 1).min(len), last - first + 1)
            }
        }
    }

    /// Bytes needed to serialize [start, start + bytes): whole 64-bit words spanned.
    pub fn serialization_size(&self, start: u64, bytes: u64) -> u64 {
        match self.word_span(start, bytes) {
            None => 0,
            Some((first, last)) => (last - first + 1) * 8,
        }
    }

    /// Bottom word `w` (< words_for(granules)) of a chunk without storage.
    #[inline]
    fn stateless_word(&self, c: usize, w: u64) -> u64 {
        if self.notfull.get(c) {
            0
        } else if w + 1 == words_for(self.granules) {
            self.last_word_mask()
        } else {
            !0
        }
    }

    /// Writes the granules of [start, start + bytes) into `buf` in QEMU's layout: little-endian
    /// 64-bit words, granule k of the chunk is bit k % 8 of byte k / 8. `buf.len()` >=
    /// serialization_size. Bits past the end of the bitmap are written as zero.
    /// (A shorter `buf` receives only the whole words that fit.)
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, bytes: u64) {
        let (range, nwords) = self.existing_words(start, bytes);
        let nwords = usize::try_from(nwords).unwrap_or(usize::MAX);
        let mut out = buf.chunks_exact_mut(8).take(nwords);
        let mut w = range.start;
        while w < range.end {
            let c = (w / CHUNK_WORDS as u64) as usize;
            let seg_end = ((c as u64 + 1) * CHUNK_WORDS as u64).min(range.end);
            // (The word side first: zip must not consume an output chunk it cannot fill.)
            match &self.chunks[c] {
                Some(p) => {
                    let lo = (w % CHUNK_WORDS as u64) as usize;
                    let hi = lo + (seg_end - w) as usize;
                    for (v, chunk) in p.words[lo..hi].iter().zip(&mut out) {
                        chunk.copy_from_slice(&v.to_le_bytes());
                    }
                }
                None => {
                    for (i, chunk) in (w..seg_end).zip(&mut out) {
                        let l = (i % CHUNK_WORDS as u64) as usize;
                        chunk.copy_from_slice(&self.chunk_word(c, l, i).to_le_bytes());
                    }
                }
            }
            w = seg_end;
        }
        // Words of the span past the end of the bitmap.
        for chunk in out {
            chunk.fill(0);
        }
    }
    /// Overwrites the words spanned by [start, start + bytes) from `buf` (QEMU layout). Bits past
    /// the end of the bitmap are masked off. (Only words fully present in `buf` are written.)
    /// Count and summaries are kept exact; chunks that stay clean are not allocated.
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, bytes: u64) {
        let before = self.dirty;
        self.deserialize_words(buf, start, bytes);
        self.note_deserialized(before);
    }

    /// Bulk form of [`deserialize_part`](Self::deserialize_part) for whole words: overwrites the
    /// bottom words `first_word ..` with the little-endian words of `bytes` (QEMU layout; a
    /// trailing partial word is ignored, words past the end of the bitmap are dropped and bits
    /// past its end masked off). Same result and count semantics as `deserialize_part` over
    /// those words (the count change shows after deserialize_finish).
    ///
    /// Works a chunk at a time: a chunk whose words all arrive is classified first — all zero
    /// leaves it clean (no allocation), all ones makes it full (no storage), at most
    /// SPARSE_MAX non-zero words make it sparse (the non-zero words are picked out of the input;
    /// no 8 KiB chunk is allocated), anything else gets its words copied and its summaries and
    /// count rebuilt in one pass. Words that cover part of a clean or sparse chunk keep it sparse
    /// if the result fits; otherwise they are copied into a partial chunk and only their groups
    /// re-summarized.
    pub fn load_words_le(&mut self, first_word: u64, bytes: &[u8]) {
        let total = words_for(self.granules);
        let n = (bytes.len() / 8) as u64;
        if first_word >= total || n == 0 || self.granules == 0 {
            return;
        }
        let end = first_word.saturating_add(n).min(total);
        let before = self.dirty;
        let mut w = first_word;
        while w < end {
            let c = (w / CHUNK_WORDS as u64) as usize;
            let seg_end = ((c as u64 + 1) * CHUNK_WORDS as u64).min(end);
            let (a, b) = (
                (w - first_word) as usize * 8,
                (seg_end - first_word) as usize * 8,
            );
            self.load_chunk_words(c, (w % CHUNK_WORDS as u64) as usize, &bytes[a..b]);
            w = seg_end;
        }
        self.note_deserialized(before);
    }

    /// Overwrites words lo.. of chunk `c` with `src` (whole words, all inside the bitmap).
    fn load_chunk_words(&mut self, c: usize, lo: usize, src: &[u8]) {
        let cap = self.cap(c);
        let cap_words = cap.div_ceil(64) as usize;
        let nw = src.len() / 8;
        let hi = lo + nw; // exclusive, <= cap_words
                          // The chunk's last word keeps only the bits inside the bitmap.
        let tail_mask = match cap % 64 {
            0 => !0u64,
            r => (1u64 << r) - 1,
        };
        let word = |i: usize| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&src[i * 8..i * 8 + 8]);
            let v = u64::from_le_bytes(a);
            if lo + i + 1 == cap_words {
                v & tail_mask
            } else {
                v
            }
        };
        // A whole chunk of all-ones bytes (a full bitmap's chunks): one memcmp against a
        // constant (the C library's vectorized comparison, faster than the word loop below,
        // which is compiled for baseline SSE2), tried only when the first and last words are
        // all ones.
        if lo == 0
            && nw == CHUNK_WORDS
            && cap_words == CHUNK_WORDS
            && tail_mask == !0
            && src[..8] == [0xff; 8]
            && src[src.len() - 8..] == [0xff; 8]
            && src == &ONES_CHUNK_BYTES[..]
        {
            self.fill_chunk(c, 0, cap - 1, true);
            return;
        }
        // Classify: OR and AND of the words (the last one compared to its mask separately).
        let body = if hi == cap_words { nw - 1 } else { nw };
        let (mut or, mut and) = (0u64, !0u64);
        for b in src[..body * 8].chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let v = u64::from_le_bytes(a);
            or |= v;
            and &= v;
        }
        let mut ones = and == !0;
        if body < nw {
            let v = word(nw - 1);
            or |= v;
            ones &= v == tail_mask;
        }
        let zeros = or == 0;
        // A clean or sparse chunk that stays within SPARSE_MAX words is built as a sparse
        // one straight from the incoming words (no 8 KiB chunk allocated or touched).
        let whole = lo == 0 && hi == cap_words;
        if !(zeros || (whole && ones)) && (whole || self.chunks[c].is_none()) {
            let kept = match self.sp(c) {
                _ if whole => Some(0),
                Some(s) => Some(
                    s.entries
                        .iter()
                        .filter(|e| usize::from(e.0) < lo || usize::from(e.0) >= hi)
                        .count(),
                ),
                None if self.notfull.get(c) => Some(0),
                None => None, // full
            };
            // The non-zero incoming words, in blocks of 8 words (an all-zero block, most of
            // them, costs one OR), given up past SPARSE_MAX.
            let mut found = [(0u16, 0u64); SPARSE_MAX];
            let mut nz = 0usize;
            let limit = SPARSE_MAX.saturating_sub(kept.unwrap_or(SPARSE_MAX));
            let mut fits = kept.is_some();
            'scan: for (bi, block) in src.chunks(64).enumerate() {
                if !fits {
                    break;
                }
                let any = block.chunks_exact(8).fold(0u64, |acc, b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    acc | u64::from_le_bytes(a)
                });
                if any == 0 {
                    continue;
                }
                for i in bi * 8..bi * 8 + block.len() / 8 {
                    let v = word(i);
                    if v != 0 {
                        if nz == limit {
                            fits = false;
                            break 'scan;
                        }
                        found[nz] = ((lo + i) as u16, v);
                        nz += 1;
                    }
                }
            }
            if let Some(kept) = kept.filter(|_| fits) {
                let old = self.chunk_dirty(c);
                self.chunks[c] = None;
                let prev = self.take_sparse(c);
                let mut entries = Vec::with_capacity(kept + nz);
                let mut count = 0u32;
                let mut rest = prev.iter().flat_map(|p| p.entries.iter().copied());
                let mut pending = None;
                for e in rest.by_ref() {
                    if usize::from(e.0) >= lo {
                        pending = Some(e);
                        break;
                    }
                    count += e.1.count_ones();
                    entries.push(e);
                }
                for &e in &found[..nz] {
                    count += e.1.count_ones();
                    entries.push(e);
                }
                for e in pending.into_iter().chain(rest) {
                    if usize::from(e.0) >= hi {
                        count += e.1.count_ones();
                        entries.push(e);
                    }
                }
                self.put_sparse(c, Box::new(Sparse { entries, count }));
                self.dirty = self.dirty - old + u64::from(count);
                self.nonempty.set(c);
                self.notfull.set(c);
                self.settle_sparse(c);
                return;
            }
        }
        if whole {
            // The whole chunk.
            if zeros || ones {
                self.fill_chunk(c, 0, cap - 1, ones);
                return;
            }
            let old = self.chunk_dirty(c);
            self.take_sparse(c);
            let mut p = self.chunks[c].take().unwrap_or_else(Part::zeroed);
            for (d, s) in p.words[..nw].iter_mut().zip(src.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                *d = u64::from_le_bytes(a);
            }
            p.words[nw - 1] &= tail_mask;
            // Words past the capacity are zero already (fresh, or canonical storage).
            p.resummarize_groups(0, GROUPS);
            self.dirty = self.dirty - old + u64::from(p.count);
            self.chunks[c] = Some(p);
            self.nonempty.set(c);
            self.notfull.set(c);
            return;
        }
        if self.stateless(c) {
            let full = !self.notfull.get(c);
            if (full && ones) || (!full && zeros) {
                return; // nothing changes
            }
        }
        let before = {
            let p = self.part_mut(c);
            let old: u32 = p.words[lo..hi].iter().map(|w| w.count_ones()).sum();
            for i in 0..nw {
                p.words[lo + i] = word(i);
            }
            let new: u32 = p.words[lo..hi].iter().map(|w| w.count_ones()).sum();
            p.count = p.count - old + new;
            p.resummarize_groups_only(lo / 64, (hi - 1) / 64 + 1);
            p.resummarize_top();
            (old, new)
        };
        self.dirty = self.dirty - u64::from(before.0) + u64::from(before.1);
        self.settle(c);
    }

    /// Bulk form of [`serialize_part`](Self::serialize_part) for whole words: writes the bottom
    /// words `first_word ..` into `out` as little-endian words (QEMU layout), as many as fit
    /// in `out` (whole words); words past the end of the bitmap are written as zero. Chunks
    /// without storage are filled, partial ones copied.
    pub fn store_words_le(&self, first_word: u64, out: &mut [u8]) {
        let total = words_for(self.granules);
        let n = (out.len() / 8) as u64;
        let end = first_word
            .saturating_add(n)
            .min(total)
            .max(first_word.min(total));
        let mut w = first_word.min(total);
        while w < end {
            let c = (w / CHUNK_WORDS as u64) as usize;
            let seg_end = ((c as u64 + 1) * CHUNK_WORDS as u64).min(end);
            let dst = &mut out[(w - first_word) as usize * 8..(seg_end - first_word) as usize * 8];
            match &self.chunks[c] {
                Some(p) => {
                    let lo = (w % CHUNK_WORDS as u64) as usize;
                    let hi = lo + (seg_end - w) as usize;
                    for (o, v) in dst.chunks_exact_mut(8).zip(&p.words[lo..hi]) {
                        o.copy_from_slice(&v.to_le_bytes());
                    }
                }
                None if self.sp(c).is_some() => {
                    if let Some(s) = self.sp(c) {
                        s.store_le((w % CHUNK_WORDS as u64) as usize, dst);
                    }
                }
                None if self.notfull.get(c) => dst.fill(0),
                None => {
                    dst.fill(0xff);
                    if seg_end == total {
                        let l = dst.len();
                        dst[l - 8..].copy_from_slice(&self.last_word_mask().to_le_bytes());
                    }
                }
            }
            w = seg_end;
        }
        let done = (end.saturating_sub(first_word) * 8) as usize;
        let len = out.len();
        out[done.min(len)..(n * 8) as usize].fill(0);
    }

    /// Records the change of `dirty` since `before` as hidden until deserialize_finish.
    fn note_deserialized(&mut self, before: u64) {
        self.deser_delta = self
            .deser_delta
            .wrapping_add((self.dirty as i64).wrapping_sub(before as i64));
    }

    fn deserialize_words(&mut self, buf: &[u8], start: u64, bytes: u64) {
        let (range, _) = self.existing_words(start, bytes);
        let last_word = words_for(self.granules) - 1;
        let last_mask = self.last_word_mask();
        let mut input = buf.chunks_exact(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        });
        let mut w = range.start;
        while w < range.end {
            let c = (w / CHUNK_WORDS as u64) as usize;
            let seg_end = ((c as u64 + 1) * CHUNK_WORDS as u64).min(range.end);
            for i in w..seg_end {
                let Some(mut v) = input.next() else {
                    self.settle(c);
                    return;
                };
                if i == last_word {
                    v &= last_mask;
                }
                if self.stateless(c) && self.stateless_word(c, i) == v {
                    continue;
                }
                let lw = (i % CHUNK_WORDS as u64) as usize;
                let p = self.part_mut(c);
                let removed = p.andnot(lw, !v);
                let added = p.or(lw, v);
                self.dirty = self.dirty + u64::from(added) - u64::from(removed);
            }
            self.settle(c);
            w = seg_end;
        }
    }
    /// The granules of the existing words spanned by [start, start + bytes), if any.
    fn word_granules(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        let (range, _) = self.existing_words(start, bytes);
        if range.is_empty() || self.granules == 0 {
            return None;
        }
        Some((range.start * 64, (range.end * 64).min(self.granules) - 1))
    }
    /// Fills the words spanned by [start, start + bytes) with zeros.
    pub fn deserialize_zeroes(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.word_granules(start, bytes) {
            let before = self.dirty;
            self.fill_granules(first, last, false);
            self.note_deserialized(before);
        }
    }
    /// Fills the words spanned by [start, start + bytes) with ones, masked to the end of the
    /// bitmap.
    pub fn deserialize_ones(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.word_granules(start, bytes) {
            let before = self.dirty;
            self.fill_granules(first, last, true);
            self.note_deserialized(before);
        }
    }
    /// Ends a sequence of deserialize_* calls: their changes become visible in the count. (The
    /// engine keeps its summaries and true count exact throughout, so this is O(1).)
    pub fn deserialize_finish(&mut self) {
        self.deser_delta = 0;
    }

    /// SHA-256 (lowercase hex) of the bottom level as little-endian 64-bit words, at least one
    /// word: equal to QEMU's `x-debug-block-dirty-bitmap-sha256` on x86_64. Chunks without
    /// storage are hashed from static zero / one blocks.
    pub fn sha256_hex(&self) -> String {
        let total = words_for(self.granules);
        let mut h = Sha256::new();
        let mut buf = [0u8; CHUNK_WORDS * 8];
        let mut run: (bool, usize) = (false, 0); // pending (ones?, bytes) of a stateless run
        let flush = |h: &mut Sha256, run: &mut (bool, usize)| {
            let src: &[u8] = if run.0 { &ONE_BYTES } else { &ZERO_BYTES };
            while run.1 > 0 {
                let n = run.1.min(src.len());
                h.update(&src[..n]);
                run.1 -= n;
            }
        };
        for (c, slot) in self.chunks.iter().enumerate() {
            let first = c as u64 * CHUNK_WORDS as u64;
            if first >= total {
                break;
            }
            let n = (total - first).min(CHUNK_WORDS as u64) as usize;
            match (slot, self.sp(c)) {
                (Some(p), _) => {
                    flush(&mut h, &mut run);
                    for (out, w) in buf.chunks_exact_mut(8).zip(&p.words[..n]) {
                        out.copy_from_slice(&w.to_le_bytes());
                    }
                    h.update(&buf[..n * 8]);
                }
                (None, Some(s)) => {
                    flush(&mut h, &mut run);
                    s.store_le(0, &mut buf[..n * 8]);
                    h.update(&buf[..n * 8]);
                }
                (None, None) => {
                    let ones = !self.notfull.get(c);
                    if run.1 > 0 && run.0 != ones {
                        flush(&mut h, &mut run);
                    }
                    run.0 = ones;
                    if ones && first + n as u64 == total && self.last_word_mask() != !0 {
                        // The full last chunk ends with a partial word.
                        run.1 += (n - 1) * 8;
                        flush(&mut h, &mut run);
                        h.update(&self.last_word_mask().to_le_bytes());
                    } else {
                        run.1 += n * 8;
                    }
                }
            }
        }
        flush(&mut h, &mut run);
        to_hex(&h.finalize())
    }
}

/// Iterator over the maximal dirty runs of a range, as (offset, length) in bytes (see
/// [`DirtyBitmap::dirty_runs`](super::DirtyBitmap::dirty_runs)).
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
        let Some(Some(p)) = bm.chunks.get(c) else {
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
                let g = self.bitmap.gbits;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift64* PRNG.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform-ish in [0, n) (0 if n == 0).
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// The obviously correct model: one bool per granule.
    #[derive(Clone)]
    struct Model {
        size: u64,
        g: u32,
        bits: Vec<bool>,
    }

    impl Model {
        fn new(size: u64, g: u32) -> Self {
            let n = size.div_ceil(1 << g) as usize;
            Model {
                size,
                g,
                bits: vec![false; n],
            }
        }
        fn gran(&self) -> u64 {
            1 << self.g
        }
        fn span(&self, start: u64, bytes: u64) -> std::ops::Range<usize> {
            if bytes == 0 || start >= self.size {
                return 0..0;
            }
            let first = (start >> self.g) as usize;
            let last = (start.saturating_add(bytes - 1) >> self.g) as usize;
            first..last.min(self.bits.len() - 1) + 1
        }
        fn fill(&mut self, start: u64, bytes: u64, v: bool) {
            let r = self.span(start, bytes);
            self.bits[r].fill(v);
        }
        fn dirty(&self) -> u64 {
            self.bits.iter().filter(|&&b| b).count() as u64
        }
        fn get(&self, off: u64) -> bool {
            off < self.size && self.bits[(off >> self.g) as usize]
        }
        fn next(&self, start: u64, bytes: u64, want: bool) -> Option<u64> {
            if start >= self.size || bytes == 0 {
                return None;
            }
            let end = start.saturating_add(bytes).min(self.size);
            let first = (start >> self.g) as usize;
            let end_g = (end - 1) >> self.g;
            (first..=end_g as usize)
                .find(|&k| self.bits[k] == want)
                .map(|k| start.max((k as u64) << self.g))
        }
        fn area(&self, start: u64, end: u64, max: u64) -> Option<(u64, u64)> {
            let end = end.min(self.size);
            if start >= end || max == 0 {
                return None;
            }
            let s = self.next(start, end - start, true)?;
            let z = self.next(s, end - s, false).unwrap_or(end);
            let e = end.min(s.saturating_add(max)).min(z);
            Some((s, e - s))
        }
        fn status(&self, start: u64, bytes: u64) -> (bool, u64) {
            if start >= self.size {
                return (false, 0);
            }
            let d = self.get(start);
            let end = start.saturating_add(bytes).min(self.size);
            // Walk granule by granule.
            let mut pos = start;
            while pos < end && self.get(pos) == d {
                pos = ((pos >> self.g) + 1) << self.g;
            }
            (d, pos.min(end) - start)
        }
        /// QEMU layout of the words spanned by [start, start + bytes).
        fn serialize(&self, start: u64, bytes: u64) -> Vec<u8> {
            if bytes == 0 {
                return Vec::new();
            }
            let fw = (start >> self.g) >> 6;
            let lw = (start.saturating_add(bytes - 1) >> self.g) >> 6;
            let n = (lw - fw + 1) as usize;
            let mut out = vec![0u8; n * 8];
            for i in 0..n * 64 {
                let k = (fw * 64) as usize + i;
                if k < self.bits.len() && self.bits[k] {
                    out[i / 8] |= 1 << (i % 8);
                }
            }
            out
        }
        /// The bytes QEMU hashes: all words, at least one.
        fn hash_input(&self) -> Vec<u8> {
            let mut v = self.serialize(0, self.size.max(1));
            if v.is_empty() {
                v = vec![0; 8];
            }
            v
        }
        fn merge(&mut self, other: &Model) {
            for (k, &b) in other.bits.iter().enumerate() {
                if b {
                    let s = (k as u64) << other.g;
                    let e = ((k as u64 + 1) << other.g).min(self.size);
                    self.fill(s, e - s, true);
                }
            }
        }
        fn truncate(&mut self, new_size: u64) {
            self.size = new_size;
            self.bits
                .resize(new_size.div_ceil(1 << self.g) as usize, false);
        }
    }

    /// Structural invariants: canonical chunk states, exact chunk summaries and counts, towers
    /// equal to a fresh build, zero bits past the end.
    fn check_invariants(hb: &HBitmap) {
        assert_eq!(hb.granules, hb.size.div_ceil(1 << hb.gbits));
        let n = chunk_count(hb.granules);
        assert_eq!(hb.chunks.len(), n, "chunk table");
        assert!(hb.sparse.is_empty() || hb.sparse.len() == n, "sparse table");
        assert_eq!(hb.sparse_live, hb.sparse_chunks(), "sparse_live");
        assert_eq!(
            hb.sparse.is_empty(),
            hb.sparse_live == 0,
            "sparse table freed"
        );
        let mut dirty = 0u64;
        for c in 0..n {
            let cap = hb.cap(c);
            let (ne, nf) = (hb.nonempty.get(c), hb.notfull.get(c));
            if let Some(s) = hb.sp(c) {
                assert!(hb.chunks[c].is_none(), "chunk {c} both sparse and partial");
                assert!(ne && nf, "sparse chunk {c} flags");
                assert!(s.entries.len() <= SPARSE_MAX, "sparse chunk {c} too long");
                let mut count = 0u64;
                for (i, &(k, v)) in s.entries.iter().enumerate() {
                    assert!(v != 0, "sparse chunk {c}: zero word");
                    assert!(i == 0 || s.entries[i - 1].0 < k, "sparse chunk {c}: order");
                    for b in 0..64 {
                        if (v >> b) & 1 != 0 {
                            assert!((u64::from(k) << 6) + b < cap, "sparse tail bit");
                        }
                    }
                    count += u64::from(v.count_ones());
                }
                assert_eq!(count, u64::from(s.count), "sparse chunk {c} count");
                assert!(count > 0 && count < cap, "sparse chunk {c} not canonical");
                dirty += count;
                continue;
            }
            match &hb.chunks[c] {
                Some(p) => {
                    assert!(ne && nf, "partial chunk {c} flags");
                    let count: u64 = p.words.iter().map(|w| u64::from(w.count_ones())).sum();
                    assert_eq!(count, u64::from(p.count), "chunk {c} count");
                    assert!(count > 0 && count < cap, "chunk {c} not canonical");
                    for (g, ws) in p.words.chunks(64).enumerate() {
                        let a = ws
                            .iter()
                            .enumerate()
                            .fold(0u64, |v, (i, &w)| v | (u64::from(w != 0) << i));
                        let f = ws
                            .iter()
                            .enumerate()
                            .fold(0u64, |v, (i, &w)| v | (u64::from(w == !0) << i));
                        assert_eq!(p.any1[g], a, "chunk {c} any1 {g}");
                        assert_eq!(p.full1[g], f, "chunk {c} full1 {g}");
                        assert_eq!((p.any2 >> g) & 1, u64::from(a != 0), "chunk {c} any2");
                        assert_eq!((p.full2 >> g) & 1, u64::from(f == !0), "chunk {c} full2");
                    }
                    assert_eq!(p.any2 & !GROUP_MASK, 0);
                    assert_eq!(p.full2 & !GROUP_MASK, 0);
                    for k in cap..CHUNK_GRANULES {
                        assert_eq!((p.words[(k >> 6) as usize] >> (k & 63)) & 1, 0, "tail bit");
                    }
                    dirty += count;
                }
                None if cap == 0 => assert!(!ne && nf, "zero-capacity chunk"),
                None => {
                    assert!(ne != nf, "chunk {c} clean xor full");
                    if ne {
                        dirty += cap;
                    }
                }
            }
        }
        assert_eq!(dirty, hb.dirty, "count");
        for t in [&hb.nonempty, &hb.notfull] {
            let bits = &t.levels[0];
            assert_eq!(bits.len(), n.div_ceil(64).max(1));
            for i in n..bits.len() * 64 {
                assert_eq!((bits[i >> 6] >> (i & 63)) & 1, 0, "tower bit past the end");
            }
            assert_eq!(
                Tower::from_bits(bits.clone()).levels,
                t.levels,
                "tower summaries"
            );
        }
    }

    fn assert_same(hb: &HBitmap, m: &Model) {
        assert_eq!(hb.size(), m.size);
        assert_eq!(hb.granules(), m.bits.len() as u64);
        assert_eq!(hb.dirty_granules(), m.dirty());
        assert_eq!(hb.count(), m.dirty() << m.g);
        assert_eq!(hb.is_empty(), m.dirty() == 0);
        let mut buf = vec![0u8; hb.serialization_size(0, m.size) as usize];
        hb.serialize_part(&mut buf, 0, m.size);
        assert_eq!(buf, m.serialize(0, m.size), "bits differ");
    }

    /// An offset biased toward interesting places (granule and word edges, the end, far away).
    fn pick_offset(rng: &mut Rng, m: &Model) -> u64 {
        let gran = m.gran();
        let n = m.bits.len() as u64;
        match rng.below(10) {
            0 => 0,
            1 => m.size.saturating_sub(rng.below(3)),
            2 => m.size + rng.below(3 * gran),
            3 => ((rng.below(n + 1) << m.g) + rng.below(3)).saturating_sub(1),
            4 => ((rng.below(n / 64 + 2) * 64) << m.g).saturating_sub(rng.below(2)),
            5 => u64::MAX - rng.below(3),
            6 => {
                // A chunk boundary, give or take a granule.
                let c = rng.below(n / CHUNK_GRANULES + 2) * CHUNK_GRANULES;
                ((c + rng.below(3)).saturating_sub(1) << m.g) + rng.below(2)
            }
            _ => rng.below(m.size + 1),
        }
    }

    fn pick_len(rng: &mut Rng, m: &Model, start: u64) -> u64 {
        let gran = m.gran();
        match rng.below(10) {
            0 => 0,
            1 => 1,
            2 => gran * (1 + rng.below(3)),
            3 => u64::MAX - rng.below(2),
            4 => (u64::MAX - start).saturating_sub(rng.below(2)),
            5 => m.size.saturating_sub(start),
            6 => rng.below(64 * gran * 3) + 1,
            _ => rng.below(m.size / 2 + 2) + 1,
        }
    }

    /// A caller-valid reset range: aligned start, aligned length or reaching the end.
    fn pick_reset(rng: &mut Rng, m: &Model) -> (u64, u64) {
        let n = m.bits.len() as u64;
        let k = rng.below(n + 1);
        let start = (k << m.g).min(m.size);
        let room = n - k;
        let bytes = match rng.below(4) {
            0 => m.size - start,
            1 => 1u64.min(room) << m.g,
            _ => rng.below(room + 1) << m.g,
        };
        (start, bytes.min(m.size - start))
    }

    fn random_bitmap(rng: &mut Rng, size: u64, g: u32) -> (HBitmap, Model) {
        let mut hb = HBitmap::new(size, g);
        let mut m = Model::new(size, g);
        for _ in 0..rng.below(6) {
            let s = pick_offset(rng, &m);
            let l = pick_len(rng, &m, s);
            let l = if l > m.size / 4 {
                rng.below(m.size / 4 + 1)
            } else {
                l
            };
            hb.set(s, l);
            m.fill(s, l, true);
        }
        (hb, m)
    }

    fn check_serialization(rng: &mut Rng, hb: &HBitmap, m: &Model) {
        let align = hb.serialization_align();
        assert_eq!(align, 64 << m.g);
        let chunk = align * (1 + rng.below(3));
        // Start from garbage to prove that deserialization overwrites.
        let (mut copy, _) = random_bitmap(rng, m.size, m.g);
        let mut start = 0;
        while start < m.size {
            let len = chunk.min(m.size - start);
            let expect = m.serialize(start, len);
            let sz = hb.serialization_size(start, len);
            assert_eq!(sz, expect.len() as u64);
            let mut buf = vec![0xa5u8; sz as usize + 3];
            hb.serialize_part(&mut buf, start, len);
            assert_eq!(&buf[..sz as usize], &expect[..], "chunk at {start}");
            assert_eq!(&buf[sz as usize..], &[0xa5; 3], "wrote past the size");
            let range = m.span(start, len);
            if m.bits[range.clone()].iter().all(|&b| !b) && rng.chance(70) {
                copy.deserialize_zeroes(start, len);
            } else if m.bits[range].iter().all(|&b| b) && rng.chance(70) {
                copy.deserialize_ones(start, len);
            } else {
                copy.deserialize_part(&buf, start, len);
            }
            start += len;
        }
        copy.deserialize_finish();
        check_invariants(&copy);
        assert_same(&copy, m);
    }

    /// Long random operation sequences against the model.
    fn run_random(g: u32, granules: u64, seed: u64, ops: usize) {
        let gran = 1u64 << g;
        let mut rng = Rng(seed);
        let size = if granules == 0 {
            0
        } else {
            granules * gran - rng.below(gran)
        };
        let mut hb = HBitmap::new(size, g);
        let mut m = Model::new(size, g);
        for op in 0..ops {
            let ctx = || format!("g {g} size {size} op {op}");
            match rng.below(100) {
                0..=19 => {
                    let s = pick_offset(&mut rng, &m);
                    let l = pick_len(&mut rng, &m, s);
                    // Mostly bounded sets so the bitmap does not saturate.
                    let l = if rng.chance(85) {
                        l.min(m.size / 8 + gran)
                    } else {
                        l
                    };
                    hb.set(s, l);
                    m.fill(s, l, true);
                }
                20..=31 => {
                    let (s, l) = pick_reset(&mut rng, &m);
                    hb.reset(s, l);
                    m.fill(s, l, false);
                }
                32 => {
                    // Unaligned reset: the engine clears every intersecting granule.
                    let s = pick_offset(&mut rng, &m);
                    let l = pick_len(&mut rng, &m, s).min(m.size / 4 + 1);
                    hb.reset(s, l);
                    m.fill(s, l, false);
                }
                33 => {
                    if rng.chance(30) {
                        hb.reset_all();
                        m.bits.fill(false);
                    }
                }
                34..=37 => {
                    let s = pick_offset(&mut rng, &m);
                    assert_eq!(hb.get(s), m.get(s), "get {s} {}", ctx());
                }
                38..=49 => {
                    let s = pick_offset(&mut rng, &m);
                    let l = pick_len(&mut rng, &m, s);
                    assert_eq!(
                        hb.next_dirty(s, l),
                        m.next(s, l, true),
                        "nd {s} {l} {}",
                        ctx()
                    );
                }
                50..=61 => {
                    let s = pick_offset(&mut rng, &m);
                    let l = pick_len(&mut rng, &m, s);
                    assert_eq!(
                        hb.next_zero(s, l),
                        m.next(s, l, false),
                        "nz {s} {l} {}",
                        ctx()
                    );
                }
                62..=71 => {
                    let s = pick_offset(&mut rng, &m);
                    let e = s.saturating_add(pick_len(&mut rng, &m, s));
                    let e = if rng.chance(20) {
                        pick_offset(&mut rng, &m)
                    } else {
                        e
                    };
                    let max = match rng.below(6) {
                        0 => 1,
                        1 => 3,
                        2 => gran,
                        3 => gran * (1 + rng.below(70)),
                        4 => u64::MAX,
                        _ => rng.below(3 * gran) + 1,
                    };
                    if rng.chance(30) {
                        // The run iterator equals repeated next_dirty_area without a cap.
                        let runs: Vec<_> = hb.dirty_runs(s, e).collect();
                        let mut want = Vec::new();
                        let mut pos = s;
                        while let Some((a, len)) = m.area(pos, e, u64::MAX) {
                            want.push((a, len));
                            pos = a + len;
                        }
                        assert_eq!(runs, want, "runs {s} {e} {}", ctx());
                    }
                    let got = hb.next_dirty_area(s, e, max);
                    assert_eq!(got, m.area(s, e, max), "area {s} {e} {max} {}", ctx());
                    if let Some((a, len)) = got {
                        // Independent properties of the run.
                        assert!(len > 0 && len <= max && a >= s && a + len <= e.min(m.size));
                        assert!((a..a + len).step_by(gran as usize).all(|o| m.get(o)));
                        assert!(m.get(a + len - 1));
                    }
                }
                72..=79 => {
                    let s = pick_offset(&mut rng, &m);
                    let l = pick_len(&mut rng, &m, s);
                    let st = hb.status(s, l);
                    assert_eq!(st, m.status(s, l), "status {s} {l} {}", ctx());
                }
                80..=84 => {
                    // Finer sources at most 32 times finer, to keep the model small.
                    let og = [g.saturating_sub(5), g.saturating_sub(1), g, g, g + 1, g + 7]
                        [rng.below(6) as usize];
                    let (other, om) = random_bitmap(&mut rng, m.size, og);
                    hb.merge_from(&other);
                    m.merge(&om);
                }
                85..=86 => {
                    let new_size = match rng.below(4) {
                        0 => m.size.saturating_sub(rng.below(3 * gran)),
                        1 => m.size + rng.below(3 * gran),
                        2 => rng.below(m.size + 1),
                        _ => rng.below(2 * m.size + 70 * gran),
                    };
                    let new_size = new_size.min((granules + 300) * gran);
                    hb.truncate(new_size);
                    m.truncate(new_size);
                    check_invariants(&hb);
                }
                87..=89 => check_serialization(&mut rng, &hb, &m),
                90..=91 => {
                    let expect = to_hex(&Sha256::digest(&m.hash_input()));
                    assert_eq!(hb.sha256_hex(), expect, "{}", ctx());
                }
                _ => {
                    // Dense fill of a random region, to exercise the `full` tower.
                    let s = rng.below(m.size + 1);
                    let l = rng.below(m.size - s + 1);
                    hb.set(s, l);
                    m.fill(s, l, true);
                }
            }
            assert_eq!(hb.dirty_granules(), m.dirty(), "count {}", ctx());
            if op % 16 == 0 {
                check_invariants(&hb);
                assert_same(&hb, &m);
            }
        }
        check_invariants(&hb);
        assert_same(&hb, &m);
    }

    #[test]
    fn random_against_model() {
        let counts = [
            0u64, 1, 2, 3, 63, 64, 65, 100, 127, 128, 129, 1000, 4095, 4096, 4097, 5000,
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for g in [0u32, 1, 4, 9, 16] {
            for &n in &counts {
                seed = seed.wrapping_add(0x1234_5678_9abc);
                let ops = if n > 1000 { 800 } else { 3000 };
                run_random(g, n, seed, ops);
            }
        }
    }

    /// Sizes spanning several chunks (production chunk size), every granularity class.
    #[test]
    fn random_against_model_across_chunks() {
        let mut seed: u64 = 0x5851_f42d_4c95_7f2d;
        for (g, granules, ops) in [
            (0u32, 2 * CHUNK_GRANULES + 1, 400),
            (9, 2 * CHUNK_GRANULES - 1, 400),
            (16, CHUNK_GRANULES, 300),
            (16, CHUNK_GRANULES + 1, 300),
            (31, 3 * CHUNK_GRANULES + 77, 300),
            (20, CHUNK_GRANULES + 64, 300),
        ] {
            seed = seed.wrapping_add(0x9e37_79b9);
            run_random(g, granules, seed, ops);
        }
    }

    /// Every granularity from 1 byte to 2 GiB, small sizes not a multiple of it.
    #[test]
    fn random_against_model_all_granularities() {
        let mut seed: u64 = 0x2545_f491;
        for g in 0..=31u32 {
            for n in [1u64, 65, 700] {
                seed = seed.wrapping_add(0x1234_5678_9abc);
                run_random(g, n, seed, 400);
            }
        }
    }

    /// A bitmap of the model's shape with `words` random non-zero words (mostly one or two
    /// granules each): sparse chunks, some grown past SPARSE_MAX.
    fn scattered(rng: &mut Rng, m: &Model, words: u64) -> (HBitmap, Model) {
        let mut hb = HBitmap::new(m.size, m.g);
        let mut om = Model::new(m.size, m.g);
        let n = m.bits.len() as u64;
        for _ in 0..words {
            let k = rng.below(n);
            let l = 1 + rng.below(3);
            hb.set(k << m.g, l << m.g);
            om.fill(k << m.g, l << m.g, true);
        }
        (hb, om)
    }

    /// Little-endian words of the model, words w0..w0 + n (zero past the end).
    fn model_words(m: &Model, w0: u64, n: u64) -> Vec<u8> {
        let mut out = vec![0u8; (n * 8) as usize];
        for i in 0..n * 64 {
            let k = (w0 * 64 + i) as usize;
            if k < m.bits.len() && m.bits[k] {
                out[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        out
    }

    /// The sparse chunk state against the model: short sets and resets that move chunks
    /// between clean, sparse and partial (both ways, across SPARSE_MAX and SPARSE_BACK), bulk
    /// loads of scattered words (whole chunks and parts of chunks, into every state), merges
    /// of sparse sources, contains_words, store, SHA-256, searches and runs, truncation.
    #[test]
    fn sparse_chunks_against_model() {
        let mut rng = Rng(0x005b_a75e);
        let (mut saw_sparse, mut saw_dense) = (false, false);
        for round in 0..12u64 {
            let g = [0u32, 9, 16][(round % 3) as usize];
            let granules =
                [3 * CHUNK_GRANULES + 77, 2 * CHUNK_GRANULES, 100, 5000][(round / 3 % 4) as usize];
            let size = (granules << g) - rng.below(1 << g);
            let mut hb = HBitmap::new(size, g);
            let mut m = Model::new(size, g);
            for op in 0..400 {
                let ctx = format!("round {round} op {op}");
                let n = m.bits.len() as u64;
                match rng.below(20) {
                    0..=5 => {
                        // Scattered short sets, concentrated in one chunk so that it grows.
                        let c = rng.below(n / CHUNK_GRANULES + 1);
                        for _ in 0..rng.below(80) {
                            let k = c * CHUNK_GRANULES + rng.below(CHUNK_GRANULES);
                            let wide = rng.chance(10);
                            let l = 1 + rng.below(if wide { 300 } else { 3 });
                            hb.set(k << g, l << g);
                            m.fill(k << g, l << g, true);
                        }
                    }
                    6..=8 => {
                        // Short or chunk-wide resets (shrinking back to sparse).
                        for _ in 0..rng.below(40) {
                            let k = rng.below(n + 1);
                            let l = if rng.chance(20) {
                                rng.below(CHUNK_GRANULES)
                            } else {
                                1 + rng.below(200)
                            };
                            let (s, l) = ((k << g).min(m.size), l << g);
                            hb.reset(s, l);
                            m.fill(s, l, false);
                        }
                    }
                    9..=10 => {
                        // A bulk load of scattered words at a random word range.
                        let total = words_for(n);
                        let w0 = rng.below(total);
                        let nw = match rng.below(3) {
                            0 => 1 + rng.below(40),
                            1 => CHUNK_WORDS as u64 - w0 % CHUNK_WORDS as u64,
                            _ => 1 + rng.below(3 * CHUNK_WORDS as u64),
                        };
                        let k = rng.below(300);
                        let (_, src) = scattered(&mut rng, &m, k);
                        let mut bytes = model_words(&src, w0, nw);
                        if rng.chance(30) {
                            // Garbage past the end of the bitmap (masked off) and a dense word.
                            let l = bytes.len();
                            bytes[l - 8..].fill(0xff);
                        }
                        hb.load_words_le(w0, &bytes);
                        hb.deserialize_finish();
                        let mut want = m.clone();
                        for i in 0..(nw * 64) {
                            let k = (w0 * 64 + i) as usize;
                            if k < want.bits.len() {
                                want.bits[k] = (bytes[(i / 8) as usize] >> (i % 8)) & 1 != 0;
                            }
                        }
                        m = want;
                    }
                    11 => {
                        let k = rng.below(400);
                        let (other, om) = scattered(&mut rng, &m, k);
                        let w0 = rng.below(words_for(n) + 1);
                        let w1 = w0 + rng.below(3 * CHUNK_WORDS as u64);
                        let a = model_words(&om, w0, w1 - w0);
                        let b = model_words(&m, w0, w1 - w0);
                        let want = a.iter().zip(&b).all(|(x, y)| x & !y == 0);
                        assert_eq!(hb.contains_words(&other, w0, w1), want, "{ctx}");
                        assert!(other.contains_words(&other, w0, w1));
                        hb.merge_from(&other);
                        m.merge(&om);
                        assert!(hb.contains_words(&other, 0, u64::MAX), "{ctx}");
                    }
                    12 => {
                        let k = rng.below(n + 1) << g;
                        let l = pick_len(&mut rng, &m, k);
                        assert_eq!(hb.next_dirty(k, l), m.next(k, l, true), "{ctx}");
                        assert_eq!(hb.next_zero(k, l), m.next(k, l, false), "{ctx}");
                        assert_eq!(hb.status(k, l), m.status(k, l), "{ctx}");
                        assert_eq!(hb.get(k), m.get(k), "{ctx}");
                    }
                    13 => {
                        let s = rng.below(m.size + 1);
                        let e = s + rng.below(m.size + 1);
                        let runs: Vec<_> = hb.dirty_runs(s, e).collect();
                        let mut want = Vec::new();
                        let mut pos = s;
                        while let Some((a, len)) = m.area(pos, e, u64::MAX) {
                            want.push((a, len));
                            pos = a + len;
                        }
                        assert_eq!(runs, want, "{ctx}");
                    }
                    14 => {
                        let w0 = rng.below(words_for(n) + 2);
                        let nw = 1 + rng.below(3 * CHUNK_WORDS as u64);
                        let mut out = vec![0x5au8; (nw * 8) as usize];
                        hb.store_words_le(w0, &mut out);
                        assert_eq!(out, model_words(&m, w0, nw), "{ctx}");
                    }
                    15 => {
                        let expect = to_hex(&Sha256::digest(&m.hash_input()));
                        assert_eq!(hb.sha256_hex(), expect, "{ctx}");
                        check_serialization(&mut rng, &hb, &m);
                    }
                    16 => {
                        if rng.chance(30) {
                            let new_size = rng.below(2 * size + 1).max(1).min(4 * size);
                            hb.truncate(new_size);
                            m.truncate(new_size);
                        }
                    }
                    _ => {
                        // A sparse bitmap merged into a copy of this one, then swapped in.
                        let k = rng.below(200);
                        let (other, om) = scattered(&mut rng, &m, k);
                        let mut copy = other.clone();
                        copy.merge_from(&hb);
                        let mut cm = om.clone();
                        cm.merge(&m);
                        hb = copy;
                        m = cm;
                    }
                }
                saw_sparse |= hb.sparse_chunks() > 0;
                saw_dense |= hb.allocated_chunks() > hb.sparse_chunks();
                assert_eq!(hb.dirty_granules(), m.dirty(), "count {ctx}");
                if op % 8 == 0 {
                    check_invariants(&hb);
                    assert_same(&hb, &m);
                }
            }
            check_invariants(&hb);
            assert_same(&hb, &m);
        }
        assert!(saw_sparse && saw_dense);
    }

    /// load_words_le builds sparse chunks from scattered words without a partial chunk, and a
    /// chunk goes partial past SPARSE_MAX words and back to sparse when cleared to a few bits.
    #[test]
    fn sparse_load_and_transitions() {
        let g = 16;
        let size = (4 * CHUNK_GRANULES) << g;
        let mut hb = HBitmap::new(size, g);
        let mut bytes = vec![0u8; 4 * CHUNK_WORDS * 8];
        for c in 0..4 {
            for j in 0..(10 * (c + 1)) {
                let w = c * CHUNK_WORDS + j * 7;
                bytes[w * 8] = 0x81;
            }
        }
        hb.load_words_le(0, &bytes);
        hb.deserialize_finish();
        check_invariants(&hb);
        assert_eq!(hb.sparse_chunks(), 4);
        assert_eq!(hb.allocated_chunks(), 4);
        assert_eq!(hb.dirty_granules(), 2 * (10 + 20 + 30 + 40));
        assert!(hb.heap_bytes() < 8 * 1024, "{}", hb.heap_bytes());
        let mut out = vec![0u8; bytes.len()];
        hb.store_words_le(0, &mut out);
        assert_eq!(out, bytes);
        // Grow chunk 0 past SPARSE_MAX words: partial.
        for w in 0..=SPARSE_MAX as u64 {
            hb.set((w * 64 + 1) << g, 1 << g);
        }
        check_invariants(&hb);
        assert_eq!(hb.sparse_chunks(), 3);
        assert_eq!(hb.allocated_chunks(), 4);
        // Clear it down to a few bits (words 118..=128): sparse again.
        hb.reset(0, ((SPARSE_MAX as u64 - 10) * 64) << g);
        check_invariants(&hb);
        assert_eq!(hb.sparse_chunks(), 4);
        // Clear everything: no storage, and the sparse table is freed.
        hb.reset(0, size);
        check_invariants(&hb);
        assert_eq!(hb.allocated_chunks(), 0);
        assert_eq!(hb.heap_bytes(), HBitmap::new(size, g).heap_bytes());
    }

    /// A flat reference built in the test: bytes of every word, for SHA-256 and serialization.
    fn flat_bytes(hb: &HBitmap) -> Vec<u8> {
        let mut v = vec![0u8; (words_for(hb.granules()) * 8) as usize];
        for (s, len) in hb.dirty_runs(0, hb.size()) {
            let first = s >> hb.granularity_bits();
            let last = (s + len - 1) >> hb.granularity_bits();
            for k in first..=last {
                v[(k / 8) as usize] |= 1 << (k % 8);
            }
        }
        v
    }

    #[test]
    fn chunk_states_memory_and_sha256() {
        // 5 chunks and a partial one at 64 KiB, the last word partial.
        let g = 16;
        let size = ((5 * CHUNK_GRANULES + 100) << g) - 1000;
        let mut hb = HBitmap::new(size, g);
        let empty = hb.heap_bytes();
        assert_eq!(hb.allocated_chunks(), 0);
        // Whole chunks dirty: no storage.
        hb.set(CHUNK_GRANULES << g, (2 * CHUNK_GRANULES) << g);
        assert_eq!(hb.allocated_chunks(), 0);
        assert_eq!(hb.heap_bytes(), empty);
        assert_eq!(hb.dirty_granules(), 2 * CHUNK_GRANULES);
        // Chunk boundaries ±1 granule.
        for k in [
            CHUNK_GRANULES - 1,
            3 * CHUNK_GRANULES,
            3 * CHUNK_GRANULES + 1,
            5 * CHUNK_GRANULES + 99,
        ] {
            hb.set(k << g, 1);
        }
        assert_eq!(hb.allocated_chunks(), 3);
        check_invariants(&hb);
        hb.reset((CHUNK_GRANULES + 5) << g, 1 << g);
        assert_eq!(hb.allocated_chunks(), 4);
        assert!(!hb.get((CHUNK_GRANULES + 5) << g));
        assert_eq!(
            hb.next_zero(CHUNK_GRANULES << g, u64::MAX),
            Some((CHUNK_GRANULES + 5) << g)
        );
        let runs: Vec<_> = hb.dirty_runs(0, u64::MAX).collect();
        assert_eq!(
            runs,
            vec![
                ((CHUNK_GRANULES - 1) << g, 6 << g),
                ((CHUNK_GRANULES + 6) << g, (2 * CHUNK_GRANULES + 2 - 6) << g),
                (
                    (5 * CHUNK_GRANULES + 99) << g,
                    size - ((5 * CHUNK_GRANULES + 99) << g)
                ),
            ]
        );
        let flat = flat_bytes(&hb);
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&flat)));
        let mut buf = vec![0u8; hb.serialization_size(0, size) as usize];
        hb.serialize_part(&mut buf, 0, size);
        assert_eq!(buf, flat);
        // Fully dirty, including the partial last chunk: no storage, hash of ones with the tail
        // word masked.
        hb.set(0, size);
        assert_eq!(hb.allocated_chunks(), 0);
        assert_eq!(hb.dirty_granules(), hb.granules());
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&flat_bytes(&hb))));
        check_invariants(&hb);
        // Emptying a chunk frees it.
        hb.reset_all();
        hb.set(7 << g, 1);
        assert_eq!(hb.allocated_chunks(), 1);
        hb.reset(7 << g, 1 << g);
        assert_eq!(hb.allocated_chunks(), 0);
        assert_eq!(hb.heap_bytes(), empty);
        // Truncating into a full chunk and growing again.
        hb.set(0, size);
        hb.truncate((CHUNK_GRANULES + 3) << g);
        assert_eq!(hb.dirty_granules(), CHUNK_GRANULES + 3);
        assert_eq!(hb.allocated_chunks(), 0);
        check_invariants(&hb);
        hb.truncate(size);
        assert_eq!(hb.dirty_granules(), CHUNK_GRANULES + 3);
        assert_eq!(hb.next_zero(0, u64::MAX), Some((CHUNK_GRANULES + 3) << g));
        assert_eq!(hb.allocated_chunks(), 1);
        check_invariants(&hb);
    }

    /// load_words_le against deserialize_part and the model, and store_words_le against
    /// serialize_part: random word ranges (whole chunks, parts of chunks, across chunks, past
    /// the end, with garbage bytes past the bitmap's end) into random (garbage) targets.
    #[test]
    fn bulk_words_against_deserialize_and_model() {
        let mut rng = Rng(0xb01c);
        let sizes = [
            1u64,
            64,
            100,
            CHUNK_GRANULES,
            2 * CHUNK_GRANULES,
            3 * CHUNK_GRANULES + 77,
            CHUNK_GRANULES + 64,
            5 * CHUNK_GRANULES - 1,
        ];
        for round in 0..120 {
            let g = [0u32, 3, 9, 16][round % 4];
            let granules = sizes[rng.below(sizes.len() as u64) as usize];
            let size = granules * (1 << g) - rng.below(1 << g);
            let (mut src, mut m) = random_bitmap(&mut rng, size, g);
            // Whole chunks full or clean too.
            for _ in 0..rng.below(3) {
                let c = rng.below(granules.div_ceil(CHUNK_GRANULES));
                let (s, l) = ((c * CHUNK_GRANULES) << g, CHUNK_GRANULES << g);
                let v = rng.chance(50);
                if v {
                    src.set(s, l);
                } else {
                    src.reset(s, l.min(size - s.min(size)));
                }
                m.fill(s, l.min(size.saturating_sub(s)), v);
            }
            assert_same(&src, &m);
            let total = words_for(src.granules());
            let mut flat = m.serialize(0, total * (64 << g));
            // Garbage past the end of the bitmap: must be masked off.
            if src.granules() % 64 != 0 {
                if let Some(last) = flat.last_mut() {
                    *last |= 0x80;
                }
            }
            flat.extend_from_slice(&[0xffu8; 8 * 3]);
            let (mut a, _) = random_bitmap(&mut rng, size, g);
            let mut b = a.clone();
            let mut w = 0u64;
            while w < total {
                let n = match rng.below(4) {
                    0 => CHUNK_WORDS as u64,
                    1 => 1 + rng.below(70),
                    2 => CHUNK_WORDS as u64 * (1 + rng.below(3)),
                    _ => 1 + rng.below(3 * CHUNK_WORDS as u64),
                }
                .min(total + 3 - w);
                let bytes = &flat[(w * 8) as usize..((w + n) * 8) as usize];
                let extra = [&[0xa5u8][..], &[][..]][rng.below(2) as usize];
                let mut input = bytes.to_vec();
                input.extend_from_slice(extra);
                a.load_words_le(w, &input);
                b.deserialize_part(bytes, (w * 64) << g, (n * 64) << g);
                check_invariants(&a);
                assert_eq!(
                    a.dirty_granules(),
                    b.dirty_granules(),
                    "round {round} w {w}"
                );
                assert_eq!(a.dirty, b.dirty, "round {round} w {w}");
                w += n;
            }
            a.deserialize_finish();
            b.deserialize_finish();
            assert_same(&a, &m);
            assert_eq!(flat_bytes(&a), flat_bytes(&b));
            // Clean chunks stay unallocated, full ones too.
            assert_eq!(
                a.allocated_chunks(),
                src.allocated_chunks(),
                "round {round}"
            );
            // store_words_le against serialize_part, random ranges incl. past the end.
            for _ in 0..8 {
                let w0 = rng.below(total + 2);
                let n = 1 + rng.below(3 * CHUNK_WORDS as u64);
                let mut x = vec![0x5au8; (n * 8) as usize + 5];
                let mut y = vec![0x5au8; (n * 8) as usize + 5];
                src.store_words_le(w0, &mut x);
                src.serialize_part(&mut y, (w0 * 64) << g, (n * 64) << g);
                assert_eq!(x, y, "round {round} w0 {w0} n {n}");
            }
        }
    }

    /// contains_words against the model: random pairs, random word ranges.
    #[test]
    fn contains_words_against_model() {
        let mut rng = Rng(0xc0de);
        for round in 0..200 {
            let g = [0u32, 9, 16][round % 3];
            let granules = [64u64, 100, CHUNK_GRANULES + 77, 3 * CHUNK_GRANULES][round % 4];
            let size = granules << g;
            let (mut a, mut ma) = random_bitmap(&mut rng, size, g);
            let (b, mb) = if rng.chance(30) {
                (a.clone(), Model { ..ma.clone() })
            } else {
                random_bitmap(&mut rng, size, g)
            };
            if rng.chance(30) {
                a.merge_from(&b);
                ma.merge(&mb);
            }
            let total = words_for(granules);
            for _ in 0..10 {
                let w0 = rng.below(total);
                let w1 = w0 + 1 + rng.below(2 * CHUNK_WORDS as u64);
                let expect = (w0 * 64..(w1 * 64).min(granules))
                    .all(|k| !mb.bits[k as usize] || ma.bits[k as usize]);
                assert_eq!(a.contains_words(&b, w0, w1), expect, "round {round}");
            }
        }
    }

    #[test]
    fn deserialize_keeps_clean_chunks_unallocated() {
        let g = 9;
        let size = (3 * CHUNK_GRANULES + 10) << g;
        let mut hb = HBitmap::new(size, g);
        let zeros = vec![0u8; hb.serialization_size(0, size) as usize];
        hb.deserialize_part(&zeros, 0, size);
        hb.deserialize_zeroes(0, size);
        assert_eq!(hb.allocated_chunks(), 0);
        // Ones over whole chunks: full state, no storage; then a partial word.
        hb.deserialize_ones(CHUNK_GRANULES << g, CHUNK_GRANULES << g);
        assert_eq!(hb.allocated_chunks(), 0);
        // Like QEMU, the count shows deserialized bits only after the finish.
        assert_eq!(hb.dirty_granules(), 0);
        assert!(hb.get(CHUNK_GRANULES << g));
        assert_eq!(hb.next_dirty(0, u64::MAX), Some(CHUNK_GRANULES << g));
        hb.deserialize_finish();
        assert_eq!(hb.dirty_granules(), CHUNK_GRANULES);
        let ones = vec![0xffu8; hb.serialization_size(0, size) as usize];
        hb.deserialize_part(&ones, 0, size);
        hb.deserialize_finish();
        assert_eq!(hb.allocated_chunks(), 0);
        assert_eq!(hb.dirty_granules(), hb.granules());
        check_invariants(&hb);
        // Round trip of a mixed bitmap in serialization-aligned pieces across chunk boundaries.
        let mut src = HBitmap::new(size, g);
        for k in [
            0,
            CHUNK_GRANULES - 1,
            CHUNK_GRANULES,
            2 * CHUNK_GRANULES + 63,
        ] {
            src.set(k << g, 2 << g);
        }
        src.set((2 * CHUNK_GRANULES + 200) << g, u64::MAX);
        let piece = src.serialization_align() * 100;
        let mut dst = HBitmap::new(size, g);
        dst.set(0, size);
        let mut start = 0;
        while start < size {
            let len = piece.min(size - start);
            let mut buf = vec![0u8; src.serialization_size(start, len) as usize];
            src.serialize_part(&mut buf, start, len);
            dst.deserialize_part(&buf, start, len);
            start += len;
        }
        dst.deserialize_finish();
        check_invariants(&dst);
        assert_eq!(flat_bytes(&dst), flat_bytes(&src));
        assert_eq!(dst.sha256_hex(), src.sha256_hex());
        assert_eq!(dst.dirty_granules(), src.dirty_granules());
    }

    /// Memory follows the dirt on a 16 TiB disk at 64 KiB granularity: behaviour, not timing.
    #[test]
    fn memory_follows_the_dirt() {
        let size = 16u64 << 40;
        let flat = (size >> 16 >> 3) as usize;
        let mut hb = HBitmap::new(size, 16);
        assert!(hb.heap_bytes() <= 64 << 10, "empty: {}", hb.heap_bytes());
        let mut rng = Rng(77);
        for _ in 0..20_000 {
            hb.set(rng.below((100u64 << 30) / 4096) * 4096, 4096);
        }
        assert!(hb.heap_bytes() <= 1 << 20, "100 GiB: {}", hb.heap_bytes());
        hb.set(0, size);
        assert!(
            hb.heap_bytes() * 100 <= flat * 105,
            "full: {}",
            hb.heap_bytes()
        );
        assert_eq!(hb.count(), size);
        // Dense but not full: flat size plus the summaries.
        let mut hb = HBitmap::new(1 << 40, 16);
        let flat = (1usize << 40 >> 16) / 8;
        for k in 0..(1u64 << 24) / 2 {
            hb.set((2 * k) << 16, 1);
        }
        assert!(
            hb.heap_bytes() * 100 <= flat * 105,
            "dense: {}",
            hb.heap_bytes()
        );
    }

    #[test]
    fn merge_chunk_states() {
        let g = 12;
        let size = (4 * CHUNK_GRANULES - 3) << g;
        let mut a = HBitmap::new(size, g);
        let mut b = HBitmap::new(size, g);
        a.set(0, CHUNK_GRANULES << g); // chunk 0 full
        a.set((2 * CHUNK_GRANULES + 5) << g, 1); // chunk 2 partial
        b.set(10 << g, 1); // into a full chunk
        b.set((CHUNK_GRANULES + 1) << g, 1); // into a clean chunk (copied)
        b.set((2 * CHUNK_GRANULES) << g, CHUNK_GRANULES << g); // fills chunk 2
        b.set((3 * CHUNK_GRANULES) << g, u64::MAX); // the partial last chunk, full
        let mut want = flat_bytes(&a);
        for (x, y) in want.iter_mut().zip(flat_bytes(&b)) {
            *x |= y;
        }
        a.merge_from(&b);
        check_invariants(&a);
        assert_eq!(flat_bytes(&a), want);
        assert_eq!(a.allocated_chunks(), 1);
        assert_eq!(a.dirty_granules(), a.granules() - CHUNK_GRANULES + 1);
        // Across granularities.
        let mut coarse = HBitmap::new(size, g + 3);
        coarse.merge_from(&a);
        check_invariants(&coarse);
        assert_eq!(coarse.count(), (3 * CHUNK_GRANULES + 8) << g);
    }

    #[test]
    fn empty_bitmap() {
        let mut hb = HBitmap::new(0, 16);
        assert_eq!(hb.granules(), 0);
        hb.set(0, 100);
        hb.set(0, u64::MAX);
        hb.reset(0, 100);
        assert!(hb.is_empty());
        assert!(!hb.get(0));
        assert_eq!(hb.next_dirty(0, 1), None);
        assert_eq!(hb.next_zero(0, 1), None);
        assert_eq!(hb.next_dirty_area(0, u64::MAX, u64::MAX), None);
        assert_eq!(hb.status(0, 10), (false, 0));
        assert_eq!(hb.serialization_size(0, 0), 0);
        hb.deserialize_ones(0, 1);
        hb.deserialize_finish();
        assert!(hb.is_empty());
        // QEMU hashes one zero word for an empty bitmap.
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&[0u8; 8])));
        check_invariants(&hb);
        hb.truncate(1 << 20);
        assert_eq!(hb.granules(), 16);
        hb.set(0, 1 << 20);
        assert_eq!(hb.count(), 1 << 20);
        hb.truncate(0);
        assert!(hb.is_empty());
        check_invariants(&hb);
    }

    #[test]
    fn partial_last_granule() {
        // 3 granules of 512 bytes, the last one 100 bytes long.
        let size = 2 * 512 + 100;
        let mut hb = HBitmap::new(size, 9);
        assert_eq!(hb.granules(), 3);
        hb.set(size - 1, 1);
        assert!(hb.get(1024) && hb.get(size - 1) && !hb.get(size));
        assert_eq!(hb.count(), 512);
        assert_eq!(hb.next_dirty(0, u64::MAX), Some(1024));
        assert_eq!(hb.next_dirty(1100, 5), Some(1100));
        assert_eq!(hb.next_zero(1024, u64::MAX), None);
        assert_eq!(hb.next_dirty_area(0, u64::MAX, u64::MAX), Some((1024, 100)));
        assert_eq!(hb.status(1030, 1000), (true, size - 1030));
        hb.set(0, u64::MAX);
        assert_eq!(hb.dirty_granules(), 3);
        assert_eq!(hb.next_zero(0, u64::MAX), None);
        hb.reset(1024, 100);
        assert_eq!(hb.next_zero(0, u64::MAX), Some(1024));
        assert_eq!(hb.status(0, u64::MAX), (true, 1024));
        // Truncate into the middle of a granule keeps it; dropping whole granules clears them.
        hb.set(0, size);
        hb.truncate(600);
        assert_eq!(hb.dirty_granules(), 2);
        hb.truncate(size);
        assert_eq!(hb.dirty_granules(), 2);
        assert!(!hb.get(1024));
        check_invariants(&hb);
    }

    /// next_dirty, next_zero and status agree with the model around every mark (and a few
    /// fixed places), crossing words and summary levels.
    fn searches_match(hb: &HBitmap, m: &Model, marks: &[u64], n: u64) {
        for &k in marks.iter().chain(&[1, 65, 4000, 5000, 200_000]) {
            for s in [k.saturating_sub(1), k, k + 1] {
                let ctx = format!("n {n} s {s}");
                assert_eq!(
                    hb.next_dirty(s, u64::MAX),
                    m.next(s, u64::MAX, true),
                    "{ctx}"
                );
                assert_eq!(
                    hb.next_zero(s, u64::MAX),
                    m.next(s, u64::MAX, false),
                    "{ctx}"
                );
                assert_eq!(hb.status(s, u64::MAX), m.status(s, u64::MAX), "{ctx}");
            }
        }
    }

    #[test]
    fn word_and_level_boundaries() {
        for n in [
            64u64, 65, 4095, 4096, 4097, 262_143, 262_144, 262_145, 300_000,
        ] {
            let mut hb = HBitmap::new(n, 0);
            let mut m = Model::new(n, 0);
            let marks: Vec<u64> = [0u64, 62, 63, 64, 4095, 4096, 4097, 262_143, 262_144, n - 1]
                .into_iter()
                .filter(|&k| k < n)
                .collect();
            // Single bits: searches must cross words and summary levels.
            for &k in &marks {
                hb.set(k, 1);
                m.fill(k, 1, true);
            }
            check_invariants(&hb);
            searches_match(&hb, &m, &marks, n);
            // Full bitmap with single holes.
            hb.set(0, n);
            m.fill(0, n, true);
            assert_eq!(hb.next_zero(0, u64::MAX), None);
            assert_eq!(hb.count(), n);
            check_invariants(&hb);
            for &k in &marks {
                hb.reset(k, 1);
                m.fill(k, 1, false);
            }
            check_invariants(&hb);
            searches_match(&hb, &m, &marks, n);
            // Dirty areas walk the whole bitmap in order.
            let mut pos = 0;
            let mut total = 0;
            while let Some((s, l)) = hb.next_dirty_area(pos, u64::MAX, 5000) {
                assert_eq!(Some((s, l)), m.area(pos, u64::MAX, 5000));
                total += l;
                pos = s + l;
            }
            assert_eq!(total, m.dirty());
            assert_same(&hb, &m);
            // Clearing everything in pieces empties every summary.
            hb.reset(0, n);
            assert!(hb.is_empty());
            check_invariants(&hb);
            assert_eq!(hb.next_dirty(0, u64::MAX), None);
        }
    }

    #[test]
    fn deserialize_ones_masks_the_tail() {
        for (size, g) in [(100u64, 0u32), (65 * 512 + 7, 9), (64 << 16, 16), (1, 4)] {
            let mut hb = HBitmap::new(size, g);
            let align = hb.serialization_align();
            let mut start = 0;
            while start < size {
                let len = align.min(size - start);
                hb.deserialize_ones(start, len);
                start += len;
            }
            hb.deserialize_finish();
            check_invariants(&hb);
            assert_eq!(hb.dirty_granules(), hb.granules());
            assert_eq!(hb.next_zero(0, u64::MAX), None);
            let mut m = Model::new(size, g);
            m.bits.fill(true);
            assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&m.hash_input())));
            // deserialize_part masks too.
            let mut hb2 = HBitmap::new(size, g);
            let buf = vec![0xffu8; hb2.serialization_size(0, size) as usize];
            hb2.deserialize_part(&buf, 0, size);
            hb2.deserialize_finish();
            assert_eq!(hb2.dirty_granules(), hb2.granules());
            check_invariants(&hb2);
        }
    }

    #[test]
    fn serialization_layout() {
        let mut hb = HBitmap::new(1 << 30, 16); // 16384 granules, 256 words
        hb.set(0, 1); // granule 0
        hb.set(9 << 16, 1); // granule 9
        hb.set(64 << 16, 1); // granule 64: first bit of the second word
        assert_eq!(hb.serialization_align(), 4 << 20);
        assert_eq!(hb.serialization_size(0, 1 << 30), 256 * 8);
        assert_eq!(hb.serialization_size(0, 1), 8);
        assert_eq!(hb.serialization_size(0, (64 << 16) + 1), 16);
        let mut buf = vec![0u8; 16];
        hb.serialize_part(&mut buf, 0, 128 << 16);
        assert_eq!(buf, [1, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        // Unaligned start still works on the spanned words.
        let mut buf = vec![0u8; 8];
        hb.serialize_part(&mut buf, 65 << 16, 1);
        assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0]);
        // Spans past the end are written as zeros; a short buffer is not overrun.
        let mut buf = vec![0xeeu8; 24];
        hb.serialize_part(&mut buf, 255 << 22, 3 << 22);
        assert_eq!(buf, [0u8; 24]);
        let mut short = [0xeeu8; 5];
        hb.serialize_part(&mut short, 0, 1 << 30);
        assert_eq!(short, [0xee; 5]);
        hb.deserialize_part(&[1, 2, 3], 0, 1 << 30);
        hb.deserialize_finish();
        assert_eq!(hb.dirty_granules(), 3);
    }

    #[test]
    fn sha256_known_contents() {
        // 64 MiB at 64 KiB: 1024 granules = 16 words = 128 zero bytes.
        let hb = HBitmap::new(64 << 20, 16);
        let zeros = to_hex(&Sha256::digest(&[0u8; 128]));
        assert_eq!(hb.sha256_hex(), zeros);
        // Cross-check that expectation with coreutils when available.
        if let Ok(out) = std::process::Command::new("sh")
            .args(["-c", "head -c 128 /dev/zero | sha256sum"])
            .output()
        {
            if out.status.success() {
                let text = String::from_utf8(out.stdout).unwrap();
                assert_eq!(text.split_whitespace().next(), Some(zeros.as_str()));
            }
        }
        // Granule 0 dirty: first byte 0x01.
        let mut hb = hb;
        hb.set(0, 1);
        let mut bytes = [0u8; 128];
        bytes[0] = 1;
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&bytes)));
        // Larger than one hashing chunk, with a partial last word.
        let mut hb = HBitmap::new((70_000 << 9) - 3, 9);
        hb.set(12345 << 9, 777 << 9);
        let mut m = Model::new((70_000 << 9) - 3, 9);
        m.fill(12345 << 9, 777 << 9, true);
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&m.hash_input())));
    }

    #[test]
    fn merge_granularities() {
        let size = 10 << 16;
        let mut fine = HBitmap::new(size, 9);
        fine.set((3 << 16) + 512, 1);
        let mut coarse = HBitmap::new(size, 16);
        coarse.merge_from(&fine);
        assert_eq!(
            coarse.next_dirty_area(0, size, u64::MAX),
            Some((3 << 16, 1 << 16))
        );
        let mut fine2 = HBitmap::new(size, 9);
        fine2.merge_from(&coarse);
        assert_eq!(fine2.count(), 1 << 16);
        assert_eq!(fine2.next_dirty(0, size), Some(3 << 16));
        let mut same = HBitmap::new(size, 9);
        same.set(0, 1);
        same.merge_from(&fine2);
        assert_eq!(same.count(), (1 << 16) + 512);
        check_invariants(&same);
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let mut hb = HBitmap::new(1000, 4);
        for &(s, l) in &[
            (u64::MAX, u64::MAX),
            (999, u64::MAX),
            (0, u64::MAX),
            (1000, 1),
            (u64::MAX, 0),
        ] {
            hb.set(s, l);
            hb.get(s);
            hb.next_dirty(s, l);
            hb.next_zero(s, l);
            hb.next_dirty_area(s, l, l);
            hb.status(s, l);
            hb.serialization_size(s, l);
            let mut buf = [0u8; 64];
            hb.serialize_part(&mut buf, s, l);
            hb.deserialize_part(&buf, s, l);
            hb.deserialize_zeroes(s, l);
            hb.deserialize_ones(s, l);
            hb.reset(s, l);
        }
        // Operations between deserialize_* and finish (stale summaries) must not panic.
        hb.deserialize_ones(0, 1000);
        hb.set(5, 10);
        hb.reset(0, 16);
        hb.next_dirty(0, 1000);
        hb.next_zero(0, 1000);
        hb.deserialize_finish();
        check_invariants(&hb);
        // Granularity bits past the contract are clamped, and huge sizes are fine lazily.
        let big = HBitmap::new(u64::MAX, 63);
        assert_eq!(big.granules(), 2);
        let mut big = big;
        big.set(0, u64::MAX);
        assert_eq!(big.count(), u64::MAX);
        assert_eq!(big.serialization_align(), u64::MAX);
        let other = HBitmap::new(12345, 9);
        hb.merge_from(&other);
        let mut other = other;
        other.set(0, 12345);
        hb.merge_from(&other);
        check_invariants(&hb);
    }

    /// A fully dirty 16 TiB / 64 KiB bitmap (2^28 granules): scans from many starting points
    /// find no clean granule and one dirty run to the end.
    #[test]
    fn next_zero_fast_on_full_bitmap() {
        let size = 16u64 << 40;
        let mut hb = HBitmap::new(size, 16);
        assert_eq!(hb.granules(), 1 << 28);
        hb.set(0, size);
        assert_eq!(hb.dirty_granules(), 1 << 28);
        for i in 0..1000u64 {
            assert_eq!(hb.next_zero(i << 16, u64::MAX), None);
            assert_eq!(
                hb.next_dirty_area(i << 30, size, u64::MAX),
                Some((i << 30, size - (i << 30)))
            );
        }
        hb.reset(size - (1 << 16), 1 << 16);
        assert_eq!(hb.next_zero(0, u64::MAX), Some(size - (1 << 16)));
        hb.reset_all();
        assert!(hb.is_empty());
        assert_eq!(hb.next_dirty(0, u64::MAX), None);
    }
}
