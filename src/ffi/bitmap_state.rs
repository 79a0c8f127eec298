//! `qdirty_bitmap_*` state: QEMU's check, busy, readonly, persistence, skip_store,
//! inconsistent, recording and successor flags.

use std::os::raw::c_int;

use super::boundary::{ffi_call, or_default};
use super::error::qdirty_error;
use super::handle::{
    qdirty_bitmap, with_bitmap, with_bitmap_mut, with_bitmap_unloaded, with_state,
};
use crate::bitmap::{CHECK_BUSY, CHECK_INCONSISTENT, CHECK_RO};

super::symbol_versions::symbol_versions!("bitmap_state");

/// `qdirty_bitmap_check` flag (QEMU's BDRV_BITMAP_BUSY): fail if the bitmap is busy.
pub const QDIRTY_CHECK_BUSY: u32 = 1u32;

/// `qdirty_bitmap_check` flag (QEMU's BDRV_BITMAP_RO): fail if the bitmap is readonly.
pub const QDIRTY_CHECK_RO: u32 = 2u32;

/// `qdirty_bitmap_check` flag (QEMU's BDRV_BITMAP_INCONSISTENT): fail if the bitmap is
/// inconsistent.
pub const QDIRTY_CHECK_INCONSISTENT: u32 = 4u32;

/// `qdirty_bitmap_check` flags for operations that change a bitmap's bits (QEMU's
/// BDRV_BITMAP_DEFAULT): BUSY | RO | INCONSISTENT.
pub const QDIRTY_CHECK_DEFAULT: u32 = 7u32;

/// `qdirty_bitmap_check` flags for operations that only read a bitmap or change its state
/// (QEMU's BDRV_BITMAP_ALLOW_RO): BUSY | INCONSISTENT.
pub const QDIRTY_CHECK_ALLOW_RO: u32 = 5u32;

const _: () = assert!(
    QDIRTY_CHECK_BUSY == CHECK_BUSY
        && QDIRTY_CHECK_RO == CHECK_RO
        && QDIRTY_CHECK_INCONSISTENT == CHECK_INCONSISTENT
        && QDIRTY_CHECK_DEFAULT == crate::bitmap::CHECK_DEFAULT
        && QDIRTY_CHECK_ALLOW_RO == crate::bitmap::CHECK_ALLOW_RO
);

/// Reads one flag (the data is not loaded for it); `false` when the handle is NULL, not a
/// bitmap, or its bitmap is gone (warned about but for NULL: [`or_default`]).
///
/// # Safety
/// `bm` is NULL or a bitmap pointer still owned by an open image.
unsafe fn flag(bm: *const qdirty_bitmap, f: impl FnOnce(&crate::DirtyBitmap) -> bool) -> bool {
    // SAFETY: caller's contract.
    or_default(unsafe { with_bitmap_unloaded(bm, f) }, false)
}

/// QEMU's gatekeeper (`bdrv_dirty_bitmap_check`): may the bitmap be used by an operation that
/// forbids the states in `flags`? The checks run in QEMU's order, BUSY, then RO, then
/// INCONSISTENT, and the first failing one gives QEMU's message: "Bitmap 'NAME' is currently in
/// use by another operation and cannot be used" (EBUSY), "Bitmap 'NAME' is readonly and cannot
/// be modified" (EPERM), "Bitmap 'NAME' is inconsistent and cannot be used" (EINVAL, with the
/// hint "Try block-dirty-bitmap-remove to delete this bitmap from disk").
///
/// `flags`: QDIRTY_CHECK_BUSY, QDIRTY_CHECK_RO, QDIRTY_CHECK_INCONSISTENT, or the sets
/// QDIRTY_CHECK_DEFAULT / QDIRTY_CHECK_ALLOW_RO. 0 always passes. With
/// QDIRTY_CHECK_INCONSISTENT the bitmap must also be readable: its data is loaded if it is
/// still on disk, and a read error fails the check (-EIO); after a successful check the
/// getters without an error channel (`qdirty_bitmap_count`, ...) answer from its real bits.
///
/// Returns: 0 if allowed, or a negative errno: the check's errno as above, -EINVAL (NULL `bm`,
/// unknown flag bits), -EIO (QDIRTY_CHECK_INCONSISTENT: the data could not be read), -ENOENT
/// (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: nothing is transferred.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_check(
    bm: *const qdirty_bitmap,
    flags: u32,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        super::image::check_flags(
            flags,
            QDIRTY_CHECK_BUSY | QDIRTY_CHECK_RO | QDIRTY_CHECK_INCONSISTENT,
            "qdirty_bitmap_check",
        )?;
        if flags & QDIRTY_CHECK_INCONSISTENT != 0 {
            // Usable means readable too: the data is loaded (or the read error returned).
            // SAFETY: see the function's Safety section.
            unsafe { with_bitmap(bm, |b, _| Ok(b.check(flags)?)) }
        } else {
            // SAFETY: as above.
            unsafe { with_bitmap_unloaded(bm, |b| b.check(flags)) }??;
            Ok(())
        }
    })
}

/// Whether the bitmap is busy: held by an operation (a successor, an export, a migration, a
/// transactional remove). Busy bitmaps refuse changes through the checked functions.
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_busy(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { flag(bm, |b| b.busy()) }
    })
}

/// Sets or clears the busy flag directly (QEMU's `bdrv_dirty_bitmap_set_busy`, used by NBD
/// exports and migration to hold a bitmap). No checks.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_busy(
    bm: *mut qdirty_bitmap,
    busy: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                b.set_busy(busy);
                Ok(())
            })
        }
    })
}

/// Sets or clears the readonly flag directly (QEMU's `bdrv_dirty_bitmap_set_readonly`). No
/// checks. A readonly bitmap's bits cannot change, and while an image has one the host must
/// refuse guest writes (`qdirty_image_has_readonly_bitmaps`).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_readonly(
    bm: *mut qdirty_bitmap,
    readonly: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                b.set_readonly(readonly);
                Ok(())
            })
        }
    })
}

/// Sets or clears the persistent flag (QEMU's `bdrv_dirty_bitmap_set_persistence`). No checks:
/// unlike QDIRTY_BITMAP_PERSISTENT at creation, it does not ask whether the image can store the
/// bitmap; a bitmap that cannot be stored makes the next store or close fail.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_persistence(
    bm: *mut qdirty_bitmap,
    persistent: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                b.set_persistence(persistent);
                Ok(())
            })
        }
    })
}

/// Whether skip_store is set: the bitmap is not written back on the next store or close even
/// if it is persistent (QEMU: migration, transactional remove).
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_skip_store(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { flag(bm, |b| b.skip_store()) }
    })
}

/// Sets or clears skip_store (QEMU's `bdrv_dirty_bitmap_skip_store`). No checks.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_skip_store(
    bm: *mut qdirty_bitmap,
    skip: bool,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                b.set_skip_store(skip);
                Ok(())
            })
        }
    })
}

/// Marks the bitmap inconsistent, which also disables it (QEMU's
/// `bdrv_dirty_bitmap_set_inconsistent`). Only persistent bitmaps can be inconsistent (QEMU
/// asserts; qdirty fails). There is no way back: remove the bitmap.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm`, the bitmap is not persistent), -ENOENT
/// (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image. `errp` is NULL or points to a
/// `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_set_inconsistent(
    bm: *mut qdirty_bitmap,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { with_bitmap_mut(bm, |b| b.set_inconsistent()) }
    })
}

/// QEMU's `recording` (what `query-block` reports): the bitmap is enabled, or it is frozen and
/// its successor is enabled (the successor records guest writes on its behalf).
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_recording(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let r = unsafe { with_state(bm, |s, _, id| Ok(s.image.bitmaps().recording(id))) };
        or_default(r, false)
    })
}

/// Whether the bitmap has a successor (it is frozen by `qdirty_bitmap_create_successor`).
///
/// Returns: true or false; false if `bm` is NULL or the bitmap no longer exists.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image.
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_has_successor(bm: *const qdirty_bitmap) -> bool {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        unsafe { flag(bm, |b| b.has_successor()) }
    })
}
