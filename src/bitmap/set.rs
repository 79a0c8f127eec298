//! The dirty bitmaps of one disk (QEMU: the `dirty_bitmaps` list of a BlockDriverState and the
//! functions of block/dirty-bitmap.c that work on it): creation and release, successors for
//! backup-style jobs, the guest write hook, truncate, query, iterators. No I/O.
//!
//! # The write log
//!
//! A set owns a [`WriteLog`] that lock-free writers share through [`BitmapSet::write_hook`].
//! Their writes reach the bitmaps in two steps. Every `&mut self` method first *absorbs* the
//! log ([`BitmapSet::absorb`]): the pending writes move into the set's open epoch (epoch.rs),
//! one set per write whatever the number of bitmaps. A bitmap then takes the epochs it has not
//! seen when it is itself read or changed through the set (`get_mut`, `bitmap_mut`,
//! [`BitmapSet::current`], merges, successors, iterators): its *catch-up*. So each operation
//! sees exactly the writes that completed before it, as in QEMU where the hook and management
//! calls take the same mutex, and the fan-out costs what the reads cost, not one set per write
//! per enabled bitmap. [`BitmapSet::fold`] catches every bitmap up (store, query, truncate).
//!
//! One place decides freshness: bits are readable only through [`BitmapSet::current`] (and
//! the `&mut` accessors), which catch the bitmap up, and load its data if it is still on disk,
//! before handing it out. The `&self` accessors (`get`, `bitmap`, `iter`) give a
//! [`StateView`]: names and flags, which are always current, and no bits. So no caller can
//! read bits that miss a write the hook logged before the call.

use std::sync::Arc;

use super::epoch::Epochs;
use super::log::WriteLog;
use super::slots::{records, Slots, Totals};
use super::view::StateView;
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

/// The bitmaps of one disk of `size` bytes, newest first.
#[derive(Debug, Default)]
pub struct BitmapSet {
    size: u64,
    /// The bitmaps, by id and by name, with the running totals (slots.rs).
    slots: Slots,
    next_id: u64,
    /// Writes logged by the lock-free hook, not yet absorbed.
    log: Arc<WriteLog>,
    /// Writes absorbed from the log, not yet taken by every bitmap that records them.
    epochs: Epochs,
    /// Counts the calls that may have changed a bitmap other than by guest writes (every
    /// `&mut` access, insertion, removal, resize): durable mode stores the bitmaps when it
    /// moved (see [`BitmapSet::changes`]).
    changes: u64,
}

/// The byte ranges of what the log hands over (`words` words from word `w` at granularity
/// `2^g`, each holding `bits`; see `WriteLog::drain`), clamped to a disk of `size` bytes: one
/// range per run of set bits, one for a whole piece.
fn logged_runs(size: u64, g: u32, w: u64, words: u64, mut bits: u64, mut f: impl FnMut(u64, u64)) {
    let base = w.saturating_mul(64);
    if words > 1 {
        // A whole piece: one range, set in whole chunks.
        if base > (u64::MAX >> g) || base << g >= size {
            return;
        }
        let start = base << g;
        let granules = words.saturating_mul(64);
        let len = if granules > (u64::MAX >> g) {
            u64::MAX
        } else {
            granules << g
        };
        f(start, len.min(size - start));
        return;
    }
    while bits != 0 {
        let s0 = u64::from(bits.trailing_zeros());
        let run = u64::from((!(bits >> s0)).trailing_zeros());
        let granule = base + s0;
        if granule > (u64::MAX >> g) || granule << g >= size {
            break;
        }
        let start = granule << g;
        f(start, (run << g).min(size - start));
        bits = if s0 + run >= 64 {
            0
        } else {
            bits & !(((1u64 << run) - 1) << s0)
        };
    }
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn no_such(id: BitmapId) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap #{} does not exist (any more)", id.0))
}

impl BitmapSet {
    /// An empty set for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        BitmapSet {
            size,
            slots: Slots::default(),
            next_id: 1,
            log: Arc::new(WriteLog::new(size)),
            epochs: Epochs::default(),
            changes: 0,
        }
    }

    /// A number that moves whenever a bitmap may have changed other than by the write hook:
    /// `&mut` access to a bitmap, an insertion, a removal, a resize. Reads
    /// ([`BitmapSet::current`], iterators, queries) and guest writes (the hook,
    /// [`BitmapSet::set_dirty`]) leave it alone.
    #[inline]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The lock-free write hook: a handle on the set's [`WriteLog`] that any thread may call
    /// [`WriteLog::set`] on (QEMU's `bdrv_set_dirty`) while the set is used elsewhere. Its
    /// writes reach the set at its next absorb, and each bitmap at its next catch-up (see the
    /// module documentation).
    pub fn write_hook(&self) -> Arc<WriteLog> {
        Arc::clone(&self.log)
    }

    /// Moves the writes logged by the hook into the open epoch: one set per logged run,
    /// whatever the number of bitmaps (dropped when no bitmap records writes). Ranges are
    /// clamped to the disk. Two loads when nothing is pending. Every `&mut self` method calls it
    /// first. The log then gives back the memory the writes took (log.rs: above
    /// `RETAIN_BYTES`, after a grace period).
    ///
    /// When exactly one bitmap records writes and no epoch is pending, the writes go straight
    /// to it: what its catch-up would give it at once, without an epoch to build and drop.
    #[inline]
    pub(crate) fn absorb(&mut self) {
        self.slots.reconcile();
        if self.log.wants_drain() {
            self.drain_log();
        }
    }

    /// Guest writes reached `end`, past the disk's end: the bitmaps that record writes
    /// remember it (growing them marks the new space up to there dirty), and the host is
    /// warned: those writes are in no bitmap until then.
    #[cold]
    fn record_past_end(&mut self, end: u64) {
        let mut recorded = false;
        let _ = self.slots.update_all(|_, bm| {
            if records(bm) {
                bm.note_past_end(end);
                recorded = true;
            }
            Ok::<(), ()>(())
        });
        if recorded {
            crate::warning::warn(&format!(
                "Guest writes reached offset {end}, past the end of the disk ({} bytes): the \
                 bitmaps do not cover them. Resize the bitmaps when the disk grows, before the \
                 guest writes there (qdirty_image_truncate); resizing them now marks the new \
                 space up to that offset dirty",
                self.size
            ));
        }
    }

    /// [`BitmapSet::absorb`] when the log has something to drain.
    fn drain_log(&mut self) {
        let past_end = self.log.take_past_end();
        if past_end > 0 {
            self.record_past_end(past_end);
        }
        let size = self.size;
        let sole = if self.epochs.len() == 0 {
            self.slots.sole_recording()
        } else {
            None
        };
        if let Some(id) = sole {
            let bm = self
                .slots
                .bitmap_mut(id)
                .expect("a recording bitmap exists");
            let granularity_bits = bm.granularity_bits();
            // The runs are applied after the drain, once the log has given its memory back.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            self.log.drain(|g, w, words, bits| {
                // A layer coarser than the bitmap: writes that raced with its creation (see
                // catch_up).
                if g <= granularity_bits {
                    logged_runs(size, g, w, words, bits, |start, len| {
                        runs.push((start, len))
                    });
                }
            });
            for (start, len) in runs {
                bm.mark_write(start, len);
            }
            return;
        }
        let wanted = !self.slots.recording_cursors().is_empty();
        let epochs = &mut self.epochs;
        self.log.drain(|g, w, words, bits| {
            if wanted {
                logged_runs(size, g, w, words, bits, |start, len| {
                    epochs.open_layer(size, g).set(start, len)
                });
            }
        });
    }

    /// Catches bitmap `id` up: gives it the epochs from its cursor on (if it records writes:
    /// each epoch rounded outward to its granularity; a layer coarser than the bitmap holds
    /// only writes that raced with its creation, see log.rs, and is skipped), seals the open
    /// epoch and moves its cursor past it. Returns false when there was nothing to do.
    #[inline]
    fn catch_up(&mut self, id: BitmapId) -> bool {
        self.slots.reconcile();
        // No epoch: every bitmap has taken every absorbed write (no lookup needed).
        if self.epochs.len() == 0 {
            return false;
        }
        match self.slots.get(id) {
            Some(slot) if !self.epochs.caught_up(slot.cursor()) => self.catch_up_behind(id),
            _ => false,
        }
    }

    /// [`BitmapSet::catch_up`] of a bitmap that has epochs to take.
    fn catch_up_behind(&mut self, id: BitmapId) -> bool {
        let Some(slot) = self.slots.get(id) else {
            return false;
        };
        let (cursor, recording) = (slot.cursor(), records(&slot.bm));
        if recording {
            let bm = self.slots.bitmap_mut(id).expect("looked up above");
            let bitmap_granularity_bits = bm.granularity_bits();
            for h in self.epochs.since(cursor) {
                if h.granularity_bits() <= bitmap_granularity_bits {
                    bm.mark_writes(h);
                }
            }
        }
        let sealed = self.epochs.seal();
        self.slots.set_cursor(id, sealed);
        true
    }

    /// Drops or merges the epochs no recording bitmap needs apart.
    fn compact(&mut self) {
        if self.epochs.len() == 0 {
            return;
        }
        self.epochs.compact(self.slots.recording_cursors());
    }

    /// Absorbs the log, catches bitmap `id` up and compacts the epochs.
    #[inline]
    fn absorb_and_catch_up(&mut self, id: BitmapId) {
        self.absorb();
        if self.catch_up(id) {
            self.compact();
        }
    }

    /// Applies every write logged so far to every bitmap that records writes (enabled, not
    /// readonly, not inconsistent; successors included), each range rounded outward to the
    /// bitmap's granularity and clamped to the disk. Two loads when nothing is pending; else
    /// O(pending writes) plus, per recording bitmap, O(writes it has not seen). Call it before
    /// reading bits through `&self` while writers use the hook.
    pub fn fold(&mut self) {
        self.absorb();
        if self.epochs.len() == 0 {
            return;
        }
        let mut any = false;
        let ids: Vec<BitmapId> = self.slots.ids().collect();
        for id in ids {
            any |= self.catch_up(id);
        }
        if any {
            self.compact();
        }
    }

    /// A bitmap by id for reading its bits: with every write logged so far that it records (a
    /// catch-up of this bitmap only), and its data loaded if it was still on disk. Fails when
    /// the bitmap does not exist, or when its data cannot be read (the error names the bitmap
    /// and the offset; the bitmap stays on disk and the next call tries again). An
    /// inconsistent bitmap is returned as it is (its readers answer "unusable", see
    /// [`DirtyBitmap::dirty_runs`]).
    pub fn current(&mut self, id: BitmapId) -> Result<&DirtyBitmap> {
        let bm = self.current_unloaded(id).ok_or_else(|| no_such(id))?;
        if !bm.is_loaded() && !bm.inconsistent() {
            self.bitmap_mut(id)?.ensure_loaded()?;
        }
        self.get_unfolded(id).ok_or_else(|| no_such(id))
    }

    /// A bitmap by id for reading its bits: with every write logged so far that it records (a
    /// catch-up of this bitmap only), its data not loaded if still on disk (its readers load
    /// it or answer "unusable"). None when the bitmap does not exist. The read path of the
    /// per-call searches: it hands the bitmap out for reading only, so the slot indexes have
    /// nothing to reconcile at the next call, and costs two loads for the log and one lookup
    /// when nothing is pending.
    #[inline]
    pub(crate) fn current_unloaded(&mut self, id: BitmapId) -> Option<&DirtyBitmap> {
        self.absorb_and_catch_up(id);
        self.get_unfolded(id)
    }

    /// Gives the log the base granularity: the finest among the bitmaps that can ever record
    /// (inconsistent ones never do), or none when there is none. Called after every change of
    /// the list.
    fn refresh_log(&mut self) {
        let g = self.slots.min_granularity_bits();
        self.log.set_granularity_bits(g);
    }

    /// The disk length the bitmaps cover.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Every bitmap, newest first (QEMU's list order), anonymous successors included.
    pub fn ids(&self) -> Vec<BitmapId> {
        self.slots.ids().collect()
    }

    /// The first bitmap of the list (the newest), in O(log n).
    pub fn first(&self) -> Option<BitmapId> {
        self.slots.first()
    }

    /// The bitmap that follows `id` in the list (the next older one), in O(log n); None at
    /// the end of the list or when `id` does not exist.
    pub fn next_after(&self, id: BitmapId) -> Option<BitmapId> {
        if !self.slots.contains(id) {
            return None;
        }
        self.slots.after(id)
    }

    /// Number of bitmaps.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the set holds no bitmap.
    pub fn is_empty(&self) -> bool {
        self.slots.len() == 0
    }

    /// The bitmaps' states, newest first (no bits: see the module documentation).
    pub fn iter(&self) -> impl Iterator<Item = (BitmapId, StateView<'_>)> {
        self.slots.iter().map(|(id, bm)| (id, StateView(bm)))
    }

    /// A bitmap's state by id (no bits: read them through [`BitmapSet::current`]).
    pub fn get(&self, id: BitmapId) -> Option<StateView<'_>> {
        self.get_unfolded(id).map(StateView)
    }

    /// A bitmap by id as it is, without the writes the hook logged since its last catch-up:
    /// for the set's and the image's own bookkeeping (states, change tracking, sources), never
    /// for reading bits.
    #[inline]
    pub(crate) fn get_unfolded(&self, id: BitmapId) -> Option<&DirtyBitmap> {
        self.slots.get(id).map(|s| &s.bm)
    }

    /// Every bitmap as it is (see [`BitmapSet::get_unfolded`]), newest first.
    pub(crate) fn iter_unfolded(&self) -> impl Iterator<Item = (BitmapId, &DirtyBitmap)> {
        self.slots.iter()
    }

    /// A bitmap by id, for changes (up to date with the hook's writes first).
    pub fn get_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.changes += 1;
        if !self.slots.contains(id) {
            return None;
        }
        self.absorb_and_catch_up(id);
        self.slots.bitmap_mut(id)
    }

    /// A bitmap's state by id, or an error naming the id.
    pub fn bitmap(&self, id: BitmapId) -> Result<StateView<'_>> {
        self.get(id).ok_or_else(|| no_such(id))
    }

    /// A bitmap by id for changes, or an error naming the id.
    pub fn bitmap_mut(&mut self, id: BitmapId) -> Result<&mut DirtyBitmap> {
        self.get_mut(id).ok_or_else(|| no_such(id))
    }

    /// A bitmap by id for changes WITHOUT taking the hook's writes first: for bookkeeping that
    /// must not absorb writes logged meanwhile (after a store, resetting the change tracking:
    /// writes logged during the store stay pending and are tracked when the bitmap takes them).
    /// Must not change whether the bitmap records writes.
    pub(crate) fn get_mut_unfolded(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.slots.bitmap_mut(id)
    }

    /// A named bitmap (QEMU: bdrv_find_dirty_bitmap): the newest of that name, in O(1).
    /// Anonymous bitmaps never match.
    pub fn find(&self, name: &[u8]) -> Option<BitmapId> {
        self.slots.find_matching(name, |_| true)
    }

    /// The newest bitmap named `name` that passes `pred`.
    pub(crate) fn find_matching(
        &self,
        name: &[u8],
        pred: impl Fn(&DirtyBitmap) -> bool,
    ) -> Option<BitmapId> {
        self.slots.find_matching(name, pred)
    }

    /// Counts over every bitmap (readonly, named, persistent, and the directory bytes the
    /// persistent ones take), in O(1).
    pub(crate) fn totals(&self) -> Totals {
        self.slots.totals()
    }

    /// A named bitmap or QEMU's "Dirty bitmap 'X' not found".
    pub fn lookup(&self, name: &[u8]) -> Result<BitmapId> {
        self.find(name)
            .ok_or_else(|| Error::BitmapNotFound { name: lossy(name) })
    }

    /// Inserts a bitmap at the head of the list (newest first).
    pub fn insert(&mut self, bm: DirtyBitmap) -> BitmapId {
        self.changes += 1;
        self.absorb();
        let id = BitmapId(self.next_id);
        self.next_id += 1;
        // Writes logged before it are not its own.
        let cursor = self.epochs.seal();
        self.slots.insert(id, bm, cursor);
        self.refresh_log();
        id
    }

    /// Creates an enabled, empty, transient bitmap covering the disk (QEMU:
    /// bdrv_create_dirty_bitmap). `name` None creates an anonymous bitmap.
    pub fn create(&mut self, name: Option<&[u8]>, granularity: u64) -> Result<BitmapId> {
        self.absorb();
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
        self.absorb();
        self.check_release(id)?;
        self.remove_unchecked(id).ok_or_else(|| no_such(id))
    }

    /// Whether [`BitmapSet::release`] would accept `id`: refused (EBUSY) while the bitmap is
    /// busy, has a successor, has live iterators, or is itself a successor.
    pub(crate) fn check_release(&self, id: BitmapId) -> Result<()> {
        let bm = self.bitmap(id)?;
        let held = |why| {
            Err(Error::Held {
                name: bm.display_name(),
                why,
            })
        };
        if bm.busy() {
            return held("an operation holds it");
        }
        if bm.has_successor() {
            return held("it has a successor");
        }
        if bm.active_iterators() > 0 {
            return held("iterators on it are alive");
        }
        if self.slots.is_successor(id) {
            return held("it is a successor (it goes away through abdicate or reclaim)");
        }
        Ok(())
    }

    /// Removes a bitmap whatever its state (internal: removal of stored bitmaps, close).
    pub(crate) fn remove_unchecked(&mut self, id: BitmapId) -> Option<DirtyBitmap> {
        self.changes += 1;
        if !self.slots.contains(id) {
            return None;
        }
        self.absorb_and_catch_up(id);
        let bm = self.slots.remove(id)?;
        self.refresh_log();
        self.compact();
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
        self.absorb();
        if bytes == 0 {
            return;
        }
        let end = offset.saturating_add(bytes);
        if end > self.size {
            self.record_past_end(end);
            if offset >= self.size {
                return;
            }
        }
        let bytes = bytes.min(self.size - offset);
        let _ = self.slots.update_all(|_, bm| {
            if records(bm) {
                bm.mark_write(offset, bytes);
            }
            Ok::<(), ()>(())
        });
    }

    /// Whether any bitmap is readonly: the host must then refuse guest writes (QEMU:
    /// bdrv_has_readonly_bitmaps, which makes writes fail with EPERM). O(1).
    pub fn has_readonly(&self) -> bool {
        self.slots.totals().readonly > 0
    }

    /// Whether any bitmap has a name (QEMU: bdrv_has_named_bitmaps). O(1).
    pub fn has_named(&self) -> bool {
        self.slots.totals().named > 0
    }

    /// Freezes a bitmap for an operation (QEMU: bdrv_dirty_bitmap_create_successor): a new
    /// anonymous successor with the same granularity records writes in its place (it starts
    /// with the parent's enabled state), and the parent becomes disabled and busy.
    pub fn create_successor(&mut self, id: BitmapId) -> Result<BitmapId> {
        self.absorb();
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
        self.absorb();
        let child = self.successor_of(
            id,
            "Cannot relinquish control if there's no successor present",
        )?;
        let parent = self.bitmap(id)?;
        if parent.active_iterators() > 0 {
            return Err(Error::Held {
                name: parent.display_name(),
                why: "iterators on it are alive",
            });
        }
        // The successor must still exist before anything changes: a failed call changes
        // nothing (the parent, and its stored copy, stay).
        if !self.slots.contains(child) {
            return Err(Error::Precondition(format!(
                "Cannot relinquish control of bitmap '{}': its successor no longer exists",
                parent.display_name()
            )));
        }
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
        self.absorb();
        let child = self.successor_of(id, "Cannot reclaim a successor when none is present")?;
        if let Some(c) = self.get(child) {
            if c.active_iterators() > 0 {
                return Err(Error::Held {
                    name: "(successor)".into(),
                    why: "iterators on it are alive",
                });
            }
        }
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
        self.changes += 1;
        self.fold();
        for (_, b) in self.slots.iter() {
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
        self.slots.update_all(|_, bm| bm.ensure_loaded())?;
        self.slots.update_all(|_, bm| bm.truncate(new_size))?;
        self.size = new_size;
        // Every bitmap took every epoch above (fold), so none is left at the old size.
        debug_assert_eq!(self.epochs.len(), 0);
        self.epochs.clear();
        self.log.set_size(new_size);
        Ok(())
    }

    /// A snapshot of every bitmap (QEMU: bdrv_query_dirty_bitmaps), anonymous ones included,
    /// with every write logged so far. Bitmaps still on disk are loaded for their counts; a
    /// read error fails the query (naming the bitmap). An inconsistent bitmap's count is 0, as
    /// QEMU reports it, beside `inconsistent: true`.
    pub fn query(&mut self) -> Result<Vec<BitmapInfo>> {
        self.fold();
        self.slots.update_all(|_, bm| bm.ensure_loaded())?;
        Ok(self
            .slots
            .iter()
            .map(|(id, bm)| BitmapInfo {
                id,
                name: bm.name().map(<[u8]>::to_vec),
                count: if bm.inconsistent() {
                    0
                } else {
                    bm.bits().count()
                },
                granularity: bm.granularity(),
                recording: self.recording(id),
                busy: bm.busy(),
                persistent: bm.persistent(),
                inconsistent: bm.inconsistent(),
            })
            .collect())
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

    /// A new iterator at offset 0 (QEMU: bdrv_dirty_iter_new). Refused for an inconsistent
    /// bitmap (QEMU's message and hint) and when its data cannot be read: the data is loaded
    /// here, so that the iterator's steps cannot fail.
    pub fn iter_new(&mut self, id: BitmapId) -> Result<DirtyIter> {
        self.current(id)?.usable_bits()?;
        // An iterator changes no bit and no flag: not counted in `changes`.
        if let Some(bm) = self.slots.bitmap_mut(id) {
            bm.add_iterator(1);
        }
        Ok(DirtyIter { bitmap: id, pos: 0 })
    }

    /// The start of the next dirty granule, or None when none is left (QEMU:
    /// bdrv_dirty_iter_next). Bits set behind the iterator are not seen; bits reset ahead of
    /// it are respected; the hook's writes ahead of it are seen. Fails when the bitmap no
    /// longer exists or cannot be read: an iteration that cannot go on never ends as if the
    /// rest were clean.
    pub fn iter_next(&mut self, it: &mut DirtyIter) -> Result<Option<u64>> {
        let bm = self
            .current_unloaded(it.bitmap)
            .ok_or_else(|| no_such(it.bitmap))?;
        let g = bm.granularity();
        let Some(at) = bm.usable_bits()?.next_dirty(it.pos, u64::MAX) else {
            return Ok(None);
        };
        let granule = at - at % g;
        it.pos = granule.saturating_add(g);
        Ok(Some(granule))
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
        if let Some(bm) = self.slots.bitmap_mut(it.bitmap) {
            bm.add_iterator(-1);
        }
    }

    /// A new anonymous bitmap with `granularity` over the disk (merge accumulators).
    pub fn scratch(&self, granularity: u64) -> Result<DirtyBitmap> {
        DirtyBitmap::new(None, self.size, granularity)
    }
}

#[cfg(test)]
mod tests {
    //! The lazy fan-out (epochs and per-bitmap catch-up) against a set whose bitmaps are
    //! marked directly at every write, reading one bitmap at a time so that the others stay
    //! behind.
    use super::*;

    use qdirty_testkit::Prng as Rng;

    fn same_bits(a: &DirtyBitmap, b: &DirtyBitmap, ctx: &str) {
        assert_eq!(a.count(), b.count(), "{ctx} count");
        assert_eq!(a.sha256().unwrap(), b.sha256().unwrap(), "{ctx} bits");
    }

    fn catch_up_sequence(seed: u64) {
        let mut rng = Rng::new(seed);
        let size = 512 * (1 + rng.below(1 << 15)) + rng.below(512);
        let mut a = BitmapSet::new(size);
        let mut b = BitmapSet::new(size);
        let hook = a.write_hook();
        let mut iters: Vec<(DirtyIter, DirtyIter)> = Vec::new();
        for step in 0..600 {
            let ctx = format!("seed {seed} step {step}");
            let ids = b.ids();
            let pick = |rng: &mut Rng| {
                (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize])
            };
            match rng.below(100) {
                0..=49 => {
                    let off = rng.below(size + 4096);
                    let max = if rng.below(4) == 0 { size } else { 1 << 18 };
                    let len = 1 + rng.below(max);
                    hook.set(off, len);
                    b.set_dirty(off, len);
                }
                50..=55 => {
                    let g = 1u64 << (9 + rng.below(10));
                    let ra = a.create(None, g).is_ok();
                    assert_eq!(ra, b.create(None, g).is_ok(), "{ctx}");
                }
                56..=57 => {
                    if let Some(id) = pick(&mut rng) {
                        assert_eq!(a.release(id).is_ok(), b.release(id).is_ok(), "{ctx}");
                    }
                }
                58..=64 => {
                    if let Some(id) = pick(&mut rng) {
                        let on = rng.below(2) == 0;
                        for s in [&mut a, &mut b] {
                            let bm = s.bitmap_mut(id).unwrap();
                            let _ = if on { bm.enable() } else { bm.disable() };
                        }
                    }
                }
                65..=69 => {
                    // A reset after a catch-up must not bring the old writes back.
                    if let Some(id) = pick(&mut rng) {
                        let off = rng.below(size);
                        let len = 1 + rng.below(size - off);
                        let ra = a.bitmap_mut(id).unwrap().reset_dirty(off, len).is_ok();
                        let rb = b.bitmap_mut(id).unwrap().reset_dirty(off, len).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                70..=74 => {
                    if let (Some(t), Some(s)) = (pick(&mut rng), pick(&mut rng)) {
                        let sa = a.current(s).unwrap().clone();
                        let sb = b.current(s).unwrap().clone();
                        let ra = a.merge(t, &sa, false).is_ok();
                        assert_eq!(ra, b.merge(t, &sb, false).is_ok(), "{ctx}");
                    }
                }
                75..=77 => {
                    if let Some(id) = pick(&mut rng) {
                        let ra = a.create_successor(id).is_ok();
                        assert_eq!(ra, b.create_successor(id).is_ok(), "{ctx}");
                    }
                }
                78..=79 => {
                    if let Some(id) = pick(&mut rng) {
                        assert_eq!(a.abdicate(id).is_ok(), b.abdicate(id).is_ok(), "{ctx}");
                    }
                }
                80..=81 => {
                    if let Some(id) = pick(&mut rng) {
                        assert_eq!(a.reclaim(id).is_ok(), b.reclaim(id).is_ok(), "{ctx}");
                    }
                }
                82..=84 => {
                    if let Some(id) = pick(&mut rng) {
                        if let (Ok(ia), Ok(ib)) = (a.iter_new(id), b.iter_new(id)) {
                            iters.push((ia, ib));
                        }
                    }
                }
                85..=88 => {
                    if !iters.is_empty() {
                        let k = rng.below(iters.len() as u64) as usize;
                        let (ia, ib) = &mut iters[k];
                        assert_eq!(
                            a.iter_next(ia).unwrap(),
                            b.iter_next(ib).unwrap(),
                            "{ctx} iter"
                        );
                        if rng.below(8) == 0 {
                            let (ia, ib) = iters.swap_remove(k);
                            a.iter_free(ia);
                            b.iter_free(ib);
                        }
                    }
                }
                _ => {
                    // Read one bitmap: only it catches up.
                    if let Some(id) = pick(&mut rng) {
                        let x = a.current(id).unwrap().clone();
                        same_bits(&x, b.get_unfolded(id).unwrap(), &format!("{ctx} {id:?}"));
                    }
                }
            }
            // Epochs never outnumber the distinct cursors of recording bitmaps (+ the open one).
            let recording = a.slots.iter().filter(|(_, b)| records(b)).count();
            a.slots.check();
            assert!(
                a.epochs.len() <= recording + 1,
                "{ctx}: {} epochs",
                a.epochs.len()
            );
        }
        for (ia, ib) in iters {
            a.iter_free(ia);
            b.iter_free(ib);
        }
        a.fold();
        assert_eq!(a.ids(), b.ids(), "seed {seed}");
        for ((id, x), (_, y)) in a.iter_unfolded().zip(b.iter_unfolded()) {
            assert_eq!(x.enabled(), y.enabled(), "seed {seed} {id:?}");
            same_bits(x, y, &format!("seed {seed} end {id:?}"));
        }
        assert_eq!(
            a.epochs.len(),
            0,
            "seed {seed}: a full fold leaves no epoch"
        );
    }

    #[test]
    fn lazy_catch_up_matches_direct_marking() {
        for seed in 1..=120 {
            catch_up_sequence(seed);
        }
    }

    /// What the indexes answer (find, the totals, successors, the list walk, the log's base
    /// granularity) equals a scan of the list, whatever changes the bitmaps go through,
    /// including flag and name changes made through the `&mut` accessors.
    #[test]
    fn indexes_match_a_scan_of_the_list() {
        let mut rng = Rng::new(0x51075);
        let size = 1 << 24;
        let mut set = BitmapSet::new(size);
        let names: Vec<Vec<u8>> = (0..6).map(|i| format!("n{i}").into_bytes()).collect();
        for step in 0..3000 {
            let ids = set.ids();
            let pick = |rng: &mut Rng| {
                (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize])
            };
            match rng.below(16) {
                0..=2 => {
                    let name = &names[rng.below(6) as usize];
                    let g = 1u64 << (9 + rng.below(8));
                    let _ = set.create((rng.below(4) != 0).then_some(&name[..]), g);
                }
                3 => {
                    // Duplicate names only come through insert: find gives the newest.
                    let name = &names[rng.below(6) as usize];
                    set.insert(DirtyBitmap::new(Some(name), size, 4096).unwrap());
                }
                4 => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.release(id);
                    }
                }
                5 => {
                    if let Some(id) = pick(&mut rng) {
                        set.remove_unchecked(id);
                    }
                }
                6 => {
                    if let Some(id) = pick(&mut rng) {
                        let ro = rng.below(2) == 0;
                        set.get_mut(id).unwrap().set_readonly(ro);
                    }
                }
                7 => {
                    if let Some(id) = pick(&mut rng) {
                        let p = rng.below(2) == 0;
                        set.get_mut(id).unwrap().set_persistence(p);
                    }
                }
                8 => {
                    if let Some(id) = pick(&mut rng) {
                        let bm = set.get_mut(id).unwrap();
                        let _ = if rng.below(2) == 0 {
                            bm.enable()
                        } else {
                            bm.disable()
                        };
                    }
                }
                9 => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.get_mut(id).unwrap().set_inconsistent();
                    }
                }
                10 => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.create_successor(id);
                    }
                }
                11 => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.abdicate(id);
                    }
                }
                12 => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.reclaim(id);
                    }
                }
                13 => {
                    // A change through the accessor, then queries before any other `&mut` call.
                    if let Some(id) = pick(&mut rng) {
                        let bm = set.get_mut(id).unwrap();
                        bm.set_readonly(!bm.readonly());
                        bm.set_persistence(!bm.persistent());
                    }
                }
                14 => {
                    let off = rng.below(size);
                    set.write_hook().set(off, 1 + rng.below(1 << 20));
                }
                _ => {
                    if let Some(id) = pick(&mut rng) {
                        let _ = set.current(id);
                    }
                }
            }
            let ctx = format!("step {step}");
            let list: Vec<(BitmapId, &DirtyBitmap)> = set.iter_unfolded().collect();
            for name in &names {
                let newest = list
                    .iter()
                    .find(|(_, b)| b.name() == Some(&name[..]))
                    .map(|(id, _)| *id);
                assert_eq!(set.find(name), newest, "{ctx}");
                let consistent = list
                    .iter()
                    .find(|(_, b)| b.name() == Some(&name[..]) && !b.inconsistent())
                    .map(|(id, _)| *id);
                assert_eq!(
                    set.find_matching(name, |b| !b.inconsistent()),
                    consistent,
                    "{ctx}"
                );
            }
            let persistent: Vec<&&DirtyBitmap> = list
                .iter()
                .map(|(_, b)| b)
                .filter(|b| b.persistent())
                .collect();
            let totals = set.totals();
            assert_eq!(totals.persistent, persistent.len(), "{ctx}");
            let bytes: u64 = persistent
                .iter()
                .map(|b| {
                    crate::format::bitmap_dir::BitmapDirEntry::size_for_name(
                        b.name().map_or(0, <[u8]>::len),
                    )
                })
                .sum();
            assert_eq!(totals.persistent_entry_bytes, bytes, "{ctx}");
            assert_eq!(
                set.has_readonly(),
                list.iter().any(|(_, b)| b.readonly()),
                "{ctx}"
            );
            assert_eq!(
                set.has_named(),
                list.iter().any(|(_, b)| b.name().is_some()),
                "{ctx}"
            );
            for &(id, _) in &list {
                let is_successor = list.iter().any(|(_, b)| b.successor() == Some(id));
                assert_eq!(set.slots.is_successor(id), is_successor, "{ctx}");
            }
            let mut walked = Vec::new();
            let mut at = set.first();
            while let Some(id) = at {
                walked.push(id);
                at = set.next_after(id);
            }
            assert_eq!(walked, set.ids(), "{ctx}");
            let finest = list
                .iter()
                .filter(|(_, b)| !b.inconsistent())
                .map(|(_, b)| b.granularity_bits())
                .min();
            // Never coarser than the finest bitmap that records (the base granularity is
            // refreshed when the list changes; a bitmap turning inconsistent leaves it finer).
            let base = set.write_hook().granularity_bits();
            if let Some(g) = finest {
                assert!(base.is_some_and(|b| b <= g), "{ctx}: {base:?} > {g}");
            }
            if matches!(step % 16, 0..=5) {
                set.refresh_log();
                assert_eq!(set.write_hook().granularity_bits(), finest, "{ctx}");
            }
            set.slots.check();
        }
    }

    /// With one bitmap recording, an absorb gives it the writes at once and builds no epoch;
    /// a bitmap enabled later does not get them.
    #[test]
    fn a_sole_recording_bitmap_takes_the_writes_without_an_epoch() {
        let size = 1u64 << 30;
        let mut set = BitmapSet::new(size);
        let a = set.create(None, 4096).unwrap();
        let off = set.create(None, 512).unwrap();
        set.bitmap_mut(off).unwrap().disable().unwrap();
        let hook = set.write_hook();
        hook.set(8192, 100);
        hook.set(1 << 29, 1 << 20);
        set.absorb();
        assert_eq!(set.epochs.len(), 0);
        assert_eq!(set.get_unfolded(a).unwrap().count(), 4096 + (1 << 20));
        set.bitmap_mut(off).unwrap().enable().unwrap();
        hook.set(0, 1);
        assert_eq!(set.current(off).unwrap().count(), 512);
        assert_eq!(set.current(a).unwrap().count(), 2 * 4096 + (1 << 20));
    }

    /// One write over a whole 1 TiB disk reaches the bitmaps as whole pieces: every granule
    /// dirty, the chunks full (no storage), and a write with unaligned ends exact at both.
    #[test]
    fn one_write_over_the_whole_disk() {
        let size = 1u64 << 40;
        let mut set = BitmapSet::new(size);
        let fine = set.create(None, 512).unwrap();
        let coarse = set.create(None, 1 << 16).unwrap();
        let hook = set.write_hook();
        hook.set(0, size);
        for id in [fine, coarse] {
            let bm = set.current(id).unwrap();
            assert_eq!(bm.count(), size);
            assert!(bm.memory() <= 64 << 10, "{}", bm.memory());
        }
        for id in [fine, coarse] {
            set.bitmap_mut(id).unwrap().clear().unwrap();
        }
        // From byte 1000 to 5000 bytes before the end.
        hook.set(1000, size - 6000);
        let bm = set.current(fine).unwrap();
        assert_eq!(bm.count(), size - 512 - 9 * 512);
        assert_eq!(bm.next_dirty(0, size), Some(512));
        assert_eq!(bm.next_zero(512, size), Some(size - 9 * 512));
        let bm = set.current(coarse).unwrap();
        assert_eq!(bm.count(), size);
    }

    #[test]
    fn writes_cost_one_set_whatever_the_number_of_bitmaps() {
        // 1000 enabled bitmaps; after writes, reading one bitmap leaves the others behind and
        // the pending writes are held once, not once per bitmap.
        let size = 1u64 << 40;
        let mut set = BitmapSet::new(size);
        let ids: Vec<BitmapId> = (0..1000)
            .map(|_| set.create(None, 65536).unwrap())
            .collect();
        let hook = set.write_hook();
        for i in 0..1000u64 {
            hook.set(i * (1 << 30), 4096);
        }
        assert_eq!(set.current(ids[0]).unwrap().count(), 1000 * 65536);
        assert_eq!(set.epochs.len(), 1);
        assert_eq!(
            set.get_unfolded(ids[1]).unwrap().count(),
            0,
            "not caught up yet"
        );
        assert_eq!(set.current(ids[999]).unwrap().count(), 1000 * 65536);
        set.fold();
        assert!(set.iter_unfolded().all(|(_, b)| b.count() == 1000 * 65536));
        assert_eq!(set.epochs.len(), 0);
    }
}
