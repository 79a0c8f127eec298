//! `qdirty check --salvage [--remove-broken]` and `--drop-bitmaps` on QEMU-made images with a
//! broken bitmap directory entry or table (qdirty_testkit::salvage_cases), judged by QEMU.

use qdirty_testkit::salvage_cases;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use qdirty_testkit::*;
use salvage_cases::*;

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

#[test]
fn check_salvage_every_case() {
    if !require_qemu("check_salvage_every_case") {
        return;
    }
    for case in cases() {
        let ctx = case.name;
        let tmp = TempDir::new(ctx);
        let img = tmp.join("img.qcow2");
        let pristine = tmp.join("pristine.qcow2");
        let reference = qemu_base(&img);
        copy(&img, &pristine);
        (case.apply)(&img);
        let dir = tmp.path();

        // A plain check refuses most of them (a bad table entry counts as a corruption, as in
        // qemu-img check; a wrong table size is not a refcount problem): never a crash.
        let o = qd(&["check", "img.qcow2"], dir);
        assert!(o.status.code().is_some(), "{ctx}: {}", text(&o.stderr));
        assert!(!text(&o.stderr).contains("panicked"), "{ctx}");

        // --salvage lists every broken bitmap with its reason; exit 2; nothing removed.
        let o = qd(&["check", "--salvage", "img.qcow2"], dir);
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(2), "{ctx}: {out}{}", text(&o.stderr));
        for listed in case.listed {
            assert!(
                out.contains(&format!("Broken bitmap '{listed}")),
                "{ctx}: {out}"
            );
        }
        assert!(out.contains(case.reason_starts), "{ctx}: {out}");
        assert!(out.contains("--remove-broken"), "{ctx}: {out}");
        let (code, _) = qemu_info_refusal(&img);
        assert_ne!(code, 0, "{ctx}: listing changed the image");

        // JSON form.
        let o = qd(&["check", "--salvage", "--output=json", "img.qcow2"], dir);
        let j = Json::parse(text(&o.stdout).trim()).expect("json");
        let broken = j
            .get("broken_bitmaps")
            .and_then(Json::as_array)
            .expect("list");
        assert_eq!(broken.len(), case.broken.len(), "{ctx}");
        assert!(broken[0]
            .get("reason")
            .and_then(Json::as_str)
            .is_some_and(|r| r.starts_with(case.reason_starts)));

        // --remove-broken: removed, leaks reported; then QEMU opens it again.
        let o = qd(&["check", "--salvage", "--remove-broken", "img.qcow2"], dir);
        let out = text(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(3),
            "{ctx}: leaks only: {out}{}",
            text(&o.stderr)
        );
        assert!(out.contains("Removed broken bitmap"), "{ctx}: {out}");
        let gone: Vec<&str> = case
            .broken
            .iter()
            .map(|n| {
                if BITMAPS.iter().any(|b| b.0 == *n) {
                    *n
                } else {
                    "b2"
                }
            })
            .collect();
        assert_recovered(&img, &pristine, &reference, &gone, ctx);
        // Nothing broken any more.
        let o = qd(&["check", "--salvage", "img.qcow2"], dir);
        assert_eq!(o.status.code(), Some(0), "{ctx}: {}", text(&o.stdout));
    }
}

#[test]
fn check_drop_bitmaps() {
    if !require_qemu("check_drop_bitmaps") {
        return;
    }
    let tmp = TempDir::new("check_drop_bitmaps");
    let img = tmp.join("img.qcow2");
    let pristine = tmp.join("pristine.qcow2");
    qemu_base(&img);
    copy(&img, &pristine);
    let (_, _, es) = read_dir(&img);
    write_dir(&img, &es, Some(5)); // "Less bitmaps found than specified"
    let dir = tmp.path();
    let (code, _) = qemu_info_refusal(&img);
    assert_ne!(code, 0);
    let o = qd(&["check", "--salvage", "img.qcow2"], dir);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("Less bitmaps found") && err.contains("qdirty check --drop-bitmaps"),
        "{err}"
    );
    // Usage errors.
    let o = qd(&["check", "--remove-broken", "img.qcow2"], dir);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("--remove-broken needs --salvage"));
    // The drop, then -r in the same run reclaims the leaks.
    let o = qd(&["check", "--drop-bitmaps", "-r", "img.qcow2"], dir);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(out.contains("Dropped the bitmaps extension"), "{out}");
    let (code, err) = qemu_info_refusal(&img);
    assert_eq!(code, 0, "{err}");
    assert!(qemu_img_info_bitmaps(&img, false).is_empty());
    assert_check_clean(&img, "after drop");
    let (code, out) = qemu_img_compare(&img, &pristine);
    assert_eq!(code, 0, "{out}");
    let o = qd(&["check", "--help"], dir);
    let help = text(&o.stdout) + &text(&o.stderr);
    assert!(
        help.contains("--salvage") && help.contains("--drop-bitmaps"),
        "{help}"
    );
}
