//! [`StateView`]: a bitmap's name, geometry and state flags, without its bits.
//!
//! The bitmaps of a [`BitmapSet`](super::BitmapSet) record guest writes lazily (the write log
//! and its epochs, see set.rs): a bitmap held in a set is only up to date after the set caught
//! it up, which needs `&mut` access to the set. So the set's `&self` accessors hand out this
//! view, which cannot read bits, and bits are only readable through a `&DirtyBitmap` that the
//! set brought up to date and loaded first ([`BitmapSet::current`](super::BitmapSet::current)).
//! A stale read cannot be written.

use super::{BitmapId, DirtyBitmap};
use crate::error::Result;

/// A read-only view of a bitmap's state (QEMU's `BdrvDirtyBitmap` fields other than the bits).
#[derive(Clone, Copy, Debug)]
pub struct StateView<'a>(pub(crate) &'a DirtyBitmap);

impl<'a> StateView<'a> {
    /// The name (None for anonymous bitmaps).
    pub fn name(&self) -> Option<&'a [u8]> {
        self.0.name()
    }

    /// The name for messages ("(null)" for anonymous bitmaps).
    pub fn display_name(&self) -> String {
        self.0.display_name()
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        self.0.granularity()
    }

    /// log2 of the granularity.
    pub fn granularity_bits(&self) -> u32 {
        self.0.granularity_bits()
    }

    /// Covered length in bytes.
    pub fn size(&self) -> u64 {
        self.0.size()
    }

    /// Whether guest writes are recorded (QEMU: bdrv_dirty_bitmap_enabled).
    pub fn enabled(&self) -> bool {
        self.0.enabled()
    }

    /// The raw persistent flag (QEMU: `BdrvDirtyBitmap.persistent`), whatever skip_store says.
    pub fn persistent(&self) -> bool {
        self.0.persistent()
    }

    /// Whether the next store (close, checkpoint, reopen read-only) writes the bitmap to the
    /// image: persistent && !skip_store (QEMU: bdrv_dirty_bitmap_get_persistence).
    pub fn will_be_stored(&self) -> bool {
        self.0.will_be_stored()
    }

    /// The skip_store flag.
    pub fn skip_store(&self) -> bool {
        self.0.skip_store()
    }

    /// Whether the bitmap is inconsistent (found in_use on open): unusable except for removal.
    pub fn inconsistent(&self) -> bool {
        self.0.inconsistent()
    }

    /// Whether the bitmap belongs to an image that cannot be written.
    pub fn readonly(&self) -> bool {
        self.0.readonly()
    }

    /// Whether an operation holds the bitmap.
    pub fn busy(&self) -> bool {
        self.0.busy()
    }

    /// The successor, while an operation holds the bitmap.
    pub fn successor(&self) -> Option<BitmapId> {
        self.0.successor()
    }

    /// Whether a successor exists.
    pub fn has_successor(&self) -> bool {
        self.0.has_successor()
    }

    /// Number of live iterators.
    pub fn active_iterators(&self) -> u32 {
        self.0.active_iterators()
    }

    /// Whether the bits are in memory (false: still on disk, read on first use).
    pub fn is_loaded(&self) -> bool {
        self.0.is_loaded()
    }

    /// QEMU's bdrv_dirty_bitmap_check (see [`DirtyBitmap::check`]).
    pub fn check(&self, flags: u32) -> Result<()> {
        self.0.check(flags)
    }
}
