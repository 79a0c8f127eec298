//! The hierarchical bitmap engine (our own design after QEMU's HBitmap idea).
//!
//! Items are bytes of the virtual disk. One bit of the bottom level covers `1 << granularity_bits`
//! bytes (a granule). Callers (crate::bitmap::DirtyBitmap) validate arguments before calling; the
//! engine clamps ranges to the size and never panics on any input combination.
//!
//! # Design
//!
//! * `bottom`: the real bitmap, one bit per granule, `max(ceil(granules / 64), 1)` words (exactly
//!   the words QEMU hashes for `x-debug-block-dirty-bitmap-sha256`). Bits at or past `granules`
//!   are always zero (every writer masks the last word).
//! * Two towers of summary levels over it, each level 64 times smaller than the one below, up to
//!   a level of one word:
//!   - `any[0]` bit n is set iff bottom word n is non-zero, `any[l + 1]` bit n iff `any[l]` word n
//!     is non-zero. Used to find dirty granules.
//!   - `full[0]` bit n is set iff bottom word n is all ones, `full[l + 1]` bit n iff `full[l]` word
//!     n is all ones. Used to find clean granules quickly in dense bitmaps (QEMU has no such
//!     summary and its `next_zero` is linear). The last, partial bottom word is never "full".
//!
//! A search (dirty or clean, see [`HBitmap::find`]) looks at the current word of a level; if it
//! has no interesting bit at or after the position it climbs one level and continues from the next
//! word, and once it finds a bit it descends with `trailing_zeros` to the bottom. The cost is
//! O(levels) word reads (at most 7 levels for 2^41 granules), independent of how much clean (or
//! dirty) space is skipped.
//!
//! Updates change a bottom word and propagate upward only while a summary word changes between
//! zero / non-zero (`any`) or full / not full (`full`), so setting or clearing m granules costs
//! O(m / 64) amortised word operations. The count of dirty granules is maintained incrementally
//! (popcount of the changed bits), so `count` and `is_empty` are O(1).
//!
//! All levels are allocated with `vec![0; n]` (zeroed allocation): untouched pages of a huge
//! bitmap cost no resident memory. `reset_all` reallocates instead of writing zeros for the same
//! reason. Memory: bottom size times about 1 + 2/63.

use std::fmt;

use super::sha256::{to_hex, Sha256};

/// Largest number of granules a bitmap may track (2^41, as QEMU's HBitmap on 64-bit hosts).
pub const MAX_GRANULES: u64 = 1 << 41;

/// A hierarchical dirty bitmap over `size` bytes.
#[derive(Clone)]
pub struct HBitmap {
    /// Covered length in bytes.
    size: u64,
    /// log2 of the granularity (clamped to 63).
    gbits: u32,
    /// ceil(size / granularity).
    granules: u64,
    /// Number of set bits in `bottom` (stale between deserialize_* and deserialize_finish).
    dirty: u64,
    /// One bit per granule; `words_for(granules)` words; bits >= `granules` are zero.
    bottom: Vec<u64>,
    /// "Word below is non-zero" summaries, lowest first; empty when `bottom` has one word.
    any: Vec<Vec<u64>>,
    /// "Word below is all ones" summaries, same shapes as `any`.
    full: Vec<Vec<u64>>,
}

impl fmt::Debug for HBitmap {
    // Manual impl: the derived one would print every word of a possibly huge bitmap.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HBitmap")
            .field("size", &self.size)
            .field("granularity_bits", &self.gbits)
            .field("granules", &self.granules)
            .field("dirty_granules", &self.dirty)
            .field("levels", &(self.any.len() + 1))
            .finish()
    }
}

/// Number of bottom words for `granules` bits (at least one, like QEMU).
fn words_for(granules: u64) -> usize {
    usize::try_from(granules.div_ceil(64).max(1)).unwrap_or(usize::MAX)
}

/// Lengths of the summary levels above a bottom level of `bottom_words` words.
fn summary_lengths(bottom_words: usize) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut n = bottom_words;
    while n > 1 {
        n = n.div_ceil(64);
        lens.push(n);
    }
    lens
}

/// Mask of bits lo..=hi (0 <= lo <= hi <= 63) of a word.
#[inline]
fn bit_range_mask(lo: u64, hi: u64) -> u64 {
    (!0u64 << lo) & (!0u64 >> (63 - hi))
}

/// Sets bit `idx` in `levels[0]` and propagates up while a word goes from zero to non-zero.
#[inline]
fn any_set(levels: &mut [Vec<u64>], mut idx: usize) {
    for level in levels {
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

/// Clears bit `idx` in `levels[0]` and propagates up while a word becomes zero.
#[inline]
fn any_clear(levels: &mut [Vec<u64>], mut idx: usize) {
    for level in levels {
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

/// Sets bit `idx` in `levels[0]` and propagates up while a word becomes all ones.
#[inline]
fn full_set(levels: &mut [Vec<u64>], mut idx: usize) {
    for level in levels {
        let Some(word) = level.get_mut(idx >> 6) else {
            return;
        };
        *word |= 1u64 << (idx & 63);
        if *word != !0 {
            return;
        }
        idx >>= 6;
    }
}

/// Clears bit `idx` in `levels[0]` and propagates up while a word stops being all ones.
#[inline]
fn full_clear(levels: &mut [Vec<u64>], mut idx: usize) {
    for level in levels {
        let Some(word) = level.get_mut(idx >> 6) else {
            return;
        };
        let was = *word;
        *word &= !(1u64 << (idx & 63));
        if was != !0 {
            return;
        }
        idx >>= 6;
    }
}

/// One summary level over `src`: bit n set iff `pred(src[n])`.
fn summarize(src: &[u64], pred: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut out = vec![0u64; src.len().div_ceil(64)];
    for (o, chunk) in out.iter_mut().zip(src.chunks(64)) {
        let mut v = 0u64;
        for (i, &w) in chunk.iter().enumerate() {
            v |= (pred(w) as u64) << i;
        }
        *o = v;
    }
    out
}

impl HBitmap {
    /// A clean bitmap of `size` bytes with granules of `1 << granularity_bits` bytes.
    /// `granularity_bits` < 64 and ceil(size / granule) <= MAX_GRANULES (checked by the caller).
    /// (A `granularity_bits` >= 64 is clamped to 63 rather than panicking.)
    pub fn new(size: u64, granularity_bits: u32) -> Self {
        let gbits = granularity_bits.min(63);
        let granules = size.div_ceil(1u64 << gbits);
        let words = words_for(granules);
        let lens = summary_lengths(words);
        HBitmap {
            size,
            gbits,
            granules,
            dirty: 0,
            bottom: vec![0u64; words],
            any: lens.iter().map(|&n| vec![0u64; n]).collect(),
            full: lens.iter().map(|&n| vec![0u64; n]).collect(),
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
    /// Number of dirty granules (O(1)).
    pub fn dirty_granules(&self) -> u64 {
        self.dirty
    }
    /// Dirty granules times granularity, in bytes (may exceed size by less than a granule). O(1).
    /// (Saturates at u64::MAX, only reachable for sizes within a granule of u64::MAX.)
    pub fn count(&self) -> u64 {
        if self.dirty > (u64::MAX >> self.gbits) {
            u64::MAX
        } else {
            self.dirty << self.gbits
        }
    }
    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.dirty == 0
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

    /// Clears the bits past the last granule (after whole-word writes).
    fn mask_tail(&mut self) {
        let mask = self.last_word_mask();
        if let Some(last) = self.bottom.last_mut() {
            *last &= mask;
        }
    }

    /// bottom[w] |= mask, with count and summary maintenance.
    #[inline]
    fn or_word(&mut self, w: usize, mask: u64) {
        let Some(slot) = self.bottom.get_mut(w) else {
            return;
        };
        let old = *slot;
        let new = old | mask;
        if new == old {
            return;
        }
        *slot = new;
        self.dirty += u64::from((new & !old).count_ones());
        if old == 0 {
            any_set(&mut self.any, w);
        }
        if new == !0 {
            full_set(&mut self.full, w);
        }
    }

    /// bottom[w] &= !mask, with count and summary maintenance.
    #[inline]
    fn andnot_word(&mut self, w: usize, mask: u64) {
        let Some(slot) = self.bottom.get_mut(w) else {
            return;
        };
        let old = *slot;
        let new = old & !mask;
        if new == old {
            return;
        }
        *slot = new;
        self.dirty = self
            .dirty
            .saturating_sub(u64::from((old & mask).count_ones()));
        if new == 0 {
            any_clear(&mut self.any, w);
        }
        if old == !0 {
            full_clear(&mut self.full, w);
        }
    }

    /// Applies `op(word index, mask)` to every bottom word of the granules [first, last].
    #[inline]
    fn for_each_word(&mut self, first: u64, last: u64, mut op: impl FnMut(&mut Self, usize, u64)) {
        let (fw, lw) = (first >> 6, last >> 6);
        for w in fw..=lw {
            let lo = if w == fw { first & 63 } else { 0 };
            let hi = if w == lw { last & 63 } else { 63 };
            op(self, w as usize, bit_range_mask(lo, hi));
        }
    }

    /// Sets every granule that intersects [start, start + bytes) (rounded outward), clamped to size.
    pub fn set(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.granule_span(start, bytes) {
            self.for_each_word(first, last, Self::or_word);
        }
    }
    /// Clears every granule that intersects [start, start + bytes), clamped to size.
    /// (Alignment is checked by the caller.)
    pub fn reset(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.granule_span(start, bytes) {
            self.for_each_word(first, last, Self::andnot_word);
        }
    }
    /// Clears everything. A small bitmap is zeroed in place; a large one gets freshly zeroed
    /// levels (cheap, and gives pages back) instead of zeros written over its whole bottom level.
    pub fn reset_all(&mut self) {
        const IN_PLACE_WORDS: usize = 4096;
        if self.bottom.len() <= IN_PLACE_WORDS {
            self.bottom.fill(0);
            self.any
                .iter_mut()
                .chain(self.full.iter_mut())
                .for_each(|l| l.fill(0));
            self.dirty = 0;
        } else {
            *self = HBitmap::new(self.size, self.gbits);
        }
    }
    /// Whether the granule containing byte `offset` is dirty (false beyond the end).
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let k = offset >> self.gbits;
        self.bottom
            .get((k >> 6) as usize)
            .is_some_and(|w| (w >> (k & 63)) & 1 != 0)
    }

    /// Summary level `l` of the tower used by a dirty (`zero` false) or clean (`zero` true)
    /// search; level 0 is the bottom.
    #[inline]
    fn level(&self, l: usize, zero: bool) -> &[u64] {
        match l {
            0 => &self.bottom,
            _ if zero => &self.full[l - 1],
            _ => &self.any[l - 1],
        }
    }

    /// First granule index >= `pos` that is dirty (`zero` false) or clean (`zero` true). A clean
    /// result may lie at or past `granules` (padding bits of the last word): callers compare with
    /// their end. None when there is none (or past the end).
    #[inline]
    fn find(&self, pos: u64, zero: bool) -> Option<u64> {
        // Searching for clean bits is searching for set bits in the complemented bottom level;
        // the `full` tower summarises exactly "the complemented word is zero".
        let flip = if zero { !0u64 } else { 0 };
        let top = self.any.len();
        let mut level = 0usize;
        let mut idx = pos;
        loop {
            let w = idx >> 6;
            let word = *self.level(level, zero).get(usize::try_from(w).ok()?)?;
            let bits = (word ^ flip) & (!0u64 << (idx & 63));
            if bits != 0 {
                // Descend: each summary bit names a word of the level below with a hit in it.
                let mut found = (w << 6) | u64::from(bits.trailing_zeros());
                while level > 0 {
                    level -= 1;
                    // A missing word lies past the end of the level (only possible for the clean
                    // search's padding bits): nothing exists from there on.
                    let word = *self.level(level, zero).get(found as usize)? ^ flip;
                    if word == 0 {
                        // Summaries stale (between deserialize_* and deserialize_finish).
                        return None;
                    }
                    found = (found << 6) | u64::from(word.trailing_zeros());
                }
                return Some(found);
            }
            if level == top {
                return None;
            }
            // Nothing more in this word: continue with the next word, one level up.
            level += 1;
            idx = w + 1;
        }
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
    /// Equal granularities OR the non-zero words of `other` (found through its summaries, so a
    /// sparse source costs little); different ones set each dirty run of `other` in bytes.
    pub fn merge_from(&mut self, other: &HBitmap) {
        if other.is_empty() {
            return;
        }
        if other.gbits == self.gbits {
            let last = self.bottom.len() - 1;
            let last_mask = self.last_word_mask();
            let mut pos = 0u64;
            while let Some(k) = other.find(pos, false) {
                let w = (k >> 6) as usize;
                if w > last {
                    break;
                }
                let Some(&(mut v)) = other.bottom.get(w) else {
                    break;
                };
                if w == last {
                    v &= last_mask;
                }
                self.or_word(w, v);
                pos = (k | 63) + 1;
            }
        } else {
            let end = self.size.min(other.size);
            let mut pos = 0u64;
            while let Some((s, len)) = other.next_dirty_area(pos, end, u64::MAX) {
                self.set(s, len);
                pos = s + len;
            }
        }
    }
    /// Resizes to `new_size` bytes: new granules are clean; granules entirely beyond the new end
    /// are dropped. O(bitmap size) when the number of granules changes (summaries are rebuilt).
    pub fn truncate(&mut self, new_size: u64) {
        let new_granules = new_size.div_ceil(1u64 << self.gbits);
        self.size = new_size;
        if new_granules == self.granules {
            return;
        }
        let words = words_for(new_granules);
        if words <= self.bottom.len() {
            self.bottom.truncate(words);
            self.bottom.shrink_to_fit();
        } else {
            // Zeroed allocation plus a copy, so the new tail costs no resident memory.
            let mut grown = vec![0u64; words];
            grown[..self.bottom.len()].copy_from_slice(&self.bottom);
            self.bottom = grown;
        }
        self.granules = new_granules;
        self.mask_tail();
        self.rebuild();
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
    fn existing_words(&self, start: u64, bytes: u64) -> (std::ops::Range<usize>, u64) {
        match self.word_span(start, bytes) {
            None => (0..0, 0),
            Some((first, last)) => {
                let len = self.bottom.len() as u64;
                let lo = first.min(len) as usize;
                let hi = (last + 1).min(len) as usize;
                (lo..hi, last - first + 1)
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
    /// Writes the granules of [start, start + bytes) into `buf` in QEMU's layout: little-endian
    /// 64-bit words, granule k of the chunk is bit k % 8 of byte k / 8. `buf.len()` >=
    /// serialization_size. Bits past the end of the bitmap are written as zero.
    /// (A shorter `buf` receives only the whole words that fit.)
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, bytes: u64) {
        let (range, nwords) = self.existing_words(start, bytes);
        let nwords = usize::try_from(nwords).unwrap_or(usize::MAX);
        let mut out = buf.chunks_exact_mut(8).take(nwords);
        // (The bottom side first: zip must not consume an output chunk it cannot fill.)
        for (w, chunk) in self.bottom[range].iter().zip(&mut out) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        // Words of the span past the end of the bitmap.
        for chunk in out {
            chunk.fill(0);
        }
    }
    /// Overwrites the words spanned by [start, start + bytes) from `buf` (QEMU layout). Bits past
    /// the end of the bitmap are masked off. Summaries and count are stale until
    /// `deserialize_finish`. (Only words fully present in `buf` are written.)
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, bytes: u64) {
        let (range, _) = self.existing_words(start, bytes);
        for (w, chunk) in self.bottom[range].iter_mut().zip(buf.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        self.mask_tail();
    }
    /// Fills the words spanned by [start, start + bytes) with zeros (summaries stale until finish).
    pub fn deserialize_zeroes(&mut self, start: u64, bytes: u64) {
        let (range, _) = self.existing_words(start, bytes);
        self.bottom[range].fill(0);
    }
    /// Fills the words spanned by [start, start + bytes) with ones, masked to the end of the
    /// bitmap (summaries stale until finish).
    pub fn deserialize_ones(&mut self, start: u64, bytes: u64) {
        let (range, _) = self.existing_words(start, bytes);
        self.bottom[range].fill(!0);
        self.mask_tail();
    }
    /// Rebuilds summaries and the count after deserialize_* calls.
    pub fn deserialize_finish(&mut self) {
        self.mask_tail();
        self.rebuild();
    }

    /// Recomputes the count and both summary towers from the bottom level. O(bottom words).
    fn rebuild(&mut self) {
        let lens = summary_lengths(self.bottom.len());
        let mut any = Vec::with_capacity(lens.len());
        let mut full = Vec::with_capacity(lens.len());
        let mut dirty = 0u64;
        if let Some(&n) = lens.first() {
            // One pass over the bottom for the count and both first summaries.
            let mut a = vec![0u64; n];
            let mut f = vec![0u64; n];
            for ((chunk, a), f) in self.bottom.chunks(64).zip(a.iter_mut()).zip(f.iter_mut()) {
                let (mut av, mut fv) = (0u64, 0u64);
                for (i, &w) in chunk.iter().enumerate() {
                    dirty += u64::from(w.count_ones());
                    av |= u64::from(w != 0) << i;
                    fv |= u64::from(w == !0) << i;
                }
                *a = av;
                *f = fv;
            }
            any.push(a);
            full.push(f);
            for l in 1..lens.len() {
                let a = summarize(&any[l - 1], |w| w != 0);
                let f = summarize(&full[l - 1], |w| w == !0);
                any.push(a);
                full.push(f);
            }
        } else {
            dirty = self.bottom.iter().map(|w| u64::from(w.count_ones())).sum();
        }
        self.any = any;
        self.full = full;
        self.dirty = dirty;
    }

    /// SHA-256 (lowercase hex) of the bottom level as little-endian 64-bit words, at least one
    /// word: equal to QEMU's `x-debug-block-dirty-bitmap-sha256` on x86_64.
    pub fn sha256_hex(&self) -> String {
        const CHUNK_WORDS: usize = 512;
        let mut h = Sha256::new();
        let mut buf = [0u8; CHUNK_WORDS * 8];
        for words in self.bottom.chunks(CHUNK_WORDS) {
            for (out, w) in buf.chunks_exact_mut(8).zip(words) {
                out.copy_from_slice(&w.to_le_bytes());
            }
            h.update(&buf[..words.len() * 8]);
        }
        to_hex(&h.finalize())
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

    /// Structural invariants: shapes, clean tail, count and summaries equal a fresh rebuild.
    fn check_invariants(hb: &HBitmap) {
        assert_eq!(hb.granules, hb.size.div_ceil(1 << hb.gbits));
        assert_eq!(hb.bottom.len(), words_for(hb.granules));
        assert_eq!(
            hb.bottom.last().unwrap() & !hb.last_word_mask(),
            0,
            "tail bits"
        );
        let mut fresh = hb.clone();
        fresh.rebuild();
        assert_eq!(fresh.dirty, hb.dirty, "count");
        assert_eq!(fresh.any, hb.any, "any summaries");
        assert_eq!(fresh.full, hb.full, "full summaries");
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
            for &k in marks.iter().chain(&[1, 65, 4000, 5000, 200_000]) {
                for s in [k.saturating_sub(1), k, k + 1] {
                    assert_eq!(
                        hb.next_dirty(s, u64::MAX),
                        m.next(s, u64::MAX, true),
                        "n {n} s {s}"
                    );
                    assert_eq!(
                        hb.next_zero(s, u64::MAX),
                        m.next(s, u64::MAX, false),
                        "n {n} s {s}"
                    );
                    assert_eq!(hb.status(s, u64::MAX), m.status(s, u64::MAX), "n {n} s {s}");
                }
            }
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
            for &k in marks.iter().chain(&[1, 65, 4000, 5000, 200_000]) {
                for s in [k.saturating_sub(1), k, k + 1] {
                    assert_eq!(
                        hb.next_zero(s, u64::MAX),
                        m.next(s, u64::MAX, false),
                        "n {n} s {s}"
                    );
                    assert_eq!(
                        hb.next_dirty(s, u64::MAX),
                        m.next(s, u64::MAX, true),
                        "n {n} s {s}"
                    );
                    let (st, len) = hb.status(s, u64::MAX);
                    assert_eq!((st, len), m.status(s, u64::MAX), "n {n} s {s}");
                }
            }
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
