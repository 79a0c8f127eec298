//! Finding and using the C library that cargo built for this test (or bench) run: for the tests
//! that build C programs or load libqdirty.so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the parent of this crate's directory).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives in the repository")
}

/// The host triple, for the cc crate (integration tests have no TARGET/HOST variables).
pub fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .expect("cannot run rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV printed no host triple")
}

/// The C compiler the cc crate picks for this host (C++ when `cpp`), without optimization.
pub fn compiler(cpp: bool) -> cc::Tool {
    compiler_with(cpp, 0)
}

/// The C compiler the cc crate picks for this host, at `opt_level`, with debug info (for
/// valgrind's reports).
pub fn compiler_with(cpp: bool, opt_level: u32) -> cc::Tool {
    let host = host_triple();
    cc::Build::new()
        .cpp(cpp)
        .target(&host)
        .host(&host)
        .opt_level(opt_level)
        .debug(true)
        .cargo_metadata(false)
        .get_compiler()
}

/// The directory holding the libqdirty.so built for this run: `target/PROFILE/deps` (next to
/// the test executable; `target/PROFILE/` may hold an older copy from `cargo build`), else
/// `target/PROFILE`.
pub fn lib_dir() -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    [deps.clone(), deps.parent().unwrap().to_path_buf()]
        .into_iter()
        .find(|d| d.join("libqdirty.so").exists())
        .unwrap_or_else(|| panic!("libqdirty.so not found in {} or its parent", deps.display()))
}

/// The libqdirty.so built for this run.
pub fn cdylib() -> PathBuf {
    lib_dir().join("libqdirty.so")
}

/// The cdylib's soname (`libqdirty.so.N`, set by build.rs) is what C programs record as
/// DT_NEEDED and what the loader looks for: make it resolve to the library in `libdir`, as the
/// installed `libqdirty.so.N` link does (the symlink is replaced atomically, by rename).
pub fn link_soname(libdir: &Path) {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(libdir.join("libqdirty.so"))
        .env("LC_ALL", "C")
        .output()
        .expect("cannot run readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let Some(soname) = dynamic
        .lines()
        .filter(|l| l.contains("(SONAME)"))
        .find_map(|l| Some(l[l.find('[')? + 1..l.rfind(']')?].to_owned()))
    else {
        return; // no soname: the loader looks for libqdirty.so itself
    };
    if soname == "libqdirty.so" {
        return;
    }
    // Unique per call: tests of one process run in parallel threads.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = libdir.join(format!("{soname}.tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink("libqdirty.so", &tmp).unwrap();
    std::fs::rename(&tmp, libdir.join(&soname)).unwrap();
}
