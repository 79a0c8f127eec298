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

pub mod bitmap;
pub mod error;
pub mod ffi;
pub mod format;
pub mod image;
pub mod warning;

pub use bitmap::DirtyBitmap;
pub use error::{Error, Result};
pub use image::{AddOptions, BitmapId, Image};

/// The library version (Cargo package version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
