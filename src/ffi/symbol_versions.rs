//! The symbol version of each export, attached in the object file that defines it.
//!
//! build.rs writes, for each file of src/ffi/ that exports functions, an assembler file of
//! `.symver NAME, NAME@@@NODE` lines (the nodes of src/ffi/qdirty.map) into OUT_DIR; the file
//! includes it with `symbol_versions!("file")`. The directive must be in the object that
//! defines the function, and rustc puts a module's `global_asm!` in the same codegen unit as the
//! module's functions: that is why each file carries its own. build.rs sets `qdirty_symver`
//! only when the linker honours the directives (see build.rs); without it this expands to
//! nothing.

/// Attaches the symbol versions of the functions exported by src/ffi/`$file`.rs. Every file
/// that has `#[no_mangle]` functions invokes it once (build.rs fails otherwise).
macro_rules! symbol_versions {
    ($file:literal) => {
        #[cfg(qdirty_symver)]
        core::arch::global_asm!(include_str!(concat!(
            env!("OUT_DIR"),
            "/symver/",
            $file,
            ".s"
        )));
    };
}
pub(crate) use symbol_versions;
