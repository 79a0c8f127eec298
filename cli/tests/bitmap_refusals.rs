//! `qdirty bitmap` against `qemu-img bitmap` itself: every refusal qemu-img can be made to
//! print (usage, option values, formats, bitmap operations, opening, image options and
//! `json:` pseudo-filenames, locks held by qemu-io and qemu-storage-daemon, unreadable files),
//! plus some accepted cases. Each case runs both programs on copies of the same images, with
//! the same relative names, and compares the exit code, the whole of stderr (normalizing only
//! the program name, and QEMU's automatic node name `#blockNNN`, which qdirty shows as the
//! file's name) and the bitmaps of every image afterwards (qemu-img info).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qdirty_testkit::*;

const QDIRTY: &str = env!("CARGO_BIN_EXE_qdirty");

/// Who holds an image while the case runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Holder {
    None,
    /// qemu-io, read-write, on the named image.
    QemuIo(&'static str),
    /// qemu-io -r.
    QemuIoRo(&'static str),
    /// qemu-storage-daemon, read-write.
    Qsd(&'static str),
}

struct Case {
    args: Vec<String>,
    holder: Holder,
    /// Run both programs as an unprivileged user (read-only files mean something then).
    nobody: bool,
    /// The file QEMU's automatic node name stands for in the messages.
    node_file: &'static str,
}

fn case(args: &[&str]) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        holder: Holder::None,
        nobody: false,
        node_file: "a.qcow2",
    }
}

fn held(args: &[&str], holder: Holder) -> Case {
    Case {
        holder,
        ..case(args)
    }
}

fn node(args: &[&str], node_file: &'static str) -> Case {
    Case {
        node_file,
        ..case(args)
    }
}

/// The images every case starts from, made by QEMU's tools.
fn fixture(dir: &Path) {
    let a = dir.join("a.qcow2");
    qemu_img_create(&a, 64 << 20, "", &[]);
    qemu_img_bitmap_add(&a, "b1", None, false);
    qemu_img_bitmap_add(&a, "b2", Some(4096), false);
    qemu_io_write(&a, &[(0, 4096), (5 << 20, 100_000)]);
    qemu_img_bitmap(&a, &["--disable"], "b2");
    let small = dir.join("small.qcow2");
    qemu_img_create(&small, 32 << 20, "", &[]);
    qemu_img_bitmap_add(&small, "s", None, false);
    qemu_io_write(&small, &[(1 << 20, 65536)]);
    let used = dir.join("used.qcow2");
    copy(&a, &used);
    qemu_io_abort(&used, &[]);
    qemu_img_create(&dir.join("v2.qcow2"), 64 << 20, "compat=0.10", &[]);
    qemu_img_create(&dir.join("big.qcow2"), 1 << 42, "", &[]);
    std::fs::write(dir.join("text.qcow2"), b"not an image\n".repeat(100)).unwrap();
    std::fs::create_dir(dir.join("dir")).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    std::fs::write(dir.join("trunc.qcow2"), &bytes[..50]).unwrap();
    // Header fields patched: incompatible features (offset 72), version (offset 4).
    let corrupt = dir.join("corrupt.qcow2");
    copy(&a, &corrupt);
    write_at(&corrupt, 72, &2u64.to_be_bytes());
    let feature = dir.join("feature.qcow2");
    copy(&a, &feature);
    write_at(&feature, 72, &(1u64 << 60).to_be_bytes());
    let v4 = dir.join("v4.qcow2");
    copy(&a, &v4);
    write_at(&v4, 4, &4u32.to_be_bytes());
    let ro = dir.join("ro.qcow2");
    copy(&a, &ro);
    chmod(&ro, 0o444);
    let hidden = dir.join("hidden.qcow2");
    copy(&small, &hidden);
    chmod(&hidden, 0o000);
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir(&dst).unwrap();
        } else {
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                e.metadata().unwrap().permissions().mode()
            };
            chmod(&e.path(), 0o644);
            std::fs::copy(e.path(), &dst).unwrap();
            chmod(&e.path(), mode);
            chmod(&dst, mode);
        }
    }
}

/// The inode of a file, to find its locks in /proc/locks.
fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

/// Waits until some process holds an OFD lock on `p` (QEMU took its image locks).
fn wait_locked(p: &Path) {
    let needle = format!(":{} ", inode(p));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&needle))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nobody locked {}", p.display());
}

enum Held {
    Io(Child),
    Qsd(Qsd),
}

fn hold(holder: Holder, dir: &Path, tmp: &TempDir) -> Option<Held> {
    let (file, ro) = match holder {
        Holder::None => return None,
        Holder::QemuIo(f) => (f, false),
        Holder::QemuIoRo(f) => (f, true),
        Holder::Qsd(f) => {
            let q = Qsd::start(&dir.join(f), false, tmp);
            wait_locked(&dir.join(f));
            return Some(Held::Qsd(q));
        }
    };
    let mut args = vec!["-f", "qcow2"];
    if ro {
        args.push("-r");
    }
    args.push(file);
    // Interactive qemu-io keeps the image open while its stdin stays open.
    let child = Command::new("qemu-io")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    wait_locked(&dir.join(file));
    Some(Held::Io(child))
}

fn release(h: Option<Held>) {
    match h {
        None => {}
        Some(Held::Io(mut c)) => {
            // End of input: qemu-io closes the image properly (no bitmap left in use).
            drop(c.stdin.take());
            let t0 = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t0.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Some(Held::Qsd(q)) => q.quit(),
    }
}

fn run_as(prog: &str, args: &[String], dir: &Path, nobody: bool) -> Output {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            prog,
        ]);
        c
    } else {
        Command::new(prog)
    };
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// The bitmaps of every image of a directory, as qemu-img info -U shows them.
fn state(dir: &Path) -> Vec<(String, String)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let o = run("qemu-img", &["info", "-U", "--output=json", &n], dir);
            let js = Json::parse(&String::from_utf8_lossy(&o.stdout));
            let bitmaps = js
                .ok()
                .map(|j| format!("{:?}", bitmaps_of_info(&j)))
                .unwrap_or_default();
            (n, bitmaps)
        })
        .collect()
}

fn normalize_qemu(err: &str, node_file: &str) -> String {
    let mut out = String::new();
    let mut rest = err;
    while let Some(p) = rest.find("#block") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 6..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(node_file);
        rest = &after[digits..];
    }
    out.push_str(rest);
    out.replace("qemu-img", "qdirty")
}

fn cases() -> Vec<Case> {
    let long_name = "x".repeat(1100);
    let json_a = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}"#;
    let mut v = vec![
        // Usage and getopt.
        case(&[]),
        case(&["a.qcow2", "b1"]),
        case(&["--bogus", "a.qcow2", "b1"]),
        case(&["--bogus=1", "a.qcow2", "b1"]),
        case(&["-x", "a.qcow2", "b1"]),
        case(&["--add=1", "a.qcow2", "b1"]),
        case(&["--add", "--merge"]),
        case(&["--add", "a.qcow2", "b1", "-g"]),
        case(&["--source-f", "x", "--add", "a.qcow2", "b1"]),
        case(&["--add", "a.qcow2"]),
        case(&["--add", "a.qcow2", "b1", "extra"]),
        case(&["--add"]),
        case(&["--clear", "-g", "64k", "a.qcow2", "b1"]),
        case(&["--merge", "b2", "-F", "qcow2", "a.qcow2", "b1"]),
        case(&["--add", "-b", "small.qcow2", "a.qcow2", "n"]),
        case(&["--add", "-g", "1k1", "--bogus", "a.qcow2", "n"]),
        case(&["--bogus", "-g", "1k1", "a.qcow2", "n"]),
        case(&["-g", "1k1"]),
        case(&["--add", "-h", "--bogus"]),
        case(&["--rem", "a.qcow2", "b2"]),
        case(&["--mer", "a.qcow2", "b1"]),
        // Granularity values.
        case(&["--add", "-g", "-1", "a.qcow2", "n"]),
        case(&["--add", "-g", "-1k", "a.qcow2", "n"]),
        case(&["--add", "-g", "8E", "a.qcow2", "n"]),
        case(&["--add", "-g", "4G", "a.qcow2", "n"]),
        case(&["--add", "-g", "0", "a.qcow2", "n"]),
        case(&["--add", "-g", "100", "a.qcow2", "n"]),
        case(&["--add", "-g", "3000", "a.qcow2", "n"]),
        case(&["--add", "-g", "4T", "a.qcow2", "n"]),
        case(&["--add", "-g", "1.5", "a.qcow2", "n"]),
        case(&["--add", "-g", "", "a.qcow2", "n"]),
        case(&["--add", "-g", "6G", "a.qcow2", "n"]),
        case(&["--add", "-g", " 0x200", "a.qcow2", "n"]),
        node(&["--add", "-g", "512", "big.qcow2", "n"], "big.qcow2"),
        // Formats.
        case(&["-f", "raw", "--add", "a.qcow2", "n"]),
        case(&["-f", "raw", "--add", "-g", "100", "a.qcow2", "n"]),
        case(&["-f", "raw", "--remove", "a.qcow2", "b1"]),
        case(&["-f", "raw", "--merge", "b2", "a.qcow2", "b1"]),
        case(&["-f", "nonsense", "--add", "a.qcow2", "n"]),
        case(&["-f", "qcow2", "-f", "raw", "--add", "a.qcow2", "n"]),
        node(&["--add", "text.qcow2", "n"], "text.qcow2"),
        case(&["-f", "qcow2", "--add", "text.qcow2", "n"]),
        // Bitmap operations.
        case(&["--add", "a.qcow2", "b1"]),
        case(&["--add", "--add", "a.qcow2", "n"]),
        case(&["--add", "--merge", "nope", "a.qcow2", "n"]),
        case(&["--remove", "a.qcow2", "nope"]),
        case(&["--clear", "a.qcow2", "nope"]),
        case(&["--enable", "a.qcow2", "nope"]),
        case(&["--disable", "a.qcow2", "nope"]),
        case(&["--merge", "nope", "a.qcow2", "b1"]),
        case(&["--merge", "b1", "a.qcow2", "nope"]),
        case(&["--merge", "s", "-b", "small.qcow2", "a.qcow2", "b1"]),
        case(&["--merge", "b1", "-b", "missing.qcow2", "a.qcow2", "b1"]),
        case(&[
            "--add",
            "--merge",
            "b1",
            "-b",
            "missing.qcow2",
            "a.qcow2",
            "n",
        ]),
        case(&[
            "--merge",
            "b1",
            "-b",
            "small.qcow2",
            "-F",
            "raw",
            "a.qcow2",
            "b1",
        ]),
        case(&[
            "--merge",
            "b1",
            "-b",
            "small.qcow2",
            "-F",
            "nonsense",
            "a.qcow2",
            "b1",
        ]),
        case(&["--merge", "s", "-b", "text.qcow2", "a.qcow2", "b1"]),
        case(&["--add", "a.qcow2", ""]),
        case(&["--add", "a.qcow2", &long_name]),
        node(&["--add", "v2.qcow2", "n"], "v2.qcow2"),
        case(&["--remove", "v2.qcow2", "n"]),
        case(&["--clear", "used.qcow2", "b1"]),
        case(&["--enable", "used.qcow2", "b1"]),
        case(&["--disable", "used.qcow2", "b2"]),
        case(&["--merge", "b1", "used.qcow2", "b2"]),
        case(&["--merge", "b1", "-b", "used.qcow2", "a.qcow2", "b2"]),
        case(&["--merge", "b2", "-b", "a.qcow2", "used.qcow2", "b1"]),
        case(&["--remove", "used.qcow2", "b1"]),
        // Opening.
        case(&["--add", "missing.qcow2", "n"]),
        case(&["--add", "dir", "n"]),
        case(&["--add", "", "n"]),
        case(&["--add", "corrupt.qcow2", "n"]),
        case(&["--add", "feature.qcow2", "n"]),
        case(&["--add", "v4.qcow2", "n"]),
        case(&["--add", "-f", "qcow2", "trunc.qcow2", "n"]),
        // --image-opts and json: pseudo-filenames.
        case(&[
            "--add",
            "-f",
            "qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=a.qcow2",
            "n",
        ]),
        case(&["--add", "--image-opts", "file.filename=a.qcow2", "n"]),
        case(&["--add", "--image-opts", "a.qcow2", "n"]),
        case(&["--add", "--image-opts", "driver=qcow2", "n"]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.driver=file",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=nonsense,file.filename=a.qcow2",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.driver=nonsense,file.filename=a.qcow2",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,bogus=1",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,file.bogus=1",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,lazy-refcounts=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,file.locking=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,read-only=on",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,force-share=on",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,cache-size=x",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,cache-clean-interval=x",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,overlap-check=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,discard=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,file.aio=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,detect-zeroes=maybe",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,file=x",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,,x",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,lazy-refcounts",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,cache.direct=on,",
            "n",
        ]),
        case(&[
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,driver=raw",
            "n",
        ]),
        case(&["--add", "--image-opts", "driver=file,filename=a.qcow2", "n"]),
        case(&["--add", json_a, "n"]),
        case(&[
            "--add",
            r#"json:{"file":{"driver":"file","filename":"a.qcow2"}}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file.filename":"a.qcow2"}"#,
            "n",
        ]),
        case(&["--add", r#"json:{"driver":"qcow2","file":"a.qcow2"}"#, "n"]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}"#,
            "n",
        ]),
        case(&["--add", "json:[]", "n"]),
        case(&["--add", "json:{}", "n"]),
        case(&["--add", "json:", "n"]),
        case(&["--add", r#"json:{"driver":"qcow2","driver":"raw"}"#, "n"]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"missing.qcow2"}}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"text.qcow2"}}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"cache-size":-1}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"x":[1]}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"node-name":5}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"read-only":"on"}"#,
            "n",
        ]),
        case(&[
            "--add",
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2","locking":false}}"#,
            "n",
        ]),
        case(&["--add", "-f", "raw", json_a, "n"]),
        case(&[
            "--merge",
            "s",
            "-b",
            r#"json:{"driver":"qcow2","file":{"filename":"small.qcow2"}}"#,
            "small.qcow2",
            "s",
        ]),
        case(&["--merge", "b1", "-b", json_a, "a.qcow2", "b2"]),
        // Locks.
        held(&["--add", "a.qcow2", "n"], Holder::QemuIo("a.qcow2")),
        held(&["--add", "a.qcow2", "n"], Holder::QemuIoRo("a.qcow2")),
        held(
            &["--merge", "s", "-b", "small.qcow2", "a.qcow2", "b1"],
            Holder::QemuIo("small.qcow2"),
        ),
        held(
            &["--merge", "s", "-b", "small.qcow2", "a.qcow2", "b1"],
            Holder::QemuIoRo("small.qcow2"),
        ),
        held(&["--clear", "a.qcow2", "b1"], Holder::Qsd("a.qcow2")),
        held(
            &[
                "--add",
                "--image-opts",
                "driver=qcow2,file.filename=a.qcow2,file.locking=off",
                "n",
            ],
            Holder::QemuIoRo("a.qcow2"),
        ),
    ];
    // Unreadable and read-only files mean something to an unprivileged user only.
    for args in [
        &["--add", "ro.qcow2", "n"][..],
        &["--merge", "s", "-b", "hidden.qcow2", "a.qcow2", "b1"],
        &["--add", "hidden.qcow2", "n"],
    ] {
        v.push(Case {
            nobody: true,
            ..case(args)
        });
    }
    v
}

#[test]
fn bitmap_refusals_are_qemu_imgs() {
    if !require_qemu("bitmap_refusals_are_qemu_imgs") {
        return;
    }
    let t = TempDir::new("cli-refusals");
    chmod(t.path(), 0o755);
    let fix = t.join("fixture");
    std::fs::create_dir(&fix).unwrap();
    fixture(&fix);
    // setpriv (util-linux) runs both programs unprivileged; without it, or when not root, the
    // read-only cases run as the current user.
    let can_drop = have_tool("setpriv") && unsafe { libc::geteuid() } == 0;
    let mut failures = Vec::new();
    let mut refusals = 0;
    for (i, c) in cases().iter().enumerate() {
        let qi: PathBuf = t.join(&format!("{i}-qemu"));
        let qd: PathBuf = t.join(&format!("{i}-qdirty"));
        copy_dir(&fix, &qi);
        copy_dir(&fix, &qd);
        for d in [&qi, &qd] {
            chmod(d, 0o777);
        }
        let nobody = c.nobody && can_drop;
        let mut qargs = vec!["bitmap".to_string()];
        qargs.extend(c.args.iter().cloned());
        let h = hold(c.holder, &qi, &t);
        let q = run_as("qemu-img", &qargs, &qi, nobody);
        release(h);
        let h = hold(c.holder, &qd, &t);
        let d = run_as(QDIRTY, &qargs, &qd, nobody);
        release(h);
        let qerr = normalize_qemu(&String::from_utf8_lossy(&q.stderr), c.node_file);
        let derr = String::from_utf8_lossy(&d.stderr).into_owned();
        let (qc, dc) = (q.status.code(), d.status.code());
        if qc != Some(0) {
            refusals += 1;
        }
        let shown: Vec<String> = c
            .args
            .iter()
            .map(|a| {
                if a.len() > 60 {
                    format!("{}...", &a[..20])
                } else {
                    a.clone()
                }
            })
            .collect();
        if qc != dc || qerr != derr {
            failures.push(format!(
                "bitmap {shown:?} ({:?}{}):\n  qemu-img [{qc:?}]: {qerr:?}\n  qdirty   [{dc:?}]: {derr:?}",
                c.holder,
                if nobody { ", unprivileged" } else { "" }
            ));
            continue;
        }
        let (sq, sd) = (state(&qi), state(&qd));
        if sq != sd {
            failures.push(format!(
                "bitmap {shown:?}: images differ afterwards\n  qemu-img: {sq:?}\n  qdirty:   {sd:?}"
            ));
        }
        let _ = std::fs::remove_dir_all(&qi);
        let _ = std::fs::remove_dir_all(&qd);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
    assert!(refusals >= 45, "only {refusals} refusals covered");
}
