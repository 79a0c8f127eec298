//! The C ABI as shipped: include/qdirty.h compiles on its own as C89, C99, C11 and C++11
//! (`-pedantic -Werror`), declares exactly the functions the cdylib exports, every exported
//! function is wrapped by the panic boundary (`ffi_call!`) and carries the symbol version
//! src/ffi/qdirty.map gives it, and a program that needs a newer version than the library has
//! refuses to load.

use clib::{cdylib, compiler, lib_dir, link_soname, root};
use qdirty_testkit::clib;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("QDIRTY_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("qdirty-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Names of the functions declared in the header (identifiers `qdirty_*` followed by `(`).
fn header_functions() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("include/qdirty.h")).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("//")
            || line.starts_with('*')
            || line.starts_with("/*")
            || line.starts_with('#')
        {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("qdirty_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let ident = &tail[..end];
            let preceded_by_star_paren = rest[..i].ends_with("(*");
            if tail[end..].starts_with('(') && !preceded_by_star_paren {
                names.insert(ident.to_owned());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// Compiles a file that includes include/qdirty.h twice and uses its macros and types, as the
/// language `std` (`c89`, `c99`, `c11`, `c++11`) with `-pedantic -Werror`.
fn compile_header(std: &str) {
    let cpp = std.starts_with("c++");
    let dir = scratch_dir(&format!("header-{std}"));
    let src = dir.join(if cpp { "t.cpp" } else { "t.c" });
    std::fs::write(
        &src,
        "#include \"qdirty.h\"\n#include \"qdirty.h\" /* the include guard works */\n\
         #if QDIRTY_VERSION_NUMBER < 100 || QDIRTY_VERSION_NUMBER != \\\n\
         \x20   QDIRTY_VERSION_MAJOR * 10000 + QDIRTY_VERSION_MINOR * 100 + QDIRTY_VERSION_PATCH\n\
         #error \"QDIRTY_VERSION_NUMBER is not usable in #if\"\n\
         #endif\n\
         int qdirty_header_test(void);\n\
         int qdirty_header_test(void) {\n\
         \x20   qdirty_warning_fn f = 0;\n\
         \x20   qdirty_extent e;\n\
         \x20   e.offset = 0;\n\
         \x20   e.length = 0;\n\
         \x20   (void)f;\n\
         \x20   return (int)(QDIRTY_OPEN_RDWR + QDIRTY_BITMAP_PERSISTENT + QDIRTY_BITMAP_DISABLED +\n\
         \x20                QDIRTY_BITMAP_AUTOLOAD + e.offset + e.length);\n\
         }\n",
    )
    .unwrap();
    let tool = compiler(cpp);
    let mut cmd = tool.to_command();
    cmd.arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root().join("include"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(dir.join("t.o"));
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", tool.path()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "include/qdirty.h does not compile standalone with -std={std} -pedantic -Werror:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_c89() {
    compile_header("c89");
}

#[test]
fn header_compiles_as_c99() {
    compile_header("c99");
}

#[test]
fn header_compiles_as_c11() {
    compile_header("c11");
}

#[test]
fn header_compiles_as_cxx11() {
    compile_header("c++11");
}

#[test]
fn header_declares_exactly_the_exported_symbols() {
    let lib = cdylib();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("cannot run nm (binutils)");
    assert!(
        out.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut exported = BTreeSet::new();
    let mut foreign = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.split_whitespace().rev();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        // `name@@VERSION` (every_export_carries_its_symbol_version checks the versions).
        let name = name.split('@').next().unwrap();
        if name.starts_with("qdirty_") {
            exported.insert(name.to_owned());
        } else if kind == "T" {
            foreign.push(name.to_owned());
        }
    }
    let declared = header_functions();
    assert!(
        declared.len() >= 38,
        "the header declares only {} functions: {declared:?}",
        declared.len()
    );
    let missing: Vec<_> = declared.difference(&exported).collect();
    let undeclared: Vec<_> = exported.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "declared in include/qdirty.h but not exported by {}: {missing:?}",
        lib.display()
    );
    assert!(
        undeclared.is_empty(),
        "exported by {} but not declared in include/qdirty.h: {undeclared:?}",
        lib.display()
    );
    assert!(
        foreign.is_empty(),
        "the cdylib exports functions outside the qdirty_ namespace: {foreign:?}"
    );
}

// ---- the boundary check: a small Rust lexer, enough for src/ffi -----------------------------

/// Byte index just past the literal, comment or char starting at `i`, or None if none starts
/// there.
fn skip_non_code(s: &[u8], i: usize) -> Option<usize> {
    let at = |k: usize| s.get(k).copied().unwrap_or(0);
    match at(i) {
        b'/' if at(i + 1) == b'/' => Some(
            s[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(s.len(), |p| i + p),
        ),
        b'/' if at(i + 1) == b'*' => {
            let mut depth = 0;
            let mut k = i;
            while k < s.len() {
                if at(k) == b'/' && at(k + 1) == b'*' {
                    depth += 1;
                    k += 2;
                } else if at(k) == b'*' && at(k + 1) == b'/' {
                    depth -= 1;
                    k += 2;
                    if depth == 0 {
                        return Some(k);
                    }
                } else {
                    k += 1;
                }
            }
            Some(s.len())
        }
        b'r' if (at(i + 1) == b'"' || at(i + 1) == b'#') && (i == 0 || !is_ident(at(i - 1))) => {
            let mut k = i + 1;
            let mut hashes = 0;
            while at(k) == b'#' {
                hashes += 1;
                k += 1;
            }
            if at(k) != b'"' {
                return None;
            }
            k += 1;
            loop {
                if k >= s.len() {
                    return Some(s.len());
                }
                if at(k) == b'"' && (1..=hashes).all(|h| at(k + h) == b'#') {
                    return Some(k + 1 + hashes);
                }
                k += 1;
            }
        }
        b'"' => {
            let mut k = i + 1;
            while k < s.len() {
                match at(k) {
                    b'\\' => k += 2,
                    b'"' => return Some(k + 1),
                    _ => k += 1,
                }
            }
            Some(s.len())
        }
        b'\'' => {
            if at(i + 1) == b'\\' {
                let close = s[i + 2..].iter().position(|&c| c == b'\'')?;
                Some(i + 2 + close + 1)
            } else if at(i + 2) == b'\'' {
                Some(i + 3)
            } else {
                None // a lifetime
            }
        }
        _ => None,
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Index of the bracket closing the one at `open` (`{`/`}` or `(`/`)`), skipping literals and
/// comments.
fn matching(s: &[u8], open: usize) -> usize {
    let (o, c) = (s[open], if s[open] == b'{' { b'}' } else { b')' });
    let mut depth = 0usize;
    let mut i = open;
    while i < s.len() {
        if let Some(next) = skip_non_code(s, i) {
            i = next;
            continue;
        }
        if s[i] == o {
            depth += 1;
        } else if s[i] == c {
            depth -= 1;
            if depth == 0 {
                return i;
            }
        }
        i += 1;
    }
    panic!("unbalanced brackets");
}

/// (function name, body text) of every `#[no_mangle]` function in `src`, skipping literals and
/// comments when looking for the attribute.
fn exported_fns(src: &str) -> Vec<(String, String)> {
    let s = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if let Some(next) = skip_non_code(s, i) {
            i = next;
            continue;
        }
        if !src[i..].starts_with("#[no_mangle]") {
            i += 1;
            continue;
        }
        let fn_kw = i + src[i..].find("fn ").expect("#[no_mangle] without fn");
        let name_start = fn_kw + 3;
        let name_len = src[name_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap();
        let name = src[name_start..name_start + name_len].to_owned();
        let open = name_start + src[name_start..].find('{').expect("fn without body");
        let close = matching(s, open);
        out.push((name, src[open + 1..close].to_owned()));
        i = close + 1;
    }
    out
}

/// Whether `body` is exactly one `ffi_call!(...)` invocation (and nothing else).
fn is_one_ffi_call(body: &str) -> bool {
    let t = body.trim();
    let Some(rest) = t.strip_prefix("ffi_call!") else {
        return false;
    };
    let paren = t.len() - rest.trim_start().len();
    if t.as_bytes().get(paren) != Some(&b'(') {
        return false;
    }
    matching(t.as_bytes(), paren) == t.len() - 1
}

fn ffi_sources() -> Vec<(PathBuf, String)> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("src/ffi"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

#[test]
fn every_export_is_wrapped_by_the_boundary() {
    let mut names = BTreeSet::new();
    let mut bad = Vec::new();
    for (path, text) in ffi_sources() {
        for (name, body) in exported_fns(&text) {
            if !is_one_ffi_call(&body) {
                bad.push(format!("{}: {name}", path.display()));
            }
            names.insert(name);
        }
    }
    assert!(
        bad.is_empty(),
        "exported functions whose body is not exactly one ffi_call!(...): {bad:?}"
    );
    assert_eq!(
        names,
        header_functions(),
        "the #[no_mangle] functions of src/ffi differ from the header's"
    );
}

#[test]
fn no_mangle_only_in_ffi() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    let ffi = root().join("src/ffi");
    for f in files {
        if f.starts_with(&ffi) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            exported_fns(&text).is_empty(),
            "{} exports C symbols: only src/ffi may",
            f.display()
        );
        assert!(
            !text.contains("export_name"),
            "{} uses export_name: only src/ffi may export",
            f.display()
        );
    }
}

#[test]
fn the_boundary_checker_rejects_unwrapped_bodies() {
    let src = r##"
        /// doc with #[no_mangle] in it is ignored
        #[no_mangle]
        pub extern "C" fn good(x: *const u8) -> i32 { ffi_call!({ let s = "}{"; let c = '}'; 0 }) }
        #[no_mangle]
        pub extern "C" fn bad1() -> i32 { let x = 1; ffi_call!({ x }) }
        #[no_mangle]
        pub extern "C" fn bad2() -> i32 { ffi_call!({ 1 }); 2 }
        #[no_mangle]
        pub extern "C" fn bad3<'a>() -> i32 { 3 }
        // #[no_mangle] in a comment
        const R: &str = r#"#[no_mangle] fn fake() {}"#;
    "##;
    let fns = exported_fns(src);
    let verdict: Vec<_> = fns
        .iter()
        .map(|(n, b)| (n.as_str(), is_one_ffi_call(b)))
        .collect();
    assert_eq!(
        verdict,
        [
            ("good", true),
            ("bad1", false),
            ("bad2", false),
            ("bad3", false)
        ]
    );
}

// ---- symbol versions ----------------------------------------------------------------------

/// Function -> version node, as src/ffi/qdirty.map assigns them.
fn version_script_nodes() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("src/ffi/qdirty.map")).unwrap();
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = &rest[start + rest[start..].find("*/").unwrap() + 2..];
    }
    code.push_str(rest);
    let mut nodes = BTreeMap::new();
    let mut node = String::new();
    for line in code.lines().map(str::trim) {
        if let Some(name) = line.strip_suffix('{') {
            node = name.trim().to_owned();
        } else if let Some(sym) = line.strip_suffix(';') {
            if sym.starts_with("qdirty_") {
                nodes.insert(sym.to_owned(), node.clone());
            }
        }
    }
    nodes
}

/// One entry of `readelf --dyn-syms`: name, version (`""` when none), whether it is the default
/// version (`@@`), and whether it is defined.
#[derive(Debug)]
struct DynSym {
    name: String,
    version: String,
    default: bool,
    defined: bool,
}

fn dynamic_symbols(file: &Path) -> Vec<DynSym> {
    let out = Command::new("readelf")
        .args(["--dyn-syms", "-W"])
        .arg(file)
        .env("LC_ALL", "C")
        .output()
        .expect("cannot run readelf (binutils)");
    assert!(out.status.success(), "readelf failed on {}", file.display());
    let mut syms = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Num: Value Size Type Bind Vis Ndx Name [(n)]
        if f.len() < 8 || !f[0].ends_with(':') {
            continue;
        }
        let (name, version, default) = if let Some((n, v)) = f[7].split_once("@@") {
            (n, v, true)
        } else if let Some((n, v)) = f[7].split_once('@') {
            (n, v, false)
        } else {
            (f[7], "", false)
        };
        syms.push(DynSym {
            name: name.to_owned(),
            version: version.to_owned(),
            default,
            defined: f[6] != "UND",
        });
    }
    syms
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Compiles C `source` with the test compiler and `args` (sources, libraries, -o ...).
fn cc(args: &[&std::ffi::OsStr]) {
    let tool = compiler(false);
    let out = tool
        .to_command()
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", tool.path()));
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        output_text(&out)
    );
}

#[test]
fn every_export_carries_its_symbol_version() {
    let nodes = version_script_nodes();
    assert_eq!(
        nodes.keys().cloned().collect::<BTreeSet<_>>(),
        header_functions(),
        "src/ffi/qdirty.map must list exactly the functions of include/qdirty.h"
    );
    let lib = cdylib();
    let mut unversioned = Vec::new();
    let mut seen = BTreeSet::new();
    for sym in dynamic_symbols(&lib) {
        if !sym.defined || !sym.name.starts_with("qdirty_") {
            continue;
        }
        let want = &nodes[&sym.name];
        if &sym.version != want || !sym.default {
            unversioned.push(format!(
                "{} has version {:?}{}, expected {want}",
                sym.name,
                sym.version,
                if sym.default { "" } else { " (not default)" }
            ));
        }
        seen.insert(sym.name);
    }
    assert!(
        unversioned.is_empty(),
        "{} (built without symbol versions? see the build's warning):\n{}",
        lib.display(),
        unversioned.join("\n")
    );
    assert_eq!(
        seen.len(),
        nodes.len(),
        "{} exports {seen:?}",
        lib.display()
    );
}

#[test]
fn programs_record_the_versions_they_need_and_refuse_an_older_library() {
    let libdir = lib_dir();
    link_soname(&libdir);
    let dir = scratch_dir("symver");
    let nodes = version_script_nodes();
    let current = nodes["qdirty_version"].clone();
    // The node the next release's functions will go to: the library built here cannot have it.
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap();
    let next = format!("QDIRTY_{major}.{}", minor + 1);
    assert!(
        !nodes.values().any(|n| *n == next),
        "the version script already has {next}"
    );

    // 1. A program linked against the library records qdirty_version@<node> and needs the node.
    let prog = dir.join("uses_current");
    std::fs::write(
        dir.join("uses_current.c"),
        "#include <stdio.h>\n#include \"qdirty.h\"\n\
         int main(void) { printf(\"%s %u\\n\", qdirty_version(), (unsigned)qdirty_version_number()); return 0; }\n",
    )
    .unwrap();
    cc(&[
        "-I".as_ref(),
        root().join("include").as_os_str(),
        dir.join("uses_current.c").as_os_str(),
        format!("-L{}", libdir.display()).as_ref(),
        "-lqdirty".as_ref(),
        "-o".as_ref(),
        prog.as_os_str(),
    ]);
    let refs: Vec<DynSym> = dynamic_symbols(&prog)
        .into_iter()
        .filter(|s| s.name.starts_with("qdirty_"))
        .collect();
    assert_eq!(refs.len(), 2, "{refs:?}");
    for r in &refs {
        assert!(
            !r.defined && r.version == current,
            "the program's reference {r:?} does not carry {current}"
        );
    }
    let out = Command::new(&prog)
        .env("LD_LIBRARY_PATH", &libdir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "{} {}",
            env!("CARGO_PKG_VERSION"),
            major * 10000 + minor * 100 + env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap()
        )
    );

    // 2. A stand-in for the next release: the same soname, qdirty_version in the current node
    //    and a new function in the next one, as the version script's own comment prescribes.
    let stub_dir = dir.join("next");
    std::fs::create_dir_all(&stub_dir).unwrap();
    std::fs::write(
        stub_dir.join("next.c"),
        "const char *qdirty_version(void);\nint qdirty_next_function(void);\n\
         const char *qdirty_version(void) { return \"next\"; }\n\
         int qdirty_next_function(void) { return 42; }\n",
    )
    .unwrap();
    std::fs::write(
        stub_dir.join("next.map"),
        format!(
            "{current} {{\n global: qdirty_version;\n local: *;\n}};\n\
             {next} {{\n global: qdirty_next_function;\n}} {current};\n"
        ),
    )
    .unwrap();
    let so_name = clib_soname();
    let stub = stub_dir.join(&so_name);
    cc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        stub_dir.join("next.c").as_os_str(),
        format!(
            "-Wl,--version-script={}",
            stub_dir.join("next.map").display()
        )
        .as_ref(),
        format!("-Wl,-soname,{so_name}").as_ref(),
        "-o".as_ref(),
        stub.as_os_str(),
    ]);
    let _ = std::fs::remove_file(stub_dir.join("libqdirty.so"));
    std::os::unix::fs::symlink(&so_name, stub_dir.join("libqdirty.so")).unwrap();
    let prog = dir.join("uses_next");
    std::fs::write(
        dir.join("uses_next.c"),
        "#include <stdio.h>\n\
         const char *qdirty_version(void);\nint qdirty_next_function(void);\n\
         int main(void) {\n    printf(\"main\\n\");\n    fflush(stdout);\n\
         \x20   printf(\"%s %d\\n\", qdirty_version(), qdirty_next_function());\n    return 0;\n}\n",
    )
    .unwrap();
    cc(&[
        dir.join("uses_next.c").as_os_str(),
        format!("-L{}", stub_dir.display()).as_ref(),
        "-lqdirty".as_ref(),
        "-o".as_ref(),
        prog.as_os_str(),
    ]);
    // With the release it was built against, it runs.
    let out = Command::new(&prog)
        .env("LD_LIBRARY_PATH", &stub_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "main\nnext 42\n");
    // With the library built here, the loader refuses it before main, naming the version.
    let out = Command::new(&prog)
        .env("LD_LIBRARY_PATH", &libdir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        out.stdout.is_empty(),
        "the program started (it should fail at load time):\n{}",
        output_text(&out)
    );
    assert!(
        stderr.contains(&format!("version `{next}' not found")),
        "{}",
        output_text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The soname of the library built for this run (`libqdirty.so.N`).
fn clib_soname() -> String {
    format!("libqdirty.so.{}", qdirty::ffi::QDIRTY_ABI_MAJOR)
}
