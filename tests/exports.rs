//! The C ABI as shipped: include/qdirty.h compiles on its own as C11 and C++, declares exactly
//! the functions the cdylib exports, and every exported function is wrapped by the panic
//! boundary (`ffi_call!`).

#[path = "support/clib.rs"]
mod clib;
use clib::{cdylib, compiler, root};
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

fn compile_header(cpp: bool) {
    let dir = scratch_dir(if cpp { "header-cxx" } else { "header-c" });
    let src = dir.join(if cpp { "t.cpp" } else { "t.c" });
    std::fs::write(
        &src,
        "#include \"qdirty.h\"\n#include \"qdirty.h\" /* the include guard works */\n\
         int qdirty_header_test(void);\n\
         int qdirty_header_test(void) {\n\
         \x20   qdirty_warning_fn f = 0;\n\
         \x20   (void)f;\n\
         \x20   return (int)(QDIRTY_OPEN_RDWR + QDIRTY_BITMAP_PERSISTENT + QDIRTY_BITMAP_DISABLED +\n\
         \x20                QDIRTY_BITMAP_AUTOLOAD);\n\
         }\n",
    )
    .unwrap();
    let tool = compiler(cpp);
    let mut cmd = tool.to_command();
    cmd.arg(if cpp { "-std=c++11" } else { "-std=c11" })
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
        "include/qdirty.h does not compile standalone as {}:\n{}{}",
        if cpp { "C++" } else { "C11" },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_c11() {
    compile_header(false);
}

#[test]
fn header_compiles_as_cxx() {
    compile_header(true);
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
