//! Builds the C tests in c-tests/ against include/qdirty.h and the cdylib cargo just built, and
//! runs them. With QDIRTY_VALGRIND=1 they run under
//! `valgrind --error-exitcode=99 --leak-check=full`.

use clib::{lib_dir, link_soname, root};
use qdirty_testkit::clib;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn c_tests() {
    let libdir = lib_dir();
    link_soname(&libdir);
    let exe = libdir.join(format!("qdirty_c_tests-{}", std::process::id()));
    let c_dir = root().join("c-tests");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&c_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    assert!(
        sources.iter().any(|p| p.ends_with("main.c")),
        "c-tests/main.c is missing"
    );

    let tool = clib::compiler(false);
    let mut cmd = tool.to_command();
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(&c_dir)
        .args(&sources)
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", libdir.display()))
        .arg("-lqdirty")
        // c-tests/test_threads.c
        .arg("-pthread")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        // DT_RPATH, not DT_RUNPATH: cargo's LD_LIBRARY_PATH may list target/<profile>, where an
        // older libqdirty.so from `cargo build` can sit, and would win over a RUNPATH.
        .arg("-Wl,--disable-new-dtags");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", tool.path()));
    assert!(
        out.status.success(),
        "compiling the C tests failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let valgrind = std::env::var_os("QDIRTY_VALGRIND").is_some_and(|v| v == "1");
    let mut run = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
        ]);
        c.arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    // The library under test first, whatever LD_LIBRARY_PATH cargo set.
    let mut ld_path = std::ffi::OsString::from(libdir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld_path.push(":");
        ld_path.push(old);
    }
    let tmp = std::env::var_os("QDIRTY_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let out = run
        .env("QDIRTY_TEST_TMP", &tmp)
        .env("LD_LIBRARY_PATH", ld_path)
        .output()
        .expect("cannot run the C tests");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    let summary = stdout.lines().last().unwrap_or("");
    assert!(
        summary.ends_with(" failed") && summary.contains(" passed, "),
        "the C tests did not print their summary line (crash?): status {}",
        out.status
    );
    assert!(
        out.status.success(),
        "C tests failed ({summary}), status {}",
        out.status
    );
}
