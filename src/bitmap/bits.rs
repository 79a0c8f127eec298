//! The bits of a [`DirtyBitmap`](super::DirtyBitmap): in memory, or still on disk and loaded
//! lazily.
//!
//! # Design
//!
//! A bitmap opened from an image starts as [`Bits::Lazy`]: the image validated its directory
//! entry and table at open, and a [`LazySource`] (owned by the image module, holding the
//! validated table and a handle on the image's storage) can read the data clusters. There is
//! one way to the bits for readers and one for changers, so no path can see stale bits:
//!
//! * changers and fresh readers (`&mut self`: [`Bits::load_mut`]) load and turn the state into
//!   [`Bits::Loaded`]; a read error is returned to the caller (naming the bitmap and the offset)
//!   and leaves the state as it was, so the next use tries again;
//! * readers through `&self` ([`Bits::try_get`]) load into a `OnceLock` the first time, with the
//!   pending writes OR-ed in; a read error is returned and nothing is remembered of it. The
//!   bitmap's infallible readers turn such an error into their "unusable" answer (every granule
//!   dirty), never into a clean one;
//! * guest writes (a catch-up, `set_dirty`) on a bitmap still on disk go to `delta`, a
//!   sparse bitmap of pending writes, OR-ed in when the data arrives: a disabled bitmap nobody
//!   reads is never loaded, and an enabled one is only loaded if something reads it (or the
//!   store needs it because it changed).
//!
//! Sources refer to on-disk clusters: the image keeps the in-set bitmaps' sources current
//! across stores, invalidates sources whose clusters it frees, and clones are always loaded.

use std::fmt;
use std::sync::{Arc, OnceLock};

use super::HBitmap;
use crate::error::Result;

/// Reads the stored data of one bitmap (implemented by the image module).
pub trait LazySource: Send + Sync + fmt::Debug {
    /// Fills `into` (a clean bitmap of the right size and granularity) from storage. The
    /// error names the bitmap.
    fn load(&self, into: &mut HBitmap) -> Result<()>;
}

/// The state of a lazily loaded bitmap.
#[derive(Debug)]
pub(crate) struct Lazy {
    source: Arc<dyn LazySource>,
    /// Guest writes received before the data was loaded.
    delta: Option<HBitmap>,
    /// Filled by a load through `&self` (includes `delta`).
    cell: OnceLock<HBitmap>,
}

/// The bits of a bitmap: in memory, or still on disk.
#[derive(Debug)]
pub(crate) enum Bits {
    Loaded(HBitmap),
    Lazy(Box<Lazy>),
}

impl Bits {
    pub(crate) fn lazy(source: Arc<dyn LazySource>) -> Bits {
        Bits::Lazy(Box::new(Lazy {
            source,
            delta: None,
            cell: OnceLock::new(),
        }))
    }

    /// Reads the data and OR-s the pending writes in.
    fn load(l: &Lazy, size: u64, granularity_bits: u32) -> Result<HBitmap> {
        let mut h = HBitmap::new(size, granularity_bits);
        l.source.load(&mut h)?;
        if let Some(d) = &l.delta {
            h.merge_from(d);
        }
        Ok(h)
    }

    /// The bits for readers: loads through `&self` if still on disk (the data is kept on
    /// success; a failure is returned and not remembered, so the next call tries again).
    #[inline]
    pub(crate) fn try_get(&self, size: u64, granularity_bits: u32) -> Result<&HBitmap> {
        match self {
            Bits::Loaded(h) => Ok(h),
            Bits::Lazy(l) => {
                if let Some(h) = l.cell.get() {
                    return Ok(h);
                }
                let h = Self::load(l, size, granularity_bits)?;
                // A concurrent reader cannot exist (`&self` of a bitmap behind the image's
                // exclusive access), but if one won, its copy is as good as ours.
                let _ = l.cell.set(h);
                Ok(l.cell.get().expect("set above"))
            }
        }
    }

    /// The bits for changers: loads if needed (the error names the bitmap; nothing changes).
    pub(crate) fn load_mut(&mut self, size: u64, granularity_bits: u32) -> Result<&mut HBitmap> {
        self.settle();
        if let Bits::Lazy(l) = self {
            let h = Self::load(l, size, granularity_bits)?;
            *self = Bits::Loaded(h);
        }
        match self {
            Bits::Loaded(h) => Ok(h),
            Bits::Lazy(_) => unreachable!("loaded above"),
        }
    }

    /// A lazy state whose data was loaded through `&self` becomes Loaded.
    pub(crate) fn settle(&mut self) {
        if let Bits::Lazy(l) = self {
            if let Some(h) = l.cell.take() {
                *self = Bits::Loaded(h);
            }
        }
    }

    /// Bytes of heap held: the bits in memory, or the pending writes (and bits read through
    /// `&self`) of a bitmap still on disk.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Bits::Loaded(h) => h.heap_bytes(),
            Bits::Lazy(l) => {
                l.delta.as_ref().map_or(0, HBitmap::heap_bytes)
                    + l.cell.get().map_or(0, HBitmap::heap_bytes)
            }
        }
    }

    pub(crate) fn is_loaded(&self) -> bool {
        match self {
            Bits::Loaded(_) => true,
            Bits::Lazy(l) => l.cell.get().is_some(),
        }
    }

    pub(crate) fn source(&self) -> Option<&Arc<dyn LazySource>> {
        match self {
            Bits::Lazy(l) if l.cell.get().is_none() => Some(&l.source),
            _ => None,
        }
    }

    /// Guest writes in bulk (call after settle): OR-ed into the loaded bits or the pending
    /// writes.
    pub(crate) fn mark_bits(&mut self, src: &HBitmap, size: u64, granularity_bits: u32) {
        match self {
            Bits::Loaded(h) => h.merge_from(src),
            Bits::Lazy(l) => l
                .delta
                .get_or_insert_with(|| HBitmap::new(size, granularity_bits))
                .merge_from(src),
        }
    }

    /// A guest write (call after settle).
    pub(crate) fn mark(&mut self, offset: u64, bytes: u64, size: u64, granularity_bits: u32) {
        match self {
            Bits::Loaded(h) => h.set(offset, bytes),
            Bits::Lazy(l) => l
                .delta
                .get_or_insert_with(|| HBitmap::new(size, granularity_bits))
                .set(offset, bytes),
        }
    }
}
