//! QEMU's serialization layout (little-endian 64-bit words): serialize and deserialize
//! ranges, bulk word loads and stores, and the SHA-256 of the bottom level.

use super::chunk::{Part, Sparse, GROUPS, SPARSE_MAX};
use super::{words_for, HBitmap, CHUNK_WORDS};
use crate::bitmap::sha256::{to_hex, Sha256};

/// All-zero and all-one bytes of one chunk, fed to SHA-256 for chunks without storage.
static ZERO_BYTES: [u8; CHUNK_WORDS * 8] = [0; CHUNK_WORDS * 8];
static ONE_BYTES: [u8; CHUNK_WORDS * 8] = [0xff; CHUNK_WORDS * 8];

/// The 8 little-endian words of a 64-byte block.
#[inline(always)]
fn block_words(block: &[u8]) -> [u64; 8] {
    let mut w = [0u64; 8];
    for (d, b) in w.iter_mut().zip(block.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *d = u64::from_le_bytes(a);
    }
    w
}

/// ORs (and with `AND`, ANDs) the words of every 64-byte block into `or` / `and`, and answers
/// which blocks hold a set bit (bit `i` for block `i`; at most 128 blocks). No data-dependent
/// branch: the loop keeps its words in registers.
#[inline(always)]
fn scan_blocks<const AND: bool>(
    blocks: std::slice::ChunksExact<'_, u8>,
    or: &mut u64,
    and: &mut u64,
) -> u128 {
    let mut nonzero = [0u64; 2];
    let (mut o, mut a) = (*or, *and);
    for (bi, block) in blocks.enumerate() {
        let w = block_words(block);
        let block_or = w.iter().fold(0, |x, &v| x | v);
        o |= block_or;
        if AND {
            a &= w.iter().fold(!0, |x, &v| x & v);
        }
        nonzero[(bi >> 6) & 1] |= u64::from(block_or != 0) << (bi & 63);
    }
    (*or, *and) = (o, a);
    u128::from(nonzero[0]) | u128::from(nonzero[1]) << 64
}

/// Whether every byte of `bytes` is 0xff. One pass that ANDs each 64-byte block into eight
/// accumulators, with no branch per block: the compiler turns it into one vector load and AND
/// per 16 bytes, half the loads of a comparison against a constant (which loads both sides),
/// and a full bitmap's load spends most of its time outside the kernel's copy here.
fn all_ones(bytes: &[u8]) -> bool {
    let blocks = bytes.chunks_exact(64);
    let tail_ones = blocks.remainder().iter().all(|&b| b == 0xff);
    let mut acc = [!0u64; 8];
    for block in blocks {
        for (a, w) in acc.iter_mut().zip(block_words(block)) {
            *a &= w;
        }
    }
    tail_ones && acc.iter().fold(!0, |x, &v| x & v) == !0
}

impl HBitmap {
    /// 64 granules in bytes: every serialization chunk starts at a multiple of this.
    /// (Saturates at u64::MAX for granularities of 2^58 bytes and more, which QEMU cannot
    /// serialize either.)
    pub fn serialization_align(&self) -> u64 {
        1u64.checked_shl(self.granularity_bits + 6)
            .unwrap_or(u64::MAX)
    }

    /// Bottom words [first, last] spanned by [start, start + bytes), not clamped to the size.
    fn word_span(&self, start: u64, bytes: u64) -> Option<(u64, u64)> {
        if bytes == 0 {
            return None;
        }
        let first = (start >> self.granularity_bits) >> 6;
        let last = (start.saturating_add(bytes - 1) >> self.granularity_bits) >> 6;
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
            match self.chunks.get(c) {
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
        // A whole chunk of all-ones bytes (a full bitmap's chunks), tried only when the first
        // and last words are all ones: see `all_ones`.
        let whole_chunk =
            lo == 0 && nw == CHUNK_WORDS && cap_words == CHUNK_WORDS && tail_mask == !0;
        if whole_chunk
            && src[..8] == [0xff; 8]
            && src[src.len() - 8..] == [0xff; 8]
            && all_ones(src)
        {
            self.fill_chunk(c, 0, cap - 1, true);
            return;
        }
        // A clean or sparse chunk that stays within SPARSE_MAX words is built as a sparse
        // one straight from the incoming words (no 8 KiB chunk allocated or touched).
        let whole = lo == 0 && hi == cap_words;
        let try_sparse = whole || !self.chunks.is_some(c);
        let kept = match self.sp(c) {
            _ if !try_sparse => None,
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
        let limit = SPARSE_MAX.saturating_sub(kept.unwrap_or(SPARSE_MAX));
        // The words' OR and AND (to classify the chunk; the last word of the bitmap is compared
        // to its mask separately) and, while a sparse result is still possible, the non-zero
        // words. A block of 8 words with a set word has all its words written out and the
        // count advanced past the non-zero ones, without a branch per word. Up to 7 words past
        // `limit` land in the spare room of the arrays before the block's end shows the chunk
        // does not fit.
        let body = if hi == cap_words { nw - 1 } else { nw };
        let (mut or, mut and) = (0u64, !0u64);
        let mut at = [0u16; SPARSE_MAX + 8];
        let mut val = [0u64; SPARSE_MAX + 8];
        let mut nz = 0usize;
        let mut collect = kept.is_some();
        let blocks = src[..body * 8].chunks_exact(64);
        let rest = body - blocks.remainder().len() / 8;
        // First the blocks' OR and AND, and which blocks hold a set bit (a chunk has at most
        // 128 blocks): a loop with no data-dependent branch. Then the words of those blocks
        // only, while a sparse result is possible.
        let mut nonzero: u128 = if whole_chunk {
            // Not all ones (tested above): no AND.
            and = 0;
            scan_blocks::<false>(blocks, &mut or, &mut and)
        } else {
            scan_blocks::<true>(blocks, &mut or, &mut and)
        };
        while collect && nonzero != 0 {
            let bi = nonzero.trailing_zeros() as usize;
            nonzero &= nonzero - 1;
            let w = block_words(&src[bi * 64..bi * 64 + 64]);
            for (k, &v) in w.iter().enumerate() {
                at[nz] = (lo + bi * 8 + k) as u16;
                val[nz] = v;
                nz += usize::from(v != 0);
            }
            collect = nz <= limit;
        }
        let mut ones = and == !0;
        for i in rest..nw {
            let v = word(i);
            or |= v;
            if i < body {
                ones &= v == !0;
            } else {
                ones &= v == tail_mask;
            }
            if collect && v != 0 {
                at[nz] = (lo + i) as u16;
                val[nz] = v;
                nz += 1;
                collect = nz <= limit;
            }
        }
        let zeros = or == 0;
        let fits = collect;
        if !(zeros || (whole && ones)) && try_sparse {
            if let Some(kept) = kept.filter(|_| fits) {
                let old = self.chunk_dirty(c);
                self.chunks.take(c);
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
                for (&i, &v) in at[..nz].iter().zip(&val[..nz]) {
                    count += v.count_ones();
                    entries.push((i, v));
                }
                for e in pending.into_iter().chain(rest) {
                    if usize::from(e.0) >= hi {
                        count += e.1.count_ones();
                        entries.push(e);
                    }
                }
                self.put_sparse(c, Box::new(Sparse::new(entries, count)));
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
            let mut p = self.chunks.take(c).unwrap_or_else(Part::zeroed);
            for (d, s) in p.words[..nw].iter_mut().zip(src.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                *d = u64::from_le_bytes(a);
            }
            p.words[nw - 1] &= tail_mask;
            // Words past the capacity are zero already (fresh, or canonical storage).
            p.resummarize_groups(0, GROUPS);
            self.dirty = self.dirty - old + u64::from(p.count);
            self.chunks.put(c, p);
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
            match self.chunks.get(c) {
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
        for c in 0..self.chunks.len() {
            let first = c as u64 * CHUNK_WORDS as u64;
            if first >= total {
                break;
            }
            let n = (total - first).min(CHUNK_WORDS as u64) as usize;
            match (self.chunks.get(c), self.sp(c)) {
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
