//! qdirty: QEMU-compatible persistent dirty bitmaps for qcow2 images.
//!
//! A host that serves a guest's disk from a qcow2 image (a VMM, a storage daemon, a backup tool)
//! records which blocks the guest writes in *dirty bitmaps*, stored in the image the way QEMU
//! stores them, so that QEMU, `qemu-img` and qdirty read each other's bitmaps. An incremental
//! backup copies the blocks a bitmap marks, then starts a new bitmap.
//!
//! ```
//! use qdirty::{AddOptions, Image};
//!
//! # let dir = std::env::temp_dir().join(format!("qdirty-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("disk.qcow2");
//! # let _ = std::fs::remove_file(&path);
//! Image::create(&path, 1 << 30, 0)?; // 1 GiB, 64 KiB clusters
//!
//! // Open read-write, with QEMU's image locks: this fails while QEMU uses the image.
//! let mut image = Image::open(&path, true)?;
//!
//! // Add a bitmap stored in the image (QMP block-dirty-bitmap-add), at the default
//! // granularity (64 KiB).
//! let persistent = AddOptions { persistent: true, ..AddOptions::default() };
//! let id = image.add_bitmap(b"backup-1", 0, persistent)?;
//!
//! // The guest write hook: lock-free, for any number of I/O threads.
//! let hook = image.write_hook();
//! std::thread::scope(|s| {
//!     s.spawn(|| hook.set(4096, 512));
//!     s.spawn(|| hook.set(1 << 20, 128 << 10));
//! });
//!
//! // The extents an incremental backup copies: (offset, length) in bytes, whole granules.
//! let bitmap = image.bitmap_current(id)?;
//! let extents: Vec<(u64, u64)> = bitmap.dirty_runs(0, bitmap.size())?.collect();
//! assert_eq!(extents, [(0, 64 << 10), (1 << 20, 128 << 10)]);
//!
//! // Close: the bitmap is stored, and `qemu-img info` lists it.
//! image.close()?;
//!
//! let mut image = Image::open(&path, false)?;
//! let id = image.find_bitmap(b"backup-1").expect("stored");
//! assert_eq!(image.bitmap_current(id)?.count(), (64 + 128) << 10);
//! # drop(image);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`OpenOptions`] opens with QEMU's other flags (force-share, salvage) or over any
//! [`Storage`](image::storage::Storage) of the host's.
//!
//! # Modules
//!
//! - [`image`]: qcow2 images: open, load, store, add, remove, merge, transactions, with QEMU's
//!   semantics and write order.
//! - [`bitmap`]: the in-memory dirty bitmap (QEMU's `BdrvDirtyBitmap` state model) and the
//!   write hook.
//! - [`error`], [`warning`]: the error type, and warnings that are not errors.
//!
//! The C ABI (`include/qdirty.h`, `libqdirty.so`) is built from the same crate; its
//! documentation is the header. The qcow2 byte codecs (`format`) are internal.
//!
//! `unsafe` code lives only in the C ABI (`ffi`), in the operating-system calls (`sys`: OFD
//! locks, membarrier) and in the write log's memory reclamation (`qsbr`); `format`, `bitmap`
//! and `image` deny it.
#![deny(missing_docs)]

pub mod bitmap;
pub mod error;
// The C ABI: its documentation is include/qdirty.h (generated from it by cbindgen, which reads
// only this module: see cbindgen.toml).
#[doc(hidden)]
pub mod ffi;
// The qcow2 codecs, public for the fuzz targets (fuzz/) only.
#[doc(hidden)]
pub mod format;
pub mod image;
pub mod warning;

mod qsbr;
mod sys;

pub use bitmap::DirtyBitmap;
pub use error::{Error, Result};
pub use image::{AddOptions, BitmapId, Image, OpenOptions};

/// The library version (Cargo package version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
