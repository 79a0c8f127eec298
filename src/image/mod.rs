//! qcow2 images and their persistent dirty bitmaps, with QEMU's semantics.
//!
//! STUB: signatures are the contract; bodies are being written.

pub mod storage;

use std::path::Path;

use crate::bitmap::DirtyBitmap;
use crate::error::Result;
use storage::Storage;

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

/// An open qcow2 image.
pub struct Image {
    _todo: Box<dyn Storage>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").finish_non_exhaustive()
    }
}

impl Image {
    /// Creates a blank qcow2 v3 image of `size` bytes (rounded up to 512) with the given cluster
    /// size (512 B .. 2 MiB, power of two; 0 means 64 KiB). Fails if the file exists.
    pub fn create(path: impl AsRef<Path>, size: u64, cluster_size: u32) -> Result<()> {
        let _ = (path.as_ref(), size, cluster_size);
        todo!()
    }

    /// Opens an image file; `read_write` opens it for writing and marks loaded bitmaps in_use.
    pub fn open(path: impl AsRef<Path>, read_write: bool) -> Result<Image> {
        let _ = (path.as_ref(), read_write);
        todo!()
    }

    /// Opens an image held by any storage. `name` is used in messages.
    pub fn open_storage(storage: Box<dyn Storage>, name: &str, read_write: bool) -> Result<Image> {
        let _ = (storage, name, read_write);
        todo!()
    }

    /// Stores the persistent bitmaps (read-write images) and closes the image. The image is gone
    /// even when the store fails.
    pub fn close(self) -> Result<()> {
        todo!()
    }

    /// Stores persistent bitmaps now without closing; they stay loaded and are marked in_use
    /// again.
    pub fn store_bitmaps(&mut self) -> Result<()> {
        todo!()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        todo!()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        todo!()
    }

    /// Whether the image was opened (or could only be opened) read-only.
    pub fn read_only(&self) -> bool {
        todo!()
    }

    /// The name given at open (the path for files).
    pub fn name(&self) -> &str {
        todo!()
    }

    /// QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB].
    pub fn default_granularity(&self) -> u64 {
        todo!()
    }

    /// The bitmaps, newest first (QEMU's list order).
    pub fn bitmap_ids(&self) -> Vec<BitmapId> {
        todo!()
    }

    /// A bitmap by id.
    pub fn bitmap(&self, id: BitmapId) -> Option<&DirtyBitmap> {
        let _ = id;
        todo!()
    }

    /// A bitmap by id, for changes.
    pub fn bitmap_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        let _ = id;
        todo!()
    }

    /// A bitmap by exact name.
    pub fn find_bitmap(&self, name: &[u8]) -> Option<BitmapId> {
        let _ = name;
        todo!()
    }

    /// Adds a bitmap (QMP block-dirty-bitmap-add). `granularity` 0 means the default.
    pub fn add_bitmap(&mut self, name: &[u8], granularity: u64, opts: AddOptions) -> Result<BitmapId> {
        let _ = (name, granularity, opts);
        todo!()
    }

    /// Removes a bitmap, from the image too when it is persistent (QMP block-dirty-bitmap-remove).
    pub fn remove_bitmap(&mut self, name: &[u8]) -> Result<()> {
        let _ = name;
        todo!()
    }

    /// target |= source within this image (QMP block-dirty-bitmap-merge).
    pub fn merge_bitmap(&mut self, target: &[u8], source: &[u8]) -> Result<()> {
        let _ = (target, source);
        todo!()
    }

    /// target |= a bitmap of another image (QMP merge with an external source).
    pub fn merge_bitmap_from(&mut self, target: &[u8], src: &Image, source: &[u8]) -> Result<()> {
        let _ = (target, src, source);
        todo!()
    }

    /// The guest write hook (QEMU: bdrv_set_dirty): marks the range in every enabled bitmap,
    /// clamped to the disk size.
    pub fn set_dirty(&mut self, offset: u64, bytes: u64) {
        let _ = (offset, bytes);
        todo!()
    }
}
