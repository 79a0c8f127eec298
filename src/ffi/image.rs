//! `qdirty_image_*`: create, open and close images; find, add, remove and merge their bitmaps.

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::boundary::{ffi_call, or_default};
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_bitmap, qdirty_image, ImageHandle};
use super::{
    QDIRTY_BITMAP_AUTOLOAD, QDIRTY_BITMAP_DISABLED, QDIRTY_BITMAP_PERSISTENT, QDIRTY_OPEN_DURABLE,
    QDIRTY_OPEN_FORCE_SHARE, QDIRTY_OPEN_RDWR, QDIRTY_OPEN_SALVAGE,
};
use crate::image::{AddOptions, Image, OpenOptions};

super::symbol_versions::symbol_versions!("image");

/// Borrows a C string argument as bytes.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string.
pub(crate) unsafe fn arg_bytes<'a>(s: *const c_char, what: &str) -> Result<&'a [u8], FfiError> {
    if s.is_null() {
        return Err(FfiError::null_arg(what));
    }
    // SAFETY: caller's contract.
    Ok(unsafe { CStr::from_ptr(s) }.to_bytes())
}

/// Borrows a C string argument as a path.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string.
unsafe fn arg_path<'a>(s: *const c_char) -> Result<&'a Path, FfiError> {
    // SAFETY: caller's contract.
    let bytes = unsafe { arg_bytes(s, "path") }?;
    if bytes.is_empty() {
        return Err(FfiError::invalid("path must not be empty"));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// Rejects flag bits outside `known`.
pub(crate) fn check_flags(flags: u32, known: u32, what: &str) -> Result<(), FfiError> {
    if flags & !known != 0 {
        return Err(FfiError::invalid(format!(
            "{what}: unknown flags {:#x} (known flags: {known:#x})",
            flags & !known
        )));
    }
    Ok(())
}

/// Creates a blank qcow2 v3 image file of `size` bytes (rounded up to 512) with no bitmaps, so
/// that tests and tools need no qemu-img. Fails if the file exists.
///
/// `cluster_size` is a power of two from 512 to 2 MiB; 0 means 64 KiB.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL or empty path, bad cluster size), -EFBIG (a
/// size whose L1 table would exceed QEMU's maximum for that cluster size), -EEXIST (the file
/// exists), other I/O errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: nothing is transferred.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string. `errp` is NULL or points to a `qdirty_error *`
/// that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_create(
    path: *const c_char,
    size: u64,
    cluster_size: u32,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let path = unsafe { arg_path(path) }?;
        Image::create(path, size, cluster_size)?;
        Ok(())
    })
}

/// Opens a qcow2 image and loads its bitmaps, as QEMU does.
///
/// `flags`: 0 opens read-only (nothing is ever written); QDIRTY_OPEN_RDWR opens read-write,
/// which marks every loaded bitmap in_use in the file before this function returns, and stores
/// them on `qdirty_image_close`. Bitmaps stored with the `auto` flag load enabled, the others
/// disabled; bitmaps found in_use load as inconsistent. The image is locked like QEMU locks it
/// (shared OFD locks on bytes 100-103/200-203 and conflict probes) unless
/// QDIRTY_OPEN_FORCE_SHARE is given (read-only opens only). QDIRTY_OPEN_SALVAGE opens an image
/// whose bitmap directory entries or tables QEMU refuses, keeping those as broken bitmaps (see
/// the flag and `qdirty_image_broken_bitmap`).
///
/// Returns: the image, or NULL on failure: unknown flag bits, RDWR with FORCE_SHARE or a NULL
/// path (EINVAL), the image is in use by another process such as QEMU (EAGAIN), a file that is
/// not a usable qcow2 image (EINVAL, ENOTSUP), an image that needs repair before it can be
/// written (EACCES, the message names `qemu-img check -r all`), I/O errors.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the image and must pass it to `qdirty_image_close`.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string. `errp` is NULL or points to a `qdirty_error *`
/// that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_open(
    path: *const c_char,
    flags: u32,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_image {
    ffi_call!(errp = errp, {
        check_flags(
            flags,
            QDIRTY_OPEN_RDWR | QDIRTY_OPEN_FORCE_SHARE | QDIRTY_OPEN_SALVAGE | QDIRTY_OPEN_DURABLE,
            "qdirty_image_open",
        )?;
        // SAFETY: see the function's Safety section.
        let path = unsafe { arg_path(path) }?;
        let image = OpenOptions::new()
            .read_write(flags & QDIRTY_OPEN_RDWR != 0)
            .force_share(flags & QDIRTY_OPEN_FORCE_SHARE != 0)
            .salvage(flags & QDIRTY_OPEN_SALVAGE != 0)
            .durable(flags & QDIRTY_OPEN_DURABLE != 0)
            .open(path)?;
        Ok(ImageHandle::into_raw(image))
    })
}

/// Opens an image read-write in durable mode (QDIRTY_OPEN_RDWR | QDIRTY_OPEN_DURABLE) with
/// zones of `zone_bytes` bytes: a power of two of at least 64 KiB (raised where the disk would
/// have more than 1,048,576 zones). Smaller zones make the bitmaps left by a crash more exact
/// and the first writes into each zone more frequent (one write and flush per zone).
///
/// Returns: the image, or NULL on failure (as `qdirty_image_open`; -EINVAL for a zone size
/// that is not a power of two of at least 64 KiB).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the image and frees it with `qdirty_image_close`.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string. `errp` is NULL or points to a `qdirty_error *`
/// that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_open_durable(
    path: *const c_char,
    zone_bytes: u64,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_image {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let path = unsafe { arg_path(path) }?;
        let image = OpenOptions::new()
            .read_write(true)
            .durable(true)
            .zone_bytes(zone_bytes)
            .open(path)?;
        Ok(ImageHandle::into_raw(image))
    })
}

/// The zone size of an image in durable mode, in bytes; 0 for an image in the ordinary mode
/// or NULL.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_zone_bytes(img: *const qdirty_image) -> u64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") };
        or_default(h.map(|h| h.zones().map_or(0, |z| z.zone_bytes())), 0)
    })
}

/// Closes an image: stores its persistent bitmaps when it was opened read-write (clearing
/// in_use), then frees it together with all its `qdirty_bitmap` handles.
///
/// The image is freed even when storing fails: the call then returns the error, which names
/// every bitmap not stored (they stay marked in_use in the file and load as inconsistent next
/// time; a bitmap whose data could not be read is one of them, the others are stored). A
/// `*errp` already set does not stop the close: the details of a failure are then dropped.
/// In a process other than the one that opened the image (a child after `fork`), close only
/// frees memory: nothing is stored, and the image locks (shared with the parent) stay with the
/// parent. A forked child may call nothing else on the parent's images. An image made unusable by an
/// internal error is not stored: the call fails with EIO, the bitmap handles are freed, and the
/// image itself is abandoned as if the process had crashed (its file stays open, its bitmaps
/// stay in_use on disk).
///
/// Returns: 0, or a negative errno: -EINVAL (`img` NULL or not an open image: nothing is
/// freed), -EIO and other errors of the final store.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: takes `img`; it and its bitmaps are invalid afterwards, whatever the result.
/// Thread safety: no other thread may use `img` or its bitmaps during or after this call.
///
/// # Safety
/// `img` is NULL or an image from `qdirty_image_open` not yet closed. `errp` is NULL or points
/// to a `qdirty_error *` (if that is not NULL, the image is closed all the same and the
/// details of a failure are dropped).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_close(
    img: *mut qdirty_image,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(
        errp = errp,
        release = {
            // SAFETY: see the function's Safety section; C gives up ownership.
            let handle = unsafe { ImageHandle::take(img) }?;
            let (state, poisoned) = handle.into_state();
            if poisoned {
                // A panic left the image half-updated: storing it could corrupt the file, and
                // dropping an Image stores. Leak it instead, as a crash would: its bitmaps stay
                // in_use on disk and load as inconsistent next time.
                std::mem::forget(state.into_image());
                return Err(FfiError::new(
                libc::EIO,
                "image is unusable after an internal error; it was closed without storing its bitmaps",
            ));
            }
            Ok(state.into_image().close()?)
        }
    )
}

/// Writes the persistent bitmaps' data now without closing, as a checkpoint: the close after it
/// writes only what changed since. The bitmaps stay loaded and writable, and stay in_use on
/// disk throughout (the guest may go on writing: a write whose data reached the disk before its
/// `qdirty_image_set_dirty` would be missing from a copy marked consistent). Only a close or a
/// switch to read-only, after the host stopped guest writes, leaves consistent bitmaps.
///
/// Returns: 0, or a negative errno: -EINVAL (`img` NULL), -EROFS (read-only image), -ENOTSUP
/// (a standalone image: there is no file to store to), -EIO and other I/O errors (the message
/// names every bitmap not stored).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: nothing is transferred.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_store_bitmaps(
    img: *mut qdirty_image,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        h.lock()?.image.store_bitmaps()?;
        Ok(())
    })
}

/// The virtual disk size in bytes.
///
/// Returns: the size; 0 if `img` is NULL or unusable.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_size(img: *const qdirty_image) -> u64 {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let size = || -> Result<u64, FfiError> {
            Ok(unsafe { ImageHandle::from_ptr(img, "img") }?
                .lock()?
                .image
                .size())
        };
        or_default(size(), 0)
    })
}

/// Whether the image is read-only (opened without QDIRTY_OPEN_RDWR, or a qcow2 v2 image).
///
/// Returns: true or false; false if `img` is NULL or unusable.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_read_only(img: *const qdirty_image) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let ro = || -> Result<bool, FfiError> {
            Ok(unsafe { ImageHandle::from_ptr(img, "img") }?
                .lock()?
                .image
                .read_only())
        };
        or_default(ro(), false)
    })
}

/// The first bitmap of the image, in QEMU's list order (newest first); iterate with
/// `qdirty_bitmap_next`.
///
/// Returns: the bitmap, or NULL if the image has none, or `img` is NULL or unusable.
/// Ownership: borrowed from the image (see `qdirty_bitmap`).
/// Thread safety: may be called from any thread; serialized per image. Adding or removing
/// bitmaps while iterating from another thread may skip or repeat bitmaps.
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_first_bitmap(img: *mut qdirty_image) -> *mut qdirty_bitmap {
    ffi_call!({
        let first = || -> Result<*mut qdirty_bitmap, FfiError> {
            // SAFETY: see the function's Safety section.
            let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
            let mut state = h.lock()?;
            Ok(match state.image.bitmaps().first() {
                Some(id) => state.handle_for(img, id),
                None => std::ptr::null_mut(),
            })
        };
        or_default(first(), std::ptr::null_mut())
    })
}

/// The bitmap named `name` (exact byte comparison).
///
/// Returns: the bitmap, or NULL if there is none of that name, or an argument is NULL or
/// unusable.
/// Ownership: borrowed from the image (see `qdirty_bitmap`).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_find_bitmap(
    img: *mut qdirty_image,
    name: *const c_char,
) -> *mut qdirty_bitmap {
    ffi_call!({
        let find = || -> Result<*mut qdirty_bitmap, FfiError> {
            // SAFETY: see the function's Safety section.
            let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
            // SAFETY: as above.
            let name = unsafe { arg_bytes(name, "name") }?;
            let mut state = h.lock()?;
            Ok(match state.image.find_bitmap(name) {
                Some(id) => state.handle_for(img, id),
                None => std::ptr::null_mut(),
            })
        };
        or_default(find(), std::ptr::null_mut())
    })
}

/// Adds a bitmap (QMP `block-dirty-bitmap-add`).
///
/// `name`: 1..1023 bytes, unique on the image (including inconsistent bitmaps).
/// `granularity`: a power of two from 512 B to 2 GiB; 0 means QEMU's default
/// min(max(cluster size, 4 KiB), 64 KiB).
/// `flags`: QDIRTY_BITMAP_PERSISTENT (store it in the image on close; checks that the image can
/// store it), QDIRTY_BITMAP_DISABLED (create it not recording writes), QDIRTY_BITMAP_AUTOLOAD
/// (deprecated: accepted, ignored, and the warning "Autoload option is deprecated and its value
/// is ignored" goes to the warning handler).
///
/// Returns: the new bitmap, or NULL on failure: unknown flag bits, NULL arguments, a bad name or
/// granularity (EINVAL), a duplicate name (EEXIST), a persistent bitmap on a read-only image
/// (EROFS) or on an image that cannot store it (ENOTSUP: a standalone or qcow2 v2 image; EFBIG:
/// too much bitmap data, too many bitmaps, a full bitmap directory). A lack of space in the
/// file is found by the store (close, `qdirty_image_store_bitmaps`), not here.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the bitmap is borrowed from the image (see `qdirty_bitmap`).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `name` is NULL or a NUL-terminated string. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_add_bitmap(
    img: *mut qdirty_image,
    name: *const c_char,
    granularity: u32,
    flags: u32,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_bitmap {
    ffi_call!(errp = errp, {
        check_flags(
            flags,
            QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_DISABLED | QDIRTY_BITMAP_AUTOLOAD,
            "qdirty_image_add_bitmap",
        )?;
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        // SAFETY: as above.
        let name = unsafe { arg_bytes(name, "name") }?;
        let opts = AddOptions {
            persistent: flags & QDIRTY_BITMAP_PERSISTENT != 0,
            disabled: flags & QDIRTY_BITMAP_DISABLED != 0,
            autoload: (flags & QDIRTY_BITMAP_AUTOLOAD != 0).then_some(true),
        };
        let mut state = h.lock()?;
        let id = state.image.add_bitmap(name, u64::from(granularity), opts)?;
        let p = state.handle_for(img, id);
        if p.is_null() {
            return Err(FfiError::new(
                libc::EIO,
                "internal error: the new bitmap cannot be found",
            ));
        }
        Ok(p)
    })
}

/// Removes the bitmap named `name` (QMP `block-dirty-bitmap-remove`), from the file too when it
/// is persistent. This is the only operation allowed on an inconsistent bitmap.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument), -ENOENT (no such bitmap), -EBUSY
/// (busy, frozen with a successor, live iterators, a successor itself), -EPERM (read-only
/// bitmap), -EROFS, -EIO and other I/O errors (the bitmap's data is read before its stored
/// copy is deleted).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed,
/// in memory or in the file.
/// Ownership: the removed bitmap's `qdirty_bitmap` handle stays valid until the image is
/// closed; calls on it fail with -ENOENT.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `name` is NULL or a NUL-terminated string. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_remove_bitmap(
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        // SAFETY: as above.
        let name = unsafe { arg_bytes(name, "name") }?;
        let mut state = h.lock()?;
        Ok(state.image.remove_bitmap(name)?)
    })
}

/// Merges bitmap `src_name` into bitmap `target` (target |= source, QMP
/// `block-dirty-bitmap-merge`). The source is a bitmap of `src_img`, or of `img` when `src_img` is
/// NULL or `img`. Granularities may differ; the disk sizes must be equal.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, different sizes, inconsistent
/// bitmap), -ENOENT (no such bitmap), -EBUSY, -EPERM (read-only target), -EIO (the data of
/// either bitmap could not be read: the message names it).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: nothing is transferred.
/// Thread safety: may be called from any thread; locks both images (in a fixed order, so
/// concurrent merges in opposite directions do not deadlock).
///
/// # Safety
/// `img` is NULL or an open image; `src_img` is NULL or an open image; `target` and `src_name`
/// are NULL or NUL-terminated strings. `errp` is NULL or points to a `qdirty_error *` that is
/// NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_merge_bitmap(
    img: *mut qdirty_image,
    target: *const c_char,
    src_img: *mut qdirty_image,
    src_name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        // SAFETY: as above.
        let target = unsafe { arg_bytes(target, "target") }?;
        // SAFETY: as above.
        let src_name = unsafe { arg_bytes(src_name, "src_name") }?;
        let src = if src_img.is_null() {
            h
        } else {
            // SAFETY: as above.
            unsafe { ImageHandle::from_ptr(src_img, "src_img") }?
        };
        if src.same(h) {
            h.lock()?.image.merge_bitmap(target, src_name)?;
            return Ok(());
        }
        // Lock in address order so that two opposite merges cannot deadlock.
        let (mut dst_state, mut src_state) =
            if (h as *const ImageHandle) < (src as *const ImageHandle) {
                let d = h.lock()?;
                (d, src.lock()?)
            } else {
                let s = src.lock()?;
                (h.lock()?, s)
            };
        dst_state
            .image
            .merge_bitmap_from(target, &mut src_state.image, src_name)?;
        Ok(())
    })
}

/// The guest write hook (QEMU's `bdrv_set_dirty`): marks `[offset, offset + bytes)` in every
/// enabled bitmap of the image and in no disabled one (nor readonly nor inconsistent), rounded
/// outward to each bitmap's granularity and clamped to the disk size. A write past the end of
/// the disk (the host let the guest write to space the disk gained before resizing the
/// bitmaps with `qdirty_image_truncate`) is in no bitmap: the next call on the image reports
/// it through the warning handler, and the bitmaps that recorded it mark the new space up to
/// its end dirty when they are resized.
///
/// Lock-free and O(1) in the number of bitmaps: the range goes into the image's write log with
/// atomic word operations, and the next call that locks the image (any other function on it or
/// its bitmaps) applies it to the bitmaps recording at that moment, before doing anything else.
/// So a write whose `qdirty_image_set_dirty` returned before a management call started is in
/// every bitmap enabled at that time, and one that started after the call returned is not in
/// the bitmaps it disabled or cleared, as with QEMU's mutex. A write concurrent with a
/// management call may be applied granule by granule on either side of it.
///
/// Does nothing when `img` is NULL (there is no error to report: check bitmaps with
/// `qdirty_bitmap_get` if in doubt).
/// Thread safety: may be called from any thread, concurrently with itself and with any call on
/// the image except `qdirty_image_close` (the caller stops I/O before closing).
///
/// # Safety
/// `img` is NULL or an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_set_dirty(img: *mut qdirty_image, offset: u64, bytes: u64) {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        if let Some((log, zones)) = unsafe { ImageHandle::hook_of(img) } {
            log.set(offset, bytes);
            if let Some(z) = zones {
                crate::image::durable_completion(z, offset, bytes);
            }
        }
    })
}

/// Durable mode (QDIRTY_OPEN_DURABLE): call before issuing a guest write to `[offset, offset +
/// bytes)`. Returns 0 once every stored bitmap of the image that records writes covers the
/// range on disk (written and flushed), or a negative errno, and then the write must not be
/// issued (fail it to the guest). After the write completes, successfully or not, call
/// `qdirty_image_set_dirty` with the same range, exactly once: that records it exactly and
/// ends its time "in flight".
///
/// Fast: when the range's zones are covered already (the common case), this costs a few
/// atomic operations, no lock and no I/O. Otherwise the zones are written into the stored
/// bitmaps, and threads that find uncovered zones at the same time share one write and one
/// flush. A range that does not end inside the disk is refused (-EINVAL): no bitmap could
/// cover it (the disk grew: close the image and open it again).
///
/// Without QDIRTY_OPEN_DURABLE: returns 0 and does nothing.
///
/// Returns: 0, or a negative errno: -EINVAL (`img` NULL or not an open image, a range past the
/// end of the disk), -EIO, -ENOSPC and the other errors of writing the image.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread, concurrently with itself, the write hook and
/// any call on the image except `qdirty_image_close`.
///
/// # Safety
/// `img` is NULL or an open image. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_prepare_write(
    img: *mut qdirty_image,
    offset: u64,
    bytes: u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let Some(zones) = h.zones() else {
            return Ok(());
        };
        zones.check_in_disk(offset, bytes)?;
        if zones.prepare(offset, bytes) {
            return Ok(());
        }
        // Group commit: whoever holds the lock next covers these zones too.
        zones.push_pending(&zones.uncovered(offset, bytes));
        let mut state = match h.lock() {
            Ok(s) => s,
            Err(e) => {
                zones.unprepare(offset, bytes);
                return Err(e);
            }
        };
        state.image.commit_prepared(offset, bytes)?;
        Ok(())
    })
}
