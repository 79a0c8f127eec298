//! qdirty's fuzz targets (cargo-fuzz). The bodies live in `targets.rs`, which the main crate's
//! tests/hostile_fuzz.rs also includes, so every target also runs as a plain `cargo test`
//! corpus replay and deterministic mutation loop on a stable toolchain.
#[path = "targets.rs"]
pub mod targets;
