//! Serialization of bitmap ranges for migration streams, in QEMU's byte layout: granule k of a
//! chunk is bit k % 8 of byte k / 8 (little-endian 64-bit words on every host).

use std::os::raw::c_int;

use super::boundary::{ffi_call, or_default};
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_bitmap, with_bitmap, with_bitmap_mut};

super::symbol_versions::symbol_versions!("serialize");

/// The alignment of serialization chunks in bytes of disk: 64 granules (QEMU's
/// `bdrv_dirty_bitmap_serialization_align`). Chunk starts must be multiples of it, and so must
/// chunk lengths unless the chunk ends at the end of the bitmap.
///
/// Returns: the alignment; 0 if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_serialization_align(bm: *const qdirty_bitmap) -> u64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        or_default(
            unsafe { with_bitmap(bm, |b, _| Ok(b.serialization_align())) },
            0,
        )
    })
}

/// The buffer size needed to serialize `[offset, offset + bytes)` (QEMU's
/// `bdrv_dirty_bitmap_serialization_size`): the 64-bit words the chunk spans, times 8.
///
/// Returns: the size in bytes (0 for `bytes` 0), or a negative errno: -EINVAL (NULL `bm`, a
/// chunk breaking the alignment rules of `qdirty_bitmap_serialization_align` or beyond the
/// bitmap's size, an inconsistent bitmap), -EIO (the bitmap's data could not be read: the
/// message names it), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_serialization_size(
    bm: *const qdirty_bitmap,
    offset: u64,
    bytes: u64,
    errp: *mut *mut qdirty_error,
) -> i64 {
    ffi_call!(
        errp = errp,
        value = {
            // SAFETY: see the function's Safety section.
            let n = unsafe { with_bitmap(bm, |b, _| Ok(b.serialization_size(offset, bytes)?)) }?;
            i64::try_from(n).map_err(|_| FfiError::new(libc::EFBIG, "serialization size too large"))
        }
    )
}

/// Borrows a C buffer; NULL is allowed only with `len` 0.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes.
unsafe fn buf_ref<'a>(buf: *const u8, len: usize) -> Result<&'a [u8], FfiError> {
    if buf.is_null() {
        if len != 0 {
            return Err(FfiError::null_arg("buf"));
        }
        return Ok(&[]);
    }
    // SAFETY: caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(buf, len) })
}

/// Serializes `[offset, offset + bytes)` into `buf` (QEMU's
/// `bdrv_dirty_bitmap_serialize_part`): `qdirty_bitmap_serialization_size(bm, offset, bytes)`
/// bytes are written at the start of `buf`.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, NULL `buf` with `len` > 0, `len`
/// smaller than the serialization size, a chunk breaking the alignment rules or beyond the
/// bitmap's size, an inconsistent bitmap), -EIO (the bitmap's data could not be read: the
/// message names it), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); `buf` is
/// untouched.
/// Ownership: the caller keeps `buf`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `buf` is NULL or writable for `len`
/// bytes. `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call
/// returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_serialize_part(
    bm: *const qdirty_bitmap,
    buf: *mut u8,
    len: usize,
    offset: u64,
    bytes: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        let out: &mut [u8] = if buf.is_null() {
            if len != 0 {
                return Err(FfiError::null_arg("buf"));
            }
            &mut []
        } else {
            // SAFETY: see the function's Safety section.
            unsafe { std::slice::from_raw_parts_mut(buf, len) }
        };
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap(bm, |b, _| Ok(b.serialize_part(out, offset, bytes)?)) }
    })
}

/// Overwrites `[offset, offset + bytes)` from `buf` (QEMU's
/// `bdrv_dirty_bitmap_deserialize_part`): whole 64-bit words, in the layout of
/// `qdirty_bitmap_serialize_part`. Until `qdirty_bitmap_deserialize_finish` runs (or `finish`
/// is true), the bitmap's count and searches do not see the new bits.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, NULL `buf` with `len` > 0, `len`
/// smaller than the serialization size, a chunk breaking the alignment rules or beyond the
/// bitmap's size, an inconsistent bitmap), -EPERM (readonly bitmap), -EIO (the bitmap's data
/// could not be read: the message names it), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: the caller keeps `buf`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `buf` is NULL or readable for `len`
/// bytes. `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call
/// returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_deserialize_part(
    bm: *mut qdirty_bitmap,
    buf: *const u8,
    len: usize,
    offset: u64,
    bytes: u64,
    finish: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let data = unsafe { buf_ref(buf, len) }?;
        // SAFETY: as above.
        unsafe { with_bitmap_mut(bm, |b| b.deserialize_part(data, offset, bytes, finish)) }
    })
}

/// Fills `[offset, offset + bytes)` with clean granules (QEMU's
/// `bdrv_dirty_bitmap_deserialize_zeroes`); see `qdirty_bitmap_deserialize_part` for the rules
/// and `finish`.
///
/// Returns: 0, or a negative errno as `qdirty_bitmap_deserialize_part`.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_deserialize_zeroes(
    bm: *mut qdirty_bitmap,
    offset: u64,
    bytes: u64,
    finish: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.deserialize_zeroes(offset, bytes, finish)) }
    })
}

/// Fills `[offset, offset + bytes)` with dirty granules (QEMU's
/// `bdrv_dirty_bitmap_deserialize_ones`), never past the bitmap's end (QEMU sets stray bits
/// there; qdirty does not); see `qdirty_bitmap_deserialize_part` for the rules and `finish`.
///
/// Returns: 0, or a negative errno as `qdirty_bitmap_deserialize_part`.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_deserialize_ones(
    bm: *mut qdirty_bitmap,
    offset: u64,
    bytes: u64,
    finish: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.deserialize_ones(offset, bytes, finish)) }
    })
}

/// Rebuilds the bitmap's summaries and count after `qdirty_bitmap_deserialize_*` calls made
/// with `finish` false (QEMU's `bdrv_dirty_bitmap_deserialize_finish`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_deserialize_finish(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                b.deserialize_finish();
                Ok(())
            })
        }
    })
}
