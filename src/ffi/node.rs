//! Image-level operations of the mirror: standalone (in-memory) images, reopen, truncate,
//! default granularity, readonly bitmaps, removal of a stored copy.

use std::os::raw::{c_char, c_int};

use super::boundary::{ffi_call, or_default};
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_image, ImageHandle};
use super::image::{arg_bytes, check_flags};
use super::QDIRTY_OPEN_RDWR;
use crate::image::Image;

super::symbol_versions::symbol_versions!("node");

/// Creates a standalone image: bitmaps over `size` bytes with no qcow2 file behind them (for raw
/// disks, guest RAM, tests). Every in-memory operation works as on a qcow2 image (add, create,
/// successors, merge, iterators, serialization, transactions, truncate to any size);
/// persistent bitmaps are refused, and closing stores nothing. Its default granularity is
/// 64 KiB.
///
/// Returns: the image, or NULL on failure: `size` beyond INT64_MAX (EINVAL).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the image and must pass it to `qdirty_image_close`.
/// Thread safety: may be called from any thread; the image is used like any other.
///
/// # Safety
/// `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call returns NULL
/// and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_new_memory(
    size: u64,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_image {
    ffi_call!(errp = errp, {
        if i64::try_from(size).is_err() {
            return Err(FfiError::invalid(format!(
                "size {size} is too large (the maximum is {})",
                i64::MAX
            )));
        }
        Ok(ImageHandle::into_raw(Image::new_memory(size)))
    })
}

/// Resizes every bitmap of the image to `new_size` bytes (QEMU's `bdrv_dirty_bitmap_truncate`):
/// new space is clean, granules entirely beyond the new end are dropped. For a qcow2 image the
/// host resizes the image file first (qdirty does not); `new_size` must then be the size its
/// header says. Refused (nothing changes) while any bitmap is busy, frozen or iterated, when a
/// persistent bitmap is readonly or inconsistent, or when stored bitmaps are not loaded
/// ("Cannot resize qcow2 with persistent bitmaps that were not loaded into memory").
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `img`; a bitmap busy, frozen or iterated;
/// stored bitmaps not loaded; a size other than the image's; an inconsistent persistent
/// bitmap), -EBUSY (a busy persistent bitmap of a qcow2 image: QEMU's check runs first there),
/// -EPERM (a readonly persistent bitmap of a qcow2 image), -EFBIG (too many granules),
/// -ENOTSUP (an image in durable mode: its zones are cut for the size at open; close, resize
/// and open again), -EIO and other I/O errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_truncate(
    img: *mut qdirty_image,
    new_size: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        Ok(h.lock()?.image.truncate(new_size)?)
    })
}

/// Switches a qcow2 image between read-write and read-only (QEMU's qcow2_reopen_bitmaps_ro /
/// _rw). `flags` QDIRTY_OPEN_RDWR: the file is reopened for writing, the persistent bitmaps
/// become writable and are marked in_use on disk. `flags` 0: the persistent bitmaps are stored
/// (consistent: in_use cleared) and become readonly, and nothing is written afterwards; the
/// host stops guest writes first, as for a close. Reopening in the current mode, or reopening a
/// standalone image, does nothing.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `img`, unknown flag bits, a stored bitmap
/// released from memory: "Unexpected bitmap 'NAME'"), -EROFS (a qcow2 v2 image cannot be
/// read-write), -EACCES (the file cannot be written, or the image needs repair), -EIO and other
/// I/O and store errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); a refused switch
/// to read-write leaves the image read-only.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_reopen(
    img: *mut qdirty_image,
    flags: u32,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        check_flags(flags, QDIRTY_OPEN_RDWR, "qdirty_image_reopen")?;
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        Ok(h.lock()?.image.reopen(flags & QDIRTY_OPEN_RDWR != 0)?)
    })
}

/// QEMU's default granularity (`bdrv_get_default_bitmap_granularity`): the cluster size clamped
/// to [4 KiB, 64 KiB]; 64 KiB for standalone images. Granularity 0 in `qdirty_image_add_bitmap`
/// and `qdirty_image_create_bitmap` means this value.
///
/// Returns: the granularity in bytes; 0 if `img` is NULL or unusable.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_default_granularity(img: *const qdirty_image) -> u32 {
    ffi_call!({
        let g = || -> Result<u32, FfiError> {
            // SAFETY: see the function's Safety section.
            let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
            Ok(u32::try_from(h.lock()?.image.default_granularity()).unwrap_or(0))
        };
        or_default(g(), 0)
    })
}

/// Whether any bitmap of the image is readonly (QEMU's `bdrv_has_readonly_bitmaps`). While it
/// is true, the host must refuse guest writes, write-zeroes and discards with EPERM, as QEMU
/// does, so that image and bitmaps stay consistent.
///
/// Returns: true or false; false if `img` is NULL or unusable.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_has_readonly_bitmaps(img: *const qdirty_image) -> bool {
    ffi_call!({
        let ro = || -> Result<bool, FfiError> {
            // SAFETY: see the function's Safety section.
            let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
            Ok(h.lock()?.image.bitmaps().has_readonly())
        };
        or_default(ro(), false)
    })
}

/// Deletes the stored copy of bitmap `name` from the image file, leaving the in-memory bitmap
/// alone (QEMU's `bdrv_remove_persistent_dirty_bitmap`). A name that is not stored is not an
/// error, nor is a standalone image. A bitmap still persistent in memory is stored again on the
/// next store or close: clear its persistence first (`qdirty_bitmap_set_persistence`) to get
/// rid of it.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument), -EROFS (read-only image), -EIO and
/// other I/O errors (the data of the in-memory bitmap of that name is read first).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `name` is NULL or a NUL-terminated string. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_remove_stored_bitmap(
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        // SAFETY: as above.
        let name = unsafe { arg_bytes(name, "name") }?;
        Ok(h.lock()?.image.remove_stored_bitmap(name)?)
    })
}
