//! Interop C: the in_use flag.
//!
//! While qdirty holds an image read-write, QEMU must see every consistent bitmap as in-use (as
//! when QEMU itself holds it); a read-only open writes nothing; bitmaps left in_use by a crashed
//! QEMU (qemu-io abort, SIGKILLed qemu-storage-daemon) are inconsistent in qdirty: listed, every
//! operation but remove fails with QEMU's message and hint, remove works and leaves a clean image.

mod common;

use std::path::Path;

use common::*;
use qdirty::{Error, Image};

const MIB: u64 = 1 << 20;

/// An image with an enabled and a disabled bitmap holding data, made by QEMU.
fn make_image(img: &Path) {
    qemu_img_create(img, 16 * MIB, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(img, "on", Some(4096), false);
    qemu_img_bitmap_add(img, "off", Some(512), false);
    qemu_io_write(img, &[(0, 10_000), (5 * MIB, 70_000)]);
    qemu_img_bitmap(img, &["--disable"], "off");
    qemu_io_write(img, &[(9 * MIB, 4096)]);
}

fn flags_by_name(img: &Path) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> = qemu_img_info_bitmaps(img, true)
        .into_iter()
        .map(|b| {
            let mut f = b.flags;
            f.sort();
            (b.name, f)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn c_read_write_open_marks_in_use_like_qemu() {
    let test = "c_read_write_open_marks_in_use_like_qemu";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    let runs_on = nbd_dirty_extents(&img, "on");
    let runs_off = nbd_dirty_extents(&img, "off");

    // What QEMU shows while QEMU holds the image read-write.
    let q = Qsd::start(&img, false, &tmp);
    let qemu_view = flags_by_name(&img);
    q.quit();
    assert!(
        qemu_view
            .iter()
            .all(|b| b.1.contains(&"in-use".to_string())),
        "sanity: {qemu_view:?}"
    );

    let image = qd_open(&img, true);
    let during = flags_by_name(&img);
    assert_eq!(
        during, qemu_view,
        "qemu-img info -U while qdirty holds the image (left) vs while QEMU does (right)"
    );
    for (name, flags) in &during {
        assert!(
            flags.contains(&"in-use".to_string()),
            "'{name}' not in-use while qdirty holds the image: {flags:?}"
        );
    }
    // A bitmap added in this session is not on disk yet.
    let mut image = image;
    qd_add(&mut image, "new", 65536, false);
    assert_eq!(flags_by_name(&img).len(), 2);
    image.close().expect("close");

    let after = qemu_img_info_bitmaps(&img, false);
    assert_eq!(after.len(), 3, "{after:?}");
    for b in &after {
        assert!(!b.in_use(), "in-use after close: {b:?}");
        assert_eq!(b.auto(), b.name != "off", "{b:?}");
    }
    assert_eq!(nbd_dirty_extents(&img, "on"), runs_on);
    assert_eq!(nbd_dirty_extents(&img, "off"), runs_off);
    assert_eq!(nbd_dirty_extents(&img, "new"), vec![]);
    assert_check_clean(&img, "after a read-write session");
}

#[test]
fn c_read_only_open_writes_nothing() {
    let test = "c_read_only_open_writes_nothing";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    // Also an in_use bitmap and an unknown autoclear bit: still nothing may be written.
    let abort_img = tmp.join("b.qcow2");
    make_image(&abort_img);
    qemu_io_abort(&abort_img, &["write 0 512".into()]);
    set_autoclear(&abort_img, autoclear(&abort_img) | 1 << 40);
    for p in [&img, &abort_img] {
        let before = read_file(p);
        let mut image = qd_open(p, false);
        assert!(image.read_only());
        let names: Vec<String> = qd_bitmaps(&mut image).into_iter().map(|b| b.0).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        for (_, b) in qd_bitmaps(&mut image) {
            assert!(b.readonly(), "bitmaps of a read-only image are readonly");
        }
        let info = qemu_img_info_bitmaps(p, true);
        assert!(
            info.iter().all(|b| (p == &img) != b.in_use()),
            "read-only open changed flags: {info:?}"
        );
        image.close().expect("close");
        assert!(
            read_file(p) == before,
            "a read-only open changed {}",
            p.display()
        );
    }
}

/// Every operation on an inconsistent bitmap but remove fails with QEMU's error.
fn assert_inconsistent_ops(image: &mut Image, name: &str, good: &str) {
    let want = format!("Bitmap '{name}' is inconsistent and cannot be used");
    let check = |what: &str, r: Result<(), Error>| {
        let e = r.expect_err(&format!("{what} on inconsistent bitmap '{name}' must fail"));
        assert!(
            matches!(e, Error::Inconsistent { .. }),
            "{what}: wrong error variant {e:?}"
        );
        assert_eq!(e.to_string(), want, "{what}: message");
        let hint = e.hint().unwrap_or_default();
        assert!(
            hint.contains("block-dirty-bitmap-remove"),
            "{what}: hint {hint:?}"
        );
    };
    {
        let b = qd_bm(image, name);
        assert!(b.inconsistent(), "'{name}' should be inconsistent");
        assert!(b.persistent());
        assert!(!b.enabled(), "inconsistent bitmaps are disabled");
        // No usable content: the infallible readers answer "every granule dirty" (never a
        // silent "clean"), the fallible ones fail with QEMU's refusal.
        let all = b.size().div_ceil(b.granularity()) * b.granularity();
        assert_eq!(
            b.count(),
            all,
            "an inconsistent bitmap reads as entirely dirty"
        );
        assert!(b.dirty_runs(0, u64::MAX).is_err());
        assert!(b.try_sha256().is_err());
    }
    let g = qd_bm(image, name).granularity();
    check("set_dirty", qd_bm_mut(image, name).set_dirty(0, 512));
    check("reset_dirty", qd_bm_mut(image, name).reset_dirty(0, g));
    check("clear", qd_bm_mut(image, name).clear());
    check("enable", qd_bm_mut(image, name).enable());
    check("disable", qd_bm_mut(image, name).disable());
    check(
        "merge into",
        image.merge_bitmap(name.as_bytes(), good.as_bytes()),
    );
    check(
        "merge from",
        image.merge_bitmap(good.as_bytes(), name.as_bytes()),
    );
    // The write hook skips it: still no usable content, still refused by the fallible reads.
    image.set_dirty(0, MIB);
    assert!(qd_bm(image, name).dirty_runs(0, u64::MAX).is_err());
    // Its name stays taken, persistent or not.
    for persistent in [true, false] {
        let e = image
            .add_bitmap(
                name.as_bytes(),
                0,
                qdirty::AddOptions {
                    persistent,
                    disabled: false,
                    autoload: None,
                },
            )
            .expect_err("adding a bitmap with an in_use bitmap's name must fail");
        assert!(
            e.to_string().contains("already exists"),
            "add over in_use name: {e}"
        );
    }
}

fn in_use_case(test: &str, make_in_use: &dyn Fn(&TempDir, &Path)) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    make_in_use(&tmp, &img);
    // A bitmap added after the crash by QEMU is consistent.
    qemu_img_bitmap_add(&img, "later", Some(65536), false);
    qemu_io_write(&img, &[(MIB, 100)]);
    let info = qemu_img_info_bitmaps(&img, false);
    let in_use: Vec<&str> = info
        .iter()
        .filter(|b| b.in_use())
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(
        in_use,
        vec!["on", "off"],
        "sanity: QEMU's in-use list {info:?}"
    );
    for n in ["on", "off"] {
        let r = nbd_refusal(&img, n).expect("QEMU refuses in-use bitmaps");
        assert!(
            r.contains(&format!("Bitmap '{n}' is inconsistent and cannot be used")),
            "{r}"
        );
    }
    let later_runs = nbd_dirty_extents(&img, "later");
    assert_check_clean(&img, "sanity: in_use bitmaps are still referenced");

    // Read-only: listed as inconsistent, nothing written.
    let before = read_file(&img);
    let mut image = qd_open(&img, false);
    let list: Vec<(String, bool)> = qd_bitmaps(&mut image)
        .into_iter()
        .map(|(n, b)| (n, b.inconsistent()))
        .collect();
    let mut sorted = list.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            ("later".into(), false),
            ("off".into(), true),
            ("on".into(), true)
        ]
    );
    image.close().unwrap();
    assert!(read_file(&img) == before, "read-only open changed the file");

    // Read-write: every operation but remove fails; remove works.
    let mut image = qd_open(&img, true);
    // The consistent bitmap is in-use while held; the inconsistent ones stay in-use.
    assert!(qemu_img_info_bitmaps(&img, true).iter().all(|b| b.in_use()));
    assert_inconsistent_ops(&mut image, "on", "later");
    assert_inconsistent_ops(&mut image, "off", "later");
    image.close().expect("close with inconsistent bitmaps");
    // Closing keeps the in_use entries verbatim.
    let info = qemu_img_info_bitmaps(&img, false);
    let in_use: Vec<&str> = info
        .iter()
        .filter(|b| b.in_use())
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(
        in_use,
        vec!["on", "off"],
        "after a qdirty session: {info:?}"
    );
    assert_check_clean(&img, "after a session with inconsistent bitmaps");
    assert_eq!(
        nbd_dirty_extents(&img, "later"),
        expected_runs(&[(0, MIB), (MIB, 100)], 65536, 16 * MIB)
    );

    let mut image = qd_open(&img, true);
    image
        .remove_bitmap(b"on")
        .expect("remove inconsistent 'on'");
    assert!(image.find_bitmap(b"on").is_none());
    // Now the name is free again.
    qd_add(&mut image, "on", 4096, true);
    image.remove_bitmap(b"on").expect("remove the new 'on'");
    image
        .remove_bitmap(b"off")
        .expect("remove inconsistent 'off'");
    image.close().expect("close");
    let info = qemu_img_info_bitmaps(&img, false);
    assert_eq!(
        info.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        vec!["later"],
        "{info:?}"
    );
    assert!(!info[0].in_use() && info[0].auto());
    assert_check_clean(&img, "after removing the inconsistent bitmaps");
    let mut want = later_runs;
    want = union_runs(&want, &expected_runs(&[(0, MIB)], 65536, 16 * MIB));
    assert_eq!(nbd_dirty_extents(&img, "later"), want);
}

#[test]
fn c_in_use_left_by_qemu_io_abort() {
    in_use_case("c_in_use_left_by_qemu_io_abort", &|_, img| {
        qemu_io_abort(img, &["write -P 0xab 0 64k".into()]);
    });
}

#[test]
fn c_in_use_left_by_killed_storage_daemon() {
    in_use_case("c_in_use_left_by_killed_storage_daemon", &|tmp, img| {
        let mut q = Qsd::start(img, false, tmp);
        // Added in the session: never reaches the disk.
        q.bitmap_add("lost", Some(4096), true, false);
        q.kill();
        assert!(qemu_img_info_bitmaps(img, false)
            .iter()
            .all(|b| b.name != "lost"));
    });
}

#[test]
fn c_qdirty_crash_leaves_in_use_like_qemu() {
    let test = "c_qdirty_crash_leaves_in_use_like_qemu";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    let runs_on = nbd_dirty_extents(&img, "on");

    // A session that stores its bitmaps midway (store_bitmaps), then "crashes" (the image is
    // leaked: no close, no Drop). A real crash also drops the process's image locks, which a
    // leaked image in this process would keep: open it without locks.
    let storage = qdirty::image::storage::FileStorage::open(&img, true).expect("open");
    let mut image = Image::open_storage(Box::new(storage), "a.qcow2", true).expect("open");
    qd_add(&mut image, "stored", 4096, false);
    image
        .add_bitmap(
            b"transient",
            4096,
            qdirty::AddOptions {
                persistent: false,
                disabled: false,
                autoload: None,
            },
        )
        .expect("transient add");
    image.set_dirty(2 * MIB, 1);
    image.store_bitmaps().expect("store_bitmaps");
    // store_bitmaps leaves everything in_use again, as QEMU does after a reopen.
    let during = qemu_img_info_bitmaps(&img, true);
    let names: Vec<&str> = during.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names.len(),
        3,
        "on, off and stored on disk, no transient: {during:?}"
    );
    assert!(!names.contains(&"transient"));
    assert!(
        during.iter().all(|b| b.in_use()),
        "after store_bitmaps: {during:?}"
    );
    image.set_dirty(3 * MIB, 1);
    std::mem::forget(image);

    // QEMU's view of the crashed session: every bitmap in-use and refused, refcounts fine.
    let info = qemu_img_info_bitmaps(&img, false);
    assert!(info.iter().all(|b| b.in_use()), "{info:?}");
    let r = nbd_refusal(&img, "stored").expect("QEMU must refuse an in-use bitmap");
    assert!(r.contains("inconsistent"), "{r}");
    let c = qemu_img_check(&img);
    assert_eq!(
        (c.corruptions, c.check_errors),
        (0, 0),
        "a crash must never leave corruptions: {c}"
    );
    assert!(
        c.clean(),
        "store_bitmaps should have flushed its frees: {c}"
    );

    // A clean session after the crash: everything stored is inconsistent; remove them all and
    // start again.
    let mut image = qd_open(&img, true);
    for (n, b) in qd_bitmaps(&mut image) {
        assert!(
            b.inconsistent(),
            "'{n}' should be inconsistent after the crash"
        );
    }
    for n in ["on", "off", "stored"] {
        image.remove_bitmap(n.as_bytes()).expect("remove");
    }
    qd_add(&mut image, "on", 4096, false);
    qd_bm_mut(&mut image, "on")
        .set_dirty(runs_on[0].0, runs_on[0].1)
        .unwrap();
    image.close().expect("close");
    assert_check_clean(&img, "after recovery");
    assert_eq!(nbd_dirty_extents(&img, "on"), runs_on[..1].to_vec());
}
