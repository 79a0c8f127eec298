//! Storage errors at every point (docs/crash-safety.md, 'Storage errors'): EIO on every read, write
//! and flush (once, or from then on), ENOSPC from a full file system. Each gives an error that
//! names what was being done, leaves an image that qdirty and QEMU open without corruption, and
//! (store_bitmaps) leaves the in-memory bitmaps usable: after the fault is gone, the same image
//! object stores them.

mod common;

use common::*;
use qdirty::image::check::check_bitmaps;
use qdirty::image::fault::{Fault, FaultHandle, FaultyStorage};
use qdirty::image::storage::MemStorage;
use qdirty::{AddOptions, Image};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn quiet() {
    qdirty::warning::set_warning_handler(Some(Box::new(|_| {})));
}

/// A 64 KiB-cluster image with two stored bitmaps (one disabled).
fn base(dir: &TempDir) -> Vec<u8> {
    let p = dir.join("base.qcow2");
    Image::create(&p, SIZE, 65536).unwrap();
    let (st, h) = FaultyStorage::new(std::fs::read(&p).unwrap());
    let mut img = Image::open_storage(Box::new(st), "base", true).unwrap();
    let a = qd_add(&mut img, "on", 65536, false);
    img.bitmap_mut(a).unwrap().set_dirty(0, MIB).unwrap();
    let b = qd_add(&mut img, "off", 65536, true);
    img.bitmap_mut(b).unwrap().set_dirty(5 * MIB, 4096).unwrap();
    img.close().unwrap();
    h.live_image()
}

/// The image as the process leaves it after the error must open in qdirty and pass qdirty's
/// check (and QEMU's when asked) without corruption.
fn assert_valid(dir: &TempDir, bytes: &[u8], qemu: bool, what: &str) {
    Image::open_storage(
        Box::new(MemStorage {
            data: bytes.to_vec(),
        }),
        "after-error",
        false,
    )
    .unwrap_or_else(|e| panic!("{what}: image does not open after the error: {e}"));
    let p = dir.join("err.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let r = check_bitmaps(&p, false).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert_eq!(r.corruptions, 0, "{what}: {:?}", r.messages);
    if qemu {
        let c = qemu_img_check(&p);
        assert!(
            (c.exit_code == 0 || c.exit_code == 3) && c.corruptions == 0,
            "{what}: {c}"
        );
    }
}

fn sha(img: &mut Image, name: &str) -> String {
    qd_bm(img, name).sha256().unwrap()
}

fn faults(at: u64) -> Vec<Fault> {
    let mut v = Vec::new();
    for sticky in [false, true] {
        for enospc in [false, true] {
            v.push(Fault::Error { at, sticky, enospc });
        }
    }
    v
}

fn open(h_base: &[u8]) -> (Image, FaultHandle) {
    let (st, h) = FaultyStorage::new(h_base.to_vec());
    let img = Image::open_storage(Box::new(st), "img", true).unwrap();
    (img, h)
}

/// store_bitmaps with a write or flush error at each of its ops.
#[test]
fn errors_during_store_bitmaps() {
    quiet();
    let dir = TempDir::new("err_store");
    let qemu = have_tool("qemu-img") && require_qemu("errors_during_store_bitmaps");
    let base = base(&dir);
    // The clean run: how many ops store_bitmaps does, and the expected contents.
    let (mut img, h) = open(&base);
    img.set_dirty(10 * MIB, MIB);
    let start = h.ops();
    img.store_bitmaps().unwrap();
    let n = h.ops() - start;
    if std::env::var("DBG").is_ok() {
        eprintln!("{:?}", &h.log()[start as usize..]);
    }
    let want_on = sha(&mut img, "on");
    let want_off = sha(&mut img, "off");
    img.close().unwrap();
    let mut cases = 0;
    for j in 0..n {
        for f in faults(0) {
            let (mut img, h) = open(&base);
            img.set_dirty(10 * MIB, MIB);
            let Fault::Error { sticky, enospc, .. } = f else {
                unreachable!()
            };
            h.set_fault(Some(Fault::Error {
                at: h.ops() + j,
                sticky,
                enospc,
            }));
            let what = format!("store_bitmaps, error at op {j} {f:?}");
            let r = img.store_bitmaps();
            cases += 1;
            let Err(e) = r else {
                // A failed free after the commit is only a warning-free leak path if the
                // store reports success: allowed, the image must still be valid.
                assert_valid(&dir, &h.live_image(), qemu && j % 3 == 0, &what);
                continue;
            };
            let msg = e.to_string();
            if std::env::var("DBG").is_ok() {
                eprintln!("{what}: {msg}");
            }
            assert!(
                msg.contains("rror") || msg.contains("space") || msg.contains("Could not"),
                "{what}: unclear message: {msg}"
            );
            // A failed header write (or its flush) leaves the commit's outcome unknown: both
            // the old and the new directory stay valid on disk, qdirty writes nothing more, and
            // the next open sees either the old (in_use) or the new (stored) bitmaps.
            if msg.contains("outcome is unknown") || msg.contains("will not write") {
                assert_valid(&dir, &h.live_image(), qemu && j % 3 == 0, &what);
                assert_eq!(sha(&mut img, "on"), want_on, "{what}");
                h.set_fault(None);
                assert!(
                    img.store_bitmaps().is_err(),
                    "{what}: writes after an unknown commit"
                );
                assert!(img.close().is_err(), "{what}: close reports the lost store");
                let live = h.live_image();
                assert_valid(&dir, &live, qemu && j % 3 == 0, &what);
                let mut back =
                    Image::open_storage(Box::new(MemStorage { data: live }), "r", false).unwrap();
                for (name, want) in [("on", &want_on), ("off", &want_off)] {
                    let id = back.find_bitmap(name.as_bytes()).expect(name);
                    let b = back.bitmap_current(id).unwrap();
                    assert!(
                        b.inconsistent() || &b.sha256().unwrap() == want,
                        "{what}: {name}"
                    );
                }
                continue;
            }
            assert_valid(&dir, &h.live_image(), qemu && j % 3 == 0, &what);
            // The bitmaps in memory are intact and usable.
            assert_eq!(sha(&mut img, "on"), want_on, "{what}");
            assert_eq!(sha(&mut img, "off"), want_off, "{what}");
            img.set_dirty(10 * MIB, 512);
            // Once the storage works again the same image stores them.
            h.set_fault(None);
            if let Err(e) = img.store_bitmaps() {
                panic!("{what}: store after the fault: {e}");
            }
            img.close()
                .unwrap_or_else(|e| panic!("{what}: close after the fault: {e}"));
            let live = h.live_image();
            assert_valid(&dir, &live, qemu && j % 3 == 0, &what);
            let mut back =
                Image::open_storage(Box::new(MemStorage { data: live }), "r", false).unwrap();
            assert_eq!(sha(&mut back, "on"), want_on, "{what}: stored content");
            assert_eq!(sha(&mut back, "off"), want_off, "{what}: stored content");
        }
    }
    eprintln!("store_bitmaps: {n} ops, {cases} error cases");
}

/// Open read-write, add and remove bitmaps, close: a write/flush error at every op.
#[test]
fn errors_during_open_add_remove_close() {
    quiet();
    let dir = TempDir::new("err_cycle");
    let qemu = have_tool("qemu-img") && require_qemu("errors_during_open_add_remove_close");
    let base = base(&dir);
    let cycle = |st: FaultyStorage| -> qdirty::Result<()> {
        let mut img = Image::open_storage(Box::new(st), "img", true)?;
        img.remove_bitmap(b"off")?;
        let id = img.add_bitmap(
            b"new",
            0,
            AddOptions {
                persistent: true,
                ..AddOptions::default()
            },
        )?;
        img.bitmap_mut(id).unwrap().set_dirty(0, 4096)?;
        img.store_bitmaps()?;
        img.remove_bitmap(b"on")?;
        img.close()
    };
    let (st, h) = FaultyStorage::new(base.clone());
    cycle(st).unwrap();
    let n = h.ops();
    let mut cases = 0;
    for k in 0..n {
        for f in faults(k) {
            let (st, h) = FaultyStorage::new(base.clone());
            h.set_fault(Some(f));
            let r = cycle(st);
            cases += 1;
            if let Err(e) = &r {
                assert!(!e.to_string().is_empty());
            }
            assert_valid(
                &dir,
                &h.live_image(),
                qemu && k % 5 == 0,
                &format!("cycle, {f:?}: {r:?}"),
            );
        }
    }
    eprintln!("open/remove/add/store/remove/close: {n} ops, {cases} error cases");
}

/// EIO on every read of an open-store-close cycle (once, or from then on).
#[test]
fn read_errors() {
    quiet();
    let dir = TempDir::new("err_read");
    let base = base(&dir);
    let cycle = |st: FaultyStorage| -> qdirty::Result<()> {
        let mut img = Image::open_storage(Box::new(st), "img", true)?;
        img.load_all_bitmaps()?;
        img.set_dirty(3 * MIB, MIB);
        img.store_bitmaps()?;
        img.close()
    };
    let (st, h) = FaultyStorage::new(base.clone());
    cycle(st).unwrap();
    let n = h.reads();
    for r in 0..n {
        for sticky in [false, true] {
            let (st, h) = FaultyStorage::new(base.clone());
            h.set_read_fault(Some((r, sticky)));
            let res = cycle(st);
            if let Err(e) = &res {
                let m = e.to_string();
                assert!(
                    m.contains("read") || m.contains("Read"),
                    "read {r}: message does not say what was read: {m}"
                );
            }
            assert_valid(&dir, &h.live_image(), false, &format!("read {r}: {res:?}"));
        }
    }
    eprintln!("read errors: {n} reads, {} cases", 2 * n);
}

/// A full file system (writes beyond the current end fail with ENOSPC): the store fails
/// cleanly, the bitmaps stay, and with room again they are stored.
#[test]
fn enospc_file_system_full() {
    quiet();
    let dir = TempDir::new("err_nospc");
    let base = base(&dir);
    let (mut img, h) = open(&base);
    // Much new data: needs clusters beyond the end of the file.
    for i in 0..64 {
        img.set_dirty(i * MIB, 4096);
    }
    let want = sha(&mut img, "on");
    h.set_size_limit(Some(base.len() as u64));
    let e = img.store_bitmaps().unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_valid(&dir, &h.live_image(), have_tool("qemu-img"), "ENOSPC");
    assert_eq!(sha(&mut img, "on"), want);
    h.set_size_limit(None);
    img.store_bitmaps().unwrap();
    img.close().unwrap();
    let mut back = Image::open_storage(
        Box::new(MemStorage {
            data: h.live_image(),
        }),
        "r",
        false,
    )
    .unwrap();
    assert_eq!(sha(&mut back, "on"), want);
}
