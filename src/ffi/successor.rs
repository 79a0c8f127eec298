//! Creating and releasing bitmaps at QEMU's low level (anonymous bitmaps included), and the
//! successor protocol of backup-style jobs: create_successor, abdicate, reclaim,
//! enable_successor.

use std::os::raw::{c_char, c_int};

use super::boundary::ffi_call;
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_bitmap, qdirty_image, with_state, ImageHandle, LockedImage};
use super::image::arg_bytes;
use crate::image::BitmapId;

super::symbol_versions::symbol_versions!("successor");

/// The handle of `id`, which must exist.
fn handle_of(
    state: &mut LockedImage,
    owner: *const qdirty_image,
    id: BitmapId,
) -> Result<*mut qdirty_bitmap, FfiError> {
    let p = state.handle_for(owner, id);
    if p.is_null() {
        return Err(FfiError::new(
            libc::EIO,
            "internal error: the bitmap cannot be found",
        ));
    }
    Ok(p)
}

/// Creates an enabled, empty, transient bitmap covering the image (QEMU's
/// `bdrv_create_dirty_bitmap`), at the head of the list. Unlike `qdirty_image_add_bitmap`
/// (QMP's add) it does not look at the names stored in the image and never makes the bitmap
/// persistent, and `name` may be NULL for an anonymous bitmap: anonymous bitmaps are listed
/// and queried (with a NULL name), record writes, and are never stored or found by name.
///
/// `name`: NULL, or 1..1023 bytes not used by another bitmap of the image.
/// `granularity`: a power of two from 512 B to 2 GiB; 0 means
/// `qdirty_image_default_granularity(img)`.
///
/// Returns: the new bitmap, or NULL on failure: NULL `img`, a bad name or granularity (EINVAL),
/// "Bitmap already exists: NAME" (EEXIST), a bitmap too big for the image (EFBIG).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the bitmap is borrowed from the image (see `qdirty_bitmap`); it lives until
/// `qdirty_bitmap_release`, `qdirty_image_remove_bitmap` (named ones) or closing the image.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `name` is NULL or a NUL-terminated string. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_create_bitmap(
    img: *mut qdirty_image,
    name: *const c_char,
    granularity: u32,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_bitmap {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let name = if name.is_null() {
            None
        } else {
            // SAFETY: as above.
            Some(unsafe { arg_bytes(name, "name") }?)
        };
        let mut state = h.lock()?;
        let g = match granularity {
            0 => state.image.default_granularity(),
            g => u64::from(g),
        };
        let id = state.image.bitmaps_mut().create(name, g)?;
        handle_of(&mut state, img, id)
    })
}

/// Drops a bitmap from memory (QEMU's `bdrv_release_dirty_bitmap`). A stored copy stays in the
/// image untouched (still marked in_use while the image is open read-write, so it loads as
/// inconsistent next time unless removed): use `qdirty_image_remove_bitmap` to delete a
/// persistent bitmap for good. Refused while the bitmap is busy, has a successor or has live
/// iterators (QEMU asserts; qdirty fails).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -EBUSY (busy, frozen with a successor,
/// live iterators, a successor itself), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: `bm` stays valid until the image is closed; after a release, calls on it fail
/// with -ENOENT.
/// Thread safety: may be called from any thread; serialized per image. No other thread may use
/// `bm` during or after the call.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_release(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_state(bm, |state, _, id| Ok(state.image.release_bitmap(id)?)) }
    })
}

/// Freezes the bitmap for an operation such as a backup (QEMU's
/// `bdrv_dirty_bitmap_create_successor`): a new anonymous successor with the same granularity,
/// covering the image's current size, starts with the bitmap's enabled state and from now on
/// records guest writes in its place; the bitmap becomes disabled and busy, its bits frozen for
/// the operation. End it with `qdirty_bitmap_abdicate` (the operation succeeded) or
/// `qdirty_bitmap_reclaim` (it failed).
///
/// Only BUSY is checked, as in QEMU: callers check readonly and inconsistent first if they care
/// (`qdirty_bitmap_check` with QDIRTY_CHECK_DEFAULT).
///
/// Returns: the successor, or NULL on failure: NULL `bm` (EINVAL), a busy bitmap (EBUSY, with
/// QEMU's message), "Cannot create a successor for a bitmap that already has one" (EINVAL),
/// ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the successor is borrowed from the image like any bitmap.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_create_successor(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_bitmap {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_state(bm, |state, owner, id| {
                let child = state.image.bitmaps_mut().create_successor(id)?;
                handle_of(state, owner, child)
            })
        }
    })
}

/// The operation succeeded (QEMU's `bdrv_dirty_bitmap_abdicate`): the successor takes the
/// bitmap's name and persistent flag and keeps its own enabled state; the bitmap and its bits
/// are dropped. The successor now holds only the writes made since `create_successor`.
///
/// Returns: the successor (the same pointer `qdirty_bitmap_create_successor` returned, now
/// named), or NULL on failure: NULL `bm` (EINVAL), "Cannot relinquish control if there's no
/// successor present" (EINVAL), live iterators on the bitmap (EBUSY), ENOENT (the bitmap no
/// longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: on success `bm` is freed: do not use it afterwards. The successor is borrowed from
/// the image like any bitmap.
/// Thread safety: may be called from any thread; serialized per image. No other thread may use
/// `bm` during or after the call.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_abdicate(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_bitmap {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_state(bm, |state, owner, id| {
                let child = state.image.bitmaps_mut().abdicate(id)?;
                state.refresh_name(child);
                handle_of(state, owner, child)
            })
        }
    })
}

/// The operation failed (QEMU's `bdrv_reclaim_dirty_bitmap`): the bitmap takes back the
/// successor's bits (bitmap |= successor) and its enabled state, stops being busy, and the
/// successor is dropped. The bitmap then holds its old bits plus every write made meanwhile.
///
/// Returns: `bm` (the parent), or NULL on failure: NULL `bm` (EINVAL), "Cannot reclaim a
/// successor when none is present" (EINVAL), live iterators on the successor (EBUSY), EIO (the
/// bitmap's data could not be read), ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: on success the successor's handle stays valid until the image is closed; calls on it
/// fail with -ENOENT.
/// Thread safety: may be called from any thread; serialized per image. No other thread may use
/// the successor during or after the call.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_reclaim(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_bitmap {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_state(bm, |state, owner, id| {
                let parent = state.image.bitmaps_mut().reclaim(id)?;
                handle_of(state, owner, parent)
            })
        }
    })
}

/// Enables the successor of a frozen bitmap (QEMU's `bdrv_dirty_bitmap_enable_successor`, used
/// by migration when the guest starts before a bitmap has arrived); the bitmap itself stays
/// disabled.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, "The bitmap has no successor to
/// enable": QEMU would dereference NULL), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_enable_successor(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_state(bm, |state, _, id| {
                Ok(state.image.bitmaps_mut().enable_successor(id)?)
            })
        }
    })
}
