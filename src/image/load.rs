//! Loading bitmaps on open (QEMU: qcow2_load_dirty_bitmaps; docs/format.md, 'Checks when
//! loading', 'The autoclear bit', 'Loading' and 'In-use marking').

use std::sync::Arc;

use super::table_source::TableSource;
use super::{alloc, Qcow2File, StoredDirectory};
use crate::bitmap::{BitmapSet, DirtyBitmap};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{
    encode_directory, parse_directory, parse_directory_salvage, BitmapDirEntry,
};
use crate::format::bitmap_table::{decode_table, table_size_for, TableEntry};
use crate::format::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_MASK, BME_FLAG_IN_USE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};

/// QEMU's warning when a program without bitmap support wrote a v3 image.
pub const BITMAPS_DROPPED_WARNING: &str = "a program lacking bitmap support modified this file, \
     so all bitmaps are now considered inconsistent. Some clusters may be leaked, run 'qemu-img \
     check -r' on the image file to fix.";

/// QEMU's warning for a v2 image that carries a bitmaps extension.
pub const V2_BITMAPS_WARNING: &str = "This qcow2 v2 image contains bitmaps, but they may have \
     been modified by a program without persistent bitmap support; so now they must all be \
     considered inconsistent. Some clusters may be leaked, run 'qemu-img check -r' on the image \
     file to fix.";

impl Qcow2File {
    /// Everything open does after the header was read: feature checks for writing, the
    /// autoclear rules, the directory, the bitmaps, and in_use marking.
    pub(super) fn load(&mut self, set: &mut BitmapSet) -> Result<()> {
        if self.header_cluster.header.version < 3 {
            // v2 images are only read, and any bitmaps extension in them is ignored.
            self.read_only = true;
            if self.header_cluster.exts.bitmaps.is_some() {
                crate::warning::warn(V2_BITMAPS_WARNING);
            }
            return Ok(());
        }
        let bitmaps_bit = self.header_cluster.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        match (self.header_cluster.exts.bitmaps, bitmaps_bit) {
            (Some(_), false) => crate::warning::warn(BITMAPS_DROPPED_WARNING),
            (Some(ext), true) if self.salvage => {
                let entries = ext
                    .validate(self.cluster_size())
                    .and_then(|()| self.read_directory_salvage(&ext))
                    .map_err(|e| e.context(super::salvage::DROP_HINT))?;
                self.broken = entries
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, r))| r.clone().map(|r| (i, r)))
                    .collect();
                self.dir =
                    StoredDirectory::new(Some(ext), entries.into_iter().map(|(e, _)| e).collect());
            }
            (Some(ext), true) => {
                ext.validate(self.cluster_size())?;
                self.dir = StoredDirectory::new(Some(ext), self.read_directory(&ext)?);
            }
            _ => {}
        }
        if !self.read_only {
            self.prepare_writes()?;
        }
        self.load_bitmaps(set)?;
        if !self.read_only && self.durable.is_none() {
            self.mark_in_use(set)?;
        }
        Ok(())
    }

    /// What a writable open does before anything else is written: refuse corrupt and dirty
    /// images; drop an extension that a bitmap-unaware program invalidated, a bitmaps bit
    /// without extension, and unknown autoclear bits, in one header write.
    pub(super) fn prepare_writes(&mut self) -> Result<()> {
        let h = &mut self.header_cluster.header;
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Error::NeedsRepair(
                "qcow2: Image is corrupt; cannot be opened read/write (repair it with 'qemu-img \
                 check -r all')"
                    .into(),
            ));
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Err(Error::NeedsRepair(
                "The image is dirty (lazy refcounts were in use) and its refcounts may be stale; \
                 it cannot be opened read/write before 'qemu-img check -r all' repairs it"
                    .into(),
            ));
        }
        let mut changed = false;
        let bit = h.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        if self.header_cluster.exts.bitmaps.is_some() && !bit {
            self.header_cluster.exts.bitmaps = None;
            changed = true;
        }
        if self.header_cluster.exts.bitmaps.is_none() && bit {
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
            changed = true;
        }
        if h.autoclear_features & !AUTOCLEAR_MASK != 0 {
            h.autoclear_features &= AUTOCLEAR_MASK;
            changed = true;
        }
        if changed {
            self.write_header_sync()?;
        }
        Ok(())
    }

    /// QEMU's qcow2_reopen_bitmaps_rw consistency rule: every stored bitmap has an in-memory
    /// counterpart.
    pub(super) fn reopen_checks(&self, set: &BitmapSet) -> Result<()> {
        for (i, e) in self.dir.entries().iter().enumerate() {
            if !self.is_broken(i) && set.find(e.qemu_name()).is_none() {
                return Err(Error::InvalidImage(format!(
                    "Unexpected bitmap '{}' in image '{}'",
                    String::from_utf8_lossy(e.qemu_name()),
                    self.name
                )));
            }
        }
        Ok(())
    }

    fn read_directory(
        &self,
        ext: &crate::format::extension::BitmapsExt,
    ) -> Result<Vec<BitmapDirEntry>> {
        let buf = self.read_directory_bytes(ext)?;
        parse_directory(&buf, ext.nb_bitmaps, self.cluster_size(), self.size())
    }

    /// Salvage: the directory must be sound as a whole; entries that fail their own checks
    /// come with the reason.
    fn read_directory_salvage(
        &self,
        ext: &crate::format::extension::BitmapsExt,
    ) -> Result<Vec<(BitmapDirEntry, Option<String>)>> {
        let buf = self.read_directory_bytes(ext)?;
        parse_directory_salvage(&buf, ext.nb_bitmaps, self.cluster_size(), self.size())
    }

    fn read_directory_bytes(&self, ext: &crate::format::extension::BitmapsExt) -> Result<Vec<u8>> {
        let size = ext.bitmap_directory_size;
        if size == 0 {
            return Err(Error::InvalidImage(
                "Requested bitmap directory size is zero".into(),
            ));
        }
        if size > crate::format::QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::InvalidImage(format!(
                "Requested bitmap directory size is too big: {size}"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        self.storage
            .lock()
            .read_exact_at(&mut buf, ext.bitmap_directory_offset)
            .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
        Ok(buf)
    }

    /// Creates the in-memory bitmaps from the directory, in directory order, each at the head
    /// of the list (so the last entry is listed first, as in QEMU). The table of every
    /// consistent bitmap is read and validated now, as QEMU does; its data is read when first
    /// needed (lazy loading, see `table_source.rs`).
    fn load_bitmaps(&mut self, set: &mut BitmapSet) -> Result<()> {
        let entries = self.dir.entries().to_vec();
        for (i, e) in entries.iter().enumerate() {
            if self.is_broken(i) {
                // Salvage: listed by broken_bitmaps(), never loaded.
                continue;
            }
            if e.in_use() && set.find(e.qemu_name()).is_some() {
                // QEMU skips an in_use entry whose name is already loaded.
                continue;
            }
            // Names read from disk may be empty: QEMU accepts them on load, and uses them up to
            // the first NUL.
            let name = e.qemu_name().to_vec();
            let granularity = 1u64 << e.granularity_bits;
            let mut bm = if e.in_use() {
                DirtyBitmap::new_inconsistent(name, self.size(), granularity)?
            } else {
                let source = match self.table_source(e) {
                    Ok(s) => s,
                    Err(err) if self.salvage => {
                        // Salvage: a table QEMU refuses makes the bitmap broken, not the open.
                        self.broken.push((i, err.to_string()));
                        self.broken.sort_by_key(|b| b.0);
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                let mut bm = DirtyBitmap::new_lazy(name, self.size(), granularity, source)?;
                bm.set_persistence(true);
                bm.set_enabled_unchecked(e.auto());
                bm.track_changes(self.cluster_shift(e.granularity_bits), e.table_offset);
                bm
            };
            if self.read_only {
                bm.set_readonly(true);
            }
            set.insert(bm);
        }
        Ok(())
    }

    /// Force-share opens (another process may write the image, `qemu-img -U`): reads the data
    /// of every bitmap now, then the header's bitmaps state, the directory and every table
    /// again. Returns what changed on disk meanwhile (naming the bitmap), or None: the data read
    /// is then the one the directory and tables read at open name. A lazy read later could
    /// instead find clusters that the other process freed and reused (bits that were never in
    /// any version of the bitmap). A read error stands only when nothing changed.
    pub(super) fn read_all_shared(&self, set: &mut BitmapSet) -> Result<Option<String>> {
        // Keep the sources alive: loading drops the bitmaps' hold on them.
        let sources = self.sources.live();
        let mut failed = None;
        for id in set.ids() {
            if let Err(e) = set.bitmap_mut(id)?.ensure_loaded() {
                failed = Some(e);
                break;
            }
        }
        match (self.changed_on_disk(&sources), failed) {
            (Some(what), _) => Ok(Some(what)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
        }
    }

    /// Whether the header's bitmaps state (extension, autoclear bit 0, disk size) differs from
    /// what the open read (a header that cannot be read any more has changed).
    pub(super) fn header_changed(&self) -> bool {
        match super::header_cluster::HeaderCluster::read(self.storage.lock().as_ref()) {
            Ok(fresh) => {
                let bit =
                    |h: &crate::format::header::Header| h.autoclear_features & AUTOCLEAR_BITMAPS;
                fresh.exts.bitmaps != self.header_cluster.exts.bitmaps
                    || bit(&fresh.header) != bit(&self.header_cluster.header)
                    || fresh.header.size != self.header_cluster.header.size
            }
            Err(_) => true,
        }
    }

    /// What changed on disk since the open read the directory and the tables of `sources`,
    /// naming the bitmap: an entry of the directory as it is now differs from the one read at
    /// open (name, table, granularity: the flags may change, e.g. in_use set by a writer that
    /// opened the image, without touching any data), or a table read at open differs now.
    /// None: the directory and every table read are still those of the open.
    fn changed_on_disk(&self, sources: &[Arc<TableSource>]) -> Option<String> {
        let Ok(fresh) = super::header_cluster::HeaderCluster::read(self.storage.lock().as_ref())
        else {
            return Some("the image header".into());
        };
        let bit = fresh.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        let now = match fresh.exts.bitmaps {
            Some(ext) if bit && fresh.header.size == self.header_cluster.header.size => ext
                .validate(self.cluster_size())
                .and_then(|()| self.read_directory_bytes(&ext))
                .and_then(|buf| {
                    parse_directory_salvage(&buf, ext.nb_bitmaps, self.cluster_size(), self.size())
                })
                .map(|v| v.into_iter().map(|(e, _)| e).collect::<Vec<_>>())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let key = |e: &BitmapDirEntry| {
            (
                e.name.clone(),
                e.table_offset,
                e.table_size,
                e.granularity_bits,
                e.kind,
                e.extra_data.clone(),
            )
        };
        let old = self.dir.entries();
        let differs =
            (0..old.len().max(now.len())).find(|&i| old.get(i).map(key) != now.get(i).map(key));
        if let Some(i) = differs {
            let e = old.get(i).or(now.get(i)).expect("one of them exists");
            return Some(format!(
                "bitmap '{}'",
                String::from_utf8_lossy(e.qemu_name())
            ));
        }
        sources
            .iter()
            .find(|s| !s.table_unchanged())
            .map(|s| format!("bitmap '{}'", s.name()))
    }

    /// Reads and validates a consistent bitmap's table (QEMU's checks and messages).
    pub(super) fn read_table(&self, e: &BitmapDirEntry) -> Result<Vec<TableEntry>> {
        let name = String::from_utf8_lossy(e.qemu_name()).into_owned();
        let cs = self.cluster_size();
        let expected = table_size_for(self.size(), u32::from(e.granularity_bits), cs);
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.storage
            .lock()
            .read_exact_at(&mut raw, e.table_offset)
            .map_err(|err| {
                Error::io(
                    format!("Could not read bitmap_table table from image for bitmap '{name}'"),
                    err,
                )
            })?;
        let table = decode_table(&raw, cs, &e.name)?;
        if u64::from(e.table_size) != expected {
            return Err(Error::InvalidImage(format!(
                "Could not read bitmap '{name}' from image: Invalid argument (bitmap_table_size \
                 is {} but a {} byte disk at granularity {} needs {expected})",
                e.table_size,
                self.size(),
                1u64 << e.granularity_bits
            )));
        }
        // QEMU reads the data at open and fails on clusters beyond the end of the file; the
        // data is read later here, so check that much now (cheap, no data read).
        let len = self
            .storage
            .lock()
            .size()
            .map_err(|err| Error::io("Could not get the image length", err))?;
        let beyond = table
            .iter()
            .any(|t| matches!(t, TableEntry::Cluster(off) if off.saturating_add(cs) > len));
        if beyond {
            return Err(Error::io(
                format!("Could not read bitmap '{name}' from image"),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(table)
    }

    /// A validated source for a consistent entry's data.
    pub(super) fn table_source(&mut self, e: &BitmapDirEntry) -> Result<Arc<TableSource>> {
        let table = self.read_table(e)?;
        let source = TableSource::new(
            &self.storage,
            String::from_utf8_lossy(e.qemu_name()).into_owned(),
            e.table_offset,
            table,
            self.cluster_size(),
        );
        self.sources.register(&source);
        Ok(source)
    }

    /// Sets in_use on disk for every consistent entry that has a writable in-memory bitmap,
    /// in place, with QEMU's order (docs/format.md, 'In-use marking').
    pub(super) fn mark_in_use(&mut self, set: &BitmapSet) -> Result<()> {
        if self.dir.ext.is_none() {
            return Ok(());
        }
        let mut entries = self.dir.entries().to_vec();
        let mut changed = false;
        for (i, e) in entries.iter_mut().enumerate() {
            if e.in_use() || self.is_broken(i) {
                continue;
            }
            let loaded = set
                .find_matching(e.qemu_name(), |b| !b.inconsistent())
                .is_some();
            if loaded {
                e.flags |= BME_FLAG_IN_USE;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        self.begin_update();
        self.update_dir_in_place(entries)
            .map_err(|e| e.context("Can't update bitmap directory"))
    }

    /// Rewrites the directory in place with entries that differ only in their flags, with
    /// QEMU's order (docs/format.md, 'In-use marking'): header with the bitmaps bit clear + flush,
    /// directory + flush, header with the bit set + flush. A crash in between leaves the bit
    /// clear (the next opener drops the bitmaps: safe). On failure the old directory and the
    /// bit are put back as far as possible. The directory's clusters must pass the overlap
    /// check (hold the directory and nothing else) before anything is written.
    pub(super) fn update_dir_in_place(&mut self, entries: Vec<BitmapDirEntry>) -> Result<()> {
        let Some(ext) = self.dir.ext else {
            return Ok(());
        };
        self.check_directory_owned("rewrite")?;
        let dir = encode_directory(&entries);
        if dir.len() as u64 != ext.bitmap_directory_size {
            return Err(Error::Precondition(
                "in-place directory update with another directory size".into(),
            ));
        }
        let mut cleared = false;
        let mut wrote_dir = false;
        let result = (|| {
            self.header_cluster.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            cleared = true;
            self.write_header_sync()?;
            wrote_dir = true;
            self.storage
                .lock()
                .write_all_at(&dir, ext.bitmap_directory_offset)
                .map_err(|e| Error::io("Can't update bitmap directory", e))?;
            alloc::flush(self.storage.lock().as_mut())?;
            self.header_cluster.header.autoclear_features |= AUTOCLEAR_BITMAPS;
            self.write_header_sync()
        })();
        match result {
            Ok(()) => {
                self.dir.set_entries(entries);
                Ok(())
            }
            Err(e) => {
                // Best effort: the old directory, then the bit back.
                if wrote_dir {
                    let old = encode_directory(self.dir.entries());
                    let _ = self
                        .storage
                        .lock()
                        .write_all_at(&old, ext.bitmap_directory_offset);
                    let _ = alloc::flush(self.storage.lock().as_mut());
                }
                if cleared {
                    self.header_cluster.header.autoclear_features |= AUTOCLEAR_BITMAPS;
                    if self.write_header_sync().is_err() {
                        crate::warning::warn(
                            "The bitmaps bit could not be set again: the image's bitmaps will \
                             be considered inconsistent",
                        );
                    }
                }
                Err(e)
            }
        }
    }
}
