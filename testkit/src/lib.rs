//! Test support shared by qdirty's tests (`tests/`), the command's tests (`cli/tests/`), the
//! benchmarks and the fuzz targets. Not published.
//!
//! Everything QEMU says about an image is asked from QEMU's own tools: `qemu-img`, `qemu-io`,
//! `qemu-nbd` + `nbdinfo` (exact dirty extents), and `qemu-storage-daemon` over QMP (bitmap
//! SHA-256). Nothing here depends on files outside the repository, and nothing uses fixed paths:
//! every test works in its own [`TempDir`], so tests can run in parallel threads.
//!
//! The modules by subject, their items also at the crate root for `use qdirty_testkit::*`:
//! [`tools`] (the gate and running programs), [`qemu`] (qemu-img, qemu-io, NBD), [`qmp`]
//! (qemu-storage-daemon), [`json`], [`raw_header`] (files and cluster 0 read without qdirty),
//! [`runs`] (run-list models), [`prng`], [`tempdir`], [`qdirty_side`] (the qdirty side of the interop
//! tests). Used by a few tests only, and so not at the root: [`clib`] (the C library and
//! compiler), [`salvage_cases`] (broken QEMU-made images), [`fuzz_targets`] (the bodies of the
//! cargo-fuzz targets) and [`storage`] (the conformance suite of `Storage` implementations).
//!
//! qdirty dev-depends on this crate, which depends on qdirty: integration tests and benchmarks
//! link one qdirty, so the types here are theirs. qdirty's own unit tests are another build of
//! the crate: they can use what does not involve qdirty's types (e.g. [`Prng`]), nothing else.

pub mod clib;
pub mod fuzz_targets;
pub mod json;
pub mod prng;
pub mod qdirty_side;
pub mod qemu;
pub mod qmp;
pub mod raw_header;
pub mod runs;
pub mod salvage_cases;
pub mod tempdir;
pub mod tools;

pub use json::*;
pub use prng::*;
pub use qdirty_side::*;
pub use qemu::*;
pub use qmp::*;
pub use raw_header::*;
pub use runs::*;
pub use tempdir::*;
pub use tools::*;
