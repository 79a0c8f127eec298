//! The hierarchical bitmap engine (our own design after QEMU's HBitmap idea).
//!
//! STUB: signatures are the contract; bodies are being written.
//!
//! Items are bytes of the virtual disk. One bit of the bottom level covers `1 << granularity_bits`
//! bytes (a granule). Callers (crate::bitmap::DirtyBitmap) validate arguments before calling; the
//! engine clamps ranges to the size and never panics on any input combination.

/// Largest number of granules a bitmap may track (2^41, as QEMU's HBitmap on 64-bit hosts).
pub const MAX_GRANULES: u64 = 1 << 41;

/// A hierarchical dirty bitmap over `size` bytes.
#[derive(Clone, Debug)]
pub struct HBitmap {
    _todo: (),
}

impl HBitmap {
    /// A clean bitmap of `size` bytes with granules of `1 << granularity_bits` bytes.
    /// `granularity_bits` < 64 and ceil(size / granule) <= MAX_GRANULES (checked by the caller).
    pub fn new(size: u64, granularity_bits: u32) -> Self {
        let _ = (size, granularity_bits);
        todo!()
    }
    /// Covered length in bytes.
    pub fn size(&self) -> u64 {
        todo!()
    }
    /// log2 of the granularity.
    pub fn granularity_bits(&self) -> u32 {
        todo!()
    }
    /// Number of granules: ceil(size / granularity).
    pub fn granules(&self) -> u64 {
        todo!()
    }
    /// Number of dirty granules (O(1)).
    pub fn dirty_granules(&self) -> u64 {
        todo!()
    }
    /// Dirty granules times granularity, in bytes (may exceed size by less than a granule). O(1).
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        todo!()
    }
    /// Sets every granule that intersects [start, start + bytes) (rounded outward), clamped to size.
    pub fn set(&mut self, start: u64, bytes: u64) {
        let _ = (start, bytes);
        todo!()
    }
    /// Clears every granule that intersects [start, start + bytes), clamped to size.
    /// (Alignment is checked by the caller.)
    pub fn reset(&mut self, start: u64, bytes: u64) {
        let _ = (start, bytes);
        todo!()
    }
    /// Clears everything.
    pub fn reset_all(&mut self) {
        todo!()
    }
    /// Whether the granule containing byte `offset` is dirty (false beyond the end).
    pub fn get(&self, offset: u64) -> bool {
        let _ = offset;
        todo!()
    }
    /// First dirty byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_dirty(&self, start: u64, bytes: u64) -> Option<u64> {
        let _ = (start, bytes);
        todo!()
    }
    /// First clean byte offset in [start, min(start + bytes, size)), as max(start, granule start).
    pub fn next_zero(&self, start: u64, bytes: u64) -> Option<u64> {
        let _ = (start, bytes);
        todo!()
    }
    /// QEMU's next_dirty_area: the first dirty run in [start, min(end, size)), at most
    /// `max_bytes` long, as (offset, length).
    pub fn next_dirty_area(&self, start: u64, end: u64, max_bytes: u64) -> Option<(u64, u64)> {
        let _ = (start, end, max_bytes);
        todo!()
    }
    /// Dirty state at `start` and the length of the run with that state, capped at `bytes`
    /// and at the end of the bitmap.
    pub fn status(&self, start: u64, bytes: u64) -> (bool, u64) {
        let _ = (start, bytes);
        todo!()
    }
    /// self |= other. Sizes are equal (checked by the caller); granularities may differ: a
    /// coarser destination rounds outward.
    pub fn merge_from(&mut self, other: &HBitmap) {
        let _ = other;
        todo!()
    }
    /// Resizes to `new_size` bytes: new granules are clean; granules entirely beyond the new end
    /// are dropped.
    pub fn truncate(&mut self, new_size: u64) {
        let _ = new_size;
        todo!()
    }
    /// 64 granules in bytes: every serialization chunk starts at a multiple of this.
    pub fn serialization_align(&self) -> u64 {
        todo!()
    }
    /// Bytes needed to serialize [start, start + bytes): whole 64-bit words spanned.
    pub fn serialization_size(&self, start: u64, bytes: u64) -> u64 {
        let _ = (start, bytes);
        todo!()
    }
    /// Writes the granules of [start, start + bytes) into `buf` in QEMU's layout: little-endian
    /// 64-bit words, granule k of the chunk is bit k % 8 of byte k / 8. `buf.len()` >=
    /// serialization_size. Bits past the end of the bitmap are written as zero.
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, bytes: u64) {
        let _ = (buf, start, bytes);
        todo!()
    }
    /// Overwrites the words spanned by [start, start + bytes) from `buf` (QEMU layout). Bits past
    /// the end of the bitmap are masked off. Summaries and count are stale until
    /// `deserialize_finish`.
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, bytes: u64) {
        let _ = (buf, start, bytes);
        todo!()
    }
    /// Fills the words spanned by [start, start + bytes) with zeros (summaries stale until finish).
    pub fn deserialize_zeroes(&mut self, start: u64, bytes: u64) {
        let _ = (start, bytes);
        todo!()
    }
    /// Fills the words spanned by [start, start + bytes) with ones, masked to the end of the
    /// bitmap (summaries stale until finish).
    pub fn deserialize_ones(&mut self, start: u64, bytes: u64) {
        let _ = (start, bytes);
        todo!()
    }
    /// Rebuilds summaries and the count after deserialize_* calls.
    pub fn deserialize_finish(&mut self) {
        todo!()
    }
    /// SHA-256 (lowercase hex) of the bottom level as little-endian 64-bit words, at least one
    /// word: equal to QEMU's `x-debug-block-dirty-bitmap-sha256` on x86_64.
    pub fn sha256_hex(&self) -> String {
        todo!()
    }
}
