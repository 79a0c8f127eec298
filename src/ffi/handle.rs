//! What the opaque `qdirty_image` / `qdirty_bitmap` pointers really are, and the only casts
//! between the two worlds.
//!
//! - `qdirty_image *` is a `Box<ImageHandle>`: the [`Image`] and the bitmap handles handed out so
//!   far, both behind one mutex, and outside it the image's lock-free write hook
//!   ([`WriteLog`]), which `qdirty_image_set_dirty` uses without locking. Taking the lock folds
//!   the log into the bitmaps first, so every locked call sees the writes that completed before
//!   it.
//! - `qdirty_bitmap *` is a `Box<BitmapHandle>` owned by its image handle: created the first
//!   time a bitmap is handed out (first/next/find/add), freed only when the image is closed. It
//!   names the bitmap by [`BitmapId`], which an image never reuses; every call locks the image
//!   and looks the bitmap up, so a call on the handle of a bitmap that is gone (removed,
//!   released, abdicated, removed by a transaction) fails with ENOENT and can never reach
//!   another bitmap: the handle's memory is not freed, so it cannot be reused for another
//!   handle while the image is open.

use std::collections::HashMap;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::error::{cstring_lossy, FfiError};
use crate::bitmap::{DirtyBitmap, WriteLog};
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
/// an error channel return NULL / false / 0 / -1) and never touches another bitmap. Finding
/// the same bitmap twice returns the same pointer.
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

const IMAGE_MAGIC: u64 = 0x7164_6972_7479_494d; // "qdirtyIM"
const BITMAP_MAGIC: u64 = 0x7164_6972_7479_424d; // "qdirtyBM"

/// The image crosses threads inside its mutex: it must be Send.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Image>();
};

/// What `qdirty_image *` points to.
/// `repr(C)` with the magic first: a pointer that is not one of ours is recognized by reading
/// only its first 8 bytes, whatever the size of the rest.
#[repr(C)]
pub(crate) struct ImageHandle {
    magic: u64,
    /// The image's write log, shared with its bitmap set: the hook writes here without the lock.
    log: Arc<WriteLog>,
    state: Mutex<ImageState>,
}

/// Everything behind the image lock.
pub(crate) struct ImageState {
    pub(crate) image: Image,
    handles: BitmapHandles,
}

/// Bitmap handles by id. Raw pointers (from `Box::into_raw`) so that moving the map never
/// invalidates the pointers C holds.
#[derive(Default)]
struct BitmapHandles(HashMap<BitmapId, NonNull<BitmapHandle>>);

impl Drop for BitmapHandles {
    fn drop(&mut self) {
        for (_, p) in self.0.drain() {
            free_bitmap_handle(p);
        }
    }
}

fn free_bitmap_handle(p: NonNull<BitmapHandle>) {
    // SAFETY: every pointer in the map came from Box::into_raw and is removed from the map
    // before it is freed, so it is freed exactly once.
    let mut b = unsafe { Box::from_raw(p.as_ptr()) };
    // Best effort against use after free: a stale pointer no longer carries the magic.
    // SAFETY: writing a field of a live box.
    unsafe { std::ptr::write_volatile(&mut b.magic, 0) };
}

/// What `qdirty_bitmap *` points to.
/// `repr(C)` with the magic first: a pointer that is not one of ours is recognized by reading
/// only its first 8 bytes, whatever the size of the rest.
#[repr(C)]
pub(crate) struct BitmapHandle {
    magic: u64,
    image: *const ImageHandle,
    pub(crate) id: BitmapId,
    /// The name, truncated at its first NUL byte; unset while the bitmap is anonymous (a
    /// successor gets its parent's name when the parent abdicates).
    pub(crate) name: OnceLock<CString>,
}

impl ImageHandle {
    /// A new handle, as the pointer C gets.
    pub(crate) fn into_raw(image: Image) -> *mut super::qdirty_image {
        let h = Box::new(ImageHandle {
            magic: IMAGE_MAGIC,
            log: image.write_hook(),
            state: Mutex::new(ImageState {
                image,
                handles: BitmapHandles::default(),
            }),
        });
        Box::into_raw(h).cast()
    }

    /// Borrows the handle behind a C pointer.
    ///
    /// # Safety
    /// `img` is NULL or a pointer from `qdirty_image_open` not yet closed.
    pub(crate) unsafe fn from_ptr<'a>(
        img: *const super::qdirty_image,
        what: &str,
    ) -> Result<&'a ImageHandle, FfiError> {
        // SAFETY: caller's contract.
        let h = unsafe { img.cast::<ImageHandle>().as_ref() }
            .ok_or_else(|| FfiError::null_arg(what))?;
        if h.magic != IMAGE_MAGIC {
            return Err(FfiError::invalid(format!(
                "{what} is not an open qdirty_image"
            )));
        }
        Ok(h)
    }

    /// The write log behind a C pointer, for the guest write hook: None for NULL or a pointer
    /// that is not an open image. Builds no error (the hook has none to report), so it inlines
    /// into the hook without taking registers from the log's dependent loads.
    ///
    /// # Safety
    /// As [`ImageHandle::from_ptr`].
    #[inline(always)]
    pub(crate) unsafe fn log_of<'a>(img: *const super::qdirty_image) -> Option<&'a WriteLog> {
        // SAFETY: caller's contract.
        let h = unsafe { img.cast::<ImageHandle>().as_ref() }?;
        (h.magic == IMAGE_MAGIC).then(|| &*h.log)
    }

    /// Takes the handle back from C for closing.
    ///
    /// # Safety
    /// `img` is a pointer accepted by [`ImageHandle::from_ptr`]; C gives up ownership.
    pub(crate) unsafe fn take(img: *mut super::qdirty_image) -> Box<ImageHandle> {
        // SAFETY: caller's contract; the pointer came from Box::into_raw.
        let mut b = unsafe { Box::from_raw(img.cast::<ImageHandle>()) };
        // SAFETY: writing a field of a live box.
        unsafe { std::ptr::write_volatile(&mut b.magic, 0) };
        b
    }

    /// Locks the image and absorbs the write log (two loads when none is pending; else one set
    /// per pending write, whatever the number of bitmaps), so that the call sees every write
    /// that completed before it: each bitmap takes the absorbed writes when the call reads or
    /// changes it ([`with_bitmap`], the image's `&mut` methods), or all of them at a
    /// [`Image::fold_writes`](crate::Image::fold_writes) (query, store).
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, ImageState>, FfiError> {
        let mut state = self.state.lock().map_err(|_| FfiError::poisoned())?;
        state.image.absorb_writes();
        Ok(state)
    }

    /// The state, for closing, and whether an earlier panic poisoned the lock.
    pub(crate) fn into_state(self) -> (ImageState, bool) {
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

impl ImageState {
    /// The image, for closing (bitmap handles are freed when `self` drops).
    pub(crate) fn into_image(self) -> Image {
        let ImageState { image, handles } = self;
        drop(handles);
        image
    }

    /// The C pointer of the bitmap `id`, creating its handle on first use. NULL if the bitmap
    /// does not exist.
    pub(crate) fn handle_for(
        &mut self,
        owner: &ImageHandle,
        id: BitmapId,
    ) -> *mut super::qdirty_bitmap {
        if let Some(p) = self.handles.0.get(&id) {
            return p.as_ptr().cast();
        }
        let Some(bm) = self.image.bitmap(id) else {
            return std::ptr::null_mut();
        };
        let name = OnceLock::new();
        if let Some(n) = bm.name() {
            let _ = name.set(c_name(n));
        }
        let h = Box::new(BitmapHandle {
            magic: BITMAP_MAGIC,
            image: owner,
            id,
            name,
        });
        let p = NonNull::from(Box::leak(h));
        self.handles.0.insert(id, p);
        p.as_ptr().cast()
    }

    /// Gives the handle of `id` (if one was handed out) the bitmap's name when it has none yet
    /// (a successor that took its parent's name by abdication).
    pub(crate) fn refresh_name(&mut self, id: BitmapId) {
        let Some(p) = self.handles.0.get(&id) else {
            return;
        };
        // SAFETY: handles in the map are live (freed only after leaving the map).
        let h = unsafe { p.as_ref() };
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
        bm: *const super::qdirty_bitmap,
    ) -> Result<&'a BitmapHandle, FfiError> {
        // SAFETY: caller's contract.
        let h = unsafe { bm.cast::<BitmapHandle>().as_ref() }
            .ok_or_else(|| FfiError::null_arg("bitmap"))?;
        if h.magic != BITMAP_MAGIC {
            return Err(FfiError::invalid(
                "bitmap is not a valid qdirty_bitmap (removed, or its image closed?)",
            ));
        }
        Ok(h)
    }

    /// The image this bitmap belongs to.
    pub(crate) fn image(&self) -> Result<&ImageHandle, FfiError> {
        // SAFETY: the image owns this handle and frees it before itself, so while the handle is
        // valid (caller's contract) the image is too.
        unsafe { ImageHandle::from_ptr(self.image.cast(), "the bitmap's image") }
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
/// gets the locked state, the image handle and the bitmap's id.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_state<R>(
    bm: *const super::qdirty_bitmap,
    f: impl FnOnce(&mut ImageState, &ImageHandle, BitmapId) -> Result<R, FfiError>,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let (id, image) = (h.id, h.image()?);
    let mut state = image.lock()?;
    if state.image.bitmap(id).is_none() {
        return Err(h.gone());
    }
    f(&mut state, image, id)
}

/// Locks the given images, each once, in address order (so that calls locking several images
/// cannot deadlock each other). The guards come back in address order.
pub(crate) fn lock_all<'a>(
    images: &[&'a ImageHandle],
) -> Result<Vec<(&'a ImageHandle, MutexGuard<'a, ImageState>)>, FfiError> {
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
    bm: *const super::qdirty_bitmap,
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
    bm: *const super::qdirty_bitmap,
    f: impl FnOnce(&DirtyBitmap) -> R,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    let b = state.image.bitmap_mut(h.id).ok_or_else(|| h.gone())?;
    Ok(f(b))
}

/// Runs `f` with the image locked and the bitmap looked up for changes.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
pub(crate) unsafe fn with_bitmap_mut<R>(
    bm: *mut super::qdirty_bitmap,
    f: impl FnOnce(&mut DirtyBitmap) -> Result<R, crate::Error>,
) -> Result<R, FfiError> {
    // SAFETY: caller's contract.
    let h = unsafe { BitmapHandle::from_ptr(bm) }?;
    let mut state = h.image()?.lock()?;
    let b = state.image.bitmap_mut(h.id).ok_or_else(|| h.gone())?;
    Ok(f(b)?)
}
