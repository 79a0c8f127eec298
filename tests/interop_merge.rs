//! Interop E: merge, enable, disable, clear and remove, done by `qemu-img bitmap` on one copy of
//! an image and by qdirty on another: QEMU must then see identical bitmaps in both copies.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB + 512;

/// Bitmaps (name, granularity, disabled at the end) with random content written by QEMU.
const BITMAPS: &[(&str, u64, bool)] = &[
    ("fine", 512, false),
    ("mid", 65536, true),
    ("coarse", 4 * MIB, false),
    ("t-fine", 512, false),
    ("t-mid", 65536, true),
    ("t-coarse", 2 * MIB, true),
    ("empty", 4096, true),
];

/// Makes an image whose bitmaps hold different random content: each bitmap is added, then
/// receives its own writes, then the next one is added...
fn make_image(img: &Path, seed: u64) {
    qemu_img_create(img, SIZE, "cluster_size=4096", &[]);
    let mut rng = Prng::new(seed);
    for (i, &(name, g, _)) in BITMAPS.iter().enumerate() {
        qemu_img_bitmap_add(img, name, Some(g), false);
        if name != "empty" {
            qemu_io_write(img, &random_ranges(&mut rng, 8 + i, SIZE, 400_000, 1));
        }
    }
    for &(name, _, disabled) in BITMAPS {
        if disabled {
            qemu_img_bitmap(img, &["--disable"], name);
        }
    }
    assert_check_clean(img, "merge source image");
}

/// Every bitmap of both copies looks the same to QEMU (flags, granularity, runs).
fn assert_same(q: &Path, d: &Path, context: &str) {
    assert_check_clean(q, &format!("{context} (qemu-img copy)"));
    assert_check_clean(d, &format!("{context} (qdirty copy)"));
    let qi = qemu_img_info_bitmaps(q, false);
    let di = qemu_img_info_bitmaps(d, false);
    let key = |v: &[QemuBitmapInfo]| {
        let mut k: Vec<(String, u64, Vec<String>)> = v
            .iter()
            .map(|b| {
                let mut f = b.flags.clone();
                f.sort();
                (b.name.clone(), b.granularity, f)
            })
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        key(&di),
        key(&qi),
        "{context}: qemu-img info bitmaps (qdirty copy left, qemu-img copy right)"
    );
    for b in &qi {
        let qr = nbd_dirty_extents(q, &b.name);
        let dr = nbd_dirty_extents(d, &b.name);
        assert!(
            qr == dr,
            "{context}: runs of '{}' differ: {}",
            b.name,
            diff_runs(&qr, &dr)
        );
    }
}

fn merge_case(test: &str, target: &str, source: &str) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let q = tmp.join("q.qcow2");
    make_image(&q, 3);
    let d = tmp.join("d.qcow2");
    copy(&q, &d);
    let tg = qemu_img_info_bitmaps(&q, false)
        .iter()
        .find(|b| b.name == target)
        .unwrap()
        .granularity;
    let want = union_runs(
        &nbd_dirty_extents(&q, target),
        &regranulate(&nbd_dirty_extents(&q, source), tg, SIZE),
    );
    qemu_img_bitmap(&q, &["--merge", source], target);
    assert_eq!(
        nbd_dirty_extents(&q, target),
        want,
        "sanity: qemu-img merge result"
    );
    let mut image = qd_open(&d, true);
    image
        .merge_bitmap(target.as_bytes(), source.as_bytes())
        .unwrap_or_else(|e| panic!("merge {source} into {target}: {e}"));
    image.close().expect("close");
    assert_same(&q, &d, &format!("merge {source} into {target}"));
}

#[test]
fn e_merge_same_granularity() {
    merge_case("e_merge_same_granularity", "t-fine", "fine");
}

#[test]
fn e_merge_fine_into_coarse() {
    merge_case("e_merge_fine_into_coarse", "t-coarse", "fine");
}

#[test]
fn e_merge_coarse_into_fine() {
    merge_case("e_merge_coarse_into_fine", "t-fine", "coarse");
}

#[test]
fn e_merge_into_disabled_and_from_empty() {
    merge_case("e_merge_into_disabled_and_from_empty", "t-mid", "coarse");
    merge_case("e_merge_into_disabled_and_from_empty", "mid", "empty");
}

#[test]
fn e_merge_from_another_image() {
    let test = "e_merge_from_another_image";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let src = tmp.join("src.qcow2");
    make_image(&src, 77);
    let q = tmp.join("q.qcow2");
    make_image(&q, 3);
    let d = tmp.join("d.qcow2");
    copy(&q, &d);
    let src_before = read_file(&src);
    for (target, source) in [("t-fine", "coarse"), ("t-coarse", "fine"), ("t-mid", "mid")] {
        let (dir, _) = split(&q);
        run_ok(
            "qemu-img",
            &[
                "bitmap",
                "-f",
                "qcow2",
                "--merge",
                source,
                "-b",
                "src.qcow2",
                "-F",
                "qcow2",
                "q.qcow2",
                target,
            ],
            &dir,
        );
        let mut image = qd_open(&d, true);
        let mut src_image = qd_open(&src, false);
        image
            .merge_bitmap_from(target.as_bytes(), &mut src_image, source.as_bytes())
            .unwrap_or_else(|e| panic!("merge {source} from src into {target}: {e}"));
        src_image.close().unwrap();
        image.close().expect("close");
        assert_same(
            &q,
            &d,
            &format!("merge {source} from another image into {target}"),
        );
    }
    assert!(
        read_file(&src) == src_before,
        "the source image opened read-only was changed"
    );
}

#[test]
fn e_merge_size_mismatch_refused() {
    let test = "e_merge_size_mismatch_refused";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let src = tmp.join("src.qcow2");
    qemu_img_create(&src, SIZE + 512, "", &[]);
    qemu_img_bitmap_add(&src, "s", None, false);
    let d = tmp.join("d.qcow2");
    make_image(&d, 3);
    // QEMU refuses too.
    let (dir, _) = split(&d);
    let out = run(
        "qemu-img",
        &[
            "bitmap",
            "-f",
            "qcow2",
            "--merge",
            "s",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "d.qcow2",
            "fine",
        ],
        &dir,
    );
    assert!(
        !out.status.success(),
        "sanity: QEMU refuses a size mismatch"
    );
    let before = nbd_dirty_extents(&d, "fine");
    let mut image = qd_open(&d, true);
    let mut src_image = qd_open(&src, false);
    let e = image
        .merge_bitmap_from(b"fine", &mut src_image, b"s")
        .expect_err("size mismatch must fail");
    assert!(matches!(e, qdirty::Error::SizeMismatch { .. }), "{e:?}");
    src_image.close().unwrap();
    image.close().expect("close");
    assert_eq!(nbd_dirty_extents(&d, "fine"), before);
}

#[test]
fn e_enable_disable_clear_remove() {
    let test = "e_enable_disable_clear_remove";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let q = tmp.join("q.qcow2");
    make_image(&q, 5);
    let d = tmp.join("d.qcow2");
    copy(&q, &d);
    // qemu-img side: one command per operation.
    qemu_img_bitmap(&q, &["--enable"], "mid");
    qemu_img_bitmap(&q, &["--disable"], "fine");
    qemu_img_bitmap(&q, &["--clear"], "coarse");
    qemu_img_bitmap(&q, &["--clear"], "t-mid");
    qemu_img_bitmap(&q, &["--enable"], "t-fine"); // already enabled
    qemu_img_bitmap(&q, &["--disable"], "t-coarse"); // already disabled
    qemu_img_bitmap(&q, &["--remove"], "t-fine");
    qemu_img_bitmap(&q, &["--remove"], "empty");
    // qdirty side: same operations in one session.
    let mut image = qd_open(&d, true);
    qd_bm_mut(&mut image, "mid").enable().expect("enable");
    qd_bm_mut(&mut image, "fine").disable().expect("disable");
    qd_bm_mut(&mut image, "coarse").clear().expect("clear");
    qd_bm_mut(&mut image, "t-mid").clear().expect("clear");
    qd_bm_mut(&mut image, "t-fine").enable().expect("enable");
    qd_bm_mut(&mut image, "t-coarse")
        .disable()
        .expect("disable");
    image.remove_bitmap(b"t-fine").expect("remove");
    image.remove_bitmap(b"empty").expect("remove");
    image.close().expect("close");
    assert_same(&q, &d, "after enable/disable/clear/remove");
    // The states matter: QEMU writes to both copies mark exactly the enabled bitmaps.
    let writes = [(0u64, 1u64), (7 * MIB + 3, 300_000), (SIZE - 512, 512)];
    qemu_io_write(&q, &writes);
    qemu_io_write(&d, &writes);
    assert_same(&q, &d, "after QEMU wrote to both copies");
    assert_qdirty_matches_qemu(&d, "qdirty copy read back");
}
