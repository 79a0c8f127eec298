//! Runs the Python ctypes suite (python/tests) against the cdylib cargo just built:
//! `python3 -m unittest discover -s python/tests -v` with QDIRTY_LIB set; and mypy: `--strict` on
//! the package and examples/incremental_backup.py, its default checks on python/tests.

use clib::cdylib;
use qdirty_testkit::clib;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn python_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let tmp = std::env::var_os("QDIRTY_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let out = Command::new(&python)
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "python/tests",
            "-t",
            "python/tests",
            "-v",
        ])
        .current_dir(root)
        .env("QDIRTY_LIB", cdylib())
        .env("QDIRTY_TEST_TMP", &tmp)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONWARNINGS", "default")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (set PYTHON to a Python 3 interpreter): {e}")
        });
    // unittest reports on stderr.
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the Python tests failed (status {})",
        out.status
    );
}

/// The mypy command: `$QDIRTY_MYPY` (which must work: CI sets it), else `mypy` on PATH, else
/// `python3 -m mypy`; None when there is none.
fn mypy() -> Option<Vec<String>> {
    if let Ok(m) = std::env::var("QDIRTY_MYPY") {
        return Some(vec![m]);
    }
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["mypy"]) {
        return Some(vec!["mypy".into()]);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if works(&[&python, "-m", "mypy"]) {
        return Some(vec![python, "-m".into(), "mypy".into()]);
    }
    None
}

fn run_mypy(mypy: &[String], args: &[&str], mypypath: Option<&Path>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mypy-cache");
    let mut cmd = Command::new(&mypy[0]);
    cmd.args(&mypy[1..])
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .current_dir(root);
    if let Some(p) = mypypath {
        cmd.env("MYPYPATH", p);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {mypy:?} (QDIRTY_MYPY): {e}"));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "mypy {args:?} found errors (status {})",
        out.status
    );
}

#[test]
fn mypy_strict() {
    let Some(mypy) = mypy() else {
        // Straight to the stderr handle: libtest captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP mypy_strict: mypy not installed (set QDIRTY_MYPY to a mypy executable)"
        );
        return;
    };
    run_mypy(
        &mypy,
        &[
            "--strict",
            "python/qdirty",
            "examples/incremental_backup.py",
        ],
        None,
    );
    // The tests are unittest code without annotations: mypy checks their imports and the
    // annotated helpers against the package's types.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_mypy(&mypy, &["python/tests"], Some(&root.join("python")));
}
