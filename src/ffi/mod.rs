//! The C ABI of qdirty, declared in `include/qdirty.h` (generated from these sources by
//! cbindgen: `cbindgen --quiet --output include/qdirty.h`, or `QDIRTY_BLESS=1 cargo test --test
//! header`).
//!
//! This module is the only place with `#[no_mangle]` and `unsafe`. Each exported function is a
//! few lines of marshalling around the safe Rust API ([`crate::image::Image`],
//! [`crate::DirtyBitmap`]).
//!
//! # Objects
//!
//! | C type | ownership | created by | destroyed by |
//! |---|---|---|---|
//! | `qdirty_image` | owned by the caller | `qdirty_image_open` | `qdirty_image_close` (always frees) |
//! | `qdirty_bitmap` | borrowed from its image | `_first_bitmap`, `_next`, `_find_bitmap`, `_add_bitmap` | `qdirty_image_remove_bitmap` or closing the image |
//! | `qdirty_error` | owned by the caller | any failing call with `errp` | `qdirty_error_free` (NULL ok) |
//! | `char *` from `qdirty_bitmap_sha256` | owned by the caller | | `qdirty_string_free` (NULL ok) |
//!
//! # Conventions
//!
//! - A function that creates something returns a pointer, NULL on failure.
//! - Any other fallible function returns 0 or a negative errno (-EINVAL, -ENOENT, -EEXIST, -EBUSY,
//!   -EPERM, -EROFS, -EIO, -ENOSPC, -ENOTSUP, -EFBIG, ...).
//! - Fallible functions take `qdirty_error **errp` last, with QEMU's `Error **` rules: `errp` may
//!   be NULL (the details are dropped); on failure `*errp` receives a new error that the caller
//!   frees with `qdirty_error_free`; on success `*errp` is not touched. `*errp` must be NULL on
//!   entry: a non-NULL `*errp` is a caller bug, and the call then returns -EINVAL (or NULL)
//!   without doing anything, leaving `*errp` as it was.
//! - A NULL or invalid argument never crashes. Fallible functions report it as EINVAL with a
//!   message; getters without `errp` return a documented default (NULL, 0, false or -1).
//! - Flags are `uint32_t` checked against the known bits; unknown bits fail with EINVAL.
//! - Strings from C are NUL-terminated byte strings: bitmap names are bytes (QEMU does not
//!   require UTF-8), paths are bytes.
//! - No panic crosses the ABI: a bug inside qdirty becomes an error "internal error (panic):
//!   ..." with errno EIO (see `boundary`), and an image whose lock was held at that moment
//!   becomes unusable ("image is unusable after an internal error") rather than exposing
//!   half-updated state.
//! - Images and bitmaps may be used from several threads: calls on one image (and on its
//!   bitmaps) are serialized by an internal lock. Errors are plain immutable objects.
//! - Warnings that are not errors (QEMU's `warn_report`) go to the handler installed with
//!   `qdirty_set_warning_handler`, or to stderr.
//!
//! # The exported functions
//!
//! The `pub use` list below is the ABI: a diff of it is a diff of the exported symbols
//! (the constants above and the functions re-exported below, nothing else).
//! `tests/exports.rs` checks that the header declares exactly the symbols the cdylib exports and
//! that every exported body is wrapped by the panic boundary.

// The declaration order is the order of the header's sections (cbindgen's sort_by = "None").
pub(crate) mod boundary;
// Version, strings, warnings.
mod misc;
// The error object.
mod error;
// The handle types.
mod handle;
// qdirty_image_*.
mod image;
// qdirty_bitmap_*.
mod bitmap;
// The embedding interface: qdirty_io_ops, qdirty_image_open_with_io.
mod io;
// The ABI version (the soname's number).
mod version;

/// `qdirty_image_open` flag: open the image read-write. Without it the image is opened
/// read-only and nothing is ever written to it.
pub const QDIRTY_OPEN_RDWR: u32 = 1u32;

/// `qdirty_image_add_bitmap` flag: the bitmap is persistent (stored in the image on close).
pub const QDIRTY_BITMAP_PERSISTENT: u32 = 1u32;

/// `qdirty_image_add_bitmap` flag: the bitmap is created disabled (not recording writes).
pub const QDIRTY_BITMAP_DISABLED: u32 = 2u32;

/// `qdirty_image_add_bitmap` flag: QEMU's deprecated `autoload` option. Accepted, its value is
/// ignored, and the warning "Autoload option is deprecated and its value is ignored" is
/// delivered to the warning handler. Whether a bitmap loads enabled depends only on whether it
/// was enabled when stored.
pub const QDIRTY_BITMAP_AUTOLOAD: u32 = 4u32;

pub use error::{
    qdirty_error, qdirty_error_errno, qdirty_error_free, qdirty_error_hint, qdirty_error_message,
};
pub use handle::{qdirty_bitmap, qdirty_image};
pub use misc::{qdirty_set_warning_handler, qdirty_string_free, qdirty_version, qdirty_warning_fn};
pub use version::QDIRTY_ABI_MAJOR;

pub use image::{
    qdirty_image_add_bitmap, qdirty_image_close, qdirty_image_create, qdirty_image_find_bitmap,
    qdirty_image_first_bitmap, qdirty_image_merge_bitmap, qdirty_image_open,
    qdirty_image_read_only, qdirty_image_remove_bitmap, qdirty_image_set_dirty, qdirty_image_size,
    qdirty_image_store_bitmaps,
};

pub use bitmap::{
    qdirty_bitmap_clear, qdirty_bitmap_count, qdirty_bitmap_disable, qdirty_bitmap_enable,
    qdirty_bitmap_enabled, qdirty_bitmap_get, qdirty_bitmap_granularity,
    qdirty_bitmap_inconsistent, qdirty_bitmap_name, qdirty_bitmap_next, qdirty_bitmap_next_dirty,
    qdirty_bitmap_next_dirty_area, qdirty_bitmap_next_zero, qdirty_bitmap_persistent,
    qdirty_bitmap_readonly, qdirty_bitmap_reset_dirty, qdirty_bitmap_set_dirty,
    qdirty_bitmap_sha256, qdirty_bitmap_size,
};

pub use io::{qdirty_image_open_with_io, qdirty_io_ops};
