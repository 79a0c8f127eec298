//! Runs the Python ctypes suite (python/tests) against the cdylib cargo just built:
//! `python3 -m unittest discover -s python/tests -v` with QDIRTY_LIB set.

#[path = "support/clib.rs"]
mod clib;
use clib::cdylib;
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
