//! Every negative errno that include/qdirty.h documents for an export, triggered through the C
//! ABI, one table row per (export, errno, situation):
//!
//! - the row's setup creates the situation (a standalone image, an image file made with
//!   `qdirty::Image::create`, a file copied while qdirty had it open read-write, a busy or
//!   readonly bitmap, a live iterator, a read-only image, the handle of a removed bitmap, a host
//!   I/O table whose reads or writes fail, ...);
//! - the call must fail with exactly that errno, an error whose errno agrees, and a message that
//!   contains the row's fragment (QEMU's wording where the header promises it; an inconsistent
//!   bitmap's error must also carry QEMU's hint);
//! - nothing may have changed: a snapshot of every image of the row (image flags, the bitmap
//!   list with names and flags from `qdirty_image_query_bitmaps`, every bitmap's flags and dirty
//!   extents from `qdirty_bitmap_dirty_extents`), of every file's bytes and of what a fresh
//!   read-only open of each file sees is taken before and after the call and must be equal.
//!
//! Then the completeness check: the header is parsed for every errno named in each export's
//! comment (and those it inherits with "as `qdirty_...`" in its Returns paragraph); every
//! (export, errno) pair needs a row, or an entry in [`ALLOWLIST`] that says why it cannot be
//! triggered; and every row's errno must be documented for its export.
//!
//! Expected errnos come from the header (the contract), not from qdirty's behaviour.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use common::c_error::take;
use common::TempDir;
use qdirty::ffi::*;
use qdirty::{AddOptions, Image};

const MIB: u64 = 1 << 20;
const G: u64 = 65536;
/// The disk size of every test image (1024 granules of 64 KiB).
const SIZE: u64 = 64 * MIB;
/// QEMU's hint after every "inconsistent bitmap" error.
const HINT: &str = "Try block-dirty-bitmap-remove to delete this bitmap from disk";

/// The errno names the header may use, with their values.
const ERRNOS: &[(&str, i32)] = &[
    ("EINVAL", libc::EINVAL),
    ("ENOENT", libc::ENOENT),
    ("EEXIST", libc::EEXIST),
    ("EBUSY", libc::EBUSY),
    ("EPERM", libc::EPERM),
    ("EROFS", libc::EROFS),
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("ENOTSUP", libc::ENOTSUP),
    ("EFBIG", libc::EFBIG),
    ("EAGAIN", libc::EAGAIN),
    ("EACCES", libc::EACCES),
];

/// Documented (export, errno) pairs that no row triggers, and why. `*` stands for every errno
/// the comment names.
const ALLOWLIST: &[(&str, &str, &str)] = &[
    // Not failures of the function: values it describes.
    (
        "qdirty_error_errno",
        "*",
        "lists the errnos an error can carry; the getter itself has no failure",
    ),
    (
        "qdirty_image_has_readonly_bitmaps",
        "EPERM",
        "the errno the host must give refused guest writes, not a return value",
    ),
    (
        "qdirty_txn_commit",
        "ENOENT",
        "what the handles of released bitmaps answer afterwards, not a return of the commit",
    ),
    (
        "qdirty_txn_abort",
        "ENOENT",
        "what the handles of released bitmaps answer afterwards, not a return of the abort",
    ),
    // No error channel (no errp): its -errno returns are checked where it is called,
    // c-tests/test_image.c (gone bitmap after an aborted transaction: -ENOENT) and
    // c-tests/test_boundary.c (NULL: -EINVAL).
    (
        "qdirty_iter_next",
        "EINVAL",
        "no errp: checked by c-tests/test_boundary.c",
    ),
    (
        "qdirty_iter_next",
        "ENOENT",
        "no errp: checked by c-tests/test_image.c",
    ),
    (
        "qdirty_iter_next",
        "EIO",
        "no errp, and an unusable image needs an internal panic",
    ),
    // An image is unusable only after a panic inside qdirty (a bug) poisoned its lock: no
    // public call can provoke one.
    (
        "qdirty_txn_commit",
        "EIO",
        "an unusable image needs an internal panic",
    ),
    (
        "qdirty_txn_abort",
        "EIO",
        "an unusable image needs an internal panic",
    ),
    (
        "qdirty_image_broken_bitmap_count",
        "EIO",
        "an unusable image needs an internal panic",
    ),
    (
        "qdirty_image_broken_bitmap",
        "EIO",
        "an unusable image needs an internal panic",
    ),
];

fn errno_value(name: &str) -> i32 {
    ERRNOS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("unknown errno name {name}"))
        .1
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

// ------------------------------------------------------------------------------------------
// A host I/O table over bytes in memory, whose reads or writes can be made to fail
// ------------------------------------------------------------------------------------------

struct Host {
    data: Mutex<Vec<u8>>,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    /// The errno failed writes and flushes return (EIO unless set).
    write_errno: std::sync::atomic::AtomicI32,
}

impl Host {
    fn new(bytes: Vec<u8>) -> Box<Host> {
        Box::new(Host {
            data: Mutex::new(bytes),
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            write_errno: std::sync::atomic::AtomicI32::new(libc::EIO),
        })
    }

    fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn opaque(&self) -> *mut c_void {
        (self as *const Host).cast_mut().cast()
    }
}

/// # Safety
/// `opaque` is a live `Host`.
unsafe fn host<'a>(opaque: *mut c_void) -> &'a Host {
    // SAFETY: the caller's contract.
    unsafe { &*opaque.cast::<Host>() }
}

unsafe extern "C" fn h_pread(opaque: *mut c_void, buf: *mut c_void, len: u64, off: u64) -> c_int {
    // SAFETY: qdirty passes back the Host given at open, which outlives the image.
    let h = unsafe { host(opaque) };
    if h.fail_reads.load(Ordering::SeqCst) {
        return -libc::EIO;
    }
    let d = h.data.lock().unwrap_or_else(|e| e.into_inner());
    let (off, len) = (off as usize, len as usize);
    if off.checked_add(len).is_none_or(|end| end > d.len()) {
        return -libc::EIO;
    }
    // SAFETY: qdirty gives a buffer of `len` writable bytes; the source range was checked.
    unsafe { ptr::copy_nonoverlapping(d.as_ptr().add(off), buf.cast::<u8>(), len) };
    0
}

unsafe extern "C" fn h_pwrite(
    opaque: *mut c_void,
    buf: *const c_void,
    len: u64,
    off: u64,
) -> c_int {
    // SAFETY: as h_pread.
    let h = unsafe { host(opaque) };
    if h.fail_writes.load(Ordering::SeqCst) {
        return -h.write_errno.load(Ordering::SeqCst);
    }
    let mut d = h.data.lock().unwrap_or_else(|e| e.into_inner());
    let (off, len) = (off as usize, len as usize);
    if d.len() < off + len {
        d.resize(off + len, 0);
    }
    // SAFETY: qdirty gives `len` readable bytes; the destination was sized above.
    unsafe { ptr::copy_nonoverlapping(buf.cast::<u8>(), d.as_mut_ptr().add(off), len) };
    0
}

unsafe extern "C" fn h_flush(opaque: *mut c_void) -> c_int {
    // SAFETY: as h_pread.
    let h = unsafe { host(opaque) };
    if h.fail_writes.load(Ordering::SeqCst) {
        -h.write_errno.load(Ordering::SeqCst)
    } else {
        0
    }
}

unsafe extern "C" fn h_len(opaque: *mut c_void) -> i64 {
    // SAFETY: as h_pread.
    let h = unsafe { host(opaque) };
    h.data.lock().unwrap_or_else(|e| e.into_inner()).len() as i64
}

fn io_ops() -> qdirty_io_ops {
    qdirty_io_ops {
        size: std::mem::size_of::<qdirty_io_ops>() as u32,
        pread: Some(h_pread),
        pwrite: Some(h_pwrite),
        flush: Some(h_flush),
        get_length: Some(h_len),
        alloc_clusters: None,
        free_clusters: None,
    }
}

/// A host's table followed by fields a later version of qdirty might know.
#[repr(C)]
struct GrownOps {
    ops: qdirty_io_ops,
    extra: [u64; 2],
}

// ------------------------------------------------------------------------------------------
// Image templates, made once
// ------------------------------------------------------------------------------------------

struct Templates {
    /// Persistent, enabled "b" (dirty: [1M, +64K), [10M, +128K)) and "c" (dirty: [5M, +64K)),
    /// stored cleanly.
    clean: Vec<u8>,
    /// `clean` copied while qdirty had it open read-write: "b" and "c" in_use (inconsistent).
    crashed: Vec<u8>,
    /// `clean` with a reserved flag bit in "c"'s directory entry: QEMU refuses the image; a
    /// salvage open lists "c" as broken.
    broken: Vec<u8>,
    /// A blank image without bitmaps, as a qcow2 v2 image.
    v2: Vec<u8>,
    /// A blank 4 TiB image: a persistent bitmap of granularity 512 needs 1 GiB of data, more
    /// than QEMU's BME_MAX_PHYS_SIZE (512 MiB).
    huge: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Offset of the flags of directory entry `name` (qcow2 spec: header extensions after
/// header_length, the bitmaps extension 0x23852875 naming the directory; entries of 24 bytes,
/// extra data and name, padded to 8).
fn dir_entry_flags_offset(img: &[u8], name: &[u8]) -> usize {
    let mut pos = be32(img, 100) as usize;
    let (dir_size, dir_off) = loop {
        let (ty, len) = (be32(img, pos), be32(img, pos + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            break (
                be64(img, pos + 8 + 8) as usize,
                be64(img, pos + 8 + 16) as usize,
            );
        }
        pos += 8 + len.next_multiple_of(8);
    };
    let mut e = dir_off;
    while e < dir_off + dir_size {
        let name_size = u16::from_be_bytes([img[e + 18], img[e + 19]]) as usize;
        let extra = be32(img, e + 20) as usize;
        if &img[e + 24 + extra..e + 24 + extra + name_size] == name {
            return e + 12;
        }
        e += (24 + extra + name_size).next_multiple_of(8);
    }
    panic!("no directory entry {}", String::from_utf8_lossy(name));
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        let tmp = TempDir::new("errno-templates");
        let p = tmp.join("clean.qcow2");
        Image::create(&p, SIZE, 0).unwrap();
        let blank = std::fs::read(&p).unwrap();
        let mut img = Image::open(&p, true).unwrap();
        let opts = AddOptions {
            persistent: true,
            ..AddOptions::default()
        };
        img.add_bitmap(b"b", G, opts).unwrap();
        img.set_dirty(MIB, G);
        img.set_dirty(10 * MIB, 2 * G);
        img.add_bitmap(b"c", G, opts).unwrap();
        img.set_dirty(5 * MIB, 1);
        img.close().unwrap();
        let clean = std::fs::read(&p).unwrap();
        let img = Image::open(&p, true).unwrap();
        let crashed = std::fs::read(&p).unwrap();
        img.close().unwrap();
        let mut broken = clean.clone();
        let f = dir_entry_flags_offset(&broken, b"c");
        broken[f + 3] |= 0x08;
        let mut v2 = blank.clone();
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        let h = tmp.join("huge.qcow2");
        Image::create(&h, 4 << 40, 0).unwrap();
        let huge = std::fs::read(&h).unwrap();
        Templates {
            clean,
            crashed,
            broken,
            v2,
            huge,
        }
    })
}

/// A template with bits of the incompatible features field (header offset 72) set.
fn with_incompatible(bytes: &[u8], bits: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let v = be64(&b, 72) | bits;
    b[72..80].copy_from_slice(&v.to_be_bytes());
    b
}

// ------------------------------------------------------------------------------------------
// The fixture of one row
// ------------------------------------------------------------------------------------------

type Errp = *mut *mut qdirty_error;

struct Fx {
    dir: PathBuf,
    /// The images of the row, closed at teardown (unless consumed by the call).
    imgs: Vec<*mut qdirty_image>,
    /// Stand-ins for the before-snapshot of an image whose own snapshot would load its data
    /// (rows about read errors): (index in `imgs`, an independent open of the same bytes).
    twins: Vec<(usize, *mut qdirty_image)>,
    /// Images the call takes (close).
    consumed: Vec<usize>,
    /// Files whose bytes and on-disk state are compared.
    files: Vec<PathBuf>,
    /// Paths that must not exist after the call.
    absent: Vec<PathBuf>,
    /// Memory hosts; their bytes and on-disk state are compared. Outlive the images. Boxed:
    /// qdirty holds their addresses, which must not move when the vector grows.
    #[allow(clippy::vec_box)]
    hosts: Vec<Box<Host>>,
    /// Bitmap handles by name.
    h: BTreeMap<&'static str, *mut qdirty_bitmap>,
    iters: Vec<*mut qdirty_iter>,
    txn: *mut qdirty_txn,
    backup: *mut qdirty_backup,
    /// The bitmap the call is about (see [`On`]).
    target: *mut qdirty_bitmap,
    ops: Box<GrownOps>,
    /// Memory that is not a qdirty object.
    bogus: Box<[u64; 8]>,
}

impl Fx {
    fn new(dir: PathBuf) -> Fx {
        std::fs::create_dir_all(&dir).unwrap();
        Fx {
            dir,
            imgs: Vec::new(),
            twins: Vec::new(),
            consumed: Vec::new(),
            files: Vec::new(),
            absent: Vec::new(),
            hosts: Vec::new(),
            h: BTreeMap::new(),
            iters: Vec::new(),
            txn: ptr::null_mut(),
            backup: ptr::null_mut(),
            target: ptr::null_mut(),
            ops: Box::new(GrownOps {
                ops: io_ops(),
                extra: [0; 2],
            }),
            bogus: Box::new([0; 8]),
        }
    }

    fn img(&self, i: usize) -> *mut qdirty_image {
        self.imgs[i]
    }

    fn h(&self, name: &str) -> *mut qdirty_bitmap {
        *self
            .h
            .get(name)
            .unwrap_or_else(|| panic!("the setup made no bitmap {name}"))
    }

    fn path(&self, i: usize) -> CString {
        c(self.files[i].to_str().unwrap())
    }

    /// A new file of the row holding `bytes`.
    fn file(&mut self, bytes: &[u8]) -> usize {
        let p = self.dir.join(format!("f{}.qcow2", self.files.len()));
        std::fs::write(&p, bytes).unwrap();
        self.files.push(p);
        self.files.len() - 1
    }

    /// Registers an image and the handles of its bitmaps "b" and "c" (if any).
    fn add_image(&mut self, img: *mut qdirty_image) -> usize {
        assert!(!img.is_null());
        self.imgs.push(img);
        for name in ["b", "c"] {
            // SAFETY: img is open; the name is NUL-terminated.
            let b = unsafe { qdirty_image_find_bitmap(img, c(name).as_ptr()) };
            if !b.is_null() && !self.h.contains_key(name) {
                self.h.insert(name, b);
            }
        }
        self.imgs.len() - 1
    }

    /// Opens file `i` with `flags`.
    fn open(&mut self, i: usize, flags: u32) -> usize {
        let mut err = ptr::null_mut();
        // SAFETY: a NUL-terminated path and a NULL error pointer.
        let img = unsafe { qdirty_image_open(self.path(i).as_ptr(), flags, &mut err) };
        assert!(!img.is_null(), "open: {}", take(err).1);
        self.add_image(img)
    }

    /// Opens `bytes` through a memory host with `flags`.
    fn open_host(&mut self, bytes: &[u8], flags: u32) -> usize {
        let h = Host::new(bytes.to_vec());
        let mut err = ptr::null_mut();
        // SAFETY: the table is copied; the host outlives the image (teardown order).
        let img = unsafe {
            qdirty_image_open_with_io(&io_ops(), h.opaque(), c("host").as_ptr(), flags, &mut err)
        };
        assert!(!img.is_null(), "open_with_io: {}", take(err).1);
        self.hosts.push(h);
        self.add_image(img)
    }

    /// Adds a transient bitmap to image `i`.
    fn add(&mut self, i: usize, name: &'static str, granularity: u32) -> *mut qdirty_bitmap {
        let mut err = ptr::null_mut();
        // SAFETY: the image is open.
        let b = unsafe {
            qdirty_image_add_bitmap(self.imgs[i], c(name).as_ptr(), granularity, 0, &mut err)
        };
        assert!(!b.is_null(), "add {name}: {}", take(err).1);
        self.h.insert(name, b);
        b
    }
}

fn ok(rc: c_int, what: &str, err: *mut qdirty_error) {
    assert_eq!(rc, 0, "{what}: {}", take(err).1);
}

// Setup steps.

/// A standalone image (index 0 when first) with "b" (dirty: [1M, +64K), [10M, +128K)) and "c"
/// (dirty: [5M, +64K)).
fn mem(f: &mut Fx) -> usize {
    let i = bare(f, SIZE);
    let (b, cc) = (f.add(i, "b", G as u32), f.add(i, "c", G as u32));
    let mut err = ptr::null_mut();
    // SAFETY: both bitmaps belong to the open image.
    unsafe {
        ok(qdirty_bitmap_set_dirty(b, MIB, G, &mut err), "set b", err);
        ok(
            qdirty_bitmap_set_dirty(b, 10 * MIB, 2 * G, &mut err),
            "set b",
            err,
        );
        ok(
            qdirty_bitmap_set_dirty(cc, 5 * MIB, 1, &mut err),
            "set c",
            err,
        );
    }
    i
}

/// A standalone image of `size` bytes without bitmaps.
fn bare(f: &mut Fx, size: u64) -> usize {
    let mut err = ptr::null_mut();
    // SAFETY: a NULL error pointer.
    let img = unsafe { qdirty_image_new_memory(size, &mut err) };
    assert!(!img.is_null(), "new_memory: {}", take(err).1);
    f.add_image(img)
}

/// The clean template as a file, opened with `flags`.
fn file(f: &mut Fx, flags: u32) -> usize {
    let i = f.file(&templates().clean);
    f.open(i, flags)
}

fn file_rw(f: &mut Fx) {
    file(f, QDIRTY_OPEN_RDWR);
}

fn file_ro(f: &mut Fx) {
    file(f, 0);
}

/// The crashed template (inconsistent "b" and "c") opened read-write, with a transient "t".
fn crashed(f: &mut Fx) {
    let i = f.file(&templates().crashed);
    let img = f.open(i, QDIRTY_OPEN_RDWR);
    f.add(img, "t", G as u32);
}

/// A standalone image with the handle "g" of a removed bitmap.
fn gone(f: &mut Fx) {
    let img = mem(f);
    f.add(img, "g", G as u32);
    let mut err = ptr::null_mut();
    // SAFETY: the image is open.
    let rc = unsafe { qdirty_image_remove_bitmap(f.img(img), c("g").as_ptr(), &mut err) };
    ok(rc, "remove g", err);
}

fn set_busy(f: &mut Fx, name: &str) {
    let mut err = ptr::null_mut();
    // SAFETY: the bitmap belongs to an open image.
    ok(
        unsafe { qdirty_bitmap_set_busy(f.h(name), true, &mut err) },
        "set_busy",
        err,
    );
}

fn set_readonly(f: &mut Fx, name: &str, ro: bool) {
    let mut err = ptr::null_mut();
    // SAFETY: the bitmap belongs to an open image.
    ok(
        unsafe { qdirty_bitmap_set_readonly(f.h(name), ro, &mut err) },
        "set_readonly",
        err,
    );
}

fn iterate(f: &mut Fx, name: &str) {
    let mut err = ptr::null_mut();
    // SAFETY: the bitmap belongs to an open image; the iterator is freed at teardown.
    let it = unsafe { qdirty_bitmap_iter_new(f.h(name), &mut err) };
    assert!(!it.is_null(), "iter_new: {}", take(err).1);
    f.iters.push(it);
}

fn successor(f: &mut Fx, name: &str) -> *mut qdirty_bitmap {
    let mut err = ptr::null_mut();
    // SAFETY: the bitmap belongs to an open image.
    let s = unsafe { qdirty_bitmap_create_successor(f.h(name), &mut err) };
    assert!(!s.is_null(), "create_successor: {}", take(err).1);
    f.h.insert("succ", s);
    s
}

fn txn(f: &mut Fx) {
    f.txn = qdirty_txn_new();
}

fn backup_of(f: &mut Fx, name: &str) {
    let mut err = ptr::null_mut();
    // SAFETY: the bitmap belongs to an open image; the backup is freed at teardown.
    let rc = unsafe { qdirty_bitmap_clear_with_backup(f.h(name), &mut f.backup, &mut err) };
    ok(rc, "clear_with_backup", err);
}

/// The clean template behind a memory host, opened read-only, whose reads fail from now on;
/// `Fx::target` is its "b". A second host over the same bytes stands in for the
/// before-snapshot (a snapshot of the image itself would load the data).
fn unreadable(f: &mut Fx) {
    unreadable_after(f, 0, |_| {});
}

/// `unreadable`, opened read-write.
fn unreadable_rw(f: &mut Fx) {
    unreadable_after(f, QDIRTY_OPEN_RDWR, |_| {});
}

/// `unreadable` with `flags`, and `prep` run on the image and on its stand-in before reads
/// fail.
fn unreadable_after(f: &mut Fx, flags: u32, prep: fn(*mut qdirty_image)) {
    let t = &templates().clean;
    let i = f.open_host(t, flags);
    let twin = f.open_host(t, flags);
    let twin = f.imgs.remove(twin);
    prep(f.imgs[i]);
    prep(twin);
    f.twins.push((i, twin));
    f.target = f.h("b");
    f.hosts[0].fail_reads.store(true, Ordering::SeqCst);
}

/// Guest writes through the hook on image 0 and on its stand-in.
fn hook_writes(f: &mut Fx) {
    // SAFETY: both images are open.
    unsafe {
        qdirty_image_set_dirty(f.img(0), 0, 1);
        qdirty_image_set_dirty(f.twins[0].1, 0, 1);
    }
}

// ------------------------------------------------------------------------------------------
// Snapshots
// ------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct BmSnap {
    name: Option<String>,
    granularity: u32,
    size: u64,
    enabled: bool,
    recording: bool,
    busy: bool,
    persistent: bool,
    inconsistent: bool,
    readonly: bool,
    skip_store: bool,
    has_successor: bool,
    extents: Result<Vec<(u64, u64)>, i32>,
}

type InfoSnap = (Option<String>, u64, u32, bool, bool, bool, bool);

#[derive(Debug, PartialEq)]
struct ImgSnap {
    read_only: bool,
    size: u64,
    default_granularity: u32,
    has_readonly_bitmaps: bool,
    broken: i32,
    query: Result<Vec<InfoSnap>, i32>,
    bitmaps: Vec<BmSnap>,
}

/// What a fresh read-only open sees, or the errno of the open.
type DiskView = Result<ImgSnap, i32>;

#[derive(Debug, PartialEq)]
struct Snap {
    /// In-memory state of each image (None once the call took it).
    images: Vec<Option<ImgSnap>>,
    /// Each file's bytes and what a fresh read-only open of it sees.
    files: Vec<(Option<Vec<u8>>, DiskView)>,
    /// The same for each memory host.
    hosts: Vec<(Vec<u8>, DiskView)>,
}

/// All dirty extents of a bitmap, or the errno of the read.
fn extents_of(b: *const qdirty_bitmap) -> Result<Vec<(u64, u64)>, i32> {
    let mut out = [qdirty_extent::default(); 16];
    let (mut all, mut start) = (Vec::new(), 0u64);
    loop {
        let (mut n, mut err) = (0usize, ptr::null_mut());
        // SAFETY: out holds 16 extents; n and err are writable.
        let rc = unsafe {
            qdirty_bitmap_dirty_extents(b, start, u64::MAX, out.as_mut_ptr(), 16, &mut n, &mut err)
        };
        if rc != 0 {
            take(err);
            return Err(-rc);
        }
        all.extend(out[..n].iter().map(|e| (e.offset, e.length)));
        if n < 16 {
            return Ok(all);
        }
        start = out[n - 1].offset + out[n - 1].length;
    }
}

fn opt_str(p: *const std::os::raw::c_char) -> Option<String> {
    // SAFETY: NULL or a NUL-terminated string from qdirty.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn snap_image(img: *mut qdirty_image) -> ImgSnap {
    // SAFETY: img is open; every handle comes from it; arrays are freed as documented.
    unsafe {
        let mut err = ptr::null_mut();
        let broken = qdirty_image_broken_bitmap_count(img, &mut err);
        take(err);
        let (mut arr, mut n, mut err) = (ptr::null_mut(), 0usize, ptr::null_mut());
        let rc = qdirty_image_query_bitmaps(img, &mut arr, &mut n, &mut err);
        let query = if rc == 0 {
            let v = if n == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(arr, n)
                    .iter()
                    .map(|i| {
                        (
                            opt_str(i.name),
                            i.count,
                            i.granularity,
                            i.recording,
                            i.busy,
                            i.persistent,
                            i.inconsistent,
                        )
                    })
                    .collect()
            };
            qdirty_bitmap_info_free(arr, n);
            Ok(v)
        } else {
            take(err);
            Err(-rc)
        };
        let mut bitmaps = Vec::new();
        let mut b = qdirty_image_first_bitmap(img);
        while !b.is_null() {
            bitmaps.push(BmSnap {
                name: opt_str(qdirty_bitmap_name(b)),
                granularity: qdirty_bitmap_granularity(b),
                size: qdirty_bitmap_size(b),
                enabled: qdirty_bitmap_enabled(b),
                recording: qdirty_bitmap_recording(b),
                busy: qdirty_bitmap_busy(b),
                persistent: qdirty_bitmap_persistent(b),
                inconsistent: qdirty_bitmap_inconsistent(b),
                readonly: qdirty_bitmap_readonly(b),
                skip_store: qdirty_bitmap_skip_store(b),
                has_successor: qdirty_bitmap_has_successor(b),
                extents: extents_of(b),
            });
            b = qdirty_bitmap_next(b);
        }
        ImgSnap {
            read_only: qdirty_image_read_only(img),
            size: qdirty_image_size(img),
            default_granularity: qdirty_image_default_granularity(img),
            has_readonly_bitmaps: qdirty_image_has_readonly_bitmaps(img),
            broken,
            query,
            bitmaps,
        }
    }
}

/// What a fresh read-only open sees: of a file (force-share, salvage) or of host bytes.
fn disk_view(path: Option<&Path>, bytes: Option<Vec<u8>>) -> Result<ImgSnap, i32> {
    let mut err = ptr::null_mut();
    let h = bytes.map(Host::new);
    // SAFETY: a NUL-terminated path or a live host; the image is closed below.
    let img = unsafe {
        match (path, &h) {
            (Some(p), _) => qdirty_image_open(
                c(p.to_str().unwrap()).as_ptr(),
                QDIRTY_OPEN_FORCE_SHARE | QDIRTY_OPEN_SALVAGE,
                &mut err,
            ),
            (None, Some(h)) => {
                qdirty_image_open_with_io(&io_ops(), h.opaque(), c("view").as_ptr(), 0, &mut err)
            }
            (None, None) => unreachable!(),
        }
    };
    if img.is_null() {
        return Err(take(err).0);
    }
    let s = snap_image(img);
    // SAFETY: opened above, closed once.
    unsafe { qdirty_image_close(img, ptr::null_mut()) };
    Ok(s)
}

fn snapshot(f: &Fx, before: bool) -> Snap {
    let images = (0..f.imgs.len())
        .map(|i| {
            if f.consumed.contains(&i) {
                return None;
            }
            let twin = f.twins.iter().find(|(j, _)| *j == i).map(|(_, t)| *t);
            Some(snap_image(match twin {
                Some(t) if before => t,
                _ => f.imgs[i],
            }))
        })
        .collect();
    let files = f
        .files
        .iter()
        .map(|p| (std::fs::read(p).ok(), disk_view(Some(p), None)))
        .collect();
    let hosts = f
        .hosts
        .iter()
        .map(|h| (h.bytes(), disk_view(None, Some(h.bytes()))))
        .collect();
    Snap {
        images,
        files,
        hosts,
    }
}

/// Where two snapshots differ (images the call took are not compared).
fn diff(a: &Snap, b: &Snap) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (x, y)) in a.images.iter().zip(&b.images).enumerate() {
        if let (Some(x), Some(y)) = (x, y) {
            if x != y {
                out.push(format!("image {i}: before {x:?}\n  after {y:?}"));
            }
        }
    }
    for (i, (x, y)) in a.files.iter().zip(&b.files).enumerate() {
        if x.0 != y.0 {
            out.push(format!("file {i}: bytes changed"));
        }
        if x.1 != y.1 {
            out.push(format!(
                "file {i} on disk: before {:?}\n  after {:?}",
                x.1, y.1
            ));
        }
    }
    for (i, (x, y)) in a.hosts.iter().zip(&b.hosts).enumerate() {
        if x.0 != y.0 {
            out.push(format!("host {i}: bytes changed"));
        }
        if x.1 != y.1 {
            out.push(format!(
                "host {i} on disk: before {:?}\n  after {:?}",
                x.1, y.1
            ));
        }
    }
    out
}

fn teardown(mut f: Fx) {
    // SAFETY: every object was made by the setup and is freed once, iterators and
    // transactions before their images, images before their hosts.
    unsafe {
        for it in f.iters.drain(..) {
            qdirty_iter_free(it);
        }
        qdirty_backup_free(f.backup);
        if !f.txn.is_null() {
            qdirty_txn_abort(f.txn, ptr::null_mut());
            qdirty_txn_free(f.txn);
        }
        for (i, img) in f.imgs.iter().enumerate() {
            if !f.consumed.contains(&i) {
                qdirty_image_close(*img, ptr::null_mut());
            }
        }
        for (_, t) in &f.twins {
            qdirty_image_close(*t, ptr::null_mut());
        }
    }
    drop(f.hosts);
}

// ------------------------------------------------------------------------------------------
// The table
// ------------------------------------------------------------------------------------------

/// What a call returned: an integer (0/value or -errno) or whether a pointer was NULL.
enum Out {
    Rc(i64),
    Ptr(bool),
}

fn rc(v: impl Into<i64>) -> Out {
    Out::Rc(v.into())
}

fn null<T>(p: *mut T) -> Out {
    Out::Ptr(p.is_null())
}

type Setup = Box<dyn Fn(&mut Fx)>;
type Call = Box<dyn Fn(&mut Fx, Errp) -> Out>;

struct Row {
    export: &'static str,
    errno: &'static str,
    why: &'static str,
    msg: &'static str,
    setup: Setup,
    call: Call,
}

fn row(
    export: &'static str,
    errno: &'static str,
    why: &'static str,
    msg: &'static str,
    setup: impl Fn(&mut Fx) + 'static,
    call: impl Fn(&mut Fx, Errp) -> Out + 'static,
) -> Row {
    Row {
        export,
        errno,
        why,
        msg,
        setup: Box::new(setup),
        call: Box::new(call),
    }
}

fn none(_: &mut Fx) {}

/// The situations every function on one bitmap meets; the setup puts the bitmap in
/// `Fx::target`.
#[derive(Clone, Copy)]
enum On {
    /// A NULL bitmap (EINVAL).
    Null,
    /// The handle of a removed bitmap (ENOENT).
    Gone,
    /// A busy bitmap (EBUSY).
    Busy,
    /// A readonly bitmap (EPERM).
    Readonly,
    /// An inconsistent bitmap (EINVAL, QEMU's message and hint).
    Inconsistent,
}

/// The row of `export` in situation `on`, calling `call` on `Fx::target`.
fn on(export: &'static str, on: On, call: impl Fn(&mut Fx, Errp) -> Out + 'static) -> Row {
    let (errno, why, msg, setup): (_, _, _, fn(&mut Fx)) = match on {
        On::Null => ("EINVAL", "NULL bitmap", "bitmap must not be NULL", |f| {
            f.target = ptr::null_mut();
        }),
        On::Gone => (
            "ENOENT",
            "gone handle",
            "Bitmap 'g' no longer exists in its image",
            |f| {
                gone(f);
                f.target = f.h("g");
            },
        ),
        On::Busy => (
            "EBUSY",
            "busy bitmap",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "b");
                f.target = f.h("b");
            },
        ),
        On::Readonly => (
            "EPERM",
            "readonly bitmap",
            "Bitmap 'b' is readonly and cannot be modified",
            |f| {
                mem(f);
                set_readonly(f, "b", true);
                f.target = f.h("b");
            },
        ),
        On::Inconsistent => (
            "EINVAL",
            "inconsistent bitmap",
            "Bitmap 'b' is inconsistent and cannot be used",
            |f| {
                crashed(f);
                f.target = f.h("b");
            },
        ),
    };
    row(export, errno, why, msg, setup, call)
}

/// `on` for each situation in `ons`.
fn on_each(
    export: &'static str,
    ons: &[On],
    call: impl Fn(&mut Fx, Errp) -> Out + Clone + 'static,
) -> Vec<Row> {
    ons.iter().map(|&o| on(export, o, call.clone())).collect()
}

/// Every row. SAFETY of the calls: handles come from the row's setup and stay valid until the
/// teardown (gone handles included: the contract under test); strings are NUL-terminated
/// temporaries that live for the call; `e` points to a NULL error pointer.
fn rows() -> Vec<Row> {
    use qdirty::ffi::{
        QDIRTY_BITMAP_PERSISTENT as PERSISTENT, QDIRTY_OPEN_DURABLE as DURABLE,
        QDIRTY_OPEN_FORCE_SHARE as FS, QDIRTY_OPEN_RDWR as RW,
    };
    let mut v = vec![
        // qdirty_image_create
        row("qdirty_image_create", "EINVAL", "NULL path", "path must not be NULL", none, |_, e| {
            rc(unsafe { qdirty_image_create(ptr::null(), MIB, 0, e) })
        }),
        row("qdirty_image_create", "EINVAL", "empty path", "path must not be empty", none, |_, e| {
            rc(unsafe { qdirty_image_create(c("").as_ptr(), MIB, 0, e) })
        }),
        row(
            "qdirty_image_create",
            "EINVAL",
            "cluster size not a power of two",
            "Cluster size must be a power of two",
            |f| f.absent.push(f.dir.join("new.qcow2")),
            |f, e| {
                let p = c(f.absent[0].to_str().unwrap());
                rc(unsafe { qdirty_image_create(p.as_ptr(), MIB, 1000, e) })
            },
        ),
        row(
            "qdirty_image_create",
            "EFBIG",
            "an L1 table beyond QEMU's maximum",
            "too large for a cluster size of 512",
            |f| f.absent.push(f.dir.join("new.qcow2")),
            |f, e| {
                let p = c(f.absent[0].to_str().unwrap());
                rc(unsafe { qdirty_image_create(p.as_ptr(), 1 << 60, 512, e) })
            },
        ),
        row(
            "qdirty_image_create",
            "EEXIST",
            "the file exists",
            "Could not create",
            |f| {
                f.file(&templates().clean);
            },
            |f, e| rc(unsafe { qdirty_image_create(f.path(0).as_ptr(), MIB, 0, e) }),
        ),
        // qdirty_image_open
        row("qdirty_image_open", "EINVAL", "unknown flags", "unknown flags 0x100", |f| {
            f.file(&templates().clean);
        }, |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), 0x100, e) })),
        row("qdirty_image_open", "EINVAL", "RDWR with FORCE_SHARE", "force-share", |f| {
            f.file(&templates().clean);
        }, |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), RW | FS, e) })),
        row("qdirty_image_open", "EINVAL", "NULL path", "path must not be NULL", none, |_, e| {
            null(unsafe { qdirty_image_open(ptr::null(), 0, e) })
        }),
        row("qdirty_image_open", "EINVAL", "not a qcow2 file", "not in qcow2 format", |f| {
            f.file(&[0u8; 65536]);
        }, |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), 0, e) })),
        row(
            "qdirty_image_open",
            "EAGAIN",
            "opened read-write already",
            "is another process using the image",
            file_rw,
            |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), RW, e) }),
        ),
        row(
            "qdirty_image_open",
            "ENOTSUP",
            "an unknown incompatible feature",
            "Unsupported qcow2 feature(s)",
            |f| {
                f.file(&with_incompatible(&templates().clean, 1 << 30));
            },
            |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), 0, e) }),
        ),
        row(
            "qdirty_image_open",
            "EACCES",
            "a corrupt image opened read-write",
            "qemu-img check -r all",
            |f| {
                f.file(&with_incompatible(&templates().clean, 2));
            },
            |f, e| null(unsafe { qdirty_image_open(f.path(0).as_ptr(), RW, e) }),
        ),
        // qdirty_image_open_durable
        row("qdirty_image_open_durable", "EINVAL", "NULL path", "path must not be NULL", none, |_, e| {
            null(unsafe { qdirty_image_open_durable(ptr::null(), MIB, e) })
        }),
        row("qdirty_image_open_durable", "EINVAL", "zone size not a power of two", "zone size", |f| {
            f.file(&templates().clean);
        }, |f, e| null(unsafe { qdirty_image_open_durable(f.path(0).as_ptr(), 3 * MIB, e) })),
        row("qdirty_image_open_durable", "EINVAL", "not a qcow2 file", "not in qcow2 format", |f| {
            f.file(&[0u8; 65536]);
        }, |f, e| null(unsafe { qdirty_image_open_durable(f.path(0).as_ptr(), MIB, e) })),
        row(
            "qdirty_image_open_durable",
            "EAGAIN",
            "opened read-write already",
            "is another process using the image",
            file_rw,
            |f, e| null(unsafe { qdirty_image_open_durable(f.path(0).as_ptr(), MIB, e) }),
        ),
        row(
            "qdirty_image_open_durable",
            "ENOTSUP",
            "an unknown incompatible feature",
            "Unsupported qcow2 feature(s)",
            |f| {
                f.file(&with_incompatible(&templates().clean, 1 << 30));
            },
            |f, e| null(unsafe { qdirty_image_open_durable(f.path(0).as_ptr(), MIB, e) }),
        ),
        row(
            "qdirty_image_open_durable",
            "EACCES",
            "a corrupt image",
            "qemu-img check -r all",
            |f| {
                f.file(&with_incompatible(&templates().clean, 2));
            },
            |f, e| null(unsafe { qdirty_image_open_durable(f.path(0).as_ptr(), MIB, e) }),
        ),
        // qdirty_image_prepare_write
        row("qdirty_image_prepare_write", "EINVAL", "NULL image", "img must not be NULL", none, |_, e| {
            rc(unsafe { qdirty_image_prepare_write(ptr::null_mut(), 0, 4096, e) })
        }),
        row(
            "qdirty_image_prepare_write",
            "EINVAL",
            "a write past the end of the disk",
            "ends past the end of the disk",
            |f| {
                f.open_host(&templates().clean, RW | DURABLE);
            },
            |f, e| rc(unsafe { qdirty_image_prepare_write(f.img(0), SIZE - 4096, 8192, e) }),
        ),
        row(
            "qdirty_image_prepare_write",
            "EIO",
            "the zone cannot be written into the bitmaps",
            "Could not mark a guest write at offset 0",
            |f| {
                f.open_host(&templates().clean, RW | DURABLE);
                f.hosts[0].fail_writes.store(true, Ordering::SeqCst);
            },
            |f, e| rc(unsafe { qdirty_image_prepare_write(f.img(0), 0, 4096, e) }),
        ),
        row(
            "qdirty_image_prepare_write",
            "ENOSPC",
            "no space for the zone's bits",
            "Could not mark a guest write at offset 0",
            |f| {
                f.open_host(&templates().clean, RW | DURABLE);
                f.hosts[0].write_errno.store(libc::ENOSPC, Ordering::SeqCst);
                f.hosts[0].fail_writes.store(true, Ordering::SeqCst);
            },
            |f, e| rc(unsafe { qdirty_image_prepare_write(f.img(0), 0, 4096, e) }),
        ),
        // qdirty_image_close
        row("qdirty_image_close", "EINVAL", "NULL image", "img must not be NULL", none, |_, e| {
            rc(unsafe { qdirty_image_close(ptr::null_mut(), e) })
        }),
        row(
            "qdirty_image_close",
            "EINVAL",
            "not an image",
            "img is not an open qdirty_image",
            none,
            |f, e| rc(unsafe { qdirty_image_close(f.bogus.as_mut_ptr().cast(), e) }),
        ),
        row(
            "qdirty_image_close",
            "EIO",
            "the final store cannot write",
            "Failed to write bitmap 'b'",
            |f| {
                let i = f.open_host(&templates().clean, RW);
                let mut err = ptr::null_mut();
                // SAFETY: "b" belongs to the open image.
                let r = unsafe { qdirty_bitmap_set_dirty(f.h("b"), 30 * MIB, 1, &mut err) };
                ok(r, "set_dirty", err);
                // SAFETY: the image is open.
                let r = unsafe { qdirty_image_store_bitmaps(f.img(i), &mut err) };
                ok(r, "store", err);
                // SAFETY: as above.
                let r = unsafe { qdirty_bitmap_set_dirty(f.h("b"), 40 * MIB, 1, &mut err) };
                ok(r, "set_dirty", err);
                f.hosts[0].fail_writes.store(true, Ordering::SeqCst);
            },
            |f, e| {
                f.consumed.push(0);
                rc(unsafe { qdirty_image_close(f.img(0), e) })
            },
        ),
        // qdirty_image_store_bitmaps
        row("qdirty_image_store_bitmaps", "EINVAL", "NULL image", "img must not be NULL", none, |_, e| {
            rc(unsafe { qdirty_image_store_bitmaps(ptr::null_mut(), e) })
        }),
        row("qdirty_image_store_bitmaps", "EROFS", "read-only image", "read-only", file_ro, |f, e| {
            rc(unsafe { qdirty_image_store_bitmaps(f.img(0), e) })
        }),
        row(
            "qdirty_image_store_bitmaps",
            "ENOTSUP",
            "standalone image",
            "Standalone bitmaps have no image to store to",
            |f| {
                mem(f);
            },
            |f, e| rc(unsafe { qdirty_image_store_bitmaps(f.img(0), e) }),
        ),
        // qdirty_image_add_bitmap
        row("qdirty_image_add_bitmap", "EINVAL", "unknown flags", "unknown flags 0x8", |f| {
            mem(f);
        }, |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 0, 8, e) })),
        row("qdirty_image_add_bitmap", "EINVAL", "NULL image", "img must not be NULL", none, |_, e| {
            null(unsafe { qdirty_image_add_bitmap(ptr::null_mut(), c("n").as_ptr(), 0, 0, e) })
        }),
        row("qdirty_image_add_bitmap", "EINVAL", "NULL name", "name must not be NULL", |f| {
            mem(f);
        }, |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), ptr::null(), 0, 0, e) })),
        row("qdirty_image_add_bitmap", "EINVAL", "empty name", "Bitmap name cannot be empty", |f| {
            mem(f);
        }, |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), c("").as_ptr(), 0, 0, e) })),
        row("qdirty_image_add_bitmap", "EINVAL", "name of 1024 bytes", "Bitmap name too long", |f| {
            mem(f);
        }, |f, e| {
            let n = c(&"n".repeat(1024));
            null(unsafe { qdirty_image_add_bitmap(f.img(0), n.as_ptr(), 0, 0, e) })
        }),
        row(
            "qdirty_image_add_bitmap",
            "EINVAL",
            "granularity not a power of two",
            "Granularity must be power of 2",
            |f| {
                mem(f);
            },
            |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 1000, 0, e) }),
        ),
        row("qdirty_image_add_bitmap", "EEXIST", "duplicate name", "Bitmap already exists: b", |f| {
            mem(f);
        }, |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), c("b").as_ptr(), 0, 0, e) })),
        row(
            "qdirty_image_add_bitmap",
            "EEXIST",
            "the name of an inconsistent bitmap",
            "Bitmap already exists: b",
            crashed,
            |f, e| null(unsafe { qdirty_image_add_bitmap(f.img(0), c("b").as_ptr(), 0, 0, e) }),
        ),
        row(
            "qdirty_image_add_bitmap",
            "EROFS",
            "persistent on a read-only image",
            "Can't make bitmap 'n' persistent in",
            file_ro,
            |f, e| {
                null(unsafe { qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 0, PERSISTENT, e) })
            },
        ),
        row(
            "qdirty_image_add_bitmap",
            "ENOTSUP",
            "persistent on a standalone image",
            "Can't store persistent bitmaps to standalone bitmaps",
            |f| {
                mem(f);
            },
            |f, e| {
                null(unsafe { qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 0, PERSISTENT, e) })
            },
        ),
        row(
            "qdirty_image_add_bitmap",
            "ENOTSUP",
            "persistent on a qcow2 v2 image",
            "Cannot store dirty bitmaps in qcow2 v2 files",
            |f| {
                let i = f.file(&templates().v2);
                f.open(i, 0);
            },
            |f, e| {
                null(unsafe { qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 0, PERSISTENT, e) })
            },
        ),
        row(
            "qdirty_image_add_bitmap",
            "EFBIG",
            "persistent, more data than QEMU stores",
            "Too much space will be occupied by the bitmap",
            |f| {
                let i = f.file(&templates().huge);
                f.open(i, RW);
            },
            |f, e| {
                null(unsafe {
                    qdirty_image_add_bitmap(f.img(0), c("n").as_ptr(), 512, PERSISTENT, e)
                })
            },
        ),
        // qdirty_image_remove_bitmap
        row("qdirty_image_remove_bitmap", "EINVAL", "NULL name", "name must not be NULL", |f| {
            mem(f);
        }, |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), ptr::null(), e) })),
        row("qdirty_image_remove_bitmap", "ENOENT", "no such bitmap", "Dirty bitmap 'x' not found", file_rw, |f, e| {
            rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("x").as_ptr(), e) })
        }),
        row(
            "qdirty_image_remove_bitmap",
            "EBUSY",
            "busy bitmap",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                file_rw(f);
                set_busy(f, "b");
            },
            |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
        ),
        row(
            "qdirty_image_remove_bitmap",
            "EBUSY",
            "frozen with a successor",
            "Bitmap 'b' is currently in use",
            |f| {
                file_rw(f);
                successor(f, "b");
            },
            |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
        ),
        row(
            "qdirty_image_remove_bitmap",
            "EBUSY",
            "live iterator",
            "Bitmap 'b' cannot be released while iterators on it are alive",
            |f| {
                file_rw(f);
                iterate(f, "b");
            },
            |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
        ),
        row(
            "qdirty_image_remove_bitmap",
            "EPERM",
            "readonly bitmap (read-only image)",
            "Bitmap 'b' is readonly and cannot be modified",
            file_ro,
            |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
        ),
        row(
            "qdirty_image_remove_bitmap",
            "EROFS",
            "writable bitmap stored in a read-only image",
            "No write access",
            |f| {
                file_ro(f);
                set_readonly(f, "b", false);
            },
            |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
        ),
        // qdirty_image_merge_bitmap
        row("qdirty_image_merge_bitmap", "EINVAL", "NULL target", "target must not be NULL", |f| {
            mem(f);
        }, |f, e| {
            rc(unsafe {
                qdirty_image_merge_bitmap(f.img(0), ptr::null(), ptr::null_mut(), c("c").as_ptr(), e)
            })
        }),
        row(
            "qdirty_image_merge_bitmap",
            "EINVAL",
            "different sizes",
            "Bitmaps are of different sizes (destination size is 67108864, source size is 33554432)",
            |f| {
                mem(f);
                let i = bare(f, SIZE / 2);
                f.add(i, "s", G as u32);
            },
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), f.img(1), c("s").as_ptr(), e)
                })
            },
        ),
        row(
            "qdirty_image_merge_bitmap",
            "EINVAL",
            "inconsistent source",
            "Bitmap 'b' is inconsistent and cannot be used",
            crashed,
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("t").as_ptr(), ptr::null_mut(), c("b").as_ptr(), e)
                })
            },
        ),
        row(
            "qdirty_image_merge_bitmap",
            "EINVAL",
            "inconsistent target",
            "Bitmap 'b' is inconsistent and cannot be used",
            crashed,
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), ptr::null_mut(), c("t").as_ptr(), e)
                })
            },
        ),
        row("qdirty_image_merge_bitmap", "ENOENT", "no such target", "Dirty bitmap 'x' not found", |f| {
            mem(f);
        }, |f, e| {
            rc(unsafe {
                qdirty_image_merge_bitmap(f.img(0), c("x").as_ptr(), ptr::null_mut(), c("c").as_ptr(), e)
            })
        }),
        row("qdirty_image_merge_bitmap", "ENOENT", "no such source", "Dirty bitmap 'x' not found", |f| {
            mem(f);
        }, |f, e| {
            rc(unsafe {
                qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), ptr::null_mut(), c("x").as_ptr(), e)
            })
        }),
        row(
            "qdirty_image_merge_bitmap",
            "EBUSY",
            "busy target",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "b");
            },
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), ptr::null_mut(), c("c").as_ptr(), e)
                })
            },
        ),
        row(
            "qdirty_image_merge_bitmap",
            "EBUSY",
            "busy source",
            "Bitmap 'c' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "c");
            },
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), ptr::null_mut(), c("c").as_ptr(), e)
                })
            },
        ),
        row(
            "qdirty_image_merge_bitmap",
            "EPERM",
            "readonly target",
            "Bitmap 'b' is readonly and cannot be modified",
            |f| {
                mem(f);
                set_readonly(f, "b", true);
            },
            |f, e| {
                rc(unsafe {
                    qdirty_image_merge_bitmap(f.img(0), c("b").as_ptr(), ptr::null_mut(), c("c").as_ptr(), e)
                })
            },
        ),
    ];
    v.extend(bitmap_rows());
    v.extend(mirror_rows());
    v.extend(image_rows());
    v.extend(txn_rows());
    v.extend(io_rows());
    v.extend(read_error_rows());
    v
}

/// Rows of the calls that need a bitmap's data while it cannot be read (a host whose reads
/// fail): EIO naming the bitmap, and nothing changed.
fn read_error_rows() -> Vec<Row> {
    let rw = |f: &mut Fx| {
        unreadable_rw(f);
        txn(f);
    };
    let written = |f: &mut Fx| {
        unreadable_rw(f);
        hook_writes(f);
    };
    let mut v = Vec::new();
    let mut add = |export, why, setup: fn(&mut Fx), call: fn(&mut Fx, Errp) -> Out| {
        v.push(row(
            export,
            "EIO",
            why,
            "Could not read bitmap 'b'",
            setup,
            call,
        ));
    };
    add(
        "qdirty_bitmap_reset_dirty",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_bitmap_reset_dirty(f.target, 0, G, e) }),
    );
    add("qdirty_bitmap_clear", "data unreadable", rw, |f, e| {
        rc(unsafe { qdirty_bitmap_clear(f.target, e) })
    });
    add(
        "qdirty_bitmap_clear_with_backup",
        "data unreadable",
        rw,
        |f, e| {
            let mut bk = ptr::null_mut();
            rc(unsafe { qdirty_bitmap_clear_with_backup(f.target, &mut bk, e) })
        },
    );
    add(
        "qdirty_bitmap_merge",
        "source data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_bitmap_merge(f.h("c"), f.target, ptr::null_mut(), e) }),
    );
    add(
        "qdirty_image_merge_bitmap",
        "source data unreadable",
        rw,
        |f, e| {
            rc(unsafe {
                qdirty_image_merge_bitmap(
                    f.img(0),
                    c("c").as_ptr(),
                    ptr::null_mut(),
                    c("b").as_ptr(),
                    e,
                )
            })
        },
    );
    add(
        "qdirty_txn_merge_bitmap",
        "source data unreadable",
        rw,
        |f, e| {
            rc(unsafe {
                qdirty_txn_merge_bitmap(
                    f.txn,
                    f.img(0),
                    c("c").as_ptr(),
                    ptr::null_mut(),
                    c("b").as_ptr(),
                    e,
                )
            })
        },
    );
    add("qdirty_txn_clear_bitmap", "data unreadable", rw, |f, e| {
        rc(unsafe { qdirty_txn_clear_bitmap(f.txn, f.img(0), c("b").as_ptr(), e) })
    });
    add("qdirty_txn_remove_bitmap", "data unreadable", rw, |f, e| {
        rc(unsafe { qdirty_txn_remove_bitmap(f.txn, f.img(0), c("b").as_ptr(), e) })
    });
    add(
        "qdirty_image_remove_bitmap",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_image_remove_bitmap(f.img(0), c("b").as_ptr(), e) }),
    );
    add(
        "qdirty_image_remove_stored_bitmap",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_image_remove_stored_bitmap(f.img(0), c("b").as_ptr(), e) }),
    );
    add(
        "qdirty_bitmap_serialization_size",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_bitmap_serialization_size(f.target, 0, ALIGN, e) }),
    );
    add(
        "qdirty_bitmap_serialize_part",
        "data unreadable",
        rw,
        |f, e| {
            let mut b = [0u8; 64];
            rc(unsafe { qdirty_bitmap_serialize_part(f.target, b.as_mut_ptr(), 64, 0, ALIGN, e) })
        },
    );
    add(
        "qdirty_bitmap_deserialize_part",
        "data unreadable",
        rw,
        |f, e| {
            let b = [0u8; 64];
            rc(unsafe {
                qdirty_bitmap_deserialize_part(f.target, b.as_ptr(), 64, 0, ALIGN, true, e)
            })
        },
    );
    add(
        "qdirty_bitmap_deserialize_zeroes",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_bitmap_deserialize_zeroes(f.target, 0, ALIGN, true, e) }),
    );
    add(
        "qdirty_bitmap_deserialize_ones",
        "data unreadable",
        rw,
        |f, e| rc(unsafe { qdirty_bitmap_deserialize_ones(f.target, 0, ALIGN, true, e) }),
    );
    add(
        "qdirty_image_store_bitmaps",
        "written data unreadable",
        written,
        |f, e| rc(unsafe { qdirty_image_store_bitmaps(f.img(0), e) }),
    );
    add(
        "qdirty_image_reopen",
        "written data unreadable (to read-only)",
        written,
        |f, e| rc(unsafe { qdirty_image_reopen(f.img(0), 0, e) }),
    );
    add(
        "qdirty_image_store_space",
        "written data unreadable",
        written,
        |f, e| {
            rc(unsafe {
                qdirty_image_store_space(
                    f.img(0),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    e,
                )
            })
        },
    );
    v.push(row(
        "qdirty_image_truncate",
        "EIO",
        "image unreadable",
        "Could not read the qcow2 header",
        unreadable_rw,
        |f, e| rc(unsafe { qdirty_image_truncate(f.img(0), SIZE, e) }),
    ));
    v.push(row(
        "qdirty_image_truncate",
        "ENOTSUP",
        "an image in durable mode",
        "in durable mode",
        |f| {
            let i = f.file(&templates().clean);
            f.open(
                i,
                qdirty::ffi::QDIRTY_OPEN_RDWR | qdirty::ffi::QDIRTY_OPEN_DURABLE,
            );
        },
        |f, e| rc(unsafe { qdirty_image_truncate(f.img(0), SIZE, e) }),
    ));
    v
}

fn bitmap_rows() -> Vec<Row> {
    use On::*;
    let mut v = Vec::new();
    v.extend(on_each(
        "qdirty_bitmap_enable",
        &[Null, Inconsistent, Gone, Busy],
        |f, e| rc(unsafe { qdirty_bitmap_enable(f.target, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_disable",
        &[Null, Inconsistent, Gone, Busy],
        |f, e| rc(unsafe { qdirty_bitmap_disable(f.target, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_set_dirty",
        &[Null, Inconsistent, Readonly, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_set_dirty(f.target, 0, 1, e) }),
    ));
    v.push(row(
        "qdirty_bitmap_set_dirty",
        "EINVAL",
        "range beyond the size",
        "set range [67104768, +8192) is beyond its size 67108864",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_set_dirty(f.h("b"), SIZE - 4096, 8192, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_reset_dirty",
        &[Null, Inconsistent, Readonly, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_reset_dirty(f.target, 0, G, e) }),
    ));
    for (why, off, len, msg) in [
        (
            "unaligned offset",
            4096,
            G,
            "reset offset 4096 is not a multiple of the granularity 65536",
        ),
        (
            "unaligned length",
            0,
            4096,
            "reset length 4096 is not a multiple of the granularity 65536",
        ),
        (
            "range beyond the size",
            SIZE - G,
            2 * G,
            "is beyond its size 67108864",
        ),
    ] {
        v.push(row(
            "qdirty_bitmap_reset_dirty",
            "EINVAL",
            why,
            msg,
            |f| {
                mem(f);
            },
            move |f, e| rc(unsafe { qdirty_bitmap_reset_dirty(f.h("b"), off, len, e) }),
        ));
    }
    v.extend(on_each(
        "qdirty_bitmap_clear",
        &[Null, Inconsistent, Readonly, Busy, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_clear(f.target, e) }),
    ));
    let sha = |f: &mut Fx, e| null(unsafe { qdirty_bitmap_sha256(f.target, e) });
    v.extend(on_each(
        "qdirty_bitmap_sha256",
        &[Null, Inconsistent, Gone],
        sha,
    ));
    v.push(row(
        "qdirty_bitmap_sha256",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        sha,
    ));
    let extents = |f: &mut Fx, e| {
        let (mut out, mut n) = ([qdirty_extent::default(); 4], 7usize);
        let r = unsafe {
            qdirty_bitmap_dirty_extents(f.target, 0, u64::MAX, out.as_mut_ptr(), 4, &mut n, e)
        };
        assert_eq!(n, 0, "*n after a failure");
        rc(r)
    };
    v.extend(on_each(
        "qdirty_bitmap_dirty_extents",
        &[Null, Inconsistent, Gone],
        extents,
    ));
    v.push(row(
        "qdirty_bitmap_dirty_extents",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        extents,
    ));
    v.push(row(
        "qdirty_bitmap_dirty_extents",
        "EINVAL",
        "NULL n",
        "n must not be NULL",
        |f| {
            mem(f);
        },
        |f, e| {
            let mut out = [qdirty_extent::default(); 4];
            rc(unsafe {
                qdirty_bitmap_dirty_extents(
                    f.h("b"),
                    0,
                    SIZE,
                    out.as_mut_ptr(),
                    4,
                    ptr::null_mut(),
                    e,
                )
            })
        },
    ));
    v.push(row(
        "qdirty_bitmap_dirty_extents",
        "EINVAL",
        "NULL out",
        "out must not be NULL",
        |f| {
            mem(f);
        },
        |f, e| {
            let mut n = 0;
            rc(unsafe {
                qdirty_bitmap_dirty_extents(f.h("b"), 0, SIZE, ptr::null_mut(), 4, &mut n, e)
            })
        },
    ));
    v.push(row(
        "qdirty_bitmap_dirty_extents",
        "EINVAL",
        "max 0",
        "max must be at least 1",
        |f| {
            mem(f);
        },
        |f, e| {
            let (mut out, mut n) = ([qdirty_extent::default(); 4], 0);
            rc(unsafe {
                qdirty_bitmap_dirty_extents(f.h("b"), 0, SIZE, out.as_mut_ptr(), 0, &mut n, e)
            })
        },
    ));
    // qdirty_bitmap_check
    v.push(on("qdirty_bitmap_check", Busy, |f, e| {
        rc(unsafe { qdirty_bitmap_check(f.target, QDIRTY_CHECK_BUSY, e) })
    }));
    v.push(on("qdirty_bitmap_check", Readonly, |f, e| {
        rc(unsafe { qdirty_bitmap_check(f.target, QDIRTY_CHECK_DEFAULT, e) })
    }));
    v.push(on("qdirty_bitmap_check", Inconsistent, |f, e| {
        rc(unsafe { qdirty_bitmap_check(f.target, QDIRTY_CHECK_INCONSISTENT, e) })
    }));
    v.push(on("qdirty_bitmap_check", Null, |f, e| {
        rc(unsafe { qdirty_bitmap_check(f.target, 0, e) })
    }));
    v.push(on("qdirty_bitmap_check", Gone, |f, e| {
        rc(unsafe { qdirty_bitmap_check(f.target, QDIRTY_CHECK_ALLOW_RO, e) })
    }));
    v.push(row(
        "qdirty_bitmap_check",
        "EINVAL",
        "unknown flags",
        "unknown flags 0x8",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_check(f.h("b"), 8, e) }),
    ));
    v.push(row(
        "qdirty_bitmap_check",
        "EIO",
        "INCONSISTENT with the data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        |f, e| rc(unsafe { qdirty_bitmap_check(f.target, QDIRTY_CHECK_INCONSISTENT, e) }),
    ));
    // The setters without checks.
    v.extend(on_each("qdirty_bitmap_set_busy", &[Null, Gone], |f, e| {
        rc(unsafe { qdirty_bitmap_set_busy(f.target, true, e) })
    }));
    v.extend(on_each(
        "qdirty_bitmap_set_readonly",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_set_readonly(f.target, true, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_set_persistence",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_set_persistence(f.target, true, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_set_skip_store",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_set_skip_store(f.target, true, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_set_inconsistent",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_set_inconsistent(f.target, e) }),
    ));
    v.push(row(
        "qdirty_bitmap_set_inconsistent",
        "EINVAL",
        "transient bitmap",
        "Bitmap 'b' is not persistent and cannot be marked inconsistent",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_set_inconsistent(f.h("b"), e) }),
    ));
    v
}

/// Rows of the rest of QEMU's dirty-bitmap API: create/release, successors, backups, merge of
/// any two bitmaps, iterators, status, serialization.
fn mirror_rows() -> Vec<Row> {
    use On::*;
    let mut v = Vec::new();
    // qdirty_image_create_bitmap
    v.push(row(
        "qdirty_image_create_bitmap",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        none,
        |_, e| null(unsafe { qdirty_image_create_bitmap(ptr::null_mut(), ptr::null(), 0, e) }),
    ));
    v.push(row(
        "qdirty_image_create_bitmap",
        "EINVAL",
        "empty name",
        "Bitmap name cannot be empty",
        |f| {
            mem(f);
        },
        |f, e| null(unsafe { qdirty_image_create_bitmap(f.img(0), c("").as_ptr(), 0, e) }),
    ));
    v.push(row(
        "qdirty_image_create_bitmap",
        "EINVAL",
        "granularity below 512",
        "Granularity must be power of 2 and at least 512 (got 256)",
        |f| {
            mem(f);
        },
        |f, e| null(unsafe { qdirty_image_create_bitmap(f.img(0), ptr::null(), 256, e) }),
    ));
    v.push(row(
        "qdirty_image_create_bitmap",
        "EEXIST",
        "duplicate name",
        "Bitmap already exists: b",
        |f| {
            mem(f);
        },
        |f, e| null(unsafe { qdirty_image_create_bitmap(f.img(0), c("b").as_ptr(), 0, e) }),
    ));
    v.push(row(
        "qdirty_image_create_bitmap",
        "EFBIG",
        "more granules than a bitmap holds",
        "the maximum is",
        |f| {
            bare(f, 1 << 62);
        },
        |f, e| null(unsafe { qdirty_image_create_bitmap(f.img(0), ptr::null(), 512, e) }),
    ));
    // qdirty_bitmap_release
    v.extend(on_each("qdirty_bitmap_release", &[Null, Gone], |f, e| {
        rc(unsafe { qdirty_bitmap_release(f.target, e) })
    }));
    for (why, msg, setup) in [
        (
            "busy bitmap",
            "Bitmap 'b' cannot be released while an operation holds it",
            (|f: &mut Fx| {
                mem(f);
                set_busy(f, "b");
                f.target = f.h("b");
            }) as fn(&mut Fx),
        ),
        (
            "frozen bitmap (busy cleared)",
            "Bitmap 'b' cannot be released while it has a successor",
            |f| {
                mem(f);
                successor(f, "b");
                // SAFETY: "b" belongs to the open image.
                unsafe { qdirty_bitmap_set_busy(f.h("b"), false, ptr::null_mut()) };
                f.target = f.h("b");
            },
        ),
        (
            "live iterator",
            "Bitmap 'b' cannot be released while iterators on it are alive",
            |f| {
                mem(f);
                iterate(f, "b");
                f.target = f.h("b");
            },
        ),
        ("a successor", "it is a successor", |f| {
            mem(f);
            f.target = successor(f, "b");
        }),
    ] {
        v.push(row(
            "qdirty_bitmap_release",
            "EBUSY",
            why,
            msg,
            setup,
            |f, e| rc(unsafe { qdirty_bitmap_release(f.target, e) }),
        ));
    }
    // Successors.
    v.extend(on_each(
        "qdirty_bitmap_create_successor",
        &[Null, Gone, Busy],
        |f, e| null(unsafe { qdirty_bitmap_create_successor(f.target, e) }),
    ));
    v.push(row(
        "qdirty_bitmap_create_successor",
        "EINVAL",
        "a successor already (busy cleared)",
        "Cannot create a successor for a bitmap that already has one",
        |f| {
            mem(f);
            successor(f, "b");
            // SAFETY: "b" belongs to the open image.
            unsafe { qdirty_bitmap_set_busy(f.h("b"), false, ptr::null_mut()) };
        },
        |f, e| null(unsafe { qdirty_bitmap_create_successor(f.h("b"), e) }),
    ));
    v.extend(on_each("qdirty_bitmap_abdicate", &[Null, Gone], |f, e| {
        null(unsafe { qdirty_bitmap_abdicate(f.target, e) })
    }));
    v.push(row(
        "qdirty_bitmap_abdicate",
        "EINVAL",
        "no successor",
        "Cannot relinquish control if there's no successor present",
        |f| {
            mem(f);
        },
        |f, e| null(unsafe { qdirty_bitmap_abdicate(f.h("b"), e) }),
    ));
    v.push(row(
        "qdirty_bitmap_abdicate",
        "EBUSY",
        "live iterator on the bitmap",
        "Bitmap 'b' cannot be released while iterators on it are alive",
        |f| {
            mem(f);
            successor(f, "b");
            iterate(f, "b");
        },
        |f, e| null(unsafe { qdirty_bitmap_abdicate(f.h("b"), e) }),
    ));
    v.extend(on_each("qdirty_bitmap_reclaim", &[Null, Gone], |f, e| {
        null(unsafe { qdirty_bitmap_reclaim(f.target, e) })
    }));
    v.push(row(
        "qdirty_bitmap_reclaim",
        "EINVAL",
        "no successor",
        "Cannot reclaim a successor when none is present",
        |f| {
            mem(f);
        },
        |f, e| null(unsafe { qdirty_bitmap_reclaim(f.h("b"), e) }),
    ));
    v.push(row(
        "qdirty_bitmap_reclaim",
        "EBUSY",
        "live iterator on the successor",
        "iterators on it are alive",
        |f| {
            mem(f);
            successor(f, "b");
            iterate(f, "succ");
        },
        |f, e| null(unsafe { qdirty_bitmap_reclaim(f.h("b"), e) }),
    ));
    v.push(row(
        "qdirty_bitmap_reclaim",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        |f| {
            unreadable_after(f, 0, |img| {
                // SAFETY: the image is open; "b" is one of its bitmaps.
                unsafe {
                    let b = qdirty_image_find_bitmap(img, c("b").as_ptr());
                    assert!(!qdirty_bitmap_create_successor(b, ptr::null_mut()).is_null());
                }
            })
        },
        |f, e| null(unsafe { qdirty_bitmap_reclaim(f.target, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_enable_successor",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_enable_successor(f.target, e) }),
    ));
    v.push(row(
        "qdirty_bitmap_enable_successor",
        "EINVAL",
        "no successor",
        "The bitmap has no successor to enable",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_enable_successor(f.h("b"), e) }),
    ));
    // Backups.
    let cwb = |f: &mut Fx, e| {
        let mut bk = ptr::dangling_mut::<qdirty_backup>();
        let r = unsafe { qdirty_bitmap_clear_with_backup(f.target, &mut bk, e) };
        assert!(bk.is_null(), "*backup after a failure");
        rc(r)
    };
    v.extend(on_each(
        "qdirty_bitmap_clear_with_backup",
        &[Null, Inconsistent, Busy, Readonly, Gone],
        cwb,
    ));
    v.push(row(
        "qdirty_bitmap_clear_with_backup",
        "EINVAL",
        "NULL backup",
        "backup must not be NULL",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_clear_with_backup(f.h("b"), ptr::null_mut(), e) }),
    ));
    let restore = |f: &mut Fx, e| rc(unsafe { qdirty_bitmap_restore(f.target, f.backup, e) });
    for (errno, why, msg, setup) in [
        (
            "EINVAL",
            "NULL bitmap",
            "bitmap must not be NULL",
            (|f: &mut Fx| {
                mem(f);
                backup_of(f, "b");
                f.target = ptr::null_mut();
            }) as fn(&mut Fx),
        ),
        ("EINVAL", "NULL backup", "backup must not be NULL", |f| {
            mem(f);
            f.target = f.h("b");
        }),
        (
            "EINVAL",
            "an empty (restored) backup",
            "the backup is empty",
            |f| {
                mem(f);
                backup_of(f, "b");
                // SAFETY: the backup came from "b".
                let r = unsafe { qdirty_bitmap_restore(f.h("b"), f.backup, ptr::null_mut()) };
                assert_eq!(r, 0);
                f.target = f.h("b");
            },
        ),
        (
            "EINVAL",
            "a backup of another granularity",
            "the backup has another size or granularity",
            |f| {
                mem(f);
                f.add(0, "x", 4096);
                backup_of(f, "x");
                f.target = f.h("b");
            },
        ),
        (
            "EPERM",
            "readonly bitmap",
            "Bitmap 'b' is readonly and cannot be modified",
            |f| {
                mem(f);
                backup_of(f, "b");
                set_readonly(f, "b", true);
                f.target = f.h("b");
            },
        ),
        (
            "ENOENT",
            "gone handle",
            "Bitmap 'g' no longer exists in its image",
            |f| {
                mem(f);
                f.add(0, "g", G as u32);
                backup_of(f, "g");
                // SAFETY: the image is open.
                let r = unsafe {
                    qdirty_image_remove_bitmap(f.img(0), c("g").as_ptr(), ptr::null_mut())
                };
                assert_eq!(r, 0);
                f.target = f.h("g");
            },
        ),
    ] {
        v.push(row(
            "qdirty_bitmap_restore",
            errno,
            why,
            msg,
            setup,
            restore,
        ));
    }
    // qdirty_bitmap_merge(dest, src)
    let merge = |f: &mut Fx, e| {
        let mut bk = ptr::dangling_mut::<qdirty_backup>();
        let (d, s) = (f.target, f.h.get("src").copied().unwrap_or(ptr::null_mut()));
        let r = unsafe { qdirty_bitmap_merge(d, s, &mut bk, e) };
        assert!(bk.is_null(), "*backup after a failure");
        rc(r)
    };
    for (errno, why, msg, setup) in [
        (
            "EINVAL",
            "NULL dest",
            "bitmap must not be NULL",
            (|f: &mut Fx| {
                mem(f);
                f.h.insert("src", f.h("c"));
            }) as fn(&mut Fx),
        ),
        ("EINVAL", "NULL src", "bitmap must not be NULL", |f| {
            mem(f);
            f.target = f.h("b");
        }),
        (
            "EINVAL",
            "different sizes",
            "Bitmaps are of different sizes (destination size is 67108864, source size is 33554432)",
            |f| {
                mem(f);
                let i = bare(f, SIZE / 2);
                let s = f.add(i, "s", G as u32);
                f.h.insert("src", s);
                f.target = f.h("b");
            },
        ),
        (
            "EINVAL",
            "inconsistent source",
            "Bitmap 'b' is inconsistent and cannot be used",
            |f| {
                crashed(f);
                f.h.insert("src", f.h("b"));
                f.target = f.h("t");
            },
        ),
        (
            "EINVAL",
            "inconsistent dest",
            "Bitmap 'b' is inconsistent and cannot be used",
            |f| {
                crashed(f);
                f.h.insert("src", f.h("t"));
                f.target = f.h("b");
            },
        ),
        (
            "EBUSY",
            "busy dest",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "b");
                f.h.insert("src", f.h("c"));
                f.target = f.h("b");
            },
        ),
        (
            "EBUSY",
            "busy src",
            "Bitmap 'c' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "c");
                f.h.insert("src", f.h("c"));
                f.target = f.h("b");
            },
        ),
        (
            "EPERM",
            "readonly dest",
            "Bitmap 'b' is readonly and cannot be modified",
            |f| {
                mem(f);
                set_readonly(f, "b", true);
                f.h.insert("src", f.h("c"));
                f.target = f.h("b");
            },
        ),
        (
            "ENOENT",
            "dest gone",
            "Bitmap 'g' no longer exists in its image",
            |f| {
                gone(f);
                f.h.insert("src", f.h("c"));
                f.target = f.h("g");
            },
        ),
        (
            "ENOENT",
            "src gone",
            "Bitmap 'g' no longer exists in its image",
            |f| {
                gone(f);
                f.h.insert("src", f.h("g"));
                f.target = f.h("b");
            },
        ),
    ] {
        v.push(row("qdirty_bitmap_merge", errno, why, msg, setup, merge));
    }
    // Iterators.
    let iter_new = |f: &mut Fx, e| null(unsafe { qdirty_bitmap_iter_new(f.target, e) });
    v.extend(on_each(
        "qdirty_bitmap_iter_new",
        &[Null, Inconsistent, Gone],
        iter_new,
    ));
    v.push(row(
        "qdirty_bitmap_iter_new",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        iter_new,
    ));
    v.push(row(
        "qdirty_iter_seek",
        "EINVAL",
        "NULL iterator",
        "iter must not be NULL",
        none,
        |_, e| rc(unsafe { qdirty_iter_seek(ptr::null_mut(), 0, e) }),
    ));
    v.push(row(
        "qdirty_iter_seek",
        "EINVAL",
        "offset at the size",
        "iterator position 67108864 is beyond its size 67108864",
        |f| {
            mem(f);
            iterate(f, "b");
        },
        |f, e| rc(unsafe { qdirty_iter_seek(f.iters[0], SIZE, e) }),
    ));
    v.push(row(
        "qdirty_iter_seek",
        "ENOENT",
        "the bitmap went away with an aborted transaction",
        "no longer exists",
        |f| {
            mem(f);
            txn(f);
            // SAFETY: the transaction and the image are live.
            let t = unsafe {
                qdirty_txn_add_bitmap(f.txn, f.img(0), c("t").as_ptr(), 0, 0, ptr::null_mut())
            };
            assert!(!t.is_null());
            f.h.insert("t", t);
            iterate(f, "t");
            // SAFETY: as above.
            assert_eq!(unsafe { qdirty_txn_abort(f.txn, ptr::null_mut()) }, 0);
        },
        |f, e| rc(unsafe { qdirty_iter_seek(f.iters[0], 0, e) }),
    ));
    // qdirty_bitmap_status
    let status = |f: &mut Fx, e| {
        let mut n = 7u64;
        let r = unsafe { qdirty_bitmap_status(f.target, 0, G, &mut n, e) };
        assert_eq!(n, 0, "*count after a failure");
        rc(r)
    };
    v.extend(on_each(
        "qdirty_bitmap_status",
        &[Null, Inconsistent, Gone],
        status,
    ));
    v.push(row(
        "qdirty_bitmap_status",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        status,
    ));
    v.push(row(
        "qdirty_bitmap_status",
        "EINVAL",
        "NULL count",
        "count must not be NULL",
        |f| {
            mem(f);
        },
        |f, e| rc(unsafe { qdirty_bitmap_status(f.h("b"), 0, G, ptr::null_mut(), e) }),
    ));
    for (why, off, len, msg) in [
        ("bytes 0", 0, 0, "status needs a non-empty range"),
        (
            "range beyond the size",
            SIZE - G,
            2 * G,
            "is beyond its size 67108864",
        ),
    ] {
        v.push(row(
            "qdirty_bitmap_status",
            "EINVAL",
            why,
            msg,
            |f| {
                mem(f);
            },
            move |f, e| {
                let mut n = 0;
                rc(unsafe { qdirty_bitmap_status(f.h("b"), off, len, &mut n, e) })
            },
        ));
    }
    v.extend(serialize_rows());
    v
}

/// One serialization chunk: 64 granules of 64 KiB.
const ALIGN: u64 = 64 * G;

fn serialize_rows() -> Vec<Row> {
    use On::*;
    let mut v = Vec::new();
    let size =
        |f: &mut Fx, e| rc(unsafe { qdirty_bitmap_serialization_size(f.target, 0, ALIGN, e) });
    v.extend(on_each(
        "qdirty_bitmap_serialization_size",
        &[Null, Inconsistent, Gone],
        size,
    ));
    let ser = |f: &mut Fx, e| {
        let mut buf = [0xaau8; 64];
        let r = unsafe {
            qdirty_bitmap_serialize_part(f.target, buf.as_mut_ptr(), buf.len(), 0, ALIGN, e)
        };
        assert_eq!(buf, [0xaa; 64], "buf touched by a failed serialization");
        rc(r)
    };
    v.extend(on_each(
        "qdirty_bitmap_serialize_part",
        &[Null, Inconsistent, Gone],
        ser,
    ));
    let deser = |f: &mut Fx, e| {
        let buf = [0xffu8; 8];
        rc(unsafe {
            qdirty_bitmap_deserialize_part(f.target, buf.as_ptr(), buf.len(), 0, ALIGN, true, e)
        })
    };
    v.extend(on_each(
        "qdirty_bitmap_deserialize_part",
        &[Null, Inconsistent, Readonly, Gone],
        deser,
    ));
    v.extend(on_each(
        "qdirty_bitmap_deserialize_zeroes",
        &[Null, Inconsistent, Readonly, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_deserialize_zeroes(f.target, 0, ALIGN, true, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_deserialize_ones",
        &[Null, Inconsistent, Readonly, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_deserialize_ones(f.target, 0, ALIGN, true, e) }),
    ));
    v.extend(on_each(
        "qdirty_bitmap_deserialize_finish",
        &[Null, Gone],
        |f, e| rc(unsafe { qdirty_bitmap_deserialize_finish(f.target, e) }),
    ));
    // The chunk rules, for each function that takes a chunk.
    let unaligned = "is not aligned to 4194304 bytes (64 granules)";
    let beyond = "is beyond its size 67108864";
    for (why, off, len, msg) in [
        ("unaligned chunk", G, ALIGN, unaligned),
        ("chunk beyond the size", SIZE - ALIGN, 2 * ALIGN, beyond),
    ] {
        let m = |f: &mut Fx| {
            mem(f);
            f.target = f.h("b");
        };
        v.push(row(
            "qdirty_bitmap_serialization_size",
            "EINVAL",
            why,
            msg,
            m,
            move |f, e| rc(unsafe { qdirty_bitmap_serialization_size(f.target, off, len, e) }),
        ));
        v.push(row(
            "qdirty_bitmap_serialize_part",
            "EINVAL",
            why,
            msg,
            m,
            move |f, e| {
                let mut buf = [0u8; 64];
                rc(unsafe {
                    qdirty_bitmap_serialize_part(f.target, buf.as_mut_ptr(), 64, off, len, e)
                })
            },
        ));
        v.push(row(
            "qdirty_bitmap_deserialize_part",
            "EINVAL",
            why,
            msg,
            m,
            move |f, e| {
                let buf = [0u8; 64];
                rc(unsafe {
                    qdirty_bitmap_deserialize_part(f.target, buf.as_ptr(), 64, off, len, true, e)
                })
            },
        ));
        v.push(row(
            "qdirty_bitmap_deserialize_zeroes",
            "EINVAL",
            why,
            msg,
            m,
            move |f, e| {
                rc(unsafe { qdirty_bitmap_deserialize_zeroes(f.target, off, len, true, e) })
            },
        ));
        v.push(row(
            "qdirty_bitmap_deserialize_ones",
            "EINVAL",
            why,
            msg,
            m,
            move |f, e| rc(unsafe { qdirty_bitmap_deserialize_ones(f.target, off, len, true, e) }),
        ));
    }
    let m = |f: &mut Fx| {
        mem(f);
        f.target = f.h("b");
    };
    v.push(row(
        "qdirty_bitmap_serialize_part",
        "EINVAL",
        "NULL buf with len > 0",
        "buf must not be NULL",
        m,
        |f, e| {
            rc(unsafe { qdirty_bitmap_serialize_part(f.target, ptr::null_mut(), 8, 0, ALIGN, e) })
        },
    ));
    v.push(row(
        "qdirty_bitmap_serialize_part",
        "EINVAL",
        "buffer too small",
        "serialization buffer of 4 bytes is too small: 8 needed",
        m,
        |f, e| {
            let mut buf = [0u8; 4];
            rc(unsafe { qdirty_bitmap_serialize_part(f.target, buf.as_mut_ptr(), 4, 0, ALIGN, e) })
        },
    ));
    v.push(row(
        "qdirty_bitmap_deserialize_part",
        "EINVAL",
        "NULL buf with len > 0",
        "buf must not be NULL",
        m,
        |f, e| {
            rc(unsafe {
                qdirty_bitmap_deserialize_part(f.target, ptr::null(), 8, 0, ALIGN, true, e)
            })
        },
    ));
    v.push(row(
        "qdirty_bitmap_deserialize_part",
        "EINVAL",
        "buffer too small",
        "deserialization buffer of 4 bytes is too small: 8 needed",
        m,
        |f, e| {
            let buf = [0xffu8; 4];
            rc(unsafe {
                qdirty_bitmap_deserialize_part(f.target, buf.as_ptr(), 4, 0, ALIGN, true, e)
            })
        },
    ));
    v
}

/// A file holding the broken template (its "c" refused by QEMU), opened with salvage.
fn salvage(f: &mut Fx, flags: u32) {
    let i = f.file(&templates().broken);
    f.open(i, QDIRTY_OPEN_SALVAGE | flags);
}

/// Rows of the image-level functions: standalone images, truncate, reopen, stored copies,
/// query, space, salvage.
fn image_rows() -> Vec<Row> {
    use qdirty::ffi::QDIRTY_OPEN_RDWR as RW;
    let mut v = Vec::new();
    v.push(row(
        "qdirty_image_new_memory",
        "EINVAL",
        "size beyond INT64_MAX",
        "is too large",
        none,
        |_, e| null(unsafe { qdirty_image_new_memory(u64::MAX, e) }),
    ));
    // qdirty_image_truncate
    let truncate = |size: u64| {
        move |f: &mut Fx, e| {
            rc(unsafe {
                qdirty_image_truncate(f.imgs.first().copied().unwrap_or(ptr::null_mut()), size, e)
            })
        }
    };
    for (errno, why, msg, setup, size) in [
        (
            "EINVAL",
            "NULL image",
            "img must not be NULL",
            none as fn(&mut Fx),
            SIZE,
        ),
        (
            "EINVAL",
            "a size other than the image's",
            "resize the image first",
            file_rw,
            2 * SIZE,
        ),
        (
            "EINVAL",
            "a stored bitmap not in memory",
            "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
            |f| {
                file_rw(f);
                // SAFETY: "b" belongs to the open image.
                assert_eq!(
                    unsafe { qdirty_bitmap_release(f.h("b"), ptr::null_mut()) },
                    0
                );
            },
            SIZE,
        ),
        (
            "EINVAL",
            "busy transient bitmap",
            "bitmap 'b' is busy, frozen or iterated",
            |f| {
                mem(f);
                set_busy(f, "b");
            },
            2 * SIZE,
        ),
        (
            "EINVAL",
            "iterated transient bitmap",
            "bitmap 'b' is busy, frozen or iterated",
            |f| {
                mem(f);
                iterate(f, "b");
            },
            2 * SIZE,
        ),
        (
            "EINVAL",
            "inconsistent persistent bitmap",
            "is inconsistent and cannot be used",
            crashed,
            SIZE,
        ),
        (
            "EBUSY",
            "busy persistent bitmap",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                file_rw(f);
                set_busy(f, "b");
            },
            SIZE,
        ),
        (
            "EPERM",
            "readonly persistent bitmap",
            "is readonly and cannot be modified",
            file_ro,
            SIZE,
        ),
        (
            "EFBIG",
            "more granules than a bitmap holds",
            "too many granules",
            |f| {
                let i = bare(f, SIZE);
                f.add(i, "x", 512);
            },
            1 << 62,
        ),
    ] {
        v.push(row(
            "qdirty_image_truncate",
            errno,
            why,
            msg,
            setup,
            truncate(size),
        ));
    }
    // qdirty_image_reopen
    let reopen = |flags: u32| {
        move |f: &mut Fx, e| {
            rc(unsafe {
                qdirty_image_reopen(f.imgs.first().copied().unwrap_or(ptr::null_mut()), flags, e)
            })
        }
    };
    for (errno, why, msg, setup, flags) in [
        (
            "EINVAL",
            "NULL image",
            "img must not be NULL",
            none as fn(&mut Fx),
            RW,
        ),
        ("EINVAL", "unknown flags", "unknown flags 0x2", file_ro, 2),
        (
            "EINVAL",
            "a stored bitmap not in memory",
            "Unexpected bitmap 'b'",
            |f| {
                file_ro(f);
                // SAFETY: "b" belongs to the open image.
                assert_eq!(
                    unsafe { qdirty_bitmap_release(f.h("b"), ptr::null_mut()) },
                    0
                );
            },
            RW,
        ),
        (
            "EROFS",
            "qcow2 v2",
            "is a qcow2 v2 image and can only be read",
            |f| {
                let i = f.file(&templates().v2);
                f.open(i, 0);
            },
            RW,
        ),
        (
            "EACCES",
            "a corrupt image",
            "qemu-img check -r all",
            |f| {
                let i = f.file(&with_incompatible(&templates().clean, 2));
                f.open(i, 0);
            },
            RW,
        ),
    ] {
        v.push(row(
            "qdirty_image_reopen",
            errno,
            why,
            msg,
            setup,
            reopen(flags),
        ));
    }
    // qdirty_image_remove_stored_bitmap
    v.push(row(
        "qdirty_image_remove_stored_bitmap",
        "EINVAL",
        "NULL name",
        "name must not be NULL",
        file_rw,
        |f, e| rc(unsafe { qdirty_image_remove_stored_bitmap(f.img(0), ptr::null(), e) }),
    ));
    v.push(row(
        "qdirty_image_remove_stored_bitmap",
        "EROFS",
        "read-only image",
        "No write access",
        file_ro,
        |f, e| rc(unsafe { qdirty_image_remove_stored_bitmap(f.img(0), c("b").as_ptr(), e) }),
    ));
    // qdirty_image_query_bitmaps
    let query = |img: bool, out: bool, count: bool| {
        move |f: &mut Fx, e| {
            let (mut arr, mut n) = (ptr::dangling_mut::<qdirty_bitmap_info>(), 7usize);
            let r = unsafe {
                qdirty_image_query_bitmaps(
                    if img { f.img(0) } else { ptr::null_mut() },
                    if out { &mut arr } else { ptr::null_mut() },
                    if count { &mut n } else { ptr::null_mut() },
                    e,
                )
            };
            if out {
                assert!(arr.is_null(), "*out after a failure");
            }
            if count {
                assert_eq!(n, 0, "*count after a failure");
            }
            rc(r)
        }
    };
    v.push(row(
        "qdirty_image_query_bitmaps",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        |f| {
            mem(f);
        },
        query(false, true, true),
    ));
    v.push(row(
        "qdirty_image_query_bitmaps",
        "EINVAL",
        "NULL out",
        "out must not be NULL",
        |f| {
            mem(f);
        },
        query(true, false, true),
    ));
    v.push(row(
        "qdirty_image_query_bitmaps",
        "EINVAL",
        "NULL count",
        "count must not be NULL",
        |f| {
            mem(f);
        },
        query(true, true, false),
    ));
    v.push(row(
        "qdirty_image_query_bitmaps",
        "EIO",
        "data unreadable",
        "Could not read bitmap 'b'",
        unreadable,
        query(true, true, true),
    ));
    v.push(row(
        "qdirty_image_store_space",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        none,
        |_, e| {
            rc(unsafe {
                qdirty_image_store_space(
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    e,
                )
            })
        },
    ));
    // Salvage.
    v.push(row(
        "qdirty_image_broken_bitmap_count",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        none,
        |_, e| rc(unsafe { qdirty_image_broken_bitmap_count(ptr::null_mut(), e) }),
    ));
    let broken = |f: &mut Fx, e| {
        let (mut idx, mut name, mut reason) = (77u32, ptr::null_mut(), ptr::null_mut());
        let img = f.imgs.first().copied().unwrap_or(ptr::null_mut());
        let r = unsafe { qdirty_image_broken_bitmap(img, 5, &mut idx, &mut name, &mut reason, e) };
        assert!(
            idx == 77 && name.is_null() && reason.is_null(),
            "outputs written on failure"
        );
        rc(r)
    };
    v.push(row(
        "qdirty_image_broken_bitmap",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        none,
        broken,
    ));
    v.push(row(
        "qdirty_image_broken_bitmap",
        "ENOENT",
        "index out of range",
        "No broken bitmap number 5 (there are 1)",
        |f| salvage(f, 0),
        broken,
    ));
    v.push(row(
        "qdirty_image_remove_broken_bitmap",
        "EINVAL",
        "NULL image",
        "img must not be NULL",
        none,
        |_, e| rc(unsafe { qdirty_image_remove_broken_bitmap(ptr::null_mut(), 0, e) }),
    ));
    v.push(row(
        "qdirty_image_remove_broken_bitmap",
        "ENOENT",
        "index out of range",
        "No broken bitmap number 1 (there are 1)",
        |f| salvage(f, RW),
        |f, e| rc(unsafe { qdirty_image_remove_broken_bitmap(f.img(0), 1, e) }),
    ));
    v.push(row(
        "qdirty_image_remove_broken_bitmap",
        "EROFS",
        "read-only image",
        "is read-only: open it read-write to remove broken bitmaps",
        |f| salvage(f, 0),
        |f, e| rc(unsafe { qdirty_image_remove_broken_bitmap(f.img(0), 0, e) }),
    ));
    let drop_ext = |f: &mut Fx, e| {
        let mut d = 7;
        let p = f.files.first().map(|p| c(p.to_str().unwrap()));
        let r = unsafe {
            qdirty_image_drop_bitmaps_extension(
                p.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
                &mut d,
                e,
            )
        };
        assert_eq!(d, 7, "*dropped written on failure");
        rc(r)
    };
    for (errno, why, msg, setup) in [
        (
            "EINVAL",
            "NULL path",
            "path must not be NULL",
            none as fn(&mut Fx),
        ),
        ("EINVAL", "not a qcow2 file", "not in qcow2 format", |f| {
            f.file(&[0u8; 65536]);
        }),
        (
            "ENOTSUP",
            "qcow2 v2",
            "qcow2 v2 images have no bitmaps",
            |f| {
                f.file(&templates().v2);
            },
        ),
        (
            "EAGAIN",
            "opened read-write",
            "is another process using the image",
            file_rw,
        ),
    ] {
        v.push(row(
            "qdirty_image_drop_bitmaps_extension",
            errno,
            why,
            msg,
            setup,
            drop_ext,
        ));
    }
    v.push(row(
        "qdirty_image_drop_bitmaps_extension",
        "EINVAL",
        "empty path",
        "path must not be empty",
        none,
        |_, e| {
            rc(unsafe { qdirty_image_drop_bitmaps_extension(c("").as_ptr(), ptr::null_mut(), e) })
        },
    ));
    v
}

/// Rows of the transaction actions.
fn txn_rows() -> Vec<Row> {
    use qdirty::ffi::QDIRTY_BITMAP_PERSISTENT as PERSISTENT;
    type Action = unsafe extern "C" fn(
        *mut qdirty_txn,
        *mut qdirty_image,
        *const std::os::raw::c_char,
        Errp,
    ) -> c_int;
    let mut v = Vec::new();
    let add = |name: &'static str, g: u32, flags: u32| {
        move |f: &mut Fx, e| {
            null(unsafe { qdirty_txn_add_bitmap(f.txn, f.img(0), c(name).as_ptr(), g, flags, e) })
        }
    };
    v.push(row(
        "qdirty_txn_add_bitmap",
        "EINVAL",
        "NULL txn",
        "txn must not be NULL",
        |f| {
            mem(f);
        },
        add("n", 0, 0),
    ));
    for (errno, why, msg, setup, name, g, flags) in [
        (
            "EINVAL",
            "empty name",
            "Bitmap name cannot be empty",
            (|f: &mut Fx| {
                mem(f);
            }) as fn(&mut Fx),
            "",
            0,
            0,
        ),
        (
            "EEXIST",
            "duplicate name",
            "Bitmap already exists: b",
            |f| {
                mem(f);
            },
            "b",
            0,
            0,
        ),
        (
            "EROFS",
            "persistent on a read-only image",
            "Can't make bitmap 'n' persistent in",
            file_ro,
            "n",
            0,
            PERSISTENT,
        ),
        (
            "ENOTSUP",
            "persistent on a standalone image",
            "Can't store persistent bitmaps to standalone bitmaps",
            |f| {
                mem(f);
            },
            "n",
            0,
            PERSISTENT,
        ),
        (
            "EFBIG",
            "persistent, more data than QEMU stores",
            "Too much space will be occupied by the bitmap",
            |f| {
                let i = f.file(&templates().huge);
                f.open(i, QDIRTY_OPEN_RDWR);
            },
            "n",
            512,
            PERSISTENT,
        ),
    ] {
        v.push(row(
            "qdirty_txn_add_bitmap",
            errno,
            why,
            msg,
            move |f| {
                setup(f);
                txn(f);
            },
            add(name, g, flags),
        ));
    }
    // The actions on one named bitmap.
    let actions: [(&str, Action, &[&str]); 4] = [
        (
            "qdirty_txn_clear_bitmap",
            qdirty_txn_clear_bitmap,
            &["INCONSISTENT", "ENOENT", "EBUSY", "EPERM"],
        ),
        (
            "qdirty_txn_enable_bitmap",
            qdirty_txn_enable_bitmap,
            &["INCONSISTENT", "ENOENT", "EBUSY"],
        ),
        (
            "qdirty_txn_disable_bitmap",
            qdirty_txn_disable_bitmap,
            &["INCONSISTENT", "ENOENT", "EBUSY"],
        ),
        (
            "qdirty_txn_remove_bitmap",
            qdirty_txn_remove_bitmap,
            &["ENOENT", "EBUSY", "ITERATED", "EPERM", "EROFS"],
        ),
    ];
    for (export, action, cases) in actions {
        v.push(row(
            export,
            "EINVAL",
            "NULL txn",
            "txn must not be NULL",
            |f| {
                mem(f);
            },
            move |f, e| rc(unsafe { action(ptr::null_mut(), f.img(0), c("b").as_ptr(), e) }),
        ));
        for &case in cases {
            let (errno, why, msg, setup, name): (_, _, _, fn(&mut Fx), _) = match case {
                "INCONSISTENT" => (
                    "EINVAL",
                    "inconsistent bitmap",
                    "Bitmap 'b' is inconsistent and cannot be used",
                    crashed,
                    "b",
                ),
                "ENOENT" => (
                    "ENOENT",
                    "no such bitmap",
                    "Dirty bitmap 'x' not found",
                    file_rw,
                    "x",
                ),
                "EBUSY" => (
                    "EBUSY",
                    "busy bitmap",
                    "Bitmap 'b' is currently in use by another operation and cannot be used",
                    |f| {
                        file_rw(f);
                        set_busy(f, "b");
                    },
                    "b",
                ),
                "ITERATED" => (
                    "EBUSY",
                    "live iterator",
                    "Bitmap 'b' cannot be released while iterators on it are alive",
                    |f| {
                        file_rw(f);
                        iterate(f, "b");
                    },
                    "b",
                ),
                "EPERM" => (
                    "EPERM",
                    "readonly bitmap",
                    "Bitmap 'b' is readonly and cannot be modified",
                    file_ro,
                    "b",
                ),
                "EROFS" => (
                    "EROFS",
                    "writable bitmap stored in a read-only image",
                    "No write access",
                    |f| {
                        file_ro(f);
                        set_readonly(f, "b", false);
                    },
                    "b",
                ),
                _ => unreachable!(),
            };
            v.push(row(
                export,
                errno,
                why,
                msg,
                move |f| {
                    setup(f);
                    txn(f);
                },
                move |f, e| rc(unsafe { action(f.txn, f.img(0), c(name).as_ptr(), e) }),
            ));
        }
    }
    // qdirty_txn_merge_bitmap: target of image 0, source of image `src` (None: image 0).
    let merge = |target: &'static str, src: Option<usize>, name: &'static str| {
        move |f: &mut Fx, e| {
            let s = src.map_or(ptr::null_mut(), |i| f.img(i));
            rc(unsafe {
                qdirty_txn_merge_bitmap(f.txn, f.img(0), c(target).as_ptr(), s, c(name).as_ptr(), e)
            })
        }
    };
    v.push(row(
        "qdirty_txn_merge_bitmap",
        "EINVAL",
        "NULL txn",
        "txn must not be NULL",
        |f| {
            mem(f);
        },
        merge("b", None, "c"),
    ));
    for (errno, why, msg, setup, target, src, name) in [
        (
            "EINVAL",
            "different sizes",
            "Bitmaps are of different sizes (destination size is 67108864, source size is 33554432)",
            (|f: &mut Fx| {
                mem(f);
                let i = bare(f, SIZE / 2);
                f.add(i, "s", G as u32);
            }) as fn(&mut Fx),
            "b",
            Some(1),
            "s",
        ),
        (
            "EINVAL",
            "inconsistent source",
            "Bitmap 'b' is inconsistent and cannot be used",
            crashed,
            "t",
            None,
            "b",
        ),
        ("ENOENT", "no such target", "Dirty bitmap 'x' not found", |f| {
            mem(f);
        }, "x", None, "c"),
        ("ENOENT", "no such source", "Dirty bitmap 'x' not found", |f| {
            mem(f);
        }, "b", None, "x"),
        (
            "EBUSY",
            "busy target",
            "Bitmap 'b' is currently in use by another operation and cannot be used",
            |f| {
                mem(f);
                set_busy(f, "b");
            },
            "b",
            None,
            "c",
        ),
        (
            "EPERM",
            "readonly target",
            "Bitmap 'b' is readonly and cannot be modified",
            |f| {
                mem(f);
                set_readonly(f, "b", true);
            },
            "b",
            None,
            "c",
        ),
    ] {
        v.push(row(
            "qdirty_txn_merge_bitmap",
            errno,
            why,
            msg,
            move |f| {
                setup(f);
                txn(f);
            },
            merge(target, src, name),
        ));
    }
    v.push(row(
        "qdirty_txn_commit",
        "EINVAL",
        "NULL txn",
        "txn must not be NULL",
        none,
        |_, e| rc(unsafe { qdirty_txn_commit(ptr::null_mut(), e) }),
    ));
    v.push(row(
        "qdirty_txn_abort",
        "EINVAL",
        "NULL txn",
        "txn must not be NULL",
        none,
        |_, e| rc(unsafe { qdirty_txn_abort(ptr::null_mut(), e) }),
    ));
    v
}

unsafe extern "C" fn h_alloc(_: *mut c_void, _: u64, _: u64, _: *mut u64) -> c_int {
    -libc::ENOSPC
}

/// Rows of `qdirty_image_open_with_io`: `prep` adjusts the host's table (`Fx::ops`) over a
/// host holding `bytes`.
fn io_rows() -> Vec<Row> {
    use qdirty::ffi::QDIRTY_OPEN_RDWR as RW;
    let open = |flags: u32, name: bool| {
        move |f: &mut Fx, e| {
            let opaque = f.hosts.first().map_or(ptr::null_mut(), |h| h.opaque());
            let n = c("host");
            null(unsafe {
                qdirty_image_open_with_io(
                    &f.ops.ops,
                    opaque,
                    if name { n.as_ptr() } else { ptr::null() },
                    flags,
                    e,
                )
            })
        }
    };
    let host = |f: &mut Fx, bytes: &[u8]| f.hosts.push(Host::new(bytes.to_vec()));
    let mut v = vec![row(
        "qdirty_image_open_with_io",
        "EINVAL",
        "NULL ops",
        "ops must not be NULL",
        none,
        |_, e| {
            null(unsafe {
                qdirty_image_open_with_io(ptr::null(), ptr::null_mut(), c("h").as_ptr(), 0, e)
            })
        },
    )];
    for (errno, why, msg, prep, flags, name) in [
        (
            "EINVAL",
            "NULL name",
            "name must not be NULL",
            (|_: &mut GrownOps| {}) as fn(&mut GrownOps),
            0,
            false,
        ),
        (
            "EINVAL",
            "size below the first layout",
            "less than the first layout",
            |o| o.ops.size = 8,
            0,
            true,
        ),
        (
            "EINVAL",
            "no pread",
            "qdirty_io_ops.pread must not be NULL",
            |o| o.ops.pread = None,
            0,
            true,
        ),
        (
            "EINVAL",
            "no pwrite for a read-write open",
            "qdirty_io_ops.pwrite must not be NULL for a read-write open",
            |o| o.ops.pwrite = None,
            RW,
            true,
        ),
        (
            "EINVAL",
            "alloc_clusters without free_clusters",
            "must both be set or both be NULL",
            |o| o.ops.alloc_clusters = Some(h_alloc),
            0,
            true,
        ),
        (
            "EINVAL",
            "unknown flags",
            "unknown flags 0x2",
            |_| {},
            2,
            true,
        ),
        (
            "ENOTSUP",
            "a field unknown to this version set",
            "sets fields unknown to this version of qdirty",
            |o| {
                o.ops.size = std::mem::size_of::<GrownOps>() as u32;
                o.extra[1] = 1;
            },
            0,
            true,
        ),
    ] {
        v.push(row(
            "qdirty_image_open_with_io",
            errno,
            why,
            msg,
            move |f| {
                host(f, &templates().clean);
                prep(&mut f.ops);
            },
            open(flags, name),
        ));
    }
    for (errno, why, msg, bytes, flags) in [
        (
            "EINVAL",
            "not a qcow2 image",
            "not in qcow2 format",
            vec![0u8; 65536],
            0,
        ),
        (
            "ENOTSUP",
            "an unknown incompatible feature",
            "Unsupported qcow2 feature(s)",
            with_incompatible(&templates().clean, 1 << 30),
            0,
        ),
        (
            "EACCES",
            "a dirty image opened read-write",
            "qemu-img check -r all",
            with_incompatible(&templates().clean, 1),
            RW,
        ),
    ] {
        v.push(row(
            "qdirty_image_open_with_io",
            errno,
            why,
            msg,
            move |f| host(f, &bytes),
            open(flags, true),
        ));
    }
    v
}

// ------------------------------------------------------------------------------------------
// Running a row
// ------------------------------------------------------------------------------------------

fn errno_name(e: i32) -> &'static str {
    ERRNOS.iter().find(|(_, v)| *v == e).map_or("?", |(n, _)| n)
}

/// Runs one row: its problems, or nothing.
fn run(r: &Row, dir: PathBuf) -> Vec<String> {
    let mut f = Fx::new(dir);
    (r.setup)(&mut f);
    let before = snapshot(&f, true);
    let mut err = ptr::null_mut();
    let out = (r.call)(&mut f, &mut err);
    for h in &f.hosts {
        h.fail_reads.store(false, Ordering::SeqCst);
        h.fail_writes.store(false, Ordering::SeqCst);
    }
    let after = snapshot(&f, false);
    let (got, msg, hint) = take(err);
    let want = errno_value(r.errno);
    let mut problems = Vec::new();
    match out {
        Out::Rc(v) if v != -i64::from(want) => {
            problems.push(format!("returned {v}, not -{}", r.errno))
        }
        Out::Ptr(false) => problems.push("returned an object, not NULL".into()),
        _ => {}
    }
    if got != want {
        problems.push(format!(
            "error errno {got} ({}), not {}: {msg:?}",
            errno_name(got),
            r.errno
        ));
    }
    if !msg.contains(r.msg) {
        problems.push(format!("message {msg:?} lacks {:?}", r.msg));
    }
    if msg.contains("is inconsistent and cannot be used") && hint.as_deref() != Some(HINT) {
        problems.push(format!("hint {hint:?}, not QEMU's {HINT:?}"));
    }
    for p in &f.absent {
        if p.exists() {
            problems.push(format!("{} was created", p.display()));
        }
    }
    problems.extend(diff(&before, &after));
    teardown(f);
    problems
}

#[test]
fn every_documented_errno_is_returned_and_changes_nothing() {
    let tmp = TempDir::new("errno-table");
    templates();
    let rows = rows();
    let mut failures = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let dir = tmp.join(&format!("r{i}"));
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(r, dir)));
        let problems = match res {
            Ok(p) => p,
            Err(p) => vec![format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )],
        };
        if !problems.is_empty() {
            failures.push(format!(
                "{} -{} ({}):\n    {}",
                r.export,
                r.errno,
                r.why,
                problems.join("\n    ")
            ));
        }
    }
    eprintln!("{} rows", rows.len());
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// Completeness: the header's documented errnos
// ------------------------------------------------------------------------------------------

/// The name of the function a header line declares, if it starts a declaration.
fn declared(line: &str) -> Option<&str> {
    if line.starts_with("typedef") || line.starts_with('#') {
        return None;
    }
    let before = &line[..line.find('(')?];
    let start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |p| p + 1);
    let name = &before[start..];
    (name.starts_with("qdirty_") && !before[..start].trim().is_empty()).then_some(name)
}

/// Every export of the header with the errnos its comment names, and those of the functions
/// its Returns paragraph refers to with "as `qdirty_...`".
fn documented(header: &str) -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut own: BTreeMap<String, (BTreeSet<&'static str>, Vec<String>)> = BTreeMap::new();
    let mut comment: Vec<&str> = Vec::new();
    for line in header.lines() {
        let t = line.trim();
        // A documentation comment: `/**`, ` * text` lines, ` */`.
        if t == "/**" {
            comment.clear();
            continue;
        }
        if t == "*/" {
            continue;
        }
        if let Some(cm) = t.strip_prefix('*') {
            comment.push(cm.trim());
            continue;
        }
        if let Some(name) = declared(t) {
            let mut errnos = BTreeSet::new();
            for w in comment
                .iter()
                .flat_map(|l| l.split(|c: char| !c.is_ascii_alphanumeric()))
            {
                if w.len() >= 3 && w.starts_with('E') && w.chars().all(|c| c.is_ascii_uppercase()) {
                    let known = ERRNOS.iter().find(|(n, _)| *n == w);
                    assert!(
                        known.is_some(),
                        "{name}: unknown errno {w} (add it to ERRNOS)"
                    );
                    errnos.insert(known.unwrap().0);
                }
            }
            let mut refs = Vec::new();
            let mut in_returns = false;
            for l in &comment {
                if l.starts_with("Returns:") {
                    in_returns = true;
                } else if l.is_empty()
                    || l.starts_with('#')
                    || ["Errors:", "Ownership:", "Thread safety:"]
                        .iter()
                        .any(|h| l.starts_with(h))
                {
                    // The paragraph ends at a blank line or the next section.
                    in_returns = false;
                }
                if in_returns {
                    for part in l.split("as `").skip(1) {
                        let r: String = part.chars().take_while(|&c| c != '`').collect();
                        if r.starts_with("qdirty_") {
                            refs.push(r);
                        }
                    }
                }
            }
            own.insert(name.to_owned(), (errnos, refs));
        }
        comment.clear();
    }
    own.iter()
        .map(|(name, (errnos, refs))| {
            let mut all = errnos.clone();
            for r in refs {
                let (inherited, _) = own.get(r).unwrap_or_else(|| panic!("{name} refers to {r}"));
                all.extend(inherited);
            }
            (name.clone(), all)
        })
        .collect()
}

#[test]
fn every_documented_errno_has_a_row() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/qdirty.h")).unwrap();
    let doc = documented(&header);
    // The parser itself.
    assert!(doc.len() >= 90, "only {} exports parsed", doc.len());
    let set = |v: &[&'static str]| v.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(
        doc["qdirty_bitmap_enable"],
        set(&["EBUSY", "EINVAL", "ENOENT"])
    );
    assert_eq!(doc["qdirty_version"], set(&[]));
    assert!(
        doc["qdirty_bitmap_deserialize_ones"].contains("EPERM"),
        "inherited from qdirty_bitmap_deserialize_part"
    );
    assert!(
        doc["qdirty_txn_add_bitmap"].contains("EEXIST"),
        "inherited from qdirty_image_add_bitmap"
    );

    let rows = rows();
    let allowed = |f: &str, e: &str| {
        ALLOWLIST
            .iter()
            .any(|(af, ae, _)| *af == f && (*ae == e || *ae == "*"))
    };
    let mut problems = Vec::new();
    for (f, errnos) in &doc {
        for e in errnos {
            let covered = rows.iter().any(|r| r.export == f && r.errno == *e);
            if !covered && !allowed(f, e) {
                problems.push(format!("{f}: -{e} is documented but has no row"));
            }
            if covered && allowed(f, e) {
                problems.push(format!("{f}: -{e} has a row and is also in ALLOWLIST"));
            }
        }
    }
    for r in &rows {
        match doc.get(r.export) {
            None => problems.push(format!("{}: not declared in the header", r.export)),
            Some(errnos) if !errnos.contains(r.errno) => problems.push(format!(
                "{}: returns -{} ({}), which its comment does not document",
                r.export, r.errno, r.why
            )),
            _ => {}
        }
    }
    for (f, e, _) in ALLOWLIST {
        let documented = doc.get(*f).is_some_and(|s| {
            if *e == "*" {
                !s.is_empty()
            } else {
                s.contains(e)
            }
        });
        if !documented {
            problems.push(format!(
                "ALLOWLIST entry ({f}, {e}) is not documented any more"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Messages the warning handler received (the handler is global: tests filter them).
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn record_warning(msg: *const std::os::raw::c_char, _opaque: *mut c_void) {
    // SAFETY: qdirty passes a NUL-terminated message valid during the call.
    let m = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).push(m);
}

/// `qdirty_txn_free` has no error channel: when the abort it runs cannot write the restored
/// bitmaps (durable mode), the failure reaches the warning handler, the transaction is freed
/// all the same, and the next call on the image writes them.
#[test]
fn txn_free_reports_a_failed_abort() {
    let tmp = TempDir::new("errno-txn-free");
    let mut f = Fx::new(tmp.join("fx"));
    let i = f.open_host(&templates().clean, QDIRTY_OPEN_RDWR | QDIRTY_OPEN_DURABLE);
    let stored_b = |f: &Fx| {
        let s = disk_view(None, Some(f.hosts[0].bytes())).expect("the host's bytes open");
        let q = s.query.expect("query");
        q.iter()
            .find(|x| x.0.as_deref() == Some("b"))
            .map(|x| x.1)
            .expect("b on disk")
    };
    let before = stored_b(&f);
    assert!(before > 0);
    // SAFETY: the handler stays valid; the image and the transaction are used as documented.
    unsafe {
        qdirty_set_warning_handler(Some(record_warning), ptr::null_mut());
        let txn = qdirty_txn_new();
        let mut err = ptr::null_mut();
        ok(
            qdirty_txn_clear_bitmap(txn, f.img(i), c("b").as_ptr(), &mut err),
            "clear b",
            err,
        );
        assert_eq!(qdirty_bitmap_count(f.h("b")), 0);
        f.hosts[0].fail_writes.store(true, Ordering::SeqCst);
        qdirty_txn_free(txn);
        qdirty_set_warning_handler(None, ptr::null_mut());
        let warned =
            WARNINGS.lock().unwrap().iter().any(|m| {
                m.starts_with("Freeing a transaction aborted its actions, and that failed")
            });
        assert!(warned, "{:?}", WARNINGS.lock().unwrap());
        // The abort itself happened in memory.
        assert_eq!(qdirty_bitmap_count(f.h("b")), before);
        f.hosts[0].fail_writes.store(false, Ordering::SeqCst);
        let mut err = ptr::null_mut();
        let (mut n, mut bytes, mut measure) = (0u64, 0u64, 0u64);
        ok(
            qdirty_image_store_space(f.img(i), &mut n, &mut bytes, &mut measure, &mut err),
            "a call on the image",
            err,
        );
    }
    assert_eq!(stored_b(&f), before);
    teardown(f);
}
