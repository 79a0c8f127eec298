//! qdirty: QEMU-compatible persistent dirty bitmaps for qcow2 images.
//!
//! Layers, bottom up:
//! - [`format`]: pure byte codecs of the qcow2 structures (header, extensions, bitmap directory,
//!   bitmap tables, refcounts), with every check QEMU makes.
//! - [`bitmap`]: the in-memory dirty bitmap (QEMU's `BdrvDirtyBitmap` state model over a
//!   hierarchical bitmap engine).
//! - [`image`]: qcow2 images over a [`image::storage::Storage`]: open, load, store, add, remove,
//!   merge, with QEMU's semantics and write order.
//! - `ffi`: the C ABI (`include/qdirty.h`).
//!
//! `format`, `bitmap` and `image` deny `unsafe` code: it lives only in the C ABI (`ffi`), in the
//! operating-system calls (`sys`: OFD locks, membarrier) and in the write log's memory
//! reclamation (`qsbr`).

// `cbindgen:ignore` keeps the internals' constants out of include/qdirty.h: only `ffi` is C ABI.
/// cbindgen:ignore
pub mod bitmap;
/// cbindgen:ignore
pub mod error;
pub mod ffi;
/// cbindgen:ignore
pub mod format;
/// cbindgen:ignore
pub mod image;
/// cbindgen:ignore
pub mod warning;

mod qsbr;
mod sys;

pub use bitmap::DirtyBitmap;
pub use error::{Error, Result};
pub use image::{AddOptions, BitmapId, Image, OpenOptions};

/// The library version (Cargo package version).
///
/// cbindgen:ignore
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
