//! The C boundary audit's coverage check: parses every function declared in include/qdirty.h
//! and every call in c-tests/test_boundary.c, and fails unless
//! - every exported function is called there,
//! - each of its pointer parameters (including function pointers and `errp`) is passed `NULL`
//!   in at least one call,
//! - each of its integer parameters (`uint64_t`, `uint32_t`, `size_t`) is passed an extreme
//!   value (`UINT64_MAX`, `UINT32_MAX`, `SIZE_MAX`, or a macro of test_boundary.c that names
//!   unknown flag bits) in at least one call.
//!
//! So a new export (or a new parameter) without its boundary test fails the build. The C file
//! itself checks the documented results; tests/c_suite.rs runs it (under valgrind with
//! QDIRTY_VALGRIND=1).

use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug)]
struct Param {
    decl: String,
    pointer: bool,
    integer: bool,
}

/// Removes `//` and `/* */` comments and string literals' contents (so that commas and
/// parentheses inside them do not count).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else if b[i] == b'"' || b[i] == b'\'' {
            let q = b[i];
            out.push(q as char);
            i += 1;
            while i < b.len() && b[i] != q {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push(q as char);
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The exported functions of the header and their parameters.
fn header_functions(header: &str) -> BTreeMap<String, Vec<Param>> {
    let text: String = strip(header)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeMap::new();
    for stmt in text.split(';') {
        // What follows the last brace: `extern "C" {` and struct bodies come before.
        let stmt = stmt.rsplit(['{', '}']).next().unwrap().trim();
        if stmt.starts_with("typedef") || !stmt.ends_with(')') {
            continue;
        }
        let Some(open) = stmt.find('(') else { continue };
        let before = stmt[..open].trim_end();
        let name_start = before
            .bytes()
            .rposition(|c| !is_ident(c))
            .map_or(0, |p| p + 1);
        let name = &before[name_start..];
        // Function pointer fields (`int (*pread)(...)`) have no name before '('.
        if !name.starts_with("qdirty_") || before[..name_start].trim().is_empty() {
            continue;
        }
        let params = &stmt[open + 1..stmt.len() - 1];
        let params: Vec<Param> = split_args(params)
            .into_iter()
            .filter(|p| p != "void" && !p.is_empty())
            .map(|decl| {
                let ty = decl
                    .trim_end_matches(|c: char| is_ident(c as u8))
                    .to_owned();
                Param {
                    pointer: ty.contains('*') || ty.trim().ends_with("_fn"),
                    integer: !ty.contains('*')
                        && ["uint64_t", "uint32_t", "size_t", "int64_t", "int"]
                            .iter()
                            .any(|t| ty.trim() == *t || ty.trim().ends_with(&format!(" {t}"))),
                    decl,
                }
            })
            .collect();
        assert!(
            out.insert(name.to_owned(), params).is_none(),
            "{name} declared twice"
        );
    }
    out
}

/// Splits an argument or parameter list at its top-level commas.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_owned());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() || !out.is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// Every call `name(args)` of a function in `names` in the C source: (name, arguments).
fn calls(src: &str, names: &BTreeMap<String, Vec<Param>>) -> Vec<(String, Vec<String>)> {
    let text = strip(src);
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if is_ident(b[i]) && (i == 0 || !is_ident(b[i - 1])) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let name = &text[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            if names.contains_key(name) && j < b.len() && b[j] == b'(' {
                let mut depth = 0;
                let mut k = j;
                loop {
                    match b[k] {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
                let args = split_args(&text[j + 1..k]);
                out.push((name.to_owned(), args));
            }
        } else {
            i += 1;
        }
    }
    out
}

fn is_extreme(arg: &str) -> bool {
    [
        "UINT64_MAX",
        "UINT32_MAX",
        "SIZE_MAX",
        "INT64_MAX",
        "UNKNOWN_FLAG",
    ]
    .iter()
    .any(|m| arg.contains(m))
}

#[test]
fn every_export_has_its_boundary_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/qdirty.h")).unwrap();
    let c_path = root.join("c-tests/test_boundary.c");
    let c_src = std::fs::read_to_string(&c_path).unwrap();
    let funcs = header_functions(&header);
    assert!(
        funcs.len() >= 80,
        "only {} functions parsed from include/qdirty.h: the parser is broken",
        funcs.len()
    );
    // Spot checks of the parser.
    let merge = &funcs["qdirty_image_merge_bitmap"];
    assert_eq!(merge.len(), 5);
    assert!(merge.iter().filter(|p| p.pointer).count() == 5);
    assert!(funcs["qdirty_version"].is_empty());
    assert!(funcs["qdirty_set_warning_handler"][0].pointer);
    assert!(funcs["qdirty_image_set_dirty"][1].integer);
    assert!(!funcs.contains_key("qdirty_warning_fn"));

    let all_calls = calls(&c_src, &funcs);
    let mut missing = Vec::new();
    for (name, params) in &funcs {
        let mine: Vec<&Vec<String>> = all_calls
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, a)| a)
            .collect();
        if mine.is_empty() {
            missing.push(format!("{name}: never called"));
            continue;
        }
        for args in &mine {
            let n = if params.is_empty() { 0 } else { args.len() };
            let got = if args.len() == 1 && args[0].is_empty() {
                0
            } else {
                n
            };
            assert_eq!(
                got,
                params.len(),
                "{name} called with {args:?}, but it has {} parameters",
                params.len()
            );
        }
        for (i, p) in params.iter().enumerate() {
            if p.pointer && !mine.iter().any(|a| a[i] == "NULL") {
                missing.push(format!(
                    "{name}: parameter {} ({}) never NULL",
                    i + 1,
                    p.decl
                ));
            }
            if p.integer && !mine.iter().any(|a| is_extreme(&a[i])) {
                missing.push(format!(
                    "{name}: parameter {} ({}) never given an extreme value (UINT64_MAX, \
                     UINT32_MAX, SIZE_MAX, UNKNOWN_FLAG)",
                    i + 1,
                    p.decl
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} lacks boundary calls (every exported function of include/qdirty.h needs NULL for \
         each pointer and an extreme value for each integer):\n  {}",
        c_path.display(),
        missing.join("\n  ")
    );
}
