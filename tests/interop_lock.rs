//! Image locking against QEMU's own tools, both directions (docs/format.md, 'Image locking'):
//! qdirty takes
//! the same shared OFD locks and conflict probes as QEMU, so neither writes an image the other
//! is using.

mod common;

use common::*;
use qdirty::{Error, Image};

const MIB: u64 = 1 << 20;

fn make(tmp: &TempDir) -> std::path::PathBuf {
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 16 * MIB, "", &[]);
    qemu_img_bitmap_add(&img, "b1", None, false);
    qemu_io_write(&img, &[(MIB, 4096)]);
    img
}

fn assert_in_use(r: qdirty::Result<Image>, what: &str) {
    match r {
        Err(e @ Error::InUse(_)) => {
            assert_eq!(e.errno(), libc::EAGAIN, "{what}");
            assert!(
                e.to_string().contains("is another process using the image"),
                "{what}: {e}"
            );
        }
        Err(e) => panic!("{what}: expected an in-use error, got {e}"),
        Ok(_) => panic!("{what}: open succeeded while QEMU holds the image"),
    }
}

#[test]
fn qemu_refuses_an_image_qdirty_holds() {
    let test = "qemu_refuses_an_image_qdirty_holds";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = make(&tmp);
    let (dir, base) = split(&img);

    let rw = Image::open(&img, true).expect("qdirty read-write");
    for (args, what) in [
        (vec!["info", "-f", "qcow2", base.as_str()], "qemu-img info"),
        (
            vec!["check", "-f", "qcow2", base.as_str()],
            "qemu-img check",
        ),
    ] {
        let out = run("qemu-img", &args, &dir);
        assert!(
            !out.status.success(),
            "{what} must fail while qdirty writes"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lock"), "{what}: {err}");
    }
    for rflag in [&[][..], &["-r"][..]] {
        let mut args = vec!["-f", "qcow2"];
        args.extend_from_slice(rflag);
        args.extend_from_slice(&["-c", "read 0 512", base.as_str()]);
        let out = run("qemu-io", &args, &dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() || err.contains("lock"),
            "qemu-io {rflag:?} must be refused: {err}"
        );
    }
    // Force-share readers still work, and see the bitmap in use.
    let seen = qemu_img_info_bitmaps(&img, true);
    assert!(seen.iter().all(|b| b.in_use()), "{seen:?}");
    // A second qdirty opener in this process is another open file description: refused too.
    assert_in_use(Image::open(&img, true), "second qdirty read-write");
    assert_in_use(
        Image::open(&img, false),
        "qdirty read-only while qdirty writes",
    );
    let peek = Image::open_with(&img, false, true).expect("force-share");
    assert!(peek
        .bitmap(peek.find_bitmap(b"b1").unwrap())
        .unwrap()
        .inconsistent());
    drop(peek);

    // Read-only: QEMU's readers may share it, writers may not.
    let mut rw = rw;
    rw.reopen(false).expect("reopen read-only");
    let out = run("qemu-img", &["info", "-f", "qcow2", &base], &dir);
    assert!(
        out.status.success(),
        "qemu-img info next to a qdirty reader"
    );
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 512", &base],
        &dir,
    );
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("lock"),
        "qemu-io write next to a qdirty reader must be refused"
    );
    rw.reopen(true).expect("back to read-write");
    rw.close().expect("close");
    // Closed: QEMU has the image back, clean.
    assert_check_clean(&img, test);
    qemu_io_write(&img, &[(0, 512)]);
}

#[test]
fn qdirty_refuses_an_image_qemu_holds() {
    let test = "qdirty_refuses_an_image_qemu_holds";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = make(&tmp);

    // QEMU writing: qdirty can neither write nor read consistently; force-share works.
    let qsd = Qsd::start(&img, false, &tmp);
    assert_in_use(
        Image::open(&img, true),
        "qdirty read-write next to QEMU read-write",
    );
    assert_in_use(
        Image::open(&img, false),
        "qdirty read-only next to QEMU read-write",
    );
    let peek = Image::open_with(&img, false, true).expect("force-share next to QEMU");
    let b1 = peek.find_bitmap(b"b1").expect("listed");
    assert!(
        peek.bitmap(b1).unwrap().inconsistent(),
        "QEMU marked it in_use"
    );
    drop(peek);
    qsd.quit();

    // QEMU reading: qdirty may read too, not write.
    let qsd = Qsd::start(&img, true, &tmp);
    assert_in_use(
        Image::open(&img, true),
        "qdirty read-write next to QEMU read-only",
    );
    let mut ro = Image::open(&img, false).expect("qdirty read-only next to QEMU read-only");
    let b1 = ro.find_bitmap(b"b1").expect("listed");
    assert_eq!(
        qdirty_runs(ro.bitmap_current(b1).unwrap()),
        vec![(MIB, 65536)]
    );
    drop(ro);
    qsd.quit();

    // Nobody: read-write works, and the failed attempts wrote nothing.
    let rw = Image::open(&img, true).expect("free again");
    rw.close().expect("close");
    assert_check_clean(&img, test);
    assert_eq!(nbd_dirty_extents(&img, "b1"), vec![(MIB, 65536)]);
}

/// A force-share open (`qemu-img -U`) next to a second writer: QEMU's tools clear, remove and
/// add bitmaps and write guest data (reusing the clusters the removed bitmaps freed) after the
/// open; qdirty's bitmaps are still exactly those of the image at open (as QEMU exported them
/// over NBD before the changes), never bits read from clusters that were reused since.
#[test]
fn force_share_reads_the_bitmaps_as_they_were_at_open() {
    let test = "force_share_reads_the_bitmaps_as_they_were_at_open";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 64 * MIB, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(&img, "b", Some(4096), false);
    qemu_img_bitmap_add(&img, "c", Some(512), false);
    let writes: Vec<(u64, u64)> = (0..40).map(|i| (i * 1_572_864 + 4096 * i, 8192)).collect();
    qemu_io_write(&img, &writes);
    let want_b = nbd_dirty_extents(&img, "b");
    let want_c = nbd_dirty_extents(&img, "c");
    assert!(!want_b.is_empty() && !want_c.is_empty());

    for step in 0..4 {
        let copy = tmp.join(&format!("step{step}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        let mut peek = Image::open_with(&copy, false, true).expect("force-share open");
        // The second writer, after the open.
        match step {
            0 => qemu_img_bitmap(&copy, &["--clear"], "b"),
            1 => qemu_img_bitmap(&copy, &["--remove"], "b"),
            2 => {
                qemu_img_bitmap(&copy, &["--remove"], "b");
                qemu_img_bitmap(&copy, &["--remove"], "c");
                qemu_img_bitmap_add(&copy, "n", Some(512), false);
            }
            _ => {}
        }
        if step >= 1 {
            // Guest writes with a pattern of set bits, into the clusters just freed.
            let cmds = vec!["write -P 0x5a 32M 16M".to_string()];
            qemu_io(&copy, &cmds);
        }
        for (name, want) in [("b", &want_b), ("c", &want_c)] {
            let id = peek.find_bitmap(name.as_bytes()).unwrap();
            let bm = peek.bitmap_current(id).unwrap();
            assert!(!bm.inconsistent(), "step {step}: '{name}' inconsistent");
            assert_eq!(
                &qdirty_runs(bm),
                want,
                "step {step}: bitmap '{name}' is not the one at open"
            );
        }
    }
}
