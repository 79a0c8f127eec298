//! Self-tests of the interop harness (the test kit, qdirty_testkit): the JSON parser, the run
//! models, and the QEMU-only helpers checked against what was written. These do not call the library.

mod common;

use common::*;

#[test]
fn json_parser_handles_qemu_shapes() {
    let j = Json::parse(
        r#" {"a": [1, -2, 3.5e2, true, false, null], "s": "x\"\\\/\n\u00e9\ud83d\ude00",
            "big": 18446744073709551615, "o": {}, "e": []} "#,
    )
    .expect("parse");
    let a = j.get("a").and_then(Json::as_array).expect("a");
    assert_eq!(a[0].as_u64(), Some(1));
    assert_eq!(a[1].as_i64(), Some(-2));
    assert_eq!(a[2], Json::Num("3.5e2".into()));
    assert_eq!(a[3].as_bool(), Some(true));
    assert_eq!(a[5], Json::Null);
    assert_eq!(
        j.get("s").and_then(Json::as_str),
        Some("x\"\\/\n\u{e9}\u{1F600}")
    );
    assert_eq!(j.get("big").and_then(Json::as_u64), Some(u64::MAX));
    assert_eq!(
        j.path(&["o"]).and_then(Json::as_object).map(<[_]>::len),
        Some(0)
    );
    assert!(Json::parse("{\"a\":1,}").is_err());
    assert!(Json::parse("[1 2]").is_err());
    assert!(Json::parse("\"abc").is_err());
    assert!(Json::parse("{} x").is_err());
    let s = "q\"\\\n\u{1}é";
    assert_eq!(Json::parse(&json_str(s)).unwrap(), Json::Str(s.into()));
}

#[test]
fn run_models() {
    assert_eq!(
        merge_runs(vec![(10, 5), (0, 10), (20, 0), (14, 2), (30, 1)]),
        vec![(0, 16), (30, 1)]
    );
    // Rounded outward to granules, clamped at the disk end.
    assert_eq!(
        expected_runs(&[(1, 1), (4095, 2), (10_000, 5000)], 4096, 12_800),
        vec![(0, 12_800)]
    );
    assert_eq!(
        expected_runs(&[(1, 1), (10_000, 5000)], 4096, 12_800),
        vec![(0, 4096), (8192, 4608)]
    );
    assert_eq!(
        merge_runs(expected_runs(&[(1, 1), (4095, 2)], 4096, 1 << 20)),
        vec![(0, 8192)]
    );
    assert_eq!(
        union_runs(&[(0, 4)], &[(4, 4), (100, 1)]),
        vec![(0, 8), (100, 1)]
    );
    let mut r = Prng::new(7);
    let a: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    let mut r = Prng::new(7);
    let b: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(a, b);
    let mut r = Prng::new(1);
    for (o, l) in random_ranges(&mut r, 200, 1 << 20, 70_000, 512) {
        assert!(
            l > 0 && o + l <= 1 << 20 && o % 512 == 0 && l % 512 == 0,
            "{o} {l}"
        );
    }
}

#[test]
fn harness_nbd_extents_match_written_ranges() {
    if !require_qemu("harness_nbd_extents_match_written_ranges") {
        return;
    }
    let tmp = TempDir::new("h-nbd");
    let img = tmp.join("a.qcow2");
    let size = 16 * 1024 * 1024 + 3 * 512; // not a multiple of any granularity above 512
    qemu_img_create(&img, size, "cluster_size=4096", &[]);
    let grans = [512u64, 4096, 65536, 1 << 20];
    for g in grans {
        qemu_img_bitmap_add(&img, &format!("g{g}"), Some(g), false);
    }
    qemu_img_bitmap_add(&img, "off", Some(4096), true);
    let mut rng = Prng::new(42);
    let mut ranges = random_ranges(&mut rng, 40, size, 100_000, 1);
    ranges.push((size - 1, 1)); // the very last byte
    qemu_io_write(&img, &ranges);
    for g in grans {
        let got = nbd_dirty_extents(&img, &format!("g{g}"));
        assert_eq!(got, expected_runs(&ranges, g, size), "granularity {g}");
    }
    assert_eq!(nbd_dirty_extents(&img, "off"), vec![]);
    let info = qemu_img_info_bitmaps(&img, false);
    assert_eq!(info.len(), 5);
    for b in &info {
        assert_eq!(b.auto(), b.name != "off", "{b:?}");
        assert!(!b.in_use());
    }
    assert!(qemu_img_check(&img).clean());
}

#[test]
fn harness_qmp_and_in_use() {
    if !require_qemu("harness_qmp_and_in_use") {
        return;
    }
    let tmp = TempDir::new("h-qmp");
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 8 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "b1", Some(65536), false);
    qemu_io_write(&img, &[(0, 1), (1 << 20, 70_000)]);
    // Read-write daemon: add persistent bitmaps, merge, quit stores them.
    let mut q = Qsd::start(&img, false, &tmp);
    q.bitmap_add("b2", Some(512), true, true);
    q.exec_ok(
        "block-dirty-bitmap-merge",
        r#"{"node":"fmt0","target":"b2","bitmaps":["b1"]}"#,
    );
    let s1 = q.sha256("b1");
    let s2 = q.sha256("b2");
    assert_eq!(s1.len(), 64);
    assert_ne!(s1, s2, "different granularities serialise differently");
    assert!(q
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            Some(r#"{"node":"fmt0","name":"nope"}"#)
        )
        .is_err());
    // While the daemon holds the image, info -U shows in-use.
    let during = qemu_img_info_bitmaps(&img, true);
    assert!(
        during.iter().any(|b| b.name == "b1" && b.in_use()),
        "{during:?}"
    );
    q.quit();
    let after = qemu_img_info_bitmaps(&img, false);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|b| !b.in_use()));
    assert_eq!(
        nbd_dirty_extents(&img, "b2"),
        vec![(0, 65536), (1 << 20, 131_072)]
    );
    // Read-only daemon gives the same hashes and writes nothing.
    let before = read_file(&img);
    let shas = qemu_sha256s(&img, &["b1".into(), "b2".into()], &tmp);
    assert_eq!(shas["b1"], s1);
    assert_eq!(shas["b2"], s2);
    assert_eq!(read_file(&img), before, "read-only daemon changed the file");
    // SIGKILL leaves the bitmaps in_use.
    let q = Qsd::start(&img, false, &tmp);
    q.kill();
    let killed = qemu_img_info_bitmaps(&img, false);
    assert!(killed.iter().all(|b| b.in_use()), "{killed:?}");
    let refusal = nbd_refusal(&img, "b1").expect("QEMU must refuse an in-use bitmap");
    assert!(
        refusal.contains("Bitmap 'b1' is inconsistent and cannot be used"),
        "{refusal}"
    );
    assert!(qemu_img_check(&img).clean());
}

#[test]
fn harness_qemu_io_abort_and_check_codes() {
    if !require_qemu("harness_qemu_io_abort_and_check_codes") {
        return;
    }
    let tmp = TempDir::new("h-abort");
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 4 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "b1", None, false);
    qemu_img_bitmap_add(&img, "b2", None, true);
    qemu_io_abort(&img, &["write -P 0xab 0 64k".into()]);
    let info = qemu_img_info_bitmaps(&img, false);
    assert!(info.iter().all(|b| b.in_use()), "{info:?}");
    // Clearing autoclear bit 0 by hand, then a read-write QEMU open: only leaks.
    let other = tmp.join("b.qcow2");
    qemu_img_create(&other, 4 << 20, "", &[]);
    qemu_img_bitmap_add(&other, "x", None, false);
    qemu_io_write(&other, &[(0, 4096)]);
    let h = raw_header(&other);
    assert!(h.ext(EXT_BITMAPS).is_some());
    assert_eq!(h.autoclear & 1, 1);
    set_autoclear(&other, h.autoclear & !1);
    qemu_io(&other, &["read 0 512".into()]);
    assert!(
        raw_header(&other).ext(EXT_BITMAPS).is_none(),
        "QEMU drops the extension"
    );
    let c = qemu_img_check(&other);
    assert_eq!(c.exit_code, 3, "{c}");
    assert!(c.leaks > 0 && c.corruptions == 0, "{c}");
    let r = qemu_img_check_args(&other, &["-r", "leaks"]);
    assert_eq!(r.exit_code, 0, "{r}");
    assert!(qemu_img_check(&other).clean());
}
