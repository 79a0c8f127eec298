//! The Python package as a user gets it: `pip install ./python` in a fresh venv (nothing else
//! installed, no `QDIRTY_LIB`, no `PYTHONPATH`), then, from a directory outside the repository,
//! a script opens an image made by qemu-img and lists its bitmaps; `qemu-img info` must list
//! the same. The wheel carries libqdirty (built by pip through setuptools-rust), and the package
//! loads that copy. Also: an sdist builds on its own, `QDIRTY_LIB` overrides the bundled
//! library, and a package built without it (`QDIRTY_PYTHON_SYSTEM_LIB=1`) loads the installed
//! `libqdirty.so.N`.
//!
//! pip fetches the build backend (setuptools, setuptools-rust) from PyPI. cargo's release build
//! of the library inside pip uses this run's target directory (`CARGO_TARGET_DIR`), so it is
//! shared with `cargo build --release` instead of starting from scratch. The time of each step
//! is printed.

mod common;

use qdirty_testkit::clib;

use common::{qemu_img_bitmap_add, qemu_img_create, qemu_img_info_bitmaps, Json, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// pip builds in python/ (setuptools' build/ and egg-info folders): one install at a time.
static PIP: Mutex<()> = Mutex::new(());

/// Lists the bitmaps of the image named on the command line, as JSON, with where the package
/// and the library were loaded from and what the dynamic loader mapped.
const LIST_BITMAPS: &str = r#"
import json, sys
import qdirty
from qdirty import _ffi

with qdirty.Image.open(sys.argv[1]) as img:
    bitmaps = [
        {"name": b.name, "granularity": b.granularity, "enabled": b.enabled,
         "persistent": b.persistent, "inconsistent": b.inconsistent}
        for b in img
    ]
with open("/proc/self/maps") as f:
    mapped = sorted({l.split()[-1] for l in f if "libqdirty" in l})
print(json.dumps({"package": qdirty.__file__, "library": _ffi.library_path,
                  "mapped": mapped, "bitmaps": bitmaps}))
"#;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The target directory of this run (`CARGO_TARGET_TMPDIR` is `<target dir>/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .to_path_buf()
}

/// A command with none of the variables that would point Python at the repository or at
/// another libqdirty.
fn clean(prog: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
    let mut c = Command::new(prog);
    c.current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove("QDIRTY_LIB")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONSTARTUP")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("QDIRTY_PYTHON_SYSTEM_LIB")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1");
    c
}

fn output(what: &str, cmd: &mut Command) -> Output {
    let t = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    println!("{what}: {:.1} s", t.elapsed().as_secs_f64());
    out
}

fn ok(what: &str, cmd: &mut Command) -> String {
    let out = output(what, cmd);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{cmd:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh venv in `dir`; returns its python.
fn venv(dir: &Path) -> PathBuf {
    let out = output(
        "python3 -m venv",
        clean(python(), dir).args(["-m", "venv", "venv"]),
    );
    assert!(
        out.status.success(),
        "`{} -m venv` failed (on Debian, install python3-venv):\n{}",
        python(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("venv/bin/python")
}

/// `pip install ARGS` into the venv of `py`, building in this run's target directory.
fn pip_install(what: &str, py: &Path, cwd: &Path, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) {
    let mut cmd = clean(py, cwd);
    cmd.args(["-m", "pip", "install"])
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ok(what, &mut cmd);
}

/// An image made by qemu-img, with bitmaps of three kinds; returns its path.
fn qemu_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img_create(&img, 64 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "daily", None, false);
    qemu_img_bitmap_add(&img, "weekly", Some(1 << 20), false);
    qemu_img_bitmap_add(&img, "frozen", Some(128 << 10), true);
    img
}

/// Runs LIST_BITMAPS with `py` in `cwd` (plus `env`) on `img`; returns its parsed output.
fn list_bitmaps(py: &Path, cwd: &Path, img: &Path, env: &[(&str, &str)]) -> Json {
    let script = cwd.join("list_bitmaps.py");
    std::fs::write(&script, LIST_BITMAPS).unwrap();
    let mut cmd = clean(py, cwd);
    cmd.arg(&script).arg(img);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = ok("list bitmaps", &mut cmd);
    Json::parse(out.trim()).unwrap_or_else(|e| panic!("script output {out:?}: {e}"))
}

/// The bitmaps of `listed` are those qemu-img lists, with the same granularity and state
/// (qemu-img's "auto" flag is "enabled"; no "in-use" flag: consistent; all are persistent).
fn assert_same_bitmaps(listed: &Json, img: &Path) {
    let ours = listed.get("bitmaps").and_then(Json::as_array).unwrap();
    let qemu = qemu_img_info_bitmaps(img, true);
    assert_eq!(ours.len(), qemu.len(), "{listed:?} vs {qemu:?}");
    assert_eq!(qemu.len(), 3, "qemu-img lists {qemu:?}");
    for q in &qemu {
        let b = ours
            .iter()
            .find(|b| b.get("name").and_then(Json::as_str) == Some(q.name.as_str()))
            .unwrap_or_else(|| panic!("{} missing from {listed:?}", q.name));
        assert_eq!(
            b.get("granularity").and_then(Json::as_u64),
            Some(q.granularity),
            "{}",
            q.name
        );
        assert_eq!(
            b.get("enabled").and_then(Json::as_bool),
            Some(q.auto()),
            "{}",
            q.name
        );
        assert_eq!(
            b.get("inconsistent").and_then(Json::as_bool),
            Some(q.in_use()),
            "{}",
            q.name
        );
        assert_eq!(
            b.get("persistent").and_then(Json::as_bool),
            Some(true),
            "{}",
            q.name
        );
    }
}

fn field<'a>(listed: &'a Json, key: &str) -> &'a str {
    listed
        .get(key)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("no {key} in {listed:?}"))
}

fn mapped(listed: &Json) -> Vec<String> {
    listed
        .get("mapped")
        .and_then(Json::as_array)
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn pip_install_then_list_bitmaps_from_outside_the_repository() {
    if !common::require_qemu("pip_install_then_list_bitmaps_from_outside_the_repository") {
        return;
    }
    let _pip = PIP.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = TempDir::new("pip");
    let py = venv(tmp.path());
    let root = clib::root();
    pip_install(
        "pip install ./python",
        &py,
        tmp.path(),
        &[root.join("python").as_os_str()],
        &[],
    );

    let work = tmp.join("work");
    std::fs::create_dir(&work).unwrap();
    let img = qemu_image(&work);
    let listed = list_bitmaps(&py, &work, &img, &[]);
    assert_same_bitmaps(&listed, &img);

    // The package and the library are the installed ones, not the repository's.
    let site = tmp.path().join("venv/lib");
    let package = field(&listed, "package");
    assert!(
        Path::new(package).starts_with(&site),
        "package loaded from {package}"
    );
    let library = Path::new(field(&listed, "library"));
    assert!(
        library.starts_with(&site),
        "library loaded from {}",
        library.display()
    );
    assert_eq!(library.parent(), Path::new(package).parent());
    assert_eq!(mapped(&listed), vec![library.to_str().unwrap().to_owned()]);

    // QDIRTY_LIB overrides the bundled library, and must exist when set.
    let cdylib = clib::cdylib();
    let listed = list_bitmaps(
        &py,
        &work,
        &img,
        &[("QDIRTY_LIB", cdylib.to_str().unwrap())],
    );
    assert_same_bitmaps(&listed, &img);
    assert_eq!(field(&listed, "library"), cdylib.to_str().unwrap());
    assert_eq!(mapped(&listed), vec![cdylib.to_str().unwrap().to_owned()]);
    let out = output(
        "QDIRTY_LIB missing",
        clean(&py, &work)
            .args(["-c", "import qdirty"])
            .env("QDIRTY_LIB", work.join("nowhere/libqdirty.so")),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ImportError") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn sdist_builds_on_its_own() {
    if !common::require_qemu("sdist_builds_on_its_own") {
        return;
    }
    let _pip = PIP.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = TempDir::new("sdist");
    let py = venv(tmp.path());
    let root = clib::root();
    pip_install(
        "pip install build",
        &py,
        tmp.path(),
        &["build".as_ref()],
        &[],
    );
    let dist = tmp.join("dist");
    ok(
        "python -m build --sdist",
        clean(&py, tmp.path())
            .args(["-m", "build", "--sdist", "--outdir"])
            .arg(&dist)
            .arg(root.join("python")),
    );
    let sdist = std::fs::read_dir(&dist)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .expect("no sdist made");
    // The wheel is built from the unpacked sdist, in pip's own temporary folder: only the
    // sdist's copy of the Cargo workspace can be reached from there.
    pip_install(
        "pip install qdirty-*.tar.gz",
        &py,
        tmp.path(),
        &[sdist.as_os_str()],
        &[],
    );
    let work = tmp.join("work");
    std::fs::create_dir(&work).unwrap();
    let img = qemu_image(&work);
    let listed = list_bitmaps(&py, &work, &img, &[]);
    assert_same_bitmaps(&listed, &img);
    assert!(Path::new(field(&listed, "library")).starts_with(tmp.join("venv/lib")));
}

#[test]
fn built_without_the_library_loads_the_installed_one() {
    if !common::require_qemu("built_without_the_library_loads_the_installed_one") {
        return;
    }
    let _pip = PIP.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = TempDir::new("syslib");
    let py = venv(tmp.path());
    let root = clib::root();
    pip_install(
        "pip install ./python (QDIRTY_PYTHON_SYSTEM_LIB=1)",
        &py,
        tmp.path(),
        &[root.join("python").as_os_str()],
        &[("QDIRTY_PYTHON_SYSTEM_LIB", "1")],
    );
    let site = tmp.path().join("venv/lib");
    let bundled: Vec<PathBuf> = walk(&site)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("libqdirty")
        })
        .collect();
    assert!(bundled.is_empty(), "the package carries {bundled:?}");

    // The installed library, as the dynamic loader finds it: libqdirty.so.N in a library
    // directory (here LD_LIBRARY_PATH, standing for /usr/lib).
    let libdir = tmp.join("lib");
    std::fs::create_dir(&libdir).unwrap();
    std::fs::copy(clib::cdylib(), libdir.join("libqdirty.so")).unwrap();
    clib::link_soname(&libdir);
    let work = tmp.join("work");
    std::fs::create_dir(&work).unwrap();
    let img = qemu_image(&work);
    let listed = list_bitmaps(
        &py,
        &work,
        &img,
        &[("LD_LIBRARY_PATH", libdir.to_str().unwrap())],
    );
    assert_same_bitmaps(&listed, &img);
    assert_eq!(field(&listed, "library"), "libqdirty.so.0");
    assert_eq!(
        mapped(&listed),
        vec![libdir.join("libqdirty.so").to_str().unwrap().to_owned()]
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
