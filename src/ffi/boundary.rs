//! The panic and argument boundary: every exported function's body is one `ffi_call!`.
//!
//! `ffi_call!` runs the body inside [`std::panic::catch_unwind`], so no panic ever unwinds into C
//! (since Rust 1.81 that would abort the host process). Two shapes exist:
//!
//! - `ffi_call!(errp = errp, { ... })` for fallible functions with a trailing
//!   `qdirty_error **errp`. The body returns `Result<T, FfiError>`; the macro
//!   1. returns `-EINVAL` / `NULL` without any side effect when `*errp` is already set (a caller
//!      bug, as in QEMU's `Error **` rules),
//!   2. on `Ok(v)` returns `v` converted by [`FfiReturn::success`],
//!   3. on `Err(e)` stores `e` into `*errp` (when `errp` is not NULL) and returns
//!      [`FfiReturn::failure`] (`-errno` or `NULL`),
//!   4. on a panic stores `"internal error (panic): MESSAGE"` (errno `EIO`) and returns the
//!      failure value.
//! - `ffi_call!(errp = errp, release = { ... })` for the functions that release something
//!   (`qdirty_image_close`, `qdirty_txn_abort`): as the first shape, except that the body
//!   always runs; a `*errp` already set only means that the details of a failure are dropped.
//! - `ffi_call!(errp = errp, value = { ... })` for fallible functions whose C return value is
//!   the result itself (`qdirty_bitmap_status`: 1 or 0, `qdirty_bitmap_serialization_size`: a
//!   size): the body returns `Result<T, FfiError>` with `T` the C return type; failures return
//!   `-errno`, as above.
//! - `ffi_call!({ ... })` for infallible-looking functions without `errp` (getters, free
//!   functions). The body returns the value itself; a panic returns [`OnPanic::on_panic`], the
//!   same safe default the function documents for NULL arguments. An error deferred while the
//!   body ran (see [`defer_error`]) goes to the warning handler.
//!
//! A panic while an image's mutex is held poisons it; every later call on that image then fails
//! with "image is unusable after an internal error" instead of touching half-updated state.
//!
//! `tests/exports.rs` parses `src/ffi/*.rs` and fails if an exported function's body is anything
//! other than a single `ffi_call!`.

use std::any::Any;
use std::os::raw::c_int;

use super::error::{qdirty_error, FfiError};

/// The value a function without `errp` returns when its body panicked.
pub(crate) trait OnPanic {
    /// The safe default.
    fn on_panic() -> Self;
}

impl OnPanic for () {
    fn on_panic() -> Self {}
}
impl OnPanic for bool {
    fn on_panic() -> Self {
        false
    }
}
impl OnPanic for u32 {
    fn on_panic() -> Self {
        0
    }
}
impl OnPanic for u64 {
    fn on_panic() -> Self {
        0
    }
}
impl OnPanic for c_int {
    fn on_panic() -> Self {
        0
    }
}
/// `-1` is the "none" value of `qdirty_bitmap_next_dirty` / `_next_zero`.
impl OnPanic for i64 {
    fn on_panic() -> Self {
        -1
    }
}
impl<T> OnPanic for *mut T {
    fn on_panic() -> Self {
        std::ptr::null_mut()
    }
}
impl<T> OnPanic for *const T {
    fn on_panic() -> Self {
        std::ptr::null()
    }
}

/// How a fallible function reports success and failure.
pub(crate) trait FfiReturn: Sized {
    /// What the body produces on success.
    type Ok;
    /// The C return value for success.
    fn success(v: Self::Ok) -> Self;
    /// The C return value for a failure with the given positive errno.
    fn failure(errno: c_int) -> Self;
}

/// `0` on success, `-errno` on failure.
impl FfiReturn for c_int {
    type Ok = ();
    fn success(_: ()) -> Self {
        0
    }
    fn failure(errno: c_int) -> Self {
        -errno
    }
}

/// A created object on success, `NULL` on failure.
impl<T> FfiReturn for *mut T {
    type Ok = *mut T;
    fn success(v: *mut T) -> Self {
        v
    }
    fn failure(_: c_int) -> Self {
        std::ptr::null_mut()
    }
}

/// A C return value that is itself the result on success (`1`/`0`, a size) and `-errno` on
/// failure: the functions using `ffi_call!(errp = errp, value = { ... })`.
pub(crate) trait FfiValue: Sized {
    /// The C return value for a failure with the given positive errno.
    fn failure(errno: c_int) -> Self;
}
impl FfiValue for c_int {
    fn failure(errno: c_int) -> Self {
        -errno
    }
}
impl FfiValue for i64 {
    fn failure(errno: c_int) -> Self {
        -i64::from(errno)
    }
}

/// The [`FfiReturn`] of a [`FfiValue`]: the body's value on success, `-errno` on failure.
pub(crate) struct Value<T>(pub(crate) T);

impl<T: FfiValue> FfiReturn for Value<T> {
    type Ok = T;
    fn success(v: T) -> Self {
        Value(v)
    }
    fn failure(errno: c_int) -> Self {
        Value(T::failure(errno))
    }
}

/// Whether the caller passed an `errp` whose `*errp` is already set.
///
/// # Safety
/// `errp` is NULL or points to a readable `qdirty_error *`.
pub(crate) unsafe fn errp_in_use(errp: *mut *mut qdirty_error) -> bool {
    // SAFETY: the caller guarantees errp is NULL or valid for reads.
    !errp.is_null() && unsafe { !(*errp).is_null() }
}

thread_local! {
    /// An error found after the body's result was decided (durable mode's store when the image
    /// lock is released, see `handle::ImageGuard`): it becomes the call's error.
    static DEFERRED: std::cell::RefCell<Option<FfiError>> = const { std::cell::RefCell::new(None) };
}

/// How many threads hold a deferred error: every call's way out reads this one global (a
/// thread-local lookup is a library call in a shared object), and looks at its own thread's
/// error only when some thread has one.
static DEFERRED_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records an error for the current call to return instead of success.
pub(crate) fn defer_error(e: FfiError) {
    DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(e);
            DEFERRED_THREADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
}

/// Takes the deferred error of the current call.
#[inline]
pub(crate) fn take_deferred() -> Option<FfiError> {
    if DEFERRED_THREADS.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        return None;
    }
    let e = DEFERRED.with(|d| d.borrow_mut().take());
    if e.is_some() {
        DEFERRED_THREADS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    e
}

/// The answer of a call without an error channel: the value, or on failure the default its
/// documentation gives. A NULL argument is the documented no-op; any other failure (a bitmap
/// that no longer exists, a pointer that is not a live object, an image unusable after an
/// internal error) also goes to the warning handler: the default says nothing about the disk,
/// and a host reading through a stale handle must learn it.
pub(crate) fn or_default<T>(r: Result<T, FfiError>, default: T) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            if !e.null {
                crate::warning::warn(&format!(
                    "{} (a call without an error channel gave its default answer)",
                    e.message
                ));
            }
            default
        }
    }
}

/// A function without `errp` has no error channel for a deferred error: it goes to the warning
/// handler, and never to the next call on the thread.
#[inline]
pub(crate) fn warn_deferred() {
    if let Some(e) = take_deferred() {
        crate::warning::warn(&e.message);
    }
}

/// Turns the outcome of an `ffi_call!(errp = ..)` body into the C return value.
///
/// `outcome` is `None` when `*errp` was already set on entry: nothing is stored then.
///
/// # Safety
/// `errp` is NULL or points to a writable `qdirty_error *`.
pub(crate) unsafe fn finish<R: FfiReturn>(
    errp: *mut *mut qdirty_error,
    outcome: std::thread::Result<Option<Result<R::Ok, FfiError>>>,
) -> R {
    let deferred = take_deferred();
    let err = match outcome {
        Ok(None) => return R::failure(libc::EINVAL),
        Ok(Some(Ok(v))) => match deferred {
            None => return R::success(v),
            Some(e) => e,
        },
        Ok(Some(Err(e))) => e,
        Err(payload) => FfiError::panic(payload),
    };
    let errno = err.errno;
    // SAFETY: forwarded from the caller.
    unsafe { super::error::set_error(errp, err) };
    R::failure(errno)
}

/// The text of a panic payload; drops the payload without letting a second panic escape.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    };
    if let Err(again) =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(payload)))
    {
        // A payload whose destructor panics: leak the second payload rather than unwind.
        std::mem::forget(again);
    }
    msg
}

/// Drops the payload of a panic caught in a function without `errp`.
pub(crate) fn discard_panic(payload: Box<dyn Any + Send>) {
    let _ = panic_message(payload);
}

/// Wraps the body of every exported function: see the module docs.
macro_rules! ffi_call {
    (errp = $errp:expr, value = $body:block) => {{
        let __errp: *mut *mut $crate::ffi::error::qdirty_error = $errp;
        let __outcome = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| {
            // SAFETY: errp is NULL or valid (documented precondition of every function).
            if unsafe { $crate::ffi::boundary::errp_in_use(__errp) } {
                return None;
            }
            let __body = || -> ::std::result::Result<_, $crate::ffi::error::FfiError> { $body };
            Some(__body())
        }));
        // SAFETY: as above.
        unsafe {
            $crate::ffi::boundary::finish::<$crate::ffi::boundary::Value<_>>(__errp, __outcome)
        }
        .0
    }};
    (errp = $errp:expr, release = $body:block) => {{
        // A release always happens: with `*errp` already set, the details of a failure are
        // dropped instead of stored (as with `errp` NULL).
        let __given: *mut *mut $crate::ffi::error::qdirty_error = $errp;
        // SAFETY: errp is NULL or valid (documented precondition of every function).
        let __errp = if unsafe { $crate::ffi::boundary::errp_in_use(__given) } {
            ::std::ptr::null_mut()
        } else {
            __given
        };
        let __outcome = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| {
            let __body = || -> ::std::result::Result<_, $crate::ffi::error::FfiError> { $body };
            Some(__body())
        }));
        // SAFETY: as above.
        unsafe { $crate::ffi::boundary::finish(__errp, __outcome) }
    }};
    (errp = $errp:expr, $body:block) => {{
        let __errp: *mut *mut $crate::ffi::error::qdirty_error = $errp;
        let __outcome = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| {
            // SAFETY: errp is NULL or valid (documented precondition of every function).
            if unsafe { $crate::ffi::boundary::errp_in_use(__errp) } {
                return None;
            }
            let __body = || -> ::std::result::Result<_, $crate::ffi::error::FfiError> { $body };
            Some(__body())
        }));
        // SAFETY: as above.
        unsafe { $crate::ffi::boundary::finish(__errp, __outcome) }
    }};
    ($body:block) => {{
        let __r = match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(payload) => {
                $crate::ffi::boundary::discard_panic(payload);
                $crate::ffi::boundary::OnPanic::on_panic()
            }
        };
        $crate::ffi::boundary::warn_deferred();
        __r
    }};
}
pub(crate) use ffi_call;
