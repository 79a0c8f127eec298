//! Iterators over dirty granules (QEMU's `BdrvDirtyBitmapIter`) and `status`.

use std::os::raw::c_int;

use super::boundary::ffi_call;
use super::castable::{self, Castable, OwnedByCaller};
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_bitmap, qdirty_image, with_bitmap, with_state, ImageHandle};
use crate::bitmap::DirtyIter;

super::symbol_versions::symbol_versions!("iter");

/// An iterator over the dirty granules of one bitmap (QEMU's `BdrvDirtyBitmapIter`). While it
/// lives, its bitmap cannot be released and the image's bitmaps cannot be truncated.
///
/// Ownership: owned by the caller from `qdirty_bitmap_iter_new` until `qdirty_iter_free`. It
/// refers to its image: free it before closing the image (using or freeing an iterator after
/// its image was closed is undefined behaviour).
/// Thread safety: an iterator is not a thread-safe object: use it from one thread at a time.
/// Each call locks its image, so it may run alongside any other call on the image (guest
/// writes included): bits set behind the iterator are not seen, bits reset ahead of it are.
/// Methods: qdirty_iter_next, qdirty_iter_seek, qdirty_iter_free
#[allow(non_camel_case_types)]
pub struct qdirty_iter {
    _private: [u8; 0],
}

impl Castable for qdirty_iter {
    type RustType = IterObj;
    type Ownership = OwnedByCaller;
    const MAGIC: u64 = 0x7164_6972_7479_4954; // "qdirtyIT"
    const NOT_LIVE: &'static str = "is not a valid qdirty_iter";
}

/// What `qdirty_iter *` points to.
pub(crate) struct IterObj {
    image: *const qdirty_image,
    it: Option<DirtyIter>,
}

/// Borrows the iterator behind a C pointer.
///
/// # Safety
/// `p` is NULL or a live iterator whose image is open.
unsafe fn iter_mut<'a>(
    p: *mut qdirty_iter,
) -> Result<(&'a mut IterObj, &'a ImageHandle), FfiError> {
    // SAFETY: caller's contract.
    let o = unsafe { castable::try_mut(p, "iter") }?;
    // SAFETY: the image outlives its iterators (caller's contract).
    let img = unsafe { iter_image(o) }?;
    Ok((o, img))
}

/// The image of an iterator.
///
/// # Safety
/// The iterator's image is open (it outlives its iterators: caller's contract).
unsafe fn iter_image<'a>(o: &IterObj) -> Result<&'a ImageHandle, FfiError> {
    // SAFETY: caller's contract.
    unsafe { ImageHandle::from_ptr(o.image, "the iterator's image") }
}

/// A new iterator over the bitmap's dirty granules, positioned at offset 0 (QEMU's
/// `bdrv_dirty_iter_new`).
///
/// Returns: the iterator, or NULL on failure: NULL `bm` or inconsistent bitmap (EINVAL, with
/// QEMU's message and hint), EIO (the bitmap's data could not be read; it is loaded here, so
/// the iterator's steps cannot fail), ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the iterator and must free it with `qdirty_iter_free` before
/// closing the image.
/// Thread safety: may be called from any thread; serialized per image. See `qdirty_iter`.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_iter_new(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_iter {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_state(bm, |state, owner, id| {
                let it = state.image.bitmaps_mut().iter_new(id)?;
                Ok(castable::to_raw::<qdirty_iter>(IterObj {
                    image: owner,
                    it: Some(it),
                }))
            })
        }
    })
}

/// The start of the next dirty granule (a multiple of the granularity), and moves past it
/// (QEMU's `bdrv_dirty_iter_next`).
///
/// Returns: the offset; -1 when no dirty granule is left; -ENOENT (-2) when the iterated
/// bitmap no longer exists (a transaction that added it was aborted): the iteration did not
/// finish, so do not take it as "no more dirty granules"; -EINVAL for a NULL `iter`; -EIO when
/// its image is unusable.
/// Thread safety: see `qdirty_iter`.
///
/// # Safety
/// `iter` is NULL or an iterator not yet freed whose image is open.
#[no_mangle]
pub unsafe extern "C" fn qdirty_iter_next(iter: *mut qdirty_iter) -> i64 {
    ffi_call!({
        let next = || -> Result<i64, FfiError> {
            // SAFETY: see the function's Safety section.
            let (o, img) = unsafe { iter_mut(iter) }?;
            let mut state = img.lock()?;
            let Some(it) = o.it.as_mut() else {
                return Ok(-1);
            };
            match state.image.bitmaps_mut().iter_next(it) {
                Ok(next) => Ok(next.and_then(|v| i64::try_from(v).ok()).unwrap_or(-1)),
                // Looked up only on failure, so that a step costs one lookup of the bitmap.
                Err(_) if state.image.bitmap(it.bitmap()).is_none() => Err(FfiError::new(
                    libc::ENOENT,
                    "The iterated bitmap no longer exists",
                )),
                Err(e) => Err(e.into()),
            }
        };
        next().unwrap_or_else(|e| -i64::from(e.errno))
    })
}

/// Moves the iterator: the next `qdirty_iter_next` returns the first dirty granule at or after
/// the granule containing `offset` (QEMU's `bdrv_set_dirty_iter`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `iter`, `offset` at or beyond the bitmap's
/// size: QEMU asserts), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); the iterator did
/// not move.
/// Thread safety: see `qdirty_iter`.
///
/// # Safety
/// `iter` is NULL or an iterator not yet freed whose image is open. `errp` is NULL or points to
/// a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_iter_seek(
    iter: *mut qdirty_iter,
    offset: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let (o, img) = unsafe { iter_mut(iter) }?;
        let state = img.lock()?;
        let it =
            o.it.as_mut()
                .ok_or_else(|| FfiError::invalid("the iterator is finished"))?;
        if state.image.bitmap(it.bitmap()).is_none() {
            return Err(FfiError::new(
                libc::ENOENT,
                "The iterated bitmap no longer exists in its image",
            ));
        }
        Ok(state.image.bitmaps().iter_seek(it, offset)?)
    })
}

/// Frees an iterator (QEMU's `bdrv_dirty_iter_free`); its bitmap may be released and truncated
/// again once no iterator is left. NULL is a no-op.
///
/// Ownership: takes `iter`; it is invalid afterwards.
/// Thread safety: see `qdirty_iter`; no other thread may use `iter` during or after the call.
///
/// # Safety
/// `iter` is NULL or an iterator not yet freed whose image is open.
#[no_mangle]
pub unsafe extern "C" fn qdirty_iter_free(iter: *mut qdirty_iter) {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let Ok(mut o) = (unsafe { castable::take(iter, "iter") }) else {
            return;
        };
        // SAFETY: as above (its image is open).
        let img = unsafe { iter_image(&o) };
        if let (Some(it), Ok(mut state)) = (o.it.take(), img.and_then(|i| i.lock())) {
            state.image.bitmaps_mut().iter_free(it);
        }
    })
}

/// Whether `offset` is dirty, and how long the run with that state is (QEMU's
/// `bdrv_dirty_bitmap_status`, with the 2022 fix: 1 means dirty).
///
/// `*count` is set to 0 on entry (when not NULL) and receives the length in bytes of the run
/// starting at `offset` whose granules are all dirty (result 1) or all clean (result 0), capped
/// at `bytes`.
///
/// Returns: 1 (dirty), 0 (clean), or a negative errno: -EINVAL (NULL `bm` or `count`, `bytes`
/// 0, `[offset, offset + bytes)` beyond the bitmap's size: QEMU asserts; inconsistent bitmap:
/// QEMU's message and hint), -EIO (the bitmap's data could not be read), -ENOENT (the bitmap
/// no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `count` is NULL or writable. `errp`
/// is NULL or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and
/// does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_status(
    bm: *const qdirty_bitmap,
    offset: u64,
    bytes: u64,
    count: *mut u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(
        errp = errp,
        value = {
            if count.is_null() {
                return Err(FfiError::null_arg("count"));
            }
            // SAFETY: non-NULL and writable (see the function's Safety section).
            unsafe { *count = 0 };
            // SAFETY: see the function's Safety section.
            let (dirty, n) = unsafe { with_bitmap(bm, |b, _| Ok(b.status(offset, bytes)?)) }?;
            // SAFETY: as above.
            unsafe { *count = n };
            Ok(c_int::from(dirty))
        }
    )
}
