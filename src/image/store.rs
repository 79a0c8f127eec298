//! Storing bitmaps and removing stored ones (QEMU: qcow2_store_persistent_dirty_bitmaps,
//! qcow2_co_remove_persistent_dirty_bitmap; docs/format.md, 'Storing' and 'Removal').
//!
//! Write order, and what a crash at each point leaves:
//! 1. new data clusters and tables, 2. the new directory, 3. refcount blocks, then fdatasync:
//!    a crash here leaves the old header pointing at the old directory (whose entries are
//!    in_use, so the bitmaps are inconsistent); the new clusters only leak.
//! 4. the header naming the new directory, then fdatasync: this is the commit point.
//! 5. only then the old directory, tables and data clusters are freed (refcount decrements,
//!    written and flushed): a crash before that leaks them, nothing more.
//!
//! Store is incremental (docs/design.md, 'The incremental store'):
//! * a bitmap unchanged since it was loaded or last stored keeps its entry and table; only
//!   its flags change. When only flags change in the whole directory, the directory is
//!   rewritten in place with QEMU's header/directory/header order (docs/format.md, 'In-use
//!   marking') instead of a new one;
//!   when nothing changes, nothing is written;
//! * a changed bitmap gets a new table (copy-on-write): the data clusters whose table entries
//!   were touched are written to new clusters (allocated in contiguous runs, written in 1 MiB
//!   writes, full clusters from a shared all-ones buffer), the others are reused as they are
//!   (not freed, not re-incremented); after
//!   the commit the old table and the replaced data clusters are freed;
//! * new bitmaps, truncated ones and those without a usable stored copy are written fully.
//!
//! A store that fails before the commit (ENOSPC, EDQUOT, EFBIG, I/O error) frees what it
//! allocated and changes nothing else: the directory on disk is the old one (with its in_use
//! flags) and the in-memory bitmaps, their change tracking included, are as before. A first
//! bitmaps extension that cluster 0 has no room for (512-byte clusters and a long backing file
//! name) fails the store with ENOSPC before anything is written, as QEMU's store fails.
//!
//! Before anything is written, every cluster the store will free after the commit (the old
//! directory, the old tables and data clusters of the bitmaps it rewrites) passes the overlap
//! check (`overlap.rs`): it must hold that structure and nothing else. A cluster shared with
//! other metadata (a corrupt table naming the refcount table, an L1 table, another bitmap's
//! table...) stops the store with an error naming both, and nothing is written.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use super::overlap::Structure;
use super::storage::Storage;
use super::table_source::MAX_IO_BYTES;
use super::{alloc, Qcow2File, StoredDirectory};
use crate::bitmap::{BitmapId, BitmapSet, DirtyBitmap};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{encode_directory, BitmapDirEntry};
use crate::format::bitmap_table::{
    decode_table, encode_table, measure_bitmaps, table_size_for, TableEntry,
};
use crate::format::extension::BitmapsExt;
use crate::format::{
    AUTOCLEAR_BITMAPS, BME_FLAG_AUTO, BME_FLAG_IN_USE, BT_DIRTY_TRACKING_BITMAP, QCOW2_MAX_BITMAPS,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};

/// What a store is for, which decides the in_use flags it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StoreMode {
    /// Close: in_use cleared, the stored bitmaps dropped from memory. Guest writes have
    /// stopped (the host's part of the protocol).
    Close,
    /// Switch to read-only: in_use cleared, the bitmaps stay in memory, readonly. Guest writes
    /// have stopped.
    ReadOnly,
    /// A checkpoint while the image stays writable: the data and tables are written, but every
    /// stored bitmap stays in_use on disk. Guest writes may go on during and after it, and one
    /// that reaches the disk before its hook call would be missing from a copy marked
    /// consistent: so no copy is ever marked consistent while its bitmap still records.
    Checkpoint,
    /// Durable mode (durable.rs): the stored copies are never in_use; each recording bitmap
    /// is stored with the zones of the writes in flight dirty. The bitmaps stay in memory,
    /// writable.
    Durable,
}

/// Clusters to give back after a commit: (offset, number of clusters).
type FreeList = Vec<(u64, u64)>;

/// The bitmaps a store left out because their data could not be read: their stored copies
/// stay as they were on disk (in_use, since they miss the writes recorded since the open),
/// and they stay in memory; every other bitmap was stored.
#[derive(Debug, Default)]
#[must_use]
pub(super) struct Unstored(Vec<(String, Error)>);

impl Unstored {
    /// Whether every bitmap was stored.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ok when every bitmap was stored; else the first read error, naming every bitmap left out.
    pub(super) fn into_result(self) -> Result<()> {
        let mut it = self.0.into_iter();
        let Some((first_name, first)) = it.next() else {
            return Ok(());
        };
        let mut names = format!("'{first_name}'");
        for (n, _) in it {
            names.push_str(&format!(", '{n}'"));
        }
        Err(first.context(format!(
            "Bitmaps not stored (they stay in use in the image): {names}"
        )))
    }
}

/// Size of the all-ones buffer full data clusters are written from (rounded down to whole
/// clusters, at least one): small enough to stay in the CPU cache while the kernel copies it
/// again and again, large enough for few I/O vectors per run.
const ONES_BYTES: usize = 1 << 20;

/// Largest single write of bitmap data. A run of clusters is allocated whole (up to
/// MAX_IO_BYTES) but written in pieces of this size, as a plain sequential write would be: on a
/// virtual machine that has handed its free memory back to its hypervisor, much larger writes
/// reach the page cache several times more slowly than 1 MiB writes (BENCHMARKS.md, I/O).
const WRITE_BYTES: usize = 1 << 20;

/// Writes `slices` (one run, as if concatenated) at `off` in vectored writes of at most
/// [`WRITE_BYTES`] each.
fn write_in_pieces(storage: &mut dyn Storage, slices: &[&[u8]], mut off: u64) -> io::Result<()> {
    let mut call: Vec<&[u8]> = Vec::new();
    let mut len = 0usize;
    for &s in slices {
        let mut s = s;
        while !s.is_empty() {
            let take = s.len().min(WRITE_BYTES - len);
            call.push(&s[..take]);
            len += take;
            s = &s[take..];
            if len == WRITE_BYTES {
                storage.write_all_vectored_at(&call, off)?;
                off += len as u64;
                call.clear();
                len = 0;
            }
        }
    }
    if len > 0 {
        storage.write_all_vectored_at(&call, off)?;
    }
    Ok(())
}

/// How one stored bitmap is written.
#[derive(Debug)]
enum Plan {
    /// Unchanged: the entry keeps its table; only the flags may change.
    Keep,
    /// New table; only the touched data clusters are rewritten (old table given).
    Partial(Vec<TableEntry>),
    /// Everything is written.
    Full,
}

/// One bitmap to store.
#[derive(Debug)]
struct Job {
    id: BitmapId,
    /// Its index in the new directory.
    entry_index: usize,
    /// Its current entry on disk, if any (in_use, ours).
    old: Option<BitmapDirEntry>,
    plan: Plan,
}

/// What a store would do now (see [`Qcow2File::plan_store`]).
#[derive(Debug)]
struct StorePlan {
    entries: Vec<BitmapDirEntry>,
    jobs: Vec<Job>,
}

impl StorePlan {
    fn writes_data(&self) -> bool {
        self.jobs.iter().any(|j| !matches!(j.plan, Plan::Keep))
    }
}

/// Space a store needs now ([`crate::Image::store_space_needed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSpace {
    /// New clusters the store would allocate now: changed non-zero data clusters, new tables and
    /// a new directory (refcount blocks the allocation may need come on top: at most a few).
    pub clusters: u64,
    /// `clusters` in bytes.
    pub bytes: u64,
    /// What `qemu-img measure` reports as "bitmaps" for the persistent bitmaps: every data
    /// cluster and table of every persistent bitmap plus the directory, in bytes.
    pub measure_bytes: u64,
}

impl Qcow2File {
    /// Decides what a store writes: which in-memory bitmaps are stored, where their entries go,
    /// and whether each is kept, partly or fully rewritten.
    fn plan_store(&self, set: &BitmapSet, mode: StoreMode) -> Result<StorePlan> {
        let mut entries = self.dir.entries().to_vec();
        let mut jobs: Vec<Job> = Vec::new();
        // Entries this plan appends, by name (a name not in the stored directory).
        let mut appended: HashMap<Vec<u8>, usize> = HashMap::new();
        let cs = self.cluster_size();
        for (id, bm) in set.iter_unfolded() {
            if !bm.will_be_stored() || bm.inconsistent() || bm.readonly() {
                continue;
            }
            let name = bm.name().unwrap_or_default().to_vec();
            // Durable mode stores a frozen bitmap as recording: its stored copy takes its
            // successor's writes, as a reclaim would.
            let recording = if self.durable.is_some() {
                set.recording(id)
            } else {
                bm.enabled()
            };
            let mut flags = if recording { BME_FLAG_AUTO } else { 0 };
            if mode == StoreMode::Checkpoint {
                flags |= BME_FLAG_IN_USE;
            }
            let fresh = BitmapDirEntry {
                table_offset: 0,
                table_size: 0,
                flags,
                kind: BT_DIRTY_TRACKING_BITMAP,
                granularity_bits: bm.granularity_bits() as u8,
                name: name.clone(),
                extra_data: Vec::new(),
            };
            // Broken entries (salvage) are never ours, whatever their name. An entry keeps its
            // name when the plan changes it, so the stored directory's index stays right; the
            // entries appended come after every stored one.
            let found = self
                .dir
                .position(&name, |i| !self.is_broken(i))
                .or_else(|| appended.get(&name).copied());
            match found {
                // Ours: marked in_use at open, or any entry in durable mode (which loads every
                // consistent entry and never marks them).
                Some(entry_index) if entries[entry_index].in_use() || self.durable.is_some() => {
                    let old = entries[entry_index].clone();
                    let n = table_size_for(self.size(), bm.granularity_bits(), cs);
                    let usable = bm.touched().filter(|t| {
                        t.base == old.table_offset
                            && u32::from(old.granularity_bits) == bm.granularity_bits()
                            && u64::from(old.table_size) == n
                            && t.shift == self.cluster_shift(old.granularity_bits)
                            && !t.all
                    });
                    let plan = match usable {
                        Some(t) if t.is_clean() => Plan::Keep,
                        Some(_) => match self.read_table(&old) {
                            Ok(table) => Plan::Partial(table),
                            Err(_) => Plan::Full,
                        },
                        None => Plan::Full,
                    };
                    if matches!(plan, Plan::Keep) {
                        entries[entry_index].flags = flags;
                    } else {
                        entries[entry_index] = fresh;
                    }
                    jobs.push(Job {
                        id,
                        entry_index,
                        old: Some(old),
                        plan,
                    });
                }
                Some(_) => {
                    // A consistent entry that this image did not load: not ours to overwrite.
                    return Err(Error::InvalidImage(format!(
                        "Bitmap '{}' already exists in the image",
                        bm.display_name()
                    )));
                }
                None => {
                    appended.insert(name, entries.len());
                    entries.push(fresh);
                    jobs.push(Job {
                        id,
                        entry_index: entries.len() - 1,
                        old: None,
                        plan: Plan::Full,
                    });
                }
            }
        }
        Ok(StorePlan { entries, jobs })
    }

    /// Writes every persistent, consistent, writable bitmap (QEMU's store, incremental: see
    /// the module documentation), with the in_use flags `mode` says. With
    /// [`StoreMode::Close`], the stored bitmaps are dropped from memory afterwards, and only on
    /// success: on failure everything stays as it was.
    ///
    /// A bitmap whose data must be rewritten but cannot be read now is left out: its entry
    /// stays as it is on disk (in_use) and it is reported in the returned [`Unstored`]; the
    /// other bitmaps are stored all the same.
    pub(super) fn store(&mut self, set: &mut BitmapSet, mode: StoreMode) -> Result<Unstored> {
        let release = mode == StoreMode::Close;
        let mut plan = self.plan_store(set, mode)?;
        if plan.jobs.is_empty() {
            return Ok(Unstored::default());
        }
        // Durable mode: what is rewritten keeps the zones of the writes in flight dirty.
        let zones = match self.durable.clone() {
            Some(tracker) => {
                if !plan.writes_data() && plan.entries == self.dir.entries() {
                    // Nothing changes on disk: the covered zones stay covered.
                    return Ok(Unstored::default());
                }
                let (zones, marked) = self.zones_in_flight(&tracker, set);
                if marked {
                    plan = self.plan_store(set, mode)?;
                }
                zones
            }
            None => Vec::new(),
        };
        if self.read_only {
            return Err(Error::ReadOnlyImage("No write access".into()));
        }
        let StorePlan {
            mut entries,
            mut jobs,
        } = plan;
        // Bitmaps to rewrite must be in memory; those that cannot be read are left out before
        // anything is written.
        let mut unstored = Unstored::default();
        let mut failed: Vec<(usize, Error)> = Vec::new();
        for (k, j) in jobs.iter().enumerate() {
            if matches!(j.plan, Plan::Keep) {
                continue;
            }
            if let Err(e) = set.bitmap_mut(j.id).and_then(DirtyBitmap::ensure_loaded) {
                if j.old.is_none() {
                    // A bitmap never stored is always in memory: this cannot happen, and a
                    // new entry cannot be left out without leaving a hole in the directory.
                    return Err(e);
                }
                failed.push((k, e));
            }
        }
        for (k, e) in failed.into_iter().rev() {
            let j = jobs.remove(k);
            let old = j.old.expect("checked above");
            let name = String::from_utf8_lossy(old.qemu_name()).into_owned();
            entries[j.entry_index] = old;
            unstored.0.insert(0, (name, e));
        }
        if jobs.is_empty() {
            return Ok(unstored);
        }
        if entries.len() > QCOW2_MAX_BITMAPS as usize {
            return Err(Error::TooBig("Too many persistent bitmaps".into()));
        }
        let dir_size: u64 = entries.iter().map(|e| e.encoded_len() as u64).sum();
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::TooBig("Bitmap directory is too large".into()));
        }
        let any_data = jobs.iter().any(|j| !matches!(j.plan, Plan::Keep));
        self.begin_update();
        if !any_data && entries == self.dir.entries() {
            if release {
                for j in &jobs {
                    set.remove_unchecked(j.id);
                }
            }
            return Ok(unstored);
        }
        if !any_data && self.durable.is_none() {
            // Only flags change (typically: in_use cleared): in place. (Not in durable mode:
            // a crash during the in-place update leaves the bitmaps extension invalid, which
            // drops every bitmap; a new directory is written instead, below.)
            self.update_dir_in_place(entries)?;
            if release {
                for j in &jobs {
                    set.remove_unchecked(j.id);
                }
            }
            return Ok(unstored);
        }
        // A first bitmaps extension must fit in cluster 0 (QEMU's ENOSPC), before anything is
        // written.
        self.header_cluster.check_room_for_bitmaps()?;
        // What the commit will free: checked now, before anything is written. The whole old
        // table of a rewritten bitmap is checked, the entries taken over too (the new table
        // would go on naming them).
        self.check_directory_owned("free")?;
        for j in &jobs {
            let Some(old) = &j.old else { continue };
            match &j.plan {
                Plan::Keep => {}
                Plan::Partial(t) => self.check_entry_owned(old, t)?,
                Plan::Full => {
                    // A table that cannot be read is leaked, not freed (bitmap_clusters).
                    if let Ok(t) = self.stored_table(old) {
                        self.check_entry_owned(old, &t)?;
                    }
                }
            }
        }
        // Tables and data, in directory order.
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by_key(|&k| jobs[k].entry_index);
        let mut allocated: FreeList = Vec::new();
        let mut to_free: FreeList = Vec::new();
        let mut freed_tables: Vec<u64> = Vec::new();
        let result = (|| {
            for &k in &order {
                let j = &jobs[k];
                let old_table = match &j.plan {
                    Plan::Keep => continue,
                    Plan::Partial(t) => Some(t.as_slice()),
                    Plan::Full => None,
                };
                let bm = set
                    .get_unfolded(j.id)
                    .ok_or_else(|| Error::Precondition(format!("Bitmap #{} is gone", j.id.0)))?;
                let staged = self.durable_content(set, j.id, &zones)?;
                let bm = staged.as_ref().unwrap_or(bm);
                let (off, size) = self.write_bitmap(bm, old_table, &mut allocated, &mut to_free)?;
                entries[j.entry_index].table_offset = off;
                entries[j.entry_index].table_size = size;
                if let Some(old) = &j.old {
                    freed_tables.push(old.table_offset);
                    if old_table.is_some() {
                        to_free.push((
                            old.table_offset,
                            (u64::from(old.table_size) * 8).div_ceil(self.cluster_size()),
                        ));
                    }
                }
            }
            self.commit_directory(entries.clone(), &mut allocated)
        })();
        let old_dir = match result {
            Ok(old_dir) => old_dir,
            Err(e) => {
                self.free_quietly(&allocated);
                return Err(e);
            }
        };
        // After the commit: give back the old directory and the old tables and data.
        to_free.extend(old_dir);
        for j in &jobs {
            if let (Plan::Full, Some(old)) = (&j.plan, &j.old) {
                to_free.extend(self.bitmap_clusters(old));
            }
        }
        for t in freed_tables {
            self.sources.invalidate(t);
        }
        // The in-memory bitmaps now match their new stored copies.
        for j in &jobs {
            if matches!(j.plan, Plan::Keep) {
                continue;
            }
            let e = &entries[j.entry_index];
            let shift = self.cluster_shift(e.granularity_bits);
            // Without absorbing or catching up: hook writes logged while this store did its I/O
            // are not in what it wrote; they must stay in the log, to be tracked (and stored)
            // after the next absorb and catch-up.
            if let Some(bm) = set.get_mut_unfolded(j.id) {
                bm.track_changes(shift, e.table_offset);
            }
        }
        if !release {
            let _ = self.mark_durable_extras(set, &zones);
        }
        if release {
            for j in &jobs {
                set.remove_unchecked(j.id);
            }
        }
        self.free_after_commit(&to_free);
        Ok(unstored)
    }

    /// What a store would allocate now, and `qemu-img measure`'s "bitmaps" figure.
    pub(super) fn space_needed(&self, set: &BitmapSet) -> Result<StoreSpace> {
        let cs = self.cluster_size();
        let plan = self.plan_store(set, StoreMode::Close)?;
        let size = self.size();
        let mut clusters = 0u64;
        for j in &plan.jobs {
            let bm = set
                .get_unfolded(j.id)
                .ok_or_else(|| Error::Precondition(format!("Bitmap #{} is gone", j.id.0)))?;
            let n = table_size_for(size, bm.granularity_bits(), cs);
            let per_cluster = (8 * cs) << bm.granularity_bits();
            let data = match &j.plan {
                Plan::Keep => continue,
                // Pending writes of a bitmap still on disk are dirty bits: each touched
                // cluster is non-zero (exact without loading).
                Plan::Partial(_) if bm.source().is_some() => bm.touched().map_or(n, |t| t.count()),
                _ => {
                    let bits = bm.usable_bits()?;
                    (0..n)
                        .filter(|&i| {
                            let touched = match &j.plan {
                                Plan::Partial(_) => bm.touched().is_none_or(|t| t.is_touched(i)),
                                _ => true,
                            };
                            let start = i * per_cluster;
                            touched
                                && bits
                                    .next_dirty(start, per_cluster.min(size - start))
                                    .is_some()
                        })
                        .count() as u64
                }
            };
            clusters += data + (n * 8).div_ceil(cs);
        }
        if plan.writes_data() {
            let dir: u64 = plan.entries.iter().map(|e| e.encoded_len() as u64).sum();
            clusters += dir.div_ceil(cs);
        }
        // measure: every persistent bitmap as a full copy.
        let measure = measure_bitmaps(
            size,
            cs,
            set.iter()
                .filter(|(_, bm)| bm.persistent() && bm.name().is_some())
                .map(|(_, bm)| (bm.granularity(), bm.name().map_or(0, <[u8]>::len))),
        );
        Ok(StoreSpace {
            clusters,
            bytes: clusters * cs,
            measure_bytes: measure,
        })
    }

    /// Writes one bitmap's data clusters and a new table; returns (table offset, table size).
    /// All-zero data clusters are not allocated. With `old_table`, only the touched entries
    /// are rewritten (their old clusters go to `replaced`); the others are taken over.
    /// Changed non-zero clusters are allocated in contiguous runs (at most [`MAX_IO_BYTES`])
    /// and written in vectored writes of [`WRITE_BYTES`]: full clusters from one shared
    /// all-ones buffer, the others converted with `store_words_le` into a reused buffer.
    fn write_bitmap(
        &mut self,
        bm: &DirtyBitmap,
        old_table: Option<&[TableEntry]>,
        allocated: &mut FreeList,
        replaced: &mut FreeList,
    ) -> Result<(u64, u32)> {
        let cs = self.cluster_size();
        let size = self.size();
        let name = bm.display_name();
        let id: Arc<[u8]> = Arc::from(bm.name().unwrap_or_default());
        let granularity_bits = bm.granularity_bits();
        let n = table_size_for(size, granularity_bits, cs);
        let per_cluster = (8 * cs) << bm.granularity_bits();
        let bits = bm.bits();
        let touched = bm.touched();
        let mut table = vec![TableEntry::Zeroes; n as usize];
        // The non-zero clusters to write, and whether each is full (every bit set and inside
        // the bitmap: all-ones bytes, found from the chunk states without converting a word).
        let mut need: Vec<(usize, bool)> = Vec::new();
        for (i, slot) in table.iter_mut().enumerate() {
            if let Some(old) = old_table {
                let changed = touched.is_none_or(|t| t.is_touched(i as u64));
                if !changed {
                    *slot = old[i];
                    continue;
                }
                if let TableEntry::Cluster(off) = old[i] {
                    replaced.push((off, 1));
                }
            }
            let start = i as u64 * per_cluster;
            let len = per_cluster.min(size - start);
            if bits.next_dirty(start, len).is_some() {
                let full = len == per_cluster && bits.next_zero(start, len).is_none();
                need.push((i, full));
            }
        }
        let cs_us = cs as usize;
        let batch = (MAX_IO_BYTES / cs).max(1) as usize;
        // Full clusters are written from one shared all-ones buffer (no fill, no copy); the
        // others are converted into `buf`, which only grows (no zeroing pass per run).
        let ones = if need.iter().any(|&(_, full)| full) {
            vec![0xffu8; cs_us * (ONES_BYTES / cs_us).max(1)]
        } else {
            Vec::new()
        };
        let mut buf: Vec<u8> = Vec::new();
        for chunk in need.chunks(batch) {
            let k = chunk.len() as u64;
            let off = self.alloc_clusters(k, &|j| {
                Structure::BitmapData(id.clone(), chunk[j as usize].0 as u64)
            })?;
            allocated.push((off, k));
            let mixed = chunk.iter().filter(|&&(_, full)| !full).count();
            if buf.len() < mixed * cs_us {
                buf.resize(mixed * cs_us, 0);
            }
            let mut m = 0;
            for (j, &(i, full)) in chunk.iter().enumerate() {
                if !full {
                    bits.store_words_le(i as u64 * (cs / 8), &mut buf[m * cs_us..(m + 1) * cs_us]);
                    m += 1;
                }
                table[i] = TableEntry::Cluster(off + j as u64 * cs);
            }
            // The run as slices: consecutive full clusters share `ones` (up to its length),
            // consecutive converted ones are adjacent in `buf`.
            let mut slices: Vec<&[u8]> = Vec::new();
            let (mut run_ones, mut m) = (0usize, 0usize);
            let mut run_buf = 0usize..0usize;
            for &(_, full) in chunk {
                if full {
                    if !run_buf.is_empty() {
                        slices.push(&buf[run_buf.clone()]);
                        run_buf = 0..0;
                    }
                    if run_ones == ones.len() {
                        slices.push(&ones[..]);
                        run_ones = 0;
                    }
                    run_ones += cs_us;
                } else {
                    if run_ones > 0 {
                        slices.push(&ones[..run_ones]);
                        run_ones = 0;
                    }
                    if run_buf.is_empty() {
                        run_buf = m * cs_us..m * cs_us;
                    }
                    run_buf.end += cs_us;
                    m += 1;
                }
            }
            if run_ones > 0 {
                slices.push(&ones[..run_ones]);
            }
            if !run_buf.is_empty() {
                slices.push(&buf[run_buf]);
            }
            write_in_pieces(self.storage.lock().as_mut(), &slices, off)
                .map_err(|e| Error::io(format!("Failed to write bitmap '{name}' to file"), e))?;
        }
        let raw = encode_table(&table);
        let clusters = (raw.len() as u64).div_ceil(cs);
        let off = self.alloc_clusters(clusters, &|_| Structure::BitmapTable(id.clone()))?;
        allocated.push((off, clusters));
        self.storage
            .lock()
            .write_all_at(&raw, off)
            .map_err(|e| Error::io(format!("Failed to write bitmap '{name}' to file"), e))?;
        Ok((off, n as u32))
    }

    /// Writes `entries` as a new directory and commits it with the header (bitmaps bit set, or
    /// the extension and the bit dropped when `entries` is empty). Returns the old directory's
    /// clusters, to be freed by the caller.
    pub(super) fn commit_directory(
        &mut self,
        entries: Vec<BitmapDirEntry>,
        allocated: &mut FreeList,
    ) -> Result<FreeList> {
        let cs = self.cluster_size();
        let new_ext = if entries.is_empty() {
            None
        } else {
            self.header_cluster.check_room_for_bitmaps()?;
            let raw = encode_directory(&entries);
            let clusters = (raw.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(clusters, &|_| Structure::BitmapDirectory)?;
            allocated.push((off, clusters));
            self.storage
                .lock()
                .write_all_at(&raw, off)
                .map_err(|e| Error::io("Failed to write the bitmap directory", e))?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                reserved32: 0,
                bitmap_directory_size: raw.len() as u64,
                bitmap_directory_offset: off,
            })
        };
        self.write_refcounts()?;
        alloc::flush(self.storage.lock().as_mut())?;
        // Commit point.
        let old_header = self.header_cluster.clone();
        self.header_cluster.exts.bitmaps = new_ext;
        if new_ext.is_some() {
            self.header_cluster.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        } else {
            self.header_cluster.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        if let Err(e) = self.write_header_sync() {
            // The header write or its flush failed: the new header may or may not be on disk.
            // Both states are valid (the old directory still exists, the new one and its
            // tables are durable), so keep both: leak the new clusters rather than free what a
            // durable header may name, and write nothing more to this image.
            let _ = old_header;
            allocated.clear();
            let why = format!("the bitmap extension update failed ({e}); its outcome is unknown");
            self.failed = Some(why.clone());
            self.read_only = true;
            return Err(e.context(format!(
                "Failed to update bitmap extension; qdirty will not write to '{}' again until it \
                 is reopened",
                self.name
            )));
        }
        allocated.clear();
        let old = std::mem::replace(&mut self.dir, StoredDirectory::new(new_ext, entries));
        Ok(match old.ext {
            Some(ext) => vec![(
                ext.bitmap_directory_offset,
                ext.bitmap_directory_size.div_ceil(cs),
            )],
            None => Vec::new(),
        })
    }

    /// Removes the stored copy of a bitmap (nothing to do when it is not on disk).
    pub(super) fn remove_from_disk(&mut self, name: &[u8]) -> Result<()> {
        let Some(entry_index) = self.dir.position(name, |i| !self.is_broken(i)) else {
            return Ok(());
        };
        if self.read_only {
            return Err(Error::ReadOnlyImage("No write access".into()));
        }
        let mut entries = self.dir.entries().to_vec();
        let removed = entries.remove(entry_index);
        // What the commit will free: checked before anything is written.
        self.begin_update();
        self.check_directory_owned("free")?;
        if let Ok(t) = self.stored_table(&removed) {
            self.check_entry_owned(&removed, &t)?;
        }
        let mut allocated = Vec::new();
        let mut to_free = match self.commit_directory(entries, &mut allocated) {
            Ok(old) => old,
            Err(e) => {
                self.free_quietly(&allocated);
                return Err(e);
            }
        };
        self.forget_entries(&[entry_index]);
        to_free.extend(self.bitmap_clusters(&removed));
        self.sources.invalidate(removed.table_offset);
        self.free_after_commit(&to_free);
        Ok(())
    }

    /// The entries of a stored bitmap's table, decoded (not checked against the disk size: in_use
    /// bitmaps were never validated by QEMU).
    pub(super) fn stored_table(&self, e: &BitmapDirEntry) -> Result<Vec<TableEntry>> {
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.storage
            .lock()
            .read_exact_at(&mut raw, e.table_offset)
            .map_err(|err| Error::io("Could not read bitmap table", err))?;
        decode_table(&raw, self.cluster_size(), &e.name)
    }

    /// The table and data clusters of a stored bitmap. A table that cannot be read or is not
    /// valid (possible for in_use bitmaps, which QEMU never validated) is left alone: leaking
    /// is safe, freeing clusters named by garbage is not.
    fn bitmap_clusters(&self, e: &BitmapDirEntry) -> FreeList {
        let cs = self.cluster_size();
        match self.stored_table(e) {
            Ok(table) => {
                let mut out: FreeList = table
                    .iter()
                    .filter_map(|t| match t {
                        TableEntry::Cluster(off) => Some((*off, 1)),
                        _ => None,
                    })
                    .collect();
                out.push((e.table_offset, (u64::from(e.table_size) * 8).div_ceil(cs)));
                out
            }
            Err(err) => {
                crate::warning::warn(&format!(
                    "Clusters of bitmap '{}' are left allocated (leaked): {err}",
                    String::from_utf8_lossy(e.qemu_name())
                ));
                Vec::new()
            }
        }
    }

    /// Frees clusters after a commit and makes the decrements durable. Whatever happens, nothing
    /// on disk names them any more: the overlap check forgets them.
    fn free_now(&mut self, list: &FreeList) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        if let Some(map) = self.overlap.as_mut() {
            for &(off, n) in list {
                map.forget(off, n);
            }
        }
        let cs = self.cluster_size();
        {
            let mut guard = self.storage.lock();
            if let Some(a) = guard.allocator() {
                for &(off, n) in list {
                    a.free(off, n, cs)
                        .map_err(|e| Error::io("The host could not free clusters", e))?;
                }
                return alloc::flush(guard.as_mut());
            }
        }
        self.refcounts()?;
        let mut guard = self.storage.lock();
        let storage = guard.as_mut();
        let rc = self.refcounts.as_mut().expect("loaded by refcounts()");
        for &(off, n) in list {
            rc.free(storage, off, n)?;
        }
        rc.write_dirty_blocks(storage)?;
        alloc::flush(storage)
    }

    /// Gives back the old structures after a commit. The commit stands whatever happens here:
    /// a failure only leaks clusters (the decrements that did not reach the disk), so it is a
    /// warning, not an error of the store.
    pub(super) fn free_after_commit(&mut self, list: &FreeList) {
        if let Err(e) = self.free_now(list) {
            crate::warning::warn(&format!(
                "Stored the bitmaps of '{}', but freeing their old clusters failed; some \
                 clusters are leaked (run 'qemu-img check -r leaks'): {e}",
                self.name
            ));
        }
    }

    /// Gives back clusters allocated by a failed operation; failures only leak.
    pub(super) fn free_quietly(&mut self, list: &FreeList) {
        if let Err(e) = self.free_now(list) {
            crate::warning::warn(&format!("Some clusters may be leaked: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::check_bitmaps;
    use super::super::create::blank_image;
    use super::super::storage::Storage;
    use super::super::tests::{runs, Shared};
    use super::super::{AddOptions, Image, OpenOptions};
    use std::io;

    const MIB: u64 = 1 << 20;

    /// Fills `img` with a pattern that makes the store mix every kind of data cluster in one
    /// run: a stretch of full clusters longer than the all-ones buffer, clusters alternating
    /// full / partial (more I/O vectors than one writev takes), zero clusters (gaps in the
    /// runs), and a dirty last cluster that ends before the cluster does (masked tail).
    /// With 512-byte clusters and 512-byte granules one data cluster covers 2 MiB.
    fn fill(img: &mut Image, size: u64) {
        let per = 2 * MIB;
        let id = img
            .add_bitmap(
                b"mix",
                512,
                AddOptions {
                    persistent: true,
                    ..AddOptions::default()
                },
            )
            .unwrap();
        let bm = img.bitmap_mut(id).unwrap();
        // 2100 full clusters (the all-ones buffer holds 2048 of them).
        bm.set_dirty(0, 2100 * per).unwrap();
        // 1400 clusters: full, partial (one granule missing), full, ...
        for c in 2100..3500 {
            if c % 2 == 0 {
                bm.set_dirty(c * per, per).unwrap();
            } else {
                bm.set_dirty(c * per, per - 512).unwrap();
            }
        }
        // A gap of zero clusters, then single granules and full clusters.
        for c in (3600..3900).step_by(3) {
            bm.set_dirty(c * per + 4096, 512).unwrap();
            bm.set_dirty((c + 1) * per, per).unwrap();
        }
        // The last cluster, shorter than 2 MiB, dirty to the end.
        bm.set_dirty(size - MIB, MIB).unwrap();
    }

    #[test]
    fn runs_are_written_in_pieces_of_at_most_write_bytes() {
        let mem = Shared::default();
        let (a, b, c) = (vec![1u8; 700_000], vec![2u8; 3 << 20], vec![3u8; 5]);
        let slices: Vec<&[u8]> = vec![&a, &c, &b, &c, &a];
        let want: Vec<u8> = slices.concat();
        let mut st = mem.clone();
        super::write_in_pieces(&mut st, &slices, 4096).unwrap();
        let got = mem.bytes();
        assert_eq!(&got[4096..], &want[..]);
        assert!(got[..4096].iter().all(|&x| x == 0));

        // Each call: at most WRITE_BYTES, contiguous with the previous one.
        struct Calls(Vec<(u64, usize)>);
        impl Storage for Calls {
            fn read_exact_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                unreachable!()
            }
            fn write_all_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
                unreachable!()
            }
            fn write_all_vectored_at(&mut self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
                self.0.push((off, bufs.iter().map(|b| b.len()).sum()));
                Ok(())
            }
            fn size(&self) -> io::Result<u64> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut calls = Calls(Vec::new());
        super::write_in_pieces(&mut calls, &slices, 4096).unwrap();
        let mut at = 4096;
        for &(off, len) in &calls.0 {
            assert_eq!(off, at);
            assert!(len > 0 && len <= super::WRITE_BYTES);
            at += len as u64;
        }
        assert_eq!(at - 4096, want.len() as u64);
    }

    #[test]
    fn store_mixes_full_partial_and_zero_clusters_in_runs() {
        let size = 4000 * 2 * MIB + MIB;
        // Shared keeps the trait's default vectored write (one write per slice).
        let mem = Shared::new(blank_image(size, 512).unwrap());
        let mut img = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(mem.clone()), "mem")
            .unwrap();
        fill(&mut img, size);
        let want = runs(&mut img, "mix");
        img.close().unwrap();
        let mut img = OpenOptions::new()
            .open_storage(Box::new(mem), "mem")
            .unwrap();
        assert_eq!(runs(&mut img, "mix"), want, "memory storage");

        // A file: FileStorage's writev path.
        let path = std::env::temp_dir().join(format!(
            "qdirty-store-mix-{}-{:?}.qcow2",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        Image::create(&path, size, 512).unwrap();
        let mut img = Image::open(&path, true).unwrap();
        fill(&mut img, size);
        img.close().unwrap();
        let mut img = Image::open(&path, false).unwrap();
        assert_eq!(runs(&mut img, "mix"), want, "file storage");
        drop(img);
        let report = check_bitmaps(&path, false).unwrap();
        assert!(
            report.leaks == 0 && report.corruptions == 0 && report.check_errors == 0,
            "{:?}",
            report.messages
        );
        let _ = std::fs::remove_file(&path);
    }
}
