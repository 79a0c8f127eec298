//! Stress of the thread-safety contract on a real qcow2 file, through the C ABI (the exported
//! `qdirty::ffi` functions, as a host would call them): several I/O threads call the lock-free
//! write hook `qdirty_image_set_dirty` with random ranges while management threads iterate,
//! merge (within the image and across images, both directions), query, count, hash,
//! enable/disable another bitmap, add/remove a transient bitmap, and store the bitmaps into the
//! file over and over.
//!
//! Afterwards (in memory, then after a final store, close and read-only reopen):
//! - "always" (enabled for the whole run, granularity 4 KiB) holds exactly the union of the
//!   written ranges rounded outward to 4 KiB: nothing lost, nothing misplaced; "coarse" the same
//!   at 64 KiB;
//! - "toggle" (enabled and disabled by a thread) holds every range whose hook call ran entirely
//!   while it was enabled (between enable returning and disable starting), and nothing outside
//!   the written ranges;
//! - "merged" (disabled, target of merges) holds everything after a last merge;
//! - the SHA-256 digests survive close/reopen, no bitmap is inconsistent, and `qemu-img check`
//!   finds the file clean (skipped visibly without qemu-img, unless QDIRTY_REQUIRE_QEMU=1).
//!
//! `QDIRTY_STRESS_ITERS` sets the writes per writer thread (default 20000).

mod common;

use std::ffi::{CStr, CString};

use common::c_error::{nonnull, ok};
use std::io::Write as _;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Barrier;
use std::time::Instant;

use common::{expected_runs, have_tool, qemu_img_check, Prng, TempDir};
use qdirty::ffi::*;

const SIZE: u64 = 256 << 20;
const WRITERS: usize = 3;
/// Management threads.
const MGMT: u64 = 5;
/// Rounds each management thread does at least while the writers run.
const MIN_ROUNDS: u64 = 20;

/// A raw handle that crosses threads, as the contract allows (the image is thread-safe).
struct P<T>(*mut T);
impl<T> Clone for P<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for P<T> {}
unsafe impl<T> Send for P<T> {}
unsafe impl<T> Sync for P<T> {}
impl<T> P<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

fn iters() -> usize {
    std::env::var("QDIRTY_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn call(what: &str, f: impl FnOnce(*mut *mut qdirty_error) -> i32) {
    let mut err = ptr::null_mut();
    let rc = f(&mut err);
    ok(rc, err, what);
}

fn obj<T>(what: &str, f: impl FnOnce(*mut *mut qdirty_error) -> *mut T) -> *mut T {
    let mut err = ptr::null_mut();
    let p = nonnull(f(&mut err), err, what);
    assert!(err.is_null(), "{what}: success with an error set");
    p
}

fn find(img: *mut qdirty_image, name: &str) -> *mut qdirty_bitmap {
    let n = cstr(name);
    let bm = unsafe { qdirty_image_find_bitmap(img, n.as_ptr()) };
    assert!(!bm.is_null(), "bitmap {name} not found");
    bm
}

fn sha(bm: *const qdirty_bitmap) -> String {
    let s = obj("sha256", |e| unsafe { qdirty_bitmap_sha256(bm, e) });
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { qdirty_string_free(s) };
    assert_eq!(out.len(), 64);
    out
}

/// The dirty extents of a bitmap, maximal runs, in order.
fn extents(bm: *const qdirty_bitmap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut start = 0;
    loop {
        let (mut s, mut c) = (0u64, 0u64);
        let found =
            unsafe { qdirty_bitmap_next_dirty_area(bm, start, SIZE, u64::MAX, &mut s, &mut c) };
        if !found {
            break;
        }
        assert!(c > 0 && s >= start && s + c <= SIZE, "bad area {s}+{c}");
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += c,
            _ => out.push((s, c)),
        }
        start = s + c;
    }
    out
}

/// Whether every run of `inner` lies inside some run of `outer` (both sorted, maximal).
fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> Result<(), (u64, u64)> {
    for &(s, c) in inner {
        let i = outer.partition_point(|o| o.0 + o.1 <= s);
        match outer.get(i) {
            Some(&(os, oc)) if os <= s && s + c <= os + oc => {}
            _ => return Err((s, c)),
        }
    }
    Ok(())
}

/// Every range is dirty in `bm`.
fn all_dirty(bm: *const qdirty_bitmap, ranges: &[(u64, u64)], what: &str) {
    for &(o, l) in ranges {
        let l = l.min(SIZE - o);
        let z = unsafe { qdirty_bitmap_next_zero(bm, o, l) };
        assert_eq!(z, -1, "{what}: write {o}+{l} has a clean byte at {z}");
        assert!(unsafe { qdirty_bitmap_get(bm, o) }, "{what}: {o} clean");
    }
}

struct Written {
    all: Vec<(u64, u64)>,
    /// Hook calls that ran entirely while "toggle" was enabled.
    while_enabled: Vec<(u64, u64)>,
}

/// Checks the four bitmaps of the image against what the writers recorded.
fn check_bitmaps(img: *mut qdirty_image, w: &Written, when: &str) -> Result<(), String> {
    let always = find(img, "always");
    let coarse = find(img, "coarse");
    let toggle = find(img, "toggle");
    let merged = find(img, "merged");
    for bm in [always, coarse, toggle, merged] {
        assert!(!unsafe { qdirty_bitmap_inconsistent(bm) }, "{when}");
    }

    let want4k = expected_runs(&w.all, 4096, SIZE);
    let got = extents(always);
    if got != want4k {
        return Err(format!(
            "{when}: 'always' differs from the written ranges: {} runs vs {} expected; first \
             difference {:?}",
            got.len(),
            want4k.len(),
            got.iter().zip(&want4k).find(|(a, b)| a != b)
        ));
    }
    let bytes: u64 = want4k.iter().map(|r| r.1).sum();
    assert_eq!(unsafe { qdirty_bitmap_count(always) }, bytes, "{when}");
    all_dirty(always, &w.all, when);

    let want64k = expected_runs(&w.all, 65536, SIZE);
    if extents(coarse) != want64k {
        return Err(format!("{when}: 'coarse' differs from the written ranges"));
    }

    let lost = w
        .while_enabled
        .iter()
        .filter(|&&(o, l)| unsafe { qdirty_bitmap_next_zero(toggle, o, l.min(SIZE - o)) } != -1)
        .count();
    if lost > 0 {
        return Err(format!(
            "{when}: {lost} writes made while 'toggle' was enabled are missing from it"
        ));
    }
    if let Err(r) = covered(&extents(toggle), &want4k) {
        panic!("{when}: 'toggle' has {r:?} dirty, which nobody wrote");
    }

    let lost = w
        .all
        .iter()
        .filter(|&&(o, l)| unsafe { qdirty_bitmap_next_zero(merged, o, l.min(SIZE - o)) } != -1)
        .count();
    if lost > 0 {
        return Err(format!("{when}: {lost} writes missing from 'merged'"));
    }
    Ok(())
}

#[test]
fn stress_write_hook_with_management_on_a_file() {
    let t0 = Instant::now();
    let dir = TempDir::new("stress_hook");
    let path = dir.join("disk.qcow2");
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let n_iters = iters();

    call("create", |e| unsafe {
        qdirty_image_create(cpath.as_ptr(), SIZE, 65536, e)
    });
    let img = obj("open", |e| unsafe {
        qdirty_image_open(cpath.as_ptr(), QDIRTY_OPEN_RDWR, e)
    });
    let other = obj("new_memory", |e| unsafe {
        qdirty_image_new_memory(SIZE, e)
    });
    for (name, gran, flags) in [
        ("always", 4096, QDIRTY_BITMAP_PERSISTENT),
        ("coarse", 65536, QDIRTY_BITMAP_PERSISTENT),
        ("toggle", 4096, QDIRTY_BITMAP_PERSISTENT),
        (
            "merged",
            16384,
            QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_DISABLED,
        ),
    ] {
        let n = cstr(name);
        obj(name, |e| unsafe {
            qdirty_image_add_bitmap(img, n.as_ptr(), gran, flags, e)
        });
    }
    for (name, flags) in [
        ("ext", QDIRTY_BITMAP_DISABLED),
        ("sink", QDIRTY_BITMAP_DISABLED),
    ] {
        let n = cstr(name);
        obj(name, |e| unsafe {
            qdirty_image_add_bitmap(other, n.as_ptr(), 8192, flags, e)
        });
    }
    // Something to merge from the other image (not written by the hook: "merged" only).
    let ext = find(other, "ext");
    call("ext set_dirty", |e| unsafe {
        qdirty_bitmap_set_dirty(ext, SIZE - 8192, 8192, e)
    });

    let imgp = P(img);
    let otherp = P(other);
    let done = AtomicBool::new(false);
    // Odd: "toggle" is enabled and stays so until the number changes.
    let toggle_seq = AtomicU64::new(1);
    let stores = AtomicU64::new(0);
    let start = Barrier::new(WRITERS + MGMT as usize);
    // Management threads that did their minimum number of rounds.
    let ready = AtomicU64::new(0);

    let written = std::thread::scope(|s| {
        let mut writers = Vec::new();
        for t in 0..WRITERS {
            let (start, toggle_seq, ready) = (&start, &toggle_seq, &ready);
            writers.push(s.spawn(move || {
                let img = imgp.get();
                let mut rng = Prng::new(0x5eed + t as u64);
                let mut all = Vec::with_capacity(n_iters);
                let mut while_enabled = Vec::new();
                start.wait();
                let mut i = 0;
                // At least n_iters writes, and on until every management thread did its
                // minimum number of rounds (bounded).
                while i < n_iters || (ready.load(SeqCst) < MGMT && i < 10 * n_iters) {
                    i += 1;
                    let (off, len) = match rng.below(16) {
                        // Ranges running past the end: clamped.
                        0 => (SIZE - 1 - rng.below(100_000), 1 + rng.below(300_000)),
                        // Tiny, unaligned.
                        1..=5 => (rng.below(SIZE), 1 + rng.below(600)),
                        _ => (rng.below(SIZE), 1 + rng.below(256 << 10)),
                    };
                    let before = toggle_seq.load(SeqCst);
                    unsafe { qdirty_image_set_dirty(img, off, len) };
                    let after = toggle_seq.load(SeqCst);
                    all.push((off, len));
                    if before == after && before % 2 == 1 {
                        while_enabled.push((off, len));
                    }
                    // Guest-like pacing, so that the management threads make progress meanwhile.
                    if i % 64 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(500));
                    }
                }
                (all, while_enabled)
            }));
        }

        // Iterators and extent walks over "always".
        s.spawn(|| {
            let img = imgp.get();
            let always = find(img, "always");
            let mut rng = Prng::new(1);
            start.wait();
            let mut rounds = 0u64;
            while !done.load(SeqCst) || rounds < MIN_ROUNDS {
                let it = obj("iter_new", |e| unsafe { qdirty_bitmap_iter_new(always, e) });
                let mut last = -1i64;
                for _ in 0..256 {
                    let off = unsafe { qdirty_iter_next(it) };
                    if off < 0 {
                        break;
                    }
                    assert!(off % 4096 == 0 && (off as u64) < SIZE && off > last);
                    last = off;
                }
                let to = rng.below(SIZE);
                call("iter_seek", |e| unsafe { qdirty_iter_seek(it, to, e) });
                let off = unsafe { qdirty_iter_next(it) };
                assert!(
                    off == -1 || off as u64 >= to / 4096 * 4096,
                    "seek {to} gave {off}"
                );
                unsafe { qdirty_iter_free(it) };
                let (mut ds, mut dc) = (0, 0);
                let from = rng.below(SIZE);
                if unsafe {
                    qdirty_bitmap_next_dirty_area(always, from, SIZE, 1 << 20, &mut ds, &mut dc)
                } {
                    assert!(ds >= from / 4096 * 4096 && dc > 0 && dc <= 1 << 20);
                    assert!(unsafe { qdirty_bitmap_get(always, ds) });
                }
                rounds += 1;
                if rounds == MIN_ROUNDS {
                    ready.fetch_add(1, SeqCst);
                }
            }
        });

        // Merges: within the image, from the other image, and into the other image.
        s.spawn(|| {
            let (img, other) = (imgp.get(), otherp.get());
            let always = find(img, "always");
            let merged = find(img, "merged");
            let sink = find(other, "sink");
            let (tm, ext, src_always, tsink) =
                (cstr("merged"), cstr("ext"), cstr("always"), cstr("sink"));
            start.wait();
            let mut rounds = 0u64;
            while !done.load(SeqCst) || rounds < MIN_ROUNDS {
                let mut backup = ptr::null_mut();
                call("merge", |e| unsafe {
                    qdirty_bitmap_merge(merged, always, &mut backup, e)
                });
                assert!(!backup.is_null());
                unsafe { qdirty_backup_free(backup) };
                call("image_merge from other", |e| unsafe {
                    qdirty_image_merge_bitmap(img, tm.as_ptr(), other, ext.as_ptr(), e)
                });
                call("image_merge into other", |e| unsafe {
                    qdirty_image_merge_bitmap(other, tsink.as_ptr(), img, src_always.as_ptr(), e)
                });
                call("merge into other", |e| unsafe {
                    qdirty_bitmap_merge(sink, always, ptr::null_mut(), e)
                });
                rounds += 1;
                if rounds == MIN_ROUNDS {
                    ready.fetch_add(1, SeqCst);
                }
            }
        });

        // Queries, counts, digests: the count of "always" never decreases.
        s.spawn(|| {
            let img = imgp.get();
            let always = find(img, "always");
            let coarse = find(img, "coarse");
            let mut rng = Prng::new(2);
            start.wait();
            let mut last_count = 0;
            let mut rounds = 0u64;
            while !done.load(SeqCst) || rounds < MIN_ROUNDS {
                let mut info = ptr::null_mut();
                let mut n = 0usize;
                call("query", |e| unsafe {
                    qdirty_image_query_bitmaps(img, &mut info, &mut n, e)
                });
                assert!(n == 4 || n == 5, "{n} bitmaps");
                let infos = unsafe { std::slice::from_raw_parts(info, n) };
                for i in infos {
                    assert!(!i.name.is_null() && !i.busy && !i.inconsistent);
                }
                unsafe { qdirty_bitmap_info_free(info, n) };
                let c = unsafe { qdirty_bitmap_count(always) };
                assert!(c >= last_count, "count went down: {last_count} -> {c}");
                last_count = c;
                assert!(unsafe { qdirty_bitmap_count(coarse) } >= c.min(1));
                let _ = sha(always);
                let off = rng.below(SIZE);
                let nd = unsafe { qdirty_bitmap_next_dirty(always, off, SIZE - off) };
                if nd >= 0 {
                    assert!(unsafe { qdirty_bitmap_get(always, nd as u64) });
                }
                let mut cnt = 0;
                let mut err = ptr::null_mut();
                let st =
                    unsafe { qdirty_bitmap_status(always, off, SIZE - off, &mut cnt, &mut err) };
                assert!(st == 0 || st == 1, "status {st}");
                assert!(err.is_null() && cnt > 0 && cnt <= SIZE - off);
                rounds += 1;
                if rounds == MIN_ROUNDS {
                    ready.fetch_add(1, SeqCst);
                }
            }
        });

        // Enable/disable "toggle"; add/remove a transient bitmap.
        s.spawn(|| {
            let img = imgp.get();
            let toggle = find(img, "toggle");
            let scratch = cstr("scratch");
            start.wait();
            let mut rounds = 0u64;
            while !done.load(SeqCst) || rounds < MIN_ROUNDS {
                toggle_seq.fetch_add(1, SeqCst); // even: not known enabled
                call("disable", |e| unsafe { qdirty_bitmap_disable(toggle, e) });
                let bm = obj("create_bitmap", |e| unsafe {
                    qdirty_image_create_bitmap(img, scratch.as_ptr(), 0, e)
                });
                assert!(unsafe { qdirty_bitmap_enabled(bm) });
                call("enable", |e| unsafe { qdirty_bitmap_enable(toggle, e) });
                toggle_seq.fetch_add(1, SeqCst); // odd: enabled
                std::thread::yield_now();
                call("remove scratch", |e| unsafe {
                    qdirty_image_remove_bitmap(img, scratch.as_ptr(), e)
                });
                rounds += 1;
                if rounds == MIN_ROUNDS {
                    ready.fetch_add(1, SeqCst);
                }
            }
        });

        // Stores into the file, over and over.
        s.spawn(|| {
            let img = imgp.get();
            start.wait();
            while !done.load(SeqCst) || stores.load(SeqCst) < MIN_ROUNDS {
                call("store", |e| unsafe { qdirty_image_store_bitmaps(img, e) });
                if stores.fetch_add(1, SeqCst) + 1 == MIN_ROUNDS {
                    ready.fetch_add(1, SeqCst);
                }
                // A checkpoint loop, not a spin: std's mutex is not fair, and a thread that
                // relocks at once would starve the others.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });

        let mut w = Written {
            all: Vec::new(),
            while_enabled: Vec::new(),
        };
        for h in writers {
            let (a, e) = h.join().unwrap();
            w.all.extend(a);
            w.while_enabled.extend(e);
        }
        done.store(true, SeqCst);
        w
    });
    let run_time = t0.elapsed();

    // A last merge makes "merged" a superset of "always".
    let always = find(img, "always");
    let merged = find(img, "merged");
    call("final merge", |e| unsafe {
        qdirty_bitmap_merge(merged, always, ptr::null_mut(), e)
    });
    if let Err(e) = check_bitmaps(img, &written, "in memory") {
        panic!("{e}");
    }
    // The other image received "always" too.
    all_dirty(find(other, "sink"), &written.all, "sink");

    let digests: Vec<String> = ["always", "coarse", "toggle", "merged"]
        .iter()
        .map(|n| sha(find(img, n)))
        .collect();
    call("final store", |e| unsafe {
        qdirty_image_store_bitmaps(img, e)
    });
    call("close", |e| unsafe { qdirty_image_close(img, e) });
    call("close other", |e| unsafe { qdirty_image_close(other, e) });

    let img = obj("reopen", |e| unsafe {
        qdirty_image_open(cpath.as_ptr(), 0, e)
    });
    // Writes logged while a store ran can be missing from the file (known bug, see
    // writes_logged_during_a_store_are_stored below).
    if let Err(e) = check_bitmaps(img, &written, "after reopen") {
        known_bug(&e);
    }
    let again: Vec<String> = ["always", "coarse", "toggle", "merged"]
        .iter()
        .map(|n| sha(find(img, n)))
        .collect();
    if digests != again {
        known_bug("digests changed across close/reopen");
    }
    assert!(unsafe { qdirty_bitmap_enabled(find(img, "always")) });
    assert!(!unsafe { qdirty_bitmap_enabled(find(img, "merged")) });
    call("close reopened", |e| unsafe { qdirty_image_close(img, e) });

    let _ = writeln!(
        std::io::stderr(),
        "stress_hook: {} writes ({} while 'toggle' surely enabled), {} stores, {:?} threaded, {:?} total",
        written.all.len(),
        written.while_enabled.len(),
        stores.load(SeqCst),
        run_time,
        t0.elapsed()
    );
    assert!(!written.while_enabled.is_empty() || n_iters < 100);

    if have_tool("qemu-img") {
        let c = qemu_img_check(&path);
        assert!(c.clean(), "qemu-img check: {c}");
    } else if std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("qemu-img not installed, and QDIRTY_REQUIRE_QEMU=1");
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP stress_write_hook_with_management_on_a_file (qemu-img check): qemu-img not installed"
        );
    }
}

/// A failed check of the stored state. (Writes logged while a store ran used to be lost from
/// the file: the store reset the change tracking after folding them; fixed, so strict.)
fn known_bug(msg: &str) {
    panic!("{msg}");
}

/// Hook writes logged while a store runs must reach the file at a later store. Each write goes
/// to a data cluster of its own (512-byte clusters, 512-byte granules: 2 MiB of disk per data
/// cluster), so no later write touches the cluster again and hides a lost one.
#[test]
fn writes_logged_during_a_store_are_stored() {
    const SZ: u64 = 1 << 30;
    const STEP: u64 = 2 << 20;
    let dir = TempDir::new("stress_store_race");
    let path = dir.join("disk.qcow2");
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    call("create", |e| unsafe {
        qdirty_image_create(cpath.as_ptr(), SZ, 512, e)
    });
    let img = obj("open", |e| unsafe {
        qdirty_image_open(cpath.as_ptr(), QDIRTY_OPEN_RDWR, e)
    });
    let n = cstr("b");
    obj("add", |e| unsafe {
        qdirty_image_add_bitmap(img, n.as_ptr(), 512, QDIRTY_BITMAP_PERSISTENT, e)
    });
    let imgp = P(img);
    let done = AtomicBool::new(false);
    let writes = SZ / STEP;
    std::thread::scope(|s| {
        s.spawn(|| {
            let img = imgp.get();
            while !done.load(SeqCst) {
                call("store", |e| unsafe { qdirty_image_store_bitmaps(img, e) });
            }
        });
        s.spawn(|| {
            let img = imgp.get();
            for i in 0..writes {
                unsafe { qdirty_image_set_dirty(img, i * STEP + 4096, 512) };
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            done.store(true, SeqCst);
        });
    });
    let bm = find(img, "b");
    for i in 0..writes {
        assert!(
            unsafe { qdirty_bitmap_get(bm, i * STEP + 4096) },
            "in memory: {i}"
        );
    }
    call("close", |e| unsafe { qdirty_image_close(img, e) });
    let img = obj("reopen", |e| unsafe {
        qdirty_image_open(cpath.as_ptr(), 0, e)
    });
    let bm = find(img, "b");
    let lost: Vec<u64> = (0..writes)
        .filter(|i| !unsafe { qdirty_bitmap_get(bm, i * STEP + 4096) })
        .map(|i| i * STEP + 4096)
        .collect();
    call("close reopened", |e| unsafe { qdirty_image_close(img, e) });
    if !lost.is_empty() {
        known_bug(&format!(
            "{} of {writes} hook writes made while qdirty_image_store_bitmaps ran are dirty in \
             memory but missing from the file after close and reopen (first at offsets {:?}): \
             the store folds the write log after writing the data (BitmapSet::bitmap_mut in \
             src/image/store.rs, before track_changes), and track_changes then forgets that \
             those clusters changed",
            lost.len(),
            &lost[..lost.len().min(4)]
        ));
    }
}
