//! The `qdirty_error` object: message, optional hint and positive errno of a failed call.

use std::ffi::CString;
use std::os::raw::{c_char, c_int};

use super::boundary::ffi_call;
use super::castable::{self, Castable, OwnedByCaller};

super::symbol_versions::symbol_versions!("error");

/// The details of a failed call: a message, an optional hint and a positive errno.
///
/// Ownership: owned by the caller. A failing function that takes `qdirty_error **errp` stores
/// a new error in `*errp` (when `errp` is not NULL); free it with `qdirty_error_free`.
/// Thread safety: an error is immutable; it may be read from any thread and freed from any
/// thread, once.
/// Methods: qdirty_error_message, qdirty_error_hint, qdirty_error_errno, qdirty_error_free
#[allow(non_camel_case_types)]
pub struct qdirty_error {
    _private: [u8; 0],
}

impl Castable for qdirty_error {
    type RustType = ErrorObj;
    type Ownership = OwnedByCaller;
    const MAGIC: u64 = 0x7164_6972_7479_4552; // "qdirtyER"
    const NOT_LIVE: &'static str = "is not a valid qdirty_error";
}

/// What a `*mut qdirty_error` really points to.
pub(crate) struct ErrorObj {
    message: CString,
    hint: Option<CString>,
    errno: c_int,
}

/// An error on its way to C: the message, the hint and the positive errno.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
    pub(crate) errno: c_int,
    /// A NULL argument: the documented no-op of the calls without an error channel.
    pub(crate) null: bool,
}

impl FfiError {
    /// An error with the given errno and message, without hint.
    pub(crate) fn new(errno: c_int, message: impl Into<String>) -> Self {
        FfiError {
            message: message.into(),
            hint: None,
            errno,
            null: false,
        }
    }

    /// `EINVAL` with a message.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// A NULL pointer where an argument was required.
    pub(crate) fn null_arg(what: &str) -> Self {
        FfiError {
            null: true,
            ..Self::invalid(format!("{what} must not be NULL"))
        }
    }

    /// A caught panic.
    pub(crate) fn panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let msg = super::boundary::panic_message(payload);
        Self::new(libc::EIO, format!("internal error (panic): {msg}"))
    }

    /// An image whose mutex was poisoned by an earlier panic.
    pub(crate) fn poisoned() -> Self {
        Self::new(libc::EIO, "image is unusable after an internal error")
    }
}

impl From<crate::Error> for FfiError {
    fn from(e: crate::Error) -> Self {
        let errno = e.errno();
        FfiError {
            message: e.to_string(),
            hint: e.hint().map(str::to_owned),
            errno: if errno > 0 { errno } else { libc::EIO },
            null: false,
        }
    }
}

/// A C string from arbitrary bytes: interior NUL bytes become `\0` (two characters).
pub(crate) fn cstring_lossy(bytes: &[u8]) -> CString {
    match CString::new(bytes) {
        Ok(s) => s,
        Err(_) => {
            let mut v = Vec::with_capacity(bytes.len() + 8);
            for &b in bytes {
                if b == 0 {
                    v.extend_from_slice(b"\\0");
                } else {
                    v.push(b);
                }
            }
            CString::new(v).unwrap_or_default()
        }
    }
}

/// Stores `err` into `*errp`; drops it when `errp` is NULL.
///
/// # Safety
/// `errp` is NULL or points to a writable `qdirty_error *` (which the boundary checked is NULL).
pub(crate) unsafe fn set_error(errp: *mut *mut qdirty_error, err: FfiError) {
    if errp.is_null() {
        return;
    }
    let obj = castable::to_raw::<qdirty_error>(ErrorObj {
        message: cstring_lossy(err.message.as_bytes()),
        hint: err.hint.map(|h| cstring_lossy(h.as_bytes())),
        errno: err.errno,
    });
    // SAFETY: errp is valid for writes (caller's contract).
    unsafe { *errp = obj };
}

/// Borrows the error object behind a non-NULL pointer.
///
/// # Safety
/// `err` is NULL or a live pointer returned through an `errp`.
unsafe fn error_ref<'a>(err: *const qdirty_error) -> Option<&'a ErrorObj> {
    // SAFETY: caller's contract.
    unsafe { castable::peek(err) }
}

/// The error message, a NUL-terminated UTF-8 string (QEMU's wording where QEMU has one).
///
/// Returns: the message, valid until `qdirty_error_free(err)`; NULL if `err` is NULL.
/// Ownership: borrowed from `err`; do not free it.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `err` is NULL or an error returned through an `errp` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_error_message(err: *const qdirty_error) -> *const c_char {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        match unsafe { error_ref(err) } {
            Some(e) => e.message.as_ptr(),
            None => std::ptr::null(),
        }
    })
}

/// A hint that may help the user fix the problem (QEMU's `error_append_hint`), e.g. "Try
/// block-dirty-bitmap-remove to delete this bitmap from disk".
///
/// Returns: the hint, valid until `qdirty_error_free(err)`; NULL if there is none or `err` is
/// NULL.
/// Ownership: borrowed from `err`; do not free it.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `err` is NULL or an error returned through an `errp` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_error_hint(err: *const qdirty_error) -> *const c_char {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        match unsafe { error_ref(err) } {
            Some(e) => e.hint.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
            None => std::ptr::null(),
        }
    })
}

/// The positive errno that best describes the error (EINVAL, ENOENT, EEXIST, EBUSY, EPERM,
/// EROFS, EIO, ENOSPC, ENOTSUP, EFBIG, ...). The failing function returned its negation.
///
/// Returns: the errno; 0 if `err` is NULL.
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `err` is NULL or an error returned through an `errp` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_error_errno(err: *const qdirty_error) -> c_int {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        match unsafe { error_ref(err) } {
            Some(e) => e.errno,
            None => 0,
        }
    })
}

/// Frees an error. NULL is a no-op.
///
/// Ownership: takes `err`; it and the strings borrowed from it are invalid afterwards.
/// Thread safety: may be called from any thread, once per error.
///
/// # Safety
/// `err` is NULL or an error returned through an `errp` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_error_free(err: *mut qdirty_error) {
    ffi_call!({
        // SAFETY: see the function's Safety section.
        let _ = unsafe { castable::take(err, "err") };
    })
}
