//! Unit tests of the image layer on in-memory storage. Interop with QEMU's tools is tested in
//! `tests/interop_*.rs`.

use std::io;
use std::sync::{Arc, Mutex};

use super::alloc::Refcounts;
use super::create::blank_image;
use super::storage::Storage;
use super::{AddOptions, Image, OpenOptions};
use crate::error::Error;
use crate::format::{be, AUTOCLEAR_BITMAPS};

/// Memory storage whose bytes outlive the image (so a test can reopen them).
/// Keeps the trait's default vectored write (one write per slice).
#[derive(Clone, Default)]
pub(super) struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    pub(super) fn new(bytes: Vec<u8>) -> Self {
        Shared(Arc::new(Mutex::new(bytes)))
    }
    pub(super) fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Storage for Shared {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let start = offset as usize;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > d.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d[start..end]);
        Ok(())
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > d.len() {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const MIB: u64 = 1 << 20;
const P: AddOptions = AddOptions {
    persistent: true,
    disabled: false,
    autoload: None,
};

fn open(s: &Shared, rw: bool) -> Image {
    OpenOptions::new()
        .read_write(rw)
        .open_storage(Box::new(s.clone()), "mem")
        .unwrap()
}

/// Dirty runs of `name`, as (offset, length).
pub(super) fn runs(img: &mut Image, name: &str) -> Vec<(u64, u64)> {
    let id = img.find_bitmap(name.as_bytes()).unwrap();
    let b = img.bitmap_current(id).unwrap();
    b.dirty_runs(0, u64::MAX).unwrap().collect()
}

#[test]
fn blank_image_has_consistent_refcounts() {
    for cs in [512u32, 4096, 65536, 2 << 20] {
        let s = Shared::new(blank_image(100 * MIB, cs).unwrap());
        let img = open(&s, false);
        assert_eq!(img.size(), 100 * MIB);
        assert_eq!(img.cluster_size(), u64::from(cs));
        drop(img);
        let mut st = s.clone();
        let len = st.size().unwrap();
        let mut rc = Refcounts::load(&st, cs.trailing_zeros(), 4, u64::from(cs), 1).unwrap();
        // Every cluster of the blank file is in use exactly once; the next one is free.
        for c in 0..len / u64::from(cs) {
            assert_eq!(
                rc.get(&st, c).unwrap(),
                1,
                "cluster {c} of a {cs}-byte-cluster image"
            );
        }
        let off = rc.alloc(&mut st, 1, &|_, _, _| Ok(())).unwrap();
        assert_eq!(off, len);
    }
}

#[test]
fn store_and_load_round_trip_with_flags() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    let mut img = open(&s, true);
    img.add_bitmap(b"on", 0, P).unwrap();
    img.add_bitmap(
        b"off",
        4096,
        AddOptions {
            disabled: true,
            ..P
        },
    )
    .unwrap();
    img.add_bitmap(b"ram", 0, AddOptions::default()).unwrap();
    img.set_dirty(3 * MIB + 1, 10);
    let off = img.find_bitmap(b"off").unwrap();
    img.bitmap_mut(off).unwrap().set_dirty(0, 8192).unwrap();
    img.close().unwrap();

    let mut img = open(&s, false);
    assert_eq!(
        img.bitmap_ids().len(),
        2,
        "transient bitmaps are not stored"
    );
    let on = img.bitmap(img.find_bitmap(b"on").unwrap()).unwrap();
    assert!(on.enabled() && on.persistent() && on.readonly() && !on.inconsistent());
    assert_eq!(runs(&mut img, "on"), vec![(3 * MIB, 65536)]);
    let off = img.bitmap(img.find_bitmap(b"off").unwrap()).unwrap();
    assert!(!off.enabled());
    assert_eq!(off.granularity(), 4096);
    assert_eq!(runs(&mut img, "off"), vec![(0, 8192)]);
}

#[test]
fn read_write_open_marks_in_use_and_crash_leaves_inconsistent() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    let mut img = open(&s, true);
    img.add_bitmap(b"a", 0, P).unwrap();
    img.add_bitmap(
        b"b",
        0,
        AddOptions {
            disabled: true,
            ..P
        },
    )
    .unwrap();
    img.close().unwrap();

    let img = open(&s, true);
    // While open for writing, another reader sees both bitmaps in_use.
    let peek = open(&Shared::new(s.bytes()), false);
    for id in peek.bitmap_ids() {
        assert!(peek.bitmap(id).unwrap().inconsistent());
    }
    std::mem::forget(img); // a crash: nothing stored

    let mut img = open(&s, true);
    let a = img.find_bitmap(b"a").unwrap();
    let err = img.bitmap_mut(a).unwrap().clear().unwrap_err();
    assert!(matches!(err, Error::Inconsistent { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "Bitmap 'a' is inconsistent and cannot be used"
    );
    assert!(err.hint().unwrap().contains("block-dirty-bitmap-remove"));
    assert!(img.bitmap_mut(a).unwrap().enable().is_err());
    assert!(img.merge_bitmap(b"b", b"a").is_err());
    assert!(matches!(
        img.add_bitmap(b"a", 0, P).unwrap_err(),
        Error::CannotStore { .. } | Error::BitmapExists { .. }
    ));
    img.remove_bitmap(b"a").unwrap();
    img.remove_bitmap(b"b").unwrap();
    img.close().unwrap();
    let bytes = s.bytes();
    assert_eq!(
        be::get_u64(&bytes, 88) & AUTOCLEAR_BITMAPS,
        0,
        "last removal clears the bit"
    );
    let img = open(&s, false);
    assert!(img.bitmap_ids().is_empty());
}

#[test]
fn read_only_open_writes_nothing_and_refuses_changes() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    let mut img = open(&s, true);
    img.add_bitmap(b"a", 0, P).unwrap();
    img.close().unwrap();
    let before = s.bytes();
    let mut img = open(&s, false);
    let a = img.find_bitmap(b"a").unwrap();
    assert!(matches!(
        img.bitmap_mut(a).unwrap().set_dirty(0, 1).unwrap_err(),
        Error::ReadOnlyBitmap { .. }
    ));
    assert!(matches!(
        img.remove_bitmap(b"a").unwrap_err(),
        Error::ReadOnlyBitmap { .. }
    ));
    assert!(img.add_bitmap(b"p", 0, P).is_err());
    img.add_bitmap(b"t", 0, AddOptions::default()).unwrap();
    img.close().unwrap();
    assert!(s.bytes() == before, "a read-only open must not write");
}

#[test]
fn refcount_blocks_and_table_grow() {
    // 512-byte clusters: one refcount block covers 128 KiB and a one-cluster table 8 MiB.
    let s = Shared::new(blank_image(64 * MIB, 512).unwrap());
    let mut st = s.clone();
    let mut rc = Refcounts::load(&st, 9, 4, 512, 1).unwrap();
    let mut got = Vec::new();
    for _ in 0..20_000 {
        got.push(rc.alloc(&mut st, 1, &|_, _, _| Ok(())).unwrap());
    }
    got.push(rc.alloc(&mut st, 40, &|_, _, _| Ok(())).unwrap());
    rc.write_dirty_blocks(&mut st).unwrap();
    let (t_off, t_clusters) = rc.reftable_location();
    assert!(t_clusters > 1, "the refcount table grew");
    let mut fresh = Refcounts::load(&st, 9, 4, t_off, t_clusters).unwrap();
    let mut seen = std::collections::HashSet::new();
    for &o in &got {
        assert!(seen.insert(o), "cluster {o:#x} handed out twice");
        assert_eq!(fresh.get(&st, o / 512).unwrap(), 1);
    }
    rc.free(&st, got[0], 1).unwrap();
    rc.write_dirty_blocks(&mut st).unwrap();
    let mut fresh = Refcounts::load(&st, 9, 4, t_off, t_clusters).unwrap();
    assert_eq!(fresh.get(&st, got[0] / 512).unwrap(), 0);
}

#[test]
fn add_validates_like_qmp() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    let mut img = open(&s, true);
    assert!(img
        .add_bitmap(b"", 0, P)
        .unwrap_err()
        .to_string()
        .contains("cannot be empty"));
    assert!(img.add_bitmap(&[b'x'; 1024], 0, P).is_err());
    img.add_bitmap(&[b'x'; 1023], 0, P).unwrap();
    for g in [256u64, 3000, 1 << 32] {
        assert!(img.add_bitmap(b"g", g, P).is_err(), "granularity {g}");
    }
    img.add_bitmap(b"g", 1 << 31, P).unwrap();
    assert!(matches!(
        img.add_bitmap(b"g", 0, AddOptions::default()).unwrap_err(),
        Error::BitmapExists { .. }
    ));
    let id = img.find_bitmap(b"g").unwrap();
    assert_eq!(img.bitmap(id).unwrap().granularity(), 1 << 31);
    img.close().unwrap();
}

fn set_header_u64(s: &Shared, offset: usize, f: impl Fn(u64) -> u64) {
    let mut d = s.0.lock().unwrap();
    let v = f(be::get_u64(&d, offset));
    be::put_u64(&mut d, offset, v);
}

#[test]
fn corrupt_and_dirty_images_open_read_only_only() {
    use crate::format::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
    for bit in [INCOMPAT_CORRUPT, INCOMPAT_DIRTY] {
        let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
        set_header_u64(&s, 72, |v| v | bit);
        let before = s.bytes();
        let err = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(s.clone()), "mem")
            .unwrap_err();
        assert!(matches!(err, Error::NeedsRepair(_)), "{err}");
        assert!(err.to_string().contains("qemu-img check -r all"), "{err}");
        assert_eq!(err.errno(), libc::EACCES);
        let img = open(&s, false);
        drop(img);
        assert!(
            s.bytes() == before,
            "refused and read-only opens write nothing"
        );
    }
}

#[test]
fn unknown_incompatible_features_are_refused() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    set_header_u64(&s, 72, |v| v | 1 << 63);
    for rw in [false, true] {
        let err = OpenOptions::new()
            .read_write(rw)
            .open_storage(Box::new(s.clone()), "mem")
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("8000000000000000"), "{err}");
    }
}

#[test]
fn inconsistent_bitmaps_of_huge_disks_cost_no_memory() {
    // 1 PiB disk, 2 MiB clusters; a consistent bitmap at 1 MiB granularity (128 MiB of bits
    // would be 2^30 granules; use 16 MiB granularity: 2^26 granules, 8 MiB).
    let s = Shared::new(blank_image(1 << 50, 2 << 20).unwrap());
    let mut img = open(&s, true);
    img.add_bitmap(b"big", 16 << 20, P).unwrap();
    img.close().unwrap();
    std::mem::forget(open(&s, true)); // a crash while open: the bitmap stays in_use on disk
                                      // Make the in_use entry claim a 512-byte granularity: 2^41 granules if it were allocated.
    {
        let mut d = s.0.lock().unwrap();
        let ext_dir_off = {
            let cluster0 = d[..2 << 20].to_vec();
            let h = crate::format::header::Header::parse(&cluster0).unwrap();
            let exts = crate::format::extension::Extensions::parse(&cluster0, &h).unwrap();
            exts.bitmaps.unwrap().bitmap_directory_offset as usize
        };
        assert_eq!(be::get_u32(&d, ext_dir_off + 12) & 1, 1, "in_use on disk");
        d[ext_dir_off + 17] = 9;
    }
    let mut img = open(&s, true);
    let id = img.find_bitmap(b"big").unwrap();
    let b = img.bitmap_current(id).unwrap();
    assert!(b.inconsistent());
    // Unusable: the infallible readers answer "all dirty", the fallible ones fail.
    assert_eq!(
        (b.size(), b.granularity(), b.count()),
        (1 << 50, 512, 1 << 50)
    );
    assert_eq!(b.next_zero(4096, 1), None);
    assert_eq!(b.next_dirty(0, u64::MAX), Some(0));
    assert!(b.dirty_runs(0, u64::MAX).is_err());
    img.remove_bitmap(b"big").unwrap();
    img.close().unwrap();
}

/// Two versions of an image, as a second writer changes it between reads (force-share): a read
/// serves the current version; the storage switches to the other one after `switch_after`
/// reads, and on every read that touches an offset in `flip_on`.
#[derive(Clone)]
struct Racy(Arc<Mutex<RacyState>>);

struct RacyState {
    versions: [Vec<u8>; 2],
    cur: usize,
    reads: u64,
    switch_after: Option<u64>,
    flip_on: Vec<u64>,
}

impl Storage for Racy {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        if s.switch_after == Some(s.reads) {
            s.cur = 1;
        }
        s.reads += 1;
        let d = &s.versions[s.cur];
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d[offset as usize..end]);
        if s.flip_on.iter().any(|&o| (offset..end as u64).contains(&o)) {
            s.cur ^= 1;
        }
        Ok(())
    }
    fn write_all_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn size(&self) -> io::Result<u64> {
        let s = self.0.lock().unwrap();
        Ok(s.versions[s.cur].len() as u64)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The directory, the table and the data cluster of bitmap `name` (one data cluster and a
/// one-cluster table: 64 KiB clusters and granularity).
fn bitmap_clusters(bytes: &[u8], name: &str) -> [u64; 3] {
    let img = open(&Shared::new(bytes.to_vec()), false);
    let d = img.file.as_ref().unwrap();
    let e = d
        .dir
        .entries()
        .iter()
        .find(|e| e.name == name.as_bytes())
        .unwrap();
    [
        d.dir.ext.unwrap().bitmap_directory_offset,
        e.table_offset,
        be::get_u64(bytes, e.table_offset as usize),
    ]
}

/// A force-share open of an image that a second writer changes while qdirty reads it: v1 has
/// bitmap "b" dirty over 0..1 MiB in data cluster D1; v2 has it dirty over 1..2 MiB in D2, and
/// v1's directory, table and D1 freed and reused (all ones). For every point of the open at which the image can switch
/// from v1 to v2, the open gives v1's or v2's bits, or an error; never v1's table over v2's
/// D1. An image that keeps changing under every attempt fails with InUse naming the bitmap.
#[test]
fn force_share_open_never_mixes_versions() {
    let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
    let mut img = open(&s, true);
    let id = img.add_bitmap(b"b", 65536, P).unwrap();
    img.bitmap_mut(id).unwrap().set_dirty(0, MIB).unwrap();
    img.close().unwrap();
    let v1 = s.bytes();
    let mut img = open(&s, true);
    let id = img.find_bitmap(b"b").unwrap();
    img.bitmap_mut(id).unwrap().clear().unwrap();
    img.bitmap_mut(id).unwrap().set_dirty(MIB, MIB).unwrap();
    img.close().unwrap();
    let mut v2 = s.bytes();
    let (old, new) = (bitmap_clusters(&v1, "b"), bitmap_clusters(&v2, "b"));
    let (d1, d2) = (old[2], new[2]);
    for c in old {
        assert!(!new.contains(&c));
        v2[c as usize..c as usize + 65536].fill(0xff);
    }
    let (want1, want2) = (vec![(0, MIB)], vec![(MIB, MIB)]);

    let racy = |switch_after: Option<u64>, flip_on: Vec<u64>| {
        Racy(Arc::new(Mutex::new(RacyState {
            versions: [v1.clone(), v2.clone()],
            cur: 0,
            reads: 0,
            switch_after,
            flip_on,
        })))
    };
    let open_shared =
        |st: Racy| Image::open_storage_opts(Box::new(st), "racy", false, false, true, None);
    // Reads of an undisturbed open.
    let st = racy(None, Vec::new());
    assert_eq!(runs(&mut open_shared(st.clone()).unwrap(), "b"), want1);
    let total = st.0.lock().unwrap().reads;
    let (mut saw1, mut saw2) = (false, false);
    for n in 0..=total {
        let mut img = open_shared(racy(Some(n), Vec::new()))
            .unwrap_or_else(|e| panic!("switch after {n} of {total} reads: {e}"));
        let b = img.bitmap(img.find_bitmap(b"b").unwrap()).unwrap();
        assert!(!b.inconsistent(), "switch after {n} of {total} reads");
        let got = runs(&mut img, "b");
        assert!(
            got == want1 || got == want2,
            "switch after {n} of {total} reads: bits of no version: {got:?}"
        );
        saw1 |= got == want1;
        saw2 |= got == want2;
    }
    assert!(saw1 && saw2, "v1 seen {saw1}, v2 seen {saw2}");

    // Every data read switches the version: no attempt sees a stable image.
    let e = open_shared(racy(None, vec![d1, d2])).unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e:?}");
    assert!(e.to_string().contains("bitmap 'b'"), "{e}");
}
