//! Gives the cdylib a versioned soname, `libqdirty.so.N` (cargo sets none: cargo#5045), where N
//! is `QDIRTY_ABI_MAJOR` from src/ffi/version.rs, the one place the ABI major is defined.

use std::path::Path;

const VERSION_RS: &str = "src/ffi/version.rs";
const ABI_MAJOR_DECL: &str = "pub const QDIRTY_ABI_MAJOR: u32 = ";

/// The value of `QDIRTY_ABI_MAJOR` in src/ffi/version.rs (`0u32` or `0`).
fn abi_major() -> u32 {
    let path = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join(VERSION_RS);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(ABI_MAJOR_DECL))
        .unwrap_or_else(|| panic!("{} has no `{ABI_MAJOR_DECL}N;` line", path.display()));
    let digits = value.trim_end_matches(';').trim_end_matches("u32");
    digits
        .parse()
        .unwrap_or_else(|e| panic!("QDIRTY_ABI_MAJOR = {value:?} in {}: {e}", path.display()))
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={VERSION_RS}");
    let major = abi_major();
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqdirty.so.{major}");
    }
}
