//! `qdirty_image_store_space`: how much space storing the bitmaps needs now.

use std::os::raw::c_int;

use super::boundary::ffi_call;
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_image, ImageHandle};

super::symbol_versions::symbol_versions!("store_space");

/// How much space a store (`qdirty_image_store_bitmaps`, close) needs now.
///
/// `*clusters` receives the number of new clusters the store would allocate now: changed
/// non-zero data clusters, new bitmap tables and a new directory (an image whose bitmaps did
/// not change needs 0; refcount blocks the allocation may need come on top, at most a few).
/// `*bytes` receives the same in bytes. `*measure_bytes` receives what `qemu-img measure`
/// reports as "bitmaps": every data cluster and table of every persistent bitmap plus the
/// directory. Any of the three may be NULL. Bitmaps whose data is still on disk are not loaded.
///
/// Returns: 0, or a negative errno: -EINVAL (NULL `img`), -EIO (the data of a changed bitmap
/// could not be read: the message names it; or an unusable image).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Thread safety: may be called from any thread; serialized per image.
///
/// # Safety
/// `img` is NULL or an open image; `clusters`, `bytes` and `measure_bytes` are NULL or
/// writable. `errp` is NULL or points to a `qdirty_error *` that is NULL (otherwise the call
/// returns -EINVAL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_store_space(
    img: *mut qdirty_image,
    clusters: *mut u64,
    bytes: *mut u64,
    measure_bytes: *mut u64,
    errp: *mut *mut qdirty_error,
) -> c_int {
    ffi_call!(errp = errp, {
        // SAFETY: see the function's Safety section.
        let h = unsafe { ImageHandle::from_ptr(img, "img") }?;
        let s = h.lock()?.image.store_space_needed()?;
        for (p, v) in [
            (clusters, s.clusters),
            (bytes, s.bytes),
            (measure_bytes, s.measure_bytes),
        ] {
            if !p.is_null() {
                // SAFETY: non-NULL pointers are writable (see the function's Safety section).
                unsafe { *p = v };
            }
        }
        Ok::<(), FfiError>(())
    })
}
