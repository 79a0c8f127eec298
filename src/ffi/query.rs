//! `qdirty_image_query_bitmaps`: a snapshot of every bitmap of an image as plain structs.

use std::ffi::CString;
use std::os::raw::{c_char, c_int};

use super::boundary::ffi_call;
use super::error::{cstring_lossy, qdirty_error, FfiError};
use super::handle::{qdirty_image, ImageHandle};

super::symbol_versions::symbol_versions!("query");

/// One bitmap in the snapshot of `qdirty_image_query_bitmaps` (QEMU's BlockDirtyInfo).
///
/// Ownership: the array and the names belong to it; free them with one
/// `qdirty_bitmap_info_free` call.
/// Thread safety: plain data, a snapshot: it does not change when the bitmaps do.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct qdirty_bitmap_info {
    /// The name (truncated at its first NUL byte); NULL for anonymous bitmaps (successors,
    /// `qdirty_image_create_bitmap` with NULL).
    pub name: *const c_char,
    /// Dirty granules times the granularity, in bytes (can exceed the size by less than a
    /// granule).
    pub count: u64,
    /// The granularity in bytes.
    pub granularity: u32,
    /// Enabled, or frozen with an enabled successor (`qdirty_bitmap_recording`).
    pub recording: bool,
    /// Held by an operation (`qdirty_bitmap_busy`).
    pub busy: bool,
    /// The raw persistent flag (skip_store not taken into account).
    pub persistent: bool,
    /// Found in_use on open (`qdirty_bitmap_inconsistent`).
    pub inconsistent: bool,
}

/// A snapshot of every bitmap of the image, in list order (newest first), anonymous bitmaps and
/// successors included (QEMU's `bdrv_query_dirty_bitmaps`).
///
/// `*out` and `*count` are reset to NULL and 0 on entry (when not NULL) and receive the array
/// and its length on success; an image without bitmaps gives NULL and 0.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `img`, `out` or `count`), -EIO (the data of a
/// bitmap still on disk could not be read: the message names it; or an unusable image).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the array; free it with `qdirty_bitmap_info_free(*out, *count)`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `out` and `count` are NULL or writable. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_query_bitmaps(
    img: *mut qdirty_image,
    out: *mut *mut qdirty_bitmap_info,
    count: *mut usize,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: each pointer is NULL or writable (see the function's Safety section).
        unsafe {
            if !out.is_null() {
                *out = std::ptr::null_mut();
            }
            if !count.is_null() {
                *count = 0;
            }
        }
        if out.is_null() {
            return Err(FfiError::null_arg("out"));
        }
        if count.is_null() {
            return Err(FfiError::null_arg("count"));
        }
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let infos = {
            let mut g = h.lock()?;
            g.image.query()?
        };
        if infos.is_empty() {
            return Ok(());
        }
        let arr: Box<[qdirty_bitmap_info]> = infos
            .into_iter()
            .map(|i| qdirty_bitmap_info {
                name: i.name.map_or(std::ptr::null(), |n| {
                    let n = n.split(|&b| b == 0).next().unwrap_or_default();
                    cstring_lossy(n).into_raw().cast_const()
                }),
                count: i.count,
                granularity: u32::try_from(i.granularity).unwrap_or(0),
                recording: i.recording,
                busy: i.busy,
                persistent: i.persistent,
                inconsistent: i.inconsistent,
            })
            .collect();
        let n = arr.len();
        // SAFETY: both pointers are non-NULL and writable (checked above).
        unsafe {
            *out = Box::into_raw(arr).cast::<qdirty_bitmap_info>();
            *count = n;
        }
        Ok(())
    })
}

/// Frees an array from `qdirty_image_query_bitmaps` and its names. NULL is a no-op.
///
/// `count` must be the length the query returned with `arr`.
/// Ownership: takes `arr`; it and its names are invalid afterwards.
/// Thread safety: may be called from any thread, once per array.
///
/// # Safety
/// `arr` is NULL or an array from `qdirty_image_query_bitmaps` not yet freed, and `count` its
/// length.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_info_free(arr: *mut qdirty_bitmap_info, count: usize) {
    ffi_call!({
        if arr.is_null() {
            return;
        }
        // SAFETY: the array came from Box::<[qdirty_bitmap_info]>::into_raw with this length
        // (caller's contract) and is freed once.
        let arr = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(arr, count)) };
        for i in arr.iter() {
            if !i.name.is_null() {
                // SAFETY: every non-NULL name came from CString::into_raw.
                drop(unsafe { CString::from_raw(i.name.cast_mut()) });
            }
        }
    })
}
