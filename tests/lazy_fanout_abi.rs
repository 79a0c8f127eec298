//! The lazy fan-out through the C ABI: the image lock only absorbs the hook's writes, and each
//! way of reading a bitmap must bring that bitmap up to date first (count on one bitmap leaves
//! the others behind), or all of them (query), including merge sources in the same image and in
//! another image (plain merge and transaction) and iterators. Expected values are computed
//! from the written ranges, not from qdirty.

use std::ffi::CString;
use std::ptr;

use qdirty::ffi::*;

const SIZE: u64 = 1 << 40;
const G: u64 = 65536;

fn ok(rc: i32, what: &str) {
    assert_eq!(rc, 0, "{what} failed with {rc}");
}

fn add(img: *mut qdirty_image, name: &str) -> *mut qdirty_bitmap {
    let n = CString::new(name).unwrap();
    let mut err = ptr::null_mut();
    // SAFETY: img is open; n is NUL-terminated; err is a NULL error pointer.
    let b = unsafe { qdirty_image_add_bitmap(img, n.as_ptr(), G as u32, 0, &mut err) };
    assert!(!b.is_null(), "add {name}");
    b
}

/// Bytes covered by the 64 KiB granules of `writes` (4 KiB writes, one granule each, distinct).
fn expect(writes: &[u64]) -> u64 {
    let mut g: Vec<u64> = writes.iter().map(|o| o / G).collect();
    g.sort_unstable();
    g.dedup();
    g.len() as u64 * G
}

fn hook(img: *mut qdirty_image, offs: &[u64]) {
    for &o in offs {
        // SAFETY: img is open.
        unsafe { qdirty_image_set_dirty(img, o, 4096) };
    }
}

fn count(b: *const qdirty_bitmap) -> u64 {
    // SAFETY: b belongs to an open image.
    unsafe { qdirty_bitmap_count(b) }
}

fn batch(k: u64) -> Vec<u64> {
    // Distinct 64 KiB granules, all inside the disk (k <= 6: below 170 GiB).
    (0..50).map(|i| (k * 100 + i) * (1 << 28)).collect()
}

#[test]
fn every_read_path_sees_the_writes_before_it() {
    let mut err = ptr::null_mut();
    // SAFETY: plain calls with valid arguments.
    let (a, b) = unsafe {
        (
            qdirty_image_new_memory(SIZE, &mut err),
            qdirty_image_new_memory(SIZE, &mut err),
        )
    };
    assert!(!a.is_null() && !b.is_null());
    let (a1, a2, a3) = (add(a, "a1"), add(a, "a2"), add(a, "a3"));
    let (bt, bm) = (add(b, "target"), add(b, "merged"));
    let mut all: Vec<u64> = Vec::new();

    // One bitmap read: only it catches up; the next read of another one still sees everything.
    let w1 = batch(1);
    hook(a, &w1);
    all.extend(&w1);
    assert_eq!(count(a1), expect(&all));
    let w2 = batch(2);
    hook(a, &w2);
    all.extend(&w2);
    assert_eq!(count(a2), expect(&all), "a2 behind two epochs");

    // Disabled after taking W1+W2: W3 is not its.
    // SAFETY: a3 is a bitmap of the open image a.
    ok(
        unsafe { qdirty_bitmap_disable(a3, ptr::null_mut()) },
        "disable",
    );
    let before_w3 = expect(&all);
    let w3 = batch(3);
    hook(a, &w3);
    all.extend(&w3);
    assert_eq!(
        count(a3),
        before_w3,
        "a disabled bitmap takes no later write"
    );
    assert_eq!(count(a1), expect(&all));

    // Query folds every bitmap.
    let w4 = batch(4);
    hook(a, &w4);
    all.extend(&w4);
    let (mut arr, mut n) = (ptr::null_mut(), 0usize);
    // SAFETY: out pointers are valid.
    ok(
        unsafe { qdirty_image_query_bitmaps(a, &mut arr, &mut n, ptr::null_mut()) },
        "query",
    );
    // SAFETY: qdirty gave `n` entries at `arr`.
    let infos = unsafe { std::slice::from_raw_parts(arr, n) };
    let counts: Vec<u64> = infos.iter().map(|i| i.count).collect();
    // Newest first: a3, a2, a1.
    assert_eq!(counts, vec![before_w3, expect(&all), expect(&all)]);
    // SAFETY: the array and its length from the query.
    unsafe { qdirty_bitmap_info_free(arr, n) };

    // A merge source in another image with writes not yet taken: plain merge.
    let w5 = batch(5);
    hook(a, &w5);
    all.extend(&w5);
    // SAFETY: both bitmaps belong to open images.
    ok(
        unsafe { qdirty_bitmap_merge(bm, a2, ptr::null_mut(), ptr::null_mut()) },
        "merge",
    );
    assert_eq!(count(bm), expect(&all), "merge source caught up");

    // The same through a transaction.
    let w6 = batch(6);
    hook(a, &w6);
    all.extend(&w6);
    let (target, src) = (CString::new("target").unwrap(), CString::new("a2").unwrap());
    // SAFETY: valid handles and strings.
    unsafe {
        let t = qdirty_txn_new();
        ok(
            qdirty_txn_merge_bitmap(t, b, target.as_ptr(), a, src.as_ptr(), ptr::null_mut()),
            "txn merge",
        );
        ok(qdirty_txn_commit(t, ptr::null_mut()), "commit");
        qdirty_txn_free(t);
    }
    assert_eq!(
        count(bt),
        expect(&all),
        "transaction merge source caught up"
    );

    // An iterator sees a write made after it was created, ahead of its position.
    // SAFETY: a1 belongs to the open image a.
    let it = unsafe { qdirty_bitmap_iter_new(a1, ptr::null_mut()) };
    assert!(!it.is_null());
    let far = SIZE - G;
    hook(a, &[far]);
    let mut last = -1i64;
    loop {
        // SAFETY: it is a live iterator.
        let v = unsafe { qdirty_iter_next(it) };
        if v < 0 {
            break;
        }
        last = v;
    }
    assert_eq!(last, far as i64, "the iterator reached the late write");
    // SAFETY: live iterator; then the images, nothing uses them afterwards.
    unsafe {
        qdirty_iter_free(it);
        ok(qdirty_image_close(a, ptr::null_mut()), "close a");
        ok(qdirty_image_close(b, ptr::null_mut()), "close b");
    }
}
