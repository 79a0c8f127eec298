//! Salvage: listing and removing broken bitmaps of an image opened with
//! QDIRTY_OPEN_SALVAGE, and dropping the whole bitmaps extension of an image whose directory is
//! broken as a whole.

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::boundary::ffi_call;
use super::error::{cstring_lossy, qdirty_error, FfiError};
use super::handle::{qdirty_image, ImageHandle};

super::symbol_versions::symbol_versions!("salvage");

/// The number of broken bitmaps of an image opened with QDIRTY_OPEN_SALVAGE: directory entries
/// or tables that QEMU refuses the whole image for. Always 0 without QDIRTY_OPEN_SALVAGE (such
/// an image fails to open instead). QEMU refuses the image until every broken bitmap is
/// removed (`qdirty_image_remove_broken_bitmap`).
///
/// Returns: the count (>= 0), or a negative errno: -EINVAL (`img` NULL), -EIO (unusable image).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_broken_bitmap_count(
    img: *mut qdirty_image,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(
        errp = errp,
        value = {
            // SAFETY: see the function's Safety section.
            let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
            let n = h.lock()?.image.broken_bitmaps().len();
            Ok::<c_int, FfiError>(c_int::try_from(n).unwrap_or(c_int::MAX))
        }
    )
}

/// Describes the broken bitmap number `i` (0 .. count-1, in directory order; see
/// `qdirty_image_broken_bitmap_count`).
///
/// `*index` receives its position in the bitmap directory (what messages use when the name is
/// empty), `*name` its name as QEMU reads it (up to the first NUL; may be empty and need not be
/// UTF-8), `*reason` the reason QEMU refuses the image for (the same message a normal open
/// fails with). Any of the three may be NULL. The strings are new: free them with
/// `qdirty_string_free`.
///
/// Returns: 0, or a negative errno: -EINVAL (`img` NULL), -ENOENT (`i` out of range), -EIO
/// (unusable image).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing is written
/// to `*index`, `*name`, `*reason`.
/// Ownership: the caller owns `*name` and `*reason`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `index`, `name` and `reason` are NULL or writable. `errp` is
/// NULL or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and
/// does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_broken_bitmap(
    img: *mut qdirty_image,
    i: u32,
    index: *mut u32,
    name: *mut *mut c_char,
    reason: *mut *mut c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let list = h.lock()?.image.broken_bitmaps();
        let Some(b) = list.get(i as usize) else {
            return Err(FfiError::new(
                libc::ENOENT,
                format!("No broken bitmap number {i} (there are {})", list.len()),
            ));
        };
        if !index.is_null() {
            // SAFETY: non-NULL pointers are writable (see the function's Safety section).
            unsafe { *index = u32::try_from(b.index).unwrap_or(u32::MAX) };
        }
        if !name.is_null() {
            // SAFETY: as above; the caller frees the string with qdirty_string_free.
            unsafe { *name = cstring_lossy(&b.name).into_raw() };
        }
        if !reason.is_null() {
            // SAFETY: as above.
            unsafe { *reason = cstring_lossy(b.reason.as_bytes()).into_raw() };
        }
        Ok(())
    })
}

/// Removes the broken bitmap number `i` (as listed by `qdirty_image_broken_bitmap`; the later
/// ones move down by one) from an image opened with QDIRTY_OPEN_SALVAGE | QDIRTY_OPEN_RDWR. The
/// bitmap directory is rewritten without it; the clusters its entry and table name are never
/// freed (they are leaked: `qemu-img check -r leaks` reclaims them). Once no broken bitmap is
/// left, QEMU opens the image again.
///
/// Returns: 0, or a negative errno: -EINVAL (`img` NULL), -ENOENT (`i` out of range), -EROFS
/// (read-only image), I/O errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_remove_broken_bitmap(
    img: *mut qdirty_image,
    i: u32,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let mut state = h.lock()?;
        let list = state.image.broken_bitmaps();
        let Some(b) = list.get(i as usize) else {
            return Err(FfiError::new(
                libc::ENOENT,
                format!("No broken bitmap number {i} (there are {})", list.len()),
            ));
        };
        state.image.remove_broken_bitmap(b.index)?;
        Ok(())
    })
}

/// Drops the whole bitmaps extension of the image file at `path`, for an image whose bitmap
/// directory is broken as a whole (a QDIRTY_OPEN_SALVAGE open then fails, naming this
/// function): one header write removes the extension and clears autoclear bit 0 (QEMU's rule for
/// programs without bitmap support), then fdatasync. Every persistent bitmap is lost; their
/// directory, tables and data clusters are leaked (`qemu-img check -r leaks` reclaims them).
/// Guest data and other metadata are not touched. Never done implicitly by any other call.
///
/// `*dropped` (may be NULL) receives 1 when there was something to drop, 0 when the image had
/// no bitmaps extension (nothing written).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL or empty path, not a usable qcow2 file),
/// -ENOTSUP (qcow2 v2), -EAGAIN (the image is in use, e.g. by QEMU), I/O errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `dropped` is NULL or writable. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_drop_bitmaps_extension(
    path: *const c_char,
    dropped: *mut c_int,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        if path.is_null() {
            return Err(FfiError::null_arg("path"));
        }
        // SAFETY: see the function's Safety section.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        if bytes.is_empty() {
            return Err(FfiError::invalid("path must not be empty"));
        }
        let r = crate::image::drop_bitmaps_extension(Path::new(OsStr::from_bytes(bytes)))?;
        if !dropped.is_null() {
            // SAFETY: non-NULL pointers are writable (see the function's Safety section).
            unsafe { *dropped = c_int::from(r.dropped) };
        }
        Ok(())
    })
}
