//! Finding and running the QEMU tools: the gate of every interop test, and running a program
//! with its output in the panic message.
//!
//! When a tool is missing, [`require_qemu`] prints `SKIP <test>: <tool> not installed` on stderr
//! and returns false (the test then returns early), unless `QDIRTY_REQUIRE_QEMU=1`, where it
//! panics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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

/// The command line (long arguments shortened), its exit status and its output, for messages.
pub fn describe(prog: &str, args: &[&str], out: &Output) -> String {
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

/// `s` quoted for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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
