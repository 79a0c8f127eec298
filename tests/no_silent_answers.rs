//! No read answers "clean" when it cannot know, no error is swallowed, no handle reaches another
//! bitmap: the paths a backup tool relies on, through the C ABI and the Rust API. Expected
//! values come from the written ranges (arithmetic) and from the state on disk, not from
//! qdirty's own readers.

mod common;

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;

use common::c_error::message;
use common::*;
use qdirty::ffi::*;
use qdirty::image::fault::FaultyStorage;
use qdirty::{AddOptions, Error, Image, OpenOptions};

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Held by the tests that set the (process-wide) warning handler, so that they do not take
/// each other's warnings.
static WARNING_HANDLER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sends the library's warnings (through the C ABI's handler) to the returned list.
fn capture_warnings() -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static SEEN: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    unsafe extern "C" fn record(msg: *const std::os::raw::c_char, _: *mut std::ffi::c_void) {
        // SAFETY: qdirty passes a NUL-terminated message valid during the call.
        let m = unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        if let Some(seen) = SEEN.get() {
            seen.lock().unwrap().push(m);
        }
    }
    let seen = Arc::clone(SEEN.get_or_init(Arc::default));
    seen.lock().unwrap().clear();
    // SAFETY: `record` stays valid for the whole process.
    unsafe { qdirty_set_warning_handler(Some(record), ptr::null_mut()) };
    seen
}

fn open(path: &Path, flags: u32) -> *mut qdirty_image {
    let p = c(path.to_str().unwrap());
    let mut err = ptr::null_mut();
    // SAFETY: plain call with valid arguments.
    let img = unsafe { qdirty_image_open(p.as_ptr(), flags, &mut err) };
    assert!(!img.is_null(), "open: {}", message(err));
    img
}

fn close(img: *mut qdirty_image) {
    let mut err = ptr::null_mut();
    // SAFETY: img is open; closed once.
    let rc = unsafe { qdirty_image_close(img, &mut err) };
    assert_eq!(rc, 0, "close: {}", message(err));
}

fn add(img: *mut qdirty_image, name: &str, flags: u32) -> *mut qdirty_bitmap {
    let n = c(name);
    let mut err = ptr::null_mut();
    // SAFETY: img is open.
    let b = unsafe { qdirty_image_add_bitmap(img, n.as_ptr(), G as u32, flags, &mut err) };
    assert!(!b.is_null(), "add {name}: {}", message(err));
    b
}

fn extents(b: *const qdirty_bitmap) -> Result<Vec<(u64, u64)>, (i32, String)> {
    let mut out = vec![qdirty_extent::default(); 3];
    let (mut all, mut start) = (Vec::new(), 0u64);
    loop {
        let (mut n, mut err) = (0usize, ptr::null_mut());
        // SAFETY: out holds 3 extents; n and err are writable.
        let rc = unsafe {
            qdirty_bitmap_dirty_extents(b, start, u64::MAX, out.as_mut_ptr(), 3, &mut n, &mut err)
        };
        if rc != 0 {
            return Err((rc, message(err)));
        }
        all.extend(out[..n].iter().map(|e| (e.offset, e.length)));
        if n < 3 {
            return Ok(all);
        }
        start = out[n - 1].offset + out[n - 1].length;
    }
}

/// An image held in a fault-injecting storage, opened read-write, and the storage's handle.
fn open_faulty_rw(bytes: Vec<u8>) -> (Image, qdirty::image::fault::FaultHandle) {
    let (st, h) = FaultyStorage::new(bytes);
    let img = OpenOptions::new()
        .read_write(true)
        .open_storage(Box::new(st), "img.qcow2")
        .unwrap();
    (img, h)
}

/// A qcow2 image made by qdirty with one persistent enabled bitmap "b" holding `dirty`.
fn image_with_bitmap(dir: &Path, name: &str, dirty: &[(u64, u64)]) -> std::path::PathBuf {
    let p = dir.join(name);
    Image::create(&p, 64 * MIB, 0).unwrap();
    let mut img = Image::open(&p, true).unwrap();
    let opts = AddOptions {
        persistent: true,
        ..AddOptions::default()
    };
    img.add_bitmap(b"b", G, opts).unwrap();
    for &(o, l) in dirty {
        img.set_dirty(o, l);
    }
    img.close().unwrap();
    p
}

/// Writes through the hook reach every read in another image at once: a plain merge, a merge
/// in a transaction and a merge with a backup, with no other call in between.
#[test]
fn cross_image_merges_see_the_hook_writes_before_them() {
    let mut err = ptr::null_mut();
    // SAFETY: plain calls.
    let (a, b) = unsafe {
        (
            qdirty_image_new_memory(1 << 30, &mut err),
            qdirty_image_new_memory(1 << 30, &mut err),
        )
    };
    let s = add(a, "s", 0);
    let (t1, t2, t3) = (add(b, "t1", 0), add(b, "t2", 0), add(b, "t3", 0));
    // SAFETY: the images are open; names are NUL-terminated.
    unsafe {
        qdirty_image_set_dirty(a, 0, 65536);
        let rc = qdirty_image_merge_bitmap(b, c("t1").as_ptr(), a, c("s").as_ptr(), &mut err);
        assert_eq!(rc, 0);
        assert_eq!(
            qdirty_bitmap_count(t1),
            65536,
            "plain merge from another image"
        );

        qdirty_image_set_dirty(a, 10 * MIB, 4096);
        let txn = qdirty_txn_new();
        let rc = qdirty_txn_merge_bitmap(txn, b, c("t2").as_ptr(), a, c("s").as_ptr(), &mut err);
        assert_eq!(rc, 0);
        assert_eq!(qdirty_txn_commit(txn, &mut err), 0);
        qdirty_txn_free(txn);
        assert_eq!(qdirty_bitmap_count(t2), 2 * 65536, "merge in a transaction");

        qdirty_image_set_dirty(a, 20 * MIB, 1);
        let mut backup = ptr::null_mut();
        assert_eq!(qdirty_bitmap_merge(t3, s, &mut backup, &mut err), 0);
        qdirty_backup_free(backup);
        assert_eq!(qdirty_bitmap_count(t3), 3 * 65536, "merge with a backup");
        assert_eq!(qdirty_bitmap_count(s), 3 * 65536);
        assert_eq!(qdirty_image_close(a, &mut err), 0);
        assert_eq!(qdirty_image_close(b, &mut err), 0);
    }
}

/// The Rust API: a merge source in another image is brought up to date (it takes `&mut`).
#[test]
fn rust_cross_image_merge_sees_the_hook_writes() {
    let mut a = Image::new_memory(1 << 30);
    let mut b = Image::new_memory(1 << 30);
    a.add_bitmap(b"s", G, AddOptions::default()).unwrap();
    let t = b.add_bitmap(b"t", G, AddOptions::default()).unwrap();
    a.write_hook().set(0, 65536);
    b.merge_bitmap_from(b"t", &mut a, b"s").unwrap();
    assert_eq!(b.bitmap_current(t).unwrap().count(), 65536);
    let q = a.query().unwrap();
    assert_eq!(q[0].count, 65536, "query sees the hook's writes");
}

/// Every read of a bitmap right after hook writes, with no other call in between.
#[test]
fn every_c_read_right_after_hook_writes_is_current() {
    let mut err = ptr::null_mut();
    // SAFETY: plain calls on an open image and its bitmap.
    unsafe {
        let img = qdirty_image_new_memory(1 << 30, &mut err);
        let b = add(img, "b", 0);
        let w = |off: u64| qdirty_image_set_dirty(img, off, 4096);
        w(3 * G);
        assert!(qdirty_bitmap_get(b, 3 * G));
        w(5 * G);
        assert_eq!(qdirty_bitmap_next_dirty(b, 4 * G, 1 << 30), (5 * G) as i64);
        w(6 * G);
        assert_eq!(qdirty_bitmap_next_zero(b, 5 * G, 1 << 30), (7 * G) as i64);
        w(8 * G);
        let (mut s, mut n) = (0, 0);
        assert!(qdirty_bitmap_next_dirty_area(
            b,
            7 * G,
            1 << 30,
            u64::MAX,
            &mut s,
            &mut n
        ));
        assert_eq!((s, n), (8 * G, G));
        w(9 * G);
        let mut len = 0;
        assert_eq!(qdirty_bitmap_status(b, 9 * G, G, &mut len, &mut err), 1);
        w(11 * G);
        assert_eq!(
            extents(b).unwrap(),
            vec![(3 * G, G), (5 * G, 2 * G), (8 * G, 2 * G), (11 * G, G)]
        );
        w(13 * G);
        let it = qdirty_bitmap_iter_new(b, &mut err);
        let mut seen = Vec::new();
        loop {
            let v = qdirty_iter_next(it);
            if v < 0 {
                break;
            }
            seen.push(v as u64 / G);
        }
        qdirty_iter_free(it);
        assert_eq!(seen, vec![3, 5, 6, 8, 9, 11, 13]);
        w(15 * G);
        let mut infos = ptr::null_mut();
        let mut k = 0;
        assert_eq!(
            qdirty_image_query_bitmaps(img, &mut infos, &mut k, &mut err),
            0
        );
        assert_eq!((*infos).count, 8 * G, "query");
        qdirty_bitmap_info_free(infos, k);
        assert_eq!(qdirty_image_close(img, &mut err), 0);
    }
}

/// An image whose bitmap "b" is in_use on disk: a copy of the file taken while qdirty had it
/// open read-write (as after a crash).
fn image_left_in_use(dir: &Path) -> std::path::PathBuf {
    let p = image_with_bitmap(dir, "clean.qcow2", &[(MIB, 4096)]);
    let img = open(&p, QDIRTY_OPEN_RDWR);
    let copy = dir.join("crashed.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    close(img);
    copy
}

#[test]
fn an_inconsistent_bitmap_never_reads_as_clean() {
    let tmp = TempDir::new("no-silent-inconsistent");
    let p = image_left_in_use(tmp.path());
    let img = open(&p, 0);
    let name = c("b");
    // SAFETY: img is open; the bitmap belongs to it; out-pointers are writable.
    unsafe {
        let b = qdirty_image_find_bitmap(img, name.as_ptr());
        assert!(qdirty_bitmap_inconsistent(b));
        let size = 64 * MIB;
        // The getters without an error channel: every granule dirty.
        assert_eq!(qdirty_bitmap_count(b), size);
        assert!(qdirty_bitmap_get(b, 0));
        assert_eq!(qdirty_bitmap_next_dirty(b, 4096, u64::MAX), 4096);
        assert_eq!(qdirty_bitmap_next_zero(b, 0, u64::MAX), -1);
        let (mut s, mut n) = (0, 0);
        assert!(qdirty_bitmap_next_dirty_area(
            b,
            0,
            u64::MAX,
            MIB,
            &mut s,
            &mut n
        ));
        assert_eq!((s, n), (0, MIB));
        // The reads with an error channel fail with QEMU's message.
        let msg = "Bitmap 'b' is inconsistent and cannot be used";
        let (rc, m) = extents(b).unwrap_err();
        assert_eq!((rc, m.as_str()), (-libc::EINVAL, msg));
        let mut err = ptr::null_mut();
        let mut len = 0;
        assert_eq!(
            qdirty_bitmap_status(b, 0, G, &mut len, &mut err),
            -libc::EINVAL
        );
        assert_eq!(message(err), msg);
        let mut err = ptr::null_mut();
        assert!(qdirty_bitmap_sha256(b, &mut err).is_null());
        assert_eq!(message(err), msg);
        let mut err = ptr::null_mut();
        assert!(qdirty_bitmap_iter_new(b, &mut err).is_null());
        let hint = CStr::from_ptr(qdirty_error_hint(err))
            .to_string_lossy()
            .into_owned();
        assert!(hint.contains("block-dirty-bitmap-remove"), "{hint}");
        assert_eq!(message(err), msg);
    }
    close(img);
}

/// A bitmap whose data read fails once: the call that needed the data fails with EIO (naming
/// the bitmap and the offset), the bitmap stays consistent, and the next call reads again.
#[test]
fn a_transient_read_error_fails_the_call_and_is_retried() {
    let tmp = TempDir::new("no-silent-eio");
    let dirty = [(MIB, 4096), (10 * MIB, 3 * G)];
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &dirty);
    let (st, h) = FaultyStorage::new(std::fs::read(&p).unwrap());
    let mut img = OpenOptions::new()
        .open_storage(Box::new(st), "img.qcow2")
        .unwrap();
    let id = img.find_bitmap(b"b").unwrap();
    h.set_read_fault(Some((h.reads(), false)));
    let e = img.bitmap_current(id).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("Could not read bitmap 'b'"), "{msg}");
    assert!(
        msg.contains("offset"),
        "the message names the offset: {msg}"
    );
    assert!(!img.bitmap(id).unwrap().inconsistent(), "still consistent");
    assert!(img.bitmap(id).unwrap().enabled(), "still enabled");
    let b = img.bitmap_current(id).expect("read again");
    let runs: Vec<(u64, u64)> = b.dirty_runs(0, u64::MAX).unwrap().collect();
    assert_eq!(runs, vec![(MIB, G), (10 * MIB, 3 * G)]);
}

/// Through the C ABI: a getter without an error channel answers "all dirty" while the data
/// cannot be read, the extents call fails with EIO, and close reports a bitmap it could not
/// store (changed, unreadable) by name while it stores the others.
#[test]
fn unreadable_data_is_never_clean_and_close_reports_what_it_lost() {
    let tmp = TempDir::new("no-silent-close");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 4096)]);
    let (mut image, h) = open_faulty_rw(std::fs::read(&p).unwrap());
    let opts = AddOptions {
        persistent: true,
        ..AddOptions::default()
    };
    image.add_bitmap(b"other", G, opts).unwrap();
    // A first store: "b" is unchanged and stays on disk, unloaded.
    image.store_bitmaps().unwrap();
    image.set_dirty(20 * MIB, 1);
    // Every read from now on fails.
    h.set_read_fault(Some((h.reads(), true)));
    let e = image.close().unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.errno(), libc::EIO, "{msg}");
    assert!(msg.contains("'b'") && !msg.contains("'other'"), "{msg}");
    // On disk: "other" stored and consistent, "b" still in_use (its copy misses a write).
    let mut again = OpenOptions::new()
        .open_storage(Box::new(FaultyStorage::new(h.live_image()).0), "x")
        .unwrap();
    let b = again.find_bitmap(b"b").unwrap();
    assert!(again.bitmap(b).unwrap().inconsistent(), "b left in_use");
    let o = again.find_bitmap(b"other").unwrap();
    let runs: Vec<(u64, u64)> = again
        .bitmap_current(o)
        .unwrap()
        .dirty_runs(0, u64::MAX)
        .unwrap()
        .collect();
    assert_eq!(runs, vec![(20 * MIB, G)], "other stored with its write");
}

/// `try_close` after a failed store says Ok only when the bitmaps are stored: a write error at
/// any point of a store (the header write included, whose outcome is unknown) is either
/// retried successfully or reported.
#[test]
fn try_close_ok_means_stored() {
    use qdirty::image::fault::Fault;
    let tmp = TempDir::new("no-silent-tryclose");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 4096)]);
    let base = std::fs::read(&p).unwrap();
    let mut failed_stores = 0;
    for k in 0..60 {
        let (mut image, h) = open_faulty_rw(base.clone());
        image.set_dirty(30 * MIB, 1);
        h.set_fault(Some(Fault::Error {
            at: h.ops() + k,
            sticky: false,
            enospc: false,
        }));
        if image.store_bitmaps().is_ok() {
            continue;
        }
        failed_stores += 1;
        h.set_fault(None);
        match image.try_close() {
            Ok(()) => {
                let st = FaultyStorage::new(h.live_image()).0;
                let mut again = OpenOptions::new()
                    .open_storage(Box::new(st), "again")
                    .unwrap();
                let id = again.find_bitmap(b"b").unwrap();
                let bm = again.bitmap_current(id).unwrap();
                assert!(!bm.inconsistent(), "k={k}: try_close said Ok, b is in_use");
                assert!(
                    bm.get(30 * MIB),
                    "k={k}: try_close said Ok, the write is lost"
                );
            }
            Err((img, _)) => drop(img),
        }
    }
    assert!(failed_stores > 3, "the faults hit the store");
}

#[test]
fn a_handle_whose_bitmap_is_gone_never_reaches_another() {
    let mut err = ptr::null_mut();
    // SAFETY: plain calls; stale handles stay valid until close (the contract under test).
    unsafe {
        let img = qdirty_image_new_memory(1 << 30, &mut err);
        let b = add(img, "b", 0);
        assert_eq!(
            qdirty_image_remove_bitmap(img, c("b").as_ptr(), &mut err),
            0
        );
        let cbm = add(img, "c", 0);
        let rc = qdirty_bitmap_set_dirty(b, 0, 4096, &mut err);
        assert_eq!(rc, -libc::ENOENT);
        assert!(message(err).contains("'b' no longer exists"));
        assert_eq!(
            qdirty_bitmap_count(cbm),
            0,
            "c untouched through b's handle"
        );
        // The getters without an error channel give their documented default, and say why
        // through the warning handler (a NULL handle, their documented no-op, says nothing).
        let held = WARNING_HANDLER.lock().unwrap_or_else(|e| e.into_inner());
        let seen = capture_warnings();
        assert!(qdirty_bitmap_name(b).is_null());
        assert_eq!(qdirty_bitmap_count(b), 0);
        assert_eq!(qdirty_bitmap_next_dirty(b, 0, 1 << 30), -1);
        assert!(!qdirty_bitmap_get(b, 0));
        assert_eq!(qdirty_bitmap_count(ptr::null()), 0);
        qdirty_set_warning_handler(None, ptr::null_mut());
        drop(held);
        let gone = "Bitmap 'b' no longer exists in its image (a call without an error channel \
                    gave its default answer)";
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.iter().filter(|m| *m == gone).count(), 4, "{got:?}");
        assert!(
            got.iter().all(|m| !m.contains("must not be NULL")),
            "{got:?}"
        );
        let mut err = ptr::null_mut();
        assert_eq!(qdirty_bitmap_clear(b, &mut err), -libc::ENOENT);
        qdirty_error_free(err);
        // Released, abdicated: the same.
        let d = add(img, "d", 0);
        let mut err = ptr::null_mut();
        assert_eq!(qdirty_bitmap_release(d, &mut err), 0);
        let e = add(img, "e", 0);
        assert_eq!(qdirty_bitmap_enable(d, &mut err), -libc::ENOENT);
        qdirty_error_free(err);
        assert!(qdirty_bitmap_enabled(e));
        assert_eq!(qdirty_image_close(img, ptr::null_mut()), 0);
    }
}

#[test]
fn close_releases_whatever_errp_holds() {
    let tmp = TempDir::new("no-silent-errp");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[]);
    let img = open(&p, QDIRTY_OPEN_RDWR);
    // A leftover error from an earlier call.
    let mut err = ptr::null_mut();
    // SAFETY: NULL image: fails and sets err.
    unsafe { qdirty_image_store_bitmaps(ptr::null_mut(), &mut err) };
    assert!(!err.is_null());
    let before = err;
    // SAFETY: img is open; err holds an error (which close must not overwrite).
    let rc = unsafe { qdirty_image_close(img, &mut err) };
    assert_eq!(rc, 0);
    assert_eq!(err, before, "the leftover error is left as it was");
    message(err);
    // Closed for real: the locks are gone and the bitmaps stored (not in_use).
    let again = Image::open(&p, true).expect("reopen read-write after close");
    drop(again);
    let mut ro = Image::open(&p, false).unwrap();
    let id = ro.find_bitmap(b"b").unwrap();
    assert!(!ro.bitmap_current(id).unwrap().inconsistent());
}

/// Removal of a bitmap with a live iterator is refused with EBUSY, before anything changes: the
/// stored copy is still in the image.
#[test]
fn remove_with_a_live_iterator_is_busy_and_changes_nothing() {
    let tmp = TempDir::new("no-silent-busy");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 1)]);
    let img = open(&p, QDIRTY_OPEN_RDWR);
    let mut err = ptr::null_mut();
    // SAFETY: img is open; the iterator is freed before close.
    unsafe {
        let b = qdirty_image_find_bitmap(img, c("b").as_ptr());
        let it = qdirty_bitmap_iter_new(b, &mut err);
        assert!(!it.is_null());
        assert_eq!(
            qdirty_image_remove_bitmap(img, c("b").as_ptr(), &mut err),
            -libc::EBUSY
        );
        assert!(message(err).contains("iterators"));
        qdirty_iter_free(it);
    }
    close(img);
    let mut ro = Image::open(&p, false).unwrap();
    let id = ro
        .find_bitmap(b"b")
        .expect("the stored copy is still there");
    assert_eq!(ro.bitmap_current(id).unwrap().count(), G);
}

/// An abdicate that fails (its successor is gone) changes nothing: the persistent bitmap stays,
/// and is stored on close.
#[test]
fn a_failed_abdicate_keeps_the_persistent_bitmap() {
    let tmp = TempDir::new("no-silent-abdicate");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 1)]);
    let mut img = Image::open(&p, true).unwrap();
    let a = img.find_bitmap(b"b").unwrap();
    let set = img.bitmaps_mut();
    let s1 = set.create_successor(a).unwrap();
    set.create_successor(s1).unwrap();
    set.abdicate(s1).unwrap();
    let e = set.abdicate(a).unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e}");
    assert!(img.find_bitmap(b"b").is_some(), "the parent is still there");
    drop(img);
    let mut ro = Image::open(&p, false).unwrap();
    let id = ro.find_bitmap(b"b").expect("still in the image");
    let bm = ro.bitmap_current(id).unwrap();
    assert!(!bm.inconsistent());
    assert_eq!(bm.count(), G);
}

/// A forked child that closes (or drops) the parent's image touches neither the file nor the
/// locks: the bitmaps stay in_use on disk and the image stays locked for the parent.
#[test]
fn a_forked_child_leaves_the_image_to_its_parent() {
    let tmp = TempDir::new("no-silent-fork");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 1)]);
    let mut img = Image::open(&p, true).unwrap();
    img.set_dirty(5 * MIB, 1);
    let in_use_flag = |p: &Path| -> bool {
        let mut ro = OpenOptions::new().force_share(true).open(p).unwrap();
        let id = ro.find_bitmap(b"b").unwrap();
        ro.bitmap_current(id).unwrap().inconsistent()
    };
    assert!(in_use_flag(&p));
    // SAFETY: the child only drops the image and exits without running the test harness.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(img);
        // SAFETY: immediate exit of the child.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(in_use_flag(&p), "the child's close stored nothing");
    assert!(
        matches!(Image::open(&p, true), Err(Error::InUse(_))),
        "the parent still holds the locks"
    );
    img.close().unwrap();
    assert!(!in_use_flag(&p));
}

/// A checkpoint while guest writes go on (`store_bitmaps`) never leaves a copy marked
/// consistent on disk: a guest write that reaches the disk before its hook call could be
/// missing from it. At every crash point of the checkpoint, and after it, the bitmap is in_use.
#[test]
fn a_checkpoint_never_marks_a_recording_bitmap_consistent() {
    use qdirty::image::fault::{Fault, Unflushed};
    let tmp = TempDir::new("no-silent-checkpoint");
    let p = image_with_bitmap(tmp.path(), "img.qcow2", &[(MIB, 4096)]);
    let base = std::fs::read(&p).unwrap();
    let in_use = |bytes: Vec<u8>| -> bool {
        let st = FaultyStorage::new(bytes).0;
        let mut ro = OpenOptions::new()
            .open_storage(Box::new(st), "crashed")
            .unwrap();
        let id = ro.find_bitmap(b"b").unwrap();
        ro.bitmap_current(id).unwrap().inconsistent()
    };
    // The clean run: how many ops the checkpoint does.
    let (mut img, h) = open_faulty_rw(base.clone());
    img.set_dirty(40 * MIB, 1);
    let start = h.ops();
    img.store_bitmaps().unwrap();
    let n = h.ops() - start;
    assert!(n > 0, "the checkpoint wrote the changed bitmap");
    assert!(in_use(h.live_image()), "after the checkpoint");
    drop(img);
    for k in 0..=n {
        for unflushed in [Unflushed::Kept, Unflushed::Lost] {
            let (mut img, h) = open_faulty_rw(base.clone());
            img.set_dirty(40 * MIB, 1);
            h.set_fault(Some(Fault::Crash {
                at: h.ops() + k,
                unflushed,
                torn_sectors: 0,
            }));
            let _ = img.store_bitmaps();
            let crashed = h.crashed_image().unwrap_or_else(|| h.live_image());
            std::mem::forget(img);
            assert!(
                in_use(crashed),
                "crash at op {k} of the checkpoint ({unflushed:?})"
            );
        }
    }
}

/// A guest write past the end of the disk (the host let the guest write to space the disk
/// gained before it resized the bitmaps) is in no bitmap: it is reported, and resizing the
/// bitmaps marks the new space it reached dirty in the bitmaps that recorded it, through the
/// lock-free hook and the direct call alike.
#[test]
fn a_write_past_the_end_is_reported_and_taken_when_the_bitmaps_grow() {
    use std::sync::{Arc, Mutex};
    let size = 64 * MIB;
    let _held = WARNING_HANDLER.lock().unwrap_or_else(|e| e.into_inner());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = Arc::clone(&seen);
    qdirty::warning::set_warning_handler(Some(Box::new(move |m: &str| {
        sink.lock().unwrap().push(m.to_string())
    })));
    let past_end = |seen: &Mutex<Vec<String>>, end: u64| {
        let want =
            format!("Guest writes reached offset {end}, past the end of the disk ({size} bytes)");
        seen.lock()
            .unwrap()
            .iter()
            .filter(|m| m.starts_with(&want))
            .count()
    };
    let mut img = Image::new_memory(size);
    let a = img.add_bitmap(b"a", G, AddOptions::default()).unwrap();
    let disabled = AddOptions {
        disabled: true,
        ..AddOptions::default()
    };
    let off = img.add_bitmap(b"off", G, disabled).unwrap();
    // Through the hook: the part inside the disk is recorded at once, the rest reported at the
    // next call on the image.
    img.write_hook().set(size - G, 3 * G);
    assert_eq!(
        past_end(&seen, size + 2 * G),
        0,
        "nothing reported before a call"
    );
    img.query().unwrap();
    assert_eq!(past_end(&seen, size + 2 * G), 1);
    // Directly, wholly past the end.
    img.set_dirty(size + 4 * MIB, G);
    assert_eq!(past_end(&seen, size + 4 * MIB + G), 1);
    // A bitmap added afterwards recorded none of it.
    let late = img.add_bitmap(b"late", G, AddOptions::default()).unwrap();
    assert_eq!(img.bitmap_current(a).unwrap().count(), G);
    img.truncate(size + 8 * MIB).unwrap();
    let runs = |img: &mut Image, id| qdirty_runs(img.bitmap_current(id).unwrap());
    assert_eq!(
        runs(&mut img, a),
        vec![(size - G, 4 * MIB + 2 * G)],
        "the old last granule, and the new space up to the furthest write's end"
    );
    assert!(
        runs(&mut img, off).is_empty(),
        "a disabled bitmap recorded nothing"
    );
    assert!(
        runs(&mut img, late).is_empty(),
        "nor one added after the writes"
    );
    // Taken once: growing again adds nothing.
    img.truncate(size + 16 * MIB).unwrap();
    assert_eq!(runs(&mut img, a), vec![(size - G, 4 * MIB + 2 * G)]);
    qdirty::warning::set_warning_handler(None);
}
