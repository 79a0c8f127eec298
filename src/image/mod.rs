//! qcow2 images and their persistent dirty bitmaps, with QEMU's semantics
//! (qcow2-format.md §5, §6; dirty-bitmap-api.md §2, §4).
//!
//! An [`Image`] owns its storage, the header in memory, the refcounts (read-write opens only),
//! the bitmap directory as it is on disk, and the in-memory bitmaps (newest first, as QEMU lists
//! them). Loading follows `qcow2_load_dirty_bitmaps`, storing `qcow2_store_persistent_dirty_bitmaps`,
//! removal `qcow2_co_remove_persistent_dirty_bitmap`; see `load.rs` and `store.rs`.

mod alloc;
mod create;
mod load;
mod meta;
pub mod storage;
mod store;
#[cfg(test)]
mod tests;

use std::path::Path;

use crate::bitmap::{self, DirtyBitmap, CHECK_ALLOW_RO, CHECK_BUSY, CHECK_DEFAULT, CHECK_RO};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::BitmapDirEntry;
use crate::format::bitmap_table::table_size_for;
use crate::format::extension::BitmapsExt;
use crate::format::{
    BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE, QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};
use alloc::Refcounts;
use meta::Meta;
use storage::{FileStorage, Storage};

/// Identifies a bitmap of an image for as long as it exists (never reused within an image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitmapId(pub u64);

/// Options of [`Image::add_bitmap`] (QMP `block-dirty-bitmap-add`).
#[derive(Clone, Copy, Debug, Default)]
pub struct AddOptions {
    /// Store the bitmap in the image on close.
    pub persistent: bool,
    /// Create it disabled (not recording writes).
    pub disabled: bool,
    /// Deprecated `autoload`: accepted, ignored, and warned about when Some.
    pub autoload: Option<bool>,
}

/// The warning given for the deprecated autoload option.
pub const AUTOLOAD_WARNING: &str = "Autoload option is deprecated and its value is ignored";

/// One in-memory bitmap and its id.
#[derive(Debug)]
struct Slot {
    id: BitmapId,
    bm: DirtyBitmap,
}

/// The bitmap directory as it is on disk now.
#[derive(Clone, Debug, Default)]
struct DiskDir {
    /// The extension (None: the image has no bitmaps extension in use).
    ext: Option<BitmapsExt>,
    /// The entries, in directory order.
    entries: Vec<BitmapDirEntry>,
}

/// An open qcow2 image.
pub struct Image {
    storage: Box<dyn Storage>,
    name: String,
    read_only: bool,
    meta: Meta,
    /// Refcounts, loaded on the first allocation of a read-write image.
    refcounts: Option<Refcounts>,
    dir: DiskDir,
    /// In-memory bitmaps, newest first.
    slots: Vec<Slot>,
    next_id: u64,
    /// Set once the image was closed (store attempted); Drop then does nothing.
    closed: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("size", &self.size())
            .field("bitmaps", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Creates a blank qcow2 v3 image of `size` bytes (rounded up to 512) with the given cluster
    /// size (512 B .. 2 MiB, power of two; 0 means 64 KiB). Fails if the file exists.
    pub fn create(path: impl AsRef<Path>, size: u64, cluster_size: u32) -> Result<()> {
        create::create(path.as_ref(), size, cluster_size)
    }

    /// Opens an image file; `read_write` opens it for writing and marks loaded bitmaps in_use.
    /// A v2 image opens read-only whatever is asked.
    pub fn open(path: impl AsRef<Path>, read_write: bool) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let storage = FileStorage::open(path, read_write)
            .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
        Self::open_storage(Box::new(storage), &name, read_write)
    }

    /// Opens an image held by any storage. `name` is used in messages.
    pub fn open_storage(storage: Box<dyn Storage>, name: &str, read_write: bool) -> Result<Image> {
        let meta = Meta::read(storage.as_ref())
            .map_err(|e| e.context(format!("Could not open '{name}'")))?;
        let mut img = Image {
            storage,
            name: name.to_string(),
            read_only: !read_write,
            meta,
            refcounts: None,
            dir: DiskDir::default(),
            slots: Vec::new(),
            next_id: 1,
            closed: false,
        };
        img.load()
            .map_err(|e| e.context(format!("Could not open '{name}'")))?;
        Ok(img)
    }

    /// Stores the persistent bitmaps (read-write images) and closes the image. The image is gone
    /// even when the store fails; the error says which bitmaps were lost.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        if self.read_only {
            return Ok(());
        }
        self.store(true).map_err(|e| {
            e.context(format!(
                "Lost persistent bitmaps during close of image '{}'",
                self.name
            ))
        })
    }

    /// Stores the persistent bitmaps now without closing. They stay loaded and writable and are
    /// marked in_use again on disk before this returns.
    pub fn store_bitmaps(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnlyImage(format!(
                "Image '{}' is read-only",
                self.name
            )));
        }
        self.store(false)?;
        self.mark_in_use()
    }

    /// Virtual disk size in bytes, as QEMU sees it (the header's size rounded down to 512).
    pub fn size(&self) -> u64 {
        self.meta.header.size & !511
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.meta.header.cluster_size()
    }

    /// qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.meta.header.version
    }

    /// Whether the image was opened (or could only be opened) read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The name given at open (the path for files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB].
    pub fn default_granularity(&self) -> u64 {
        self.cluster_size().clamp(4096, 65536)
    }

    /// The bitmaps, newest first (QEMU's list order).
    pub fn bitmap_ids(&self) -> Vec<BitmapId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// A bitmap by id.
    pub fn bitmap(&self, id: BitmapId) -> Option<&DirtyBitmap> {
        self.slots.iter().find(|s| s.id == id).map(|s| &s.bm)
    }

    /// A bitmap by id, for changes.
    pub fn bitmap_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .map(|s| &mut s.bm)
    }

    /// A bitmap by exact name.
    pub fn find_bitmap(&self, name: &[u8]) -> Option<BitmapId> {
        self.slots
            .iter()
            .find(|s| s.bm.name() == Some(name))
            .map(|s| s.id)
    }

    fn lookup(&self, name: &[u8]) -> Result<usize> {
        self.slots
            .iter()
            .position(|s| s.bm.name() == Some(name))
            .ok_or_else(|| Error::BitmapNotFound {
                name: String::from_utf8_lossy(name).into_owned(),
            })
    }

    fn insert(&mut self, bm: DirtyBitmap) -> BitmapId {
        let id = BitmapId(self.next_id);
        self.next_id += 1;
        self.slots.insert(0, Slot { id, bm });
        id
    }

    /// Adds a bitmap (QMP block-dirty-bitmap-add). `granularity` 0 means the default.
    pub fn add_bitmap(
        &mut self,
        name: &[u8],
        granularity: u64,
        opts: AddOptions,
    ) -> Result<BitmapId> {
        bitmap::validate_name(name)?;
        let granularity = if granularity == 0 {
            self.default_granularity()
        } else {
            granularity
        };
        bitmap::validate_granularity(granularity)?;
        if opts.autoload.is_some() {
            crate::warning::warn(AUTOLOAD_WARNING);
        }
        if opts.persistent {
            self.can_store_new_bitmap(name, granularity)?;
        }
        if self.find_bitmap(name).is_some() {
            return Err(Error::BitmapExists {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        let mut bm = DirtyBitmap::new(Some(name), self.size(), granularity)?;
        bm.set_enabled_unchecked(!opts.disabled);
        bm.set_persistence(opts.persistent);
        Ok(self.insert(bm))
    }

    /// QEMU's qcow2_co_can_store_new_dirty_bitmap, with its messages.
    fn can_store_new_bitmap(&self, name: &[u8], granularity: u64) -> Result<()> {
        let fail = |reason: String, errno: i32| Error::CannotStore {
            name: String::from_utf8_lossy(name).into_owned(),
            image: self.name.clone(),
            reason,
            errno,
        };
        if self.meta.header.version < 3 {
            return Err(fail(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
                libc::ENOTSUP,
            ));
        }
        if self.read_only {
            return Err(fail("the image is opened read-only".into(), libc::EROFS));
        }
        if self.find_bitmap(name).is_some()
            || self.dir.entries.iter().any(|e| e.qemu_name() == name)
        {
            return Err(fail(
                format!("Bitmap already exists: {}", String::from_utf8_lossy(name)),
                libc::EEXIST,
            ));
        }
        let gbits = granularity.trailing_zeros();
        let bytes = self.size().div_ceil(granularity).div_ceil(8);
        if bytes > BME_MAX_PHYS_SIZE {
            return Err(fail(
                format!(
                    "Too much space will be occupied by the bitmap. Use larger granularity \
                     ({bytes} bytes of bitmap data, the maximum is {BME_MAX_PHYS_SIZE})"
                ),
                libc::EFBIG,
            ));
        }
        let table = table_size_for(self.size(), gbits, self.cluster_size());
        if table > BME_MAX_TABLE_SIZE {
            return Err(fail(
                format!("Bitmap table of {table} entries exceeds the maximum {BME_MAX_TABLE_SIZE}"),
                libc::EFBIG,
            ));
        }
        let persistent: Vec<&DirtyBitmap> = self
            .slots
            .iter()
            .map(|s| &s.bm)
            .filter(|b| b.persistent())
            .collect();
        if persistent.len() as u64 + 1 > u64::from(QCOW2_MAX_BITMAPS) {
            return Err(fail(
                "Maximum number of persistent bitmaps is already reached".into(),
                libc::EFBIG,
            ));
        }
        let dir_size: u64 = persistent
            .iter()
            .map(|b| dir_entry_size(b.name().map_or(0, <[u8]>::len)))
            .sum::<u64>()
            + dir_entry_size(name.len());
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return Err(fail(
                "Not enough space in the bitmap directory".into(),
                libc::EFBIG,
            ));
        }
        Ok(())
    }

    /// Removes a bitmap, from the image too when it is persistent (QMP block-dirty-bitmap-remove).
    /// Allowed on inconsistent bitmaps; refused on busy and readonly ones.
    pub fn remove_bitmap(&mut self, name: &[u8]) -> Result<()> {
        let idx = self.lookup(name)?;
        self.slots[idx].bm.check(CHECK_BUSY | CHECK_RO)?;
        if self.slots[idx].bm.persistence() {
            self.remove_from_disk(name)?;
        }
        self.slots.remove(idx);
        Ok(())
    }

    /// target |= source within this image (QMP block-dirty-bitmap-merge). Granularities may
    /// differ. The target is unchanged on any error.
    pub fn merge_bitmap(&mut self, target: &[u8], source: &[u8]) -> Result<()> {
        let t = self.lookup(target)?;
        let s = self.lookup(source)?;
        let src = self.slots[s].bm.clone();
        self.merge_checked(t, &src)
    }

    /// target |= a bitmap of another image (QMP merge with an external source).
    pub fn merge_bitmap_from(&mut self, target: &[u8], src: &Image, source: &[u8]) -> Result<()> {
        let t = self.lookup(target)?;
        let s = src.lookup(source)?;
        self.merge_checked(t, &src.slots[s].bm)
    }

    /// QMP merge order: the source is checked (ALLOW_RO) and sized against the target's length
    /// first, then the target (DEFAULT).
    fn merge_checked(&mut self, t: usize, src: &DirtyBitmap) -> Result<()> {
        src.check(CHECK_ALLOW_RO)?;
        let target = &mut self.slots[t].bm;
        if target.size() != src.size() {
            return Err(Error::SizeMismatch {
                dest: target.size(),
                src: src.size(),
            });
        }
        target.check(CHECK_DEFAULT)?;
        target.merge_from(src)
    }

    /// The guest write hook (QEMU: bdrv_set_dirty): marks the range in every enabled bitmap,
    /// clamped to the disk size. Disabled, readonly and inconsistent bitmaps are skipped.
    pub fn set_dirty(&mut self, offset: u64, bytes: u64) {
        let size = self.size();
        if offset >= size || bytes == 0 {
            return;
        }
        let bytes = bytes.min(size - offset);
        for s in &mut self.slots {
            if s.bm.enabled() && !s.bm.readonly() && !s.bm.inconsistent() {
                s.bm.bits_mut().set(offset, bytes);
            }
        }
    }

    fn refcounts(&mut self) -> Result<&mut Refcounts> {
        if self.refcounts.is_none() {
            let h = &self.meta.header;
            self.refcounts = Some(Refcounts::load(
                self.storage.as_ref(),
                h.cluster_bits,
                h.refcount_order,
                h.refcount_table_offset,
                h.refcount_table_clusters,
            )?);
        }
        Ok(self.refcounts.as_mut().expect("loaded above"))
    }

    /// Allocates `n` clusters (refcount 1).
    fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.refcounts()?;
        let rc = self.refcounts.as_mut().expect("loaded");
        let off = rc.alloc(self.storage.as_mut(), n)?;
        let (t_off, t_clusters) = rc.reftable_location();
        self.meta.header.refcount_table_offset = t_off;
        self.meta.header.refcount_table_clusters = t_clusters;
        Ok(off)
    }

    /// Writes the header from memory and flushes.
    fn write_header_sync(&mut self) -> Result<()> {
        self.meta.write(self.storage.as_mut())?;
        alloc::flush(self.storage.as_mut())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.closed || self.read_only {
            return;
        }
        self.closed = true;
        if let Err(e) = self.store(true) {
            crate::warning::warn(&format!(
                "Lost persistent bitmaps during close of image '{}': {e}",
                self.name
            ));
        }
    }
}

/// Size of a directory entry with a name of `name_len` bytes and no extra data.
fn dir_entry_size(name_len: usize) -> u64 {
    (BitmapDirEntry::FIXED_SIZE as u64 + name_len as u64).next_multiple_of(8)
}
