//! Loading bitmaps on open (QEMU: qcow2_load_dirty_bitmaps, qcow2-format.md §5, §6.1, §6.2).

use super::{alloc, Disk, DiskDir};
use crate::bitmap::{BitmapSet, DirtyBitmap};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{encode_directory, parse_directory, BitmapDirEntry};
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

impl Disk {
    /// Everything open does after the header was read: feature checks for writing, the
    /// autoclear rules, the directory, the bitmaps, and in_use marking.
    pub(super) fn load(&mut self, set: &mut BitmapSet) -> Result<()> {
        if self.meta.header.version < 3 {
            // v2 images are only read, and any bitmaps extension in them is ignored.
            self.read_only = true;
            if self.meta.exts.bitmaps.is_some() {
                crate::warning::warn(V2_BITMAPS_WARNING);
            }
            return Ok(());
        }
        let bitmaps_bit = self.meta.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        match (self.meta.exts.bitmaps, bitmaps_bit) {
            (Some(_), false) => crate::warning::warn(BITMAPS_DROPPED_WARNING),
            (Some(ext), true) => {
                ext.validate(self.cluster_size())?;
                self.dir = DiskDir {
                    ext: Some(ext),
                    entries: self.read_directory(&ext)?,
                };
            }
            _ => {}
        }
        if !self.read_only {
            self.prepare_writes()?;
        }
        self.load_bitmaps(set)?;
        if !self.read_only {
            self.mark_in_use(set)?;
        }
        Ok(())
    }

    /// What a writable open does before anything else is written: refuse corrupt and dirty
    /// images; drop an extension that a bitmap-unaware program invalidated, a bitmaps bit
    /// without extension, and unknown autoclear bits, in one header write.
    pub(super) fn prepare_writes(&mut self) -> Result<()> {
        let h = &mut self.meta.header;
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
        if self.meta.exts.bitmaps.is_some() && !bit {
            self.meta.exts.bitmaps = None;
            changed = true;
        }
        if self.meta.exts.bitmaps.is_none() && bit {
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
        for e in &self.dir.entries {
            if set.find(e.qemu_name()).is_none() {
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
            .read_exact_at(&mut buf, ext.bitmap_directory_offset)
            .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
        parse_directory(&buf, ext.nb_bitmaps, self.cluster_size(), self.size())
    }

    /// Creates the in-memory bitmaps from the directory, in directory order, each at the head
    /// of the list (so the last entry is listed first, as in QEMU).
    fn load_bitmaps(&mut self, set: &mut BitmapSet) -> Result<()> {
        let entries = self.dir.entries.clone();
        for e in &entries {
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
                let mut bm = DirtyBitmap::with_unchecked_name(name, self.size(), granularity)?;
                bm.set_persistence(true);
                self.load_bitmap_data(e, &mut bm)?;
                bm.set_enabled_unchecked(e.auto());
                bm
            };
            if self.read_only {
                bm.set_readonly(true);
            }
            set.insert(bm);
        }
        Ok(())
    }

    /// Reads a consistent bitmap's table and data clusters into `bm`.
    fn load_bitmap_data(&self, e: &BitmapDirEntry, bm: &mut DirtyBitmap) -> Result<()> {
        let name = String::from_utf8_lossy(e.qemu_name()).into_owned();
        let cs = self.cluster_size();
        let expected = table_size_for(self.size(), u32::from(e.granularity_bits), cs);
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.storage
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
        // One data cluster holds 8 * cs bits, each covering a granule.
        let per_cluster = 8 * cs * bm.granularity();
        let size = self.size();
        let bits = bm.bits_mut();
        let mut buf = vec![0u8; cs as usize];
        for (i, entry) in table.iter().enumerate() {
            let start = i as u64 * per_cluster;
            if start >= size {
                break;
            }
            let count = per_cluster.min(size - start);
            match *entry {
                TableEntry::Zeroes => {}
                TableEntry::Ones => bits.deserialize_ones(start, count),
                TableEntry::Cluster(off) => {
                    self.storage.read_exact_at(&mut buf, off).map_err(|err| {
                        Error::io(format!("Could not read bitmap '{name}' from image"), err)
                    })?;
                    bits.deserialize_part(&buf, start, count);
                }
            }
        }
        bits.deserialize_finish();
        Ok(())
    }

    /// Sets in_use on disk for every consistent entry that has a writable in-memory bitmap,
    /// in place, with QEMU's order (qcow2-format.md §6.2): header with the bitmaps bit clear +
    /// flush, directory + flush, header with the bit set + flush.
    pub(super) fn mark_in_use(&mut self, set: &BitmapSet) -> Result<()> {
        let Some(ext) = self.dir.ext else {
            return Ok(());
        };
        let mut changed = false;
        for e in &mut self.dir.entries {
            if e.in_use() {
                continue;
            }
            let loaded = set
                .iter()
                .any(|(_, b)| b.name() == Some(e.qemu_name()) && !b.inconsistent());
            if loaded {
                e.flags |= BME_FLAG_IN_USE;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let dir = encode_directory(&self.dir.entries);
        let result = (|| {
            self.meta.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            self.write_header_sync()?;
            self.storage
                .write_all_at(&dir, ext.bitmap_directory_offset)
                .map_err(|e| Error::io("Can't update bitmap directory", e))?;
            alloc::flush(self.storage.as_mut())?;
            self.meta.header.autoclear_features |= AUTOCLEAR_BITMAPS;
            self.write_header_sync()
        })();
        result.map_err(|e| e.context("Can't update bitmap directory"))
    }
}
