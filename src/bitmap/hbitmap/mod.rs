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
//! * **clean**: no storage at all (no `chunks` slot, `nonempty` bit clear);
//! * **full**: every granule of the chunk dirty, also no storage (`None`, `notfull` bit clear);
//! * **sparse**: a `Sparse` (chunk.rs) — at most `SPARSE_MAX` (128) non-zero words as a sorted list of
//!   (word index, word) pairs (16 bytes each, so at most 2 KiB) and the chunk's dirty count,
//!   in a side table (`sparse`), so that the chunk table stays one pointer per chunk;
//! * **partial**: a `Part` (chunk.rs) — the 1024 words plus two small summary levels ("word non-zero",
//!   "word all ones", and one word above each) and the chunk's dirty count.
//!
//! Both tables are paged (paged.rs): a page of 512 slots is allocated with its first chunk
//! with storage and freed with its last, and a table with no chunk with storage holds nothing.
//!
//! Every operation leaves chunks in canonical form: a sparse or partial chunk whose count falls
//! to zero is freed (clean), one whose count reaches its capacity is freed (full). A first set
//! in a clean chunk makes it sparse (when it spans at most SPARSE_MAX words); a sparse chunk that
//! would grow past SPARSE_MAX words becomes partial; a reset that leaves a partial chunk with at
//! most `SPARSE_BACK` (32) dirty granules makes it sparse again (cheap through its summaries;
//! the gap between 32 and 128 words avoids flapping). [`HBitmap::load_words_le`] builds sparse
//! chunks straight from the incoming words (no 8 KiB chunk allocated or touched). So memory
//! follows the dirt: a clean or fully dirty region of any size costs no chunk table and a few
//! bytes of tower per 2^28 granules, a sparse chunk 16 bytes per non-zero word, and a partial chunk its flat size plus
//! about 3.3% (summaries). Searches in a sparse chunk are binary searches and list walks
//! (at most 128 entries); a search that continues where the chunk's previous one stopped (a
//! walk over dirty runs, one call per run) starts from that entry, a hint checked against the
//! sorted list, so it costs a step or two; other operations on it touch only its list, except those that would
//! make it dense (a large set, deserialize_part, merging a partial source), which convert it to
//! a partial chunk first.
//!
//! Above the chunks, two bit vectors over chunk indices, each with "word non-zero" summary levels
//! (64 times smaller each, up to one word): `nonempty` (chunk has a dirty granule) and `notfull`
//! (chunk has a clean granule). Their bit vectors are paged too, a page of 4096 chunks whose
//! bits are all equal holding no words (tower.rs). A search for the next dirty (clean) granule looks in its own
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
//!
//! # Files
//!
//! This file holds the type, its geometry and the calls that set, clear and resize; `chunk.rs`
//! the two chunk kinds with storage, `table.rs` the chunk states and their transitions,
//! `tower.rs` the summaries over chunks, `search.rs` the searches, `runs.rs` the dirty-run
//! iterator, `merge.rs` merges, `serialize.rs` QEMU's serialization layout and the SHA-256.

use std::fmt;

mod chunk;
mod merge;
mod paged;
mod runs;
mod search;
mod serialize;
mod table;
#[cfg(test)]
mod tests;
mod tower;

use chunk::{bit_range_mask, Part, Sparse};
use paged::Paged;
pub use runs::DirtyRuns;
use tower::Tower;

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

/// A hierarchical dirty bitmap over `size` bytes.
#[derive(Clone)]
pub struct HBitmap {
    /// Covered length in bytes.
    size: u64,
    /// log2 of the granularity (clamped to 63).
    granularity_bits: u32,
    /// ceil(size / granularity).
    granules: u64,
    /// Number of dirty granules.
    dirty: u64,
    /// Net change of `dirty` made by deserialize_* calls since the last deserialize_finish:
    /// like QEMU, the visible count ignores them until the finish.
    deser_delta: i64,
    /// One slot per chunk (`chunk_count(granules)`), in use for partial chunks only.
    chunks: Paged<Part>,
    /// One slot per chunk, in use for sparse chunks only (their `chunks` slot is empty). Kept
    /// apart so that the chunk table stays one pointer per chunk.
    sparse: Paged<Sparse>,
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
            .field("granularity_bits", &self.granularity_bits)
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
        let granularity_bits = granularity_bits.min(63);
        let granules = size.div_ceil(1u64 << granularity_bits);
        let n = chunk_count(granules);
        HBitmap {
            size,
            granularity_bits,
            granules,
            dirty: 0,
            deser_delta: 0,
            chunks: Paged::new(n),
            sparse: Paged::new(n),
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
        self.granularity_bits
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
        if dirty > (u64::MAX >> self.granularity_bits) {
            u64::MAX
        } else {
            dirty << self.granularity_bits
        }
    }
    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.dirty_granules() == 0
    }

    /// Heap memory owned by the bitmap in bytes: the chunk tables, the chunk towers and the
    /// storage of partial and sparse chunks (allocator overhead not included). O(chunks with
    /// storage, plus the tower's pages).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.heap_bytes()
            + self.chunks.live() * std::mem::size_of::<Part>()
            + self.sparse.heap_bytes()
            + self
                .sparse
                .iter()
                .map(|(_, s)| s.heap_bytes())
                .sum::<usize>()
            + self.nonempty.heap_bytes()
            + self.notfull.heap_bytes()
    }

    /// Number of chunks with storage (partially dirty chunks, sparse ones included). O(1).
    pub fn allocated_chunks(&self) -> usize {
        self.chunks.live() + self.sparse.live()
    }

    /// Number of sparse chunks (partially dirty chunks kept as a list of words). O(1).
    pub fn sparse_chunks(&self) -> usize {
        self.sparse.live()
    }

    /// The granules [first, last] intersecting [start, start + bytes), clamped; None if empty.
    fn granule_span(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        if bytes == 0 || start >= self.size {
            return None;
        }
        let first = start >> self.granularity_bits;
        let last =
            (start.saturating_add(bytes - 1) >> self.granularity_bits).min(self.granules - 1);
        Some((first, last))
    }

    /// Sets every granule that intersects [start, start + bytes) (rounded outward), clamped to size.
    #[inline]
    pub fn set(&mut self, start: u64, bytes: u64) {
        if let Some((first, last)) = self.granule_span(start, bytes) {
            // Fast path: one word of a partial chunk (the common guest write).
            if first >> 6 == last >> 6 {
                let c = (first >> CHUNK_BITS) as usize;
                if let Some(p) = self.chunks.get_mut(c) {
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
    /// Clears everything and frees all chunk storage: what is left is the memory of an empty
    /// bitmap. O(chunks with storage, plus the tower's pages).
    pub fn reset_all(&mut self) {
        let n = self.chunks.len();
        self.chunks.clear();
        self.sparse.clear();
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
        let k = offset >> self.granularity_bits;
        let c = (k >> CHUNK_BITS) as usize;
        if c >= self.chunks.len() {
            return false;
        }
        match self.chunks.get(c) {
            Some(p) => (p.words[((k & CHUNK_MASK) >> 6) as usize] >> (k & 63)) & 1 != 0,
            None => match self.sp(c) {
                Some(s) => (s.word(((k & CHUNK_MASK) >> 6) as usize) >> (k & 63)) & 1 != 0,
                None => !self.notfull.get(c),
            },
        }
    }

    /// Resizes to `new_size` bytes: new granules are clean; granules entirely beyond the new end
    /// are dropped (their storage freed). O(chunks).
    pub fn truncate(&mut self, new_size: u64) {
        let new_granules = new_size.div_ceil(1u64 << self.granularity_bits);
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
            if !self.chunks.is_some(c) && !self.notfull.get(c) && cap < CHUNK_GRANULES {
                self.chunks.put(c, Part::ones(cap));
                self.notfull.set(c);
            }
        }
        self.granules = new_granules;
        let n = chunk_count(new_granules);
        self.sparse.resize(n);
        self.chunks.resize(n);
        let resize = |tower: &mut Tower, fill_new: bool| {
            let mut bits = tower.to_bits();
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
            *tower = Tower::from_bits(n, &bits);
        };
        resize(&mut self.nonempty, false);
        resize(&mut self.notfull, true);
        // The new last chunk may have become full (its capacity shrank).
        self.settle(n - 1);
    }
}
