//! The embedding interface (`qdirty_io_ops`, `qdirty_image_open_with_io`).
//!
//! - `examples/host_embed.c` plays a hypervisor with its own qcow2 driver and allocator: it is
//!   built against include/qdirty.h and the cdylib, run on images made by qemu-img/qemu-io, and
//!   QEMU's tools then judge the file (check clean, bitmaps and flags, exact dirty extents).
//! - The error paths of the callback storage, driven from Rust through the C ABI: bad ops
//!   tables, missing callbacks, short reads, failing callbacks, and a pwrite failing at every
//!   point of a store, after which the image must still pass `qemu-img check`.
//!
//! The QEMU parts print `SKIP ...` when the tools are missing (fail with QDIRTY_REQUIRE_QEMU=1:
//! `require_qemu`).

mod common;

use clib::{lib_dir, link_soname, root};
use qdirty_testkit::clib;
use std::ffi::{c_void, CString};
use std::fs::File;
use std::os::raw::c_int;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

use common::*;
use qdirty::ffi::*;

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------
// Building examples/host_embed.c (as tests/c_suite.rs builds the C tests)
// ------------------------------------------------------------------------------------------

/// Builds examples/host_embed.c into `out_dir`; returns the executable.
fn build_host(out_dir: &Path) -> PathBuf {
    let libdir = lib_dir();
    link_soname(&libdir);
    let exe = out_dir.join("host_embed");
    let tool = clib::compiler(false);
    let out = tool
        .to_command()
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("examples/host_embed.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", libdir.display()))
        .arg("-lqdirty")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        // DT_RPATH, not DT_RUNPATH: an older libqdirty.so in cargo's LD_LIBRARY_PATH must not win.
        .arg("-Wl,--disable-new-dtags")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", tool.path()));
    assert!(
        out.status.success(),
        "compiling examples/host_embed.c failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the host on `img`; returns (success, stdout + stderr).
fn run_host(exe: &Path, img: &Path, args: &[String]) -> (bool, String) {
    run_host_argv(exe, &[], img, args)
}

/// Runs the host with options (`--durable`, `--crash`) before the image.
fn run_host_argv(exe: &Path, opts: &[String], img: &Path, args: &[String]) -> (bool, String) {
    let libdir = lib_dir();
    let mut ld_path = std::ffi::OsString::from(libdir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld_path.push(":");
        ld_path.push(old);
    }
    let out = Command::new(exe)
        .args(opts)
        .arg(img)
        .args(args)
        .env("LD_LIBRARY_PATH", ld_path)
        .output()
        .expect("cannot run host_embed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One host run: an image with `cluster_size`, optionally an existing QEMU bitmap "old" with
/// data written by qemu-io, the host adding "new" and marking `before` then (after a store)
/// `after`; QEMU's tools then judge the file.
fn host_scenario(test: &str, cluster_size: u64, existing: bool) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let exe = build_host(tmp.path());
    let img = tmp.join("disk.qcow2");
    let size = 64 * MIB;
    qemu_img_create(&img, size, &format!("cluster_size={cluster_size}"), &[]);
    let qemu_writes = [(MIB, 3 * MIB), (40 * MIB + 4096, 8192)];
    if existing {
        qemu_img_bitmap_add(&img, "old", None, false);
        qemu_io_write(&img, &qemu_writes);
    }
    let before = [(0u64, 1u64), (5 * MIB + 100, 70_000), (size - 4096, 4096)];
    let after = [(17 * MIB, 2 * MIB + 1), (33 * MIB + 65536, 65536)];
    let fmt = |r: &[(u64, u64)]| {
        r.iter()
            .map(|(o, l)| format!("{o}:{l}"))
            .collect::<Vec<_>>()
    };
    let mut args = vec!["new".to_string()];
    args.extend(fmt(&before));
    args.push("--".into());
    args.extend(fmt(&after));
    let (ok, out) = run_host(&exe, &img, &args);
    assert!(ok, "{test}: host_embed failed:\n{out}");
    eprintln!("{test}: {}", out.trim());

    assert_check_clean(&img, test);
    let granularity = cluster_size.clamp(4096, 65536);
    let mut expected = vec![QemuBitmapInfo {
        name: "new".into(),
        granularity,
        flags: vec!["auto".into()],
    }];
    if existing {
        expected.insert(
            0,
            QemuBitmapInfo {
                name: "old".into(),
                granularity,
                flags: vec!["auto".into()],
            },
        );
    }
    let mut got = qemu_img_info_bitmaps(&img, false);
    got.sort_by(|a, b| b.name.cmp(&a.name));
    expected.sort_by(|a, b| b.name.cmp(&a.name));
    assert_eq!(got, expected, "{test}: qemu-img info bitmaps");

    let marked: Vec<(u64, u64)> = before.iter().chain(after.iter()).copied().collect();
    assert_eq!(
        nbd_dirty_extents(&img, "new"),
        expected_runs(&marked, granularity, size),
        "{test}: extents of 'new'"
    );
    if existing {
        let all: Vec<(u64, u64)> = marked.iter().chain(qemu_writes.iter()).copied().collect();
        assert_eq!(
            nbd_dirty_extents(&img, "old"),
            expected_runs(&all, granularity, size),
            "{test}: extents of 'old'"
        );
    }
}

/// Durable mode on the embedding path: the host (its own allocator) announces every write with
/// `qdirty_image_prepare_write`, stores once, and dies without closing the image. QEMU must
/// find every bitmap consistent, the file without corruption, and each bitmap dirty wherever
/// the host wrote (whole zones may be dirty: a superset).
fn host_durable_crash(test: &str, cluster_size: u64) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let exe = build_host(tmp.path());
    let img = tmp.join("disk.qcow2");
    let size = 256 * MIB;
    qemu_img_create(&img, size, &format!("cluster_size={cluster_size}"), &[]);
    let qemu_writes = [(MIB, 3 * MIB)];
    qemu_img_bitmap_add(&img, "old", None, false);
    qemu_io_write(&img, &qemu_writes);
    let before = [(0u64, 1u64), (100 * MIB + 100, 70_000)];
    let after = [(17 * MIB, 2 * MIB + 1), (size - 4096, 4096)];
    let mut args = vec!["new".to_string()];
    args.extend(before.iter().map(|(o, l)| format!("{o}:{l}")));
    args.push("--".into());
    args.extend(after.iter().map(|(o, l)| format!("{o}:{l}")));
    let opts = ["--durable".to_string(), "--crash".to_string()];
    let (ok, out) = run_host_argv(&exe, &opts, &img, &args);
    assert!(ok, "{test}: host_embed failed:\n{out}");
    assert!(out.contains("crashed after the writes"), "{test}: {out}");

    let c = qemu_img_check(&img);
    assert!(
        c.corruptions == 0 && c.check_errors == 0,
        "{test}: qemu-img check after the crash: {c}"
    );
    let got = qemu_img_info_bitmaps(&img, false);
    assert_eq!(got.len(), 2, "{test}: {got:?}");
    for b in &got {
        assert!(
            !b.in_use() && b.auto(),
            "{test}: bitmap {} after the crash: {:?}",
            b.name,
            b.flags
        );
    }
    let granularity = cluster_size.clamp(4096, 65536);
    let covers = |name: &str, writes: &[(u64, u64)]| {
        let dirty = nbd_dirty_extents(&img, name);
        for r in expected_runs(writes, granularity, size) {
            assert!(
                dirty.iter().any(|&(o, l)| o <= r.0 && r.0 + r.1 <= o + l),
                "{test}: bitmap {name} misses {r:?} after the crash; dirty: {dirty:?}"
            );
        }
    };
    let marked: Vec<(u64, u64)> = before.iter().chain(after.iter()).copied().collect();
    covers("new", &marked);
    let all: Vec<(u64, u64)> = marked.iter().chain(qemu_writes.iter()).copied().collect();
    covers("old", &all);
}

#[test]
fn host_embed_durable_crash_64k() {
    host_durable_crash("host_embed_durable_crash_64k", 65536);
}

#[test]
fn host_embed_durable_crash_4k() {
    host_durable_crash("host_embed_durable_crash_4k", 4096);
}

#[test]
fn host_embed_64k_fresh() {
    host_scenario("host_embed_64k_fresh", 65536, false);
}

#[test]
fn host_embed_64k_existing_bitmap() {
    host_scenario("host_embed_64k_existing_bitmap", 65536, true);
}

#[test]
fn host_embed_4k_existing_bitmap() {
    host_scenario("host_embed_4k_existing_bitmap", 4096, true);
}

#[test]
fn host_embed_refuses_other_refcount_widths() {
    let test = "host_embed_refuses_other_refcount_widths";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let exe = build_host(tmp.path());
    let img = tmp.join("disk.qcow2");
    qemu_img_create(&img, 16 * MIB, "refcount_bits=8", &[]);
    let (ok, out) = run_host(&exe, &img, &["b".into(), "0:1".into()]);
    assert!(!ok, "the host accepted 8-bit refcounts:\n{out}");
    assert!(out.contains("only 16-bit refcounts"), "{out}");
    assert_check_clean(&img, test);
    assert!(qemu_img_info_bitmaps(&img, false).is_empty());
}

// ------------------------------------------------------------------------------------------
// The callback storage's error paths, from Rust through the C ABI
// ------------------------------------------------------------------------------------------

/// A host over a real file, with fault injection. qdirty allocates through refcounts unless
/// `bump_alloc` is set.
struct RHost {
    file: File,
    /// pwrite calls so far.
    pwrites: u64,
    /// Fail the pwrite with this number (1-based) with -EIO.
    fail_pwrite: Option<u64>,
    /// Keep failing every pwrite after the first failure (a dead disk).
    sticky: bool,
    /// pread returns this many bytes less than asked (a positive short count).
    short_read: bool,
    /// get_length returns this negative errno.
    length_error: Option<i64>,
    /// alloc_clusters returns this negative errno.
    alloc_error: Option<c_int>,
    /// alloc_clusters answers these offsets first (then fails as above).
    alloc_at: Vec<u64>,
}

impl RHost {
    fn new(path: &Path) -> Box<RHost> {
        Box::new(RHost {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
            pwrites: 0,
            fail_pwrite: None,
            sticky: false,
            short_read: false,
            length_error: None,
            alloc_error: None,
            alloc_at: Vec::new(),
        })
    }
}

unsafe fn host<'a>(opaque: *mut c_void) -> &'a mut RHost {
    // SAFETY: the tests pass a live Box<RHost> as opaque.
    unsafe { &mut *opaque.cast::<RHost>() }
}

unsafe extern "C" fn r_pread(opaque: *mut c_void, buf: *mut c_void, len: u64, off: u64) -> c_int {
    let h = unsafe { host(opaque) };
    // SAFETY: qdirty passes a buffer of len bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len as usize) };
    if h.short_read && len > 1 {
        return match h.file.read_at(&mut buf[..len as usize - 1], off) {
            Ok(n) => n as c_int,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
    }
    match h.file.read_exact_at(buf, off) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

unsafe extern "C" fn r_pwrite(
    opaque: *mut c_void,
    buf: *const c_void,
    len: u64,
    off: u64,
) -> c_int {
    let h = unsafe { host(opaque) };
    h.pwrites += 1;
    if let Some(k) = h.fail_pwrite {
        if h.pwrites == k || (h.sticky && h.pwrites > k) {
            return -libc::EIO;
        }
    }
    // SAFETY: qdirty passes a buffer of len bytes.
    let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len as usize) };
    match h.file.write_all_at(buf, off) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

unsafe extern "C" fn r_flush(opaque: *mut c_void) -> c_int {
    let h = unsafe { host(opaque) };
    match h.file.sync_data() {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

unsafe extern "C" fn r_get_length(opaque: *mut c_void) -> i64 {
    let h = unsafe { host(opaque) };
    if let Some(e) = h.length_error {
        return e;
    }
    h.file
        .metadata()
        .map_or(-i64::from(libc::EIO), |m| m.len() as i64)
}

unsafe extern "C" fn r_alloc(
    opaque: *mut c_void,
    _n: u64,
    _cluster_size: u64,
    offset: *mut u64,
) -> c_int {
    let h = unsafe { host(opaque) };
    if !h.alloc_at.is_empty() {
        // SAFETY: qdirty passes a valid out pointer.
        unsafe { *offset = h.alloc_at.remove(0) };
        return 0;
    }
    h.alloc_error.unwrap_or(-libc::ENOSPC)
}

unsafe extern "C" fn r_free(_opaque: *mut c_void, _off: u64, _n: u64, _cs: u64) -> c_int {
    0
}

fn ops() -> qdirty_io_ops {
    qdirty_io_ops {
        size: std::mem::size_of::<qdirty_io_ops>() as u32,
        pread: Some(r_pread),
        pwrite: Some(r_pwrite),
        flush: Some(r_flush),
        get_length: Some(r_get_length),
        alloc_clusters: None,
        free_clusters: None,
    }
}

/// Opens through the callbacks: Ok(image) or Err((errno, message)).
fn open_io(
    ops: *const qdirty_io_ops,
    h: &mut RHost,
    flags: u32,
) -> Result<*mut qdirty_image, (i32, String)> {
    let name = CString::new("rhost").unwrap();
    let mut err: *mut qdirty_error = ptr::null_mut();
    // SAFETY: valid arguments; `h` outlives the image in every test.
    let img = unsafe {
        qdirty_image_open_with_io(
            ops,
            (h as *mut RHost).cast(),
            name.as_ptr(),
            flags,
            &mut err,
        )
    };
    if img.is_null() {
        Err(take_error(err))
    } else {
        Ok(img)
    }
}

fn take_error(err: *mut qdirty_error) -> (i32, String) {
    assert!(!err.is_null(), "a failure without an error object");
    let (errno, message, _) = common::c_error::take(err);
    (errno, message)
}

fn close(img: *mut qdirty_image) -> Result<(), (i32, String)> {
    let mut err: *mut qdirty_error = ptr::null_mut();
    // SAFETY: an open image.
    if unsafe { qdirty_image_close(img, &mut err) } < 0 {
        Err(take_error(err))
    } else {
        Ok(())
    }
}

fn add_persistent(img: *mut qdirty_image, name: &str) {
    let name = CString::new(name).unwrap();
    let mut err: *mut qdirty_error = ptr::null_mut();
    // SAFETY: an open image.
    let bm = unsafe {
        qdirty_image_add_bitmap(img, name.as_ptr(), 0, QDIRTY_BITMAP_PERSISTENT, &mut err)
    };
    assert!(!bm.is_null(), "add bitmap: {:?}", take_error(err));
}

/// A fresh 64 MiB image (qemu-img when present, else qdirty's own creator).
fn make_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if have_tool("qemu-img") {
        qemu_img_create(&p, 64 * MIB, "", &[]);
    } else {
        qdirty::Image::create(&p, 64 * MIB, 0).unwrap();
    }
    p
}

#[test]
fn io_ops_table_is_checked() {
    let tmp = TempDir::new("io_ops_table_is_checked");
    let img = make_image(tmp.path(), "a.qcow2");
    let mut h = RHost::new(&img);
    let known = std::mem::size_of::<qdirty_io_ops>();

    // NULL ops, and NULL name.
    assert_eq!(open_io(ptr::null(), &mut h, 0).unwrap_err().0, libc::EINVAL);
    let o = ops();
    let mut err: *mut qdirty_error = ptr::null_mut();
    let r = unsafe {
        qdirty_image_open_with_io(&o, (&mut *h as *mut RHost).cast(), ptr::null(), 0, &mut err)
    };
    assert!(r.is_null());
    assert_eq!(take_error(err).0, libc::EINVAL);

    // Too small a size.
    let mut o = ops();
    o.size = 8;
    let (e, msg) = open_io(&o, &mut h, 0).unwrap_err();
    assert_eq!(e, libc::EINVAL);
    assert!(msg.contains("sizeof(qdirty_io_ops)"), "{msg}");

    // A larger size from a newer header: fine when the unknown tail is zero, ENOTSUP when not.
    #[repr(C)]
    struct Bigger {
        ops: qdirty_io_ops,
        future: u64,
    }
    let mut b = Bigger {
        ops: ops(),
        future: 0,
    };
    b.ops.size = std::mem::size_of::<Bigger>() as u32;
    assert!(std::mem::size_of::<Bigger>() > known);
    let img_ok = open_io(&b.ops, &mut h, 0).expect("a zero tail is accepted");
    close(img_ok).unwrap();
    b.future = 1;
    assert_eq!(open_io(&b.ops, &mut h, 0).unwrap_err().0, libc::ENOTSUP);

    // Unknown flags.
    assert_eq!(open_io(&ops(), &mut h, 0x80).unwrap_err().0, libc::EINVAL);

    // Required callbacks.
    let mut o = ops();
    o.pread = None;
    assert_eq!(open_io(&o, &mut h, 0).unwrap_err().0, libc::EINVAL);
    let mut o = ops();
    o.get_length = None;
    assert_eq!(open_io(&o, &mut h, 0).unwrap_err().0, libc::EINVAL);
    let mut o = ops();
    o.pwrite = None;
    o.flush = None;
    let (e, msg) = open_io(&o, &mut h, QDIRTY_OPEN_RDWR).unwrap_err();
    assert_eq!(e, libc::EINVAL);
    assert!(msg.contains("pwrite"), "{msg}");
    // ... but read-only opens need neither pwrite nor flush.
    close(open_io(&o, &mut h, 0).expect("read-only without pwrite")).unwrap();
    // alloc without free, and free without alloc.
    let mut o = ops();
    o.alloc_clusters = Some(r_alloc);
    let (e, msg) = open_io(&o, &mut h, QDIRTY_OPEN_RDWR).unwrap_err();
    assert_eq!(e, libc::EINVAL);
    assert!(msg.contains("both"), "{msg}");
    let mut o = ops();
    o.free_clusters = Some(r_free);
    assert_eq!(open_io(&o, &mut h, 0).unwrap_err().0, libc::EINVAL);
    assert_eq!(h.pwrites, 0, "a refused open wrote to the image");
}

#[test]
fn io_callback_failures_are_reported() {
    let tmp = TempDir::new("io_callback_failures_are_reported");
    let img = make_image(tmp.path(), "a.qcow2");

    // A short read (a positive byte count below len) is EIO.
    let mut h = RHost::new(&img);
    h.short_read = true;
    let (e, msg) = open_io(&ops(), &mut h, 0).unwrap_err();
    assert_eq!(e, libc::EIO, "{msg}");
    assert!(msg.contains("short"), "{msg}");

    // get_length's errno comes through.
    let mut h = RHost::new(&img);
    h.length_error = Some(-i64::from(libc::ENODEV));
    assert_eq!(open_io(&ops(), &mut h, 0).unwrap_err().0, libc::ENODEV);

    // The host's allocator says ENOSPC: the store fails with ENOSPC and writes nothing.
    let mut h = RHost::new(&img);
    h.alloc_error = Some(-libc::ENOSPC);
    let mut o = ops();
    o.alloc_clusters = Some(r_alloc);
    o.free_clusters = Some(r_free);
    let image = open_io(&o, &mut h, QDIRTY_OPEN_RDWR).unwrap();
    add_persistent(image, "b");
    unsafe { qdirty_image_set_dirty(image, 0, MIB) };
    let before = h.pwrites;
    let (e, msg) = close(image).unwrap_err();
    assert_eq!(e, libc::ENOSPC, "{msg}");
    assert!(msg.contains("allocate"), "{msg}");
    assert_eq!(
        h.pwrites, before,
        "nothing is written when allocation fails"
    );
    if have_tool("qemu-img") {
        assert_check_clean(&img, "after ENOSPC from the host");
    }
}

/// A pwrite failing with -EIO at every point of a store (once, and from then on): the close
/// fails with EIO and the file stays valid for qemu-img check (at most leaks, never
/// corruption), and loadable.
#[test]
fn io_pwrite_failure_during_store_keeps_the_image_valid() {
    let test = "io_pwrite_failure_during_store_keeps_the_image_valid";
    let tmp = TempDir::new(test);
    let pristine = make_image(tmp.path(), "pristine.qcow2");
    if have_tool("qemu-img") {
        // An existing stored bitmap too, so the store also frees old clusters.
        qemu_img_bitmap_add(&pristine, "old", None, false);
    }
    let work = tmp.join("work.qcow2");

    // Baseline: how many pwrites a successful close makes.
    let run = |fail: Option<u64>, sticky: bool| -> (Result<(), (i32, String)>, u64) {
        std::fs::copy(&pristine, &work).unwrap();
        let mut h = RHost::new(&work);
        let image = open_io(&ops(), &mut h, QDIRTY_OPEN_RDWR).unwrap();
        add_persistent(image, "b");
        unsafe { qdirty_image_set_dirty(image, 3 * MIB, 5 * MIB) };
        let opened = h.pwrites;
        h.fail_pwrite = fail.map(|k| k + opened);
        h.sticky = sticky;
        let r = close(image);
        (r, h.pwrites - opened)
    };
    let (r, n) = run(None, false);
    r.expect("a close without faults");
    assert!(
        n >= 3,
        "a store writes data, table, directory and header ({n} pwrites)"
    );
    if have_tool("qemu-img") {
        assert_check_clean(&work, "baseline");
    }

    let mut skipped_check = false;
    for sticky in [false, true] {
        for k in 1..=n {
            let (r, _) = run(Some(k), sticky);
            // A failure before or at the commit fails the close with EIO; one after it (freeing
            // the old clusters) only leaks, so the close may report success.
            if let Err((e, msg)) = r {
                assert_eq!(e, libc::EIO, "pwrite {k} (sticky {sticky}): {msg}");
            }
            if have_tool("qemu-img") {
                let c = qemu_img_check(&work);
                assert!(
                    c.check_errors == 0 && c.corruptions == 0 && matches!(c.exit_code, 0 | 3),
                    "pwrite {k} failed (sticky {sticky}): {c}"
                );
            } else {
                skipped_check = true;
            }
            // qdirty can still open it, and finds the bitmaps it left (in_use ones load as
            // inconsistent).
            qdirty::Image::open(&work, false)
                .unwrap_or_else(|e| panic!("pwrite {k} (sticky {sticky}): reopen: {e}"));
        }
    }
    if skipped_check {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: qemu-img check part: qemu-img not installed"
        );
        assert!(
            std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() != Ok("1"),
            "{test}: qemu-img not installed, and QDIRTY_REQUIRE_QEMU=1"
        );
    }
}

/// A host allocator that hands back a bad place: unaligned, cluster 0, beyond 2^56 (or 2^63),
/// or clusters holding the image's metadata (L1 table, refcount table, a refcount block). The
/// store fails with EINVAL naming the offset and what lives there, and writes nothing.
#[test]
fn io_host_allocations_are_checked() {
    let tmp = TempDir::new("io_host_allocations_are_checked");
    let img = make_image(tmp.path(), "a.qcow2");
    let b = std::fs::read(&img).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let (l1, reftable) = (be64(40), be64(48));
    let refblock0 = be64(reftable as usize);
    let end = (b.len() as u64).next_multiple_of(cs);
    let cases: [(u64, &str); 7] = [
        (end + 512, "not a valid"),
        (1 << 56, "not a valid"),
        (u64::MAX - (cs - 1), "not a valid"),
        (l1, "the L1 table"),
        (reftable, "the refcount table"),
        (refblock0, "refcount block 0"),
        (0, "cluster 0"),
    ];
    for (at, want) in cases {
        std::fs::write(&img, &b).unwrap();
        let mut h = RHost::new(&img);
        h.alloc_at = vec![at];
        let mut o = ops();
        o.alloc_clusters = Some(r_alloc);
        o.free_clusters = Some(r_free);
        let image = open_io(&o, &mut h, QDIRTY_OPEN_RDWR).unwrap();
        add_persistent(image, "b");
        unsafe { qdirty_image_set_dirty(image, 0, MIB) };
        let before = h.pwrites;
        let (e, msg) = close(image).unwrap_err();
        assert_eq!(e, libc::EINVAL, "{at:#x}: {msg}");
        assert!(
            msg.contains(&format!("{at:#x}")) && msg.contains(want),
            "{at:#x}: '{want}' not in: {msg}"
        );
        assert_eq!(
            h.pwrites, before,
            "{at:#x}: a refused allocation was written to"
        );
        if have_tool("qemu-img") {
            assert_check_clean(&img, &format!("after the host allocated at {at:#x}"));
        }
    }
}
