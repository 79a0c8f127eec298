//! Interop D: autoclear feature bits.
//!
//! Extension present with autoclear bit 0 clear (a program without bitmap support wrote the
//! image): qdirty lists no bitmaps; a read-only open writes nothing; a read-write open drops the
//! extension exactly as QEMU does (only leaks remain). Unknown autoclear bits are cleared by a
//! read-write open and kept by a read-only one. Removing the last bitmap drops the extension and
//! bit 0 together.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

fn make_image(img: &Path) {
    qemu_img_create(img, 8 * MIB, "", &[]);
    qemu_img_bitmap_add(img, "b1", Some(4096), false);
    qemu_img_bitmap_add(img, "b2", None, true);
    qemu_io_write(img, &[(0, 100_000), (3 * MIB, 4096)]);
}

/// Clears autoclear bit 0 by hand (byte 95, bit 0 of the big-endian u64 at offset 88).
fn clear_bitmaps_bit(img: &Path) {
    let b = read_at(img, 95, 1)[0];
    assert_eq!(b & 1, 1, "sanity: bit 0 set");
    write_at(img, 95, &[b & !1]);
    assert_eq!(autoclear(img) & 1, 0);
    assert!(raw_header(img).ext(EXT_BITMAPS).is_some());
}

#[test]
fn d_bit0_clear_read_only_lists_nothing_writes_nothing() {
    let test = "d_bit0_clear_read_only_lists_nothing_writes_nothing";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    clear_bitmaps_bit(&img);
    assert!(
        qemu_img_info_bitmaps(&img, false).is_empty(),
        "sanity: QEMU lists none"
    );
    let before = read_file(&img);
    let image = qd_open(&img, false);
    assert!(
        image.bitmap_ids().is_empty(),
        "qdirty lists bitmaps of an image whose autoclear bit 0 is clear"
    );
    image.close().unwrap();
    assert!(read_file(&img) == before, "read-only open changed the file");
}

#[test]
fn d_bit0_clear_read_write_drops_extension_like_qemu() {
    let test = "d_bit0_clear_read_write_drops_extension_like_qemu";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    clear_bitmaps_bit(&img);
    let by_qemu = tmp.join("q.qcow2");
    copy(&img, &by_qemu);
    let guest_copy = tmp.join("g.qcow2");
    copy(&img, &guest_copy);

    // QEMU's behaviour on its copy: a read-write open.
    qemu_io(&by_qemu, &["read 0 512".into()]);
    let q_check = qemu_img_check(&by_qemu);
    let q_hdr = raw_header(&by_qemu);
    assert!(q_hdr.ext(EXT_BITMAPS).is_none(), "sanity");
    assert_eq!(q_check.exit_code, 3, "sanity: {q_check}");

    let image = qd_open(&img, true);
    assert!(image.bitmap_ids().is_empty());
    image.close().expect("close");
    let h = raw_header(&img);
    assert!(
        h.ext(EXT_BITMAPS).is_none(),
        "qdirty kept the bitmaps extension"
    );
    assert_eq!(
        h.autoclear, q_hdr.autoclear,
        "autoclear after the open (qdirty left, QEMU right)"
    );
    assert!(qemu_img_info_bitmaps(&img, false).is_empty());
    let c = qemu_img_check(&img);
    assert_eq!(c.exit_code, 3, "only leaks expected: {c}");
    assert_eq!((c.corruptions, c.check_errors), (0, 0), "{c}");
    assert_eq!(
        c.leaks, q_check.leaks,
        "leaked clusters (qdirty left, QEMU right)"
    );
    let r = qemu_img_check_args(&img, &["-r", "leaks"]);
    assert_eq!(r.exit_code, 0, "{r}");
    assert_check_clean(&img, "after -r leaks");
    let (rc, out) = qemu_img_compare(&guest_copy, &img);
    assert_eq!(rc, 0, "guest data changed: {out}");
    // The image takes new bitmaps normally afterwards.
    let mut image = qd_open(&img, true);
    qd_add(&mut image, "fresh", 4096, false);
    image.close().expect("close");
    assert_eq!(autoclear(&img) & 1, 1);
    assert_check_clean(&img, "after adding a bitmap");
    assert_eq!(qemu_img_info_bitmaps(&img, false).len(), 1);
}

#[test]
fn d_unknown_autoclear_bits() {
    let test = "d_unknown_autoclear_bits";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    for with_bitmaps in [true, false] {
        let img = tmp.join(&format!("a{with_bitmaps}.qcow2"));
        if with_bitmaps {
            make_image(&img);
        } else {
            qemu_img_create(&img, 8 * MIB, "", &[]);
        }
        let bit0 = u64::from(with_bitmaps);
        let unknown = 1u64 << 40 | 1 << 63 | 1 << 2;
        set_autoclear(&img, autoclear(&img) | unknown);

        // Read-only: kept, nothing written.
        let before = read_file(&img);
        let image = qd_open(&img, false);
        assert_eq!(image.bitmap_ids().len(), if with_bitmaps { 2 } else { 0 });
        image.close().unwrap();
        assert!(read_file(&img) == before, "read-only open changed the file");
        assert_eq!(autoclear(&img), unknown | bit0);

        // What QEMU does on a copy.
        let q = tmp.join(&format!("q{with_bitmaps}.qcow2"));
        copy(&img, &q);
        qemu_io(&q, &["read 0 512".into()]);
        assert_eq!(
            autoclear(&q),
            bit0,
            "sanity: QEMU clears unknown autoclear bits"
        );

        // Read-write: cleared; the bitmaps survive (bit 0 is known).
        let image = qd_open(&img, true);
        assert_eq!(
            autoclear(&img) & unknown,
            0,
            "unknown autoclear bits still set while open read-write"
        );
        image.close().expect("close");
        assert_eq!(
            autoclear(&img),
            autoclear(&q),
            "autoclear after a read-write session (qdirty left, QEMU right)"
        );
        assert_check_clean(&img, "after clearing unknown autoclear bits");
        if with_bitmaps {
            assert_qdirty_matches_qemu(&img, "bitmaps after clearing unknown autoclear bits");
            assert_eq!(
                nbd_dirty_extents(&img, "b1"),
                expected_runs(&[(0, 100_000), (3 * MIB, 4096)], 4096, 8 * MIB)
            );
        }
    }
}

#[test]
fn d_removing_last_bitmap_drops_extension_and_bit0() {
    let test = "d_removing_last_bitmap_drops_extension_and_bit0";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make_image(&img);
    let q = tmp.join("q.qcow2");
    copy(&img, &q);
    qemu_img_bitmap(&q, &["--remove"], "b1");
    qemu_img_bitmap(&q, &["--remove"], "b2");
    let qh = raw_header(&q);
    assert!(
        qh.ext(EXT_BITMAPS).is_none() && qh.autoclear & 1 == 0,
        "sanity: QEMU"
    );

    let mut image = qd_open(&img, true);
    image.remove_bitmap(b"b1").expect("remove b1");
    // One left: extension and bit still there.
    let h = raw_header(&img);
    assert_eq!(h.autoclear & 1, 1, "bit 0 cleared while a bitmap remains");
    assert!(h.ext(EXT_BITMAPS).is_some());
    image.remove_bitmap(b"b2").expect("remove b2");
    let h = raw_header(&img);
    assert!(
        h.ext(EXT_BITMAPS).is_none(),
        "extension left after removing the last bitmap"
    );
    assert_eq!(
        h.autoclear & 1,
        0,
        "autoclear bit 0 left set after removing the last bitmap"
    );
    image.close().expect("close");
    let h = raw_header(&img);
    assert!(
        h.ext(EXT_BITMAPS).is_none() && h.autoclear & 1 == 0,
        "after close"
    );
    assert_eq!(h.autoclear, qh.autoclear);
    assert_check_clean(&img, "after removing every bitmap");
    assert!(qemu_img_info_bitmaps(&img, false).is_empty());
    // Same through a bitmap added and removed in one session on a fresh image.
    let fresh = tmp.join("f.qcow2");
    qemu_img_create(&fresh, 8 * MIB, "", &[]);
    let mut image = qd_open(&fresh, true);
    qd_add(&mut image, "tmp", 0, false);
    image.close().expect("close");
    let mut image = qd_open(&fresh, true);
    image.remove_bitmap(b"tmp").expect("remove");
    image.close().expect("close");
    let h = raw_header(&fresh);
    assert!(h.ext(EXT_BITMAPS).is_none() && h.autoclear & 1 == 0);
    assert_check_clean(&fresh, "fresh image after add+remove");
}
