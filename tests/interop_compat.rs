//! Interop F: qcow2 v2 images, and unknown header extensions / header fields.

mod common;

use common::*;
use qdirty::{AddOptions, Image};

const MIB: u64 = 1 << 20;

#[test]
fn f_v2_images_are_read_only_without_bitmaps() {
    let test = "f_v2_images_are_read_only_without_bitmaps";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    // A plain v2 image, and one that carries a (stale) bitmaps extension: qemu-img amend to
    // compat=0.10 keeps it, and QEMU then ignores it.
    let plain = tmp.join("v2.qcow2");
    qemu_img_create(&plain, 8 * MIB, "compat=0.10", &[]);
    qemu_io_write(&plain, &[(0, 4096)]);
    let amended = tmp.join("amended.qcow2");
    qemu_img_create(&amended, 8 * MIB, "", &[]);
    qemu_img_bitmap_add(&amended, "b1", None, false);
    qemu_io_write(&amended, &[(MIB, 4096)]);
    run_ok(
        "qemu-img",
        &["amend", "-f", "qcow2", "-o", "compat=0.10", "amended.qcow2"],
        tmp.path(),
    );
    for img in [&plain, &amended] {
        let h = raw_header(img);
        assert_eq!(h.version, 2, "sanity");
        assert!(
            qemu_img_info_bitmaps(img, false).is_empty(),
            "sanity: QEMU lists no bitmaps in v2"
        );
        let before = read_file(img);
        for rw in [false, true] {
            let mut image =
                Image::open(img, rw).unwrap_or_else(|e| panic!("open v2 (rw={rw}): {e}"));
            assert!(image.read_only(), "a v2 image must open read-only");
            assert_eq!(image.version(), 2);
            assert!(image.bitmap_ids().is_empty(), "v2 images hold no bitmaps");
            let e = image
                .add_bitmap(
                    b"new",
                    0,
                    AddOptions {
                        persistent: true,
                        disabled: false,
                        autoload: None,
                    },
                )
                .expect_err("adding a persistent bitmap to a v2 image must fail");
            assert!(
                e.to_string().contains("v2"),
                "the error should mention v2: {e}"
            );
            // A transient bitmap is fine (QEMU allows it too) and is never stored.
            image
                .add_bitmap(b"transient", 0, AddOptions::default())
                .unwrap_or_else(|e| panic!("transient bitmap on v2: {e}"));
            image.close().expect("close");
        }
        assert!(read_file(img) == before, "opening a v2 image changed it");
        assert_eq!(qemu_img_check(img).corruptions, 0);
    }
}

const UNKNOWN_MAGIC: u32 = 0x7155_4E4B;
const UNKNOWN_MAGIC2: u32 = 0x0BAD_F00D;

#[test]
fn f_unknown_extensions_and_header_fields_survive() {
    let test = "f_unknown_extensions_and_header_fields_survive";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    for (i, cluster) in [65536u64, 4096, 512].into_iter().enumerate() {
        let img = tmp.join(&format!("a{i}.qcow2"));
        qemu_img_create(&img, 16 * MIB, &format!("cluster_size={cluster}"), &[]);
        if i != 1 {
            qemu_img_bitmap_add(&img, "old", Some(4096), false);
        }
        qemu_io_write(&img, &[(0, 70_000), (9 * MIB, 512)]);
        // Add two unknown extensions (odd lengths: padding) and 16 bytes of unknown header
        // fields, keeping the known extensions as QEMU wrote them.
        let h = raw_header(&img);
        let mut exts = h.extensions.clone();
        let data1: Vec<u8> = (0..13u8).map(|b| b.wrapping_mul(37)).collect();
        let data2: Vec<u8> = vec![0xEE; 3];
        exts.insert(0, (UNKNOWN_MAGIC, data1.clone()));
        exts.push((UNKNOWN_MAGIC2, data2.clone()));
        let fields: Vec<u8> = (1..=16u8).collect();
        rewrite_header(&img, &fields, &exts);
        // QEMU accepts it and keeps it.
        assert_check_clean(&img, "sanity: hand-made header");
        let guest_copy = tmp.join(&format!("g{i}.qcow2"));
        copy(&img, &guest_copy);
        let q = tmp.join(&format!("q{i}.qcow2"));
        copy(&img, &q);
        qemu_img_bitmap_add(&q, "by-qemu", None, false);
        let qh = raw_header(&q);
        assert_eq!(
            qh.ext(UNKNOWN_MAGIC),
            Some(&data1[..]),
            "sanity: QEMU keeps unknown extensions"
        );
        assert_eq!(
            qh.header_length, 128,
            "sanity: QEMU keeps unknown header fields"
        );

        let mut image = qd_open(&img, true);
        let id = qd_add(&mut image, "by-qdirty", 0, false);
        image.bitmap_mut(id).unwrap().set_dirty(MIB, 1).unwrap();
        image.close().expect("close");

        let ctx = format!("cluster size {cluster}");
        let after = raw_header(&img);
        assert_eq!(
            after.ext(UNKNOWN_MAGIC),
            Some(&data1[..]),
            "{ctx}: unknown extension 1 lost or changed"
        );
        assert_eq!(
            after.ext(UNKNOWN_MAGIC2),
            Some(&data2[..]),
            "{ctx}: unknown extension 2 lost or changed"
        );
        assert_eq!(after.header_length, 128, "{ctx}: header_length");
        assert_eq!(
            &after.cluster0[112..128],
            &fields[..],
            "{ctx}: unknown header fields"
        );
        assert!(after.ext(EXT_BITMAPS).is_some(), "{ctx}");
        assert_check_clean(&img, &ctx);
        let info = qemu_img_info_bitmaps(&img, false);
        assert_eq!(info.len(), if i != 1 { 2 } else { 1 }, "{ctx}: {info:?}");
        assert_eq!(
            nbd_dirty_extents(&img, "by-qdirty"),
            expected_runs(&[(MIB, 1)], cluster.clamp(4096, 65536), 16 * MIB)
        );
        if i != 1 {
            assert_eq!(
                nbd_dirty_extents(&img, "old"),
                expected_runs(&[(0, 70_000), (9 * MIB, 512)], 4096, 16 * MIB)
            );
        }
        let (rc, out) = qemu_img_compare(&guest_copy, &img);
        assert_eq!(rc, 0, "{ctx}: guest data changed: {out}");
        // The known extensions QEMU wrote are still understood by QEMU (feature table etc.).
        let info = qemu_img_info(&img, false);
        assert_eq!(
            info.get("virtual-size").and_then(Json::as_u64),
            Some(16 * MIB)
        );
    }
}

#[test]
fn f_header_length_104_image() {
    // An old v3 header (header_length 104, no compression type byte): qdirty must open it and
    // QEMU must still accept what qdirty writes.
    let test = "f_header_length_104_image";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 8 * MIB, "", &[]);
    qemu_io_write(&img, &[(0, 4096)]);
    let h = raw_header(&img);
    // Re-lay cluster 0 with a 104-byte header.
    let mut c0 = h.cluster0[..104].to_vec();
    c0[100..104].copy_from_slice(&104u32.to_be_bytes());
    for (magic, data) in &h.extensions {
        c0.extend_from_slice(&magic.to_be_bytes());
        c0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        c0.extend_from_slice(data);
        c0.resize(c0.len().next_multiple_of(8), 0);
    }
    c0.extend_from_slice(&[0u8; 8]);
    c0.resize(h.cluster0.len(), 0);
    write_at(&img, 0, &c0);
    assert_check_clean(&img, "sanity: header_length 104");
    let mut image = qd_open(&img, true);
    qd_add(&mut image, "b", 4096, false);
    image.set_dirty(0, 1);
    image.close().expect("close");
    assert_check_clean(&img, "after qdirty wrote a 104-byte-header image");
    assert_eq!(nbd_dirty_extents(&img, "b"), vec![(0, 4096)]);
    assert!(raw_header(&img).header_length >= 104);
}

/// A QEMU process with lazy refcounts that dies leaves the dirty bit set: QEMU itself repairs
/// the refcounts on its next writable open. qdirty does not repair refcounts, so it opens such an
/// image read-only only, says to run `qemu-img check -r all`, and works after that.
#[test]
fn f_dirty_lazy_refcount_image_needs_repair() {
    let test = "f_dirty_lazy_refcount_image_needs_repair";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("lazy.qcow2");
    qemu_img_create(&img, 8 * MIB, "lazy_refcounts=on", &[]);
    qemu_img_bitmap_add(&img, "b1", None, false);
    qemu_io_abort(&img, &["write -P 0x5a 1M 64k".to_string()]);
    let dirty = read_file(&img);
    assert_eq!(dirty[79] & 1, 1, "sanity: QEMU left the dirty bit set");

    let err = Image::open(&img, true).unwrap_err();
    assert!(err.to_string().contains("qemu-img check -r all"), "{err}");
    assert_eq!(err.errno(), libc::EACCES);
    assert!(read_file(&img) == dirty, "a refused open writes nothing");
    let ro = Image::open(&img, false).unwrap();
    let b1 = ro.find_bitmap(b"b1").unwrap();
    assert!(ro.bitmap(b1).unwrap().inconsistent(), "QEMU left b1 in_use");
    drop(ro);

    run_ok(
        "qemu-img",
        &["check", "-r", "all", "lazy.qcow2"],
        tmp.path(),
    );
    let mut rw = Image::open(&img, true).unwrap();
    rw.remove_bitmap(b"b1").unwrap();
    rw.add_bitmap(
        b"b2",
        0,
        AddOptions {
            persistent: true,
            ..Default::default()
        },
    )
    .unwrap();
    rw.close().unwrap();
    assert_check_clean(&img, test);
    let names: Vec<String> = qemu_img_info_bitmaps(&img, false)
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, vec!["b2".to_string()]);
}
