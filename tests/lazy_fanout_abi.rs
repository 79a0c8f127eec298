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

/// The granules of a model bitmap (`true`: dirty) and the searches of the walks below, computed
/// from it from scratch.
struct Model(Vec<bool>);

impl Model {
    /// The first granule at or after `k` that is dirty (`want`) or clean.
    fn next(&self, k: u64, want: bool) -> Option<u64> {
        (k..self.0.len() as u64).find(|&i| self.0[i as usize] == want)
    }
    /// The first maximal dirty run at or after granule `k`, in granules [s, e).
    fn run(&self, k: u64) -> Option<(u64, u64)> {
        let s = self.next(k, true)?;
        Some((s, self.next(s, false).unwrap_or(self.0.len() as u64)))
    }
    fn fill(&mut self, k: u64, n: u64, v: bool) {
        let end = (k + n).min(self.0.len() as u64);
        for i in k.min(end)..end {
            self.0[i as usize] = v;
        }
    }
    fn dirty(&self) -> usize {
        self.0.iter().filter(|&&b| b).count()
    }
}

/// Walks through the C ABI that continue where their previous call stopped
/// (`next_dirty_area`, `next_dirty` + `next_zero`, `dirty_extents` with a small buffer, an
/// iterator), with changes between their calls: writes through the hook around the walkers,
/// set and reset, merge, clear, truncate, jumps back. Every answer equals the model's search
/// from scratch, so no call may reuse a position found before a change (the engine's search
/// hints are checked against the bits, see `Sparse::lower_hinted`).
#[test]
fn continuing_walks_see_every_change() {
    /// Granules per chunk of the engine (several chunks, mostly sparse).
    const CHUNK: u64 = 1 << 16;
    let mut size = (4 * CHUNK + 77) * G;
    let mut err = ptr::null_mut();
    // SAFETY: plain calls with valid arguments; every pointer below belongs to the open image.
    let img = unsafe { qdirty_image_new_memory(size, &mut err) };
    assert!(!img.is_null());
    let (bm, src) = (add(img, "walked"), add(img, "source"));
    // SAFETY: as above.
    ok(
        unsafe { qdirty_bitmap_disable(src, ptr::null_mut()) },
        "disable",
    );
    let mut m = Model(vec![false; (size / G) as usize]);
    let mut ms = Model(vec![false; (size / G) as usize]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let write = |m: &mut Model, k: u64, n: u64| {
        // SAFETY: an open image; the hook clamps to the disk.
        unsafe { qdirty_image_set_dirty(img, k * G, n * G) };
        m.fill(k, n, true);
    };
    for _ in 0..250 {
        let k = rnd(m.0.len() as u64);
        write(&mut m, k, 1 + rnd(3));
    }
    // SAFETY: as above.
    let mut it = unsafe { qdirty_bitmap_iter_new(bm, ptr::null_mut()) };
    assert!(!it.is_null());
    // Walker positions in granules: area, next_dirty/next_zero, extents, iterator.
    let mut at = [0u64; 4];
    let mut sparse_walk_steps = 0;
    for op in 0..4000 {
        let n = m.0.len() as u64;
        let w = rnd(4) as usize;
        let ctx = format!("op {op} walker {w} at granule {}", at[w]);
        match rnd(100) {
            0..=14 => {
                let (mut s, mut c) = (0, 0);
                // SAFETY: as above; two writable outputs.
                let found = unsafe {
                    qdirty_bitmap_next_dirty_area(bm, at[0] * G, u64::MAX, u64::MAX, &mut s, &mut c)
                };
                let want = m.run(at[0]);
                assert_eq!(found.then_some((s / G, (s + c) / G)), want, "area {ctx}");
                at[0] = want.map_or(0, |r| r.1);
                sparse_walk_steps += 1;
            }
            15..=24 => {
                let off = at[1] * G;
                // SAFETY: as above.
                let d = unsafe { qdirty_bitmap_next_dirty(bm, off, u64::MAX) };
                let want = m.next(at[1], true);
                assert_eq!(d, want.map_or(-1, |k| (k * G) as i64), "next_dirty {ctx}");
                at[1] = match want {
                    Some(k) => {
                        // SAFETY: as above.
                        let z = unsafe { qdirty_bitmap_next_zero(bm, k * G, u64::MAX) };
                        let wz = m.next(k, false);
                        assert_eq!(z, wz.map_or(-1, |k| (k * G) as i64), "next_zero {ctx}");
                        wz.unwrap_or(0)
                    }
                    None => 0,
                };
                sparse_walk_steps += 1;
            }
            25..=34 => {
                let mut buf = [qdirty_extent::default(); 3];
                let mut got = 0usize;
                // SAFETY: as above; a buffer of 3 extents.
                ok(
                    unsafe {
                        qdirty_bitmap_dirty_extents(
                            bm,
                            at[2] * G,
                            u64::MAX,
                            buf.as_mut_ptr(),
                            3,
                            &mut got,
                            ptr::null_mut(),
                        )
                    },
                    "dirty_extents",
                );
                let mut want = Vec::new();
                let mut k = at[2];
                while let Some((s, e)) = m.run(k).filter(|_| want.len() < 3) {
                    want.push((s * G, (e - s) * G));
                    k = e;
                }
                let got: Vec<(u64, u64)> =
                    buf[..got].iter().map(|e| (e.offset, e.length)).collect();
                assert_eq!(got, want, "dirty_extents {ctx}");
                at[2] = if got.len() == 3 { k } else { 0 };
            }
            35..=49 => {
                // SAFETY: a live iterator of the open image.
                let g = unsafe { qdirty_iter_next(it) };
                let want = m.next(at[3], true);
                assert_eq!(g, want.map_or(-1, |k| (k * G) as i64), "iter_next {ctx}");
                match want {
                    Some(k) => at[3] = k + 1,
                    None => {
                        // SAFETY: as above.
                        ok(unsafe { qdirty_iter_seek(it, 0, ptr::null_mut()) }, "seek");
                        at[3] = 0;
                    }
                }
            }
            50..=59 => {
                let k = (at[w] + rnd(300)).saturating_sub(200).min(n - 1);
                let wide = rnd(10) == 0;
                write(&mut m, k, 1 + rnd(if wide { 200 } else { 3 }));
            }
            60..=71 => {
                let k = (at[w] + rnd(300)).saturating_sub(200).min(n - 1);
                let wide = rnd(5) == 0;
                let l = (1 + rnd(if wide { 400 } else { 64 })).min(n - k);
                // SAFETY: as above.
                ok(
                    unsafe { qdirty_bitmap_reset_dirty(bm, k * G, l * G, ptr::null_mut()) },
                    "reset",
                );
                m.fill(k, l, false);
            }
            72..=74 => {
                let k = rnd(n);
                // SAFETY: as above.
                ok(
                    unsafe { qdirty_bitmap_set_dirty(src, k * G, G, ptr::null_mut()) },
                    "set source",
                );
                ms.fill(k, 1, true);
            }
            75..=76 => {
                // SAFETY: as above.
                ok(
                    unsafe { qdirty_bitmap_merge(bm, src, ptr::null_mut(), ptr::null_mut()) },
                    "merge",
                );
                for (d, &s) in m.0.iter_mut().zip(&ms.0) {
                    *d |= s;
                }
            }
            77 => {
                // SAFETY: as above.
                ok(unsafe { qdirty_bitmap_clear(bm, ptr::null_mut()) }, "clear");
                m.0.fill(false);
            }
            78..=79 => {
                // Truncation waits for no iterator: a new one starts at 0.
                // SAFETY: as above; the iterator is freed once.
                unsafe { qdirty_iter_free(it) };
                size = (2 * CHUNK + rnd(3 * CHUNK)) * G;
                // SAFETY: as above.
                ok(
                    unsafe { qdirty_image_truncate(img, size, ptr::null_mut()) },
                    "truncate",
                );
                m.0.resize((size / G) as usize, false);
                ms.0.resize((size / G) as usize, false);
                // SAFETY: as above.
                it = unsafe { qdirty_bitmap_iter_new(bm, ptr::null_mut()) };
                assert!(!it.is_null());
                at[3] = 0;
            }
            80..=89 => {
                at[w] = rnd(n);
                if w == 3 {
                    // SAFETY: as above.
                    ok(
                        unsafe { qdirty_iter_seek(it, at[3] * G, ptr::null_mut()) },
                        "seek",
                    );
                }
            }
            _ => {
                if m.dirty() < 150 {
                    for _ in 0..150 {
                        let k = rnd(n);
                        write(&mut m, k, 1 + rnd(3));
                    }
                }
            }
        }
        if op % 64 == 0 {
            assert_eq!(count(bm), m.dirty() as u64 * G, "count {ctx}");
        }
    }
    assert!(sparse_walk_steps > 500);
    // SAFETY: freed once, before the image is closed once.
    unsafe {
        qdirty_iter_free(it);
        ok(qdirty_image_close(img, ptr::null_mut()), "close");
    }
}
