//! What the opaque `qdirty_image` / `qdirty_bitmap` pointers really are, and the only casts
//! between the two worlds.
//!
//! - `qdirty_image *` is an [`ImageHandle`] that C owns ([`OwnedByCaller`]): the [`Image`] and the bitmap handles handed out so
//!   far, both behind one mutex, and outside it the image's lock-free write hook
//!   ([`WriteLog`]), which `qdirty_image_set_dirty` uses without locking. Taking the lock absorbs
//!   the log (each bitmap then catches up when it is read: docs/design.md, 'Freshness'), so
//!   every locked call sees the writes that completed before it.
//! - `qdirty_bitmap *` is a [`BitmapHandle`] owned by its image handle ([`OwnedByParent`]):
//!   created the first time a bitmap is handed out (first/next/find/add), freed only when the
//!   image is closed. It names the bitmap by [`BitmapId`], which an image never reuses; every
//!   call locks the image and looks the bitmap up, so a call on the handle of a bitmap that is
//!   gone (removed, released, abdicated, removed by a transaction) fails with ENOENT and can
//!   never reach another bitmap: the handle's memory is not freed, so it cannot be reused for
//!   another handle while the image is open.
//!
//! Both go through the casts of `castable.rs`.

use std::ffi::CString;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::castable::{self, Castable, Children, OwnedByCaller, OwnedByParent};
use super::error::{cstring_lossy, FfiError};
use crate::bitmap::{DirtyBitmap, WriteLog, ZoneTracker};
use crate::image::{BitmapId, Image};

/// An open qcow2 image and its dirty bitmaps.
///
/// Ownership: owned by the caller from `qdirty_image_open` until `qdirty_image_close`, which
/// always frees it. It owns its `qdirty_bitmap` handles.
/// Thread safety: may be used from several threads; calls on one image are serialized by an
/// internal lock held for the whole call. `qdirty_image_set_dirty` (the guest write hook) takes
/// no lock: it may run from any number of I/O threads concurrently with each other and with
/// every management call. Calls touching two images lock them in address order. Closing must
/// not race with any other use, the write hook included (stop I/O first). A panic inside
/// qdirty (a bug) makes the image unusable: later calls fail with "image is unusable after an
/// internal error", and close abandons it without storing.
/// Methods: qdirty_image_open, qdirty_image_close, qdirty_image_size, qdirty_image_read_only,
/// qdirty_image_store_bitmaps, qdirty_image_first_bitmap, qdirty_image_find_bitmap,
/// qdirty_image_add_bitmap, qdirty_image_remove_bitmap, qdirty_image_merge_bitmap,
/// qdirty_image_set_dirty
#[allow(non_camel_case_types)]
pub struct qdirty_image {
    _private: [u8; 0],
}

/// A dirty bitmap of an image.
///
/// Ownership: borrowed from its image; never freed by the caller. The pointer stays safe to
/// pass until the image is closed: once its bitmap is gone (removed, released, abdicated,
/// removed by a committed transaction), every call on it fails with -ENOENT (getters without
/// an error channel return NULL / false / 0 / -1, and report the gone bitmap through the
/// warning handler: that answer says nothing about the disk) and never touches another
/// bitmap. Finding the same bitmap twice returns the same pointer.
/// Thread safety: as its image (calls are serialized by the image's lock).
/// Methods: qdirty_bitmap_next, qdirty_bitmap_name, qdirty_bitmap_granularity,
/// qdirty_bitmap_size, qdirty_bitmap_enabled, qdirty_bitmap_persistent,
/// qdirty_bitmap_inconsistent, qdirty_bitmap_readonly, qdirty_bitmap_enable,
/// qdirty_bitmap_disable, qdirty_bitmap_set_dirty, qdirty_bitmap_reset_dirty,
/// qdirty_bitmap_clear, qdirty_bitmap_get, qdirty_bitmap_count, qdirty_bitmap_next_dirty,
/// qdirty_bitmap_next_zero, qdirty_bitmap_next_dirty_area, qdirty_bitmap_sha256
#[allow(non_camel_case_types)]
pub struct qdirty_bitmap {
    _private: [u8; 0],
}

impl Castable for qdirty_image {
    type RustType = ImageHandle;
    type Ownership = OwnedByCaller;
    const MAGIC: u64 = 0x7164_6972_7479_494d; // "qdirtyIM"
    const NOT_LIVE: &'static str = "is not an open qdirty_image";
}

impl Castable for qdirty_bitmap {
    type RustType = BitmapHandle;
    type Ownership = OwnedByParent;
    const MAGIC: u64 = 0x7164_6972_7479_424d; // "qdirtyBM"
    const NOT_LIVE: &'static str = "is not a valid qdirty_bitmap (removed, or its image closed?)";
}

/// The image crosses threads inside its mutex: it must be Send.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Image>();
};

/// What `qdirty_image *` points to.
pub(crate) struct ImageHandle {
    /// The image's write log, shared with its bitmap set: the hook writes here without the lock.
    log: Arc<WriteLog>,
    /// Durable mode's zones, shared with the image: `qdirty_image_prepare_write` and the hook
    /// use them without the lock. None in the ordinary mode.
    zones: Option<Arc<ZoneTracker>>,
    state: Mutex<LockedImage>,
}

/// The image lock, held: what [`ImageHandle::lock`] gives. When it is released, an image in
/// durable mode stores what the call changed (`Image::sync_durable`), so that every call
/// that changes bitmaps is durable when it returns; a failure of that store becomes the
/// call's error (`boundary::defer_error`).
pub(crate) struct ImageGuard<'a>(MutexGuard<'a, LockedImage>);

impl std::ops::Deref for ImageGuard<'_> {
    type Target = LockedImage;
    fn deref(&self) -> &LockedImage {
        &self.0
    }
}

impl std::ops::DerefMut for ImageGuard<'_> {
    fn deref_mut(&mut self) -> &mut LockedImage {
        &mut self.0
    }
}

impl Drop for ImageGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // One comparison for the calls that change nothing (every read).
        if !self.0.image.has_unsynced_changes() || std::thread::panicking() {
            return;
        }
        if let Err(e) = self.0.image.sync_durable() {
            super::boundary::defer_error(FfiError::from(e.context(
                "The change was made in memory but could not be stored in the image (durable \
                 mode): a crash now would lose it; qdirty_image_store_bitmaps retries",
            )));
        }
    }
}

/// Everything behind the image lock.
pub(crate) struct LockedImage {
    pub(crate) image: Image,
    /// The bitmap handles handed out so far, freed with the image.
    handles: Children<BitmapId, qdirty_bitmap>,
}

/// What `qdirty_bitmap *` points to.
pub(crate) struct BitmapHandle {
    image: *const qdirty_image,
    pub(crate) id: BitmapId,
    /// The name, truncated at its first NUL byte; unset while the bitmap is anonymous (a
    /// successor gets its parent's name when the parent abdicates).
    pub(crate) name: OnceLock<CString>,
}

impl ImageHandle {
    /// A new handle, as the pointer C gets.
    pub(crate) fn into_raw(image: Image) -> *mut qdirty_image {
        castable::to_raw(ImageHandle {
            log: image.write_hook(),
            zones: image.zone_tracker(),
            state: Mutex::new(LockedImage {
                image,
                handles: Children::default(),
            }),
        })
    }

    /// Borrows the handle behind a C pointer.
    ///
    /// # Safety
    /// `img` is NULL or a pointer from `qdirty_image_open` not yet closed.
    pub(crate) unsafe fn from_ptr<'a>(
        img: *const qdirty_image,
        what: &str,
    ) -> Result<&'a ImageHandle, FfiError> {
        // SAFETY: caller's contract.
        unsafe { castable::try_ref(img, what) }
    }

    /// The write log behind a C pointer, for the guest write hook: None for NULL or a pointer
    /// that is not an open image. Builds no error (the hook has none to report), so it inlines
    /// into the hook without taking registers from the log's dependent loads.
    ///
    /// # Safety
    /// As [`ImageHandle::from_ptr`].
    #[inline(always)]
    pub(crate) unsafe fn hook_of<'a>(
        img: *const qdirty_image,
    ) -> Option<(&'a WriteLog, Option<&'a ZoneTracker>)> {
        // SAFETY: caller's contract.
        unsafe { castable::peek(img) }.map(|h: &ImageHandle| (&*h.log, h.zones.as_deref()))
    }

    /// Durable mode's zones (None in the ordinary mode).
    pub(crate) fn zones(&self) -> Option<&ZoneTracker> {
        self.zones.as_deref()
    }

    /// Takes the handle back from C for closing (EINVAL, and nothing freed, for NULL or a
    /// pointer that is not an open image).
    ///
    /// # Safety
    /// As [`ImageHandle::from_ptr`]; C gives up ownership.
    pub(crate) unsafe fn take(img: *mut qdirty_image) -> Result<ImageHandle, FfiError> {
        // SAFETY: caller's contract.
        unsafe { castable::take(img, "img") }
    }

    /// Locks the image and absorbs the write log (two loads when none is pending; else one set
    /// per pending write, whatever the number of bitmaps), so that the call sees every write
    /// that completed before it: each bitmap takes the absorbed writes when the call reads or
    /// changes it ([`with_bitmap`], the image's `&mut` methods), or all of them at a
    /// [`Image::fold_writes`](crate::Image::fold_writes) (query, store).
    pub(crate) fn lock(&self) -> Result<ImageGuard<'_>, FfiError> {
        let mut state = self.state.lock().map_err(|_| FfiError::poisoned())?;
        state.image.absorb_writes();
        Ok(ImageGuard(state))
    }

    /// The state, for closing, and whether an earlier panic poisoned the lock.
    pub(crate) fn into_state(self) -> (LockedImage, bool) {
        match self.state.into_inner() {
            Ok(state) => (state, false),
            Err(poisoned) => (poisoned.into_inner(), true),
        }
    }

    /// Whether `self` and `other` are the same image.
    pub(crate) fn same(&self, other: &ImageHandle) -> bool {
        std::ptr::eq(self, other)
    }
}

impl LockedImage {
    /// The image, for closing (bitmap handles are freed when `self` drops).
    pub(crate) fn into_image(self) -> Image {
        let LockedImage { image, handles } = self;
        drop(handles);
        image
    }

    /// The C pointer of the bitmap `id`, creating its handle on first use. NULL if the bitmap
    /// does not exist.
    /// `owner` is the image's C pointer, kept by the handle.
    pub(crate) fn handle_for(
        &mut self,
        owner: *const qdirty_image,
        id: BitmapId,
    ) -> *mut qdirty_bitmap {
        let image = &self.image;
        self.handles.get_or_insert_with(id, || {
            let bm = image.bitmap(id)?;
            let name = OnceLock::new();
            if let Some(n) = bm.name() {
                let _ = name.set(c_name(n));
            }
            Some(BitmapHandle {
                image: owner,
                id,
                name,
            })
        })
    }

    /// Gives the handle of `id` (if one was handed out) the bitmap's name when it has none yet
    /// (a successor that took its parent's name by abdication).
    pub(crate) fn refresh_name(&mut self, id: BitmapId) {
        let Some(h) = self.handles.get(&id) else {
            return;
        };
        if let Some(n) = self.image.bitmap(id).and_then(|b| b.name()) {
            let _ = h.name.set(c_name(n));
        }
    }
}

impl BitmapHandle {
    /// Borrows the handle behind a C pointer.
    ///
    /// # Safety
    /// `bm` is NULL or a bitmap pointer still owned by an open image.
    pub(crate) unsafe fn from_ptr<'a>(
        bm: *const qdirty_bitmap,
    ) -> Result<&'a BitmapHandle, FfiError> {
        // SAFETY: caller's contract.
        unsafe { castable::try_ref(bm, "bitmap") }
    }

    /// The C pointer of the image this bitmap belongs to.
    pub(crate) fn image_ptr(&self) -> *const qdirty_image {
        self.image
    }

    /// The image this bitmap belongs to.
    pub(crate) fn image(&self) -> Result<&ImageHandle, FfiError> {
        // SAFETY: the image owns this handle and frees it before itself, so while the handle is
        // valid (caller's contract) the image is too.
        unsafe { ImageHandle::from_ptr(self.image, "the bitmap's image") }
    }

    /// The error for a bitmap that no longer exists in its image.
    pub(crate) fn gone(&self) -> FfiError {
        FfiError::new(
            libc::ENOENT,
            match self.name.get() {
                Some(n) => format!(
                    "Bitmap '{}' no longer exists in its image",
                    n.to_string_lossy()
                ),
                None => "The anonymous bitmap no longer exists in its image".to_owned(),
            },
        )
    }
}

/// A bitmap name as C sees it: up to its first NUL byte.
fn c_name(name: &[u8]) -> CString {
    cstring_lossy(name.split(|&b| b == 0).next().unwrap_or_default())
}

/// Runs `f` with the bitmap's image locked, after checking that the bitmap still exists. `f`
/// gets the locked state, the image's C pointer and the bitmap's id.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_state<R>(
    bm: *const qdirty_bitmap,
    f: impl FnOnce(&mut LockedImage, *const qdirty_image, BitmapId) -> Result<R, FfiError>,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    if state.image.bitmap(h.id).is_none() {
        return Err(h.gone());
    }
    f(&mut state, h.image_ptr(), h.id)
}

/// Locks the given images, each once, in address order (so that calls locking several images
/// cannot deadlock each other). The guards come back in address order.
pub(crate) fn lock_all<'a>(
    images: &[&'a ImageHandle],
) -> Result<Vec<(&'a ImageHandle, ImageGuard<'a>)>, FfiError> {
    let mut sorted: Vec<&'a ImageHandle> = images.to_vec();
    sorted.sort_by_key(|h| *h as *const ImageHandle as usize);
    sorted.dedup_by(|a, b| a.same(b));
    let mut out = Vec::with_capacity(sorted.len());
    for h in sorted {
        out.push((h, h.lock()?));
    }
    Ok(out)
}

/// Runs `f` with the image locked and the bitmap looked up, up to date with the hook's writes
/// and its data loaded: the one way the C ABI reads bits. Fails with ENOENT when the bitmap is
/// gone, and with the read error (EIO, naming the bitmap and the offset) when its data cannot
/// be read.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_bitmap<R>(
    bm: *const qdirty_bitmap,
    f: impl FnOnce(&DirtyBitmap, &BitmapHandle) -> Result<R, FfiError>,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    if state.image.bitmap(h.id).is_none() {
        return Err(h.gone());
    }
    let b = state.image.bitmap_current(h.id)?;
    f(b, h)
}

/// Runs `f` with the image locked and the bitmap up to date with the hook's writes, without
/// loading data still on disk: for the getters without an error channel, whose readers answer
/// "every granule dirty" when the data cannot be read (see `DirtyBitmap`). Fails with ENOENT
/// when the bitmap is gone.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_bitmap_unloaded<R>(
    bm: *const qdirty_bitmap,
    f: impl FnOnce(&DirtyBitmap) -> R,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    let b = state
        .image
        .bitmap_current_unloaded(h.id)
        .ok_or_else(|| h.gone())?;
    Ok(f(b))
}

/// Runs `f` with the image locked and the bitmap looked up for changes.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_bitmap_mut<R>(
    bm: *mut qdirty_bitmap,
    f: impl FnOnce(&mut DirtyBitmap) -> Result<R, crate::Error>,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    let b = state.image.bitmap_mut(h.id).ok_or_else(|| h.gone())?;
    Ok(f(b)?)
}
