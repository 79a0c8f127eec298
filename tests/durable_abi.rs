//! Durable mode through the C ABI: every management call is in the image when it returns. After
//! each call the image file is copied as it is (what a crash at that moment leaves: the
//! process's writes are in the page cache) and QEMU judges the copy: no bitmap in use, the
//! flags and the dirty extents (`qemu-nbd -B` + `nbdinfo --map`) the call produced. A
//! transaction shows nothing before its commit.

mod common;

use std::ffi::CString;
use std::path::Path;
use std::ptr;

use common::c_error::{nonnull, ok};
use common::*;
use qdirty::ffi::*;

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

/// A bitmap as QEMU sees it: name, auto, dirty runs.
type Seen = (String, bool, Vec<(u64, u64)>);

/// The bitmaps of a copy of the image as QEMU sees them, by name.
fn snapshot(dir: &TempDir, img: &Path) -> Vec<Seen> {
    let copy = dir.join("snapshot.qcow2");
    std::fs::copy(img, &copy).unwrap();
    let c = qemu_img_check(&copy);
    assert!(c.corruptions == 0 && c.check_errors == 0, "{c}");
    let mut out = Vec::new();
    for b in qemu_img_info_bitmaps(&copy, false) {
        assert!(!b.in_use(), "bitmap {} is in use in the copy", b.name);
        let runs = nbd_dirty_extents(&copy, &b.name);
        out.push((b.name.clone(), b.auto(), runs));
    }
    out.sort();
    out
}

fn find<'a>(s: &'a [Seen], name: &str) -> &'a Seen {
    s.iter()
        .find(|b| b.0 == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {s:?}"))
}

fn dirty_at(runs: &[(u64, u64)], off: u64) -> bool {
    runs.iter().any(|&(o, l)| o <= off && off < o + l)
}

#[test]
fn every_management_call_is_in_the_image_when_it_returns() {
    if !require_qemu("every_management_call_is_in_the_image_when_it_returns") {
        return;
    }
    let dir = TempDir::new("durable-abi");
    let path = dir.join("img.qcow2");
    qemu_img_create(&path, 64 * MIB, "", &[]);
    let p = CString::new(path.to_str().unwrap()).unwrap();
    let (a, b, c) = (c"a", c"b", c"c");
    let mut e = ptr::null_mut();
    // SAFETY (every call below): the image and its bitmap handles are open; errp is valid.
    unsafe {
        let img = nonnull(
            qdirty_image_open_durable(p.as_ptr(), MIB, &mut e),
            e,
            "open",
        );
        let ba = nonnull(
            qdirty_image_add_bitmap(img, a.as_ptr(), G as u32, QDIRTY_BITMAP_PERSISTENT, &mut e),
            e,
            "add a",
        );
        let s = snapshot(&dir, &path);
        assert_eq!(s, vec![("a".into(), true, vec![])], "after add");

        // A guest write: its zone (1 MiB) is on disk before the write is issued.
        ok(
            qdirty_image_prepare_write(img, MIB + 4096, 4096, &mut e),
            e,
            "prepare",
        );
        assert!(
            dirty_at(&find(&snapshot(&dir, &path), "a").2, MIB + 4096),
            "prepared write"
        );
        qdirty_image_set_dirty(img, MIB + 4096, 4096);

        ok(
            qdirty_bitmap_set_dirty(ba, 10 * MIB, G, &mut e),
            e,
            "set_dirty",
        );
        assert!(
            dirty_at(&find(&snapshot(&dir, &path), "a").2, 10 * MIB),
            "bitmap set_dirty"
        );

        ok(qdirty_bitmap_clear(ba, &mut e), e, "clear");
        assert_eq!(find(&snapshot(&dir, &path), "a").2, vec![], "after clear");

        ok(qdirty_bitmap_disable(ba, &mut e), e, "disable");
        assert!(!find(&snapshot(&dir, &path), "a").1, "after disable");
        ok(qdirty_bitmap_enable(ba, &mut e), e, "enable");
        assert!(find(&snapshot(&dir, &path), "a").1, "after enable");

        let bb = nonnull(
            qdirty_image_add_bitmap(img, b.as_ptr(), G as u32, QDIRTY_BITMAP_PERSISTENT, &mut e),
            e,
            "add b",
        );
        ok(
            qdirty_bitmap_set_dirty(bb, 12 * MIB, G, &mut e),
            e,
            "set_dirty b",
        );
        ok(
            qdirty_image_merge_bitmap(img, a.as_ptr(), ptr::null_mut(), b.as_ptr(), &mut e),
            e,
            "merge",
        );
        assert_eq!(
            find(&snapshot(&dir, &path), "a").2,
            vec![(12 * MIB, G)],
            "after merge"
        );

        // A backup: the bitmap is frozen, its successor records; abdicate keeps the successor.
        let succ = nonnull(qdirty_bitmap_create_successor(ba, &mut e), e, "successor");
        let _ = succ;
        ok(
            qdirty_image_prepare_write(img, 20 * MIB, 4096, &mut e),
            e,
            "prepare 2",
        );
        qdirty_image_set_dirty(img, 20 * MIB, 4096);
        let s = snapshot(&dir, &path);
        let runs = &find(&s, "a").2;
        assert!(find(&s, "a").1, "a frozen bitmap is stored as recording");
        assert!(
            dirty_at(runs, 12 * MIB) && dirty_at(runs, 20 * MIB),
            "frozen: {runs:?}"
        );
        nonnull(qdirty_bitmap_abdicate(ba, &mut e), e, "abdicate");
        let ba = qdirty_image_find_bitmap(img, a.as_ptr());
        let runs = find(&snapshot(&dir, &path), "a").2.clone();
        assert!(
            dirty_at(&runs, 20 * MIB) && !dirty_at(&runs, 12 * MIB),
            "abdicate: {runs:?}"
        );

        // A failed backup: reclaim takes the successor's writes back.
        nonnull(qdirty_bitmap_create_successor(ba, &mut e), e, "successor 2");
        ok(
            qdirty_image_prepare_write(img, 30 * MIB, 4096, &mut e),
            e,
            "prepare 3",
        );
        qdirty_image_set_dirty(img, 30 * MIB, 4096);
        nonnull(qdirty_bitmap_reclaim(ba, &mut e), e, "reclaim");
        let runs = find(&snapshot(&dir, &path), "a").2.clone();
        assert!(
            dirty_at(&runs, 20 * MIB) && dirty_at(&runs, 30 * MIB),
            "reclaim: {runs:?}"
        );

        // Deserialize (a migration's bitmap data): 64 granules from 40 MiB.
        let ones = [0xffu8; 8];
        ok(
            qdirty_bitmap_deserialize_part(
                ba,
                ones.as_ptr(),
                ones.len(),
                40 * MIB,
                64 * G,
                true,
                &mut e,
            ),
            e,
            "deserialize",
        );
        let runs = find(&snapshot(&dir, &path), "a").2.clone();
        assert!(runs.contains(&(40 * MIB, 64 * G)), "deserialize: {runs:?}");

        // A transaction: nothing before the commit, everything after.
        let before = snapshot(&dir, &path);
        let txn = qdirty_txn_new();
        ok(
            qdirty_txn_clear_bitmap(txn, img, a.as_ptr(), &mut e),
            e,
            "txn clear",
        );
        nonnull(
            qdirty_txn_add_bitmap(
                txn,
                img,
                c.as_ptr(),
                G as u32,
                QDIRTY_BITMAP_PERSISTENT,
                &mut e,
            ),
            e,
            "txn add",
        );
        let during = snapshot(&dir, &path);
        assert_eq!(
            find(&during, "a").2,
            find(&before, "a").2,
            "a prepared clear is not in the image"
        );
        ok(qdirty_txn_commit(txn, &mut e), e, "commit");
        qdirty_txn_free(txn);
        let s = snapshot(&dir, &path);
        assert_eq!(find(&s, "a").2, vec![], "committed clear");
        assert!(s.iter().any(|x| x.0 == "c"), "committed add: {s:?}");

        ok(
            qdirty_image_remove_bitmap(img, b.as_ptr(), &mut e),
            e,
            "remove",
        );
        assert!(
            !snapshot(&dir, &path).iter().any(|x| x.0 == "b"),
            "after remove"
        );

        ok(qdirty_image_close(img, &mut e), e, "close");
    }
    assert_check_clean(&path, "after close");
}
