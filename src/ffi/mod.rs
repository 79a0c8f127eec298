//! The C ABI of qdirty, declared in `include/qdirty.h` (generated from these sources by
//! cbindgen: `cbindgen --quiet --config cbindgen.toml --output include/qdirty.h src/ffi/mod.rs`,
//! or `QDIRTY_BLESS=1 cargo test --test header`).
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
//! | `qdirty_image` (standalone) | owned by the caller | `qdirty_image_new_memory` | `qdirty_image_close` |
//! | `qdirty_bitmap` | borrowed from its image | `_first_bitmap`, `_next`, `_find_bitmap`, `_add_bitmap`, `_create_bitmap`, `_create_successor`, `_abdicate`, `qdirty_txn_add_bitmap` | closing the image; once its bitmap is gone (removed, released, abdicated, reclaimed, removed by a txn) every call on it fails with ENOENT |
//! | `qdirty_backup` | owned by the caller | `qdirty_bitmap_clear_with_backup`, `qdirty_bitmap_merge` | `qdirty_backup_free` (NULL ok) |
//! | `qdirty_iter` | owned by the caller; its image must outlive it | `qdirty_bitmap_iter_new` | `qdirty_iter_free` (NULL ok) |
//! | `qdirty_bitmap_info[]` | owned by the caller | `qdirty_image_query_bitmaps` | `qdirty_bitmap_info_free` (NULL ok) |
//! | `qdirty_txn` | owned by the caller; its images must outlive it | `qdirty_txn_new` | `qdirty_txn_free` (NULL ok; aborts prepared actions) |
//! | `qdirty_error` | owned by the caller | any failing call with `errp` | `qdirty_error_free` (NULL ok) |
//! | `char *` from `qdirty_bitmap_sha256`, `qdirty_image_broken_bitmap` | owned by the caller | | `qdirty_string_free` (NULL ok) |
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
//!   without doing anything, leaving `*errp` as it was. Functions that release something
//!   (`qdirty_image_close`, `qdirty_txn_abort`, every `*_free`) release it all the same; they
//!   only drop the details of a failure then.
//! - Reads never answer "clean" for a bitmap they cannot read: the calls with an error channel
//!   fail (inconsistent bitmap: EINVAL with QEMU's message and hint; unreadable data: EIO,
//!   retried at the next use); the getters without one (`qdirty_bitmap_count`, `_get`,
//!   `_next_dirty`, `_next_zero`, `_next_dirty_area`) answer as if every granule were dirty.
//!   `qdirty_bitmap_dirty_extents` is the read a backup tool uses.
//! - In a child process after `fork`, only `qdirty_image_close` (which then frees memory and
//!   touches neither the file nor the locks shared with the parent) may be called on the
//!   parent's images.
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
//!   bitmaps) are serialized by an internal lock, except the write hook, which takes none.
//!   Errors are plain immutable objects.
//!
//! # Thread-safety contract
//!
//! - Every call that takes an image, a bitmap, an iterator or a transaction locks the image(s)
//!   concerned for its whole duration; each call is atomic with respect to the others on the
//!   same image. No call holds a lock when it returns.
//! - The write hook `qdirty_image_set_dirty` takes no lock and allocates nothing in the steady
//!   state: it ORs the range into the image's write log with atomic word operations, whatever
//!   the number of bitmaps. It may run from any number of I/O threads concurrently with each
//!   other and with management calls (add, remove, merge, query, iterate, successors,
//!   transactions, store, truncate) on the same image. Every call that locks the image first
//!   applies the logged writes to the bitmaps recording at that moment, so QEMU's ordering
//!   holds: a write whose hook call returned before a management call started is in every
//!   bitmap that was enabled then (and so is seen by that call); a write whose hook call
//!   started after a management call returned is recorded according to the state that call
//!   left. A write concurrent with a management call is applied to each granule either before
//!   or after it, never lost and never misplaced.
//! - `qdirty_image_close` must not race with the write hook: the caller stops I/O on the image
//!   (and waits for hook calls in flight to return) before closing it; the final store
//!   includes every write whose hook call returned before the close started.
//! - Calls that touch two or more images (`qdirty_image_merge_bitmap`, `qdirty_bitmap_merge`,
//!   `qdirty_txn_merge_bitmap`, `qdirty_txn_commit`, `qdirty_txn_abort`, `qdirty_txn_free`)
//!   lock them in address order, each once, so they never deadlock each other.
//! - `qdirty_iter` and `qdirty_txn` are not thread-safe objects: one thread at a time may use a
//!   given iterator or transaction (the caller serializes), although each of their calls
//!   locks the image as above. Likewise a `qdirty_backup` and a `qdirty_bitmap_info` array.
//! - Freeing a handle (`qdirty_image_close`, `qdirty_bitmap_release`, `_abdicate`'s parent,
//!   `_reclaim`'s successor, `qdirty_iter_free`, `qdirty_txn_free`, ...) must not race with
//!   any other use of that handle: the caller serializes destruction against use.
//! - Check-then-act sequences across calls (e.g. `qdirty_bitmap_check`, then an operation) are
//!   not atomic: another thread may change the state in between.
//! - The warning handler may be called from any thread that calls into qdirty, with an image
//!   lock held: it must not call qdirty.
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
// The symbol version of each export (src/ffi/qdirty.map).
mod symbol_versions;
// Process-wide: the version, strings returned by qdirty, the warning handler.
mod global;
// The error object.
mod error;
// The casts between C pointers and Rust objects, for every object type.
mod castable;
// The image and bitmap handles.
mod handle;
// qdirty_image_*.
mod image;
// qdirty_bitmap_*.
mod bitmap;
// The mirror of QEMU's dirty-bitmap API: state flags and check.
mod bitmap_state;
// Low-level create/release and successors.
mod successor;
// Clear/merge with a backup, restore, merge of any two bitmaps.
mod backup;
// Iterators and status.
mod iter;
// Serialization for migration streams.
mod serialize;
// Query snapshot.
mod query;
// Space a store needs.
mod store_space;
// Salvage: broken bitmaps, dropping the bitmaps extension.
mod salvage;
// Operations on the image as a block node (QEMU: bdrv_*): standalone images, reopen, truncate,
// default granularity, readonly bitmaps, removal of a stored copy.
mod node;
// Transactions.
mod txn;
// The embedding interface: qdirty_io_ops, qdirty_image_open_with_io.
mod io;
// The ABI version (the soname's number) and the release version.
mod version;

/// `qdirty_image_open` flag: open the image read-write. Without it the image is opened
/// read-only and nothing is ever written to it.
pub const QDIRTY_OPEN_RDWR: u32 = 1u32;

/// `qdirty_image_open` flag: QEMU's force-share (`qemu-img -U`): a read-only open that takes no
/// image locks, to look at an image another process (QEMU) is using. Not allowed with
/// QDIRTY_OPEN_RDWR. Without it, qdirty takes the same OFD locks as QEMU and the open fails
/// with -EAGAIN while QEMU uses the image in a conflicting way.
pub const QDIRTY_OPEN_FORCE_SHARE: u32 = 2u32;

/// `qdirty_image_open` flag: salvage mode, for images QEMU refuses to open because of a broken
/// bitmap directory entry or table (reserved flag bits, bad granularity, bad table entries, a
/// wrong table size, ...). Such an entry does not fail the open: it becomes a *broken bitmap*,
/// listed by `qdirty_image_broken_bitmap_count` / `qdirty_image_broken_bitmap` with the reason
/// QEMU refuses it, never loaded, and removable only (`qdirty_image_remove_broken_bitmap`, with
/// QDIRTY_OPEN_RDWR; its clusters are leaked, never freed). The valid bitmaps load normally.
/// QEMU keeps refusing the image (a store writes broken entries back as they are) until every
/// broken bitmap is removed. A directory broken as a whole (its size, count or walk, the
/// extension's fields) still fails the open, with a message naming
/// `qdirty_image_drop_bitmaps_extension`. May be combined with the other flags.
pub const QDIRTY_OPEN_SALVAGE: u32 = 4u32;

/// `qdirty_image_open` / `qdirty_image_open_with_io` flag, with QDIRTY_OPEN_RDWR: durable mode.
/// The bitmaps are never marked in_use in the image: at every instant they are valid QEMU
/// bitmaps, each enabled one dirty wherever a guest write may have reached the disk since its
/// last clear, so that after a crash (process killed, power lost) QEMU and qdirty load them as
/// consistent. The host calls `qdirty_image_prepare_write` before issuing each guest write and
/// `qdirty_image_set_dirty` when it completes; every call that changes bitmaps (add, remove,
/// clear, enable, disable, merge, a committed transaction, ...) is stored before it returns.
/// Every bitmap's data is read at open. Zones are 16 MiB (`qdirty_image_open_durable` sets
/// another size). See README.md, 'Durable mode'.
pub const QDIRTY_OPEN_DURABLE: u32 = 8u32;

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
pub use global::{
    qdirty_set_warning_handler, qdirty_string_free, qdirty_version, qdirty_version_number,
    qdirty_warning_fn,
};
pub use handle::{qdirty_bitmap, qdirty_image};
pub use version::{
    QDIRTY_ABI_MAJOR, QDIRTY_VERSION_MAJOR, QDIRTY_VERSION_MINOR, QDIRTY_VERSION_NUMBER,
    QDIRTY_VERSION_PATCH,
};

pub use image::{
    qdirty_image_add_bitmap, qdirty_image_close, qdirty_image_create, qdirty_image_find_bitmap,
    qdirty_image_first_bitmap, qdirty_image_merge_bitmap, qdirty_image_open,
    qdirty_image_open_durable, qdirty_image_prepare_write, qdirty_image_read_only,
    qdirty_image_remove_bitmap, qdirty_image_set_dirty, qdirty_image_size,
    qdirty_image_store_bitmaps, qdirty_image_zone_bytes,
};

pub use bitmap::{
    qdirty_bitmap_clear, qdirty_bitmap_count, qdirty_bitmap_disable, qdirty_bitmap_enable,
    qdirty_bitmap_enabled, qdirty_bitmap_get, qdirty_bitmap_granularity,
    qdirty_bitmap_inconsistent, qdirty_bitmap_name, qdirty_bitmap_next, qdirty_bitmap_next_dirty,
    qdirty_bitmap_next_dirty_area, qdirty_bitmap_next_zero, qdirty_bitmap_persistent,
    qdirty_bitmap_readonly, qdirty_bitmap_reset_dirty, qdirty_bitmap_set_dirty,
    qdirty_bitmap_sha256, qdirty_bitmap_size,
};
pub use bitmap::{qdirty_bitmap_dirty_extents, qdirty_extent};

pub use bitmap_state::{
    qdirty_bitmap_busy, qdirty_bitmap_check, qdirty_bitmap_has_successor, qdirty_bitmap_recording,
    qdirty_bitmap_set_busy, qdirty_bitmap_set_inconsistent, qdirty_bitmap_set_persistence,
    qdirty_bitmap_set_readonly, qdirty_bitmap_set_skip_store, qdirty_bitmap_skip_store,
    QDIRTY_CHECK_ALLOW_RO, QDIRTY_CHECK_BUSY, QDIRTY_CHECK_DEFAULT, QDIRTY_CHECK_INCONSISTENT,
    QDIRTY_CHECK_RO,
};

pub use successor::{
    qdirty_bitmap_abdicate, qdirty_bitmap_create_successor, qdirty_bitmap_enable_successor,
    qdirty_bitmap_reclaim, qdirty_bitmap_release, qdirty_image_create_bitmap,
};

pub use backup::{
    qdirty_backup, qdirty_backup_free, qdirty_bitmap_clear_with_backup, qdirty_bitmap_merge,
    qdirty_bitmap_restore,
};

pub use iter::{
    qdirty_bitmap_iter_new, qdirty_bitmap_status, qdirty_iter, qdirty_iter_free, qdirty_iter_next,
    qdirty_iter_seek,
};

pub use serialize::{
    qdirty_bitmap_deserialize_finish, qdirty_bitmap_deserialize_ones,
    qdirty_bitmap_deserialize_part, qdirty_bitmap_deserialize_zeroes,
    qdirty_bitmap_serialization_align, qdirty_bitmap_serialization_size,
    qdirty_bitmap_serialize_part,
};

pub use query::{qdirty_bitmap_info, qdirty_bitmap_info_free, qdirty_image_query_bitmaps};

pub use store_space::qdirty_image_store_space;

pub use salvage::{
    qdirty_image_broken_bitmap, qdirty_image_broken_bitmap_count,
    qdirty_image_drop_bitmaps_extension, qdirty_image_remove_broken_bitmap,
};

pub use node::{
    qdirty_image_default_granularity, qdirty_image_has_readonly_bitmaps, qdirty_image_new_memory,
    qdirty_image_remove_stored_bitmap, qdirty_image_reopen, qdirty_image_truncate,
};

pub use txn::{
    qdirty_txn, qdirty_txn_abort, qdirty_txn_add_bitmap, qdirty_txn_clear_bitmap,
    qdirty_txn_commit, qdirty_txn_disable_bitmap, qdirty_txn_enable_bitmap, qdirty_txn_free,
    qdirty_txn_merge_bitmap, qdirty_txn_new, qdirty_txn_remove_bitmap,
};

pub use io::{qdirty_image_open_with_io, qdirty_io_ops};
