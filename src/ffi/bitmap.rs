//! `qdirty_bitmap_*`: one bitmap's state, bits and iteration.

use std::ffi::CString;
use std::os::raw::{c_char, c_int};

use super::boundary::{ffi_call, or_default};
use super::error::{qdirty_error, FfiError};
use super::handle::{
    qdirty_bitmap, with_bitmap, with_bitmap_mut, with_bitmap_unloaded, BitmapHandle,
};

super::symbol_versions::symbol_versions!("bitmap");

/// Reads one property of a bitmap, up to date with the hook's writes; `default` when the
/// handle is NULL, not a bitmap, or its bitmap is gone (warned about but for NULL:
/// [`or_default`]). A bitmap that is unusable
/// (inconsistent, or its data unreadable now) answers as `DirtyBitmap`'s readers do: every
/// granule dirty.
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
unsafe fn read<R>(
    bm: *const qdirty_bitmap,
    default: R,
    f: impl FnOnce(&crate::DirtyBitmap) -> R,
) -> R {
    // SAFETY: caller's contract.
    or_default(unsafe { with_bitmap_unloaded(bm, f) }, default)
}

/// The next bitmap of the image in QEMU's list order (newest first).
///
/// Returns: the bitmap, or NULL after the last one, or if `bm` is NULL or no longer exists.
/// Ownership: borrowed from the image (see `qdirty_bitmap`).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_next(bm: *mut qdirty_bitmap) -> *mut qdirty_bitmap {
    ffi_call!({
        let next = || -> Result<*mut qdirty_bitmap, FfiError> {
            // SAFETY: see the function's Safety section.
            let h = unsafe { BitmapHandle::from_ptr(bm) }?;
            let mut state = h.image()?.lock()?;
            if state.image.bitmap(h.id).is_none() {
                return Err(h.gone());
            }
            Ok(match state.image.bitmaps().next_after(h.id) {
                Some(id) => state.handle_for(h.image_ptr(), id),
                None => std::ptr::null_mut(),
            })
        };
        or_default(next(), std::ptr::null_mut())
    })
}

/// The bitmap's name (truncated at its first NUL byte, which only a foreign image can contain).
///
/// Returns: the name, valid as long as the bitmap handle; NULL for an anonymous bitmap (see
/// `qdirty_image_create_bitmap`, `qdirty_bitmap_create_successor`), or if `bm` is NULL or the
/// bitmap no longer exists.
/// Ownership: borrowed from the bitmap; do not free it.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_name(bm: *const qdirty_bitmap) -> *const c_char {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let name = unsafe { with_bitmap(bm, |_, h| Ok(h.name.get().map(|n| n.as_ptr()))) };
        or_default(name, None).unwrap_or(std::ptr::null())
    })
}

/// The granularity in bytes (a power of two from 512 B to 2 GiB).
///
/// Returns: the granularity; 0 if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_granularity(bm: *const qdirty_bitmap) -> u32 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, 0, |b| u32::try_from(b.granularity()).unwrap_or(0)) }
    })
}

/// The number of bytes the bitmap covers (the disk size).
///
/// Returns: the size; 0 if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_size(bm: *const qdirty_bitmap) -> u64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, 0, |b| b.size()) }
    })
}

/// Whether the bitmap records guest writes (stored with the `auto` flag).
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_enabled(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, false, |b| b.enabled()) }
    })
}

/// Whether the bitmap is persistent (stored in the image on close).
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_persistent(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, false, |b| b.persistent()) }
    })
}

/// Whether the bitmap was found in_use on open (the image was not closed cleanly). An
/// inconsistent bitmap has no content; removing it is the only operation allowed.
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_inconsistent(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, false, |b| b.inconsistent()) }
    })
}

/// Whether the bitmap is read-only (its image was opened read-only): its bits cannot change.
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_readonly(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, false, |b| b.readonly()) }
    })
}

/// Enables the bitmap: it records guest writes (QMP `block-dirty-bitmap-enable`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, inconsistent bitmap), -ENOENT (the
/// bitmap no longer exists), -EBUSY.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_enable(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.enable()) }
    })
}

/// Disables the bitmap: it stops recording guest writes (QMP `block-dirty-bitmap-disable`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, inconsistent bitmap), -ENOENT (the
/// bitmap no longer exists), -EBUSY.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_disable(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.disable()) }
    })
}

/// Marks `[offset, offset + bytes)` dirty, rounded outward to the granularity (QEMU's
/// `bdrv_set_dirty_bitmap`). Works on disabled bitmaps too.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, range beyond the bitmap's size,
/// inconsistent bitmap), -EPERM (read-only bitmap), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_dirty(
    bm: *mut qdirty_bitmap,
    offset: u64,
    bytes: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.set_dirty(offset, bytes)) }
    })
}

/// Clears `[offset, offset + bytes)` (QEMU's `bdrv_reset_dirty_bitmap`). `offset` must be a
/// multiple of the granularity, and so must `bytes` unless the range ends at the end of the
/// bitmap (QEMU asserts this; qdirty fails instead).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, unaligned range, range beyond the
/// bitmap's size, inconsistent bitmap), -EPERM (read-only bitmap), -EIO (the bitmap's data
/// could not be read: the message names it), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_reset_dirty(
    bm: *mut qdirty_bitmap,
    offset: u64,
    bytes: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.reset_dirty(offset, bytes)) }
    })
}

/// Clears every bit (QMP `block-dirty-bitmap-clear`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, inconsistent bitmap), -EPERM (read-only
/// bitmap), -EBUSY, -EIO (the bitmap's data could not be read: the message names it), -ENOENT
/// (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_clear(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.clear()) }
    })
}

/// Whether the granule containing `offset` is dirty.
///
/// Returns: true or false; false beyond the end, or if `bm` is NULL or the bitmap no longer
/// exists; true inside the disk for an unusable bitmap.
/// An unusable bitmap (inconsistent, or its data unreadable now) answers as if every granule
/// were dirty, never "clean": use `qdirty_bitmap_dirty_extents` (or `qdirty_bitmap_check` with
/// QDIRTY_CHECK_INCONSISTENT first) to get an error instead.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_get(bm: *const qdirty_bitmap, offset: u64) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, false, |b| b.get(offset)) }
    })
}

/// The number of dirty bytes: dirty granules times the granularity (QEMU's
/// `bdrv_get_dirty_count`; the last granule counts in full).
///
/// Returns: the count; 0 if `bm` is NULL or the bitmap no longer exists; every granule for an
/// unusable bitmap.
/// An unusable bitmap (inconsistent, or its data unreadable now) answers as if every granule
/// were dirty, never "clean": use `qdirty_bitmap_dirty_extents` (or `qdirty_bitmap_check` with
/// QDIRTY_CHECK_INCONSISTENT first) to get an error instead.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_count(bm: *const qdirty_bitmap) -> u64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { read(bm, 0, |b| b.count()) }
    })
}

/// The first dirty offset in `[offset, offset + bytes)`, clamped to the bitmap's size (QEMU's
/// `bdrv_dirty_bitmap_next_dirty`). The result is `offset` or a multiple of the granularity.
///
/// Returns: the offset, or -1 if there is none, or if `bm` is NULL or the bitmap no longer
/// exists; `offset` (inside the disk) for an unusable bitmap.
/// An unusable bitmap (inconsistent, or its data unreadable now) answers as if every granule
/// were dirty, never "clean": use `qdirty_bitmap_dirty_extents` (or `qdirty_bitmap_check` with
/// QDIRTY_CHECK_INCONSISTENT first) to get an error instead.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_next_dirty(
    bm: *const qdirty_bitmap,
    offset: u64,
    bytes: u64,
) -> i64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let r = unsafe { read(bm, None, |b| b.next_dirty(offset, bytes)) };
        r.and_then(|v| i64::try_from(v).ok()).unwrap_or(-1)
    })
}

/// The first clean offset in `[offset, offset + bytes)`, clamped to the bitmap's size (QEMU's
/// `bdrv_dirty_bitmap_next_zero`).
///
/// Returns: the offset, or -1 if there is none, or if `bm` is NULL or the bitmap no longer
/// exists; -1 (no clean granule) for an unusable bitmap.
/// An unusable bitmap (inconsistent, or its data unreadable now) answers as if every granule
/// were dirty, never "clean": use `qdirty_bitmap_dirty_extents` (or `qdirty_bitmap_check` with
/// QDIRTY_CHECK_INCONSISTENT first) to get an error instead.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_next_zero(
    bm: *const qdirty_bitmap,
    offset: u64,
    bytes: u64,
) -> i64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let r = unsafe { read(bm, None, |b| b.next_zero(offset, bytes)) };
        r.and_then(|v| i64::try_from(v).ok()).unwrap_or(-1)
    })
}

/// Finds the next dirty run in `[start, min(end, size))`, at most `max_count` bytes long (QEMU's
/// `bdrv_dirty_bitmap_next_dirty_area`). Iterate over all dirty extents by calling it again with
/// `start = *dirty_start + *dirty_count`.
///
/// `*dirty_start` and `*dirty_count` are set to 0 on entry (when not NULL) and receive the run
/// when one is found.
///
/// Returns: true if a run was found; false if none, or `max_count` is 0, or `bm`, `dirty_start`
/// or `dirty_count` is NULL, or the bitmap no longer exists; the whole range (capped at
/// `max_count`) for an unusable bitmap.
/// An unusable bitmap (inconsistent, or its data unreadable now) answers as if every granule
/// were dirty, never "clean": use `qdirty_bitmap_dirty_extents` (or `qdirty_bitmap_check` with
/// QDIRTY_CHECK_INCONSISTENT first) to get an error instead.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `dirty_start` and `dirty_count` are
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_next_dirty_area(
    bm: *const qdirty_bitmap,
    start: u64,
    end: u64,
    max_count: u64,
    dirty_start: *mut u64,
    dirty_count: *mut u64,
) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section: each pointer is NULL or writable.
        unsafe {
            if !dirty_start.is_null() {
                *dirty_start = 0;
            }
            if !dirty_count.is_null() {
                *dirty_count = 0;
            }
        }
        if dirty_start.is_null() || dirty_count.is_null() {
            return false;
        }
        match unsafe { read(bm, None, |b| b.next_dirty_area(start, end, max_count)) } {
            Some((s, c)) => {
                // SAFETY: both pointers are non-NULL and writable (checked above).
                unsafe {
                    *dirty_start = s;
                    *dirty_count = c;
                }
                true
            }
            None => false,
        }
    })
}

/// The SHA-256 of the bitmap's bits as 64 lowercase hex digits, equal to QEMU's
/// `x-debug-block-dirty-bitmap-sha256` for the same bits.
///
/// Returns: the digest, or NULL on failure: EINVAL (NULL `bm`, inconsistent bitmap: QEMU's
/// message and hint), EIO (the bitmap's data could not be read), ENOENT (the bitmap no longer
/// exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the string; free it with `qdirty_string_free`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_sha256(
    bm: *const qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> *mut c_char {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let hex = unsafe { with_bitmap(bm, |b, _| Ok(b.try_sha256()?)) }?;
        let s = CString::new(hex)
            .map_err(|_| FfiError::new(libc::EIO, "internal error: digest contains NUL"))?;
        Ok(s.into_raw())
    })
}

/// One dirty extent of a bitmap: `length` bytes from `offset`
/// (`qdirty_bitmap_dirty_extents`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct qdirty_extent {
    /// Start of the extent, in bytes.
    pub offset: u64,
    /// Length of the extent, in bytes (never 0).
    pub length: u64,
}

/// The dirty parts of `[start, end)` (`end` clamped to the disk size) as maximal runs of dirty
/// granules, in bytes, sorted, clipped to `[start, end)`: at most `max` of them go to
/// `out[0 .. *n)`. While `*n == max` there may be more: call again with `start =
/// out[*n - 1].offset + out[*n - 1].length`. The bitmap is up to date with every write the
/// hook logged before the call. This is the read a backup tool should use: it never answers
/// "clean" for a bitmap it cannot read.
///
/// `*n` is set to 0 on entry (when `n` is not NULL). `start >= end` gives no extent.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm` or `n`, NULL `out` or `max` 0,
/// inconsistent bitmap: QEMU's message "Bitmap 'NAME' is inconsistent and cannot be used" and
/// hint), -EIO (the bitmap's data could not be read: the message names the bitmap and the
/// offset; nothing changed and the next call reads again), -ENOENT (the bitmap no longer
/// exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); `*n` is 0.
/// Ownership: `out` stays the caller's.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `out` is NULL or writable for `max`
/// extents; `n` is NULL or writable. `errp` is NULL or points to a `qdirty_error *` that is
/// NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_dirty_extents(
    bm: *const qdirty_bitmap,
    start: u64,
    end: u64,
    out: *mut qdirty_extent,
    max: usize,
    n: *mut usize,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        if n.is_null() {
            return Err(FfiError::null_arg("n"));
        }
        // SAFETY: non-NULL and writable (see the function's Safety section).
        unsafe { *n = 0 };
        if out.is_null() {
            return Err(FfiError::null_arg("out"));
        }
        if max == 0 {
            return Err(FfiError::invalid("max must be at least 1"));
        }
        // SAFETY: see the function's Safety section.
        let found = unsafe {
            with_bitmap(bm, |b, _| {
                let mut k = 0usize;
                for (offset, length) in b.dirty_runs(start, end)?.take(max) {
                    // SAFETY: k < max and `out` is writable for `max` extents.
                    out.add(k).write(qdirty_extent { offset, length });
                    k += 1;
                }
                Ok(k)
            })
        }?;
        // SAFETY: as above.
        unsafe { *n = found };
        Ok(())
    })
}
