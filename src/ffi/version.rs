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

#[cfg(test)]
mod tests {
    use super::QDIRTY_ABI_MAJOR;

    #[test]
    fn abi_major_is_the_crate_major() {
        let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
        assert_eq!(
            QDIRTY_ABI_MAJOR, major,
            "the soname follows the crate's major version (cargo-c's version_suffix_components = 1)"
        );
    }
}
