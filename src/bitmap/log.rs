//! The lock-free write log: the guest write hook's fast path.
//!
//! QEMU's `bdrv_set_dirty` takes the node's mutex and sets the range in every enabled bitmap,
//! so a write costs O(number of enabled bitmaps) and serialises the I/O threads. qdirty's hook
//! instead sets the range once, with atomic word operations and no lock, in a [`WriteLog`]
//! shared (through an `Arc`) by the [`BitmapSet`](super::BitmapSet) and every writer. Under
//! exclusive access (`&mut BitmapSet`), [`BitmapSet::fold`](super::BitmapSet::fold) takes the
//! pending words out of the log (`swap(0)`) and ORs them into every bitmap that records writes
//! at that moment. The set folds at the top of every `&mut` method, and the C ABI folds right
//! after taking the image lock, so every operation sees the writes that completed before it
//! and none that started after it (QEMU's ordering).
//!
//! # Layout
//!
//! The log records writes at a base granularity `G0`: the smallest granularity among the
//! set's bitmaps (inconsistent ones excepted), kept up to date by the set whenever a bitmap
//! appears or goes away. A log bit at `G0` maps exactly onto the granules of any bitmap with a
//! granularity `>= G0` (powers of two, aligned), so the fold rounds outward exactly as QEMU's
//! hook does. A writer may still hold an older `G0` while the set changes it; the log
//! therefore keeps one *layer* per granularity (512 B .. 2 GiB, created on first use, never
//! freed before the log) and the fold drains them all. Bits of a layer coarser than a bitmap
//! can only come from a write that read `G0` before that bitmap existed, i.e. a write
//! concurrent with its creation: the fold skips that bitmap for them, which is one of the two
//! outcomes QEMU allows for a concurrent write.
//!
//! A layer addresses up to 2^41 bits (QEMU's maximum number of granules) through lazily
//! allocated pieces ([`OnceBox`]: one CAS installs a piece, losers free theirs): *chunks* of
//! 4096 words (2^18 bits, 32 KiB: 16 GiB of disk at 64 KiB, 128 MiB at 512 B), and arrays of
//! 4096 chunk pointers (*mids*, 2^30 bits: 64 TiB of disk at 64 KiB, 512 GiB at 512 B). The
//! layers are inline in the log and each holds its first mid (*near*) directly; the other 2047
//! (*far*) hang off a directory allocated when a write first goes past 2^30 granules. So the
//! hook's common case reads three pointers in a row from the log: the near mid, the chunk, the
//! word (before this layout it read eight, and that chain of dependent loads, ahead of the
//! cache miss on the random word, was most of the hook's cost beyond the miss itself). Memory
//! follows the writes; after a chunk exists, a write allocates nothing.
//!
//! Each level keeps a "pending" bitmap of the level below, so folding an empty log is one load
//! and folding a sparse log costs O(pending words): per word of a chunk (64 words after the
//! chunk's data, in the same allocation), per chunk of a mid (beside the mid's pointer array,
//! never on the lines of pointers every writer reads: in the layer for the near mid, in the far
//! mid's header otherwise), per far mid (in the far directory), and in the log one word with
//! bit l for layer l's near mid and bit 32 + l for its far mids.
//!
//! # Ordering argument
//!
//! Writer: `fetch_or` the data word (skipped when its bits are already set), then for each
//! pending level bottom-up: load, and `fetch_or` the bit if it is clear. ([`WriteLog::set`]
//! first tries a straight-line path for a range within one word of an allocated near chunk;
//! it performs exactly these operations in this order, and gives up to the general path,
//! which allocates what is missing, before changing anything.) Folder: `swap(0)` each
//! pending level top-down, descending only where bits were taken, then `swap(0)` the data
//! words. All these operations are `SeqCst`, so they are totally ordered: if the folder's swap
//! of a pending bit comes after the writer's check of it, the folder descends and its later
//! swap of the data word sees the writer's bits; otherwise the writer's checks come after the
//! folder cleared those bits and the writer sets them again, for the next fold. No bit is lost.
//! A writer that skipped the data word saw its bits set: only a folder's swap removes them,
//! and that swap applies them, so the argument holds for them as for bits it set itself.
//! On x86-64 the writer's loads are plain loads and only the data word (and, rarely, a clear
//! pending bit) costs a locked instruction; two threads share no written cache line unless they
//! write near each other.
//!
//! A write concurrent with a fold may be split by it at word boundaries (64 log granules): each
//! granule it marks is applied either before or after the concurrent operation, never lost and
//! never at a wrong place. A write that completed before an operation started is entirely
//! applied before it; one that starts after the operation ended is not applied before it.
//!
//! The disk size used for clamping is an atomic: [`BitmapSet::truncate`](super::BitmapSet)
//! folds, resizes, then publishes the new size. A writer racing with a shrink may log bits past
//! the new end; the fold clamps them to the set's size, and the directory bounds every index,
//! so nothing is ever written out of bounds.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use once_cell::race::OnceBox;

/// log2 of the words in a chunk.
const CHUNK_WORDS_BITS: u32 = 12;
/// Words of log bits per chunk (4096: 2^18 bits, 32 KiB).
const CHUNK_WORDS: usize = 1 << CHUNK_WORDS_BITS;
/// log2 of the chunks in a mid.
const MID_CHUNKS_BITS: u32 = 12;
/// Chunks per mid.
const MID_CHUNKS: usize = 1 << MID_CHUNKS_BITS;
/// Mids per layer: 2^41 bits / 2^18 bits per chunk / 2^12 chunks per mid. Mid 0 is the
/// layer's `near` mid; the others live in its `far` directory.
const LAYER_MIDS: usize = 1 << 11;
/// Smallest layer granularity (log2 of 512 B).
const MIN_GBITS: u32 = 9;
/// Layers: granularities 2^9 .. 2^31.
const LAYERS: usize = 23;
/// `G0` when the set has no bitmap: the hook returns at once.
const NO_GBITS: u32 = u32::MAX;
/// In [`WriteLog::pending`], bit `l` is layer `l`'s near mid, bit `FAR_BIT + l` its far mids.
const FAR_BIT: usize = 32;

/// A chunk, one allocation: words `0..CHUNK_WORDS` are log bits, the 64 words after them their
/// summary (bit w % 64 of word `CHUNK_WORDS + w / 64`: word w may be non-zero).
type Chunk = [AtomicU64; CHUNK_WORDS + CHUNK_WORDS / 64];

/// The chunks of a mid (2^30 bits): a plain pointer array, one allocation. Its summary (bit c
/// % 64 of word c / 64: chunk c may hold bits) is kept by its owner, on lines of its own (the
/// pointers are read by every writer, the summary is written after each fold).
type Chunks = [OnceBox<Chunk>; MID_CHUNKS];

/// Summary of the chunks of a mid.
type ChunkSummary = [AtomicU64; MID_CHUNKS / 64];

/// A mid past the first.
struct FarMid {
    chunks: Box<Chunks>,
    pending: ChunkSummary,
}

/// Mids 1 .. 2048 of a layer (slot 0 stays empty: mid 0 is the layer's `near`).
struct Far {
    mids: Box<[OnceBox<FarMid>; LAYER_MIDS]>,
    /// Bit m % 64 of word m / 64: mid m may hold bits.
    pending: [AtomicU64; LAYER_MIDS / 64],
}

/// The log bits at one granularity, inline in the log: a writer reaches the first 2^30 bits
/// (64 TiB of disk at 64 KiB, 512 GiB at 512 B) in three dependent loads from the log (the
/// near chunks' array, the chunk, the word), the rest through `far`.
#[repr(align(64))]
struct Layer {
    /// Chunks of granules `[0, 2^30)`.
    near: OnceBox<Chunks>,
    /// Granules `[2^30, 2^41)`.
    far: OnceBox<Far>,
    /// Summary of `near`.
    near_pending: ChunkSummary,
}

/// `N` elements built on the heap (no large temporary on the stack, where a writer's thread
/// may have little).
fn boxed<T, const N: usize>(f: impl FnMut(usize) -> T) -> Box<[T; N]> {
    let v: Box<[T]> = (0..N).map(f).collect();
    match v.try_into() {
        Ok(b) => b,
        Err(_) => unreachable!("collected exactly N elements"),
    }
}

fn new_chunk() -> Box<Chunk> {
    boxed(|_| AtomicU64::new(0))
}

fn new_chunks() -> Box<Chunks> {
    boxed(|_| OnceBox::new())
}

/// Sets `bits` in a pending word unless they are set already (a load first: no cache-line
/// ping-pong between writers once they are set).
#[inline(always)]
fn mark(word: &AtomicU64, bits: u64) {
    if word.load(SeqCst) & bits != bits {
        word.fetch_or(bits, SeqCst);
    }
}

/// The summary word and bit of entry `i` of a summarised array.
#[inline(always)]
fn summary_bit(summary: &[AtomicU64], i: usize) -> (&AtomicU64, u64) {
    (&summary[i / 64], 1 << (i % 64))
}

/// Word `wi` of chunk `ci` |= mask, then the word's bit in the chunk's summary, then the
/// chunk's bit in `summary` (the upper levels are the caller's).
fn or_in(chunks: &Chunks, summary: &ChunkSummary, ci: usize, wi: usize, mask: u64) {
    let chunk = chunks[ci].get_or_init(new_chunk);
    mark(&chunk[wi], mask);
    let (word, bit) = summary_bit(&chunk[CHUNK_WORDS..], wi);
    mark(word, bit);
    let (word, bit) = summary_bit(summary, ci);
    mark(word, bit);
}

/// Takes every pending word of a mid (swap(0)), calling `f(word index, bits)` for non-zero
/// ones; `base` is the index of the mid's first word.
fn drain_chunks(chunks: &Chunks, summary: &ChunkSummary, base: u64, f: &mut impl FnMut(u64, u64)) {
    for (pc, pending) in summary.iter().enumerate() {
        let mut taken = pending.swap(0, SeqCst);
        while taken != 0 {
            let ci = pc * 64 + taken.trailing_zeros() as usize;
            taken &= taken - 1;
            let Some(chunk) = chunks[ci].get() else {
                continue;
            };
            let base = base + ((ci as u64) << CHUNK_WORDS_BITS);
            for (pw, pending) in chunk[CHUNK_WORDS..].iter().enumerate() {
                let mut words = pending.swap(0, SeqCst);
                while words != 0 {
                    let wi = pw * 64 + words.trailing_zeros() as usize;
                    words &= words - 1;
                    let bits = chunk[wi].swap(0, SeqCst);
                    if bits != 0 {
                        f(base + wi as u64, bits);
                    }
                }
            }
        }
    }
}

/// Bytes allocated for a mid's chunk array and its chunks.
fn chunks_memory(chunks: &Chunks) -> usize {
    std::mem::size_of::<Chunks>()
        + chunks.iter().filter(|c| c.get().is_some()).count() * std::mem::size_of::<Chunk>()
}

impl Layer {
    const fn new() -> Self {
        Layer {
            near: OnceBox::new(),
            far: OnceBox::new(),
            near_pending: [const { AtomicU64::new(0) }; MID_CHUNKS / 64],
        }
    }

    /// word[w] |= mask, then the pending bits bottom-up up to the layer's own; returns the
    /// log's pending bit for the part of the layer written (relative to the layer: 0 near,
    /// [`FAR_BIT`] far), None if nothing was. Indices past 2^41 bits are dropped (only a
    /// writer holding a stale, finer `G0` can produce them).
    fn or_word(&self, w: u64, mask: u64) -> Option<usize> {
        let wi = (w as usize) & (CHUNK_WORDS - 1);
        let c = w >> CHUNK_WORDS_BITS;
        let ci = (c as usize) & (MID_CHUNKS - 1);
        let mi = c >> MID_CHUNKS_BITS;
        if mi == 0 {
            or_in(
                self.near.get_or_init(new_chunks),
                &self.near_pending,
                ci,
                wi,
                mask,
            );
            return Some(0);
        }
        if mi >= LAYER_MIDS as u64 {
            return None;
        }
        let mi = mi as usize;
        let far = self.far.get_or_init(|| {
            Box::new(Far {
                mids: boxed(|_| OnceBox::new()),
                pending: [const { AtomicU64::new(0) }; LAYER_MIDS / 64],
            })
        });
        let mid = far.mids[mi].get_or_init(|| {
            Box::new(FarMid {
                chunks: new_chunks(),
                pending: [const { AtomicU64::new(0) }; MID_CHUNKS / 64],
            })
        });
        or_in(&mid.chunks, &mid.pending, ci, wi, mask);
        let (word, bit) = summary_bit(&far.pending, mi);
        mark(word, bit);
        Some(FAR_BIT)
    }

    /// Takes every pending word of the near mid (swap(0)), calling `f(word index, bits)`
    /// for non-zero ones.
    fn drain_near(&self, f: &mut impl FnMut(u64, u64)) {
        if let Some(chunks) = self.near.get() {
            drain_chunks(chunks, &self.near_pending, 0, f);
        }
    }

    /// The same for the far mids.
    fn drain_far(&self, f: &mut impl FnMut(u64, u64)) {
        let Some(far) = self.far.get() else {
            return;
        };
        for (pm, pending) in far.pending.iter().enumerate() {
            let mut taken = pending.swap(0, SeqCst);
            while taken != 0 {
                let mi = pm * 64 + taken.trailing_zeros() as usize;
                taken &= taken - 1;
                if let Some(mid) = far.mids[mi].get() {
                    let base = (mi as u64) << (MID_CHUNKS_BITS + CHUNK_WORDS_BITS);
                    drain_chunks(&mid.chunks, &mid.pending, base, f);
                }
            }
        }
    }

    /// Bytes allocated for this layer (beyond the log itself).
    fn memory(&self) -> usize {
        let near = self.near.get().map_or(0, chunks_memory);
        let far = self.far.get().map_or(0, |far| {
            std::mem::size_of::<Far>()
                + std::mem::size_of::<[OnceBox<FarMid>; LAYER_MIDS]>()
                + far
                    .mids
                    .iter()
                    .filter_map(OnceBox::get)
                    .map(|m| std::mem::size_of::<FarMid>() + chunks_memory(&m.chunks))
                    .sum::<usize>()
        });
        near + far
    }
}

/// The shared log of recent guest writes (see the module documentation). Cheap to share:
/// writers call [`WriteLog::set`] from any thread without a lock; only the owning
/// [`BitmapSet`](super::BitmapSet) drains it.
pub struct WriteLog {
    /// Current base granularity (log2), or NO_GBITS.
    gbits: AtomicU32,
    /// Disk size for clamping.
    size: AtomicU64,
    /// Bit l: layer l's near mid may hold bits; bit [`FAR_BIT`] + l: its far mids may.
    pending: AtomicU64,
    /// One per granularity, inline: the near chunks' array is one load from here.
    layers: [Layer; LAYERS],
}

impl fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteLog")
            .field("granularity_bits", &self.granularity_bits())
            .field("size", &self.size())
            .field("pending", &self.has_pending())
            .finish()
    }
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog::new(0)
    }
}

impl WriteLog {
    /// An empty log over `size` bytes that records nothing until a base granularity is set.
    pub fn new(size: u64) -> Self {
        WriteLog {
            gbits: AtomicU32::new(NO_GBITS),
            size: AtomicU64::new(size),
            pending: AtomicU64::new(0),
            layers: [const { Layer::new() }; LAYERS],
        }
    }

    /// The guest write hook: logs `[offset, offset + bytes)` clamped to the disk size, rounded
    /// outward to the base granularity. Lock-free (atomic word operations); allocates only the
    /// first time a 32 KiB chunk of the log is touched. Does nothing while the set has no
    /// bitmap.
    #[inline]
    pub fn set(&self, offset: u64, bytes: u64) {
        if !self.set_fast(offset, bytes) {
            self.set_slow(offset, bytes);
        }
    }

    /// The common case, straight-line code without calls: a range within one log word of a
    /// layer's near mid whose chunk exists. False, having changed nothing, otherwise.
    #[inline(always)]
    fn set_fast(&self, offset: u64, bytes: u64) -> bool {
        let g = self.gbits.load(SeqCst);
        let size = self.size.load(SeqCst);
        if g == NO_GBITS || bytes == 0 || offset >= size {
            return true;
        }
        let last = offset.saturating_add(bytes - 1).min(size - 1);
        let (first, last) = (offset >> g, last >> g);
        let w = first >> 6;
        if w != last >> 6 || w >> (CHUNK_WORDS_BITS + MID_CHUNKS_BITS) != 0 {
            return false;
        }
        let li = (g - MIN_GBITS) as usize;
        let Some(layer) = self.layers.get(li) else {
            return false;
        };
        let Some(chunks) = layer.near.get() else {
            return false;
        };
        let ci = (w >> CHUNK_WORDS_BITS) as usize & (MID_CHUNKS - 1);
        let Some(chunk) = chunks[ci].get() else {
            return false;
        };
        let wi = w as usize & (CHUNK_WORDS - 1);
        mark(
            &chunk[wi],
            (!0u64 << (first & 63)) & (!0u64 >> (63 - (last & 63))),
        );
        mark(&chunk[CHUNK_WORDS + wi / 64], 1 << (wi % 64));
        mark(&layer.near_pending[ci / 64], 1 << (ci % 64));
        mark(&self.pending, 1 << li);
        true
    }

    /// Every other case: several words, the far mids, pieces to allocate (the same steps).
    #[inline(never)]
    fn set_slow(&self, offset: u64, bytes: u64) {
        let g = self.gbits.load(SeqCst);
        if g == NO_GBITS || bytes == 0 {
            return;
        }
        let size = self.size.load(SeqCst);
        if offset >= size {
            return;
        }
        let last = offset.saturating_add(bytes - 1).min(size - 1);
        let li = (g - MIN_GBITS) as usize;
        let Some(layer) = self.layers.get(li) else {
            return;
        };
        let (first, last) = (offset >> g, last >> g);
        let (fw, lw) = (first >> 6, last >> 6);
        let mut parts = 0;
        for w in fw..=lw {
            let lo = if w == fw { first & 63 } else { 0 };
            let hi = if w == lw { last & 63 } else { 63 };
            if let Some(part) = layer.or_word(w, (!0u64 << lo) & (!0u64 >> (63 - hi))) {
                parts |= 1 << (part + li);
            }
        }
        if parts != 0 {
            mark(&self.pending, parts);
        }
    }

    /// Whether some write may be waiting to be folded (one load).
    pub fn has_pending(&self) -> bool {
        self.pending.load(SeqCst) != 0
    }

    /// Takes every logged word out of the log: `f(granularity_bits, word_index, bits)`, where
    /// bit b of `bits` is log granule `word_index * 64 + b` at granularity
    /// `1 << granularity_bits`. O(1) when nothing is pending, else O(pending words). Writers may
    /// run meanwhile: what they log after a word was taken waits for the next drain.
    pub(crate) fn drain(&self, mut f: impl FnMut(u32, u64, u64)) {
        let parts = self.pending.swap(0, SeqCst);
        let mut layers = (parts | parts >> FAR_BIT) & ((1 << LAYERS) - 1);
        while layers != 0 {
            let li = layers.trailing_zeros() as usize;
            layers &= layers - 1;
            let g = li as u32 + MIN_GBITS;
            let layer = &self.layers[li];
            if parts & 1 << li != 0 {
                layer.drain_near(&mut |w, bits| f(g, w, bits));
            }
            if parts & 1 << (FAR_BIT + li) != 0 {
                layer.drain_far(&mut |w, bits| f(g, w, bits));
            }
        }
    }

    /// The base granularity (log2) writers use now; None while nothing is recorded.
    pub fn granularity_bits(&self) -> Option<u32> {
        let g = self.gbits.load(SeqCst);
        (g != NO_GBITS).then_some(g)
    }

    /// Sets the base granularity (log2, clamped to 9..=31); None stops recording. Called by
    /// the set under exclusive access.
    pub(crate) fn set_granularity_bits(&self, g: Option<u32>) {
        let v = g.map_or(NO_GBITS, |g| {
            g.clamp(MIN_GBITS, MIN_GBITS + LAYERS as u32 - 1)
        });
        self.gbits.store(v, SeqCst);
    }

    /// The disk size writes are clamped to.
    pub fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    /// Publishes a new disk size (after the set folded and resized its bitmaps).
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, SeqCst);
    }

    /// Bytes of memory the log holds (allocated pieces; they are kept until the log drops).
    pub fn memory(&self) -> usize {
        std::mem::size_of::<Self>() + self.layers.iter().map(Layer::memory).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(log: &WriteLog) -> Vec<(u32, u64, u64)> {
        let mut v = Vec::new();
        log.drain(|g, w, b| v.push((g, w, b)));
        v
    }

    #[test]
    fn empty_log_records_nothing() {
        let log = WriteLog::new(1 << 30);
        log.set(0, 4096);
        assert!(!log.has_pending());
        assert!(drained(&log).is_empty());
    }

    #[test]
    fn set_rounds_outward_and_clamps() {
        let log = WriteLog::new(1 << 20);
        log.set_granularity_bits(Some(16));
        log.set(65535, 2);
        log.set((1 << 20) - 1, 1 << 30);
        log.set(1 << 20, 1);
        assert!(log.has_pending());
        assert_eq!(drained(&log), vec![(16, 0, 0b11 | 1 << 15)]);
        assert!(!log.has_pending());
        assert!(drained(&log).is_empty());
    }

    #[test]
    fn layers_and_far_chunks() {
        let log = WriteLog::new(u64::MAX);
        log.set_granularity_bits(Some(9));
        log.set(1 << 40, 512);
        log.set_granularity_bits(Some(31));
        log.set(0, 1);
        // Far beyond 2^41 granules at 512 B: dropped, never out of bounds.
        log.set_granularity_bits(Some(9));
        log.set(1 << 62, 512);
        let got = drained(&log);
        assert_eq!(got, vec![(9, (1u64 << 31) / 64, 1), (31, 0, 1)]);
        assert!(log.memory() > 0);
    }

    /// Random ranges at random granularities (near and far mids, one word and many, chunks
    /// allocated or not, so both paths of `set`) drain to exactly the granules a model marks.
    #[test]
    fn set_matches_a_model() {
        use std::collections::BTreeMap;
        let mut rng = Rng(0x5eed);
        let size = 1u64 << 52;
        let log = WriteLog::new(size);
        let mut model: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        let far: Vec<u64> = (0..4).map(|_| rng.below(size)).collect();
        for round in 0..40 {
            for _ in 0..200 {
                let g = [9, 12, 16, 16, 16, 21][rng.below(6) as usize];
                log.set_granularity_bits(Some(g));
                // Near the start, near the 2^30-granule boundary, or anywhere (far).
                let base = match rng.below(3) {
                    0 => 0,
                    1 => ((1u64 << 30) << g).saturating_sub(1 << (g + 8)),
                    _ => far[rng.below(4) as usize],
                };
                let off = (base + rng.below(1 << (g + 9))).min(size - 1);
                let len = match rng.below(3) {
                    0 => 1 + rng.below(1 << g),
                    1 => 1 + rng.below(1 << (g + 7)),
                    _ => 1 + rng.below(1 << (g + 13)),
                };
                log.set(off, len);
                let last = (off + len - 1).min(size - 1);
                for gi in off >> g..=last >> g {
                    if gi >> 41 == 0 {
                        *model.entry((g, gi / 64)).or_default() |= 1 << (gi % 64);
                    }
                }
            }
            if round % 3 == 0 {
                let got: BTreeMap<(u32, u64), u64> = drained(&log)
                    .into_iter()
                    .map(|(g, w, b)| ((g, w), b))
                    .collect();
                assert_eq!(got, std::mem::take(&mut model), "round {round}");
                assert!(!log.has_pending());
            }
        }
        let got: BTreeMap<(u32, u64), u64> = drained(&log)
            .into_iter()
            .map(|(g, w, b)| ((g, w), b))
            .collect();
        assert_eq!(got, model);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let log = std::sync::Arc::new(WriteLog::new(1 << 40));
        log.set_granularity_bits(Some(12));
        let mut seen = vec![0u64; (1 << 16) / 64];
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..(1u64 << 14) {
                        log.set(((i * 4 + t) << 12) % (1 << 28), 4096);
                    }
                });
            }
            for _ in 0..200 {
                log.drain(|_, w, b| seen[w as usize] |= b);
            }
        });
        log.drain(|_, w, b| seen[w as usize] |= b);
        let ones: u32 = seen.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 3 * (1 << 14));
    }

    // ---- The fan-out property: the log-based set equals per-bitmap sets. ----

    use crate::bitmap::{BitmapId, BitmapSet};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn pick(rng: &mut Rng, ids: &[BitmapId]) -> Option<BitmapId> {
        (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize])
    }

    /// Same ids, states and bits.
    fn assert_same(a: &mut BitmapSet, b: &BitmapSet, ctx: &str) {
        a.fold();
        assert_eq!(a.ids(), b.ids(), "{ctx}");
        assert_eq!(a.size(), b.size(), "{ctx}");
        for ia in a.ids() {
            let x = a.current(ia).unwrap();
            let y = b.get_unfolded(ia).unwrap();
            assert_eq!(x.enabled(), y.enabled(), "{ctx} {ia:?}");
            assert_eq!(x.granularity(), y.granularity(), "{ctx} {ia:?}");
            assert_eq!(x.count(), y.count(), "{ctx} {ia:?} count");
            assert_eq!(
                x.sha256().unwrap(),
                y.sha256().unwrap(),
                "{ctx} {ia:?} bits"
            );
        }
    }

    fn fan_out_sequence(seed: u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let size = 512 * (1 + rng.below(1 << 16)) + rng.below(512);
        let mut a = BitmapSet::new(size);
        let mut b = BitmapSet::new(size);
        let hook = a.write_hook();
        for step in 0..400 {
            let ids = b.ids();
            let ctx = format!("seed {seed} step {step}");
            let size = b.size();
            match rng.below(100) {
                0..=54 => {
                    let off = rng.below(size + 4096);
                    let len = match rng.below(4) {
                        0 => 1 + rng.below(512),
                        1 | 2 => 1 + rng.below(256 << 10),
                        _ => 1 + rng.below(size + 1),
                    };
                    hook.set(off, len);
                    b.set_dirty(off, len);
                }
                55..=62 => {
                    let g = 1u64 << (9 + rng.below(12));
                    let name = (rng.below(3) != 0).then(|| format!("b{}", rng.below(8)));
                    let ra = a.create(name.as_deref().map(str::as_bytes), g);
                    let rb = b.create(name.as_deref().map(str::as_bytes), g);
                    assert_eq!(ra.is_ok(), rb.is_ok(), "{ctx}");
                }
                63..=66 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.release(id).is_ok(), b.release(id).is_ok(), "{ctx}");
                    }
                }
                67..=74 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let on = rng.below(2) == 0;
                        let f = |bm: &mut crate::DirtyBitmap| {
                            if on {
                                bm.enable()
                            } else {
                                bm.disable()
                            }
                        };
                        let ra = f(a.bitmap_mut(id).unwrap()).is_ok();
                        let rb = f(b.bitmap_mut(id).unwrap()).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                75..=77 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.bitmap_mut(id).unwrap().clear().is_ok();
                        let rb = b.bitmap_mut(id).unwrap().clear().is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                78..=82 => {
                    if let (Some(t), Some(s)) = (pick(&mut rng, &ids), pick(&mut rng, &ids)) {
                        let sa = a.current(s).unwrap().clone();
                        let sb = b.current(s).unwrap().clone();
                        let ra = a.merge(t, &sa, false).is_ok();
                        let rb = b.merge(t, &sb, false).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                83..=86 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.create_successor(id).is_ok();
                        let rb = b.create_successor(id).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                87..=89 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.abdicate(id).is_ok(), b.abdicate(id).is_ok(), "{ctx}");
                    }
                }
                90..=92 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.reclaim(id).is_ok(), b.reclaim(id).is_ok(), "{ctx}");
                    }
                }
                93 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.enable_successor(id).is_ok();
                        let rb = b.enable_successor(id).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                94..=95 => {
                    let n = 512 * (1 + rng.below(1 << 16)) + rng.below(512);
                    assert_eq!(a.truncate(n).is_ok(), b.truncate(n).is_ok(), "{ctx}");
                }
                96 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ro = rng.below(2) == 0;
                        a.bitmap_mut(id).unwrap().set_readonly(ro);
                        b.bitmap_mut(id).unwrap().set_readonly(ro);
                    }
                }
                97 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        for s in [&mut a, &mut b] {
                            let bm = s.bitmap_mut(id).unwrap();
                            bm.set_persistence(true);
                            bm.set_inconsistent().unwrap();
                        }
                    }
                }
                _ => assert_same(&mut a, &b, &ctx),
            }
        }
        assert_same(&mut a, &b, &format!("seed {seed} end"));
    }

    #[test]
    fn fan_out_matches_per_bitmap_sets() {
        for seed in 1..=150 {
            fan_out_sequence(seed);
        }
    }

    // ---- Concurrency stress: writers on the hook while a manager works under the lock. ----

    #[test]
    fn stress_hook_with_management() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};

        const SIZE: u64 = 1 << 30;
        const WRITERS: u64 = 3;
        const WRITES: u64 = 20_000;
        let mut set = BitmapSet::new(SIZE);
        let all = set.create(Some(b"all"), 4096).unwrap();
        let t = set.create(Some(b"t"), 65536).unwrap();
        let m = set.create(Some(b"m"), 4096).unwrap();
        set.bitmap_mut(m).unwrap().disable().unwrap();
        let hook = set.write_hook();
        let set = Arc::new(Mutex::new(set));
        // Even: stable; odd: a management call is changing things.
        let version = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));

        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (hook, version) = (Arc::clone(&hook), Arc::clone(&version));
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234_5678 + w * 77);
                    let mut log = Vec::with_capacity(WRITES as usize);
                    for _ in 0..WRITES {
                        let off = rng.below(SIZE / 512) * 512 + rng.below(2) * 100;
                        let len = 1 + rng.below(64 << 10);
                        let v1 = version.load(SeqCst);
                        hook.set(off, len);
                        let v2 = version.load(SeqCst);
                        log.push((off, len, v1, v2));
                    }
                    log
                })
            })
            .collect();

        let manager = {
            let (set, version, done) = (Arc::clone(&set), Arc::clone(&version), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut rng = Rng(99);
                // t's state in each stable period (index version / 2).
                let mut t_on = vec![true];
                let mut temp: Vec<BitmapId> = Vec::new();
                while !done.load(SeqCst) {
                    let mut s = set.lock().unwrap();
                    version.fetch_add(1, SeqCst);
                    s.fold();
                    match rng.below(6) {
                        0 => {
                            let on = !s.get(t).unwrap().enabled();
                            let bm = s.bitmap_mut(t).unwrap();
                            if on {
                                bm.enable().unwrap();
                            } else {
                                bm.disable().unwrap();
                            }
                        }
                        1 => {
                            let g = 1u64 << (9 + rng.below(12));
                            temp.push(s.create(None, g).unwrap());
                        }
                        2 => {
                            if let Some(id) = temp.pop() {
                                s.release(id).unwrap();
                            }
                        }
                        3 => {
                            let src = s.current(all).unwrap().clone();
                            s.bitmap_mut(m).unwrap().set_enabled_unchecked(true);
                            s.merge(m, &src, false).unwrap();
                            s.bitmap_mut(m).unwrap().set_enabled_unchecked(false);
                        }
                        4 => {
                            let mut it = s.iter_new(all).unwrap();
                            for _ in 0..32 {
                                if s.iter_next(&mut it).is_none() {
                                    break;
                                }
                            }
                            s.iter_free(it);
                        }
                        _ => {
                            let q = s.query().unwrap();
                            assert!(q.iter().all(|i| i.count <= SIZE));
                        }
                    }
                    t_on.push(s.get(t).unwrap().enabled());
                    version.fetch_add(1, SeqCst);
                    drop(s);
                    std::thread::yield_now();
                }
                t_on
            })
        };

        let logs: Vec<Vec<(u64, u64, u64, u64)>> =
            writers.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, SeqCst);
        let t_on = manager.join().unwrap();
        let mut s = set.lock().unwrap();
        s.fold();

        let mut granules = vec![0u64; (SIZE / 4096 / 64) as usize];
        let (mut checked_t, mut spans) = (0, 0);
        for &(off, len, v1, v2) in logs.iter().flatten() {
            let end = (off + len).min(SIZE);
            assert_eq!(
                s.current(all).unwrap().next_zero(off, end - off),
                None,
                "write lost"
            );
            for g in off / 4096..=(end - 1) / 4096 {
                granules[(g / 64) as usize] |= 1 << (g % 64);
            }
            if v1 == v2 && v1 % 2 == 0 && t_on[(v1 / 2) as usize] {
                checked_t += 1;
                let z = s.current(t).unwrap().next_zero(off, end - off);
                assert_eq!(z, None, "write lost in t");
            }
            spans += u64::from(v1 != v2);
        }
        let distinct: u64 = granules.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            s.current(all).unwrap().count(),
            distinct * 4096,
            "extra bits"
        );
        assert!(checked_t > 0);
        eprintln!(
            "stress: {} writes, {} spanning a management call, {} checked in t, {} versions",
            logs.iter().map(Vec::len).sum::<usize>(),
            spans,
            checked_t,
            t_on.len()
        );
    }
}
