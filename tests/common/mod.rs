//! The harness of the integration tests: the test kit (`qdirty_testkit`, re-exported here so that
//! a test imports `common::*` alone) and its qdirty side, which the kit cannot hold (it does not
//! depend on qdirty, so that qdirty's own unit tests can use it): opening images, finding
//! bitmaps, reading their runs, comparing every bitmap with what QEMU's tools say, and qdirty's
//! `Storage` as the kit's conformance suite sees it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use qdirty::image::storage::Storage;
use qdirty::{DirtyBitmap, Image};

pub use qdirty_testkit::*;

pub mod c_error;

use qdirty_testkit::storage::StorageUnderTest;

/// The dirty runs of a qdirty bitmap over the whole disk ([`DirtyBitmap::dirty_runs`]: maximal
/// runs, in order). Panics with the error when the bitmap is unusable (inconsistent, or its data
/// unreadable): no run list stands for an unknown bitmap.
pub fn qdirty_runs(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    bm.dirty_runs(0, bm.size())
        .unwrap_or_else(|e| panic!("dirty runs of qdirty bitmap '{}': {e}", bm_name(bm)))
        .collect()
}

/// Name (lossy UTF-8) of a qdirty bitmap.
pub fn bm_name(bm: &DirtyBitmap) -> String {
    bm.name()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default()
}

/// Opens an image with qdirty, panicking with the error.
pub fn qd_open(img: &Path, rw: bool) -> Image {
    Image::open(img, rw).unwrap_or_else(|e| panic!("qdirty open {} (rw={rw}): {e}", img.display()))
}

/// The bitmaps of a qdirty image by name: (name, a loaded copy of the bitmap, up to date).
pub fn qd_bitmaps(img: &mut Image) -> Vec<(String, DirtyBitmap)> {
    img.bitmap_ids()
        .into_iter()
        .map(|id| img.bitmap_current(id).expect("listed id").clone())
        .map(|b| (bm_name(&b), b))
        .collect()
}

/// Adds a persistent bitmap with qdirty.
pub fn qd_add(img: &mut Image, name: &str, granularity: u64, disabled: bool) -> qdirty::BitmapId {
    img.add_bitmap(
        name.as_bytes(),
        granularity,
        qdirty::AddOptions {
            persistent: true,
            disabled,
            autoload: None,
        },
    )
    .unwrap_or_else(|e| panic!("qdirty add_bitmap {}: {e}", short(name)))
}

/// The qdirty bitmap of that name, for changes.
pub fn qd_bm_mut<'a>(img: &'a mut Image, name: &str) -> &'a mut DirtyBitmap {
    let id = img
        .find_bitmap(name.as_bytes())
        .unwrap_or_else(|| panic!("qdirty has no bitmap {}", short(name)));
    img.bitmap_mut(id).expect("found id")
}

/// The qdirty bitmap of that name, up to date and loaded.
pub fn qd_bm<'a>(img: &'a mut Image, name: &str) -> &'a DirtyBitmap {
    let id = img
        .find_bitmap(name.as_bytes())
        .unwrap_or_else(|| panic!("qdirty has no bitmap {}", short(name)));
    img.bitmap_current(id)
        .unwrap_or_else(|e| panic!("qdirty bitmap {}: {e}", short(name)))
}

/// Asserts that qdirty's view of every bitmap of `img` equals QEMU's: same names, granularity,
/// enabled == auto, not inconsistent, dirty runs equal to nbdinfo's. Returns QEMU's runs by name.
pub fn assert_qdirty_matches_qemu(img: &Path, context: &str) -> BTreeMap<String, Vec<(u64, u64)>> {
    let qemu = qemu_img_info_bitmaps(img, false);
    let mut image = qd_open(img, false);
    let mine = qd_bitmaps(&mut image);
    let mut qn: Vec<&str> = qemu.iter().map(|b| b.name.as_str()).collect();
    let mut dn: Vec<&str> = mine.iter().map(|b| b.0.as_str()).collect();
    qn.sort_unstable();
    dn.sort_unstable();
    assert_eq!(
        qn.iter().map(|n| short(n)).collect::<Vec<_>>(),
        dn.iter().map(|n| short(n)).collect::<Vec<_>>(),
        "{context}: bitmap names (QEMU left, qdirty right)"
    );
    let mut out = BTreeMap::new();
    for q in &qemu {
        let (_, b) = mine.iter().find(|m| m.0 == q.name).expect("same names");
        let n = short(&q.name);
        assert!(
            !q.in_use(),
            "{context}: QEMU says '{n}' is in use; the test expected a clean image"
        );
        assert_eq!(
            b.granularity(),
            q.granularity,
            "{context}: granularity of '{n}'"
        );
        assert_eq!(
            b.enabled(),
            q.auto(),
            "{context}: '{n}' enabled (qdirty) vs auto flag (QEMU) {:?}",
            q.flags
        );
        assert!(
            !b.inconsistent(),
            "{context}: qdirty says '{n}' is inconsistent"
        );
        assert!(
            b.persistent(),
            "{context}: qdirty says '{n}' is not persistent"
        );
        assert_eq!(b.size(), image.size(), "{context}: size of '{n}'");
        let qr = nbd_dirty_extents(img, &q.name);
        let dr = qdirty_runs(b);
        assert!(
            qr == dr,
            "{context}: dirty runs of '{n}' differ: {}",
            diff_runs(&qr, &dr)
        );
        let granules: u64 = qr.iter().map(|r| r.1.div_ceil(q.granularity)).sum();
        assert_eq!(
            b.count(),
            granules * q.granularity,
            "{context}: count() of '{n}' vs QEMU's dirty granules"
        );
        out.insert(q.name.clone(), qr);
    }
    image
        .close()
        .unwrap_or_else(|e| panic!("{context}: read-only close: {e}"));
    out
}

/// Asserts that qdirty's SHA-256 of every bitmap equals QEMU's x-debug-block-dirty-bitmap-sha256.
pub fn assert_sha256_match(img: &Path, tmp: &TempDir, context: &str) {
    let mut image = qd_open(img, false);
    let mine: Vec<(String, String)> = qd_bitmaps(&mut image)
        .into_iter()
        .map(|(n, b)| (n, b.sha256().expect("sha256")))
        .collect();
    image.close().expect("read-only close");
    let names: Vec<String> = mine.iter().map(|m| m.0.clone()).collect();
    let qemu = qemu_sha256s(img, &names, tmp);
    for (n, sha) in &mine {
        assert_eq!(
            &qemu[n],
            sha,
            "{context}: sha256 of '{}' (QEMU left, qdirty right)",
            short(n)
        );
    }
}

/// A qdirty [`Storage`] for the test kit's conformance suite (`storage::check_storage`).
pub struct Conformance<S>(pub S);

impl<S: Storage> StorageUnderTest for Conformance<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn write_all_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.0.write_all_vectored_at(bufs, offset)
    }
    fn size(&self) -> io::Result<u64> {
        self.0.size()
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
