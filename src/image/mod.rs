//! qcow2 images and their persistent dirty bitmaps, with QEMU's semantics (docs/format.md,
//! 'Loading' to 'Removal').
//!
//! An [`Image`] owns its storage, the header in memory, the refcounts (read-write opens only),
//! the bitmap directory as it is on disk, and the in-memory bitmaps (newest first, as QEMU lists
//! them). Loading follows `qcow2_load_dirty_bitmaps`, storing `qcow2_store_persistent_dirty_bitmaps`,
//! removal `qcow2_co_remove_persistent_dirty_bitmap`; see `load.rs` and `store.rs`.
#![deny(unsafe_code)]

mod alloc;
pub mod check;
mod create;
mod durable;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
mod header_cluster;
pub mod inspect;
mod load;
mod lock;
mod open;
mod overlap;
mod qcow2_file;
mod salvage;
pub mod storage;
mod store;
mod table_source;
#[cfg(test)]
mod tests;
mod txn;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bitmap::{
    self, BitmapInfo, BitmapSet, DirtyBitmap, StateView, WriteLog, ZoneTracker, CHECK_BUSY,
    CHECK_DEFAULT, CHECK_RO,
};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::BitmapDirEntry;
use crate::format::bitmap_table::table_size_for;
use crate::format::{
    BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE, QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};
use header_cluster::HeaderCluster;
use qcow2_file::{Qcow2File, StoredDirectory};
use storage::Storage;

pub use crate::bitmap::BitmapId;
pub use open::{OpenOptions, SHARED_OPEN_ATTEMPTS};
pub use salvage::{drop_bitmaps_extension, BrokenBitmap, DroppedExtension};
use store::StoreMode;
pub use store::StoreSpace;
pub use txn::Transaction;

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
pub(crate) const AUTOLOAD_WARNING: &str = "Autoload option is deprecated and its value is ignored";

/// An open qcow2 image with its dirty bitmaps, or a standalone set of bitmaps with no image
/// behind them ([`Image::new_memory`]).
pub struct Image {
    set: BitmapSet,
    /// None for standalone bitmaps.
    file: Option<Qcow2File>,
    name: String,
    /// Unique in the process (transactions refer to images by it).
    uid: u64,
    /// Set once the image was closed (store attempted); Drop then does nothing.
    closed: bool,
    /// The process that opened the image. A close in another one (a forked child) stores
    /// nothing and leaves the file and its locks to the opener (see [`Image::close`]).
    owner_pid: u32,
    /// Durable mode: the set's [`BitmapSet::changes`] at the last store.
    synced: u64,
    /// Whether the image is in durable mode (for [`Image::has_unsynced_changes`], without a
    /// look at the file).
    durable: bool,
    /// Actions of transactions not yet committed or aborted on this image: durable mode stores
    /// nothing meanwhile.
    txn_actions: usize,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("read_only", &self.read_only())
            .field("size", &self.size())
            .field("bitmaps", &self.set.len())
            .finish_non_exhaustive()
    }
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

impl Image {
    /// Creates a blank qcow2 v3 image of `size` bytes (rounded up to 512) with the given cluster
    /// size (512 B .. 2 MiB, power of two; 0 means 64 KiB). Fails if the file exists.
    pub fn create(path: impl AsRef<Path>, size: u64, cluster_size: u32) -> Result<()> {
        create::create(path.as_ref(), size, cluster_size)
    }

    /// Opens an image file; `read_write` opens it for writing and marks loaded bitmaps in_use.
    /// A v2 image opens read-only whatever is asked. Takes QEMU's image locks (fails with
    /// [`Error::InUse`] while QEMU uses the image in a conflicting way). The other ways to open
    /// (force-share, salvage, any [`Storage`]) are [`OpenOptions`]'.
    pub fn open(path: impl AsRef<Path>, read_write: bool) -> Result<Image> {
        OpenOptions::new().read_write(read_write).open(path)
    }

    /// Opens an image (see [`OpenOptions`]); `shared`: another process may write it
    /// (force-share).
    fn open_storage_opts(
        storage: Box<dyn Storage>,
        name: &str,
        read_write: bool,
        salvage: bool,
        shared: bool,
        durable: Option<u64>,
    ) -> Result<Image> {
        let ctx = || format!("Could not open '{name}'");
        let storage = table_source::SharedStorage::new(storage);
        let shared = shared && !read_write;
        let mut attempt = 1;
        loop {
            let header_cluster =
                HeaderCluster::read(storage.lock().as_ref()).map_err(|e| e.context(ctx()))?;
            let mut file = Qcow2File {
                storage: storage.clone(),
                sources: table_source::Sources::default(),
                name: name.to_string(),
                read_only: !read_write,
                failed: None,
                frozen: Vec::new(),
                header_cluster,
                refcounts: None,
                overlap: None,
                dir: StoredDirectory::default(),
                salvage,
                broken: Vec::new(),
                durable: None,
            };
            if let Some(zone_bytes) = durable {
                if !read_write || file.header_cluster.header.version < 3 {
                    return Err(Error::InvalidArgument(format!(
                        "{}: durable mode needs a read-write open of a qcow2 v3 image",
                        ctx()
                    )));
                }
                file.durable = Some(Arc::new(bitmap::ZoneTracker::new(file.size(), zone_bytes)));
            }
            let mut set = BitmapSet::new(file.size());
            if let Err(e) = file.load(&mut set) {
                // Force-share: what the load read may have been freed and reused meanwhile.
                if shared && attempt < SHARED_OPEN_ATTEMPTS && file.header_changed() {
                    attempt += 1;
                    continue;
                }
                return Err(e.context(ctx()));
            }
            if shared {
                let changed = file
                    .read_all_shared(&mut set)
                    .map_err(|e| e.context(ctx()))?;
                if let Some(what) = changed {
                    if attempt < SHARED_OPEN_ATTEMPTS {
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::InUse(format!(
                        "{}: {what} changed on disk while it was read, {attempt} times (another \
                         process is writing the image); try again",
                        ctx()
                    )));
                }
            }
            let mut image = Image::assemble(set, Some(file), name);
            if durable.is_some() {
                // Durable mode writes zones into the stored copies: the in-memory bitmaps must
                // not read them back as their own bits.
                image.load_all_bitmaps().map_err(|e| e.context(ctx()))?;
                image.synced = image.set.changes();
                image.durable = true;
            }
            return Ok(image);
        }
    }

    /// Standalone bitmaps over `size` bytes with no image behind them (raw disks, guest RAM,
    /// tests): every in-memory operation works; persistent bitmaps are refused.
    pub fn new_memory(size: u64) -> Image {
        Image::assemble(BitmapSet::new(size), None, "(memory)")
    }

    fn assemble(set: BitmapSet, file: Option<Qcow2File>, name: &str) -> Image {
        Image {
            set,
            file,
            name: name.to_string(),
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            closed: false,
            owner_pid: std::process::id(),
            synced: 0,
            durable: false,
            txn_actions: 0,
        }
    }

    /// Stores the persistent bitmaps (read-write images) and closes the image: close = store
    /// (as [`Image::store_bitmaps`], incremental) + release of the stored bitmaps + closing the
    /// file. The image is gone even when the store fails; the error says which bitmaps were
    /// lost. To keep the image (and retry, e.g. after freeing space) when the store fails, use
    /// [`Image::try_close`].
    ///
    /// A bitmap whose data could not be read when the store needed it is not stored: it stays
    /// in_use in the image, and the error names it (the others are stored).
    ///
    /// In a process other than the one that opened the image (a child after `fork`), close
    /// only frees memory: nothing is stored or written, and the image locks, which the child
    /// shares with its parent, are left to the parent.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.store_on_close()
    }

    /// [`Image::close`] that gives the image back when the store fails (ENOSPC, EDQUOT, EFBIG,
    /// I/O errors, a bitmap whose data cannot be read): what could be stored is stored, the
    /// bitmaps not stored are still in memory, intact, and in_use on disk as before, so the
    /// caller can free space and call it (or `close`) again. When an earlier header write
    /// failed (its outcome on disk is unknown, so nothing more is written to the image), the
    /// store is lost: that is reported as `close` reports it.
    pub fn try_close(mut self) -> std::result::Result<(), (Box<Image>, Error)> {
        if !self.is_owner() {
            self.closed = true;
            return Ok(());
        }
        self.set.fold();
        let r = match self.file.as_mut() {
            Some(Qcow2File {
                failed: Some(why), ..
            }) => Err(Error::ReadOnlyImage(format!(
                "Lost persistent bitmaps during close of image '{}': {why}",
                self.name
            ))),
            Some(d) if !d.read_only => d
                .store(&mut self.set, StoreMode::Close)
                .and_then(|u| u.into_result()),
            _ => Ok(()),
        };
        match r {
            Ok(()) => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err((Box::new(self), e)),
        }
    }

    /// Whether this process opened the image (false in a forked child).
    fn is_owner(&self) -> bool {
        std::process::id() == self.owner_pid
    }

    /// How much space a store (close, [`Image::store_bitmaps`]) would need now: new clusters
    /// (only changed data clusters, new tables and a new directory: an unchanged image needs
    /// none), and `qemu-img measure`'s "bitmaps" byte count for the persistent bitmaps. Bitmaps
    /// still on disk are not loaded for this. Standalone bitmaps and read-only images need
    /// nothing.
    pub fn store_space_needed(&mut self) -> Result<StoreSpace> {
        self.set.fold();
        match self.file.as_ref() {
            Some(d) => {
                let mut s = d.space_needed(&self.set)?;
                if d.read_only {
                    s.clusters = 0;
                    s.bytes = 0;
                }
                Ok(s)
            }
            None => Ok(StoreSpace::default()),
        }
    }

    /// Loads the data of every bitmap still on disk now (eager loading; normally data is read
    /// when first needed). The error names the bitmap that could not be read.
    pub fn load_all_bitmaps(&mut self) -> Result<()> {
        self.set.fold();
        for id in self.set.ids() {
            self.set.bitmap_mut(id)?.ensure_loaded()?;
        }
        Ok(())
    }

    fn store_on_close(&mut self) -> Result<()> {
        if !self.is_owner() {
            return Ok(());
        }
        self.set.fold();
        match self.file.as_mut() {
            Some(Qcow2File {
                failed: Some(why), ..
            }) => Err(Error::ReadOnlyImage(format!(
                "Lost persistent bitmaps during close of image '{}': {why}",
                self.name
            ))),
            Some(d) if !d.read_only => d
                .store(&mut self.set, StoreMode::Close)
                .and_then(|u| u.into_result())
                .map_err(|e| {
                    e.context(format!(
                        "Lost persistent bitmaps during close of image '{}'",
                        self.name
                    ))
                }),
            _ => Ok(()),
        }
    }

    /// Writes the persistent bitmaps' data now without closing (a checkpoint: the close after
    /// it writes only what changed since). They stay loaded and writable, and they stay in_use
    /// on disk throughout: guest writes may go on during the checkpoint, and one whose data
    /// reached the disk before its hook call would be missing from a copy marked consistent,
    /// so only a close (or a switch to read-only), after guest writes stopped, clears in_use.
    /// Incremental: unchanged bitmaps are not rewritten, changed ones only where they changed.
    /// On failure (e.g. ENOSPC) the bitmaps on disk are as before and the in-memory ones
    /// intact: retry once space is freed.
    pub fn store_bitmaps(&mut self) -> Result<()> {
        self.set.fold();
        let set = &mut self.set;
        let d = match self.file.as_mut() {
            Some(d) if !d.read_only => d,
            Some(d) => {
                return Err(Error::ReadOnlyImage(format!(
                    "Image '{}' is read-only",
                    d.name
                )))
            }
            None => {
                return Err(Error::Unsupported(
                    "Standalone bitmaps have no image to store to".into(),
                ))
            }
        };
        if d.durable.is_some() {
            let unstored = d.store(set, StoreMode::Durable)?;
            self.synced = self.set.changes();
            return unstored.into_result();
        }
        let unstored = d.store(set, StoreMode::Checkpoint)?;
        if let Err(e) = d.mark_in_use(set) {
            // The stored copies are consistent on disk but the bitmaps go on recording in
            // memory: make them readonly, so that the host refuses guest writes (as QEMU does
            // when it cannot make bitmaps writable) instead of letting the stored copies go
            // stale while they claim to be consistent.
            for id in set.ids() {
                if let Some(b) = set.get_mut(id) {
                    if b.will_be_stored() && !b.inconsistent() && !b.readonly() {
                        b.set_readonly(true);
                        d.frozen.push(id);
                    }
                }
            }
            return Err(e.context(
                "The bitmaps were stored but could not be marked in use again; they are \
                 readonly now and guest writes must be refused",
            ));
        }
        // Writable again if an earlier failure had frozen them.
        for id in std::mem::take(&mut d.frozen) {
            if let Some(b) = set.get_mut(id) {
                b.set_readonly(false);
            }
        }
        unstored.into_result()
    }

    /// Switches between read-write and read-only (QEMU: qcow2_reopen_bitmaps_ro / _rw).
    /// To read-only: the bitmaps are stored and become readonly. To read-write: the file is
    /// reopened for writing, the bitmaps become writable and are marked in_use on disk.
    pub fn reopen(&mut self, read_write: bool) -> Result<()> {
        self.set.fold();
        let Some(d) = self.file.as_mut() else {
            return Ok(());
        };
        if read_write != d.read_only {
            return Ok(());
        }
        if read_write {
            if d.header_cluster.header.version < 3 {
                return Err(Error::ReadOnlyImage(format!(
                    "Image '{}' is a qcow2 v2 image and can only be read",
                    d.name
                )));
            }
            d.storage.lock().set_writable(true).map_err(|e| {
                Error::io(
                    format!(
                        "Failed to reopen bitmaps rw: no write access to '{}'",
                        d.name
                    ),
                    e,
                )
            })?;
            d.read_only = false;
            let made_writable = d
                .reopen_checks(&self.set)
                .and_then(|()| d.prepare_writes())
                .and_then(|()| {
                    if d.durable.is_some() {
                        Ok(())
                    } else {
                        d.mark_in_use(&self.set)
                    }
                });
            if let Err(e) = made_writable {
                // A refused reopen leaves the image as it was: read-only.
                d.read_only = true;
                let _ = d.storage.lock().set_writable(false);
                return Err(e);
            }
            for id in self.set.ids() {
                if let Some(b) = self.set.get_mut(id) {
                    if b.persistent() {
                        b.set_readonly(false);
                    }
                }
            }
        } else {
            let unstored = d.store(&mut self.set, StoreMode::ReadOnly)?;
            if !unstored.is_empty() {
                // Stay read-write: what was stored goes back in_use, as it is still recorded.
                d.mark_in_use(&self.set)?;
                return unstored.into_result();
            }
            for id in self.set.ids() {
                if let Some(b) = self.set.get_mut(id) {
                    if b.persistent() {
                        b.set_readonly(true);
                    }
                }
            }
            d.read_only = true;
            d.refcounts = None;
            d.overlap = None;
            let _ = d.storage.lock().set_writable(false);
        }
        Ok(())
    }

    /// Virtual disk size in bytes, as QEMU sees it (the header's size rounded down to 512).
    pub fn size(&self) -> u64 {
        self.set.size()
    }

    /// Cluster size in bytes (0 for standalone bitmaps).
    pub fn cluster_size(&self) -> u64 {
        self.file.as_ref().map_or(0, Qcow2File::cluster_size)
    }

    /// qcow2 version (2 or 3; 0 for standalone bitmaps).
    pub fn version(&self) -> u32 {
        self.file
            .as_ref()
            .map_or(0, |d| d.header_cluster.header.version)
    }

    /// Whether the image was opened (or could only be opened) read-only.
    pub fn read_only(&self) -> bool {
        self.file.as_ref().is_some_and(|d| d.read_only)
    }

    /// The name given at open (the path for files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A number that identifies this image in the process.
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without
    /// an image.
    pub fn default_granularity(&self) -> u64 {
        match self.cluster_size() {
            0 => 65536,
            c => c.clamp(4096, 65536),
        }
    }

    /// The bitmaps of the image: their states (names, flags) through `&self`; their bits only
    /// through its `&mut` methods, which bring them up to date first (see [`BitmapSet`]).
    pub fn bitmaps(&self) -> &BitmapSet {
        &self.set
    }

    /// The bitmaps of the image, for in-memory operations (successors, iterators, ...). Its
    /// `&mut` methods take the hook's writes as they need them (see [`BitmapSet`]).
    pub fn bitmaps_mut(&mut self) -> &mut BitmapSet {
        self.set.absorb();
        &mut self.set
    }

    /// The lock-free guest write hook (QEMU's `bdrv_set_dirty` without its mutex): any thread
    /// may call [`WriteLog::set`] on it while the image is used elsewhere, e.g. behind a lock.
    /// Every read of bits ([`Image::bitmap_current`], [`Image::query`], merges, stores, ...)
    /// sees every write whose `set` returned before the read started. The hook must not
    /// outlive its use: stop calling it before closing the image (writes logged after the
    /// final store are lost).
    pub fn write_hook(&self) -> Arc<WriteLog> {
        self.set.write_hook()
    }

    /// Applies the writes logged through [`Image::write_hook`] to every bitmap recording now.
    /// Never needed for correctness (every read of bits brings its bitmap up to date first):
    /// it moves the cost of that catch-up to a moment the caller chooses. Cheap (two loads)
    /// when nothing is pending.
    pub fn fold_writes(&mut self) {
        self.set.fold();
    }

    /// Takes the writes logged through [`Image::write_hook`] into the image (one set per write,
    /// whatever the number of bitmaps) without giving them to the bitmaps yet: each bitmap
    /// takes them when read or changed through a `&mut` method.
    #[inline]
    pub(crate) fn absorb_writes(&mut self) {
        self.set.absorb();
    }

    /// A bitmap by id for reading its bits: with every write logged through the hook so far
    /// (brings this bitmap only up to date), its data loaded if it was still on disk. Fails
    /// when the bitmap does not exist, or its data cannot be read (the error names the bitmap
    /// and the offset; nothing changes, and the next call reads again).
    pub fn bitmap_current(&mut self, id: BitmapId) -> Result<&DirtyBitmap> {
        self.set.current(id)
    }

    /// A bitmap by id for reading its bits, with every write logged through the hook so far
    /// (this bitmap only), its data not loaded if still on disk: for the readers that answer
    /// "every granule dirty" when the data cannot be read. None when it does not exist.
    #[inline]
    pub(crate) fn bitmap_current_unloaded(&mut self, id: BitmapId) -> Option<&DirtyBitmap> {
        self.set.current_unloaded(id)
    }

    /// The bitmaps, newest first (QEMU's list order).
    pub fn bitmap_ids(&self) -> Vec<BitmapId> {
        self.set.ids()
    }

    /// A bitmap's state by id (name, granularity, flags; its bits through
    /// [`Image::bitmap_current`]).
    pub fn bitmap(&self, id: BitmapId) -> Option<StateView<'_>> {
        self.set.get(id)
    }

    /// A bitmap by id, for changes.
    pub fn bitmap_mut(&mut self, id: BitmapId) -> Option<&mut DirtyBitmap> {
        self.set.get_mut(id)
    }

    /// A bitmap by exact name.
    pub fn find_bitmap(&self, name: &[u8]) -> Option<BitmapId> {
        self.set.find(name)
    }

    /// A snapshot of every bitmap (QEMU: query-block's dirty-bitmaps), with every write the hook
    /// logged so far. Fails when the data of a bitmap still on disk cannot be read (naming it).
    pub fn query(&mut self) -> Result<Vec<BitmapInfo>> {
        self.set.query()
    }

    /// Adds a bitmap (QMP block-dirty-bitmap-add). `granularity` 0 means the default.
    pub fn add_bitmap(
        &mut self,
        name: &[u8],
        granularity: u64,
        opts: AddOptions,
    ) -> Result<BitmapId> {
        self.set.absorb();
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
        let id = self.set.create(Some(name), granularity)?;
        let bm = self.set.get_mut(id).expect("just created");
        bm.set_enabled_unchecked(!opts.disabled);
        bm.set_persistence(opts.persistent);
        if let Err(e) = self.sync_durable() {
            // Durable mode: a bitmap that is not in the image is not added.
            self.set.remove_unchecked(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Whether a new persistent bitmap can be stored (QEMU: qcow2_co_can_store_new_dirty_bitmap,
    /// with its messages prefixed "Can't make bitmap 'NAME' persistent in 'IMAGE': ").
    pub(crate) fn can_store_new_bitmap(&self, name: &[u8], granularity: u64) -> Result<()> {
        let fail = |reason: String, errno: i32| Error::CannotStore {
            name: String::from_utf8_lossy(name).into_owned(),
            image: self.name.clone(),
            reason,
            errno,
        };
        let Some(d) = self.file.as_ref() else {
            return Err(fail(
                "Can't store persistent bitmaps to standalone bitmaps".into(),
                libc::ENOTSUP,
            ));
        };
        if d.header_cluster.header.version < 3 {
            return Err(fail(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
                libc::ENOTSUP,
            ));
        }
        if d.read_only {
            return Err(fail("the image is opened read-only".into(), libc::EROFS));
        }
        if self.set.find(name).is_some() || d.dir.position(name, |_| true).is_some() {
            return Err(fail(
                format!("Bitmap already exists: {}", String::from_utf8_lossy(name)),
                libc::EEXIST,
            ));
        }
        bitmap::validate_granularity(granularity).map_err(|e| fail(e.to_string(), libc::EINVAL))?;
        let granularity_bits = granularity.trailing_zeros();
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
        let table = table_size_for(self.size(), granularity_bits, d.cluster_size());
        if table > BME_MAX_TABLE_SIZE {
            return Err(fail(
                format!("Bitmap table of {table} entries exceeds the maximum {BME_MAX_TABLE_SIZE}"),
                libc::EFBIG,
            ));
        }
        // Running totals over the set: O(1) whatever the number of bitmaps.
        let totals = self.set.totals();
        if totals.persistent as u64 + 1 > u64::from(QCOW2_MAX_BITMAPS) {
            return Err(fail(
                "Maximum number of persistent bitmaps is already reached".into(),
                libc::EFBIG,
            ));
        }
        let dir_size = totals.persistent_entry_bytes + BitmapDirEntry::size_for_name(name.len());
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
        self.set.absorb();
        let id = match self.set.lookup(name) {
            Ok(id) => id,
            Err(e) => {
                // Salvage: a broken bitmap can be removed by name (its only operation).
                if let Some(i) = self.broken_index_by_name(name) {
                    return self.remove_broken_bitmap(i);
                }
                return Err(e);
            }
        };
        let bm = self.set.bitmap(id)?;
        bm.check(CHECK_BUSY | CHECK_RO)?;
        // Every refusal comes before the stored copy is deleted: a failed call changes nothing.
        self.set.check_release(id)?;
        if self.set.bitmap(id)?.will_be_stored() {
            self.remove_stored_bitmap(name)?;
        }
        self.set.release(id)?;
        self.sync_durable()
    }

    /// Deletes the stored copy of a bitmap from the image; the in-memory bitmap is not touched
    /// (QEMU: bdrv_remove_persistent_dirty_bitmap). Nothing to do when it is not stored.
    pub fn remove_stored_bitmap(&mut self, name: &[u8]) -> Result<()> {
        self.set.absorb();
        // The in-memory bitmap may still read its data from the stored copy: load it first.
        if let Some(id) = self.set.find(name) {
            if self.file.as_ref().is_some_and(|d| !d.read_only) {
                self.set.bitmap_mut(id)?.ensure_loaded()?;
            }
        }
        match self.file.as_mut() {
            Some(d) => d.remove_from_disk(name),
            None => Ok(()),
        }
    }

    /// Drops a bitmap from memory only (QEMU: bdrv_release_dirty_bitmap); a stored copy stays
    /// in the image, marked in_use.
    pub fn release_bitmap(&mut self, id: BitmapId) -> Result<()> {
        self.set.release(id)?;
        self.sync_durable()
    }

    /// target |= source within this image (QMP block-dirty-bitmap-merge). Granularities may
    /// differ. The target is unchanged on any error.
    pub fn merge_bitmap(&mut self, target: &[u8], source: &[u8]) -> Result<()> {
        self.set.absorb();
        let t = self.set.lookup(target)?;
        let s = self.set.lookup(source)?;
        let src = self.set.current(s)?.clone();
        self.set.merge(t, &src, false)?;
        self.sync_durable()
    }

    /// target |= a bitmap of another image (QMP merge with an external source), with every
    /// write the hook of either image logged so far.
    pub fn merge_bitmap_from(
        &mut self,
        target: &[u8],
        src: &mut Image,
        source: &[u8],
    ) -> Result<()> {
        self.set.absorb();
        let t = self.set.lookup(target)?;
        let s = src.set.lookup(source)?;
        let s = src.set.current(s)?;
        self.set.merge(t, s, false)?;
        self.sync_durable()
    }

    /// The guest write hook (QEMU: bdrv_set_dirty): marks the range in every enabled bitmap,
    /// clamped to the disk size. Disabled, readonly and inconsistent bitmaps are skipped. A
    /// write reaching past the end is reported through the warning handler, and the bitmaps
    /// that recorded it mark the new space up to its end dirty when [`Image::truncate`] grows
    /// them. This one needs `&mut self` and marks each bitmap directly; for writes from I/O
    /// threads without a lock, use [`Image::write_hook`].
    pub fn set_dirty(&mut self, offset: u64, bytes: u64) {
        self.set.set_dirty(offset, bytes);
        if let Some(z) = self.zone_tracker() {
            durable_completion(&z, offset, bytes);
        }
    }

    /// Durable mode's zones (None in the ordinary mode): the lock-free side of
    /// [`Image::prepare_write`] ([`ZoneTracker::prepare`]) and of the write hook
    /// ([`ZoneTracker::complete`], after [`WriteLog::set`]) for hosts that write from several
    /// threads.
    pub fn zone_tracker(&self) -> Option<Arc<ZoneTracker>> {
        self.file.as_ref().and_then(|d| d.durable.clone())
    }

    /// Durable mode: call before issuing a guest write to `[offset, offset + bytes)`. Returns
    /// once every stored bitmap that records covers the range on disk (written and flushed);
    /// on error the write must not be issued. After the write completes (or fails), the
    /// host records it with the write hook ([`Image::set_dirty`] or [`WriteLog::set`] +
    /// [`ZoneTracker::complete`]). Does nothing in the ordinary mode.
    pub fn prepare_write(&mut self, offset: u64, bytes: u64) -> Result<()> {
        let Some(z) = self.zone_tracker() else {
            return Ok(());
        };
        z.check_in_disk(offset, bytes)?;
        if z.prepare(offset, bytes) {
            return Ok(());
        }
        self.commit_prepared(offset, bytes)
    }

    /// The slow side of [`Image::prepare_write`], for a write already counted in flight
    /// ([`ZoneTracker::prepare`] answered false): covers its zones that are not covered yet,
    /// with those other threads queued, in one write and one flush. On error the write is no
    /// longer counted in flight and must not be issued.
    pub fn commit_prepared(&mut self, offset: u64, bytes: u64) -> Result<()> {
        let Some(z) = self.zone_tracker() else {
            return Ok(());
        };
        let r = self.commit_zones(&z, offset, bytes);
        if r.is_err() {
            z.unprepare(offset, bytes);
        }
        r
    }

    fn commit_zones(&mut self, z: &ZoneTracker, offset: u64, bytes: u64) -> Result<()> {
        // Management changes not stored yet (a failed sync) go first: the zones are written
        // into the stored copies as they will be.
        self.sync_durable()?;
        let mut zones = z.uncovered(offset, bytes);
        zones.extend(z.take_pending());
        zones.sort_unstable();
        zones.dedup();
        if zones.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(u64, u64)> = zones
            .iter()
            .map(|&n| {
                let (s, e) = z.zone_range(n);
                (s, e - s)
            })
            .collect();
        let d = self.file.as_mut().expect("durable mode has a file");
        d.mark_zones(&ranges, &mut self.set).map_err(|e| {
            e.context(format!(
                "Could not mark a guest write at offset {offset} ({bytes} bytes) in the bitmaps \
                 of '{}' (durable mode); the write must not be issued",
                self.name
            ))
        })?;
        z.cover(&zones);
        Ok(())
    }

    /// Whether [`Image::sync_durable`] has something to store: in durable mode, some bitmap
    /// changed since the last store; never in the ordinary mode. Cheap: two loads.
    #[inline]
    pub fn has_unsynced_changes(&self) -> bool {
        self.durable && self.set.changes() != self.synced
    }

    /// Durable mode: stores the bitmaps if anything but guest writes changed them since the
    /// last store (a management call), so that the change survives a crash. The image's own
    /// management methods call it; after changes through [`Image::bitmap_mut`] or
    /// [`Image::bitmaps_mut`], call it. Does nothing in the ordinary mode, and costs one
    /// comparison when nothing changed. Stores nothing while a [`Transaction`] has prepared
    /// actions on the image: its commit or abort stores the outcome.
    pub fn sync_durable(&mut self) -> Result<()> {
        if self.set.changes() == self.synced || self.txn_actions > 0 {
            return Ok(());
        }
        let Some(d) = self.file.as_mut().filter(|d| d.durable.is_some()) else {
            return Ok(());
        };
        if d.read_only {
            return Ok(());
        }
        if let Some(why) = &d.failed {
            return Err(Error::ReadOnlyImage(format!(
                "The change cannot be stored in '{}' (durable mode): {why}",
                self.name
            )));
        }
        self.set.fold();
        let unstored = d.store(&mut self.set, StoreMode::Durable)?;
        self.synced = self.set.changes();
        unstored.into_result()
    }

    /// Resizes every bitmap after the disk was resized (QEMU: bdrv_dirty_bitmap_truncate, with
    /// qcow2's conditions for images). For an image, the new size must be the one its header
    /// now says: a host that resized the image calls this afterwards. Refused while a bitmap is
    /// busy, frozen, iterated, readonly or inconsistent, or when stored bitmaps are not loaded.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        self.set.fold();
        if let Some(d) = self.file.as_mut() {
            if d.durable.is_some() {
                // The zones are cut for the size at open: writes past it would find nothing
                // to cover.
                return Err(Error::Unsupported(format!(
                    "Cannot resize the bitmaps of '{}' in durable mode: close the image, resize \
                     it, and open it again",
                    self.name
                )));
            }
            for (_, b) in self.set.iter() {
                if b.persistent() {
                    b.check(CHECK_DEFAULT)?;
                }
            }
            for e in d.dir.entries() {
                if self.set.find(e.qemu_name()).is_none() {
                    return Err(Error::Precondition(
                        "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory"
                            .into(),
                    ));
                }
            }
            d.refresh_size()?;
            if d.size() != new_size {
                return Err(Error::Precondition(format!(
                    "The image '{}' is {} bytes, not {new_size}: resize the image first",
                    d.name,
                    d.size()
                )));
            }
        }
        self.set.truncate(new_size)?;
        self.sync_durable()
    }
}

/// The write hook's side of durable mode: the write is no longer in flight; a completion that
/// no `prepare_write` announced is reported (the host broke the protocol: that write may be
/// missing from the stored bitmaps after a crash).
pub(crate) fn durable_completion(z: &ZoneTracker, offset: u64, bytes: u64) {
    if !z.complete(offset, bytes) {
        crate::warning::warn(&format!(
            "Durable mode: a guest write at offset {offset} ({bytes} bytes) was recorded \
             without a prepare_write before it ({} such writes so far); after a crash the \
             stored bitmaps may miss it",
            z.violations()
        ));
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Err(e) = self.store_on_close() {
            crate::warning::warn(&e.to_string());
        }
    }
}
