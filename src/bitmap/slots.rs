//! The bitmaps of a [`BitmapSet`](super::BitmapSet) and the indexes over them, so that every
//! add, lookup, removal and store step costs O(log n) in the number of bitmaps:
//!
//! * by id, in a hash map, and the ids in a `BTreeSet` for the order: ids only grow (a set
//!   never reuses one) and a new bitmap always goes to the head of QEMU's list, so the list
//!   order, newest first, is descending id order, and the next bitmap in the list is the next
//!   smaller id;
//! * by name: the hash of each name to the bitmaps that carry it (names are compared in full on
//!   lookup; QEMU's `bdrv_find_dirty_bitmap` returns the first match in list order, the newest);
//! * running totals: the granularities of the consistent bitmaps (the log's base granularity is
//!   the smallest), the cursors of the recording bitmaps (which epochs are still needed), the
//!   number of readonly, named and persistent bitmaps, the directory bytes the persistent ones
//!   take, and which bitmaps are some bitmap's successor.
//!
//! # Keeping the indexes exact
//!
//! A caller changes a bitmap's flags (enable, set_readonly, set_persistence, ...) through the
//! `&mut DirtyBitmap` the set hands out, out of sight of the indexes. So every slot keeps the
//! [`Summary`] the indexes were last built from, and the slot last handed out for changes is
//! *pending*: the next `&mut` call on the slots first *reconciles* it (its summary is
//! recomputed and the indexes move by the difference), and the `&self` queries correct their
//! answer for it. Only one slot can be pending: handing out another reconciles the first. So
//! every index read sees every change, for O(log n) work per call.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::{BitmapId, DirtyBitmap};
use crate::format::bitmap_dir::BitmapDirEntry;

/// Whether the hook's writes go to `bm` (QEMU's bdrv_set_dirty: enabled bitmaps; readonly and
/// inconsistent ones are never written).
pub(super) fn records(bm: &DirtyBitmap) -> bool {
    bm.enabled() && !bm.readonly() && !bm.inconsistent()
}

/// What the indexes know of one bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Summary {
    records: bool,
    /// Not inconsistent: its granularity counts for the log's base granularity.
    consistent: bool,
    granularity_bits: u32,
    readonly: bool,
    persistent: bool,
    /// Hash and length of the name.
    name: Option<(u64, usize)>,
    successor: Option<BitmapId>,
}

/// Counts over every bitmap of a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Bitmaps with the readonly flag.
    pub(crate) readonly: usize,
    /// Bitmaps with a name.
    pub(crate) named: usize,
    /// Bitmaps with the (raw) persistent flag.
    pub(crate) persistent: usize,
    /// The directory bytes the persistent bitmaps' entries take (no extra data), as QEMU's
    /// qcow2_co_can_store_new_dirty_bitmap counts them.
    pub(crate) persistent_entry_bytes: u64,
}

impl Totals {
    fn apply(&mut self, s: &Summary, add: bool) {
        let step = |v: &mut usize, on: bool| {
            if on {
                if add {
                    *v += 1;
                } else {
                    *v -= 1;
                }
            }
        };
        step(&mut self.readonly, s.readonly);
        step(&mut self.named, s.name.is_some());
        step(&mut self.persistent, s.persistent);
        if s.persistent {
            let bytes = BitmapDirEntry::size_for_name(s.name.map_or(0, |(_, len)| len));
            if add {
                self.persistent_entry_bytes += bytes;
            } else {
                self.persistent_entry_bytes -= bytes;
            }
        }
    }
}

/// One bitmap of the set.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) bm: DirtyBitmap,
    /// The first epoch whose writes this bitmap has not taken yet (epoch.rs). Its recording
    /// state cannot change without a catch-up, so between two catch-ups it either records
    /// all the writes of the epochs in between or none.
    cursor: u64,
    /// What the indexes were last built from.
    seen: Summary,
}

impl Slot {
    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }
}

/// Hashes bitmap ids (sequential numbers, never chosen by a caller) and name hashes (already
/// keyed by a random state) with one multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<BitmapId, V, BuildHasherDefault<IdHasher>>;

/// The bitmaps carrying one name hash: almost always one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NameIds {
    One(BitmapId),
    Many(Vec<BitmapId>),
}

impl NameIds {
    fn as_slice(&self) -> &[BitmapId] {
        match self {
            NameIds::One(id) => std::slice::from_ref(id),
            NameIds::Many(v) => v,
        }
    }
}

/// Adds one to the multiplicity of `key` (`add`), or takes one away, dropping it at zero.
fn count<K: Ord>(map: &mut BTreeMap<K, usize>, key: K, add: bool) {
    if add {
        *map.entry(key).or_default() += 1;
    } else if let std::collections::btree_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// The bitmaps of a set with their indexes (module documentation).
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// Boxed: the table stays small (a lookup touches one line of it), whatever a bitmap's size.
    map: IdMap<Box<Slot>>,
    /// Every id, in order (the list is in descending order).
    order: BTreeSet<BitmapId>,
    hasher: RandomState,
    /// Name hash to the bitmaps with a name of that hash.
    by_name: HashMap<u64, NameIds, BuildHasherDefault<IdHasher>>,
    totals: Totals,
    /// Cursors of the recording bitmaps, with their multiplicity.
    cursors: BTreeMap<u64, usize>,
    /// The recording bitmaps.
    recording: HashSet<BitmapId, BuildHasherDefault<IdHasher>>,
    /// Granularities (log2) of the consistent bitmaps, with their multiplicity.
    granularities: BTreeMap<u32, usize>,
    /// Bitmaps that are some bitmap's successor, with their multiplicity.
    successors: IdMap<usize>,
    /// The slot last handed out for changes, not reconciled yet.
    pending: Option<BitmapId>,
}

impl Slots {
    fn summary(&self, bm: &DirtyBitmap) -> Summary {
        Summary {
            records: records(bm),
            consistent: !bm.inconsistent(),
            granularity_bits: bm.granularity_bits(),
            readonly: bm.readonly(),
            persistent: bm.persistent(),
            name: bm.name().map(|n| (self.hasher.hash_one(n), n.len())),
            successor: bm.successor(),
        }
    }

    /// Adds (or removes) bitmap `id` with summary `s` and cursor `cursor` to (from) the indexes.
    fn account(&mut self, id: BitmapId, s: &Summary, cursor: u64, add: bool) {
        self.totals.apply(s, add);
        if s.records {
            count(&mut self.cursors, cursor, add);
            if add {
                self.recording.insert(id);
            } else {
                self.recording.remove(&id);
            }
        }
        if s.consistent {
            count(&mut self.granularities, s.granularity_bits, add);
        }
        if let Some(child) = s.successor {
            if add {
                *self.successors.entry(child).or_default() += 1;
            } else if let Some(n) = self.successors.get_mut(&child) {
                *n -= 1;
                if *n == 0 {
                    self.successors.remove(&child);
                }
            }
        }
        if let Some((hash, _)) = s.name {
            use std::collections::hash_map::Entry;
            match (self.by_name.entry(hash), add) {
                (Entry::Vacant(e), true) => {
                    e.insert(NameIds::One(id));
                }
                (Entry::Occupied(mut e), true) => {
                    let mut v = e.get().as_slice().to_vec();
                    v.push(id);
                    e.insert(NameIds::Many(v));
                }
                (Entry::Occupied(mut e), false) => {
                    let mut v = e.get().as_slice().to_vec();
                    v.retain(|&x| x != id);
                    match v.len() {
                        0 => {
                            e.remove();
                        }
                        1 => {
                            e.insert(NameIds::One(v[0]));
                        }
                        _ => {
                            e.insert(NameIds::Many(v));
                        }
                    }
                }
                (Entry::Vacant(_), false) => {}
            }
        }
    }

    /// Brings the indexes up to date with the changes made to the pending slot.
    #[inline]
    pub(super) fn reconcile(&mut self) {
        if self.pending.is_some() {
            self.reconcile_pending();
        }
    }

    /// [`Slots::reconcile`] when a slot is pending.
    fn reconcile_pending(&mut self) {
        let Some(id) = self.pending.take() else {
            return;
        };
        let Some(slot) = self.map.get(&id) else {
            return;
        };
        let (old, now, cursor) = (slot.seen, self.summary(&slot.bm), slot.cursor);
        if old != now {
            self.account(id, &old, cursor, false);
            self.account(id, &now, cursor, true);
            if let Some(slot) = self.map.get_mut(&id) {
                slot.seen = now;
            }
        }
    }

    /// Adds a bitmap; `id` must be greater than every id so far (the head of the list).
    pub(super) fn insert(&mut self, id: BitmapId, bm: DirtyBitmap, cursor: u64) {
        self.reconcile();
        debug_assert!(self.order.last().is_none_or(|&last| last < id));
        let seen = self.summary(&bm);
        self.account(id, &seen, cursor, true);
        self.map.insert(id, Box::new(Slot { bm, cursor, seen }));
        self.order.insert(id);
    }

    /// Removes a bitmap.
    pub(super) fn remove(&mut self, id: BitmapId) -> Option<DirtyBitmap> {
        self.reconcile();
        let slot = self.map.remove(&id)?;
        self.order.remove(&id);
        self.account(id, &slot.seen, slot.cursor, false);
        Some(slot.bm)
    }

    #[inline]
    pub(super) fn get(&self, id: BitmapId) -> Option<&Slot> {
        self.map.get(&id).map(|s| &**s)
    }

    pub(super) fn contains(&self, id: BitmapId) -> bool {
        self.map.contains_key(&id)
    }

    /// A bitmap for changes of any kind: it becomes the pending slot.
    pub(super) fn bitmap_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.reconcile();
        let slot = self.map.get_mut(&id)?;
        self.pending = Some(id);
        Some(&mut slot.bm)
    }

    /// Moves a bitmap's cursor.
    pub(super) fn set_cursor(&mut self, id: BitmapId, cursor: u64) {
        self.reconcile();
        let Some(slot) = self.map.get_mut(&id) else {
            return;
        };
        let (old, records) = (slot.cursor, slot.seen.records);
        slot.cursor = cursor;
        if records {
            count(&mut self.cursors, old, false);
            count(&mut self.cursors, cursor, true);
        }
    }

    /// Every bitmap, newest first (QEMU's list order).
    pub(super) fn iter(&self) -> impl Iterator<Item = (BitmapId, &DirtyBitmap)> {
        self.order.iter().rev().map(|id| (*id, &self.map[id].bm))
    }

    /// Every id, newest first.
    pub(super) fn ids(&self) -> impl Iterator<Item = BitmapId> + '_ {
        self.order.iter().rev().copied()
    }

    /// The head of the list (the newest bitmap).
    pub(super) fn first(&self) -> Option<BitmapId> {
        self.order.last().copied()
    }

    /// The bitmap after `id` in the list (the next older one).
    pub(super) fn after(&self, id: BitmapId) -> Option<BitmapId> {
        self.order.range(..id).next_back().copied()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Calls `f` on every bitmap, newest first, for changes (each is reconciled after its
    /// call). Stops at the first error.
    pub(super) fn update_all<E>(
        &mut self,
        mut f: impl FnMut(BitmapId, &mut DirtyBitmap) -> Result<(), E>,
    ) -> Result<(), E> {
        self.reconcile();
        let ids: Vec<BitmapId> = self.ids().collect();
        for id in ids {
            let bm = self.bitmap_mut(id).expect("listed above");
            f(id, bm)?;
        }
        self.reconcile();
        Ok(())
    }

    /// The newest bitmap named `name` that passes `pred`.
    pub(super) fn find_matching(
        &self,
        name: &[u8],
        pred: impl Fn(&DirtyBitmap) -> bool,
    ) -> Option<BitmapId> {
        let hash = self.hasher.hash_one(name);
        let matches = |id: &BitmapId| {
            self.map
                .get(id)
                .is_some_and(|s| s.bm.name() == Some(name) && pred(&s.bm))
        };
        let indexed = self
            .by_name
            .get(&hash)
            .map_or(&[][..], NameIds::as_slice)
            .iter()
            .copied()
            .filter(matches)
            .max();
        // The pending slot may carry the name without being indexed under it yet.
        let pending = self.pending.filter(matches);
        indexed.max(pending)
    }

    /// The counts over every bitmap.
    pub(crate) fn totals(&self) -> Totals {
        let mut t = self.totals;
        if let Some(slot) = self.pending.and_then(|id| self.map.get(&id)) {
            t.apply(&slot.seen, false);
            t.apply(&self.summary(&slot.bm), true);
        }
        t
    }

    /// Whether some bitmap names `id` as its successor.
    pub(super) fn is_successor(&self, id: BitmapId) -> bool {
        let mut n = self.successors.get(&id).copied().unwrap_or(0);
        if let Some(slot) = self.pending.and_then(|p| self.map.get(&p)) {
            n -= usize::from(slot.seen.successor == Some(id));
            n += usize::from(slot.bm.successor() == Some(id));
        }
        n > 0
    }

    /// The finest granularity (log2) among the consistent bitmaps.
    pub(super) fn min_granularity_bits(&mut self) -> Option<u32> {
        self.reconcile();
        self.granularities.keys().next().copied()
    }

    /// The only bitmap that records writes, if exactly one does.
    pub(super) fn sole_recording(&mut self) -> Option<BitmapId> {
        self.reconcile();
        if self.recording.len() == 1 {
            self.recording.iter().next().copied()
        } else {
            None
        }
    }

    /// The cursors of the recording bitmaps (keys), with their multiplicity.
    pub(super) fn recording_cursors(&mut self) -> &BTreeMap<u64, usize> {
        self.reconcile();
        &self.cursors
    }

    /// Checks every index against a rebuild from the bitmaps (tests).
    #[cfg(test)]
    pub(super) fn check(&mut self) {
        self.reconcile();
        let mut fresh = Slots {
            hasher: self.hasher.clone(),
            ..Slots::default()
        };
        assert_eq!(self.order.len(), self.map.len());
        for &id in &self.order {
            let s = &self.map[&id];
            let seen = fresh.summary(&s.bm);
            assert_eq!(seen, s.seen, "summary of {id:?}");
            fresh.account(id, &seen, s.cursor, true);
        }
        assert_eq!(fresh.totals, self.totals);
        assert_eq!(fresh.cursors, self.cursors);
        assert_eq!(fresh.recording, self.recording);
        assert_eq!(fresh.granularities, self.granularities);
        assert_eq!(fresh.successors, self.successors);
        let sorted = |m: &HashMap<u64, NameIds, BuildHasherDefault<IdHasher>>| {
            let mut v: Vec<(u64, Vec<BitmapId>)> = m
                .iter()
                .map(|(&h, ids)| {
                    let mut ids = ids.as_slice().to_vec();
                    ids.sort();
                    (h, ids)
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&fresh.by_name), sorted(&self.by_name));
    }
}
