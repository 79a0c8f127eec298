//! Packaging: scripts/install.sh installs the cdylib and the `qdirty` command this test run
//! built (never a nested `cargo build`: cargo holds the target directory's lock) under a
//! temporary prefix, and examples/consumer.c, compiled with nothing but `pkg-config --cflags
//! --libs qdirty`, runs against that installed copy. Also checks the layout, the .pc file, that
//! the installed library and command are stripped (and `--no-strip` installs them as built),
//! and that the ABI major agrees everywhere: src/ffi/version.rs, include/qdirty.h, the soname,
//! cargo-c's metadata.
//!
//! Needs pkg-config, a C compiler and readelf and strip (binutils); `.ci/run` installs them. A
//! missing tool fails the test: it is a plain dependency, not an optional oracle like QEMU. The
//! command is target/<profile>/qdirty, which `cargo test` builds for cli/tests; a lone
//! `cargo test --test install` needs `cargo build -p qdirty-cli` first.

use clib::{cdylib, root};
use qdirty_testkit::clib;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A fresh, empty scratch directory (removed by [`Scratch`]'s drop on success).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let base = std::env::var_os("QDIRTY_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let d = base.join(format!("qdirty-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool that this test needs, failing loudly (with how to get it) when it is missing.
fn run_tool(cmd: &mut Command, package: &str) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {name} ({e}): install it (apt-get install {package}; .ci/run does)")
    })
}

/// The `qdirty` command built for this run: target/<profile>/qdirty.
fn command() -> PathBuf {
    let dir = clib::lib_dir();
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir
    };
    let bin = profile_dir.join("qdirty");
    assert!(
        bin.is_file(),
        "{} does not exist: `cargo test` builds it; alone, run `cargo build -p qdirty-cli` first",
        bin.display()
    );
    bin
}

/// Runs scripts/install.sh with `args`, `--lib <this run's cdylib>` and `--bin <this run's
/// command>`; asserts success.
fn install(args: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(root().join("scripts/install.sh"))
        .args(args)
        .arg("--lib")
        .arg(cdylib())
        .arg("--bin")
        .arg(command())
        .output()
        .expect("cannot run bash");
    assert!(
        out.status.success(),
        "scripts/install.sh {args:?} failed:\n{}",
        output_text(&out)
    );
    out
}

/// `[name]` values of the `(tag)` entries of `readelf -d lib` (e.g. SONAME, NEEDED).
fn dynamic_entries(file: &Path, tag: &str) -> Vec<String> {
    let out = run_tool(
        Command::new("readelf")
            .arg("-d")
            .arg(file)
            .env("LC_ALL", "C"),
        "binutils",
    );
    assert!(
        out.status.success(),
        "readelf -d {} failed:\n{}",
        file.display(),
        output_text(&out)
    );
    let key = format!("({tag})");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&key))
        .filter_map(|l| {
            let open = l.find('[')?;
            let close = l.rfind(']')?;
            Some(l[open + 1..close].to_owned())
        })
        .collect()
}

fn soname(lib: &Path) -> String {
    let names = dynamic_entries(lib, "SONAME");
    assert_eq!(
        names.len(),
        1,
        "{} has SONAME entries {names:?}",
        lib.display()
    );
    names[0].clone()
}

/// `QDIRTY_ABI_MAJOR` as include/qdirty.h defines it.
fn header_abi_major() -> u32 {
    let header = std::fs::read_to_string(root().join("include/qdirty.h")).unwrap();
    let value = header
        .lines()
        .find_map(|l| l.strip_prefix("#define QDIRTY_ABI_MAJOR "))
        .expect("include/qdirty.h has no #define QDIRTY_ABI_MAJOR");
    value
        .trim()
        .trim_end_matches('u')
        .parse()
        .unwrap_or_else(|e| panic!("#define QDIRTY_ABI_MAJOR {value}: {e}"))
}

fn expected_soname() -> String {
    format!("libqdirty.so.{}", qdirty::ffi::QDIRTY_ABI_MAJOR)
}

/// The value of `key = value` in the `[table]` of Cargo.toml (a minimal reader for flat keys).
fn cargo_toml_value(table: &str, key: &str) -> Option<String> {
    manifest_value("Cargo.toml", table, key)
}

/// The value of `key = value` in the `[table]` of the manifest `file` (relative to the root).
fn manifest_value(file: &str, table: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    let mut in_table = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == format!("[{table}]");
        } else if in_table {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().trim_matches('"').to_owned());
                }
            }
        }
    }
    None
}

/// The `Field: value` of a .pc file.
fn pc_field(pc: &str, field: &str) -> Option<String> {
    pc.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

fn pc_variable(pc: &str, var: &str) -> Option<String> {
    pc.lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .map(|v| v.trim().to_owned())
}

/// The section names of an ELF file (`readelf -S`).
fn sections(file: &Path) -> Vec<String> {
    let out = run_tool(
        Command::new("readelf")
            .args(["-S", "-W"])
            .arg(file)
            .env("LC_ALL", "C"),
        "binutils",
    );
    assert!(
        out.status.success(),
        "readelf -S failed:\n{}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?;
            let name = rest[rest.find(']')? + 1..].split_whitespace().next()?;
            Some(name.to_owned())
        })
        .collect()
}

/// The dynamic symbols (`name@version`, sorted) an ELF file defines: what a program can bind to.
fn defined_dynamic_symbols(file: &Path) -> Vec<String> {
    let out = run_tool(
        Command::new("readelf")
            .args(["--dyn-syms", "-W"])
            .arg(file)
            .env("LC_ALL", "C"),
        "binutils",
    );
    let mut syms: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[0].ends_with(':') && f[6] != "UND").then(|| f[7].to_owned())
        })
        .collect();
    syms.sort();
    syms
}

/// `installed` is `built` stripped: no symbol table or debug sections left, smaller, and the
/// same dynamic symbols (with their versions) and soname.
fn assert_stripped_copy(installed: &Path, built: &Path) {
    let built_sections = sections(built);
    assert!(
        built_sections.iter().any(|s| s == ".symtab")
            && built_sections.iter().any(|s| s.starts_with(".debug_")),
        "{} has no symbols or debug info to strip: {built_sections:?}",
        built.display()
    );
    // `.debug_gdb_scripts` (rustc's pointer to gdb's pretty printers) is loaded at run time, so
    // strip keeps it: it is not debug information.
    let left: Vec<_> = sections(installed)
        .into_iter()
        .filter(|s| {
            s == ".symtab"
                || s == ".strtab"
                || (s.starts_with(".debug_") && s != ".debug_gdb_scripts")
        })
        .collect();
    assert!(
        left.is_empty(),
        "{} is not stripped: {left:?}",
        installed.display()
    );
    let (got, was) = (
        std::fs::metadata(installed).unwrap().len(),
        std::fs::metadata(built).unwrap().len(),
    );
    assert!(
        got < was,
        "{} ({got} bytes) is not smaller than {} ({was} bytes)",
        installed.display(),
        built.display()
    );
    assert_eq!(
        defined_dynamic_symbols(installed),
        defined_dynamic_symbols(built),
        "stripping changed the dynamic symbols of {}",
        installed.display()
    );
    assert_eq!(
        dynamic_entries(installed, "SONAME"),
        dynamic_entries(built, "SONAME")
    );
    if let Ok(out) = Command::new("file").arg(installed).output() {
        let says = String::from_utf8_lossy(&out.stdout);
        assert!(
            says.contains(", stripped"),
            "file(1) on {}: {says}",
            installed.display()
        );
    }
}

#[test]
fn no_strip_installs_the_files_as_built() {
    let scratch = Scratch::new("nostrip");
    let prefix = scratch.0.join("prefix");
    install(&["--prefix", prefix.to_str().unwrap(), "--no-strip"]);
    assert_eq!(
        std::fs::read(prefix.join(format!("lib/libqdirty.so.{VERSION}"))).unwrap(),
        std::fs::read(cdylib()).unwrap(),
        "--no-strip: the library is not a copy of the one built"
    );
    assert_eq!(
        std::fs::read(prefix.join("bin/qdirty")).unwrap(),
        std::fs::read(command()).unwrap(),
        "--no-strip: the command is not a copy of the one built"
    );
}

#[test]
fn the_abi_major_agrees_everywhere() {
    let abi = qdirty::ffi::QDIRTY_ABI_MAJOR;
    assert_eq!(
        header_abi_major(),
        abi,
        "include/qdirty.h is stale: QDIRTY_BLESS=1 cargo test --test header"
    );
    assert_eq!(
        abi.to_string(),
        env!("CARGO_PKG_VERSION_MAJOR"),
        "the ABI major follows the crate's major version"
    );
    assert_eq!(
        soname(&cdylib()),
        expected_soname(),
        "build.rs sets the soname from src/ffi/version.rs"
    );
    // cargo-c: soname libqdirty.so.<crate major>, pkg-config name qdirty, the committed header.
    let capi = "package.metadata.capi";
    assert_eq!(
        cargo_toml_value(&format!("{capi}.library"), "version_suffix_components").as_deref(),
        Some("1"),
        "cargo-c must name the soname after the major version only"
    );
    assert_eq!(
        cargo_toml_value(&format!("{capi}.pkg_config"), "name").as_deref(),
        Some("qdirty")
    );
    assert_eq!(
        cargo_toml_value(&format!("{capi}.header"), "generation").as_deref(),
        Some("false")
    );
}

#[test]
fn installed_copy_serves_a_pkg_config_consumer() {
    let scratch = Scratch::new("consumer");
    let prefix = scratch.0.join("prefix");
    let prefix_s = prefix.to_str().expect("non-UTF-8 temporary directory");
    install(&["--prefix", prefix_s]);

    // The layout: the library, its two links, the header, the .pc file.
    let libdir = prefix.join("lib");
    let real = format!("libqdirty.so.{VERSION}");
    let so_n = expected_soname();
    let meta = std::fs::symlink_metadata(libdir.join(&real)).unwrap();
    assert!(meta.is_file(), "{real} must be a regular file");
    assert_stripped_copy(&libdir.join(&real), &cdylib());
    let bin = prefix.join("bin/qdirty");
    assert_stripped_copy(&bin, &command());
    let out = Command::new(&bin).arg("--help").output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("qdirty"),
        "the installed command does not run:\n{}",
        output_text(&out)
    );
    assert_eq!(
        std::fs::read_link(libdir.join(&so_n)).unwrap(),
        Path::new(&real)
    );
    assert_eq!(
        std::fs::read_link(libdir.join("libqdirty.so")).unwrap(),
        Path::new(&so_n)
    );
    assert_eq!(
        soname(&libdir.join(&real)),
        so_n,
        "SONAME of the installed library"
    );
    assert_eq!(
        std::fs::read(prefix.join("include/qdirty.h")).unwrap(),
        std::fs::read(root().join("include/qdirty.h")).unwrap(),
        "the installed header differs from include/qdirty.h"
    );
    let pc = std::fs::read_to_string(libdir.join("pkgconfig/qdirty.pc")).unwrap();
    assert_eq!(pc_field(&pc, "Version").as_deref(), Some(VERSION), "{pc}");
    assert_eq!(
        pc_variable(&pc, "prefix").as_deref(),
        Some(prefix_s),
        "{pc}"
    );

    // pkg-config, as a consumer's build system calls it.
    let pkg_config = |args: &[&str]| {
        let out = run_tool(
            Command::new("pkg-config")
                .args(args)
                .env("PKG_CONFIG_PATH", libdir.join("pkgconfig"))
                .env_remove("PKG_CONFIG_SYSROOT_DIR"),
            "pkg-config",
        );
        assert!(
            out.status.success(),
            "pkg-config {args:?} failed:\n{}",
            output_text(&out)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(pkg_config(&["--modversion", "qdirty"]), VERSION);
    let flags = pkg_config(&["--cflags", "--libs", "qdirty"]);
    assert!(
        flags.contains(&format!("-I{prefix_s}/include")) && flags.contains("-lqdirty"),
        "pkg-config --cflags --libs qdirty printed {flags:?}"
    );

    // examples/consumer.c with the pkg-config flags and nothing else that locates qdirty (the
    // rpath only makes the program find the library at run time without LD_LIBRARY_PATH).
    let exe = scratch.0.join("consumer");
    let tool = clib::compiler(false);
    let out = tool
        .to_command()
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(root().join("examples/consumer.c"))
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        // DT_RPATH, searched before any LD_LIBRARY_PATH (cargo sets one pointing into target/).
        .arg("-Wl,--disable-new-dtags")
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", tool.path()));
    assert!(
        out.status.success(),
        "cc examples/consumer.c $(pkg-config --cflags --libs qdirty) failed:\n{}",
        output_text(&out)
    );
    assert_eq!(
        dynamic_entries(&exe, "NEEDED")
            .into_iter()
            .filter(|n| n.starts_with("libqdirty"))
            .collect::<Vec<_>>(),
        std::slice::from_ref(&so_n),
        "the consumer must depend on the soname"
    );

    // The dynamic loader resolves the soname to the installed copy.
    if cfg!(target_env = "gnu") {
        let out = Command::new(&exe)
            .env("LD_TRACE_LOADED_OBJECTS", "1")
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        let trace = String::from_utf8_lossy(&out.stdout);
        let want = format!("{so_n} => {}", libdir.join(&so_n).display());
        assert!(
            trace.contains(&want),
            "the consumer does not load the installed library ({want}):\n{trace}"
        );
    }

    let work = scratch.0.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = Command::new(&exe)
        .arg(&work)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "examples/consumer.c failed:\n{}",
        output_text(&out)
    );
    let abi = qdirty::ffi::QDIRTY_ABI_MAJOR;
    assert!(
        stdout.contains(&format!("qdirty {VERSION} (ABI {abi})")),
        "{stdout}"
    );
    assert!(stdout.contains("dirty extent: offset 1048576 length 65536"));
    assert_eq!(stdout.lines().last(), Some("ok"));
}

#[test]
fn destdir_stages_files_and_the_pc_names_the_final_paths() {
    let scratch = Scratch::new("destdir");
    let stage = scratch.0.join("stage");
    let prefix = "/opt/qdirty-install-test";
    install(&[
        "--prefix",
        prefix,
        "--libdir",
        "lib64",
        "--destdir",
        stage.to_str().unwrap(),
    ]);
    assert!(
        !Path::new(prefix).exists(),
        "--destdir installed outside the staging directory"
    );
    let root_dir = stage.join(prefix.trim_start_matches('/'));
    let libdir = root_dir.join("lib64");
    for f in [
        format!("libqdirty.so.{VERSION}"),
        expected_soname(),
        "libqdirty.so".into(),
        "pkgconfig/qdirty.pc".into(),
    ] {
        assert!(
            libdir.join(&f).exists(),
            "{f} missing under {}",
            libdir.display()
        );
    }
    assert!(root_dir.join("include/qdirty.h").is_file());
    assert!(root_dir.join("bin/qdirty").is_file());
    let pc = std::fs::read_to_string(libdir.join("pkgconfig/qdirty.pc")).unwrap();
    assert_eq!(pc_variable(&pc, "prefix").as_deref(), Some(prefix), "{pc}");
    assert_eq!(
        pc_variable(&pc, "libdir").as_deref(),
        Some("${prefix}/lib64"),
        "{pc}"
    );
    assert_eq!(
        pc_variable(&pc, "includedir").as_deref(),
        Some("${prefix}/include"),
        "{pc}"
    );
    assert_eq!(
        pc_field(&pc, "Libs").as_deref(),
        Some("-L${libdir} -lqdirty")
    );
    assert_eq!(pc_field(&pc, "Cflags").as_deref(), Some("-I${includedir}"));
}

#[test]
fn install_sh_rejects_bad_arguments() {
    for args in [&["--bogus"][..], &["--prefix"][..], &["--prefix="][..]] {
        let out = Command::new("bash")
            .arg(root().join("scripts/install.sh"))
            .args(args)
            .output()
            .expect("cannot run bash");
        assert!(!out.status.success(), "install.sh {args:?} succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("install.sh: "),
            "install.sh {args:?} gave no message:\n{}",
            output_text(&out)
        );
    }
}

/// The files `cargo package --list` puts in the registry package of `package`.
fn packaged_files(package: &str) -> Vec<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "package",
            "--list",
            "--no-verify",
            "--allow-dirty",
            "-p",
            package,
        ])
        .current_dir(root())
        .output()
        .expect("cannot run cargo");
    assert!(
        out.status.success(),
        "cargo package --list -p {package} failed:\n{}",
        output_text(&out)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn registry_package_has_the_library_and_no_test_data() {
    let files = packaged_files("qdirty");
    for need in [
        "Cargo.toml",
        "build.rs",
        "src/lib.rs",
        "src/ffi/version.rs",
        "src/ffi/qdirty.map",
        "include/qdirty.h",
        "cbindgen.toml",
        "scripts/install.sh",
        "scripts/qdirty.pc.in",
        "examples/quickstart.rs",
        "examples/consumer.c",
        "README.md",
        "CHANGELOG.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
    ] {
        assert!(
            files.iter().any(|f| f == need),
            "the package lacks {need}: {files:?}"
        );
    }
    // Every library source file goes (a missing one would break the build from the package).
    let mut sources = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    walk(&root().join("src"), &mut sources);
    for s in sources {
        let rel = s.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        assert!(files.contains(&rel), "the package lacks {rel}");
    }
    // No test suite, test images, fuzz corpus, benchmarks, Python package or build output.
    for f in &files {
        let top = f.split('/').next().unwrap();
        assert!(
            !["tests", "c-tests", "python", "fuzz", "benches", "target", "cli", "testkit", ".ci"]
                .contains(&top),
            "the package carries {f}"
        );
        assert!(
            ![".qcow2", ".img", ".raw", ".bin", ".so", ".o"]
                .iter()
                .any(|ext| f.ends_with(ext)),
            "the package carries {f}"
        );
    }

    let cli = packaged_files("qdirty-cli");
    for need in ["Cargo.toml", "src/main.rs", "README.md"] {
        assert!(
            cli.iter().any(|f| f == need),
            "qdirty-cli lacks {need}: {cli:?}"
        );
    }
    assert!(
        cli.iter().all(|f| !f.starts_with("tests/")),
        "qdirty-cli carries its tests: {cli:?}"
    );
}

#[test]
fn manifests_carry_registry_metadata() {
    for file in ["Cargo.toml", "cli/Cargo.toml"] {
        for key in [
            "description",
            "license",
            "readme",
            "keywords",
            "categories",
            "rust-version",
        ] {
            let value = manifest_value(file, "package", key);
            assert!(
                value.as_deref().is_some_and(|v| !v.is_empty() && v != "[]"),
                "{file} has no [package] {key}"
            );
        }
        assert_eq!(
            manifest_value(file, "package", "license").as_deref(),
            Some("MIT OR Apache-2.0"),
            "{file}"
        );
        let readme = manifest_value(file, "package", "readme").unwrap();
        let dir = Path::new(file).parent().unwrap();
        assert!(
            root().join(dir).join(&readme).is_file(),
            "{file}: readme {readme} does not exist"
        );
    }
    assert_eq!(
        manifest_value("cli/Cargo.toml", "package", "rust-version"),
        manifest_value("Cargo.toml", "package", "rust-version"),
        "the command and the library have one MSRV"
    );
    for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
        let text =
            std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.len() > 1000, "{file} is not a license text");
    }
    assert!(std::fs::read_to_string(root().join("LICENSE-MIT"))
        .unwrap()
        .contains("Copyright (c) The qdirty developers"));
    assert!(std::fs::read_to_string(root().join("LICENSE-APACHE"))
        .unwrap()
        .contains("Apache License\n                           Version 2.0, January 2004"));
}

/// Files and links under `dir`, relative: `path` for a file, `path -> final target name` for a
/// link (resolved through link chains, so `libqdirty.so -> libqdirty.so.N -> libqdirty.so.X.Y.Z`
/// and `libqdirty.so -> libqdirty.so.X.Y.Z` compare equal).
fn layout(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::canonicalize(&p).unwrap();
                out.push(format!(
                    "{rel} -> {}",
                    target.file_name().unwrap().to_string_lossy()
                ));
            } else if meta.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The variables and fields of a .pc file, without `Libs.private` (static linking only).
fn pc_entries(pc: &str) -> Vec<String> {
    let mut out: Vec<String> = pc
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Libs.private:"))
        .map(str::to_owned)
        .collect();
    out.sort();
    out
}

/// cargo-c's `cargo cinstall` (README: for distributions) and scripts/install.sh give the same
/// layout, soname, header, .pc file and versioned exports; install.sh adds the command and
/// strips. Runs only where cargo-c is installed (`cargo install cargo-c`): it is not on CI.
#[test]
fn cargo_cinstall_layout_matches_install_sh() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|d| d.join("cargo-cinstall").is_file()) {
        eprintln!("SKIP cargo_cinstall_layout_matches_install_sh: cargo-cinstall is not on PATH");
        return;
    }
    let scratch = Scratch::new("cinstall");
    let (prefix, libdir) = ("/usr", "lib64");
    // Its own target directory (not this run's, which cargo keeps locked), kept between runs.
    let target = clib::lib_dir()
        .ancestors()
        .nth(2)
        .unwrap()
        .join("cinstall-test");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let c_stage = scratch.0.join("cinstall");
    let out = Command::new(cargo)
        .args(["cinstall", "--release", "--library-type", "cdylib"])
        .args(["--prefix", prefix, "--libdir", libdir, "--destdir"])
        .arg(&c_stage)
        .arg("--target-dir")
        .arg(&target)
        .current_dir(root())
        .output()
        .expect("cannot run cargo");
    assert!(
        out.status.success(),
        "cargo cinstall failed:\n{}",
        output_text(&out)
    );
    let s_stage = scratch.0.join("install-sh");
    install(&[
        "--prefix",
        prefix,
        "--libdir",
        libdir,
        "--destdir",
        s_stage.to_str().unwrap(),
    ]);

    let mut expected = layout(&c_stage);
    expected.push("usr/bin/qdirty".into());
    expected.sort();
    assert_eq!(
        layout(&s_stage),
        expected,
        "scripts/install.sh and cargo cinstall install different files"
    );
    let lib = |stage: &Path| stage.join(format!("usr/{libdir}/libqdirty.so.{VERSION}"));
    assert_eq!(soname(&lib(&c_stage)), expected_soname());
    assert_eq!(soname(&lib(&s_stage)), expected_soname());
    let exports = |f: &Path| -> Vec<String> {
        defined_dynamic_symbols(f)
            .into_iter()
            .filter(|s| s.starts_with("qdirty_"))
            .collect()
    };
    assert_eq!(exports(&lib(&c_stage)), exports(&lib(&s_stage)));
    assert!(
        exports(&lib(&c_stage))
            .iter()
            .all(|s| s.contains("@@QDIRTY_")),
        "cargo cinstall's library lacks symbol versions"
    );
    assert_eq!(
        std::fs::read(c_stage.join("usr/include/qdirty.h")).unwrap(),
        std::fs::read(root().join("include/qdirty.h")).unwrap()
    );
    let pc = |stage: &Path| {
        pc_entries(
            &std::fs::read_to_string(stage.join(format!("usr/{libdir}/pkgconfig/qdirty.pc")))
                .unwrap(),
        )
    };
    assert_eq!(pc(&s_stage), pc(&c_stage), "the .pc files differ");
}
