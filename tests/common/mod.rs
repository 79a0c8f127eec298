//! Shared harness of the QEMU interop tests (`tests/interop_*.rs`).
//!
//! Everything QEMU says about an image is asked from QEMU's own tools: `qemu-img`, `qemu-io`,
//! `qemu-nbd` + `nbdinfo` (exact dirty extents), and `qemu-storage-daemon` over QMP (bitmap
//! SHA-256). Nothing here depends on files outside the repository, and nothing uses fixed paths:
//! every test works in its own [`TempDir`], so tests can run in parallel threads.
//!
//! When a tool is missing, [`require_qemu`] prints `SKIP <test>: <tool> not installed` on stderr
//! and returns false (the test then returns early), unless `QDIRTY_REQUIRE_QEMU=1`, where it
//! panics.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qdirty::{DirtyBitmap, Image};

// ------------------------------------------------------------------------------------------
// Gate
// ------------------------------------------------------------------------------------------

/// The QEMU tools the interop tests use.
pub const TOOLS: &[&str] = &[
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "nbdinfo",
    "qemu-storage-daemon",
];

/// Whether an executable of that name is on PATH.
pub fn have_tool(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let p = dir.join(tool);
        match std::fs::metadata(&p) {
            Ok(m) => {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            }
            Err(_) => false,
        }
    })
}

/// The gate of every interop test: true when all QEMU tools are installed. Otherwise panics if
/// `QDIRTY_REQUIRE_QEMU=1`, else prints a visible SKIP line and returns false.
pub fn require_qemu(test: &str) -> bool {
    for tool in TOOLS {
        if !have_tool(tool) {
            if std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("{test}: {tool} not installed, and QDIRTY_REQUIRE_QEMU=1");
            }
            // Straight to the stderr handle: libtest captures eprintln! of passing tests,
            // and the skip must be visible.
            let _ = writeln!(std::io::stderr(), "SKIP {test}: {tool} not installed");
            return false;
        }
    }
    true
}

// ------------------------------------------------------------------------------------------
// Temporary directories
// ------------------------------------------------------------------------------------------

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary directory, removed on drop (kept when `QDIRTY_KEEP_TMP=1`).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory whose name contains `tag`, the pid and a counter.
    pub fn new(tag: &str) -> TempDir {
        let n = TMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let path =
            std::env::temp_dir().join(format!("qdirty-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("QDIRTY_KEEP_TMP").as_deref() == Ok("1") {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ------------------------------------------------------------------------------------------
// A minimal JSON parser (qemu-img --output=json, QMP)
// ------------------------------------------------------------------------------------------

/// A JSON value. Numbers keep their text so that u64 values stay exact.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses a complete JSON text.
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(v)
    }

    /// Member of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Member by path of keys.
    pub fn path(&self, keys: &[&str]) -> Option<&Json> {
        keys.iter().try_fold(self, |v, k| v.get(k))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(String, Json)]> {
        match self {
            Json::Obj(m) => Some(m),
            _ => None,
        }
    }
}

/// Encodes a string as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("JSON: {what} at byte {}", self.i))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("bad literal")
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 128 {
            return self.err("nesting too deep");
        }
        match self.peek() {
            None => self.err("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return self.err("expected key");
                    }
                    let k = self.string()?;
                    self.ws();
                    if self.peek() != Some(b':') {
                        return self.err("expected ':'");
                    }
                    self.i += 1;
                    self.ws();
                    let v = self.value(depth + 1)?;
                    m.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    self.ws();
                    a.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'n') => self.lit("null", Json::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while let Some(c) = self.peek() {
                    if c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-') {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                if t.parse::<f64>().is_err() {
                    return self.err("bad number");
                }
                Ok(Json::Num(t.to_string()))
            }
            Some(_) => self.err("unexpected character"),
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        if self.i + 4 > self.s.len() {
            return self.err("short \\u escape");
        }
        let t = std::str::from_utf8(&self.s[self.i..self.i + 4]).map_err(|e| e.to_string())?;
        let v = u32::from_str_radix(t, 16).map_err(|e| format!("JSON: bad \\u escape {t}: {e}"))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| format!("JSON: bad UTF-8: {e}")),
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return self.err("bad escape");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if self.s[self.i..].starts_with(b"\\u") {
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        return self.err("bad surrogate pair");
                                    }
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    return self.err("lone surrogate");
                                }
                            } else {
                                hi
                            };
                            char::from_u32(cp)
                                .ok_or_else(|| format!("JSON: bad code point {cp:x}"))?
                        }
                        _ => return self.err("bad escape"),
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Running tools
// ------------------------------------------------------------------------------------------

/// Directory and file name of an image: QEMU tools run with cwd = the image's directory (a
/// relative external data file name is resolved against the working directory).
pub fn split(img: &Path) -> (PathBuf, String) {
    let dir = img
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = img
        .file_name()
        .expect("image path has a file name")
        .to_string_lossy()
        .into_owned();
    (dir, base)
}

/// Runs a program (stdin closed) and returns its output.
pub fn run(prog: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn describe(prog: &str, args: &[&str], out: &Output) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.len() > 80 {
                format!(
                    "{}...({} bytes)",
                    a.chars().take(40).collect::<String>(),
                    a.len()
                )
            } else {
                a.to_string()
            }
        })
        .collect();
    format!(
        "{prog} {} -> {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a program and panics (with its output) unless it exits 0. Returns stdout.
pub fn run_ok(prog: &str, args: &[&str], cwd: &Path) -> String {
    let out = run(prog, args, cwd);
    assert!(
        out.status.success(),
        "command failed: {}",
        describe(prog, args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE` (cwd = the image's directory). `opts` is the
/// comma-separated option list ("" for none); `extra` goes before the file name (e.g. -b/-F).
pub fn qemu_img_create(img: &Path, size: u64, opts: &str, extra: &[&str]) {
    let (dir, base) = split(img);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend_from_slice(extra);
    args.push(&base);
    args.push(&size);
    run_ok("qemu-img", &args, &dir);
}

/// `qemu-img bitmap --add [-g G] [--disable] IMG NAME`.
pub fn qemu_img_bitmap_add(img: &Path, name: &str, granularity: Option<u64>, disabled: bool) {
    let (dir, base) = split(img);
    let g = granularity.map(|g| g.to_string());
    let mut args = vec!["bitmap", "--add", "-f", "qcow2"];
    if let Some(g) = &g {
        args.extend(["-g", g.as_str()]);
    }
    if disabled {
        args.push("--disable");
    }
    args.push(&base);
    args.push(name);
    run_ok("qemu-img", &args, &dir);
}

/// `qemu-img bitmap OP... IMG NAME` with arbitrary operation arguments.
pub fn qemu_img_bitmap(img: &Path, ops: &[&str], name: &str) {
    let (dir, base) = split(img);
    let mut args = vec!["bitmap", "-f", "qcow2"];
    args.extend_from_slice(ops);
    args.push(&base);
    args.push(name);
    run_ok("qemu-img", &args, &dir);
}

/// `qemu-io -f qcow2 -c CMD... IMG` (cwd = the image's directory); panics on failure. Commands
/// with errors make qemu-io print them but still exit 0, so stdout/stderr are checked too.
pub fn qemu_io(img: &Path, cmds: &[String]) -> String {
    let (dir, base) = split(img);
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&base);
    let out = run("qemu-io", &args, &dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io failed: {}",
        describe("qemu-io", &args, &out)
    );
    stdout
}

/// qemu-io writes of (offset, len) ranges with pattern bytes, in one process.
pub fn qemu_io_write(img: &Path, ranges: &[(u64, u64)]) {
    let cmds: Vec<String> = ranges
        .iter()
        .enumerate()
        .map(|(i, (o, l))| format!("write -P 0x{:02x} {o} {l}", (i % 250) + 1))
        .collect();
    // qemu-io takes many -c arguments; keep the command line well under the kernel limit.
    for chunk in cmds.chunks(200) {
        qemu_io(img, chunk);
    }
}

/// Runs qemu-io with the commands and then `abort`, so that the image stays open: every bitmap
/// QEMU loaded read-write remains in_use on disk. Core dumps are disabled.
pub fn qemu_io_abort(img: &Path, cmds: &[String]) {
    let (dir, base) = split(img);
    let mut script = String::from("ulimit -c 0; exec qemu-io -f qcow2");
    for c in cmds {
        script.push_str(" -c ");
        script.push_str(&shell_quote(c));
    }
    script.push_str(" -c abort ");
    script.push_str(&shell_quote(&base));
    let out = run("sh", &["-c", &script], &dir);
    // SIGABRT: the shell exec'ed qemu-io, so the status is a signal, not an exit code.
    assert!(
        !out.status.success(),
        "qemu-io abort unexpectedly succeeded: {}",
        describe("sh", &["-c", &script], &out)
    );
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

// ------------------------------------------------------------------------------------------
// qemu-img info / check / compare
// ------------------------------------------------------------------------------------------

/// `qemu-img info --output=json [-U] IMG`, parsed.
pub fn qemu_img_info(img: &Path, force_share: bool) -> Json {
    let (dir, base) = split(img);
    let mut args = vec!["info", "--output=json", "-f", "qcow2"];
    if force_share {
        args.push("-U");
    }
    args.push(&base);
    let out = run_ok("qemu-img", &args, &dir);
    Json::parse(&out).unwrap_or_else(|e| panic!("qemu-img info output: {e}\n{out}"))
}

/// A bitmap as `qemu-img info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuBitmapInfo {
    pub name: String,
    pub granularity: u64,
    pub flags: Vec<String>,
}

impl QemuBitmapInfo {
    pub fn auto(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

/// The bitmaps `qemu-img info` reports (format-specific.data.bitmaps), in its order.
pub fn qemu_img_info_bitmaps(img: &Path, force_share: bool) -> Vec<QemuBitmapInfo> {
    let info = qemu_img_info(img, force_share);
    bitmaps_of_info(&info)
}

/// The bitmaps listed in a parsed `qemu-img info`.
pub fn bitmaps_of_info(info: &Json) -> Vec<QemuBitmapInfo> {
    let Some(list) = info
        .path(&["format-specific", "data", "bitmaps"])
        .and_then(Json::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|b| QemuBitmapInfo {
            name: b
                .get("name")
                .and_then(Json::as_str)
                .expect("bitmap name")
                .to_string(),
            granularity: b
                .get("granularity")
                .and_then(Json::as_u64)
                .expect("granularity"),
            flags: b
                .get("flags")
                .and_then(Json::as_array)
                .unwrap_or(&[])
                .iter()
                .map(|f| f.as_str().expect("flag").to_string())
                .collect(),
        })
        .collect()
}

/// What `qemu-img check --output=json` said.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub exit_code: i32,
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub stdout: String,
    pub stderr: String,
}

impl CheckResult {
    /// Exit 0, no errors, no corruptions, no leaks.
    pub fn clean(&self) -> bool {
        self.exit_code == 0 && self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "qemu-img check exit {} (check-errors {}, corruptions {}, leaks {})\nstdout: {}\nstderr: {}",
            self.exit_code, self.check_errors, self.corruptions, self.leaks, self.stdout, self.stderr
        )
    }
}

/// `qemu-img check --output=json IMG` with optional extra arguments (e.g. `-r leaks`).
pub fn qemu_img_check_args(img: &Path, extra: &[&str]) -> CheckResult {
    let (dir, base) = split(img);
    let mut args = vec!["check", "--output=json", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.push(&base);
    let out = run("qemu-img", &args, &dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let js = Json::parse(stdout.trim()).unwrap_or(Json::Obj(Vec::new()));
    let n = |k: &str| js.get(k).and_then(Json::as_u64).unwrap_or(0);
    CheckResult {
        exit_code: out.status.code().unwrap_or(-1),
        check_errors: n("check-errors"),
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `qemu-img check --output=json IMG`.
pub fn qemu_img_check(img: &Path) -> CheckResult {
    qemu_img_check_args(img, &[])
}

/// Panics unless `qemu-img check` is clean.
pub fn assert_check_clean(img: &Path, context: &str) {
    let c = qemu_img_check(img);
    assert!(c.clean(), "{context}: {} is not clean: {c}", img.display());
}

/// `qemu-img compare -f qcow2 -F qcow2 A B`: exit code (0 identical guest data) and output.
pub fn qemu_img_compare(a: &Path, b: &Path) -> (i32, String) {
    let (dir, _) = split(a);
    let a = a.to_string_lossy();
    let b = b.to_string_lossy();
    let out = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", &a, &b],
        &dir,
    );
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// ------------------------------------------------------------------------------------------
// NBD: exact dirty extents as QEMU exports them
// ------------------------------------------------------------------------------------------

/// Merges adjacent or overlapping (offset, length) runs; drops empty ones. Input may be unsorted.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in runs {
        if let Some(last) = out.last_mut() {
            if o <= last.0 + last.1 {
                let end = (o + l).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        out.push((o, l));
    }
    out
}

fn nbdinfo_map(img: &Path, name: &str) -> Output {
    let (dir, base) = split(img);
    let ctx = format!("--map=qemu:dirty-bitmap:{name}");
    run(
        "nbdinfo",
        &[
            &ctx, "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, &base, "]",
        ],
        &dir,
    )
}

/// The dirty runs of persistent bitmap `name` as QEMU exports them (`qemu-nbd -B NAME` +
/// `nbdinfo --map=qemu:dirty-bitmap:NAME`), adjacent runs merged. Panics if QEMU refuses.
pub fn nbd_dirty_extents(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = nbdinfo_map(img, name);
    assert!(
        out.status.success(),
        "nbdinfo/qemu-nbd failed for bitmap '{}' of {}: {}\n{}",
        short(name),
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut runs = Vec::new();
    let mut covered = 0u64;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(o), Ok(l), Ok(t)) = (
            f[0].parse::<u64>(),
            f[1].parse::<u64>(),
            f[2].parse::<u64>(),
        ) else {
            panic!("unexpected nbdinfo line: {line:?}");
        };
        assert_eq!(o, covered, "nbdinfo extents are not contiguous: {text}");
        covered = o + l;
        if t & 1 != 0 {
            runs.push((o, l));
        }
    }
    merge_runs(runs)
}

/// The error QEMU gives when exporting bitmap `name` (None if the export works).
pub fn nbd_refusal(img: &Path, name: &str) -> Option<String> {
    let out = nbdinfo_map(img, name);
    if out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A name shortened for messages.
pub fn short(name: &str) -> String {
    if name.len() > 40 {
        format!(
            "{}...({} bytes)",
            name.chars().take(24).collect::<String>(),
            name.len()
        )
    } else {
        name.to_string()
    }
}

// ------------------------------------------------------------------------------------------
// QMP client for qemu-storage-daemon
// ------------------------------------------------------------------------------------------

/// A running qemu-storage-daemon with a QMP monitor on a UNIX socket. The qcow2 node is "fmt0".
/// Dropping it kills the process (SIGKILL) if it is still running.
pub struct Qsd {
    child: Option<Child>,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    log: PathBuf,
}

/// QMP timeout for one reply.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

impl Qsd {
    /// Starts qemu-storage-daemon on `img` (cwd = the image's directory), read-only or not, and
    /// negotiates QMP capabilities. The socket and log live in `tmp`.
    pub fn start(img: &Path, read_only: bool, tmp: &TempDir) -> Qsd {
        let (dir, base) = split(img);
        let n = TMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let sock = tmp.join(&format!("qmp{n}.sock"));
        let log = tmp.join(&format!("qsd{n}.log"));
        let _ = std::fs::remove_file(&sock);
        let ro = if read_only { ",read-only=on" } else { "" };
        let file_arg = format!(
            "driver=file,filename={},node-name=file0{ro}",
            base.replace(',', ",,")
        );
        let fmt_arg = format!("driver=qcow2,file=file0,node-name=fmt0{ro}");
        let chardev = format!("socket,path={},server=on,wait=off,id=mon0", sock.display());
        let logf = std::fs::File::create(&log).expect("qsd log");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &file_arg,
                "--blockdev",
                &fmt_arg,
                "--chardev",
                &chardev,
                "--monitor",
                "chardev=mon0",
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-storage-daemon: {e}"));
        let mut child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "qemu-storage-daemon exited early ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!("qemu-storage-daemon: no QMP socket after 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).expect("timeout");
        stream
            .set_write_timeout(Some(QMP_TIMEOUT))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone socket"));
        let mut q = Qsd {
            child,
            stream,
            reader,
            log,
        };
        let greeting = q.read_msg();
        assert!(
            greeting.get("QMP").is_some(),
            "unexpected QMP greeting: {greeting:?}"
        );
        q.execute("qmp_capabilities", None)
            .expect("qmp_capabilities");
        q
    }

    fn read_msg(&mut self) -> Json {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap_or_else(|e| {
            panic!(
                "QMP read failed: {e}; daemon log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        assert!(
            n > 0,
            "QMP connection closed; daemon log: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        Json::parse(line.trim()).unwrap_or_else(|e| panic!("bad QMP message {line:?}: {e}"))
    }

    /// Sends a command (`args` is a JSON object text or None) and waits for its reply, skipping
    /// events. Ok(return value) or Err(the error's "desc").
    pub fn execute(&mut self, cmd: &str, args: Option<&str>) -> Result<Json, String> {
        let msg = match args {
            Some(a) => format!("{{\"execute\":{},\"arguments\":{a}}}\n", json_str(cmd)),
            None => format!("{{\"execute\":{}}}\n", json_str(cmd)),
        };
        self.stream.write_all(msg.as_bytes()).expect("QMP write");
        loop {
            let r = self.read_msg();
            // Events, and a repeated greeting: qemu-storage-daemon 10.0.2 sometimes greets a
            // client that connected while its monitor was starting twice (seen once in CI).
            if r.get("event").is_some() || r.get("QMP").is_some() {
                continue;
            }
            if let Some(v) = r.get("return") {
                return Ok(v.clone());
            }
            if let Some(e) = r.get("error") {
                return Err(e
                    .get("desc")
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_string());
            }
            panic!("unexpected QMP message: {r:?}");
        }
    }

    /// Like execute, panicking on an error.
    pub fn exec_ok(&mut self, cmd: &str, args: &str) -> Json {
        self.execute(cmd, Some(args))
            .unwrap_or_else(|e| panic!("QMP {cmd} {}: {e}", short(args)))
    }

    /// block-dirty-bitmap-add on fmt0.
    pub fn bitmap_add(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) {
        let mut a = format!(
            "{{\"node\":\"fmt0\",\"name\":{},\"persistent\":{persistent},\"disabled\":{disabled}",
            json_str(name)
        );
        if let Some(g) = granularity {
            let _ = write!(a, ",\"granularity\":{g}");
        }
        a.push('}');
        self.exec_ok("block-dirty-bitmap-add", &a);
    }

    /// x-debug-block-dirty-bitmap-sha256 on fmt0.
    pub fn sha256(&mut self, name: &str) -> String {
        let r = self.exec_ok(
            "x-debug-block-dirty-bitmap-sha256",
            &format!("{{\"node\":\"fmt0\",\"name\":{}}}", json_str(name)),
        );
        r.get("sha256")
            .and_then(Json::as_str)
            .expect("sha256 in reply")
            .to_string()
    }

    /// Sends quit and waits for the process to end (QEMU stores persistent bitmaps). The
    /// connection may close before or after the reply; both are fine.
    pub fn quit(mut self) {
        self.stream
            .write_all(b"{\"execute\":\"quit\"}\n")
            .expect("QMP write");
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.contains("\"return\"") => break,
                Ok(_) if line.contains("\"error\"") => panic!("QMP quit failed: {line}"),
                Ok(_) => continue,
            }
        }
        self.wait_exit(Duration::from_secs(20));
    }

    fn wait_exit(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "qemu-storage-daemon exit {status}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("qemu-storage-daemon did not exit after quit");
                }
            }
        }
    }

    /// Kills the daemon with SIGKILL (bitmaps loaded read-write stay in_use) and reaps it.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL qemu-storage-daemon");
            let _ = c.wait();
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// QEMU's SHA-256 of each named bitmap, from a read-only qemu-storage-daemon.
pub fn qemu_sha256s(img: &Path, names: &[String], tmp: &TempDir) -> BTreeMap<String, String> {
    let mut q = Qsd::start(img, true, tmp);
    let out = names.iter().map(|n| (n.clone(), q.sha256(n))).collect();
    q.quit();
    out
}

// ------------------------------------------------------------------------------------------
// qdirty side
// ------------------------------------------------------------------------------------------

/// The dirty runs of a qdirty bitmap, from next_dirty_area, adjacent runs merged.
pub fn qdirty_runs(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    let size = bm.size();
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some((start, len)) = bm.next_dirty_area(pos, size, u64::MAX) else {
            break;
        };
        assert!(
            len > 0 && start >= pos,
            "next_dirty_area({pos}, {size}) returned ({start}, {len})"
        );
        runs.push((start, len));
        pos = start + len;
    }
    merge_runs(runs)
}

/// Name (lossy UTF-8) of a qdirty bitmap.
pub fn bm_name(bm: &DirtyBitmap) -> String {
    bm.name()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default()
}

/// Opens an image with qdirty, panicking with the error.
pub fn qd_open(img: &Path, rw: bool) -> Image {
    Image::open(img, rw).unwrap_or_else(|e| panic!("qdirty open {} (rw={rw}): {e}", img.display()))
}

/// The bitmaps of a qdirty image by name: (name, a loaded copy of the bitmap, up to date).
pub fn qd_bitmaps(img: &mut Image) -> Vec<(String, DirtyBitmap)> {
    img.bitmap_ids()
        .into_iter()
        .map(|id| img.bitmap_current(id).expect("listed id").clone())
        .map(|b| (bm_name(&b), b))
        .collect()
}

/// Adds a persistent bitmap with qdirty.
pub fn qd_add(img: &mut Image, name: &str, granularity: u64, disabled: bool) -> qdirty::BitmapId {
    img.add_bitmap(
        name.as_bytes(),
        granularity,
        qdirty::AddOptions {
            persistent: true,
            disabled,
            autoload: None,
        },
    )
    .unwrap_or_else(|e| panic!("qdirty add_bitmap {}: {e}", short(name)))
}

/// The qdirty bitmap of that name, for changes.
pub fn qd_bm_mut<'a>(img: &'a mut Image, name: &str) -> &'a mut DirtyBitmap {
    let id = img
        .find_bitmap(name.as_bytes())
        .unwrap_or_else(|| panic!("qdirty has no bitmap {}", short(name)));
    img.bitmap_mut(id).expect("found id")
}

/// The qdirty bitmap of that name, up to date and loaded.
pub fn qd_bm<'a>(img: &'a mut Image, name: &str) -> &'a DirtyBitmap {
    let id = img
        .find_bitmap(name.as_bytes())
        .unwrap_or_else(|| panic!("qdirty has no bitmap {}", short(name)));
    img.bitmap_current(id)
        .unwrap_or_else(|e| panic!("qdirty bitmap {}: {e}", short(name)))
}

// ------------------------------------------------------------------------------------------
// Models computed independently of qdirty
// ------------------------------------------------------------------------------------------

/// The runs a bitmap of granularity `g` over a `size`-byte disk has after setting `ranges`:
/// each range rounded outward to granules, clamped to the disk end, merged.
pub fn expected_runs(ranges: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let runs = ranges
        .iter()
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|&(o, l)| {
            let s = o / g * g;
            let e = (o + l).div_ceil(g).saturating_mul(g).min(size);
            (s, e - s)
        })
        .collect();
    merge_runs(runs)
}

/// Re-rounds existing runs to granularity `g` (what a merge into a bitmap of granularity g gives).
pub fn regranulate(runs: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    expected_runs(runs, g, size)
}

/// Union of two run lists.
pub fn union_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    merge_runs(a.iter().chain(b.iter()).copied().collect())
}

/// A small deterministic PRNG (xorshift64*).
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// `count` pseudo-random (offset, length) ranges inside a `size`-byte disk: offsets and
/// lengths are multiples of `align` (1 gives arbitrary byte ranges), lengths 1..=max_len
/// (rounded up to `align`) and clamped to the disk end.
pub fn random_ranges(
    rng: &mut Prng,
    count: usize,
    size: u64,
    max_len: u64,
    align: u64,
) -> Vec<(u64, u64)> {
    (0..count)
        .map(|_| {
            let off = rng.below(size / align) * align;
            let max = max_len.min(size - off).max(1);
            let len = (1 + rng.below(max)).div_ceil(align) * align;
            (off, len.min(size - off).max(1))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Raw header access (to flip bits and inspect extensions the way the tests need)
// ------------------------------------------------------------------------------------------

pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub fn be_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Reads `len` bytes at `off` of a file.
pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    buf
}

/// Writes bytes at `off` of a file (no truncation).
pub fn write_at(p: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    f.sync_all().expect("sync");
}

/// The autoclear feature field (u64 BE at offset 88).
pub fn autoclear(p: &Path) -> u64 {
    be_u64(&read_at(p, 88, 8), 0)
}

/// Overwrites the autoclear feature field.
pub fn set_autoclear(p: &Path, v: u64) {
    write_at(p, 88, &v.to_be_bytes());
}

/// Magic of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Magic of the end of the extension area.
pub const EXT_END: u32 = 0;

/// The header and extensions of cluster 0, parsed independently of qdirty.
#[derive(Clone, Debug)]
pub struct RawHeader {
    pub version: u32,
    pub cluster_bits: u32,
    pub backing_file_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub autoclear: u64,
    pub header_length: u32,
    /// (magic, data) in file order, end marker excluded.
    pub extensions: Vec<(u32, Vec<u8>)>,
    /// Raw cluster 0 bytes.
    pub cluster0: Vec<u8>,
}

impl RawHeader {
    pub fn ext(&self, magic: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.0 == magic)
            .map(|e| &e.1[..])
    }
}

/// Parses cluster 0 of a qcow2 file.
pub fn raw_header(p: &Path) -> RawHeader {
    let head = read_at(p, 0, 104);
    assert_eq!(
        be_u32(&head, 0),
        0x5146_49FB,
        "not a qcow2 file: {}",
        p.display()
    );
    let version = be_u32(&head, 4);
    let cluster_bits = be_u32(&head, 20);
    let cs = 1usize << cluster_bits;
    let len = std::fs::metadata(p).expect("stat").len() as usize;
    let c0 = read_at(p, 0, cs.min(len));
    let (autoclear, header_length) = if version >= 3 {
        (be_u64(&c0, 88), be_u32(&c0, 100))
    } else {
        (0, 72)
    };
    let backing_file_offset = be_u64(&c0, 8);
    let end = if backing_file_offset != 0 {
        backing_file_offset as usize
    } else {
        c0.len()
    };
    let mut extensions = Vec::new();
    let mut off = header_length as usize;
    while off + 8 <= end {
        let magic = be_u32(&c0, off);
        let l = be_u32(&c0, off + 4) as usize;
        if magic == EXT_END {
            break;
        }
        assert!(
            off + 8 + l <= end,
            "extension {magic:#x} overflows cluster 0"
        );
        extensions.push((magic, c0[off + 8..off + 8 + l].to_vec()));
        off += 8 + l.next_multiple_of(8);
    }
    RawHeader {
        version,
        cluster_bits,
        backing_file_offset,
        refcount_table_offset: be_u64(&c0, 48),
        refcount_table_clusters: be_u32(&c0, 56),
        autoclear,
        header_length,
        extensions,
        cluster0: c0,
    }
}

/// Rewrites cluster 0 of a v3 image without a backing file: `unknown_fields` are appended after
/// the 112-byte header (header_length grows accordingly) and `extensions` replace the extension
/// area (end marker added).
pub fn rewrite_header(p: &Path, unknown_fields: &[u8], extensions: &[(u32, Vec<u8>)]) {
    let h = raw_header(p);
    assert_eq!(h.version, 3);
    assert_eq!(
        h.backing_file_offset, 0,
        "rewrite_header does not handle backing files"
    );
    let mut c0 = h.cluster0[..112].to_vec();
    c0.extend_from_slice(unknown_fields);
    let hl = c0.len() as u32;
    c0[100..104].copy_from_slice(&hl.to_be_bytes());
    for (magic, data) in extensions {
        c0.extend_from_slice(&magic.to_be_bytes());
        c0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        c0.extend_from_slice(data);
        c0.resize(c0.len().next_multiple_of(8), 0);
    }
    c0.extend_from_slice(&[0u8; 8]);
    assert!(
        c0.len() <= h.cluster0.len(),
        "header does not fit in cluster 0"
    );
    c0.resize(h.cluster0.len(), 0);
    write_at(p, 0, &c0);
}

/// Copies a file.
pub fn copy(a: &Path, b: &Path) {
    std::fs::copy(a, b).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", a.display(), b.display()));
}

/// Human-readable diff of two run lists.
pub fn diff_runs(qemu: &[(u64, u64)], qdirty: &[(u64, u64)]) -> String {
    let only_q: Vec<_> = qemu
        .iter()
        .filter(|r| !qdirty.contains(r))
        .take(5)
        .collect();
    let only_d: Vec<_> = qdirty
        .iter()
        .filter(|r| !qemu.contains(r))
        .take(5)
        .collect();
    format!(
        "QEMU has {} runs / {} bytes, qdirty {} runs / {} bytes; first QEMU-only {:?}; first qdirty-only {:?}",
        qemu.len(),
        qemu.iter().map(|r| r.1).sum::<u64>(),
        qdirty.len(),
        qdirty.iter().map(|r| r.1).sum::<u64>(),
        only_q,
        only_d
    )
}

/// Asserts that qdirty's view of every bitmap of `img` equals QEMU's: same names, granularity,
/// enabled == auto, not inconsistent, dirty runs equal to nbdinfo's. Returns QEMU's runs by name.
pub fn assert_qdirty_matches_qemu(img: &Path, context: &str) -> BTreeMap<String, Vec<(u64, u64)>> {
    let qemu = qemu_img_info_bitmaps(img, false);
    let mut image = qd_open(img, false);
    let mine = qd_bitmaps(&mut image);
    let mut qn: Vec<&str> = qemu.iter().map(|b| b.name.as_str()).collect();
    let mut dn: Vec<&str> = mine.iter().map(|b| b.0.as_str()).collect();
    qn.sort_unstable();
    dn.sort_unstable();
    assert_eq!(
        qn.iter().map(|n| short(n)).collect::<Vec<_>>(),
        dn.iter().map(|n| short(n)).collect::<Vec<_>>(),
        "{context}: bitmap names (QEMU left, qdirty right)"
    );
    let mut out = BTreeMap::new();
    for q in &qemu {
        let (_, b) = mine.iter().find(|m| m.0 == q.name).expect("same names");
        let n = short(&q.name);
        assert!(
            !q.in_use(),
            "{context}: QEMU says '{n}' is in use; the test expected a clean image"
        );
        assert_eq!(
            b.granularity(),
            q.granularity,
            "{context}: granularity of '{n}'"
        );
        assert_eq!(
            b.enabled(),
            q.auto(),
            "{context}: '{n}' enabled (qdirty) vs auto flag (QEMU) {:?}",
            q.flags
        );
        assert!(
            !b.inconsistent(),
            "{context}: qdirty says '{n}' is inconsistent"
        );
        assert!(
            b.persistent(),
            "{context}: qdirty says '{n}' is not persistent"
        );
        assert_eq!(b.size(), image.size(), "{context}: size of '{n}'");
        let qr = nbd_dirty_extents(img, &q.name);
        let dr = qdirty_runs(b);
        assert!(
            qr == dr,
            "{context}: dirty runs of '{n}' differ: {}",
            diff_runs(&qr, &dr)
        );
        let granules: u64 = qr.iter().map(|r| r.1.div_ceil(q.granularity)).sum();
        assert_eq!(
            b.count(),
            granules * q.granularity,
            "{context}: count() of '{n}' vs QEMU's dirty granules"
        );
        out.insert(q.name.clone(), qr);
    }
    image
        .close()
        .unwrap_or_else(|e| panic!("{context}: read-only close: {e}"));
    out
}

/// Asserts that qdirty's SHA-256 of every bitmap equals QEMU's x-debug-block-dirty-bitmap-sha256.
pub fn assert_sha256_match(img: &Path, tmp: &TempDir, context: &str) {
    let mut image = qd_open(img, false);
    let mine: Vec<(String, String)> = qd_bitmaps(&mut image)
        .into_iter()
        .map(|(n, b)| (n, b.sha256().expect("sha256")))
        .collect();
    image.close().expect("read-only close");
    let names: Vec<String> = mine.iter().map(|m| m.0.clone()).collect();
    let qemu = qemu_sha256s(img, &names, tmp);
    for (n, sha) in &mine {
        assert_eq!(
            &qemu[n],
            sha,
            "{context}: sha256 of '{}' (QEMU left, qdirty right)",
            short(n)
        );
    }
}
