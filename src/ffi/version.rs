//! The ABI version: the number in the soname `libqdirty.so.N`.
//!
//! `build.rs` reads [`QDIRTY_ABI_MAJOR`] from this file to pass `-Wl,-soname,libqdirty.so.N` to
//! the linker, cargo-c derives the same soname from the crate's major version
//! (`version_suffix_components = 1` in Cargo.toml), and the header carries it as a `#define`;
//! tests/install.rs checks that all three agree on an installed copy.
//!
//! Policy: within one ABI major, functions and constants are only added; any incompatible change
//! (a removal, a changed signature or meaning) bumps the crate's major version and with it this
//! constant. While the crate is 0.x the ABI major is 0.

/// The major version of the C ABI, the `N` of the soname `libqdirty.so.N`. A program compiled
/// against this header runs with any libqdirty of the same ABI major that is at least as new.
pub const QDIRTY_ABI_MAJOR: u32 = 0u32;

/// The major version of the qdirty release this header belongs to (`X` of `X.Y.Z`, the crate's
/// version in Cargo.toml). `qdirty_version_number()` gives the installed library's.
pub const QDIRTY_VERSION_MAJOR: u32 = 0u32;

/// The minor version of this header's release (`Y` of `X.Y.Z`, below 100).
pub const QDIRTY_VERSION_MINOR: u32 = 1u32;

/// The patch version of this header's release (`Z` of `X.Y.Z`, below 100).
pub const QDIRTY_VERSION_PATCH: u32 = 0u32;

/// This header's release as one number, MAJOR * 10000 + MINOR * 100 + PATCH (0.1.0 is 100,
/// 1.2.3 is 10203), for the preprocessor: `#if QDIRTY_VERSION_NUMBER >= 200` guards code that
/// needs 0.2.0's header; `qdirty_version_number() >= 200` checks the library it runs with.
pub const QDIRTY_VERSION_NUMBER: u32 =
    QDIRTY_VERSION_MAJOR * 10000 + QDIRTY_VERSION_MINOR * 100 + QDIRTY_VERSION_PATCH;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_major_is_the_crate_major() {
        let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
        assert_eq!(
            QDIRTY_ABI_MAJOR, major,
            "the soname follows the crate's major version (cargo-c's version_suffix_components = 1)"
        );
    }

    #[test]
    fn version_constants_are_the_crate_version() {
        let part = |v: &str| -> u32 { v.parse().unwrap() };
        let (x, y, z) = (
            part(env!("CARGO_PKG_VERSION_MAJOR")),
            part(env!("CARGO_PKG_VERSION_MINOR")),
            part(env!("CARGO_PKG_VERSION_PATCH")),
        );
        assert_eq!(
            (
                QDIRTY_VERSION_MAJOR,
                QDIRTY_VERSION_MINOR,
                QDIRTY_VERSION_PATCH
            ),
            (x, y, z),
            "src/ffi/version.rs must follow Cargo.toml's version (then regenerate the header)"
        );
        assert!(
            y < 100 && z < 100,
            "QDIRTY_VERSION_NUMBER needs MINOR and PATCH below 100"
        );
        assert_eq!(QDIRTY_VERSION_NUMBER, x * 10000 + y * 100 + z);
    }
}
