//! Storing bitmaps and removing stored ones (QEMU: qcow2_store_persistent_dirty_bitmaps,
//! qcow2_co_remove_persistent_dirty_bitmap; qcow2-format.md §6.4, §6.5).
//!
//! Write order, and what a crash at each point leaves:
//! 1. new data clusters and tables, 2. the new directory, 3. refcount blocks, then fdatasync:
//!    a crash here leaves the old header pointing at the old directory (whose entries are
//!    in_use, so the bitmaps are inconsistent); the new clusters only leak.
//! 4. the header naming the new directory, then fdatasync: this is the commit point.
//! 5. only then the old directory, tables and data clusters are freed (refcount decrements,
//!    written and flushed): a crash before that leaks them, nothing more.

use super::{alloc, Disk, DiskDir};
use crate::bitmap::{BitmapId, BitmapSet, DirtyBitmap};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{encode_directory, BitmapDirEntry};
use crate::format::bitmap_table::{decode_table, encode_table, table_size_for, TableEntry};
use crate::format::extension::BitmapsExt;
use crate::format::{
    AUTOCLEAR_BITMAPS, BME_FLAG_AUTO, BT_DIRTY_TRACKING_BITMAP, QCOW2_MAX_BITMAPS,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};

/// Clusters to give back after a commit: (offset, number of clusters).
type FreeList = Vec<(u64, u64)>;

impl Disk {
    /// Writes every persistent, consistent, writable bitmap (QEMU's store). With `release`, the
    /// stored bitmaps are dropped from memory afterwards (close).
    pub(super) fn store(&mut self, set: &mut BitmapSet, release: bool) -> Result<()> {
        let mut entries = self.dir.entries.clone();
        // Which in-memory bitmaps are written, and where their entries go.
        let mut to_write: Vec<(BitmapId, usize)> = Vec::new(); // (bitmap, entry index)
        let mut old_tables: Vec<BitmapDirEntry> = Vec::new();
        for (si, bm) in set.iter() {
            if !bm.persistence() || bm.inconsistent() || bm.readonly() {
                continue;
            }
            let name = bm.name().unwrap_or_default().to_vec();
            let entry = BitmapDirEntry {
                table_offset: 0,
                table_size: 0,
                flags: if bm.enabled() { BME_FLAG_AUTO } else { 0 },
                kind: BT_DIRTY_TRACKING_BITMAP,
                granularity_bits: bm.granularity_bits() as u8,
                name: name.clone(),
                extra_data: Vec::new(),
            };
            match entries.iter().position(|e| e.qemu_name() == name) {
                Some(ei) if entries[ei].in_use() => {
                    old_tables.push(entries[ei].clone());
                    entries[ei] = entry;
                    to_write.push((si, ei));
                }
                Some(_) => {
                    // A consistent entry that this image did not load: not ours to overwrite.
                    return Err(Error::InvalidImage(format!(
                        "Bitmap '{}' already exists in the image",
                        bm.display_name()
                    )));
                }
                None => {
                    entries.push(entry);
                    to_write.push((si, entries.len() - 1));
                }
            }
        }
        if to_write.is_empty() {
            return Ok(());
        }
        if self.read_only {
            return Err(Error::ReadOnlyImage("No write access".into()));
        }
        if entries.len() > QCOW2_MAX_BITMAPS as usize {
            return Err(Error::TooBig("Too many persistent bitmaps".into()));
        }
        let dir_size: u64 = entries.iter().map(|e| e.encoded_len() as u64).sum();
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::TooBig("Bitmap directory is too large".into()));
        }
        // Tables and data, in directory order.
        to_write.sort_by_key(|&(_, ei)| ei);
        let mut allocated: FreeList = Vec::new();
        let result = (|| {
            for &(si, ei) in &to_write {
                let bm = set.bitmap(si)?;
                let (off, size) = self.write_bitmap(bm, &mut allocated)?;
                entries[ei].table_offset = off;
                entries[ei].table_size = size;
            }
            self.commit_directory(entries, &mut allocated)
        })();
        let old_dir = match result {
            Ok(old_dir) => old_dir,
            Err(e) => {
                self.free_quietly(&allocated);
                return Err(e);
            }
        };
        // After the commit: give back the old directory and the old tables and data.
        let mut to_free = old_dir;
        for e in &old_tables {
            to_free.extend(self.bitmap_clusters(e));
        }
        self.free_now(&to_free)?;
        if release {
            for &(id, _) in &to_write {
                set.remove_unchecked(id);
            }
        }
        Ok(())
    }

    /// Writes one bitmap's data clusters and table; returns (table offset, table size).
    /// All-zero data clusters are not allocated.
    fn write_bitmap(&mut self, bm: &DirtyBitmap, allocated: &mut FreeList) -> Result<(u64, u32)> {
        let cs = self.cluster_size();
        let size = self.size();
        let name = bm.display_name();
        let gbits = bm.granularity_bits();
        let n = table_size_for(size, gbits, cs);
        let per_cluster = 8 * cs * bm.granularity();
        let mut table = vec![TableEntry::Zeroes; n as usize];
        let mut buf = vec![0u8; cs as usize];
        for (i, slot) in table.iter_mut().enumerate() {
            let start = i as u64 * per_cluster;
            let count = per_cluster.min(size - start);
            let bits = bm.bits();
            if bits.next_dirty(start, count).is_none() {
                continue;
            }
            buf.fill(0);
            bits.serialize_part(&mut buf, start, count);
            let off = self.alloc_clusters(1)?;
            allocated.push((off, 1));
            self.storage
                .write_all_at(&buf, off)
                .map_err(|e| Error::io(format!("Failed to write bitmap '{name}' to file"), e))?;
            *slot = TableEntry::Cluster(off);
        }
        let raw = encode_table(&table);
        let clusters = (raw.len() as u64).div_ceil(cs);
        let off = self.alloc_clusters(clusters)?;
        allocated.push((off, clusters));
        self.storage
            .write_all_at(&raw, off)
            .map_err(|e| Error::io(format!("Failed to write bitmap '{name}' to file"), e))?;
        Ok((off, n as u32))
    }

    /// Writes `entries` as a new directory and commits it with the header (bitmaps bit set, or
    /// the extension and the bit dropped when `entries` is empty). Returns the old directory's
    /// clusters, to be freed by the caller.
    fn commit_directory(
        &mut self,
        entries: Vec<BitmapDirEntry>,
        allocated: &mut FreeList,
    ) -> Result<FreeList> {
        let cs = self.cluster_size();
        let new_ext = if entries.is_empty() {
            None
        } else {
            let raw = encode_directory(&entries);
            let clusters = (raw.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(clusters)?;
            allocated.push((off, clusters));
            self.storage
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
        alloc::flush(self.storage.as_mut())?;
        // Commit point.
        let old_header = self.meta.clone();
        self.meta.exts.bitmaps = new_ext;
        if new_ext.is_some() {
            self.meta.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        } else {
            self.meta.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        if let Err(e) = self.write_header_sync() {
            self.meta = old_header;
            return Err(e.context("Failed to update bitmap extension"));
        }
        allocated.clear();
        let old = std::mem::replace(
            &mut self.dir,
            DiskDir {
                ext: new_ext,
                entries,
            },
        );
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
        let Some(ei) = self.dir.entries.iter().position(|e| e.qemu_name() == name) else {
            return Ok(());
        };
        if self.read_only {
            return Err(Error::ReadOnlyImage("No write access".into()));
        }
        let mut entries = self.dir.entries.clone();
        let removed = entries.remove(ei);
        let mut allocated = Vec::new();
        let mut to_free = match self.commit_directory(entries, &mut allocated) {
            Ok(old) => old,
            Err(e) => {
                self.free_quietly(&allocated);
                return Err(e);
            }
        };
        to_free.extend(self.bitmap_clusters(&removed));
        self.free_now(&to_free)
    }

    /// The table and data clusters of a stored bitmap. A table that cannot be read or is not
    /// valid (possible for in_use bitmaps, which QEMU never validated) is left alone: leaking
    /// is safe, freeing clusters named by garbage is not.
    fn bitmap_clusters(&self, e: &BitmapDirEntry) -> FreeList {
        let cs = self.cluster_size();
        let mut raw = vec![0u8; e.table_size as usize * 8];
        let table = self
            .storage
            .read_exact_at(&mut raw, e.table_offset)
            .map_err(|err| Error::io("Could not read bitmap table", err))
            .and_then(|()| decode_table(&raw, cs, &e.name));
        match table {
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

    /// Frees clusters after a commit and makes the decrements durable.
    fn free_now(&mut self, list: &FreeList) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        if let Some(a) = self.storage.allocator() {
            for &(off, n) in list {
                a.free(off, n, cs)
                    .map_err(|e| Error::io("The host could not free clusters", e))?;
            }
            return alloc::flush(self.storage.as_mut());
        }
        self.refcounts()?;
        let storage = self.storage.as_mut();
        let rc = self.refcounts.as_mut().expect("loaded by refcounts()");
        for &(off, n) in list {
            rc.free(storage, off, n)?;
        }
        rc.write_dirty_blocks(storage)?;
        alloc::flush(storage)
    }

    /// Gives back clusters allocated by a failed operation; failures only leak.
    fn free_quietly(&mut self, list: &FreeList) {
        if let Err(e) = self.free_now(list) {
            crate::warning::warn(&format!("Some clusters may be leaked: {e}"));
        }
    }
}
