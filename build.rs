//! Link settings of the cdylib on Linux:
//!
//! - its soname, `libqdirty.so.N` (cargo sets none: cargo#5045), where N is `QDIRTY_ABI_MAJOR`
//!   from src/ffi/version.rs, the one place the ABI major is defined;
//! - a symbol version on every export, from the version script src/ffi/qdirty.map.
//!
//! rustc links every cdylib with a version script of its own, an anonymous one listing the
//! exports as unversioned globals. GNU ld refuses to combine it with a script that has named
//! version nodes, and lld keeps rustc's assignment (it only warns about the second). What lld
//! does honour is a version written into the symbol's name in the object file (`.symver NAME,
//! NAME@@@NODE`), which overrides any script. So this script writes, for every file of
//! src/ffi/ that exports functions, an assembler file of `.symver` lines into OUT_DIR, which
//! that file includes with `symbol_versions!("file")` (src/ffi/symbol_versions.rs), and passes
//! src/ffi/qdirty.map to the linker, which defines the nodes. Whether the linker supports it
//! (lld does, GNU ld does not) is probed by linking a one-function cdylib the same way: without
//! that support the library is built unversioned, with a warning. The directives are in the
//! rlib too, so a Rust crate that links qdirty into a cdylib of its own turns the default
//! feature `symbol-versions` off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const VERSION_RS: &str = "src/ffi/version.rs";
const ABI_MAJOR_DECL: &str = "pub const QDIRTY_ABI_MAJOR: u32 = ";
const VERSION_SCRIPT: &str = "src/ffi/qdirty.map";
const FFI_DIR: &str = "src/ffi";

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
}

fn read(rel: &str) -> String {
    let path = manifest_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The value of `QDIRTY_ABI_MAJOR` in src/ffi/version.rs (`0u32` or `0`).
fn abi_major() -> u32 {
    let text = read(VERSION_RS);
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(ABI_MAJOR_DECL))
        .unwrap_or_else(|| panic!("{VERSION_RS} has no `{ABI_MAJOR_DECL}N;` line"));
    let digits = value.trim_end_matches(';').trim_end_matches("u32");
    digits
        .parse()
        .unwrap_or_else(|e| panic!("QDIRTY_ABI_MAJOR = {value:?} in {VERSION_RS}: {e}"))
}

/// Function name -> version node, from the version script (`NODE {`, `global:`, `name;`,
/// `local:`, `*;`, `} PARENT;`, C comments).
fn version_nodes() -> BTreeMap<String, String> {
    let text = read(VERSION_SCRIPT);
    let mut without_comments = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        without_comments.push_str(&rest[..start]);
        let end = rest[start..]
            .find("*/")
            .unwrap_or_else(|| panic!("{VERSION_SCRIPT}: unterminated comment"));
        rest = &rest[start + end + 2..];
    }
    without_comments.push_str(rest);

    let mut nodes = BTreeMap::new();
    let mut node: Option<String> = None;
    let mut local = false;
    for line in without_comments.lines().map(str::trim) {
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_suffix('{') {
            let name = name.trim();
            assert!(
                name.starts_with("QDIRTY_") && node.is_none(),
                "{VERSION_SCRIPT}: unexpected node `{line}`"
            );
            node = Some(name.to_owned());
            local = false;
        } else if line.starts_with('}') {
            assert!(node.take().is_some(), "{VERSION_SCRIPT}: stray `{line}`");
        } else if line == "global:" {
            local = false;
        } else if line == "local:" {
            local = true;
        } else if let Some(sym) = line.strip_suffix(';') {
            let current = node
                .as_ref()
                .unwrap_or_else(|| panic!("{VERSION_SCRIPT}: `{line}` outside a node"));
            if local {
                assert_eq!(sym, "*", "{VERSION_SCRIPT}: only `*` is local");
                continue;
            }
            assert!(
                sym.starts_with("qdirty_")
                    && sym.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric()),
                "{VERSION_SCRIPT}: `{sym}` is not a qdirty_ function name"
            );
            if let Some(old) = nodes.insert(sym.to_owned(), current.clone()) {
                panic!("{VERSION_SCRIPT}: {sym} is in both {old} and {current}");
            }
        } else {
            panic!("{VERSION_SCRIPT}: cannot parse `{line}`");
        }
    }
    assert!(node.is_none(), "{VERSION_SCRIPT}: unterminated node");
    nodes
}

/// The names of the `#[no_mangle]` functions of a Rust source file (`#[no_mangle]` at the start
/// of a line, then the first `fn NAME`).
fn exported_functions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = false;
    for line in text.lines().map(str::trim_start) {
        if line.starts_with("#[no_mangle]") {
            pending = true;
        }
        if pending {
            if let Some(i) = line.find("fn ") {
                let name: String = line[i + 3..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
                pending = false;
            }
        }
    }
    out
}

/// Writes OUT_DIR/symver/<file>.s for every file of src/ffi/ that exports functions, after
/// checking that the version script and the exports agree and that each such file includes
/// its directives.
fn write_symver_files(out_dir: &Path) {
    let mut nodes = version_nodes();
    let dir = manifest_dir().join(FFI_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let symver_dir = out_dir.join("symver");
    std::fs::create_dir_all(&symver_dir).unwrap();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let exports = exported_functions(&text);
        if exports.is_empty() {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let invocation = format!("symbol_versions!(\"{stem}\");");
        assert!(
            text.contains(&invocation),
            "{FFI_DIR}/{stem}.rs exports functions but lacks `{invocation}`: without it they \
             get no symbol version"
        );
        let mut asm = String::new();
        for f in exports {
            let node = nodes.remove(&f).unwrap_or_else(|| {
                panic!(
                    "{f} ({FFI_DIR}/{stem}.rs) is not in {VERSION_SCRIPT}: add it to the node of \
                     the next release"
                )
            });
            asm.push_str(&format!(".symver {f}, {f}@@@{node}\n"));
        }
        std::fs::write(symver_dir.join(format!("{stem}.s")), asm).unwrap();
    }
    assert!(
        nodes.is_empty(),
        "{VERSION_SCRIPT} names functions that {FFI_DIR} does not export: {:?}",
        nodes.keys().collect::<Vec<_>>()
    );
}

/// Whether rustc, with this build's target, flags and linker, links a cdylib whose export
/// carries the version that a `.symver` directive gives it.
fn linker_supports_symbol_versions(out_dir: &Path) -> Result<(), String> {
    let probe = out_dir.join("symver-probe");
    std::fs::create_dir_all(&probe).unwrap();
    let src = probe.join("probe.rs");
    let map = probe.join("probe.map");
    let lib = probe.join("libqdirty_symver_probe.so");
    std::fs::write(
        &src,
        "#[no_mangle]\npub extern \"C\" fn qdirty_probe() -> i32 { 0 }\n\
         core::arch::global_asm!(\".symver qdirty_probe, qdirty_probe@@@QDIRTY_PROBE\");\n",
    )
    .unwrap();
    std::fs::write(
        &map,
        "QDIRTY_PROBE {\n    global:\n        qdirty_probe;\n    local:\n        *;\n};\n",
    )
    .unwrap();
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--crate-type",
        "cdylib",
        "--crate-name",
        "qdirty_symver_probe",
        "--edition",
        "2021",
    ])
    .arg("--target")
    .arg(std::env::var("TARGET").unwrap())
    .arg("-o")
    .arg(&lib);
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    if let Some(linker) = std::env::var_os("RUSTC_LINKER") {
        let mut arg = std::ffi::OsString::from("-Clinker=");
        arg.push(linker);
        cmd.arg(arg);
    }
    let mut arg = std::ffi::OsString::from("-Clink-arg=-Wl,--version-script=");
    arg.push(&map);
    cmd.arg(arg).arg(&src);
    let out = cmd.output().map_err(|e| format!("cannot run rustc: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The linker's own message (`/usr/bin/ld: ...`), else rustc's.
        let lines = || {
            stderr
                .lines()
                .map(|l| l.trim().trim_start_matches("= note:").trim())
        };
        let why = lines()
            .find(|l| l.contains("ld: ") || l.contains("lld: "))
            .or_else(|| lines().find(|l| l.contains("error")))
            .unwrap_or("the link failed");
        return Err(why.to_owned());
    }
    // The node's name is in the library only if a version definition names it.
    let bytes = std::fs::read(&lib).map_err(|e| e.to_string())?;
    if !bytes.windows(13).any(|w| w == b"QDIRTY_PROBE\0") {
        return Err("the linker ignored the symbol version".into());
    }
    Ok(())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={VERSION_RS}");
    println!("cargo:rerun-if-changed={VERSION_SCRIPT}");
    println!("cargo:rerun-if-changed={FFI_DIR}");
    println!("cargo:rustc-check-cfg=cfg(qdirty_symver)");
    let major = abi_major();
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqdirty.so.{major}");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    write_symver_files(&out_dir);
    // Without the feature (`default-features = false`): for Rust crates that link qdirty into
    // a cdylib of their own, whose link does not define qdirty's version nodes.
    if std::env::var_os("CARGO_FEATURE_SYMBOL_VERSIONS").is_none() {
        return;
    }
    match linker_supports_symbol_versions(&out_dir) {
        Ok(()) => {
            println!("cargo:rustc-cfg=qdirty_symver");
            // The linker reads a copy in OUT_DIR: cargo may reuse this script's output for a
            // build of the same crate from another source folder sharing the target directory
            // (a pip build from an unpacked sdist), whose own copy of the script may be gone.
            let map = out_dir.join("qdirty.map");
            std::fs::copy(manifest_dir().join(VERSION_SCRIPT), &map)
                .unwrap_or_else(|e| panic!("copy {VERSION_SCRIPT} to {}: {e}", map.display()));
            println!(
                "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
                map.display()
            );
        }
        Err(why) => println!(
            "cargo:warning=libqdirty.so is built without symbol versions: this linker cannot \
             version rustc's exports ({why}); rust-lld (rustc's default on x86_64 Linux since \
             1.90) can"
        ),
    }
}
