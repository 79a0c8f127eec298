//! Durable mode (docs/durable.md): the stored bitmaps stay valid, consistent QEMU bitmaps at
//! every instant, so that a crash leaves them usable.
//!
//! Nothing is marked in_use. Before a guest write is issued, its zones (bitmap/zones.rs) must be
//! covered: dirty on disk in every stored bitmap that records on disk (its entry has the auto
//! flag). [`Qcow2File::mark_zones`] covers zones by setting their bits in the stored copies:
//! - a data cluster in the table: its bytes are OR-ed in place (a torn write leaves each
//!   sector old or new, both supersets of the old content);
//! - an all-zeroes entry whose cluster the zone covers whole: the entry becomes all-ones;
//! - any other all-zeroes entry: a new cluster holding the zone's bits is written, its refcount
//!   written, both flushed, and only then the table entry naming it is written and flushed (a
//!   crash in between leaks the cluster, nothing more).
//!
//! The in-memory bitmaps stay exact: the clusters a zone was written into are recorded as
//! changed, so that the next store rewrites them with the exact bits (plus the zones of the
//! writes still in flight then).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::overlap::Structure;
use super::{alloc, Qcow2File};
use crate::bitmap::{BitmapId, BitmapSet, DirtyBitmap, ZoneTracker};
use crate::error::{Error, Result};
use crate::format::bitmap_table::{encode_table, TableEntry};
use crate::format::BME_FLAG_AUTO;

/// Bit ranges (first, last) within one data cluster.
type BitRanges = Vec<(u64, u64)>;

/// Sets bits `first..=last` (bit 0 is the lowest bit of byte 0, as the stored data is laid out)
/// of `buf`.
fn set_bits(buf: &mut [u8], first: u64, last: u64) {
    for b in first..=last {
        buf[(b / 8) as usize] |= 1 << (b % 8);
    }
}

/// Sector-aligned byte span covering bits `first..=last` of a cluster of `cs` bytes.
fn sector_span(first: u64, last: u64, cs: u64) -> (u64, u64) {
    let start = (first / 8) & !511;
    let end = ((last / 8) + 1).next_multiple_of(512).min(cs);
    (start, end)
}

impl Qcow2File {
    /// Covers the byte ranges `zones` (each within the disk) in every stored bitmap that
    /// records on disk, durably: on return, they are written and flushed. The in-memory
    /// bitmaps of those names record the clusters written as changed. On error the stored
    /// bitmaps are still valid (every write only sets bits) and the caller must not issue the
    /// write it asked for.
    pub(super) fn mark_zones(&mut self, zones: &[(u64, u64)], set: &mut BitmapSet) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnlyImage(format!(
                "Image '{}' is read-only",
                self.name
            )));
        }
        if let Some(why) = &self.failed {
            return Err(Error::ReadOnlyImage(format!(
                "Image '{}' cannot be written any more: {why}",
                self.name
            )));
        }
        let cs = self.cluster_size();
        let size = self.size();
        self.begin_update();
        let entries = self.dir.entries().to_vec();
        // Per entry: clusters to OR in place, new clusters, table entries that change.
        // By host offset: (bitmap name, table index, bits to set).
        let mut in_place: BTreeMap<u64, (Arc<[u8]>, u64, BitRanges)> = BTreeMap::new();
        // (directory index, table index, bits): clusters to allocate.
        let mut fresh: Vec<(usize, u64, BitRanges)> = Vec::new();
        let mut tables: BTreeMap<usize, Vec<TableEntry>> = BTreeMap::new();
        let mut touched: Vec<(usize, u64, u64)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.in_use() || e.flags & BME_FLAG_AUTO == 0 || self.is_broken(i) {
                continue;
            }
            let name: Arc<[u8]> = Arc::from(e.qemu_name());
            let mut table = self.stored_table(e).map_err(|err| {
                err.context(format!(
                    "Could not read the table of bitmap '{}' to mark a write in it",
                    String::from_utf8_lossy(&name)
                ))
            })?;
            let g = u32::from(e.granularity_bits);
            let per_cluster = (8 * cs) << g;
            let mut changed_table = false;
            // New clusters of this entry, by table index: the bit ranges they get.
            let mut new_here: BTreeMap<u64, BitRanges> = BTreeMap::new();
            for &(zs, zlen) in zones {
                let ze = zs + zlen;
                touched.push((i, zs, zlen));
                let mut ci = zs / per_cluster;
                while ci * per_cluster < ze {
                    let cstart = ci * per_cluster;
                    let cend = (cstart + per_cluster).min(size);
                    let (ps, pe) = (zs.max(cstart), ze.min(cend));
                    let bits = ((ps - cstart) >> g, (pe - 1 - cstart) >> g);
                    let slot = table.get_mut(ci as usize).ok_or_else(|| {
                        Error::InvalidImage(format!(
                            "Bitmap '{}' has no table entry {ci} for offset {ps}",
                            String::from_utf8_lossy(&name)
                        ))
                    })?;
                    match *slot {
                        TableEntry::Ones => {}
                        TableEntry::Cluster(off) => {
                            in_place
                                .entry(off)
                                .or_insert_with(|| (name.clone(), ci, Vec::new()))
                                .2
                                .push(bits);
                        }
                        TableEntry::Zeroes if ps == cstart && pe == cstart + per_cluster => {
                            *slot = TableEntry::Ones;
                            changed_table = true;
                            new_here.remove(&ci);
                        }
                        TableEntry::Zeroes => new_here.entry(ci).or_default().push(bits),
                    }
                    ci += 1;
                }
            }
            for (ci, bits) in new_here {
                if matches!(table[ci as usize], TableEntry::Zeroes) {
                    fresh.push((i, ci, bits));
                    changed_table = true;
                }
            }
            if changed_table {
                tables.insert(i, table);
            }
        }
        // What is rewritten in place must hold what the directory says and nothing else.
        for (&off, (name, ci, _)) in &in_place {
            let (name, ci) = (name.clone(), *ci);
            self.check_owned(
                off,
                1,
                &|_| Structure::BitmapData(name.clone(), ci),
                "rewrite",
            )?;
        }
        for &i in tables.keys() {
            let e = &entries[i];
            let name: Arc<[u8]> = Arc::from(e.qemu_name());
            self.check_owned(
                e.table_offset,
                (u64::from(e.table_size) * 8).div_ceil(cs),
                &|_| Structure::BitmapTable(name.clone()),
                "rewrite",
            )?;
        }
        let mut allocated: Vec<(u64, u64)> = Vec::new();
        let result = (|| {
            let mut buf = vec![0u8; cs as usize];
            for (&off, (_, _, ranges)) in &in_place {
                let storage = self.storage.lock();
                storage.read_exact_at(&mut buf, off).map_err(|err| {
                    Error::io(format!("Could not read bitmap data at {off:#x}"), err)
                })?;
                drop(storage);
                let (mut lo, mut hi) = (cs, 0);
                for &(f, l) in ranges {
                    set_bits(&mut buf, f, l);
                    let (s, e) = sector_span(f, l, cs);
                    lo = lo.min(s);
                    hi = hi.max(e);
                }
                self.storage
                    .lock()
                    .write_all_at(&buf[lo as usize..hi as usize], off + lo)
                    .map_err(|err| {
                        Error::io(
                            format!("Could not write bitmap data at {:#x}", off + lo),
                            err,
                        )
                    })?;
            }
            for (i, ci, ranges) in &fresh {
                let name: Arc<[u8]> = Arc::from(entries[*i].qemu_name());
                let ci = *ci;
                let off = self.alloc_clusters(1, &|_| Structure::BitmapData(name.clone(), ci))?;
                allocated.push((off, 1));
                buf.fill(0);
                for &(f, l) in ranges {
                    set_bits(&mut buf, f, l);
                }
                self.storage.lock().write_all_at(&buf, off).map_err(|err| {
                    Error::io(format!("Could not write bitmap data at {off:#x}"), err)
                })?;
                tables.get_mut(i).expect("changed table")[ci as usize] = TableEntry::Cluster(off);
            }
            self.write_refcounts()?;
            alloc::flush(self.storage.lock().as_mut())
        })();
        if let Err(e) = result {
            self.free_quietly(&allocated);
            return Err(e);
        }
        if !tables.is_empty() {
            // The clusters named below are durable: the tables may point at them now.
            let written = (|| {
                for (&i, table) in &tables {
                    let off = entries[i].table_offset;
                    self.storage
                        .lock()
                        .write_all_at(&encode_table(table), off)
                        .map_err(|err| {
                            Error::io(format!("Could not write bitmap table at {off:#x}"), err)
                        })?;
                }
                alloc::flush(self.storage.lock().as_mut())
            })();
            // A table write whose outcome is unknown may name the new clusters: they are
            // leaked rather than freed.
            written?;
        }
        for (i, zs, zlen) in touched {
            if let Some(id) = set.find(entries[i].qemu_name()) {
                if let Some(bm) = set.get_mut_unfolded(id) {
                    bm.touch_stored(zs, zlen);
                }
            }
        }
        Ok(())
    }
}

impl Qcow2File {
    /// Durable mode, before a store rewrites stored copies, in this order: no zone is covered
    /// any more; the zones with writes in flight are read; the set takes every write logged
    /// so far; each recording bitmap records the clusters of those zones as changed, so that
    /// the store rewrites them with the zones dirty (see [`Qcow2File::durable_content`]).
    /// Returns the zones as byte ranges, and whether a bitmap recorded changes for them (its
    /// store plan must then be made again).
    pub(super) fn zones_in_flight(
        &self,
        tracker: &ZoneTracker,
        set: &mut BitmapSet,
    ) -> (Vec<(u64, u64)>, bool) {
        tracker.uncover_all();
        let zones: Vec<(u64, u64)> = tracker
            .in_flight_zones()
            .into_iter()
            .map(|z| {
                let (s, e) = tracker.zone_range(z);
                (s, e - s)
            })
            .collect();
        set.fold();
        let marked = self.mark_durable_extras(set, &zones);
        (zones, marked)
    }

    /// Durable mode: records as changed, in every stored bitmap that records, the clusters
    /// where its stored copy holds more than its bits: the zones of writes in flight, and for
    /// a frozen bitmap everything (its copy holds its successor's writes too). The next store
    /// rewrites them. Answers whether it recorded anything.
    pub(super) fn mark_durable_extras(&self, set: &mut BitmapSet, zones: &[(u64, u64)]) -> bool {
        let mut marked = false;
        if self.durable.is_none() {
            return marked;
        }
        for id in set.ids() {
            if !set.recording(id) {
                continue;
            }
            let frozen = set.get(id).is_some_and(|b| b.has_successor());
            let Some(bm) = set.get_mut_unfolded(id) else {
                continue;
            };
            if !bm.will_be_stored() {
                continue;
            }
            for &(s, l) in zones {
                bm.touch_stored(s, l);
            }
            if frozen {
                bm.touch_stored_all();
            }
            marked |= frozen || !zones.is_empty();
        }
        marked
    }

    /// Durable mode: what to store for bitmap `id` instead of its bits, when it records and
    /// its stored copy must hold more: its successor's writes, the zones of writes in flight.
    pub(super) fn durable_content(
        &self,
        set: &BitmapSet,
        id: BitmapId,
        zones: &[(u64, u64)],
    ) -> Result<Option<DirtyBitmap>> {
        if self.durable.is_none() || !set.recording(id) {
            return Ok(None);
        }
        let Some(bm) = set.get_unfolded(id) else {
            return Ok(None);
        };
        let successor = bm.successor().and_then(|s| set.get_unfolded(s));
        if zones.is_empty() && successor.is_none() {
            return Ok(None);
        }
        bm.durable_copy(successor, zones).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_sectors() {
        let mut b = vec![0u8; 4096];
        set_bits(&mut b, 3, 10);
        assert_eq!(&b[..2], &[0xf8, 0x07]);
        assert_eq!(sector_span(3, 10, 4096), (0, 512));
        assert_eq!(sector_span(8 * 600, 8 * 1100, 4096), (512, 1536));
        assert_eq!(sector_span(0, 8 * 4096 - 1, 4096), (0, 4096));
    }
}
