//! The dirty bitmaps of one disk (QEMU: the `dirty_bitmaps` list of a BlockDriverState and the
//! functions of block/dirty-bitmap.c that work on it): creation and release, successors for
//! backup-style jobs, the guest write hook, truncate, query, iterators. No I/O.
//!
//! # The write log
//!
//! A set owns a [`WriteLog`] that lock-free writers share through [`BitmapSet::write_hook`].
//! Their writes reach the bitmaps when the set *folds* the log ([`BitmapSet::fold`]), which every
//! `&mut self` method of the set does first, before reading or changing bitmaps or their
//! states; so each operation sees exactly the writes that completed before it, as in QEMU where
//! the hook and management calls take the same mutex. The `&self` readers (`get`, `bitmap`,
//! `iter`, `query`, `recording`, `iter_next`, ...) cannot fold: when writers use the hook, call
//! [`BitmapSet::fold`] (or any `&mut` method) before reading. [`BitmapSet::set_dirty`] marks the
//! bitmaps directly (after a fold), for callers that hold the set exclusively anyway.

use std::sync::Arc;

use super::log::WriteLog;
use super::{validate_granularity, DirtyBitmap, CHECK_ALLOW_RO, CHECK_BUSY, CHECK_DEFAULT};
use crate::error::{Error, Result};

/// Identifies a bitmap of a set for as long as it exists (never reused within a set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitmapId(pub u64);

/// One line of [`BitmapSet::query`] (QEMU: BlockDirtyInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap.
    pub id: BitmapId,
    /// Name; None for anonymous bitmaps (successors).
    pub name: Option<Vec<u8>>,
    /// Dirty granules times granularity, in bytes.
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Enabled, or frozen with an enabled successor.
    pub recording: bool,
    /// Held by an operation.
    pub busy: bool,
    /// The raw persistent flag.
    pub persistent: bool,
    /// Found in_use on open.
    pub inconsistent: bool,
}

/// An iterator over the dirty granules of one bitmap (QEMU: BdrvDirtyBitmapIter). While it
/// lives, the bitmap cannot be released or truncated. Give it back with [`BitmapSet::iter_free`].
#[derive(Debug)]
pub struct DirtyIter {
    bitmap: BitmapId,
    /// Next byte offset to look at.
    pos: u64,
}

impl DirtyIter {
    /// The bitmap iterated.
    pub fn bitmap(&self) -> BitmapId {
        self.bitmap
    }
}

#[derive(Debug)]
struct Slot {
    id: BitmapId,
    bm: DirtyBitmap,
}

/// The bitmaps of one disk of `size` bytes, newest first.
#[derive(Debug, Default)]
pub struct BitmapSet {
    size: u64,
    slots: Vec<Slot>,
    next_id: u64,
    /// Writes logged by the lock-free hook, not yet folded into the bitmaps.
    log: Arc<WriteLog>,
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl BitmapSet {
    /// An empty set for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        BitmapSet {
            size,
            slots: Vec::new(),
            next_id: 1,
            log: Arc::new(WriteLog::new(size)),
        }
    }

    /// The lock-free write hook: a handle on the set's [`WriteLog`] that any thread may call
    /// [`WriteLog::set`] on (QEMU's `bdrv_set_dirty`) while the set is used elsewhere. Its
    /// writes reach the bitmaps at the set's next fold (see the module documentation).
    pub fn write_hook(&self) -> Arc<WriteLog> {
        Arc::clone(&self.log)
    }

    /// Applies the writes logged by the hook to every bitmap that records writes now (enabled,
    /// not readonly, not inconsistent; successors included), each range rounded outward to the
    /// bitmap's granularity and clamped to the disk. One load when nothing is pending; else
    /// O(pending log words × recording bitmaps). Every `&mut self` method calls it first.
    pub fn fold(&mut self) {
        if !self.log.has_pending() {
            return;
        }
        let mut taken: Vec<(u32, u64, u64)> = Vec::new();
        self.log.drain(|g, w, bits| taken.push((g, w, bits)));
        let size = self.size;
        for s in &mut self.slots {
            let bm = &mut s.bm;
            if !bm.enabled() || bm.readonly() || bm.inconsistent() {
                continue;
            }
            let bg = bm.granularity_bits();
            for &(g, w, mut bits) in &taken {
                // A layer coarser than the bitmap holds only writes that raced with the
                // bitmap's creation (see log.rs): they are not the bitmap's.
                if bg < g {
                    continue;
                }
                let base = w * 64;
                while bits != 0 {
                    let s0 = u64::from(bits.trailing_zeros());
                    let run = u64::from((!(bits >> s0)).trailing_zeros());
                    let granule = base + s0;
                    if granule > (u64::MAX >> g) || granule << g >= size {
                        break;
                    }
                    // A bitmap whose data is still on disk keeps the write pending (lazy.rs).
                    bm.mark_write(granule << g, run << g);
                    bits = if s0 + run >= 64 {
                        0
                    } else {
                        bits & !(((1u64 << run) - 1) << s0)
                    };
                }
            }
        }
    }

    /// Gives the log the base granularity: the finest among the bitmaps that can ever record
    /// (inconsistent ones never do), or none when there is none. Called after every change of
    /// the list.
    fn refresh_log(&self) {
        let g = self
            .slots
            .iter()
            .filter(|s| !s.bm.inconsistent())
            .map(|s| s.bm.granularity_bits())
            .min();
        self.log.set_granularity_bits(g);
    }

    /// The disk length the bitmaps cover.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Every bitmap, newest first (QEMU's list order), anonymous successors included.
    pub fn ids(&self) -> Vec<BitmapId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// Number of bitmaps.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the set holds no bitmap.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The bitmaps, newest first.
    pub fn iter(&self) -> impl Iterator<Item = (BitmapId, &DirtyBitmap)> {
        self.slots.iter().map(|s| (s.id, &s.bm))
    }

    /// A bitmap by id.
    pub fn get(&self, id: BitmapId) -> Option<&DirtyBitmap> {
        self.slots.iter().find(|s| s.id == id).map(|s| &s.bm)
    }

    /// A bitmap by id, for changes (folds first).
    pub fn get_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.fold();
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .map(|s| &mut s.bm)
    }

    fn index(&self, id: BitmapId) -> Result<usize> {
        self.slots.iter().position(|s| s.id == id).ok_or_else(|| {
            Error::InvalidArgument(format!("Dirty bitmap #{} does not exist (any more)", id.0))
        })
    }

    /// A bitmap by id, or an error naming the id.
    pub fn bitmap(&self, id: BitmapId) -> Result<&DirtyBitmap> {
        Ok(&self.slots[self.index(id)?].bm)
    }

    /// A bitmap by id for changes, or an error naming the id.
    pub fn bitmap_mut(&mut self, id: BitmapId) -> Result<&mut DirtyBitmap> {
        self.fold();
        let i = self.index(id)?;
        Ok(&mut self.slots[i].bm)
    }

    /// A bitmap by id for changes WITHOUT folding the write log first: for bookkeeping that
    /// must not absorb writes logged meanwhile (after a store, resetting the change tracking:
    /// writes logged during the store stay in the log and are tracked at the next fold).
    pub(crate) fn get_mut_unfolded(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .map(|s| &mut s.bm)
    }

    /// A named bitmap (QEMU: bdrv_find_dirty_bitmap). Anonymous bitmaps never match.
    pub fn find(&self, name: &[u8]) -> Option<BitmapId> {
        self.slots
            .iter()
            .find(|s| s.bm.name() == Some(name))
            .map(|s| s.id)
    }

    /// A named bitmap or QEMU's "Dirty bitmap 'X' not found".
    pub fn lookup(&self, name: &[u8]) -> Result<BitmapId> {
        self.find(name)
            .ok_or_else(|| Error::BitmapNotFound { name: lossy(name) })
    }

    /// Inserts a bitmap at the head of the list (newest first).
    pub fn insert(&mut self, bm: DirtyBitmap) -> BitmapId {
        self.fold();
        let id = BitmapId(self.next_id);
        self.next_id += 1;
        self.slots.insert(0, Slot { id, bm });
        self.refresh_log();
        id
    }

    /// Creates an enabled, empty, transient bitmap covering the disk (QEMU:
    /// bdrv_create_dirty_bitmap). `name` None creates an anonymous bitmap.
    pub fn create(&mut self, name: Option<&[u8]>, granularity: u64) -> Result<BitmapId> {
        self.fold();
        if let Some(n) = name {
            if self.find(n).is_some() {
                return Err(Error::BitmapExists { name: lossy(n) });
            }
        }
        validate_granularity(granularity)?;
        let bm = DirtyBitmap::new(name, self.size, granularity)?;
        Ok(self.insert(bm))
    }

    /// Removes a bitmap from memory only (QEMU: bdrv_release_dirty_bitmap). Refused while it is
    /// busy, has a successor or has live iterators.
    pub fn release(&mut self, id: BitmapId) -> Result<DirtyBitmap> {
        self.fold();
        let i = self.index(id)?;
        let bm = &self.slots[i].bm;
        if bm.busy() || bm.has_successor() || bm.active_iterators() > 0 {
            return Err(Error::Precondition(format!(
                "Bitmap '{}' cannot be released while it is busy, frozen or iterated",
                bm.display_name()
            )));
        }
        if let Some(parent) = self.slots.iter().find(|s| s.bm.successor() == Some(id)) {
            return Err(Error::Precondition(format!(
                "The successor of bitmap '{}' goes away only through abdicate or reclaim",
                parent.bm.display_name()
            )));
        }
        let bm = self.slots.remove(i).bm;
        self.refresh_log();
        Ok(bm)
    }

    /// Removes a bitmap whatever its state (internal: removal of stored bitmaps, close).
    pub(crate) fn remove_unchecked(&mut self, id: BitmapId) -> Option<DirtyBitmap> {
        self.fold();
        let i = self.slots.iter().position(|s| s.id == id)?;
        let bm = self.slots.remove(i).bm;
        self.refresh_log();
        Some(bm)
    }

    /// QEMU's `recording`: enabled, or frozen with an enabled successor.
    pub fn recording(&self, id: BitmapId) -> bool {
        let Some(bm) = self.get(id) else { return false };
        bm.enabled()
            || bm
                .successor()
                .and_then(|s| self.get(s))
                .is_some_and(|s| s.enabled())
    }

    /// The guest write hook (QEMU: bdrv_set_dirty): marks the range, clamped to the disk, in
    /// every enabled bitmap (successors included). Disabled, readonly and inconsistent bitmaps
    /// are skipped.
    pub fn set_dirty(&mut self, offset: u64, bytes: u64) {
        self.fold();
        if offset >= self.size || bytes == 0 {
            return;
        }
        let bytes = bytes.min(self.size - offset);
        for s in &mut self.slots {
            if s.bm.enabled() && !s.bm.readonly() && !s.bm.inconsistent() {
                s.bm.mark_write(offset, bytes);
            }
        }
    }

    /// Whether any bitmap is readonly: the host must then refuse guest writes (QEMU:
    /// bdrv_has_readonly_bitmaps, which makes writes fail with EPERM).
    pub fn has_readonly(&self) -> bool {
        self.slots.iter().any(|s| s.bm.readonly())
    }

    /// Whether any bitmap has a name (QEMU: bdrv_has_named_bitmaps).
    pub fn has_named(&self) -> bool {
        self.slots.iter().any(|s| s.bm.name().is_some())
    }

    /// Freezes a bitmap for an operation (QEMU: bdrv_dirty_bitmap_create_successor): a new
    /// anonymous successor with the same granularity records writes in its place (it starts
    /// with the parent's enabled state), and the parent becomes disabled and busy.
    pub fn create_successor(&mut self, id: BitmapId) -> Result<BitmapId> {
        self.fold();
        let parent = self.bitmap(id)?;
        parent.check(CHECK_BUSY)?;
        if parent.has_successor() {
            return Err(Error::Precondition(
                "Cannot create a successor for a bitmap that already has one".into(),
            ));
        }
        let enabled = parent.enabled();
        let mut child = DirtyBitmap::new(None, self.size, parent.granularity())?;
        child.set_enabled_unchecked(enabled);
        let child_id = self.insert(child);
        let parent = self.bitmap_mut(id)?;
        parent.set_enabled_unchecked(false);
        parent.set_successor(Some(child_id));
        parent.set_busy(true);
        Ok(child_id)
    }

    fn successor_of(&self, id: BitmapId, msg: &str) -> Result<BitmapId> {
        self.bitmap(id)?
            .successor()
            .ok_or_else(|| Error::Precondition(msg.into()))
    }

    /// The operation succeeded (QEMU: bdrv_dirty_bitmap_abdicate): the successor takes the
    /// parent's name and persistence, and the parent (its bits) is dropped. Returns the
    /// successor, which now is the named bitmap.
    pub fn abdicate(&mut self, id: BitmapId) -> Result<BitmapId> {
        self.fold();
        let child = self.successor_of(
            id,
            "Cannot relinquish control if there's no successor present",
        )?;
        let parent = self.remove_unchecked(id).expect("checked above");
        let s = self.bitmap_mut(child)?;
        s.set_name(parent.name().map(<[u8]>::to_vec));
        s.set_persistence(parent.persistent());
        Ok(child)
    }

    /// The operation failed (QEMU: bdrv_reclaim_dirty_bitmap): the parent takes back the
    /// successor's bits (OR) and its enabled state, stops being busy, and the successor is
    /// dropped. Returns the parent.
    pub fn reclaim(&mut self, id: BitmapId) -> Result<BitmapId> {
        self.fold();
        let child = self.successor_of(id, "Cannot reclaim a successor when none is present")?;
        // Load a parent still on disk first: a read error then leaves everything as it was.
        self.bitmap_mut(id)?.ensure_loaded()?;
        let s = self.remove_unchecked(child).ok_or_else(|| {
            Error::Precondition("Cannot reclaim a successor when none is present".into())
        })?;
        let parent = self.bitmap_mut(id)?;
        parent.merge_bits(s.bits())?;
        parent.set_enabled_unchecked(s.enabled());
        parent.set_successor(None);
        parent.set_busy(false);
        Ok(id)
    }

    /// Enables the successor (QEMU: bdrv_dirty_bitmap_enable_successor).
    pub fn enable_successor(&mut self, id: BitmapId) -> Result<()> {
        let child = self.successor_of(id, "The bitmap has no successor to enable")?;
        self.bitmap_mut(child)?.set_enabled_unchecked(true);
        Ok(())
    }

    /// Resizes every bitmap to `new_size` bytes (QEMU: bdrv_dirty_bitmap_truncate): new space is
    /// clean, granules entirely beyond the new end are dropped. Refused (nothing changes) while
    /// any bitmap is busy, frozen or iterated.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        self.fold();
        for s in &self.slots {
            let b = &s.bm;
            if b.busy() || b.has_successor() || b.active_iterators() > 0 {
                return Err(Error::Precondition(format!(
                    "Cannot resize the bitmaps: bitmap '{}' is busy, frozen or iterated",
                    b.display_name()
                )));
            }
            let granules = new_size.div_ceil(b.granularity());
            if granules > super::hbitmap::MAX_GRANULES {
                return Err(Error::TooBig(format!(
                    "Cannot resize bitmap '{}' to {new_size} bytes: too many granules",
                    b.display_name()
                )));
            }
        }
        // Load bitmaps still on disk first, so that a read error changes nothing.
        for s in &mut self.slots {
            s.bm.ensure_loaded()?;
        }
        for s in &mut self.slots {
            s.bm.truncate(new_size)?;
        }
        self.size = new_size;
        self.log.set_size(new_size);
        Ok(())
    }

    /// A snapshot of every bitmap (QEMU: bdrv_query_dirty_bitmaps), anonymous ones included.
    pub fn query(&self) -> Vec<BitmapInfo> {
        self.slots
            .iter()
            .map(|s| BitmapInfo {
                id: s.id,
                name: s.bm.name().map(<[u8]>::to_vec),
                count: s.bm.count(),
                granularity: s.bm.granularity(),
                recording: self.recording(s.id),
                busy: s.bm.busy(),
                persistent: s.bm.persistent(),
                inconsistent: s.bm.inconsistent(),
            })
            .collect()
    }

    /// target |= source with QMP's checks and order: the source (ALLOW_RO) against the
    /// target's size first, then the target (DEFAULT). With `backup`, returns the target's
    /// previous bits for an undo. The target is unchanged on error.
    pub fn merge(
        &mut self,
        target: BitmapId,
        source: &DirtyBitmap,
        backup: bool,
    ) -> Result<Option<super::Backup>> {
        self.fold();
        source.check(CHECK_ALLOW_RO)?;
        let t = self.bitmap_mut(target)?;
        if t.size() != source.size() {
            return Err(Error::SizeMismatch {
                dest: t.size(),
                src: source.size(),
            });
        }
        t.check(CHECK_DEFAULT)?;
        if backup {
            t.merge_with_backup(source).map(Some)
        } else {
            t.merge_from(source).map(|()| None)
        }
    }

    /// A new iterator at offset 0 (QEMU: bdrv_dirty_iter_new).
    pub fn iter_new(&mut self, id: BitmapId) -> Result<DirtyIter> {
        self.fold();
        self.bitmap_mut(id)?.add_iterator(1);
        Ok(DirtyIter { bitmap: id, pos: 0 })
    }

    /// The start of the next dirty granule, or None when none is left (QEMU:
    /// bdrv_dirty_iter_next). Bits set behind the iterator are not seen; bits reset ahead of
    /// it are respected.
    pub fn iter_next(&self, it: &mut DirtyIter) -> Option<u64> {
        let bm = self.get(it.bitmap)?;
        let g = bm.granularity();
        let at = bm.next_dirty(it.pos, u64::MAX)?;
        let granule = at - at % g;
        it.pos = granule.saturating_add(g);
        Some(granule)
    }

    /// Moves the iterator: the next call returns the first dirty granule at or after the
    /// granule that contains `offset` (QEMU: bdrv_set_dirty_iter).
    pub fn iter_seek(&self, it: &mut DirtyIter, offset: u64) -> Result<()> {
        let bm = self.bitmap(it.bitmap)?;
        if offset >= bm.size() {
            return Err(Error::Precondition(format!(
                "Bitmap '{}': iterator position {offset} is beyond its size {}",
                bm.display_name(),
                bm.size()
            )));
        }
        it.pos = offset - offset % bm.granularity();
        Ok(())
    }

    /// Gives an iterator back (QEMU: bdrv_dirty_iter_free).
    pub fn iter_free(&mut self, it: DirtyIter) {
        self.fold();
        if let Some(bm) = self.get_mut(it.bitmap) {
            bm.add_iterator(-1);
        }
    }

    /// A new anonymous bitmap with `granularity` over the disk (merge accumulators).
    pub fn scratch(&self, granularity: u64) -> Result<DirtyBitmap> {
        DirtyBitmap::new(None, self.size, granularity)
    }
}
