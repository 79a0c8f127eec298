//! Version, strings returned by qdirty, and the warning handler.

use std::ffi::{c_void, CString};
use std::os::raw::c_char;

use super::boundary::ffi_call;
use super::error::cstring_lossy;
use super::version::QDIRTY_VERSION_NUMBER;

super::symbol_versions::symbol_versions!("global");

/// The library version with its NUL terminator.
static VERSION_CSTR: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// A function that receives qdirty's warnings (QEMU's `warn_report`), e.g. "Autoload option is
/// deprecated and its value is ignored".
///
/// `message` is a NUL-terminated string without the "qdirty: warning: " prefix, valid only
/// during the call. `opaque` is the pointer given to `qdirty_set_warning_handler`.
/// The handler may be called from any thread that calls into qdirty, while qdirty holds the
/// lock of the image concerned: it must not call qdirty functions itself.
#[allow(non_camel_case_types)]
pub type qdirty_warning_fn =
    Option<unsafe extern "C" fn(message: *const c_char, opaque: *mut c_void)>;

/// The library version, e.g. "0.1.0".
///
/// Returns: a static NUL-terminated string; never NULL.
/// Ownership: static; do not free it.
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn qdirty_version() -> *const c_char {
    ffi_call!({ VERSION_CSTR.as_ptr().cast::<c_char>() })
}

/// The library version as one number, MAJOR * 10000 + MINOR * 100 + PATCH (100 for "0.1.0"):
/// the `QDIRTY_VERSION_NUMBER` of the library running, to compare with the header's, e.g.
/// `qdirty_version_number() >= 200` before using what 0.2.0 added.
///
/// Returns: the version number; never fails.
/// Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn qdirty_version_number() -> u32 {
    ffi_call!({ QDIRTY_VERSION_NUMBER })
}

/// Frees a string returned by qdirty (e.g. by `qdirty_bitmap_sha256`). NULL is a no-op.
///
/// Ownership: takes `s`. Only strings documented as "free with qdirty_string_free" may be
/// passed; strings borrowed from objects (names, messages) must not.
/// Thread safety: may be called from any thread, once per string.
///
/// # Safety
/// `s` is NULL or a string returned by qdirty for freeing with this function, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn qdirty_string_free(s: *mut c_char) {
    ffi_call!({
        if !s.is_null() {
            // SAFETY: the string came from CString::into_raw and is freed once.
            drop(unsafe { CString::from_raw(s) });
        }
    })
}

/// Installs the process-wide warning handler. `handler` NULL restores the default, which prints
/// "qdirty: warning: MESSAGE" on stderr.
///
/// `opaque` is passed back to every call of `handler`; qdirty never dereferences it.
/// Ownership: qdirty keeps `handler` and `opaque` until the next call of this function; the caller
/// keeps whatever `opaque` points to alive until then.
/// Thread safety: may be called from any thread; `handler` may be called from any thread that
/// calls into qdirty, concurrently, and must not call qdirty functions itself.
///
/// # Safety
/// `handler`, when not NULL, is a valid function of type `qdirty_warning_fn` that can be called
/// with `opaque` from any thread until it is replaced.
#[no_mangle]
pub unsafe extern "C" fn qdirty_set_warning_handler(
    handler: qdirty_warning_fn,
    opaque: *mut c_void,
) {
    ffi_call!({
        let boxed = handler.map(|f| {
            let target = CHandler { f, opaque };
            Box::new(move |msg: &str| target.call(msg)) as Box<dyn Fn(&str) + Send + Sync>
        });
        crate::warning::set_warning_handler(boxed);
    })
}

/// A C warning handler and its opaque pointer.
struct CHandler {
    f: unsafe extern "C" fn(*const c_char, *mut c_void),
    opaque: *mut c_void,
}

// SAFETY: the caller of qdirty_set_warning_handler promises that the function may be called
// with `opaque` from any thread; qdirty itself never dereferences `opaque`.
unsafe impl Send for CHandler {}
// SAFETY: as above; calls through a shared reference only read the two fields.
unsafe impl Sync for CHandler {}

impl CHandler {
    fn call(&self, msg: &str) {
        let text = cstring_lossy(msg.as_bytes());
        // SAFETY: see the Send/Sync justification; `text` outlives the call.
        unsafe { (self.f)(text.as_ptr(), self.opaque) };
    }
}
