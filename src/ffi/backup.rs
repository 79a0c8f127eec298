//! Clear and merge with a backup, restore (QEMU's undo of the transaction actions), and the
//! checked merge of any two bitmaps.

use std::os::raw::c_int;

use super::boundary::ffi_call;
use super::castable::{self, Castable, OwnedByCaller};
use super::error::{qdirty_error, FfiError};
use super::handle::{lock_all, qdirty_bitmap, with_bitmap_mut, BitmapHandle};
use crate::bitmap::Backup;

super::symbol_versions::symbol_versions!("backup");

/// The bits a bitmap had before `qdirty_bitmap_clear_with_backup` or `qdirty_bitmap_merge`
/// changed them (QEMU's HBitmap backup), for `qdirty_bitmap_restore`.
///
/// Ownership: owned by the caller; free it with `qdirty_backup_free` (restoring does not free
/// it: it leaves it empty).
/// Thread safety: not shared between threads by qdirty; one thread at a time may use it.
/// Methods: qdirty_bitmap_restore, qdirty_backup_free
#[allow(non_camel_case_types)]
pub struct qdirty_backup {
    _private: [u8; 0],
}

impl Castable for qdirty_backup {
    type RustType = BackupObj;
    type Ownership = OwnedByCaller;
    const MAGIC: u64 = 0x7164_6972_7479_424b; // "qdirtyBK"
    const NOT_LIVE: &'static str = "is not a valid qdirty_backup";
}

/// What `qdirty_backup *` points to.
pub(crate) struct BackupObj {
    /// None once restored.
    bits: Option<Backup>,
}

/// Hands a backup to C.
fn into_raw(b: Backup) -> *mut qdirty_backup {
    castable::to_raw(BackupObj { bits: Some(b) })
}

/// Clears every bit and hands the old bits back as a backup (QEMU's `bdrv_clear_dirty_bitmap`
/// with a backup, the prepare step of the transaction's clear action); QDIRTY_CHECK_DEFAULT
/// checks first. Undo with `qdirty_bitmap_restore`.
///
/// `*backup` is set to NULL on entry and receives the backup on success.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `bm` or `backup`, inconsistent bitmap),
/// -EBUSY, -EPERM (readonly bitmap), -EIO (the bitmap's data could not be read: the message
/// names it), -ENOENT (the bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: the caller owns `*backup`; free it with `qdirty_backup_free`.
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `backup` is NULL or writable. `errp`
/// is NULL or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and
/// does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_clear_with_backup(
    bm: *mut qdirty_bitmap,
    backup: *mut *mut qdirty_backup,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        if backup.is_null() {
            return Err(FfiError::null_arg("backup"));
        }
        // SAFETY: non-NULL and writable (see the function's Safety section).
        unsafe { *backup = std::ptr::null_mut() };
        // SAFETY: see the function's Safety section.
        let b = unsafe { with_bitmap_mut(bm, |b| b.clear_with_backup()) }?;
        // SAFETY: as above.
        unsafe { *backup = into_raw(b) };
        Ok(())
    })
}

/// Puts back the bits saved in `backup` (QEMU's `bdrv_restore_dirty_bitmap`, the abort step of
/// the clear and merge actions). The backup must come from this bitmap (or one of the same
/// size and granularity); it is left empty, not freed: free it with `qdirty_backup_free`.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, an empty (already restored) backup,
/// a backup of another size or granularity), -EPERM (readonly bitmap), -ENOENT (the bitmap no
/// longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: the caller keeps `backup`.
/// Thread safety: may be called from any thread; serialized per image. No other thread may use
/// `backup` at the same time.
///
/// # Safety
/// `bm` is NULL or a bitmap still owned by an open image; `backup` is NULL or a backup not yet
/// freed. `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call
/// returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_restore(
    bm: *mut qdirty_bitmap,
    backup: *mut qdirty_backup,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let obj = unsafe { castable::try_mut(backup, "backup") }?;
        if obj.bits.is_none() {
            return Err(FfiError::invalid(
                "the backup is empty (it was already restored)",
            ));
        }
        // SAFETY: see the function's Safety section.
        unsafe {
            with_bitmap_mut(bm, |b| {
                // Checked first, so that a refused restore leaves the backup as it was.
                b.check_restore(obj.bits.as_ref().expect("checked above"))?;
                b.restore(obj.bits.take().expect("checked above"))
            })
        }
    })
}

/// Frees a backup. NULL is a no-op.
///
/// Ownership: takes `backup`; it is invalid afterwards.
/// Thread safety: may be called from any thread, once per backup.
///
/// # Safety
/// `backup` is NULL or a backup not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_backup_free(backup: *mut qdirty_backup) {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let _ = unsafe { castable::take(backup, "backup") };
    })
}

/// dest |= src (QEMU's `bdrv_merge_dirty_bitmap`), between any two bitmaps: of the same image
/// or of two images, named or anonymous, even the same bitmap. QEMU's checks, in QMP's order:
/// QDIRTY_CHECK_ALLOW_RO on `src` (a readonly source is fine), equal sizes ("Bitmaps are of
/// different sizes (destination size is N, source size is M) and can't be merged"), then
/// QDIRTY_CHECK_DEFAULT on `dest`. Granularities may differ (a coarser destination is rounded
/// outward).
///
/// `backup`: NULL, or where to store dest's previous bits for `qdirty_bitmap_restore` (set to
/// NULL on entry).
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `dest` or `src`, different sizes,
/// inconsistent bitmap), -EBUSY, -EPERM (readonly `dest`), -EIO (the data of either bitmap
/// could not be read: the message names it), -ENOENT (a bitmap no longer exists).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); nothing changed.
/// Ownership: the caller owns `*backup`; free it with `qdirty_backup_free`.
/// Thread safety: may be called from any thread; locks both images, in address order (one lock
/// when they are the same image), so concurrent merges in opposite directions do not deadlock.
///
/// # Safety
/// `dest` and `src` are NULL or bitmaps still owned by open images; `backup` is NULL or
/// writable. `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call
/// returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_bitmap_merge(
    dest: *mut qdirty_bitmap,
    src: *const qdirty_bitmap,
    backup: *mut *mut qdirty_backup,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        if !backup.is_null() {
            // SAFETY: non-NULL and writable (see the function's Safety section).
            unsafe { *backup = std::ptr::null_mut() };
        }
        // SAFETY: see the function's Safety section.
        let d = unsafe { BitmapHandle::from_ptr(dest) }?;
        // SAFETY: as above.
        let s = unsafe { BitmapHandle::from_ptr(src) }?;
        let (di, si) = (d.image()?, s.image()?);
        let mut guards = lock_all(&[di, si])?;
        let source = {
            let sg = &mut guards
                .iter_mut()
                .find(|(h, _)| h.same(si))
                .expect("locked")
                .1;
            if sg.image.bitmap(s.id).is_none() {
                return Err(s.gone());
            }
            sg.image.bitmap_current(s.id)?.clone()
        };
        let dg = &mut guards
            .iter_mut()
            .find(|(h, _)| h.same(di))
            .expect("locked")
            .1;
        if dg.image.bitmap(d.id).is_none() {
            return Err(d.gone());
        }
        let b = dg
            .image
            .bitmaps_mut()
            .merge(d.id, &source, !backup.is_null())?;
        if let Some(b) = b {
            // SAFETY: non-NULL (a backup was only asked for then) and writable.
            unsafe { *backup = into_raw(b) };
        }
        Ok(())
    })
}
