//! The `qdirty` command, run as a process against images made by QEMU, judged by qemu-img
//! info/check/bitmap and qemu-nbd + nbdinfo on the same images.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use qdirty_testkit::*;

const QDIRTY: &str = env!("CARGO_BIN_EXE_qdirty");

fn qd(args: &[&str], cwd: &Path) -> Output {
    Command::new(QDIRTY)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run qdirty")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit code, and stderr: never a panic trace.
fn code(o: &Output) -> i32 {
    let err = text(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic trace: {err}"
    );
    o.status.code().expect("exit code")
}

fn qd_ok(args: &[&str], cwd: &Path) -> String {
    let o = qd(args, cwd);
    assert_eq!(code(&o), 0, "qdirty {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// qdirty dump --output=json, as (name -> extents).
fn qd_dump(img: &Path, names: &[&str]) -> Vec<(String, Vec<(u64, u64)>)> {
    let (dir, base) = split(img);
    let mut args = vec!["dump", "--output=json", base.as_str()];
    args.extend_from_slice(names);
    let out = qd_ok(&args, &dir);
    let js = Json::parse(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    js.get("bitmaps")
        .and_then(Json::as_array)
        .unwrap()
        .iter()
        .map(|b| {
            let name = b.get("name").and_then(Json::as_str).unwrap().to_string();
            let ext: Vec<(u64, u64)> = b
                .get("extents")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            (
                                e.get("offset").and_then(Json::as_u64).unwrap(),
                                e.get("length").and_then(Json::as_u64).unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let total: u64 = ext.iter().map(|e| e.1).sum();
            if let Some(d) = b.get("dirty_bytes").and_then(Json::as_u64) {
                assert_eq!(d, total);
            }
            (name, ext)
        })
        .collect()
}

/// An image with three bitmaps QEMU made and wrote to: b1 (64k), b2 (4k, disabled after the
/// first writes), b3 (512 B).
fn qemu_image(t: &TempDir, name: &str) -> std::path::PathBuf {
    let img = t.join(name);
    qemu_img_create(&img, 256 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "b1", None, false);
    qemu_img_bitmap_add(&img, "b2", Some(4096), false);
    qemu_io_write(&img, &[(0, 4096), (1 << 20, 100_000), (100 << 20, 65536)]);
    qemu_img_bitmap(&img, &["--disable"], "b2");
    qemu_img_bitmap_add(&img, "b3", Some(512), false);
    qemu_io_write(
        &img,
        &[
            (3 << 20, 1000),
            (200 << 20, 5 << 20),
            ((256 << 20) - 512, 512),
        ],
    );
    img
}

#[test]
fn info_matches_qemu_img_info() {
    if !require_qemu("info_matches_qemu_img_info") {
        return;
    }
    let t = TempDir::new("cli-info");
    let img = qemu_image(&t, "a.qcow2");
    let (dir, base) = split(&img);
    for in_use in [false, true] {
        if in_use {
            qemu_io_abort(&img, &["write 0 512".to_string()]);
        }
        let out = qd_ok(&["info", "--output=json", "--count", &base], &dir);
        let js = Json::parse(&out).unwrap();
        let qemu = qemu_img_info(&img, true);
        // Parsed as qemu-img's document: the same names and values where both say it.
        for key in [
            &["virtual-size"][..],
            &["cluster-size"],
            &["format"],
            &["filename"],
            &["actual-size"],
            &["dirty-flag"],
            &["format-specific", "type"],
            &["format-specific", "data", "compat"],
            &["format-specific", "data", "compression-type"],
            &["format-specific", "data", "lazy-refcounts"],
            &["format-specific", "data", "refcount-bits"],
            &["format-specific", "data", "corrupt"],
            &["format-specific", "data", "extended-l2"],
        ] {
            assert_eq!(
                js.path(key).map(|v| format!("{v:?}")),
                qemu.path(key).map(|v| format!("{v:?}")),
                "{key:?}\n{out}"
            );
        }
        assert_eq!(
            bitmaps_of_info(&js),
            bitmaps_of_info(&qemu),
            "in_use={in_use}\n{out}"
        );
        assert!(!bitmaps_of_info(&js).is_empty());
        // The space figure equals what `qemu-img measure` reports for the same bitmaps.
        let measure = run_ok(
            "qemu-img",
            &[
                "measure",
                "-U",
                "--output=json",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                &base,
            ],
            &dir,
        );
        let measure = Json::parse(&measure).unwrap();
        assert_eq!(
            js.get("bitmaps_measure").and_then(Json::as_u64),
            measure.get("bitmaps").and_then(Json::as_u64),
            "in_use={in_use}"
        );
        let listed = js
            .path(&["format-specific", "data", "bitmaps"])
            .and_then(Json::as_array)
            .unwrap();
        for b in listed {
            let consistent = b.get("consistent").and_then(Json::as_bool).unwrap();
            assert_eq!(consistent, !in_use);
            let dirty = b.get("dirty_bytes").unwrap();
            if in_use {
                assert!(matches!(dirty, Json::Null));
            } else {
                let name = b.get("name").and_then(Json::as_str).unwrap();
                let nbd: u64 = nbd_dirty_extents(&img, name).iter().map(|e| e.1).sum();
                assert_eq!(dirty.as_u64(), Some(nbd), "{name}");
            }
        }
        // Human output names every bitmap with its flags.
        let human = qd_ok(&["info", &base], &dir);
        assert!(human.contains("b2: granularity 4096, flags ["), "{human}");
        assert_eq!(human.contains("inconsistent"), in_use, "{human}");
    }
}

#[test]
fn dump_matches_qemu_nbd() {
    if !require_qemu("dump_matches_qemu_nbd") {
        return;
    }
    let t = TempDir::new("cli-dump");
    let img = qemu_image(&t, "a.qcow2");
    let mut rng = Prng::new(7);
    let ranges = random_ranges(&mut rng, 60, 256 << 20, 300_000, 1);
    qemu_io_write(&img, &ranges);
    let dumped = qd_dump(&img, &[]);
    assert_eq!(
        dumped.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["b1", "b2", "b3"]
    );
    for (name, ext) in &dumped {
        assert_eq!(ext, &nbd_dirty_extents(&img, name), "bitmap {name}");
    }
    // Named bitmaps, and the union.
    let one = qd_dump(&img, &["b2"]);
    assert_eq!(one.len(), 1);
    let (dir, base) = split(&img);
    let out = qd_ok(
        &["dump", "--union", "--output=json", &base, "b2", "b3"],
        &dir,
    );
    let js = Json::parse(&out).unwrap();
    let u = &js.get("bitmaps").and_then(Json::as_array).unwrap()[0];
    let got: Vec<(u64, u64)> = u
        .get("extents")
        .and_then(Json::as_array)
        .unwrap()
        .iter()
        .map(|e| {
            (
                e.get("offset").and_then(Json::as_u64).unwrap(),
                e.get("length").and_then(Json::as_u64).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        union_runs(
            &nbd_dirty_extents(&img, "b2"),
            &nbd_dirty_extents(&img, "b3")
        )
    );
    // Human output: one "OFFSET LENGTH" line per extent.
    let human = qd_ok(&["dump", &base, "b1"], &dir);
    let lines: Vec<(u64, u64)> = human
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(lines, nbd_dirty_extents(&img, "b1"));
    // In use: qemu-nbd refuses, and so does qdirty, with the same cause.
    qemu_io_abort(&img, &[]);
    let refusal = nbd_refusal(&img, "b1").expect("qemu-nbd refuses an in-use bitmap");
    let o = qd(&["dump", &base, "b1"], &dir);
    assert_eq!(code(&o), 1);
    let err = text(&o.stderr);
    assert!(
        refusal.contains("Bitmap 'b1' is inconsistent and cannot be used"),
        "{refusal}"
    );
    assert!(
        err.contains("Bitmap 'b1' is inconsistent and cannot be used"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The extents of one bitmap of a `qdirty dump --output=json` document (None: null).
fn json_extents(b: &Json) -> Option<Vec<(u64, u64)>> {
    b.get("extents").and_then(Json::as_array).map(|a| {
        a.iter()
            .map(|e| {
                (
                    e.get("offset").and_then(Json::as_u64).unwrap(),
                    e.get("length").and_then(Json::as_u64).unwrap(),
                )
            })
            .collect()
    })
}

#[test]
fn dump_never_lists_an_in_use_bitmap_as_clean() {
    if !require_qemu("dump_never_lists_an_in_use_bitmap_as_clean") {
        return;
    }
    let t = TempDir::new("cli-dump-inuse");
    let img = t.join("a.qcow2");
    qemu_img_create(&img, 64 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "old", None, false);
    qemu_io_write(&img, &[(0, 65536)]);
    // QEMU killed while it had the image open read-write: 'old' stays in_use for good.
    qemu_io_abort(&img, &["write 8M 64k".into()]);
    qemu_img_bitmap_add(&img, "new", Some(4096), false);
    qemu_io_write(&img, &[(1 << 20, 10_000), (30 << 20, 4096)]);
    let qi = qemu_img_info_bitmaps(&img, false);
    let in_use: Vec<(&str, bool)> = qi.iter().map(|b| (b.name.as_str(), b.in_use())).collect();
    assert_eq!(in_use, [("old", true), ("new", false)]);
    let refusal = nbd_refusal(&img, "old").expect("qemu-nbd refuses an in-use bitmap");
    let qemu_msg = "Bitmap 'old' is inconsistent and cannot be used";
    assert!(refusal.contains(qemu_msg), "{refusal}");
    let new_extents = nbd_dirty_extents(&img, "new");
    assert_eq!(new_extents, [(1 << 20, 12288), (30 << 20, 4096)]);
    let (dir, base) = split(&img);

    // Every bitmap, JSON: complete, 'old' without extents, exit 1, stderr names it.
    let o = qd(&["dump", "--output=json", &base], &dir);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("qdirty: "), "{err}");
    assert!(
        err.contains("bitmap 'old'") && err.contains(qemu_msg),
        "{err}"
    );
    assert!(err.contains("--skip-inconsistent"), "{err}");
    let js = Json::parse(&text(&o.stdout)).unwrap();
    let list = js.get("bitmaps").and_then(Json::as_array).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].get("name").and_then(Json::as_str), Some("old"));
    assert_eq!(
        list[0].get("consistent").and_then(Json::as_bool),
        Some(false)
    );
    assert_eq!(json_extents(&list[0]), None);
    assert_eq!(list[1].get("name").and_then(Json::as_str), Some("new"));
    assert_eq!(
        list[1].get("consistent").and_then(Json::as_bool),
        Some(true)
    );
    assert_eq!(json_extents(&list[1]), Some(new_extents.clone()));

    // Human: the '#' line is not the only trace: exit 1 and stderr.
    let o = qd(&["dump", &base], &dir);
    assert_eq!(code(&o), 1);
    let human = text(&o.stdout);
    assert!(
        human.contains("# bitmap 'old': inconsistent (in-use), no extents"),
        "{human}"
    );
    let lines: Vec<(u64, u64)> = human
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(lines, new_extents);
    assert!(text(&o.stderr).contains(qemu_msg), "{}", text(&o.stderr));

    // The union of every bitmap cannot be complete either.
    let o = qd(&["dump", "--union", &base], &dir);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains(qemu_msg));

    // --skip-inconsistent: same output, exit 0, the note stays.
    for extra in [&["--output=json"][..], &[], &["--union"]] {
        let mut args = vec!["dump", "--skip-inconsistent"];
        args.extend_from_slice(extra);
        args.push(&base);
        let o = qd(&args, &dir);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains("bitmap 'old'") && err.contains(qemu_msg),
            "{err}"
        );
        let mut plain = args.clone();
        plain.retain(|a| *a != "--skip-inconsistent");
        assert_eq!(o.stdout, qd(&plain, &dir).stdout, "{args:?}");
    }
    // Named: refused (as qemu-nbd) unless skipped; a consistent one alone is fine.
    let o = qd(&["dump", &base, "new", "old"], &dir);
    assert_eq!(code(&o), 1);
    assert!(o.stdout.is_empty());
    let o = qd(
        &["dump", "--skip-inconsistent", "--output=json", &base, "old"],
        &dir,
    );
    assert_eq!(code(&o), 0);
    assert!(text(&o.stderr).contains(qemu_msg));
    let js = Json::parse(&text(&o.stdout)).unwrap();
    let list = js.get("bitmaps").and_then(Json::as_array).unwrap();
    assert_eq!(
        list[0].get("consistent").and_then(Json::as_bool),
        Some(false)
    );
    assert_eq!(qd_dump(&img, &["new"]), [("new".to_string(), new_extents)]);
    // The help says so.
    let help = qd_ok(&["dump", "--help"], &dir);
    assert!(help.contains("--skip-inconsistent"), "{help}");
}

/// One qemu-img bitmap call and the same qdirty bitmap call on copies of `img`: same exit code,
/// same bitmaps (qemu-img info) and same extents (qemu-nbd) afterwards.
fn compare_bitmap_op(t: &TempDir, img: &Path, ops: &[&str], name: &str, tag: &str) {
    let a = t.join(&format!("{tag}-qemu.qcow2"));
    let b = t.join(&format!("{tag}-qdirty.qcow2"));
    copy(img, &a);
    copy(img, &b);
    let (dir, abase) = split(&a);
    let (_, bbase) = split(&b);
    let mut qargs = vec!["bitmap", "-f", "qcow2"];
    qargs.extend_from_slice(ops);
    qargs.extend([abase.as_str(), name]);
    let qo = run("qemu-img", &qargs, &dir);
    let mut dargs = vec!["bitmap"];
    dargs.extend_from_slice(ops);
    dargs.extend([bbase.as_str(), name]);
    let d = qd(&dargs, &dir);
    let qerr = text(&qo.stderr);
    let derr = text(&d.stderr);
    assert_eq!(
        code(&d),
        qo.status.code().unwrap(),
        "{ops:?} {name}: qemu-img: {qerr} qdirty: {derr}"
    );
    if !qo.status.success() {
        // qemu-img's message, with our name and the copy's file name.
        let want = qerr.replace("qemu-img", "qdirty").replace(&abase, &bbase);
        assert_eq!(derr, want, "{ops:?} {name}");
    }
    let qi = qemu_img_info_bitmaps(&a, false);
    assert_eq!(qi, qemu_img_info_bitmaps(&b, false), "{ops:?} {name}");
    for bm in &qi {
        if !bm.in_use() {
            assert_eq!(
                nbd_dirty_extents(&a, &bm.name),
                nbd_dirty_extents(&b, &bm.name),
                "{ops:?} {name}: bitmap {}",
                bm.name
            );
        }
    }
    assert_check_clean(&b, &format!("after qdirty bitmap {ops:?}"));
}

#[test]
fn bitmap_ops_match_qemu_img_bitmap() {
    if !require_qemu("bitmap_ops_match_qemu_img_bitmap") {
        return;
    }
    let t = TempDir::new("cli-bitmap");
    let img = qemu_image(&t, "a.qcow2");
    let other = t.join("other.qcow2");
    qemu_img_create(&other, 256 << 20, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(&other, "o", Some(1024), false);
    qemu_io_write(&other, &[(50 << 20, 3000), (7 << 20, 1 << 20)]);
    let cases: &[(&[&str], &str)] = &[
        (&["--add"], "new"),
        (&["--add", "-g", "64k"], "new"),
        (&["--add", "-g", "512", "--disable"], "new"),
        (&["--add", "-g", "1M", "--merge", "b3"], "new"),
        (&["--add"], "b1"),
        (&["--remove"], "b2"),
        (&["--remove"], "nope"),
        (&["--clear"], "b3"),
        (&["--clear"], "nope"),
        (&["--enable"], "b2"),
        (&["--disable"], "b1"),
        (&["--merge", "b3"], "b1"),
        (&["--merge", "b1", "--merge", "b3"], "b2"),
        (&["--merge", "nope"], "b1"),
        (&["--merge", "o", "-b", "other.qcow2"], "b1"),
        (&["--merge", "o", "-b", "other.qcow2", "-F", "qcow2"], "b3"),
        (&["--merge", "o", "-b", "missing.qcow2"], "b1"),
        (&["--clear", "--remove", "--add", "-g", "4k"], "b1"),
        (&["--add", "--add"], "x"),
        (&["--add", "-g", "3000"], "x"),
        (&["--add", "-g", "256"], "x"),
        (&["--add"], ""),
        (&["--enable", "--clear"], "b3"),
    ];
    for (i, (ops, name)) in cases.iter().enumerate() {
        compare_bitmap_op(&t, &img, ops, name, &format!("c{i}"));
    }
    // In use: everything but --remove is refused, as by qemu-img.
    let used = t.join("used.qcow2");
    copy(&img, &used);
    qemu_io_abort(&used, &[]);
    for (i, ops) in [
        &["--clear"][..],
        &["--enable"],
        &["--disable"],
        &["--remove"],
    ]
    .iter()
    .enumerate()
    {
        compare_bitmap_op(&t, &used, ops, "b1", &format!("u{i}"));
    }
    compare_bitmap_op(&t, &img, &["--merge", "b1"], "b2", "m-ok");
    let used_src = t.join("used-src.qcow2");
    copy(&used, &used_src);
    compare_bitmap_op(
        &t,
        &img,
        &["--merge", "b1", "-b", "used-src.qcow2"],
        "b2",
        "m-used",
    );
    // The inconsistent bitmap named is the merge source, in its file; QEMU's hint follows.
    let hint = t.join("hint.qcow2");
    copy(&img, &hint);
    let (dir, _) = split(&hint);
    let o = qd(
        &[
            "bitmap",
            "--merge",
            "b1",
            "-b",
            "used-src.qcow2",
            "hint.qcow2",
            "b2",
        ],
        &dir,
    );
    assert_eq!(code(&o), 1);
    assert_eq!(
        text(&o.stderr),
        "qdirty: Operation merge on bitmap b2 failed: Bitmap 'b1' is inconsistent and cannot \
         be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n"
    );
}

/// Patches autoclear bit 0 off: what a program without bitmap support leaves.
fn clear_bitmaps_bit(img: &Path) {
    set_autoclear(img, autoclear(img) & !1);
}

fn qd_check(img: &Path, extra: &[&str]) -> (i32, Json) {
    let (dir, base) = split(img);
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(&base);
    let o = qd(&args, &dir);
    let c = code(&o);
    let out = text(&o.stdout);
    (
        c,
        Json::parse(&out).unwrap_or_else(|e| panic!("{e}: {out} {}", text(&o.stderr))),
    )
}

/// qemu-img check and qdirty check on the same image: the same exit code and, under
/// qemu-img's names, the same figures (qemu-img leaves out the zero ones); the human output has
/// qemu-img's allocation line.
fn assert_check_same(img: &Path, context: &str) -> (i32, Json) {
    let q = qemu_img_check(img);
    let (c, js) = qd_check(img, &[]);
    let qjs = Json::parse(q.stdout.trim()).unwrap();
    assert_eq!(c, q.exit_code, "{context}: {q}");
    for key in [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "leaks",
        "corruptions",
        "leaks-fixed",
        "corruptions-fixed",
    ] {
        let theirs = qjs.get(key).and_then(Json::as_u64).unwrap_or(0);
        assert_eq!(
            js.get(key).and_then(Json::as_u64),
            Some(theirs),
            "{context}: {key}: {q}"
        );
    }
    let (dir, base) = split(img);
    let q_human = run("qemu-img", &["check", "-f", "qcow2", &base], &dir);
    let d_human = qd(&["check", &base], &dir);
    let line = |o: &Output| {
        text(&o.stdout)
            .lines()
            .find(|l| l.contains("% allocated"))
            .map(str::to_string)
    };
    assert_eq!(line(&d_human), line(&q_human), "{context}");
    (c, js)
}

#[test]
fn check_matches_qemu_img_check() {
    if !require_qemu("check_matches_qemu_img_check") {
        return;
    }
    let t = TempDir::new("cli-check");
    // Clean, with snapshots, compressed clusters and bitmaps.
    let img = qemu_image(&t, "a.qcow2");
    let (dir, base) = split(&img);
    run_ok("qemu-img", &["snapshot", "-c", "s1", &base], &dir);
    qemu_io(&img, &["write -c 150M 64k".into(), "write 64M 128k".into()]);
    let (c, js) = assert_check_same(&img, "clean");
    assert_eq!(c, 0);
    assert_eq!(js.get("bitmap_leaks").and_then(Json::as_u64), Some(0));
    // Extended L2 and 512-byte clusters.
    let ext = t.join("ext.qcow2");
    qemu_img_create(&ext, 64 << 20, "extended_l2=on,cluster_size=16k", &[]);
    qemu_img_bitmap_add(&ext, "e", None, false);
    qemu_io_write(&ext, &[(0, 100_000), (40 << 20, 7000)]);
    qemu_io(&ext, &["write -z 50M 1M".into(), "write -c 60M 16k".into()]);
    assert_eq!(assert_check_same(&ext, "extended l2").0, 0);
    let small = t.join("small.qcow2");
    qemu_img_create(&small, 64 << 20, "cluster_size=512,refcount_bits=1", &[]);
    qemu_img_bitmap_add(&small, "s", Some(512), false);
    qemu_io_write(&small, &[(0, 100_000), (40 << 20, 7000)]);
    let (c, js) = assert_check_same(&small, "512-byte clusters");
    assert_eq!(c, 0);
    clear_bitmaps_bit(&small);
    let (c, js2) = assert_check_same(&small, "512-byte clusters, stale");
    assert_eq!(c, 3);
    assert_eq!(js2.get("bitmap_leaks"), js2.get("leaks"));
    let _ = js;
    qd_check(&small, &["-r"]);
    assert_check_clean(&small, "512-byte clusters after -r");
    // A bitmap-unaware writer: the old bitmap structures leak.
    let stale = t.join("stale.qcow2");
    copy(&img, &stale);
    clear_bitmaps_bit(&stale);
    let (c, js) = assert_check_same(&stale, "stale extension");
    assert_eq!(c, 3);
    let leaks = js.get("leaks").and_then(Json::as_u64).unwrap();
    assert!(leaks > 0);
    assert_eq!(js.get("bitmap_leaks").and_then(Json::as_u64), Some(leaks));
    let (c, js) = qd_check(&stale, &["-r"]);
    assert_eq!(c, 0);
    assert_eq!(js.get("leaks-fixed").and_then(Json::as_u64), Some(leaks));
    assert_check_clean(&stale, "after qdirty check -r");
    assert!(qemu_img_info_bitmaps(&stale, false).is_empty());
    // An over-counted bitmap table cluster: a leak of a bitmap structure.
    let over = t.join("over.qcow2");
    copy(&img, &over);
    let info = Json::parse(&qd_ok(&["info", "--output=json", "over.qcow2"], &dir)).unwrap();
    let table = info
        .path(&["format-specific", "data", "bitmaps"])
        .and_then(Json::as_array)
        .unwrap()[0]
        .get("table_offset")
        .and_then(Json::as_u64)
        .unwrap();
    let h = raw_header(&over);
    let reftable = read_at(&over, h.refcount_table_offset, 8);
    let block = be_u64(&reftable, 0);
    let entry = block + 2 * (table / 65536);
    write_at(&over, entry, &[0, 2]);
    let (c, js) = assert_check_same(&over, "over-counted table");
    assert_eq!(
        (c, js.get("bitmap_leaks").and_then(Json::as_u64)),
        (3, Some(1))
    );
    let (c, _) = qd_check(&over, &["-r", "leaks"]);
    assert_eq!(c, 0);
    assert_check_clean(&over, "after qdirty check -r leaks");
    // A zeroed refcount of a bitmap table: a corruption, not repaired.
    let zero = t.join("zero.qcow2");
    copy(&img, &zero);
    write_at(&zero, entry, &[0, 0]);
    let (c, js) = assert_check_same(&zero, "zeroed table refcount");
    assert_eq!(c, 2);
    assert_eq!(js.get("bitmap_corruptions").and_then(Json::as_u64), Some(1));
    let (c, _) = qd_check(&zero, &["-r"]);
    assert_eq!(c, 2);
    // In use: not a check error (as qemu-img), removed only when asked.
    let used = t.join("used.qcow2");
    copy(&img, &used);
    qemu_io_abort(&used, &["write 0 4k".into()]);
    let (c, js) = assert_check_same(&used, "in use");
    assert_eq!(c, 0);
    assert_eq!(
        js.get("inconsistent_bitmaps")
            .and_then(Json::as_array)
            .map(|a| a.len()),
        Some(3)
    );
    let (c, js) = qd_check(&used, &["--remove-inconsistent"]);
    assert_eq!(c, 0);
    assert_eq!(
        js.get("removed_bitmaps")
            .and_then(Json::as_array)
            .map(|a| a.len()),
        Some(3)
    );
    assert!(qemu_img_info_bitmaps(&used, false).is_empty());
    assert_check_clean(&used, "after --remove-inconsistent");
    // Human output and stderr lines as qemu-img's.
    let o = qd(&["check", "stale.qcow2"], &dir);
    assert_eq!(code(&o), 0);
    assert!(text(&o.stdout).contains("No errors were found on the image."));
}

#[test]
fn create_is_what_qemu_img_sees() {
    if !require_qemu("create_is_what_qemu_img_sees") {
        return;
    }
    let t = TempDir::new("cli-create");
    let dir = t.path();
    for (size, opts, bytes, cs) in [
        ("1G", None, 1u64 << 30, 65536u64),
        ("100M", Some("cluster_size=4k"), 100 << 20, 4096),
        ("1.5M", Some("cluster_size=512"), 3 << 19, 512),
        ("2T", Some("cluster_size=2M"), 2 << 40, 2 << 20),
    ] {
        let name = format!("c-{size}.qcow2");
        let mut args = vec!["create", name.as_str(), size];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        qd_ok(&args, dir);
        let p = t.join(&name);
        let info = qemu_img_info(&p, false);
        assert_eq!(info.get("virtual-size").and_then(Json::as_u64), Some(bytes));
        assert_eq!(info.get("cluster-size").and_then(Json::as_u64), Some(cs));
        assert_check_clean(&p, "qdirty create");
        qd_ok(&["bitmap", "--add", &name, "b"], dir);
        assert_eq!(qemu_img_info_bitmaps(&p, false).len(), 1);
    }
    // Refusals: existing file, bad size, bad cluster size.
    for (args, msg) in [
        (&["create", "c-1G.qcow2", "1G"][..], "File exists"),
        (
            &["create", "x.qcow2", "1x"],
            "Invalid image size specified: '1x'.",
        ),
        (
            &["create", "x.qcow2", "16E"],
            "Must be between 0 and 9223372036854775807",
        ),
        (
            &["create", "x.qcow2", "1M", "-o", "cluster_size=3k"],
            "Cluster size must be a power of two",
        ),
        (&["create", "x.qcow2"], "Try 'qdirty create --help'"),
    ] {
        let o = qd(args, dir);
        assert_eq!(code(&o), 1, "{args:?}");
        let err = text(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
        // Refused before anything is announced.
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
        assert!(err.starts_with("qdirty: "), "{err}");
    }
}

#[test]
fn bad_input_gives_one_line_and_exit_codes() {
    let t = TempDir::new("cli-bad");
    let dir = t.path();
    std::fs::write(
        t.join("text.qcow2"),
        b"this is not a qcow2 image\n".repeat(100),
    )
    .unwrap();
    // A truncated image: header only.
    let full = t.join("full.qcow2");
    qdirty::Image::create(&full, 64 << 20, 0).unwrap();
    let mut img = qdirty::Image::open(&full, true).unwrap();
    img.add_bitmap(
        b"b1",
        0,
        qdirty::AddOptions {
            persistent: true,
            ..Default::default()
        },
    )
    .unwrap();
    img.set_dirty(0, 1 << 20);
    img.close().unwrap();
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(t.join("trunc.qcow2"), &bytes[..65536 + 100]).unwrap();
    std::fs::write(t.join("tiny.qcow2"), &bytes[..50]).unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["info", "missing.qcow2"], 1, "'missing.qcow2'"),
        (&["info", "text.qcow2"], 1, "'text.qcow2'"),
        (&["info", "tiny.qcow2"], 1, "'tiny.qcow2'"),
        (&["dump", "trunc.qcow2"], 1, "'trunc.qcow2'"),
        (&["dump", "missing.qcow2"], 1, "No such file"),
        (&["check", "text.qcow2"], 1, "'text.qcow2'"),
        (&["check", "trunc.qcow2"], 1, "'trunc.qcow2'"),
        (
            &["bitmap", "--clear", "trunc.qcow2", "b1"],
            1,
            "Could not open 'trunc.qcow2'",
        ),
        (
            &["dump", "full.qcow2", "nope"],
            1,
            "bitmap 'nope': Dirty bitmap 'nope' not found",
        ),
        (
            &["bitmap", "--clear", "full.qcow2", "nope"],
            1,
            "Dirty bitmap 'nope' not found",
        ),
        (
            &["bitmap", "--add", "-g", "1k1", "full.qcow2", "x"],
            1,
            "Invalid granularity",
        ),
        (
            &["bitmap", "--add", "-g", "3k", "full.qcow2", "x"],
            1,
            "Granularity must be power of 2",
        ),
        (
            &["bitmap", "--add", "-g", "8E", "full.qcow2", "x"],
            1,
            "Must be between",
        ),
        (&["info", "--output=xml", "full.qcow2"], 1, "--output"),
        (
            &["info", "--bogus", "full.qcow2"],
            1,
            "unrecognized option '--bogus'",
        ),
        (&["info"], 1, "Expecting one image file name"),
        (&["frobnicate"], 1, "unknown command"),
        (&[], 1, "no command"),
        (&["info", "-f", "raw", "full.qcow2"], 1, "qcow2"),
        (
            &["check", "-r", "all", "full.qcow2"],
            1,
            "qemu-img check -r all",
        ),
    ];
    for (args, want, msg) in cases {
        let o = qd(args, dir);
        assert_eq!(code(&o), *want, "{args:?}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        let first = err.lines().next().unwrap_or("");
        if *want == 1 {
            // getopt's errors name the subcommand, as qemu-img's do.
            assert!(
                first.starts_with("qdirty: ")
                    || args
                        .first()
                        .is_some_and(|c| first.starts_with(&format!("qdirty {c}: "))),
                "{args:?}: {err}"
            );
            assert!(first.contains(msg), "{args:?}: {err}");
            // One line, and qemu-img's "Try" line after a usage error.
            match err.lines().nth(1) {
                None => {}
                Some(l) => {
                    assert!(l.starts_with("Try 'qdirty "), "{args:?}: {err}");
                    assert_eq!(err.lines().count(), 2, "{args:?}: {err}");
                }
            }
        }
    }
    // --help for every subcommand, exit 0.
    for sub in ["info", "bitmap", "dump", "check", "create"] {
        let out = qd_ok(&[sub, "--help"], dir);
        assert!(out.starts_with(&format!("usage: qdirty {sub}")), "{out}");
    }
    assert!(qd_ok(&["--help"], dir).contains("Commands"));
}

// ---------------------------------------------------------------------------------------------
// Read errors (EIO) in real processes: an LD_PRELOAD shim (tests/eio_shim.c) fails the reads of
// one file that touch one byte range.

/// Magic of the qcow2 bitmaps extension.
const BITMAPS_EXT: u32 = 0x2385_2875;

/// The byte range [first, end) of the data clusters of bitmap `name`, read from the raw file
/// (bitmaps extension, directory, table), independently of qdirty.
fn bitmap_data_range(img: &Path, name: &str) -> (u64, u64) {
    let h = raw_header(img);
    let cs = 1u64 << h.cluster_bits;
    let ext = h.ext(BITMAPS_EXT).expect("a bitmaps extension");
    let nb = be_u32(ext, 0);
    let dir = read_at(img, be_u64(ext, 16), be_u64(ext, 8) as usize);
    let mut p = 0;
    for _ in 0..nb {
        let table_offset = be_u64(&dir, p);
        let table_size = be_u32(&dir, p + 8) as usize;
        let name_size = u16::from_be_bytes([dir[p + 18], dir[p + 19]]) as usize;
        let extra = be_u32(&dir, p + 20) as usize;
        let at = p + 24 + extra;
        if &dir[at..at + name_size] == name.as_bytes() {
            let table = read_at(img, table_offset, table_size * 8);
            let data: Vec<u64> = (0..table_size)
                .map(|i| be_u64(&table, i * 8) & 0x00ff_ffff_ffff_fe00)
                .filter(|&o| o != 0)
                .collect();
            let first = *data.iter().min().expect("bitmap data clusters");
            let last = *data.iter().max().unwrap();
            return (first, last + cs);
        }
        p += (24 + extra + name_size).next_multiple_of(8);
    }
    panic!("no bitmap '{name}' in {}", img.display());
}

/// The shim, built with cc into `t` (None, with a visible SKIP line, without a C compiler).
fn eio_shim(t: &TempDir, test: &str) -> Option<std::path::PathBuf> {
    if !have_tool("cc") {
        if std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: cc not installed, and QDIRTY_REQUIRE_QEMU=1");
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP {test}: cc not installed");
        return None;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/eio_shim.c");
    let so = t.join("eio.so");
    run_ok(
        "cc",
        &[
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            "-o",
            so.to_str().unwrap(),
            src.to_str().unwrap(),
            "-ldl",
        ],
        t.path(),
    );
    Some(so)
}

/// A fault: reads of `file` that touch `range` fail with EIO; each failed read is logged.
#[derive(Clone)]
struct Eio<'a> {
    shim: &'a Path,
    file: std::path::PathBuf,
    range: (u64, u64),
    log: std::path::PathBuf,
}

impl Eio<'_> {
    /// Runs `prog args` in `cwd` under the fault.
    fn run(&self, prog: &str, args: &[&str], cwd: &Path) -> Output {
        Command::new(prog)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .env("LD_PRELOAD", self.shim)
            .env("QDIRTY_EIO_FILE", self.file.canonicalize().unwrap())
            .env("QDIRTY_EIO_START", self.range.0.to_string())
            .env("QDIRTY_EIO_END", self.range.1.to_string())
            .env("QDIRTY_EIO_LOG", &self.log)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
    }

    /// How many reads failed so far (and forgets them).
    fn hits(&self) -> usize {
        let n = std::fs::read_to_string(&self.log)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        let _ = std::fs::remove_file(&self.log);
        n
    }
}

/// An image with two bitmaps QEMU made and wrote to: b (64k) and c (64k), different extents.
fn two_bitmaps(t: &TempDir, name: &str) -> std::path::PathBuf {
    let img = t.join(name);
    qemu_img_create(&img, 64 << 20, "", &[]);
    qemu_img_bitmap_add(&img, "b", None, false);
    qemu_io_write(&img, &[(0, 65536), (5 << 20, 200_000)]);
    qemu_img_bitmap_add(&img, "c", None, false);
    qemu_io_write(&img, &[(20 << 20, 4096), (40 << 20, 70_000)]);
    img
}

const QEMU_EIO: &str = "Could not read bitmap 'b' from image: Input/output error";

#[test]
fn unreadable_bitmap_data_fails_dump_and_info_count() {
    let test = "unreadable_bitmap_data_fails_dump_and_info_count";
    if !require_qemu(test) {
        return;
    }
    let t = TempDir::new("cli-eio-dump");
    let Some(shim) = eio_shim(&t, test) else {
        return;
    };
    let img = two_bitmaps(&t, "a.qcow2");
    let (dir, base) = split(&img);
    let b_extents = nbd_dirty_extents(&img, "b");
    let c_extents = nbd_dirty_extents(&img, "c");
    assert!(!b_extents.is_empty() && !c_extents.is_empty());
    let eio = Eio {
        shim: &shim,
        file: img.clone(),
        range: bitmap_data_range(&img, "b"),
        log: t.join("eio.log"),
    };
    // The shim works: QEMU fails on the same image, with the same fault, and only with it.
    let q = eio.run("qemu-img", &["info", "-f", "qcow2", &base], &dir);
    assert_eq!(q.status.code(), Some(1), "{}", text(&q.stderr));
    assert!(text(&q.stderr).contains(QEMU_EIO), "{}", text(&q.stderr));
    assert!(eio.hits() > 0);
    let harmless = Eio {
        range: (1 << 40, (1 << 40) + 512),
        ..eio.clone()
    };
    let q = harmless.run("qemu-img", &["info", "-f", "qcow2", &base], &dir);
    assert_eq!(q.status.code(), Some(0), "{}", text(&q.stderr));

    // b named, b among all bitmaps (skipping inconsistent ones changes nothing: b is not),
    // JSON or not: exit 1, QEMU's message, nothing on stdout.
    for args in [
        &["dump", &base, "b"][..],
        &["dump", "--output=json", &base, "b"],
        &["dump", &base],
        &["dump", "--skip-inconsistent", "--output=json", &base],
        &["dump", "--union", &base, "c", "b"],
        &["info", "--count", &base],
        &["info", "--count", "--output=json", &base],
    ] {
        let o = eio.run(QDIRTY, args, &dir);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("qdirty: ") && err.contains(QEMU_EIO),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
        assert!(eio.hits() > 0, "{args:?}: the fault was not hit");
    }
    // c alone is readable: listed as QEMU exports it; info without --count reads no data.
    let o = eio.run(QDIRTY, &["dump", "--output=json", &base, "c"], &dir);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let js = Json::parse(&text(&o.stdout)).unwrap();
    let list = js.get("bitmaps").and_then(Json::as_array).unwrap();
    assert_eq!(json_extents(&list[0]), Some(c_extents));
    let o = eio.run(QDIRTY, &["info", &base], &dir);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    // Without the fault, b is what it was.
    assert_eq!(qd_dump(&img, &["b"]), [("b".to_string(), b_extents)]);
}

#[test]
fn unreadable_merge_source_fails_and_stays_consistent() {
    let test = "unreadable_merge_source_fails_and_stays_consistent";
    if !require_qemu(test) {
        return;
    }
    let t = TempDir::new("cli-eio-merge");
    let Some(shim) = eio_shim(&t, test) else {
        return;
    };
    let img = two_bitmaps(&t, "a.qcow2");
    let b_before = nbd_dirty_extents(&img, "b");
    let c_before = nbd_dirty_extents(&img, "c");
    let range = bitmap_data_range(&img, "b");
    let check_unchanged = |p: &Path, context: &str| {
        let qi = qemu_img_info_bitmaps(p, false);
        assert_eq!(qi.len(), 2, "{context}");
        for bm in &qi {
            assert!(!bm.in_use(), "{context}: bitmap '{}' left in use", bm.name);
        }
        assert_eq!(nbd_dirty_extents(p, "b"), b_before, "{context}: b");
        assert_eq!(nbd_dirty_extents(p, "c"), c_before, "{context}: c");
        assert_check_clean(p, context);
    };

    // qemu-img under the fault: refused, the image untouched.
    let q_img = t.join("q.qcow2");
    copy(&img, &q_img);
    let (dir, q_base) = split(&q_img);
    let eio = Eio {
        shim: &shim,
        file: q_img.clone(),
        range,
        log: t.join("eio.log"),
    };
    let q = eio.run("qemu-img", &["bitmap", "--merge", "b", &q_base, "c"], &dir);
    assert_eq!(q.status.code(), Some(1), "{}", text(&q.stderr));
    assert!(text(&q.stderr).contains(QEMU_EIO), "{}", text(&q.stderr));
    assert!(eio.hits() > 0);
    check_unchanged(&q_img, "after qemu-img under EIO");

    // qdirty, source in the image: exit 1 with QEMU's message; b is not left in use.
    let d_img = t.join("d.qcow2");
    copy(&img, &d_img);
    let (_, d_base) = split(&d_img);
    let eio = Eio {
        file: d_img.clone(),
        ..eio
    };
    let o = eio.run(QDIRTY, &["bitmap", "--merge", "b", &d_base, "c"], &dir);
    let err = text(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains(QEMU_EIO), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(eio.hits() > 0);
    check_unchanged(&d_img, "after qdirty bitmap --merge under EIO");
    // Without the fault the same merge works: c |= b.
    qd_ok(&["bitmap", "--merge", "b", &d_base, "c"], &dir);
    assert_eq!(
        nbd_dirty_extents(&d_img, "c"),
        union_runs(&b_before, &c_before)
    );

    // qdirty, source in another image (-b): the same, for both images.
    let src = t.join("src.qcow2");
    let dst = t.join("dst.qcow2");
    copy(&img, &src);
    copy(&img, &dst);
    let eio = Eio {
        file: src.clone(),
        ..eio
    };
    let o = eio.run(
        QDIRTY,
        &[
            "bitmap",
            "--merge",
            "b",
            "-b",
            "src.qcow2",
            "dst.qcow2",
            "c",
        ],
        &dir,
    );
    let err = text(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains(QEMU_EIO), "{err}");
    assert!(eio.hits() > 0);
    check_unchanged(&src, "merge source image after EIO");
    check_unchanged(&dst, "merge target image after EIO");
}

/// An image made by the library with one bitmap of `n` extents: every other 4 KiB granule.
fn many_extents(t: &TempDir, name: &str, n: u64) -> std::path::PathBuf {
    let p = t.join(name);
    qdirty::Image::create(&p, 2 * n * 4096, 0).unwrap();
    let mut img = qdirty::Image::open(&p, true).unwrap();
    img.add_bitmap(
        b"b",
        4096,
        qdirty::AddOptions {
            persistent: true,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..n {
        img.set_dirty(2 * i * 4096, 4096);
    }
    img.close().unwrap();
    p
}

/// Runs qdirty with stdout to /dev/null; (exit code, peak resident set in KiB). Through a
/// small shell that execs it: a child forked from this (large) test process would count the
/// test's memory as its own until the exec.
fn peak_rss(args: &[&str], cwd: &Path) -> (i32, u64) {
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
    let child = Command::new("sh")
        .args(["-c", "exec \"$0\" \"$@\"", QDIRTY])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    // Reaped above: this only releases the handle.
    std::mem::forget(child);
    (libc::WEXITSTATUS(status), ru.ru_maxrss as u64)
}

#[test]
fn dump_json_streams_and_stops_quietly_on_a_closed_pipe() {
    let t = TempDir::new("cli-dump-stream");
    let n = 1_000_000;
    let img = many_extents(&t, "many.qcow2", n);
    let (dir, base) = split(&img);
    // Memory: the JSON listing needs no more than the text one (both stream the extents).
    let (c_text, text_kib) = peak_rss(&["dump", &base], &dir);
    let (c_json, json_kib) = peak_rss(&["dump", "--output=json", &base], &dir);
    assert_eq!((c_text, c_json), (0, 0));
    let _ = writeln!(
        std::io::stderr(),
        "dump of {n} extents: peak RSS text {text_kib} KiB, json {json_kib} KiB"
    );
    assert!(
        json_kib < text_kib + 8 * 1024,
        "json {json_kib} KiB vs text {text_kib} KiB"
    );
    // A reader that stops after two lines: no error, exit 0, for both outputs.
    for args in [&["dump", "--output=json", &base][..], &["dump", &base]] {
        let (first, o) = read_lines_then_close(args, &dir, 2);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
        assert!(o.stderr.is_empty(), "{args:?}: {}", text(&o.stderr));
        if args.contains(&"--output=json") {
            assert_eq!(first, format!("{{\n    \"image\": \"{base}\",\n"));
        }
    }
    // The document itself: every extent, as arithmetic says.
    let out = qd_ok(&["dump", "--output=json", &base], &dir);
    let js = Json::parse(&out).unwrap();
    let b = &js.get("bitmaps").and_then(Json::as_array).unwrap()[0];
    let ext = json_extents(b).unwrap();
    assert_eq!(ext.len() as u64, n);
    assert!(ext
        .iter()
        .enumerate()
        .all(|(i, &(o, l))| o == 2 * i as u64 * 4096 && l == 4096));
    assert_eq!(b.get("dirty_bytes").and_then(Json::as_u64), Some(n * 4096));
}

/// Runs qdirty, reads the first `lines` lines of its standard output, closes the pipe, and
/// waits for it: what was read, and how it ended.
fn read_lines_then_close(args: &[&str], cwd: &Path, lines: usize) -> (String, Output) {
    use std::io::BufRead;
    let mut child = Command::new(QDIRTY)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut read = String::new();
    for _ in 0..lines {
        out.read_line(&mut read).unwrap();
    }
    drop(out);
    (read, child.wait_with_output().unwrap())
}

/// The write end of a pipe whose read end is closed.
fn closed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(r);
    Stdio::from(w)
}

/// Every command's standard output: a reader that stops after the first line leaves the
/// command quiet with its usual exit status; a write that fails otherwise (a full disk behind
/// the redirection) is reported and exits 1, never taken for output written.
#[test]
fn output_to_a_closed_pipe_or_a_full_disk() {
    let t = TempDir::new("cli-stdout");
    let img = t.join("a.qcow2");
    let img_s = img.to_str().unwrap();
    qd_ok(&["create", "-q", img_s, "1G"], t.path());
    qd_ok(&["bitmap", "--add", img_s, "b"], t.path());
    let cases: [&[&str]; 5] = [
        &["info", img_s],
        &["info", "--count", "--output=json", img_s],
        &["check", img_s],
        &["--help"],
        &["bitmap", "--help"],
    ];
    for args in cases {
        let full = qd(args, t.path());
        assert_eq!(code(&full), 0, "{args:?}: {}", text(&full.stderr));
        let lines = full.stdout.iter().filter(|&&b| b == b'\n').count();
        assert!(
            lines >= 2,
            "{args:?}: more than the one line the reader takes"
        );
        // The reader takes one line and closes the pipe; the command writes on.
        let (first, o) = read_lines_then_close(args, t.path(), 1);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
        assert!(o.stderr.is_empty(), "{args:?}: {}", text(&o.stderr));
        assert!(text(&full.stdout).starts_with(&first), "{args:?}");
        // A pipe closed before the first write: every write meets EPIPE.
        let o = run_to(args, t.path(), closed_pipe());
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o.stderr));
        assert!(o.stderr.is_empty(), "{args:?}: {}", text(&o.stderr));
        // /dev/full: every write fails with ENOSPC.
        let o = run_to(args, t.path(), dev_full());
        assert_eq!(code(&o), 1, "{args:?}");
        assert_eq!(
            text(&o.stderr),
            "qdirty: could not write the output: No space left on device (os error 28)\n",
            "{args:?}"
        );
    }
    // dump streams through its own writer: the same answers.
    let o = run_to(&["dump", img_s], t.path(), closed_pipe());
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    let o = run_to(&["dump", img_s], t.path(), dev_full());
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("No space left on device"),
        "{}",
        text(&o.stderr)
    );
}

/// Runs qdirty with standard output going to `stdout`.
fn run_to(args: &[&str], cwd: &Path, stdout: Stdio) -> Output {
    Command::new(QDIRTY)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .output()
        .unwrap()
}

/// /dev/full, where every write fails with ENOSPC.
fn dev_full() -> Stdio {
    let f = std::fs::OpenOptions::new().write(true).open("/dev/full");
    Stdio::from(f.unwrap())
}

/// Waits until some process holds an OFD lock on `p` (QEMU took its image locks).
fn wait_locked(p: &Path) {
    use std::os::unix::fs::MetadataExt;
    let needle = format!(":{} ", std::fs::metadata(p).unwrap().ino());
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&needle))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("nobody locked {}", p.display());
}

#[test]
fn locks_are_what_help_says() {
    if !require_qemu("locks_are_what_help_says") {
        return;
    }
    let t = TempDir::new("cli-locks");
    let img = qemu_image(&t, "a.qcow2");
    let (dir, base) = split(&img);
    // A running QEMU (qemu-io, read-write, interactive) holds the image.
    let mut vm = Command::new("qemu-io")
        .args(["-f", "qcow2", &base])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_locked(&img);
    // ... and has marked its bitmaps in use (QEMU does so once the image is open).
    let t0 = std::time::Instant::now();
    while !qemu_img_info_bitmaps(&img, true).iter().all(|b| b.in_use()) {
        assert!(
            t0.elapsed().as_secs() < 20,
            "qemu-io never marked the bitmaps"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // qemu-img info / check / map (for dump) refuse it; so does qdirty, with the same message.
    for (ours, theirs) in [("info", "info"), ("check", "check"), ("dump", "map")] {
        let q = run("qemu-img", &[theirs, "-f", "qcow2", &base], &dir);
        let d = qd(&[ours, &base], &dir);
        assert_eq!(code(&d), 1, "{ours}: {}", text(&d.stderr));
        assert_eq!(q.status.code(), Some(1), "{theirs}");
        assert_eq!(
            text(&d.stderr),
            text(&q.stderr).replace("qemu-img", "qdirty"),
            "{ours}"
        );
    }
    // -U reads it: the bitmaps the running QEMU updates are in use, not inconsistent.
    let o = qd(&["info", "-U", &base], &dir);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let human = text(&o.stdout);
    assert!(
        human.contains("b1: granularity 65536, flags [in-use, auto], in use"),
        "{human}"
    );
    assert!(!human.contains("inconsistent"), "{human}");
    let o = qd(&["dump", "-U", &base], &dir);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("# bitmap 'b1': in use, no extents"),
        "{}",
        text(&o.stdout)
    );
    let q = run("qemu-img", &["check", "-U", "-f", "qcow2", &base], &dir);
    let d = qd(&["check", "-U", &base], &dir);
    assert_eq!(code(&d), q.status.code().unwrap(), "{}", text(&d.stderr));
    // -U with an option that writes: qemu-img's refusal.
    let q = run("qemu-img", &["check", "-U", "-r", "leaks", &base], &dir);
    let d = qd(&["check", "-U", "-r", "leaks", &base], &dir);
    assert_eq!(code(&d), 1);
    assert_eq!(
        text(&d.stderr),
        text(&q.stderr).replace("qemu-img", "qdirty")
    );
    drop(vm.stdin.take());
    vm.wait().unwrap();
    // The help of each says so.
    for sub in ["info", "check", "dump"] {
        let help = qd_ok(&[sub, "--help"], &dir);
        assert!(help.contains("-U, --force-share"), "{sub}: {help}");
        assert!(help.contains("Locks: "), "{sub}: {help}");
        assert!(!help.contains("takes no locks"), "{sub}: {help}");
    }
}

#[test]
fn one_extent_is_one_extent() {
    let t = TempDir::new("cli-one-extent");
    let img = many_extents(&t, "one.qcow2", 1);
    let (dir, base) = split(&img);
    let out = qd_ok(&["dump", &base], &dir);
    assert_eq!(
        out,
        "# bitmap 'b': granularity 4096, 1 extent, 4096 dirty bytes (4 KiB)\n0 4096\n"
    );
    let img = many_extents(&t, "two.qcow2", 2);
    let (_, base) = split(&img);
    let out = qd_ok(&["dump", &base], &dir);
    assert!(out.starts_with("# bitmap 'b': granularity 4096, 2 extents, 8192 dirty bytes"));
}
