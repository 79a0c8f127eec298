//! `qdirty_txn_*`: bitmap actions grouped across images, all or nothing (QEMU's `transaction`
//! command with the block-dirty-bitmap-* actions).

use std::os::raw::{c_char, c_int};

use super::boundary::ffi_call;
use super::castable::{self, Castable, OwnedByCaller};
use super::error::{qdirty_error, FfiError};
use super::handle::{lock_all, qdirty_bitmap, qdirty_image, ImageHandle};
use super::image::{arg_bytes, check_flags};
use super::{QDIRTY_BITMAP_AUTOLOAD, QDIRTY_BITMAP_DISABLED, QDIRTY_BITMAP_PERSISTENT};
use crate::image::{AddOptions, Transaction};

super::symbol_versions::symbol_versions!("txn");

/// A transaction: bitmap actions on one or several images that take effect together or not at
/// all (QEMU's `transaction` QMP command). Each `qdirty_txn_*_bitmap` action is prepared (done)
/// at once and fails on its own; then `qdirty_txn_commit` makes every prepared action final,
/// or `qdirty_txn_abort` undoes them all in reverse order, exactly: clear gives the bits back,
/// merge restores the target, enable/disable restore the previous state, add releases the new
/// bitmap, remove gives the bitmap back (its stored copy, deleted when the action was prepared,
/// is written again on the next store or close). Until commit, a removed bitmap stays in the
/// image, busy and not stored; commit releases it. If an action fails, abort the transaction.
///
/// Ownership: owned by the caller from `qdirty_txn_new` until `qdirty_txn_free`. After commit
/// or abort it is empty and may be reused. It keeps pointers to the images its actions touched:
/// every such image must stay open until the transaction is committed, aborted or freed.
/// Thread safety: a transaction is not a thread-safe object: use it from one thread at a time.
/// Each call locks the images it touches (several in address order), so other threads may keep
/// using those images meanwhile.
/// Methods: qdirty_txn_add_bitmap, qdirty_txn_clear_bitmap, qdirty_txn_enable_bitmap,
/// qdirty_txn_disable_bitmap, qdirty_txn_merge_bitmap, qdirty_txn_remove_bitmap,
/// qdirty_txn_commit, qdirty_txn_abort, qdirty_txn_free
#[allow(non_camel_case_types)]
pub struct qdirty_txn {
    _private: [u8; 0],
}

impl Castable for qdirty_txn {
    type RustType = TxnObj;
    type Ownership = OwnedByCaller;
    const MAGIC: u64 = 0x7164_6972_7479_5458; // "qdirtyTX"
    const NOT_LIVE: &'static str = "is not a valid qdirty_txn";
}

/// What `qdirty_txn *` points to.
pub(crate) struct TxnObj {
    txn: Transaction,
    /// Every image an action touched, each once.
    images: Vec<*const qdirty_image>,
}

impl TxnObj {
    fn note(&mut self, img: *const qdirty_image) {
        if !self.images.contains(&img) {
            self.images.push(img);
        }
    }

    /// Commits (`commit` true) or aborts every prepared action. The transaction is empty afterwards unless an image could
    /// not be locked (then nothing happened).
    fn finish(&mut self, commit: bool) -> Result<(), FfiError> {
        let mut handles = Vec::with_capacity(self.images.len());
        for &p in &self.images {
            // SAFETY: the images of a transaction stay open until it is finished (documented).
            handles.push(unsafe { ImageHandle::from_ptr(p, "an image of the transaction") }?);
        }
        let mut guards = lock_all(&handles)?;
        let result = {
            let mut imgs: Vec<&mut crate::image::Image> =
                guards.iter_mut().map(|(_, g)| &mut g.image).collect();
            if commit {
                self.txn.commit(&mut imgs)
            } else {
                self.txn.abort(&mut imgs)
            }
        };
        if self.txn.is_empty() {
            self.images.clear();
        }
        Ok(result?)
    }
}

/// Borrows the transaction behind a C pointer.
///
/// # Safety
/// `p` is NULL or a live transaction.
unsafe fn txn_mut<'a>(p: *mut qdirty_txn) -> Result<&'a mut TxnObj, FfiError> {
    // SAFETY: caller's contract.
    unsafe { castable::try_mut(p, "txn") }
}

/// Checks the common arguments of an action.
///
/// # Safety
/// As the actions' Safety sections.
unsafe fn action_args<'a>(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
) -> Result<(&'a mut TxnObj, &'a ImageHandle, &'a [u8]), FfiError> {
    // SAFETY: caller's contract.
    let t = unsafe { txn_mut(txn) }?;
    // SAFETY: caller's contract.
    let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
    // SAFETY: caller's contract.
    let name = unsafe { arg_bytes(name, "name") }?;
    Ok((t, h, name))
}

/// A new, empty transaction.
///
/// Returns: the transaction; never NULL (NULL only if qdirty failed internally).
/// Ownership: the caller owns it; free it with `qdirty_txn_free`.
/// Thread safety: may be called from any thread; see `qdirty_txn`.
#[no_mangle]
pub extern "C" fn qdirty_txn_new() -> *mut qdirty_txn {
    ffi_call!({
        castable::to_raw::<qdirty_txn>(TxnObj {
            txn: Transaction::new(),
            images: Vec::new(),
        })
    })
}

/// Action block-dirty-bitmap-add: adds bitmap `name` to `img` now, with the arguments and
/// checks of `qdirty_image_add_bitmap`. Abort releases it.
///
/// Returns: the new bitmap, or NULL on failure (as `qdirty_image_add_bitmap`; EINVAL for a NULL
/// `txn`).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Ownership: the bitmap is borrowed from the image; it is freed if the transaction is aborted.
/// Thread safety: see `qdirty_txn`; locks `img`.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` is NULL or an open image that stays open
/// until the transaction is finished; `name` is NULL or a NUL-terminated string. `errp` is NULL
/// or points to a `qdirty_error *` that is NULL (otherwise the call returns NULL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_add_bitmap(
    txn: *mut qdirty_txn,
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
            "qdirty_txn_add_bitmap",
        )?;
        // SAFETY: see the function's Safety section.
        let (t, h, name) = unsafe { action_args(txn, img, name) }?;
        let opts = AddOptions {
            persistent: flags & QDIRTY_BITMAP_PERSISTENT != 0,
            disabled: flags & QDIRTY_BITMAP_DISABLED != 0,
            autoload: (flags & QDIRTY_BITMAP_AUTOLOAD != 0).then_some(true),
        };
        let mut state = h.lock()?;
        t.note(img);
        let id = t
            .txn
            .add(&mut state.image, name, u64::from(granularity), opts)?;
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

/// Runs a one-bitmap action with `img` locked.
///
/// # Safety
/// As the actions' Safety sections.
unsafe fn simple_action(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
    f: impl FnOnce(&mut Transaction, &mut crate::image::Image, &[u8]) -> crate::Result<()>,
) -> Result<(), FfiError> {
    // SAFETY: caller's contract.
    let (t, h, name) = unsafe { action_args(txn, img, name) }?;
    let mut state = h.lock()?;
    t.note(img);
    Ok(f(&mut t.txn, &mut state.image, name)?)
}

/// Action block-dirty-bitmap-clear: clears bitmap `name` of `img` now (QDIRTY_CHECK_DEFAULT
/// checks), keeping a backup. Abort gives the bits back.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, inconsistent bitmap), -ENOENT (no
/// such bitmap), -EBUSY, -EPERM (readonly bitmap), -EIO (the bitmap's data could not be read:
/// the message names it).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Thread safety: see `qdirty_txn`; locks `img`.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` is NULL or an open image that stays open
/// until the transaction is finished; `name` is NULL or a NUL-terminated string. `errp` is NULL
/// or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_clear_bitmap(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { simple_action(txn, img, name, |t, i, n| t.clear(i, n)) }
    })
}

/// Action block-dirty-bitmap-enable: enables bitmap `name` of `img` now (QDIRTY_CHECK_ALLOW_RO
/// checks). Abort restores its previous state.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, inconsistent bitmap), -ENOENT (no
/// such bitmap), -EBUSY.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Thread safety: see `qdirty_txn`; locks `img`.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` is NULL or an open image that stays open
/// until the transaction is finished; `name` is NULL or a NUL-terminated string. `errp` is NULL
/// or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_enable_bitmap(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { simple_action(txn, img, name, |t, i, n| t.enable(i, n)) }
    })
}

/// Action block-dirty-bitmap-disable: disables bitmap `name` of `img` now
/// (QDIRTY_CHECK_ALLOW_RO checks). Abort restores its previous state.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, inconsistent bitmap), -ENOENT (no
/// such bitmap), -EBUSY.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Thread safety: see `qdirty_txn`; locks `img`.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` is NULL or an open image that stays open
/// until the transaction is finished; `name` is NULL or a NUL-terminated string. `errp` is NULL
/// or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_disable_bitmap(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { simple_action(txn, img, name, |t, i, n| t.disable(i, n)) }
    })
}

/// Action block-dirty-bitmap-merge: merges bitmap `src_name` into bitmap `target` of `img` now
/// (target |= source, with the checks of `qdirty_image_merge_bitmap`), keeping a backup of the
/// target. The source is a bitmap of `src_img`, or of `img` when `src_img` is NULL or `img`.
/// Abort restores the target.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument, different sizes, inconsistent
/// bitmap), -ENOENT (no such bitmap), -EBUSY, -EPERM (readonly target), -EIO (the data of
/// either bitmap could not be read: the message names it).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Thread safety: see `qdirty_txn`; locks `img` and `src_img` in address order.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` and `src_img` are NULL or open images
/// that stay open until the transaction is finished; `target` and `src_name` are NULL or
/// NUL-terminated strings. `errp` is NULL or points to a `qdirty_error *` that is NULL
/// (otherwise the call returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_merge_bitmap(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    target: *const c_char,
    src_img: *mut qdirty_image,
    src_name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let (t, h, target) = unsafe { action_args(txn, img, target) }?;
        // SAFETY: as above.
        let src_name = unsafe { arg_bytes(src_name, "src_name") }?;
        let src = if src_img.is_null() {
            h
        } else {
            // SAFETY: as above.
            unsafe { ImageHandle::from_ptr(src_img, "src_img") }?
        };
        let mut guards = lock_all(&[h, src])?;
        t.note(img);
        if src.same(h) {
            let g = &mut guards[0].1;
            return Ok(t.txn.merge(&mut g.image, target, None, src_name)?);
        }
        let (a, b) = guards.split_at_mut(1);
        let (dst, srcg) = if a[0].0.same(h) {
            (&mut a[0].1, &mut b[0].1)
        } else {
            (&mut b[0].1, &mut a[0].1)
        };
        Ok(t.txn
            .merge(&mut dst.image, target, Some(&mut srcg.image), src_name)?)
    })
}

/// Action block-dirty-bitmap-remove: bitmap `name` of `img` is held (busy, not stored) until
/// commit releases it, and its stored copy, if any, is deleted from the image now (as in QEMU,
/// this deletion is not undone by abort, but abort makes the bitmap persistent again, so it is
/// stored again on the next store or close). Refused on busy and readonly bitmaps, and on
/// bitmaps with live iterators or a successor, which commit could not release.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL argument), -ENOENT (no such bitmap), -EBUSY
/// (busy, frozen with a successor, live iterators), -EPERM (readonly bitmap), -EROFS, -EIO and
/// other I/O errors (the bitmap's data is read before its stored copy is deleted). Every
/// refusal comes before the stored copy is deleted.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL); abort the
/// transaction then.
/// Ownership: after commit, calls on the bitmap's handle fail with -ENOENT (it stays valid until
/// the image is closed).
/// Thread safety: see `qdirty_txn`; locks `img`.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed; `img` is NULL or an open image that stays open
/// until the transaction is finished; `name` is NULL or a NUL-terminated string. `errp` is NULL
/// or points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_remove_bitmap(
    txn: *mut qdirty_txn,
    img: *mut qdirty_image,
    name: *const c_char,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { simple_action(txn, img, name, |t, i, n| t.remove(i, n)) }
    })
}

/// Makes every prepared action final: backups are dropped, removed bitmaps are released (their
/// handles stay valid and answer -ENOENT). The transaction is empty afterwards, whatever the result.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `txn`), -EIO (an image of the transaction is
/// unusable), errors of the commit.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: see `qdirty_txn`; locks every image of the transaction, in address order.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed, whose images are still open. `errp` is NULL or
/// points to a `qdirty_error *` that is NULL (otherwise the call returns -EINVAL and does
/// nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_commit(
    txn: *mut qdirty_txn,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        unsafe { txn_mut(txn) }?.finish(true)
    })
}

/// Undoes every prepared action, in reverse order, exactly (see `qdirty_txn`); added bitmaps
/// are released (their handles stay valid and answer -ENOENT). The transaction is empty afterwards, whatever the
/// result.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `txn`), -EIO (an image of the transaction is
/// unusable), errors of the undo.
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: see `qdirty_txn`; locks every image of the transaction, in address order.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed, whose images are still open. `errp` is NULL or
/// points to a `qdirty_error *` (if that is not NULL, the abort happens all the same and the
/// details of a failure are dropped).
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_abort(
    txn: *mut qdirty_txn,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(
        errp = errp,
        release = {
            // SAFETY: see the function's Safety section.
            unsafe { txn_mut(txn) }?.finish(false)
        }
    )
}

/// Frees a transaction. Actions still prepared (neither committed nor aborted) are aborted
/// first; a failure of that abort (in durable mode, writing the restored bitmaps; the next
/// call on the image writes them again) goes to the warning handler, and the transaction is
/// freed all the same. NULL is a no-op.
///
/// Ownership: takes `txn`; it is invalid afterwards.
/// Thread safety: see `qdirty_txn`; no other thread may use `txn` during or after the call.
///
/// # Safety
/// `txn` is NULL or a transaction not yet freed, whose images are still open.
#[no_mangle]
pub unsafe extern "C" fn qdirty_txn_free(txn: *mut qdirty_txn) {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let Ok(mut t) = (unsafe { castable::take(txn, "txn") }) else {
            return;
        };
        if !t.images.is_empty() {
            if let Err(e) = t.finish(false) {
                crate::warning::warn(&format!(
                    "Freeing a transaction aborted its actions, and that failed: {}",
                    e.message
                ));
            }
        }
    })
}
