//! qemu-img, qemu-io, qemu-nbd and nbdinfo: images made and changed by QEMU, and what QEMU
//! says about them (info, check, compare, the dirty extents it exports over NBD).

use std::path::Path;
use std::process::Output;

use crate::json::Json;
use crate::runs::merge_runs;
use crate::tools::{describe, run, run_ok, shell_quote, short, split};

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
