//! Test support shared by qdirty's tests (`tests/`, through `tests/common`), the command's tests
//! (`cli/tests/`) and the benchmarks. Not published.
//!
//! Everything QEMU says about an image is asked from QEMU's own tools: `qemu-img`, `qemu-io`,
//! `qemu-nbd` + `nbdinfo` (exact dirty extents), and `qemu-storage-daemon` over QMP (bitmap
//! SHA-256). Nothing here depends on files outside the repository, and nothing uses fixed paths:
//! every test works in its own [`TempDir`], so tests can run in parallel threads.
//!
//! The modules by subject, their items also at the crate root for `use qdirty_testkit::*`:
//! [`tools`] (the gate and running programs), [`qemu`] (qemu-img, qemu-io, NBD), [`qmp`]
//! (qemu-storage-daemon), [`json`], [`raw_header`](mod@raw_header) (files and cluster 0 read without qdirty),
//! [`runs`] (run-list models), [`prng`], [`tempdir`]. Used by a few tests only, and so not at
//! the root: [`clib`] (the C library and compiler), [`salvage_cases`] (broken QEMU-made images)
//! and [`storage`] (the conformance suite of `Storage` implementations).
//!
//! The kit does not depend on qdirty. A crate that did would link a second qdirty (the one built
//! for integration tests) into qdirty's own unit tests, and the C exports of the two collide at
//! link time; without it, unit tests can use the kit too (its [`Prng`], its storage suite). What
//! needs qdirty's types lives in `tests/common` (the qdirty side of the harness) and in
//! `fuzz/targets` (the fuzz targets' bodies).

pub mod bench;
pub mod clib;
pub mod json;
pub mod prng;
pub mod qemu;
pub mod qmp;
pub mod raw_header;
pub mod runs;
pub mod salvage_cases;
pub mod storage;
pub mod tempdir;
pub mod tools;

pub use json::*;
pub use prng::*;
pub use qemu::*;
pub use qmp::*;
pub use raw_header::*;
pub use runs::*;
pub use tempdir::*;
pub use tools::*;
