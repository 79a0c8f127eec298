//! The in-memory dirty bitmap: QEMU's `BdrvDirtyBitmap` state model over a hierarchical bitmap
//! engine.
//!
//! No I/O here. A [`DirtyBitmap`] knows its name, granularity, covered size and QEMU's state flags
//! (disabled, busy, readonly, persistent, inconsistent, skip_store); the checks and messages are
//! QEMU's (`bdrv_dirty_bitmap_check`, `block-dirty-bitmap-*`).
#![deny(unsafe_code)]

mod epoch;
mod hbitmap;
mod log;
mod set;
mod slots;
// The hash is public for the benchmarks (benches/engine.rs) only.
#[doc(hidden)]
pub mod sha256;

pub(crate) use bits::LazySource;
pub use hbitmap::DirtyRuns;
// The engine is public for the benchmarks (benches/engine.rs) only.
#[doc(hidden)]
pub use hbitmap::HBitmap;

mod bits;
mod touched;
mod zones;
use bits::Bits;
pub use log::WriteLog;
pub use set::{BitmapId, BitmapInfo, BitmapSet, DirtyIter};
use touched::Touched;
pub use view::StateView;
pub use zones::{ZoneTracker, DEFAULT_ZONE_BYTES, MAX_ZONES, MIN_ZONE_BYTES};

mod view;

use crate::error::{Error, Result};
use crate::format::{BME_MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE, BME_MIN_GRANULARITY_BITS};

/// Check flag: refuse busy bitmaps. QEMU: BDRV_BITMAP_BUSY.
pub const CHECK_BUSY: u32 = 1;
/// Check flag: refuse readonly bitmaps. QEMU: BDRV_BITMAP_RO.
pub const CHECK_RO: u32 = 2;
/// Check flag: refuse inconsistent bitmaps. QEMU: BDRV_BITMAP_INCONSISTENT.
pub const CHECK_INCONSISTENT: u32 = 4;
/// Checks for operations that change bits. QEMU: BDRV_BITMAP_DEFAULT.
pub const CHECK_DEFAULT: u32 = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT;
/// Checks for operations that only change state or read. QEMU: BDRV_BITMAP_ALLOW_RO.
pub const CHECK_ALLOW_RO: u32 = CHECK_BUSY | CHECK_INCONSISTENT;

/// Smallest granularity in bytes (512). QEMU: BME_MIN_GRANULARITY_BITS.
pub const MIN_GRANULARITY: u64 = 1 << BME_MIN_GRANULARITY_BITS;
/// Largest granularity in bytes (2 GiB). QEMU: BME_MAX_GRANULARITY_BITS.
pub const MAX_GRANULARITY: u64 = 1 << BME_MAX_GRANULARITY_BITS;

/// Checks a bitmap name the way `block-dirty-bitmap-add` does (1..=1023 bytes, no NUL).
pub(crate) fn validate_name(name: &[u8]) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
    }
    if name.len() > BME_MAX_NAME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "Bitmap name too long: {} bytes (maximum {BME_MAX_NAME_SIZE})",
            name.len()
        )));
    }
    if name.contains(&0) {
        return Err(Error::InvalidArgument(
            "Bitmap name must not contain NUL bytes".into(),
        ));
    }
    Ok(())
}

/// Checks a granularity: a power of two from 512 B to 2 GiB. Returns its log2.
pub(crate) fn validate_granularity(granularity: u64) -> Result<u32> {
    if !granularity.is_power_of_two() || granularity < MIN_GRANULARITY {
        return Err(Error::InvalidArgument(format!(
            "Granularity must be power of 2 and at least 512 (got {granularity})"
        )));
    }
    if granularity > MAX_GRANULARITY {
        return Err(Error::InvalidArgument(format!(
            "Granularity exceeds maximum ({MAX_GRANULARITY} bytes) (got {granularity})"
        )));
    }
    Ok(granularity.trailing_zeros())
}

/// A dirty bitmap with QEMU's state flags.
///
/// Its bits are either in memory or, for a bitmap opened from an image and not touched yet,
/// still on disk (lazy loading, see `bits.rs`): every access to the bits goes through
/// an internal reader (`bits`, loads on first use) or an internal `&mut` accessor
/// (changers, loads first and records which data clusters change), so stale bits cannot be
/// read. A clone is always loaded.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: Option<Vec<u8>>,
    /// Covered length in bytes (the engine's size, except for bitmaps loaded inconsistent,
    /// whose engine is left empty so that they cost no memory).
    size: u64,
    /// log2 of the granularity.
    granularity_bits: u32,
    bits: Bits,
    /// Which data clusters of the stored copy changed since it was loaded or stored (None: no
    /// stored copy known; the next store writes everything).
    touched: Option<Touched>,
    disabled: bool,
    busy: bool,
    readonly: bool,
    persistent: bool,
    inconsistent: bool,
    skip_store: bool,
    /// The successor that records writes while an operation holds this bitmap.
    successor: Option<BitmapId>,
    /// Live iterators (they block release and truncate).
    active_iterators: u32,
    /// The end of the furthest guest write this bitmap recorded that went past its end (0:
    /// none): the part past the end is in no bit. Growing the bitmap marks the new space up
    /// to here dirty ([`DirtyBitmap::truncate`]).
    past_end: u64,
}

/// The bits of a bitmap taken away by [`DirtyBitmap::clear_with_backup`] or
/// [`DirtyBitmap::merge_with_backup`], to be given back by [`DirtyBitmap::restore`].
#[derive(Clone, Debug)]
pub struct Backup(HBitmap);

impl DirtyBitmap {
    /// A new enabled, empty, transient bitmap over `size` bytes (QEMU: bdrv_create_dirty_bitmap).
    /// `name` None makes an anonymous bitmap. Granularity: a power of two from 512 B to 2 GiB.
    pub fn new(name: Option<&[u8]>, size: u64, granularity: u64) -> Result<Self> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        let granularity_bits = validate_granularity(granularity)?;
        let granules = size.div_ceil(granularity);
        if granules > hbitmap::MAX_GRANULES {
            return Err(Error::TooBig(format!(
                "Bitmap of {size} bytes at granularity {granularity} needs {granules} bits; the \
                 maximum is {}",
                hbitmap::MAX_GRANULES
            )));
        }
        Ok(DirtyBitmap {
            name: name.map(<[u8]>::to_vec),
            size,
            granularity_bits,
            bits: Bits::Loaded(HBitmap::new(size, granularity_bits)),
            touched: None,
            disabled: false,
            busy: false,
            readonly: false,
            persistent: false,
            inconsistent: false,
            skip_store: false,
            successor: None,
            active_iterators: 0,
            past_end: 0,
        })
    }

    /// A bitmap whose name comes from an image's directory: QEMU accepts any bytes there on load
    /// (even an empty name), so only the granularity and size are checked.
    pub(crate) fn with_unchecked_name(name: Vec<u8>, size: u64, granularity: u64) -> Result<Self> {
        let mut bm = Self::new(None, size, granularity)?;
        bm.name = Some(name);
        Ok(bm)
    }

    /// A bitmap found in_use in an image: persistent, disabled, inconsistent, with no content.
    /// Its bits are never allocated (they cannot be used), whatever the size.
    pub(crate) fn new_inconsistent(name: Vec<u8>, size: u64, granularity: u64) -> Result<Self> {
        let mut bm = Self::with_unchecked_name(name, 0, granularity)?;
        bm.size = size;
        bm.persistent = true;
        bm.inconsistent = true;
        bm.disabled = true;
        Ok(bm)
    }

    /// Bytes of heap the bits hold: the engine's chunks, summaries and tables, or for a bitmap
    /// whose data is still on disk the writes waiting for it. Follows the dirt: a clean or fully
    /// dirty bitmap of any size holds a few KiB. O(chunks in use).
    pub fn memory(&self) -> usize {
        self.bits.heap_bytes()
    }

    /// The name (None for anonymous bitmaps).
    pub fn name(&self) -> Option<&[u8]> {
        self.name.as_deref()
    }

    /// The name for messages ("(null)" for anonymous bitmaps, as glib prints it).
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => String::from_utf8_lossy(n).into_owned(),
            None => "(null)".into(),
        }
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// log2 of the granularity.
    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// Covered length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether guest writes are recorded (QEMU: bdrv_dirty_bitmap_enabled).
    pub fn enabled(&self) -> bool {
        !self.disabled
    }

    /// The successor, while an operation holds the bitmap (see [`BitmapSet::create_successor`]).
    pub fn successor(&self) -> Option<BitmapId> {
        self.successor
    }

    /// Whether a successor exists (QEMU: bdrv_dirty_bitmap_has_successor).
    pub fn has_successor(&self) -> bool {
        self.successor.is_some()
    }

    pub(crate) fn set_successor(&mut self, s: Option<BitmapId>) {
        self.successor = s;
    }

    /// Number of live iterators.
    pub fn active_iterators(&self) -> u32 {
        self.active_iterators
    }

    pub(crate) fn add_iterator(&mut self, delta: i32) {
        self.active_iterators = self.active_iterators.saturating_add_signed(delta);
    }

    /// The skip_store flag.
    pub fn skip_store(&self) -> bool {
        self.skip_store
    }

    /// The raw persistent flag (QEMU: `BdrvDirtyBitmap.persistent`), whatever skip_store says.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Whether the next store (close, checkpoint, reopen read-only) writes the bitmap to the
    /// image: persistent && !skip_store (QEMU: bdrv_dirty_bitmap_get_persistence).
    pub fn will_be_stored(&self) -> bool {
        self.persistent && !self.skip_store
    }

    /// Whether the bitmap was found in_use on open, or marked inconsistent: unusable except
    /// for removal. (A bitmap whose data cannot be read at the moment is not inconsistent: the
    /// call that needed the data fails, and the next use reads it again.)
    pub fn inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Whether the bitmap belongs to an image that cannot be written.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether an operation holds the bitmap.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// QEMU: bdrv_dirty_bitmap_check. Runs BUSY, then RO, then INCONSISTENT, as requested.
    pub fn check(&self, flags: u32) -> Result<()> {
        let name = || self.display_name();
        if flags & CHECK_BUSY != 0 && self.busy {
            return Err(Error::Busy { name: name() });
        }
        if flags & CHECK_RO != 0 && self.readonly {
            return Err(Error::ReadOnlyBitmap { name: name() });
        }
        if flags & CHECK_INCONSISTENT != 0 && self.inconsistent() {
            return Err(Error::Inconsistent { name: name() });
        }
        Ok(())
    }

    /// Sets persistence (QEMU: bdrv_dirty_bitmap_set_persistence).
    pub fn set_persistence(&mut self, persistent: bool) {
        self.persistent = persistent;
    }

    /// Sets the readonly flag (QEMU: bdrv_dirty_bitmap_set_readonly).
    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly = readonly;
    }

    /// Sets the busy flag (QEMU: bdrv_dirty_bitmap_set_busy).
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// Sets skip_store (QEMU: bdrv_dirty_bitmap_skip_store).
    pub fn set_skip_store(&mut self, skip: bool) {
        self.skip_store = skip;
    }

    /// Marks the bitmap inconsistent, which also disables it (QEMU:
    /// bdrv_dirty_bitmap_set_inconsistent). Only persistent bitmaps can be inconsistent.
    pub fn set_inconsistent(&mut self) -> Result<()> {
        if !self.persistent {
            return Err(Error::Precondition(format!(
                "Bitmap '{}' is not persistent and cannot be marked inconsistent",
                self.display_name()
            )));
        }
        self.inconsistent = true;
        self.disabled = true;
        Ok(())
    }

    /// Enables recording with QMP's checks (ALLOW_RO).
    pub fn enable(&mut self) -> Result<()> {
        self.check(CHECK_ALLOW_RO)?;
        self.disabled = false;
        Ok(())
    }

    /// Disables recording with QMP's checks (ALLOW_RO).
    pub fn disable(&mut self) -> Result<()> {
        self.check(CHECK_ALLOW_RO)?;
        self.disabled = true;
        Ok(())
    }

    /// Sets the enabled state without checks (QEMU: bdrv_enable/disable_dirty_bitmap).
    pub(crate) fn set_enabled_unchecked(&mut self, enabled: bool) {
        self.disabled = !enabled;
    }

    fn check_range(&self, what: &str, offset: u64, bytes: u64) -> Result<()> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::Precondition(format!(
                "Bitmap '{}': {what} range [{offset}, +{bytes}) is beyond its size {}",
                self.display_name(),
                self.size()
            ))),
        }
    }

    /// Marks [offset, offset + bytes) dirty, rounded outward to granules (QEMU:
    /// bdrv_set_dirty_bitmap). Works on disabled bitmaps. Refused on readonly and inconsistent
    /// bitmaps and for ranges beyond the end.
    pub fn set_dirty(&mut self, offset: u64, bytes: u64) -> Result<()> {
        self.check(CHECK_RO | CHECK_INCONSISTENT)?;
        self.check_range("set", offset, bytes)?;
        self.mark_write(offset, bytes);
        Ok(())
    }

    /// Clears [offset, offset + bytes) (QEMU: bdrv_reset_dirty_bitmap). `offset` must be a
    /// multiple of the granularity, and `bytes` too unless the range ends at the bitmap's end.
    pub fn reset_dirty(&mut self, offset: u64, bytes: u64) -> Result<()> {
        self.check(CHECK_RO | CHECK_INCONSISTENT)?;
        self.check_range("reset", offset, bytes)?;
        let g = self.granularity();
        if offset % g != 0 {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': reset offset {offset} is not a multiple of the granularity {g}",
                self.display_name()
            )));
        }
        if bytes % g != 0 && offset + bytes != self.size() {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': reset length {bytes} is not a multiple of the granularity {g} and \
                 does not reach the end of the bitmap",
                self.display_name()
            )));
        }
        // A reset of whole chunks frees their storage: count what it gives back (a smaller
        // one frees little, and is not worth the count).
        let large = bytes >> self.granularity_bits >= hbitmap::CHUNK_GRANULES;
        let bits = self.data_mut()?;
        let before = if large { bits.heap_bytes() } else { 0 };
        bits.reset(offset, bytes);
        if large {
            crate::sys::freed(before.saturating_sub(bits.heap_bytes()));
        }
        self.touch(offset, bytes);
        Ok(())
    }

    /// Clears every bit with QMP's checks (DEFAULT) (QEMU: block-dirty-bitmap-clear).
    pub fn clear(&mut self) -> Result<()> {
        self.check(CHECK_DEFAULT)?;
        let bits = self.data_mut()?;
        let before = bits.heap_bytes();
        bits.reset_all();
        crate::sys::freed(before.saturating_sub(bits.heap_bytes()));
        self.touch_all();
        Ok(())
    }

    /// The bits for the infallible readers, or None when the bitmap is unusable: inconsistent,
    /// or its data could not be read now (a warning names the bitmap and the error). Those
    /// readers then answer "every granule dirty": a wrong "clean" would be a silently
    /// incomplete backup, an "all dirty" only a full one.
    #[inline]
    fn readable(&self) -> Option<&HBitmap> {
        if self.inconsistent {
            return None;
        }
        match self.bits.try_get(self.size, self.granularity_bits) {
            Ok(h) => Some(h),
            Err(e) => {
                crate::warning::warn(&format!(
                    "Bitmap '{}' reads as entirely dirty: {e}",
                    self.display_name()
                ));
                None
            }
        }
    }

    /// The bits for readers that can fail: QEMU's "inconsistent" error for an inconsistent
    /// bitmap, the read error (naming the bitmap and the offset) when its data cannot be read.
    pub(crate) fn usable_bits(&self) -> Result<&HBitmap> {
        if self.inconsistent {
            return Err(Error::Inconsistent {
                name: self.display_name(),
            });
        }
        self.bits.try_get(self.size, self.granularity_bits)
    }

    /// Whether the granule containing `offset` is dirty (false beyond the end). An unusable
    /// bitmap (inconsistent, or its data unreadable) answers true inside the disk; use
    /// [`DirtyBitmap::dirty_runs`] or [`DirtyBitmap::status`] to get an error instead.
    pub fn get(&self, offset: u64) -> bool {
        match self.readable() {
            Some(h) => h.get(offset),
            None => offset < self.size,
        }
    }

    /// Dirty granules times granularity, in bytes. An unusable bitmap answers every granule.
    pub fn count(&self) -> u64 {
        match self.readable() {
            Some(h) => h.count(),
            None => self.size.div_ceil(self.granularity()) << self.granularity_bits,
        }
    }

    /// First dirty offset in [offset, offset + bytes) clamped to the size; None if none. An
    /// unusable bitmap answers `offset` (inside the disk, for a non-empty range).
    pub fn next_dirty(&self, offset: u64, bytes: u64) -> Option<u64> {
        match self.readable() {
            Some(h) => h.next_dirty(offset, bytes),
            None => (offset < self.size && bytes > 0).then_some(offset),
        }
    }

    /// First clean offset in [offset, offset + bytes) clamped to the size; None if none. An
    /// unusable bitmap answers None (no clean granule).
    pub fn next_zero(&self, offset: u64, bytes: u64) -> Option<u64> {
        self.readable()?.next_zero(offset, bytes)
    }

    /// The next dirty run in [start, min(end, size)), at most `max_bytes` long. An unusable
    /// bitmap answers the whole range (capped at `max_bytes`).
    pub fn next_dirty_area(&self, start: u64, end: u64, max_bytes: u64) -> Option<(u64, u64)> {
        if max_bytes == 0 {
            return None;
        }
        match self.readable() {
            Some(h) => h.next_dirty_area(start, end, max_bytes),
            None => {
                let end = end.min(self.size);
                (start < end).then(|| (start, (end - start).min(max_bytes)))
            }
        }
    }

    /// The maximal dirty runs of [start, min(end, size)), as (offset, length) in bytes, clipped
    /// to the range. Fails for an inconsistent bitmap (QEMU's message and hint) and when the
    /// data cannot be read (naming the bitmap and the offset): the reader a backup tool uses.
    pub fn dirty_runs(&self, start: u64, end: u64) -> Result<hbitmap::DirtyRuns<'_>> {
        Ok(self.usable_bits()?.dirty_runs(start, end))
    }

    /// SHA-256 of the bits, equal to QEMU's `x-debug-block-dirty-bitmap-sha256` (which hashes
    /// an inconsistent bitmap as all clean). Fails when the data cannot be read. Use
    /// [`DirtyBitmap::try_sha256`] to refuse inconsistent bitmaps too.
    pub fn sha256(&self) -> Result<String> {
        if self.inconsistent {
            // An unallocated (inconsistent) bitmap hashes as its all-zero words.
            let words = self.size.div_ceil(self.granularity()).div_ceil(64).max(1);
            let zeros = [0u8; 4096];
            let mut h = sha256::Sha256::new();
            let mut left = words * 8;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                h.update(&zeros[..n]);
                left -= n as u64;
            }
            return Ok(sha256::to_hex(&h.finalize()));
        }
        Ok(self.usable_bits()?.sha256_hex())
    }

    /// [`DirtyBitmap::sha256`] that fails for an inconsistent bitmap (QEMU's message and hint).
    pub fn try_sha256(&self) -> Result<String> {
        Ok(self.usable_bits()?.sha256_hex())
    }

    /// self |= src with QEMU's checks: DEFAULT on the target, ALLOW_RO on the source, equal
    /// sizes. Granularities may differ. On error nothing changes.
    pub fn merge_from(&mut self, src: &DirtyBitmap) -> Result<()> {
        self.check(CHECK_DEFAULT)?;
        src.check(CHECK_ALLOW_RO)?;
        if self.size() != src.size() {
            return Err(Error::SizeMismatch {
                dest: self.size(),
                src: src.size(),
            });
        }
        self.merge_bits(src.usable_bits()?)
    }

    /// self |= bits, no checks; records the changed clusters.
    pub(crate) fn merge_bits(&mut self, src: &HBitmap) -> Result<()> {
        self.data_mut()?;
        // Only the clusters whose bits change (those where `src` has a bit `self` lacks),
        // found before OR-ing; other shapes: every cluster where `src` has a bit.
        let changing = self.changing_clusters(src);
        self.data_mut()?.merge_from(src);
        self.touch_merged(changing, src);
        Ok(())
    }

    /// Records the clusters a merge of `src` changed: `changing` when known, else every
    /// cluster where `src` has a bit.
    fn touch_merged(&mut self, changing: Option<Vec<u64>>, src: &HBitmap) {
        match changing {
            Some(idx) => {
                if let Some(t) = self.touched.as_mut() {
                    for i in idx {
                        t.touch_index(i);
                    }
                }
            }
            None => self.touch_dirty_of(src),
        }
    }

    /// The table indices whose clusters a merge of `src` (same shape, `self` loaded) would
    /// change; None when not tracked cheaply (other shapes, nothing tracked).
    fn changing_clusters(&self, src: &HBitmap) -> Option<Vec<u64>> {
        let t = self.touched.as_ref().filter(|t| !t.all)?;
        let dst = self.bits();
        if dst.granularity_bits() != src.granularity_bits() || dst.granules() != src.granules() {
            return None;
        }
        // Words per data cluster: 2^(shift - granularity bits - 6).
        let wshift = t.shift.checked_sub(self.granularity_bits + 6)?;
        let step = 1u64 << t.shift;
        let size = self.size;
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let Some(d) = src.next_dirty(pos, size - pos) else {
                break;
            };
            let idx = d >> t.shift;
            let w0 = idx << wshift;
            if !dst.contains_words(src, w0, w0.saturating_add(1 << wshift)) {
                out.push(idx);
            }
            pos = match (idx + 1).checked_mul(step) {
                Some(p) => p,
                None => break,
            };
        }
        Some(out)
    }

    /// Whether `offset` is dirty and how long the run of that state is, capped at `bytes`
    /// (QEMU: bdrv_dirty_bitmap_status, with the 2022 fix: true means dirty).
    pub fn status(&self, offset: u64, bytes: u64) -> Result<(bool, u64)> {
        if bytes == 0 {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': status needs a non-empty range",
                self.display_name()
            )));
        }
        self.check_range("status", offset, bytes)?;
        Ok(self.usable_bits()?.status(offset, bytes))
    }

    /// Bytes of disk one serialization chunk must be aligned to: 64 granules
    /// (QEMU: bdrv_dirty_bitmap_serialization_align).
    pub fn serialization_align(&self) -> u64 {
        // 64 granules (QEMU: bdrv_dirty_bitmap_serialization_align).
        64u64 << self.granularity_bits
    }

    /// Checks QEMU's chunk rules: start aligned to serialization_align, range inside the bitmap,
    /// length aligned unless the chunk reaches the end.
    fn check_chunk(&self, what: &str, offset: u64, bytes: u64) -> Result<()> {
        self.check_range(what, offset, bytes)?;
        let align = self.serialization_align();
        if offset % align != 0 || (bytes % align != 0 && offset + bytes != self.size()) {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': {what} range [{offset}, +{bytes}) is not aligned to {align} bytes \
                 (64 granules) and does not end at the end of the bitmap",
                self.display_name()
            )));
        }
        if self.inconsistent {
            return Err(Error::Inconsistent {
                name: self.display_name(),
            });
        }
        Ok(())
    }

    /// Bytes needed to serialize [offset, offset + bytes) (QEMU:
    /// bdrv_dirty_bitmap_serialization_size): whole little-endian 64-bit words.
    pub fn serialization_size(&self, offset: u64, bytes: u64) -> Result<u64> {
        self.check_chunk("serialization", offset, bytes)?;
        Ok(self.usable_bits()?.serialization_size(offset, bytes))
    }

    /// Serializes [offset, offset + bytes) into `buf` in QEMU's layout (granule k of the chunk
    /// is bit k % 8 of byte k / 8). `buf` must hold serialization_size bytes.
    pub fn serialize_part(&self, buf: &mut [u8], offset: u64, bytes: u64) -> Result<()> {
        let need = self.serialization_size(offset, bytes)?;
        if (buf.len() as u64) < need {
            return Err(Error::InvalidArgument(format!(
                "serialization buffer of {} bytes is too small: {need} needed",
                buf.len()
            )));
        }
        self.usable_bits()?.serialize_part(buf, offset, bytes);
        Ok(())
    }

    /// Runs one deserialize_* step after QEMU's checks (writable, chunk rules), then the
    /// optional finish.
    fn deserialize_with(
        &mut self,
        offset: u64,
        bytes: u64,
        finish: bool,
        fill: impl FnOnce(&mut HBitmap),
    ) -> Result<()> {
        self.check(CHECK_RO)?;
        self.check_chunk("deserialization", offset, bytes)?;
        let bits = self.data_mut()?;
        fill(bits);
        if finish {
            bits.deserialize_finish();
        }
        self.touch(offset, bytes);
        Ok(())
    }

    /// Overwrites [offset, offset + bytes) from `buf` (QEMU layout). Until
    /// [`DirtyBitmap::deserialize_finish`] (or `finish`), count and searches are stale.
    pub fn deserialize_part(
        &mut self,
        buf: &[u8],
        offset: u64,
        bytes: u64,
        finish: bool,
    ) -> Result<()> {
        self.check(CHECK_RO)?;
        self.check_chunk("deserialization", offset, bytes)?;
        let need = bytes.div_ceil(self.granularity()).div_ceil(64) * 8;
        if (buf.len() as u64) < need {
            return Err(Error::InvalidArgument(format!(
                "deserialization buffer of {} bytes is too small: {need} needed",
                buf.len()
            )));
        }
        self.deserialize_with(offset, bytes, finish, |b| {
            b.deserialize_part(buf, offset, bytes)
        })
    }

    /// Fills [offset, offset + bytes) with clean granules (see deserialize_part).
    pub fn deserialize_zeroes(&mut self, offset: u64, bytes: u64, finish: bool) -> Result<()> {
        self.deserialize_with(offset, bytes, finish, |b| {
            b.deserialize_zeroes(offset, bytes)
        })
    }

    /// Fills [offset, offset + bytes) with dirty granules, never past the end (see
    /// deserialize_part).
    pub fn deserialize_ones(&mut self, offset: u64, bytes: u64, finish: bool) -> Result<()> {
        self.deserialize_with(offset, bytes, finish, |b| b.deserialize_ones(offset, bytes))
    }

    /// Rebuilds summaries and the count after deserialize_* calls.
    pub fn deserialize_finish(&mut self) {
        if let Ok(bits) = self.data_mut() {
            bits.deserialize_finish();
        }
    }

    /// Clears the bitmap by swapping in fresh bits and returns the old ones (QEMU:
    /// bdrv_clear_dirty_bitmap with a backup). DEFAULT checks.
    pub fn clear_with_backup(&mut self) -> Result<Backup> {
        self.check(CHECK_DEFAULT)?;
        let bits = self.data_mut()?;
        let fresh = HBitmap::new(bits.size(), bits.granularity_bits());
        let old = std::mem::replace(bits, fresh);
        self.touch_all();
        Ok(Backup(old))
    }

    /// self |= src, returning the previous bits (QEMU: bdrv_merge_dirty_bitmap with a backup).
    pub fn merge_with_backup(&mut self, src: &DirtyBitmap) -> Result<Backup> {
        self.check(CHECK_DEFAULT)?;
        src.check(CHECK_ALLOW_RO)?;
        if self.size() != src.size() {
            return Err(Error::SizeMismatch {
                dest: self.size(),
                src: src.size(),
            });
        }
        let src = src.usable_bits()?;
        let old = self.data_mut()?.clone();
        self.merge_bits(src)?;
        Ok(Backup(old))
    }

    /// Puts back the bits saved by clear_with_backup or merge_with_backup (QEMU:
    /// bdrv_restore_dirty_bitmap). Refused on readonly bitmaps and for a backup of another shape.
    pub fn restore(&mut self, backup: Backup) -> Result<()> {
        self.check_restore(&backup)?;
        *self.data_mut()? = backup.0;
        self.touch_all();
        Ok(())
    }

    /// Whether [`DirtyBitmap::restore`] would accept `backup` (writable bitmap, same size and
    /// granularity).
    pub(crate) fn check_restore(&self, backup: &Backup) -> Result<()> {
        self.check(CHECK_RO)?;
        // An inconsistent bitmap has no bits to restore into.
        let size = if self.inconsistent { 0 } else { self.size };
        if backup.0.size() != size || backup.0.granularity_bits() != self.granularity_bits {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': the backup has another size or granularity",
                self.display_name()
            )));
        }
        Ok(())
    }

    /// Resizes the bits to `new_size` bytes (QEMU: hbitmap_truncate); the caller checked busy,
    /// successor and iterators.
    /// Fails only when the data of a lazily loaded bitmap cannot be read (nothing changes then).
    pub(crate) fn truncate(&mut self, new_size: u64) -> Result<()> {
        let old_size = self.size;
        if !self.inconsistent() {
            let bits = self.data_mut()?;
            if bits.size() == old_size {
                bits.truncate(new_size);
            }
        }
        self.size = new_size;
        // The table size changes: the next store rewrites the bitmap.
        self.touched = None;
        // Guest writes it recorded past its old end were written before it grew: the new
        // space they reached is dirty.
        if self.past_end > old_size && new_size > old_size && !self.inconsistent() {
            let end = self.past_end.min(new_size);
            self.mark_write(old_size, end - old_size);
        }
        if self.past_end <= new_size {
            self.past_end = 0;
        }
        Ok(())
    }

    /// Records a guest write ending at `end`, past the bitmap's end (see `past_end`).
    pub(crate) fn note_past_end(&mut self, end: u64) {
        self.past_end = self.past_end.max(end);
    }

    /// Puts back saved bits without checks (transaction abort).
    pub(crate) fn restore_unchecked(&mut self, backup: Backup) {
        self.bits = Bits::Loaded(backup.0);
        self.touch_all();
    }

    pub(crate) fn set_name(&mut self, name: Option<Vec<u8>>) {
        self.name = name;
    }

    /// The engine of a bitmap whose data is in memory (callers load it first:
    /// [`DirtyBitmap::ensure_loaded`], or a set's `current`). An inconsistent bitmap's engine is
    /// empty. Reading a bitmap still on disk through here is a bug in qdirty: it loads the data,
    /// and panics if that fails rather than answer with bits it does not have.
    pub(crate) fn bits(&self) -> &HBitmap {
        match self.bits.try_get(self.size, self.granularity_bits) {
            Ok(h) => h,
            Err(e) => panic!(
                "bitmap '{}' was read before its data was loaded: {e}",
                self.display_name()
            ),
        }
    }

    /// The loaded engine, for changes: loads the data if still on disk. The caller records
    /// what it changes (touch*).
    fn data_mut(&mut self) -> Result<&mut HBitmap> {
        self.bits.load_mut(self.size, self.granularity_bits)
    }

    /// Loads the data now if it is still on disk (the error names the bitmap and the offset;
    /// the bitmap then stays on disk, unchanged, and the next use tries again).
    pub(crate) fn ensure_loaded(&mut self) -> Result<()> {
        if self.inconsistent() {
            return Ok(());
        }
        self.data_mut().map(drop)
    }

    /// Whether the bits are in memory (false: still on disk, lazily loaded).
    pub fn is_loaded(&self) -> bool {
        self.bits.is_loaded()
    }

    /// A guest write (`set_dirty`, direct or through the set): goes to the loaded bits, or to the
    /// pending writes of a bitmap still on disk, which are OR-ed in when it is loaded.
    pub(crate) fn mark_write(&mut self, offset: u64, bytes: u64) {
        self.bits.settle();
        self.bits
            .mark(offset, bytes, self.size, self.granularity_bits);
        self.touch(offset, bytes);
    }

    /// Guest writes absorbed in bulk (a catch-up on the set's epochs, see epoch.rs): OR-ed
    /// into the loaded bits, or kept with the pending writes of a bitmap still on disk; the
    /// changed data clusters are recorded either way. `src` has any granularity not coarser
    /// than the bitmap's, and the bitmap's size.
    pub(crate) fn mark_writes(&mut self, src: &HBitmap) {
        self.bits.settle();
        if self.inconsistent {
            return;
        }
        if matches!(self.bits, Bits::Loaded(_)) {
            let changing = self.changing_clusters(src);
            if let Bits::Loaded(h) = &mut self.bits {
                h.merge_from(src);
            }
            self.touch_merged(changing, src);
        } else {
            self.bits.mark_bits(src, self.size, self.granularity_bits);
            self.touch_dirty_of(src);
        }
    }

    /// Records that the stored copy's data clusters covering `[offset, offset + bytes)` differ
    /// from this bitmap (durable mode wrote zones into them), so that the next store rewrites
    /// them with the exact bits.
    pub(crate) fn touch_stored(&mut self, offset: u64, bytes: u64) {
        self.touch(offset, bytes);
    }

    /// Records that every data cluster of the stored copy differs from this bitmap.
    pub(crate) fn touch_stored_all(&mut self) {
        self.touch_all();
    }

    /// What durable mode stores for this bitmap: its bits OR those of `successor` (a frozen
    /// bitmap's successor records the writes it would take back on reclaim), with the byte
    /// ranges `zones` (writes in flight) dirty. The change tracking is this bitmap's plus the
    /// clusters the additions touch. The bitmap must be loaded.
    pub(crate) fn durable_copy(
        &self,
        successor: Option<&DirtyBitmap>,
        zones: &[(u64, u64)],
    ) -> Result<DirtyBitmap> {
        self.usable_bits()?;
        let mut copy = self.clone();
        copy.touched = self.touched.clone();
        if let Some(s) = successor {
            copy.merge_bits(s.usable_bits()?)?;
        }
        for &(offset, bytes) in zones {
            copy.mark_write(offset, bytes);
        }
        Ok(copy)
    }

    /// A bitmap whose data is still in an image: `source` reads it when first needed.
    pub(crate) fn new_lazy(
        name: Vec<u8>,
        size: u64,
        granularity: u64,
        source: std::sync::Arc<dyn LazySource>,
    ) -> Result<Self> {
        let mut bm = Self::with_unchecked_name(name, 0, granularity)?;
        bm.size = size;
        bm.bits = Bits::lazy(source);
        Ok(bm)
    }

    /// The data source of a bitmap still on disk.
    pub(crate) fn source(&self) -> Option<&std::sync::Arc<dyn LazySource>> {
        self.bits.source()
    }

    /// Starts tracking changes against a stored copy whose data clusters cover
    /// `1 << cluster_shift` bytes of disk each and whose table is at `base`.
    pub(crate) fn track_changes(&mut self, cluster_shift: u32, base: u64) {
        self.touched = Some(Touched::new(cluster_shift, base));
    }

    /// What changed since the stored copy (None: unknown, everything is rewritten).
    pub(crate) fn touched(&self) -> Option<&Touched> {
        self.touched.as_ref()
    }

    fn touch(&mut self, offset: u64, bytes: u64) {
        if let Some(t) = self.touched.as_mut() {
            t.touch(offset, bytes);
        }
    }

    fn touch_all(&mut self) {
        if let Some(t) = self.touched.as_mut() {
            t.all = true;
        }
    }

    /// Records the clusters where `src` has dirty bits (a merge of `src`).
    fn touch_dirty_of(&mut self, src: &HBitmap) {
        let size = self.size;
        if let Some(t) = self.touched.as_mut() {
            if t.all {
                return;
            }
            let step = 1u64 << t.shift;
            let mut pos = 0u64;
            while pos < size {
                let Some(d) = src.next_dirty(pos, size - pos) else {
                    break;
                };
                let idx = d >> t.shift;
                t.touch_index(idx);
                pos = match (idx + 1).checked_mul(step) {
                    Some(p) => p,
                    None => break,
                };
            }
        }
    }
}

impl Clone for DirtyBitmap {
    /// A clone is always loaded (it does not depend on the image's storage). Cloning a bitmap
    /// whose data cannot be read gives an inconsistent clone (unusable, never "clean").
    fn clone(&self) -> Self {
        let (loaded, failed) = match self.bits.try_get(self.size, self.granularity_bits) {
            Ok(h) => (h.clone(), false),
            Err(_) => (HBitmap::new(0, self.granularity_bits), true),
        };
        DirtyBitmap {
            name: self.name.clone(),
            size: self.size,
            granularity_bits: self.granularity_bits,
            bits: Bits::Loaded(loaded),
            touched: None,
            disabled: self.disabled || failed,
            busy: self.busy,
            readonly: self.readonly,
            persistent: self.persistent,
            inconsistent: self.inconsistent || failed,
            skip_store: self.skip_store,
            successor: self.successor,
            active_iterators: self.active_iterators,
            past_end: self.past_end,
        }
    }
}
