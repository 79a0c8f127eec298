//! Durable mode against SIGKILL (README.md, 'Durable mode'): a real process writes guest data
//! from three threads through the C ABI (`qdirty_image_prepare_write`, the write into the raw
//! data file, `qdirty_image_set_dirty`) while its main thread makes management calls, and is
//! killed at a random moment, many times over. After each kill QEMU must find no bitmap in
//! use and no corruption, and an incremental backup taken with the surviving bitmap (its
//! extents from `qemu-nbd -B` + `nbdinfo --map`, copied over the previous backup) must equal
//! the disk (`qemu-img compare`).

mod common;

use std::ffi::CString;
use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use qdirty::ffi::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const CHILD_ENV: &str = "QDIRTY_DURABLE_CHILD";

struct Img(*mut qdirty_image);
// SAFETY: a qdirty_image may be used from any thread (its documented thread safety).
unsafe impl Send for Img {}
unsafe impl Sync for Img {}

fn check(rc: i32, err: *mut qdirty_error, what: &str) {
    if rc < 0 {
        // Exit (the parent sees a writer that died by itself) rather than panic in one thread.
        eprintln!("{what}: {rc}: {}", common::c_error::message(err));
        std::process::exit(3);
    }
}

/// The process that gets killed: never returns.
fn child(dir: &Path) -> ! {
    let img_path = CString::new(dir.join("img.qcow2").to_str().unwrap()).unwrap();
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let img = unsafe { qdirty_image_open_durable(img_path.as_ptr(), MIB, &mut err) };
    if img.is_null() {
        check(-1, err, "open");
    }
    let img = Img(img);
    let data = FileOptions::new()
        .write(true)
        .open(dir.join("data.raw"))
        .unwrap();
    std::fs::write(dir.join("ready"), b"").unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (img, data, stop) = (&img, &data, &stop);
            s.spawn(move || {
                let mut rng = Prng::new(std::process::id() as u64 * 31 + t);
                let mut buf = vec![0u8; 64 << 10];
                while !stop.load(Ordering::Relaxed) {
                    // Writes cluster around a few hot places, as a guest's do.
                    let hot = rng.below(8) * (SIZE / 8);
                    let off = (hot + rng.below(SIZE / 64)) & !511;
                    let len = (1 + rng.below(128)) * 512;
                    let mut e = ptr::null_mut();
                    // SAFETY: valid image and error pointer.
                    let rc = unsafe { qdirty_image_prepare_write(img.0, off, len, &mut e) };
                    check(rc, e, "prepare_write");
                    buf[..len as usize].fill(rng.below(255) as u8 + 1);
                    data.write_all_at(&buf[..len as usize], off).unwrap();
                    // SAFETY: valid image.
                    unsafe { qdirty_image_set_dirty(img.0, off, len) };
                }
            });
        }
        // Management calls while the guest writes. A "tmp" left by the previous round (it
        // survived the kill) is removed first.
        let tmp = CString::new("tmp").unwrap();
        let mut e = ptr::null_mut();
        // SAFETY: valid arguments.
        if unsafe { qdirty_image_remove_bitmap(img.0, tmp.as_ptr(), &mut e) } < 0 {
            // SAFETY: e was set by the failing call.
            unsafe { qdirty_error_free(e) };
        }
        let mut n = 0u64;
        loop {
            std::thread::sleep(Duration::from_millis(3));
            let mut e = ptr::null_mut();
            // SAFETY: valid arguments.
            unsafe {
                match n % 3 {
                    0 => {
                        let b = qdirty_image_add_bitmap(
                            img.0,
                            tmp.as_ptr(),
                            0,
                            QDIRTY_BITMAP_PERSISTENT,
                            &mut e,
                        );
                        if b.is_null() {
                            check(-1, e, "add");
                        }
                    }
                    1 => check(qdirty_image_store_bitmaps(img.0, &mut e), e, "store"),
                    _ => check(
                        qdirty_image_remove_bitmap(img.0, tmp.as_ptr(), &mut e),
                        e,
                        "remove",
                    ),
                }
            }
            n += 1;
        }
    })
}

/// The child's entry point: does nothing unless started by the test below.
#[test]
fn child_entry() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
    }
}

#[test]
fn incremental_backups_from_bitmaps_survive_sigkill() {
    if !require_qemu("incremental_backups_from_bitmaps_survive_sigkill") {
        return;
    }
    let dir = TempDir::new("durable-kill");
    let img = dir.path().join("img.qcow2");
    let data = dir.path().join("data.raw");
    let backup = dir.path().join("backup.raw");
    qemu_img_create(&img, SIZE, "data_file=data.raw,data_file_raw=on", &[]);
    qemu_img_bitmap_add(&img, "inc", Some(65536), false);
    let rounds = if std::env::var("QDIRTY_CRASH_FULL").as_deref() == Ok("1") {
        12
    } else {
        5
    };
    let mut rng = Prng::new(7);
    let mut read_fraction = Vec::new();
    for round in 0..rounds {
        // The previous backup, and the bitmap cleared by QEMU.
        std::fs::copy(&data, &backup).unwrap();
        qemu_img_bitmap(&img, &["--clear"], "inc");
        let _ = std::fs::remove_file(dir.path().join("ready"));
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .spawn()
            .unwrap();
        while !dir.path().join("ready").exists() {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("round {round}: the writer exited before it was ready: {st}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(300)));
        assert!(
            c.try_wait().unwrap().is_none(),
            "round {round}: the writer died by itself"
        );
        c.kill().unwrap();
        c.wait().unwrap();
        let ctx = format!("round {round}");
        let chk = qemu_img_check(&img);
        assert!(
            chk.corruptions == 0 && chk.check_errors == 0,
            "{ctx}: qemu-img check: {chk}"
        );
        for b in qemu_img_info_bitmaps(&img, false) {
            assert!(
                !b.in_use(),
                "{ctx}: bitmap {} is in use after SIGKILL",
                b.name
            );
        }
        // The incremental backup: the bitmap's extents from the disk over the previous backup.
        let extents = nbd_dirty_extents(&img, "inc");
        let (src, dst) = (
            std::fs::File::open(&data).unwrap(),
            FileOptions::new().write(true).open(&backup).unwrap(),
        );
        let mut buf = Vec::new();
        let mut read = 0;
        for &(o, l) in &extents {
            buf.resize(l as usize, 0);
            src.read_exact_at(&mut buf, o).unwrap();
            dst.write_all_at(&buf, o).unwrap();
            read += l;
        }
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&backup)
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{ctx}: the incremental backup differs from the disk ({} extents, {read} bytes): {}",
            extents.len(),
            String::from_utf8_lossy(&out.stdout)
        );
        read_fraction.push(read as f64 / SIZE as f64);
        // Leaks from the kill are repaired as an administrator would.
        if chk.leaks > 0 {
            let r = qemu_img_check_args(&img, &["-r", "leaks"]);
            assert_eq!(r.corruptions, 0, "{ctx}: {r}");
        }
    }
    eprintln!("share of the disk each incremental backup read: {read_fraction:?}");
}
