//! qdirty's fuzz targets (cargo-fuzz). The bodies live in the test kit
//! (`qdirty_testkit::fuzz_targets`), which the main crate's tests/hostile_fuzz.rs also uses, so
//! every target also runs as a plain `cargo test` corpus replay and deterministic mutation loop
//! on a stable toolchain.
pub use qdirty_testkit::fuzz_targets as targets;
