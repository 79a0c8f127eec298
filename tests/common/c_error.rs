//! Errors of the C ABI in tests: taking one apart (and freeing it), and failing the test with
//! the message when a call did not succeed.

use std::ffi::CStr;

use qdirty::ffi::{
    qdirty_error, qdirty_error_errno, qdirty_error_free, qdirty_error_hint, qdirty_error_message,
};

/// The errno, message and hint of `err`, which is freed; `(0, "(no error)", None)` for NULL.
pub fn take(err: *mut qdirty_error) -> (i32, String, Option<String>) {
    if err.is_null() {
        return (0, "(no error)".into(), None);
    }
    // SAFETY: err came from an errp and is freed once, here.
    unsafe {
        let m = CStr::from_ptr(qdirty_error_message(err))
            .to_string_lossy()
            .into_owned();
        let hint = qdirty_error_hint(err);
        let hint = (!hint.is_null()).then(|| CStr::from_ptr(hint).to_string_lossy().into_owned());
        let e = qdirty_error_errno(err);
        qdirty_error_free(err);
        (e, m, hint)
    }
}

/// The message of `err`, which must be set (a failure reports one), and is freed.
pub fn message(err: *mut qdirty_error) -> String {
    assert!(!err.is_null(), "a failure without an error object");
    take(err).1
}

/// Panics with the error's message unless the call succeeded: `rc` 0 and no error set.
pub fn ok(rc: i32, err: *mut qdirty_error, what: &str) {
    if rc != 0 || !err.is_null() {
        panic!("{what} failed: rc {rc}: {}", take(err).1);
    }
}

/// `p`, or a panic with the error's message when the call returned NULL.
pub fn nonnull<T>(p: *mut T, err: *mut qdirty_error, what: &str) -> *mut T {
    if p.is_null() {
        panic!("{what} failed: NULL: {}", take(err).1);
    }
    p
}
