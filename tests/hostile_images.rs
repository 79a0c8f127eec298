//! Hostile images: a corpus of malformed qcow2 images, one per validation of the header, the
//! extensions, the bitmap directory, the bitmap tables (docs/format.md, 'Checks when loading')
//! and the refcount structures (docs/format.md, 'Refcounts and allocation').
//!
//! Every image is made from a valid base image by patching bytes; each mutation is documented in
//! `mutations()`. There are two bases: one made by QEMU (`qemu-img create` + `qemu-img bitmap
//! --add` + `qemu-io` writes, so that bitmaps have data clusters) and one made by qdirty alone
//! (`Image::create` + add + set + close), so the corpus also runs without QEMU.
//!
//! For each image:
//! - qdirty's open (read-only, or read-write plus an allocating operation for the refcount class)
//!   runs in a child process (this test binary re-run with `QDIRTY_HOSTILE_CHILD` set), which
//!   reports the error and its peak resident memory (VmHWM). The parent asserts: an error (no
//!   success, no panic, no signal), the error text names what is wrong (the substrings given per
//!   mutation: field, bitmap name or entry index, value), and VmHWM below [`MEM_CAP_KIB`] even
//!   when the header claims terabytes.
//! - with QEMU: `qemu-img info` refuses the image with QEMU's own message where QEMU refuses it.
//!
//! A second test opens images with pre-existing problems that QEMU accepts (leaks, in_use
//! bitmaps, unknown autoclear bits, a bitmaps extension invalidated by an old writer) and runs
//! qdirty read-write sessions on them; `qemu-img check` must find nothing it did not find before.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use qdirty::{AddOptions, Image};

/// Peak resident memory allowed for one open of a hostile image, in KiB. Every image of the
/// corpus is a few hundred KiB; QEMU's own caps would let a reader allocate up to 64 MiB for a
/// bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE), 8 MiB for a refcount table, 8 MiB for a
/// bitmap table: buffers that are allocated but never filled from a short file cost address
/// space, not memory. 64 MiB is far above what a valid small image needs (a few MiB including
/// the test harness) and far below what a header claiming terabytes would make a naive reader
/// allocate.
const MEM_CAP_KIB: u64 = 64 * 1024;

const BITMAPS_MAGIC: u32 = 0x2385_2875;

// ------------------------------------------------------------------------------------------
// Child process: open one image, report error and VmHWM
// ------------------------------------------------------------------------------------------

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the child does with the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `Image::open(path, false)`.
    ReadOnly,
    /// `Image::open(path, true)`, then add a persistent bitmap, set bits, `store_bitmaps`, close
    /// (allocates clusters, so the refcount structures are read).
    ReadWrite,
}

fn child_session(path: &Path, mode: Mode) -> qdirty::Result<()> {
    let mut img = Image::open(path, mode == Mode::ReadWrite)?;
    // Touch everything that was loaded.
    for id in img.bitmap_ids() {
        // A read error is an answer too: what matters is no panic and no wrong "clean".
        if let Ok(b) = img.bitmap_current(id) {
            let _ = b.count();
        }
    }
    if mode == Mode::ReadWrite {
        let id = img.add_bitmap(
            b"hostile-new",
            65536,
            AddOptions {
                persistent: true,
                ..Default::default()
            },
        )?;
        img.bitmap_mut(id).expect("added").set_dirty(0, 65536)?;
        img.store_bitmaps()?;
    }
    img.close()
}

/// The child side: runs only when the parent set QDIRTY_HOSTILE_CHILD=MODE:PATH.
#[test]
fn hostile_child() {
    let Ok(spec) = std::env::var("QDIRTY_HOSTILE_CHILD") else {
        return;
    };
    let (mode, path) = spec.split_once(':').expect("MODE:PATH");
    let mode = if mode == "rw" {
        Mode::ReadWrite
    } else {
        Mode::ReadOnly
    };
    let r = child_session(Path::new(path), mode);
    let hwm = vm_hwm_kib();
    match r {
        Ok(()) => println!("\nQDIRTY-RESULT ok"),
        Err(e) => println!("\nQDIRTY-RESULT err {}", e.to_string().replace('\n', " ")),
    }
    println!("QDIRTY-HWM {hwm}");
}

/// What the child reported.
#[derive(Debug)]
struct ChildReport {
    /// None: success; Some(message): the error.
    error: Option<String>,
    hwm_kib: u64,
}

fn run_child(path: &Path, mode: Mode) -> ChildReport {
    let exe = std::env::current_exe().expect("test binary");
    let m = if mode == Mode::ReadWrite { "rw" } else { "ro" };
    let out = Command::new(exe)
        .args([
            "--exact",
            "hostile_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QDIRTY_HOSTILE_CHILD", format!("{m}:{}", path.display()))
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "child for {} ({m}) failed (panic or signal): {}\nstdout: {stdout}\nstderr: {stderr}",
        path.display(),
        out.status
    );
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("QDIRTY-RESULT "))
        .unwrap_or_else(|| panic!("child printed no result: {stdout}\n{stderr}"));
    let hwm_kib = stdout
        .lines()
        .find_map(|l| l.strip_prefix("QDIRTY-HWM "))
        .and_then(|v| v.trim().parse().ok())
        .expect("child printed VmHWM");
    ChildReport {
        error: result.strip_prefix("err ").map(str::to_string),
        hwm_kib,
    }
}

// ------------------------------------------------------------------------------------------
// Base images and their layout
// ------------------------------------------------------------------------------------------

/// Disk size of the base images.
const DISK: u64 = 64 << 20;

/// One bitmap directory entry of the base image.
#[derive(Clone, Debug)]
struct EntryPos {
    /// File offset of the entry.
    pos: usize,
    table_offset: u64,
    table_size: u32,
    name: String,
    /// File offset of the first table entry that points to a data cluster, if any.
    data_table_entry: Option<usize>,
}

/// Where things are in the base image (parsed here, independently of qdirty).
#[derive(Clone, Debug)]
struct Layout {
    cs: u64,
    header_length: usize,
    /// File offset of the first extension's magic.
    first_ext: usize,
    /// File offset of the bitmaps extension's magic.
    bitmaps_ext: usize,
    dir_offset: u64,
    dir_size: u64,
    entries: Vec<EntryPos>,
    reftable_offset: u64,
}

fn layout(b: &[u8]) -> Layout {
    let cs = 1u64 << be_u32(b, 20);
    let header_length = be_u32(b, 100) as usize;
    let mut pos = header_length;
    let mut bitmaps_ext = None;
    loop {
        let magic = be_u32(b, pos);
        let len = be_u32(b, pos + 4) as usize;
        if magic == 0 {
            break;
        }
        if magic == BITMAPS_MAGIC {
            bitmaps_ext = Some(pos);
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    let bitmaps_ext = bitmaps_ext.expect("base image has a bitmaps extension");
    let nb = be_u32(b, bitmaps_ext + 8);
    let dir_size = be_u64(b, bitmaps_ext + 16);
    let dir_offset = be_u64(b, bitmaps_ext + 24);
    let mut entries = Vec::new();
    let mut p = dir_offset as usize;
    for _ in 0..nb {
        let table_offset = be_u64(b, p);
        let table_size = be_u32(b, p + 8);
        let name_size = u16::from_be_bytes([b[p + 18], b[p + 19]]) as usize;
        let name = String::from_utf8_lossy(&b[p + 24..p + 24 + name_size]).into_owned();
        let data_table_entry = (0..table_size as usize)
            .map(|i| table_offset as usize + 8 * i)
            .find(|&o| be_u64(b, o) > 1);
        entries.push(EntryPos {
            pos: p,
            table_offset,
            table_size,
            name,
            data_table_entry,
        });
        p += (24 + name_size).div_ceil(8) * 8;
    }
    Layout {
        cs,
        header_length,
        first_ext: header_length,
        bitmaps_ext,
        dir_offset,
        dir_size,
        entries,
        reftable_offset: be_u64(b, 48),
    }
}

/// The bitmaps of every base image: b0 (64 KiB granularity, enabled, dirty 0..1 MiB), b1
/// (512 B, disabled, clean), b2 (4 KiB, enabled, dirty 0..1 MiB).
fn qemu_base(dir: &Path) -> PathBuf {
    let img = dir.join("qemu-base.qcow2");
    qemu_img_create(&img, DISK, "", &[]);
    qemu_img_bitmap_add(&img, "b0", Some(65536), false);
    qemu_img_bitmap_add(&img, "b1", Some(512), true);
    qemu_img_bitmap_add(&img, "b2", Some(4096), false);
    qemu_io_write(&img, &[(0, 1 << 20)]);
    assert_check_clean(&img, "QEMU base image");
    img
}

fn qdirty_base(dir: &Path) -> PathBuf {
    let img = dir.join("qdirty-base.qcow2");
    Image::create(&img, DISK, 65536).expect("create");
    let mut im = Image::open(&img, true).expect("open base");
    for (name, g, disabled) in [("b0", 65536, false), ("b1", 512, true), ("b2", 4096, false)] {
        let id = im
            .add_bitmap(
                name.as_bytes(),
                g,
                AddOptions {
                    persistent: true,
                    disabled,
                    autoload: None,
                },
            )
            .expect("add");
        if !disabled {
            im.bitmap_mut(id)
                .expect("added")
                .set_dirty(0, 1 << 20)
                .expect("set");
        }
    }
    im.close().expect("close base");
    img
}

// ------------------------------------------------------------------------------------------
// Byte patching
// ------------------------------------------------------------------------------------------

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// What QEMU does with the mutated image (`qemu-img info`).
#[derive(Clone, Copy, Debug)]
enum Qemu {
    /// QEMU refuses to open it; its message contains this.
    Refuses(&'static str),
    /// QEMU opens it (`qemu-img info` exit 0); the problem shows only on writes or in check.
    Opens,
}

/// A byte patch of the base image.
type Patch = Box<dyn Fn(&mut Vec<u8>, &Layout)>;

/// One malformed image.
struct Mutation {
    /// Class: header, extension, directory, table, refcount.
    class: &'static str,
    /// Short name.
    name: &'static str,
    /// What the bytes are made to say.
    what: &'static str,
    /// The patch.
    patch: Patch,
    /// How qdirty must open it to find the problem.
    mode: Mode,
    /// Substrings the qdirty error must contain (what is wrong: field, bitmap, index, value).
    expect: Vec<&'static str>,
    /// QEMU's verdict.
    qemu: Qemu,
}

fn m(
    class: &'static str,
    name: &'static str,
    what: &'static str,
    mode: Mode,
    expect: &[&'static str],
    qemu: Qemu,
    patch: impl Fn(&mut Vec<u8>, &Layout) + 'static,
) -> Mutation {
    Mutation {
        class,
        name,
        what,
        patch: Box::new(patch),
        mode,
        expect: expect.to_vec(),
        qemu,
    }
}

/// The corpus: one mutation per validation.
fn mutations() -> Vec<Mutation> {
    use Mode::*;
    use Qemu::*;
    let e = |l: &Layout, i: usize| by(l, i).pos;
    vec![
        // ---- header (docs/format.md, 'Checks when loading', steps 1, 3, 7) ----
        m(
            "header",
            "magic",
            "magic 0x514649FC instead of QFI\\xfb",
            ReadOnly,
            &["not in qcow2 format", "0x514649fc"],
            Refuses("not in qcow2 format"),
            |b, _| b[3] = 0xFC,
        ),
        m(
            "header",
            "version-4",
            "version 4",
            ReadOnly,
            &["Unsupported qcow2 version 4"],
            Refuses("Unsupported qcow2 version 4"),
            |b, _| put32(b, 4, 4),
        ),
        m(
            "header",
            "version-1",
            "version 1",
            ReadOnly,
            &["Unsupported qcow2 version 1"],
            Refuses("Unsupported qcow2 version 1"),
            |b, _| put32(b, 4, 1),
        ),
        m(
            "header",
            "cluster-bits-8",
            "cluster_bits 8 (below 512 B)",
            ReadOnly,
            &["Unsupported cluster size: 2^8"],
            Refuses("Unsupported cluster size: 2^8"),
            |b, _| put32(b, 20, 8),
        ),
        m(
            "header",
            "cluster-bits-22",
            "cluster_bits 22 (above 2 MiB)",
            ReadOnly,
            &["Unsupported cluster size: 2^22"],
            Refuses("Unsupported cluster size: 2^22"),
            |b, _| put32(b, 20, 22),
        ),
        m(
            "header",
            "cluster-bits-max",
            "cluster_bits 0xFFFFFFFF",
            ReadOnly,
            &["Unsupported cluster size", "4294967295"],
            Refuses("Unsupported cluster size"),
            |b, _| put32(b, 20, u32::MAX),
        ),
        m(
            "header",
            "header-length-short",
            "header_length 100 (< 104)",
            ReadOnly,
            &["qcow2 header too short", "100"],
            Refuses("qcow2 header too short"),
            |b, _| put32(b, 100, 100),
        ),
        m(
            "header",
            "header-length-beyond-cluster",
            "header_length cluster_size + 8",
            ReadOnly,
            &["qcow2 header exceeds cluster size", "65544"],
            Refuses("qcow2 header exceeds cluster size"),
            |b, l| put32(b, 100, l.cs as u32 + 8),
        ),
        m(
            "header",
            "backing-offset-beyond-cluster",
            "backing_file_offset cluster_size + 8",
            ReadOnly,
            &["Invalid backing file offset", "0x10008"],
            Refuses("Invalid backing file offset"),
            |b, l| {
                put64(b, 8, l.cs + 8);
                put32(b, 16, 4)
            },
        ),
        m(
            "header",
            "backing-name-too-long",
            "backing_file_size 2000 at offset cluster_size - 1024",
            ReadOnly,
            &["Backing file name too long", "2000"],
            Refuses("Backing file name too long"),
            |b, l| {
                put64(b, 8, l.cs - 1024);
                put32(b, 16, 2000)
            },
        ),
        m(
            "header",
            "refcount-order-7",
            "refcount_order 7 (128-bit refcounts)",
            ReadOnly,
            &["Reference count entry width too large", "7"],
            Refuses("Reference count entry width too large"),
            |b, _| put32(b, 96, 7),
        ),
        m(
            "header",
            "reftable-clusters-0",
            "refcount_table_clusters 0",
            ReadOnly,
            &[
                "does not contain a reference count table",
                "refcount_table_clusters is 0",
            ],
            Refuses("Image does not contain a reference count table"),
            |b, _| put32(b, 56, 0),
        ),
        m(
            "header",
            "reftable-too-large",
            "refcount_table_clusters 0xFFFFFFFF (256 TiB table)",
            ReadOnly,
            &["Reference count table too large", "4294967295"],
            Refuses("Reference count table too large"),
            |b, _| put32(b, 56, u32::MAX),
        ),
        m(
            "header",
            "reftable-offset-unaligned",
            "refcount_table_offset + 512",
            ReadOnly,
            &[
                "Reference count table offset invalid",
                "refcount_table_offset",
            ],
            Refuses("Reference count table offset invalid"),
            |b, l| put64(b, 48, l.reftable_offset + 512),
        ),
        m(
            "header",
            "reftable-offset-beyond-2^63",
            "refcount_table_offset 2^63 - cluster",
            ReadOnly,
            &["Reference count table offset invalid", "0x7fffffffffff0000"],
            Refuses("Reference count table offset invalid"),
            |b, l| put64(b, 48, (1u64 << 63) - l.cs),
        ),
        m(
            "header",
            "l1-offset-unaligned",
            "l1_table_offset + 8",
            ReadOnly,
            &["Active L1 table offset invalid", "l1_table_offset"],
            Refuses("Active L1 table offset invalid"),
            |b, _| {
                let v = be_u64(b, 40);
                put64(b, 40, v + 8)
            },
        ),
        m(
            "header",
            "l1-too-large",
            "l1_size 0xFFFFFFFF (32 GiB L1 table)",
            ReadOnly,
            &["Active L1 table too large", "4294967295"],
            Refuses("Active L1 table too large"),
            |b, _| put32(b, 36, u32::MAX),
        ),
        m(
            "header",
            "l1-too-small",
            "size 1 TiB with the 64 MiB image's l1_size",
            ReadOnly,
            &["L1 table is too small", "1099511627776"],
            Refuses("L1 table is too small"),
            |b, _| put64(b, 24, 1 << 40),
        ),
        m(
            "header",
            "image-too-big",
            "size 2^63 - 512 (needs more than INT_MAX L1 entries)",
            ReadOnly,
            &["Image is too big"],
            Refuses("Image is too big"),
            |b, _| put64(b, 24, (1u64 << 63) - 512),
        ),
        m(
            "header",
            "snapshots-too-many",
            "nb_snapshots 65537",
            ReadOnly,
            &["Snapshot table too large", "65537"],
            Refuses("Snapshot table too large"),
            |b, _| put32(b, 60, 65537),
        ),
        m(
            "header",
            "snapshots-offset-unaligned",
            "nb_snapshots 1 at snapshots_offset 0x10200",
            ReadOnly,
            &["Snapshot table offset invalid", "0x10200"],
            Refuses("Snapshot table offset invalid"),
            |b, _| {
                put32(b, 60, 1);
                put64(b, 64, 0x10200)
            },
        ),
        m(
            "header",
            "unknown-incompatible-bit",
            "incompatible_features bit 63",
            ReadOnly,
            &["Unknown incompatible feature: 8000000000000000"],
            Refuses("Unknown incompatible feature: 8000000000000000"),
            |b, _| b[72] |= 0x80,
        ),
        m(
            "header",
            "compression-bit-zlib",
            "incompatible bit 3 with compression_type 0",
            ReadOnly,
            &["Compression type incompatible feature bit must not be set"],
            Refuses("Compression type incompatible feature bit must not be set"),
            |b, _| b[79] |= 0x08,
        ),
        m(
            "header",
            "compression-type-7",
            "compression_type 7",
            ReadOnly,
            &["unknown compression type: 7"],
            Refuses("unknown compression type: 7"),
            |b, _| b[104] = 7,
        ),
        m(
            "header",
            "zstd-without-bit",
            "compression_type 1 (zstd) without incompatible bit 3",
            ReadOnly,
            &["Compression type incompatible feature bit must be set"],
            Refuses("Compression type incompatible feature bit must be set"),
            |b, _| b[104] = 1,
        ),
        m(
            "header",
            "corrupt-bit",
            "incompatible bit 1 (corrupt): read-write refused",
            ReadWrite,
            &["Image is corrupt; cannot be opened read/write"],
            Opens,
            |b, _| b[79] |= 0x02,
        ),
        m(
            "header",
            "dirty-bit",
            "incompatible bit 0 (dirty, lazy refcounts): qdirty refuses to \
           write (QEMU repairs)",
            ReadWrite,
            &["dirty", "qemu-img check -r all"],
            Opens,
            |b, _| b[79] |= 0x01,
        ),
        // ---- extensions and reading the directory (steps 2, 5, 6) ----
        m(
            "extension",
            "ext-length-overflow",
            "first extension length 0xFFFF0000",
            ReadOnly,
            &["Header extension too large", "4294901760"],
            Refuses("Header extension too large"),
            |b, l| put32(b, l.first_ext + 4, 0xFFFF_0000),
        ),
        m(
            "extension",
            "ext-header-beyond-area",
            "backing_file_offset = header_length + 4: the \
           first extension header does not fit",
            ReadOnly,
            &["Header extension too large"],
            Refuses("Header extension too large"),
            |b, l| {
                put64(b, 8, l.header_length as u64 + 4);
                put32(b, 16, 0)
            },
        ),
        m(
            "extension",
            "backing-format-too-long",
            "first extension turned into a backing format \
           extension of its length (>= 16)",
            ReadOnly,
            &["ext_backing_format: len=", "too large"],
            Refuses("ext_backing_format: len="),
            |b, l| put32(b, l.first_ext, 0xE279_2ACA),
        ),
        m(
            "extension",
            "crypto-without-luks",
            "first extension turned into a crypto header \
           pointer with crypt_method 0",
            ReadOnly,
            &[
                "CRYPTO header extension only expected with LUKS",
                "crypt_method is 0",
            ],
            Refuses("CRYPTO header extension only expected with LUKS"),
            |b, l| put32(b, l.first_ext, 0x0537_BE77),
        ),
        m(
            "extension",
            "bitmaps-ext-length",
            "bitmaps extension length 32",
            ReadOnly,
            &["bitmaps_ext: Invalid extension length", "32"],
            Refuses("bitmaps_ext: Invalid extension length"),
            |b, l| put32(b, l.bitmaps_ext + 4, 32),
        ),
        m(
            "extension",
            "bitmaps-ext-reserved",
            "bitmaps extension reserved32 = 0x1",
            ReadOnly,
            &["bitmaps_ext: Reserved field is not zero", "0x1"],
            Refuses("bitmaps_ext: Reserved field is not zero"),
            |b, l| put32(b, l.bitmaps_ext + 12, 1),
        ),
        m(
            "extension",
            "nb-bitmaps-zero",
            "nb_bitmaps 0",
            ReadOnly,
            &["found bitmaps extension with zero bitmaps"],
            Refuses("found bitmaps extension with zero bitmaps"),
            |b, l| put32(b, l.bitmaps_ext + 8, 0),
        ),
        m(
            "extension",
            "nb-bitmaps-65536",
            "nb_bitmaps 65536",
            ReadOnly,
            &["Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"],
            Refuses("exceeding the QEMU supported maximum of 65535"),
            |b, l| put32(b, l.bitmaps_ext + 8, 65536),
        ),
        m(
            "extension",
            "dir-offset-unaligned",
            "bitmap_directory_offset + 8",
            ReadOnly,
            &[
                "invalid bitmap directory offset",
                "not a multiple of the cluster size",
            ],
            Refuses("invalid bitmap directory offset"),
            |b, l| put64(b, l.bitmaps_ext + 24, l.dir_offset + 8),
        ),
        m(
            "extension",
            "dir-size-over-max",
            "bitmap_directory_size 67107841",
            ReadOnly,
            &["bitmap directory size (67107841) exceeds the maximum supported size (67107840)"],
            Refuses("exceeds the maximum supported size"),
            |b, l| put64(b, l.bitmaps_ext + 16, 67_107_841),
        ),
        m(
            "extension",
            "dir-size-zero",
            "bitmap_directory_size 0",
            ReadOnly,
            &["Requested bitmap directory size is zero"],
            Refuses("Requested bitmap directory size is zero"),
            |b, l| put64(b, l.bitmaps_ext + 16, 0),
        ),
        m(
            "extension",
            "dir-beyond-eof",
            "bitmap_directory_offset 1 TiB (beyond the file)",
            ReadOnly,
            &["Failed to read bitmap directory"],
            // QEMU reads beyond EOF as zeros and then fails on the zero entry.
            Refuses("doesn't satisfy the constraints"),
            |b, l| put64(b, l.bitmaps_ext + 24, 1 << 40),
        ),
        m(
            "extension",
            "dir-size-max-short-file",
            "bitmap_directory_size 67107840 (the maximum) \
           in a file of a few hundred KiB",
            ReadOnly,
            &["Failed to read bitmap directory"],
            // QEMU reads beyond EOF as zeros: 65535 zero entries where nb_bitmaps says 3.
            Refuses("More bitmaps found than specified in header extension"),
            |b, l| put64(b, l.bitmaps_ext + 16, 67_107_840),
        ),
        // ---- directory (step 6) ----
        m(
            "directory",
            "less-bitmaps",
            "nb_bitmaps one more than the entries",
            ReadOnly,
            &[
                "Less bitmaps found than specified in header extension",
                "found 3",
                "nb_bitmaps is 4",
            ],
            Refuses("Less bitmaps found than specified in header extension"),
            |b, l| put32(b, l.bitmaps_ext + 8, l.entries.len() as u32 + 1),
        ),
        m(
            "directory",
            "more-bitmaps",
            "nb_bitmaps one less than the entries",
            ReadOnly,
            &[
                "More bitmaps found than specified in header extension",
                "entry 2",
            ],
            Refuses("More bitmaps found than specified in header extension"),
            |b, l| put32(b, l.bitmaps_ext + 8, l.entries.len() as u32 - 1),
        ),
        m(
            "directory",
            "dir-truncated",
            "bitmap_directory_size 8 bytes short (last entry cut)",
            ReadOnly,
            &["Broken bitmap directory", "entry 2"],
            Refuses("Broken bitmap directory"),
            |b, l| put64(b, l.bitmaps_ext + 16, l.dir_size - 8),
        ),
        m(
            "directory",
            "dir-trailing-bytes",
            "bitmap_directory_size 8 bytes long (trailing \
           partial entry)",
            ReadOnly,
            &["Broken bitmap directory", "entry 3"],
            Refuses("Broken bitmap directory"),
            |b, l| {
                pad_cluster(b, l);
                put64(b, l.bitmaps_ext + 16, l.dir_size + 8)
            },
        ),
        m(
            "directory",
            "name-size-overflows-dir",
            "entry 1 name_size 0xFFFF (runs past the \
           directory)",
            ReadOnly,
            &["Broken bitmap directory", "entry 1", "name_size 65535"],
            Refuses("Broken bitmap directory"),
            |b, l| put16(b, l.entries[1].pos + 18, 0xFFFF),
        ),
        m(
            "directory",
            "extra-data",
            "last entry extra_data_size 8, directory 8 bytes longer",
            ReadOnly,
            &[
                "Bitmap extra data is not supported",
                "entry 2",
                "extra_data_size 8",
            ],
            Refuses("Bitmap extra data is not supported"),
            |b, l| {
                pad_cluster(b, l);
                put32(b, l.entries[2].pos + 20, 8);
                put64(b, l.bitmaps_ext + 16, l.dir_size + 8)
            },
        ),
        m(
            "directory",
            "table-size-zero",
            "b1 table_size 0",
            ReadOnly,
            &[
                "Bitmap 'b1' doesn't satisfy the constraints",
                "table_size is 0",
            ],
            Refuses("Bitmap 'b1' doesn't satisfy the constraints"),
            move |b, l| put32(b, e(l, 1) + 8, 0),
        ),
        m(
            "directory",
            "table-offset-zero",
            "b1 table_offset 0",
            ReadOnly,
            &[
                "Bitmap 'b1' doesn't satisfy the constraints",
                "table_offset is 0",
            ],
            Refuses("Bitmap 'b1' doesn't satisfy the constraints"),
            move |b, l| put64(b, e(l, 1), 0),
        ),
        m(
            "directory",
            "table-offset-unaligned",
            "b0 table_offset + 512",
            ReadOnly,
            &[
                "Bitmap 'b0' doesn't satisfy the constraints",
                "table_offset",
                "not a multiple",
            ],
            Refuses("Bitmap 'b0' doesn't satisfy the constraints"),
            move |b, l| put64(b, e(l, 0), by(l, 0).table_offset + 512),
        ),
        m(
            "directory",
            "table-size-over-max",
            "b2 table_size 0x8000001",
            ReadOnly,
            &[
                "Bitmap 'b2' doesn't satisfy the constraints",
                "table_size 134217729 exceeds",
            ],
            Refuses("Bitmap 'b2' doesn't satisfy the constraints"),
            move |b, l| put32(b, e(l, 2) + 8, 0x800_0001),
        ),
        m(
            "directory",
            "granularity-8",
            "b0 granularity_bits 8",
            ReadOnly,
            &[
                "Bitmap 'b0' doesn't satisfy the constraints",
                "granularity_bits 8 is outside 9..31",
            ],
            Refuses("Bitmap 'b0' doesn't satisfy the constraints"),
            move |b, l| b[e(l, 0) + 17] = 8,
        ),
        m(
            "directory",
            "granularity-32",
            "b1 granularity_bits 32",
            ReadOnly,
            &[
                "Bitmap 'b1' doesn't satisfy the constraints",
                "granularity_bits 32 is outside 9..31",
            ],
            Refuses("Bitmap 'b1' doesn't satisfy the constraints"),
            move |b, l| b[e(l, 1) + 17] = 32,
        ),
        m(
            "directory",
            "reserved-flags",
            "b2 flags bit 2 (extra_data_compatible) set",
            ReadOnly,
            &[
                "Bitmap 'b2' doesn't satisfy the constraints",
                "reserved bits set (0x4)",
            ],
            Refuses("Bitmap 'b2' doesn't satisfy the constraints"),
            move |b, l| b[e(l, 2) + 15] |= 0x04,
        ),
        m(
            "directory",
            "name-size-1024",
            "last entry name_size 1024 (zero bytes), directory \
           grown to hold it",
            ReadOnly,
            &["doesn't satisfy the constraints", "name_size 1024 exceeds"],
            Refuses("doesn't satisfy the constraints"),
            |b, l| {
                let p = l.entries[2].pos;
                if b.len() < p + 24 + 1024 {
                    b.resize(p + 24 + 1024, 0)
                }
                for x in &mut b[p + 24..p + 24 + 1024] {
                    *x = 0
                }
                put16(b, p + 18, 1024);
                let new_size = (p - l.dir_offset as usize) + 24 + 1024;
                put64(b, l.bitmaps_ext + 16, new_size as u64);
            },
        ),
        m(
            "directory",
            "type-2",
            "b0 type 2",
            ReadOnly,
            &[
                "Bitmap 'b0' doesn't satisfy the constraints",
                "type 2 is not 1",
            ],
            Refuses("Bitmap 'b0' doesn't satisfy the constraints"),
            move |b, l| b[e(l, 0) + 16] = 2,
        ),
        m(
            "directory",
            "phys-size-over-512m",
            "b1 table_size 8193 (8193 * 64 KiB > 512 MiB)",
            ReadOnly,
            &[
                "Bitmap 'b1' doesn't satisfy the constraints",
                "exceeds the maximum of 536870912",
            ],
            Refuses("Bitmap 'b1' doesn't satisfy the constraints"),
            move |b, l| put32(b, e(l, 1) + 8, 8193),
        ),
        m(
            "directory",
            "table-too-small",
            "disk size 1 TiB (l1_size grown to match): b1's one \
           table cluster at 512 B granularity covers 256 MiB",
            ReadOnly,
            &[
                "doesn't satisfy the constraints",
                "is too small",
                "1099511627776",
            ],
            Refuses("doesn't satisfy the constraints"),
            |b, _| {
                put64(b, 24, 1 << 40);
                put32(b, 36, 2048)
            },
        ),
        m(
            "directory",
            "duplicate-name",
            "b1 renamed b0",
            ReadOnly,
            &["Bitmap already exists: b0"],
            Refuses("Bitmap already exists: b0"),
            move |b, l| b[e(l, 1) + 25] = b'0',
        ),
        // ---- tables (step 8) ----
        m(
            "table",
            "table-entry-reserved",
            "b0 table entry 0 with reserved bit 1",
            ReadOnly,
            &["b0", "entry 0", "reserved bits 0x2"],
            Refuses("b0"),
            |b, l| {
                let p = by(l, 0).table_offset as usize;
                b[p + 7] |= 0x02
            },
        ),
        m(
            "table",
            "table-entry-unaligned",
            "b2 data cluster offset + 512",
            ReadOnly,
            &["b2", "not a multiple of the cluster size"],
            Refuses("b2"),
            |b, l| {
                let p = by(l, 2).data_table_entry.unwrap();
                let v = be_u64(b, p);
                put64(b, p, v + 512)
            },
        ),
        m(
            "table",
            "table-entry-ones-with-offset",
            "b0 data cluster entry with the all-ones bit",
            ReadOnly,
            &["b0", "all-ones flag"],
            Refuses("b0"),
            |b, l| {
                let p = by(l, 0).data_table_entry.unwrap();
                b[p + 7] |= 0x01
            },
        ),
        m(
            "table",
            "table-size-mismatch",
            "b1 table_size 2 (a 64 MiB disk needs 1)",
            ReadOnly,
            &[
                "Could not read bitmap 'b1' from image: Invalid argument",
                "bitmap_table_size is 2",
            ],
            Refuses("Could not read bitmap 'b1' from image: Invalid argument"),
            move |b, l| put32(b, e(l, 1) + 8, 2),
        ),
        m(
            "table",
            "table-beyond-eof",
            "b2 table_offset 1 TiB",
            ReadOnly,
            // QEMU reads the table beyond EOF as zeros: an empty bitmap. qdirty refuses.
            &["b2", "Could not read bitmap_table"],
            Opens,
            move |b, l| put64(b, e(l, 2), 1 << 40),
        ),
        m(
            "table",
            "data-cluster-beyond-eof",
            "b0 data cluster at 1 TiB",
            ReadOnly,
            // QEMU reads the data beyond EOF as zeros. qdirty refuses.
            &["Could not read bitmap 'b0'"],
            Opens,
            |b, l| {
                let p = by(l, 0).data_table_entry.unwrap();
                put64(b, p, 1 << 40)
            },
        ),
        // ---- refcount structures (docs/format.md, 'Refcounts and allocation'): found when
        // qdirty allocates ----
        m(
            "refcount",
            "reftable-reserved-bits",
            "refcount table entry 0 with reserved bit 0",
            ReadWrite,
            &["Refcount table entry 0 has reserved bits set"],
            Opens,
            |b, l| {
                let p = l.reftable_offset as usize;
                b[p + 7] |= 0x01
            },
        ),
        m(
            "refcount",
            "refblock-unaligned",
            "refcount table entry 0 + 512 (unaligned refblock)",
            ReadWrite,
            &["Refblock offset", "unaligned", "reftable index: 0x0"],
            Opens,
            |b, l| {
                let p = l.reftable_offset as usize;
                let v = be_u64(b, p);
                put64(b, p, v + 512)
            },
        ),
        m(
            "refcount",
            "refblock-beyond-eof",
            "refcount table entry 0 points at 1 TiB",
            ReadWrite,
            &["refcount block"],
            Opens,
            |b, l| put64(b, l.reftable_offset as usize, 1 << 40),
        ),
        m(
            "refcount",
            "reftable-beyond-eof",
            "refcount_table_offset 1 TiB (aligned)",
            ReadWrite,
            &["refcount table"],
            Opens,
            |b, _| put64(b, 48, 1 << 40),
        ),
        m(
            "refcount",
            "reftable-max-short-file",
            "refcount_table_clusters 128 (8 MiB, the \
           maximum) in a short file",
            ReadWrite,
            &["refcount table"],
            Opens,
            |b, _| put32(b, 56, 128),
        ),
    ]
}

/// The entry of bitmap `b{i}` (qdirty and QEMU order the directory differently).
fn by(l: &Layout, i: usize) -> &EntryPos {
    let name = format!("b{i}");
    l.entries
        .iter()
        .find(|e| e.name == name)
        .expect("base bitmap")
}

/// Appends a cluster of zeros, so that a directory at the end of the file can grow by a few
/// bytes and still be read (QEMU reads zeros beyond EOF, qdirty refuses short reads).
fn pad_cluster(b: &mut Vec<u8>, l: &Layout) {
    b.resize(b.len() + l.cs as usize, 0);
}

/// `qemu-img info` on the image: (exit code, stderr).
fn qemu_info(img: &Path) -> (i32, String) {
    let (dir, base) = split(img);
    let out = run("qemu-img", &["info", "-f", "qcow2", &base], &dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the whole corpus on one base image; returns (mutation, peak KiB) rows.
fn run_corpus(base: &Path, with_qemu: bool, tmp: &TempDir) -> Vec<(String, u64)> {
    let bytes = read_file(base);
    let lay = layout(&bytes);
    assert_eq!(lay.entries.len(), 3);
    assert!(by(&lay, 0).data_table_entry.is_some() && by(&lay, 2).data_table_entry.is_some());
    assert!(lay.entries.iter().all(|e| e.table_size == 1));
    // The valid base opens, in both modes, within the cap.
    let copy = tmp.path().join("base-copy.qcow2");
    std::fs::write(&copy, &bytes).unwrap();
    let ok = run_child(&copy, Mode::ReadOnly);
    assert!(ok.error.is_none(), "base image: {:?}", ok.error);
    let mut rows = vec![("(valid base, read-only)".to_string(), ok.hwm_kib)];
    let mut failures = Vec::new();
    for mu in mutations() {
        let mut b = bytes.clone();
        (mu.patch)(&mut b, &lay);
        let img = tmp.path().join(format!("{}.qcow2", mu.name));
        std::fs::write(&img, &b).unwrap();
        let r = run_child(&img, mu.mode);
        let label = format!("{}/{}", mu.class, mu.name);
        match &r.error {
            None => failures.push(format!("{label} ({}): qdirty accepted it", mu.what)),
            Some(msg) => {
                for s in &mu.expect {
                    if !msg.contains(s) {
                        failures.push(format!("{label}: error lacks {s:?}: {msg}"));
                    }
                }
            }
        }
        if r.hwm_kib >= MEM_CAP_KIB {
            failures.push(format!("{label}: peak memory {} KiB", r.hwm_kib));
        }
        if with_qemu {
            let (code, stderr) = qemu_info(&img);
            match mu.qemu {
                Qemu::Refuses(s) if code == 0 || !stderr.contains(s) => failures.push(format!(
                    "{label}: expected QEMU to refuse with {s:?}, got exit {code}: {stderr}"
                )),
                Qemu::Opens if code != 0 => failures.push(format!(
                    "{label}: expected QEMU to open it, got exit {code}: {stderr}"
                )),
                _ => {}
            }
        }
        rows.push((label, r.hwm_kib));
        let _ = std::fs::remove_file(&img);
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    rows
}

fn report(rows: &[(String, u64)], what: &str) {
    let max = rows.iter().max_by_key(|r| r.1).expect("rows");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "hostile corpus ({what}): {} images, peak VmHWM max {} KiB ({}), valid base {} KiB, cap {} KiB\n",
            rows.len() - 1,
            max.1,
            max.0,
            rows[0].1,
            MEM_CAP_KIB
        )
        .as_bytes(),
    );
}

#[test]
fn hostile_corpus_qdirty_base() {
    if std::env::var("QDIRTY_HOSTILE_CHILD").is_ok() {
        return;
    }
    let tmp = TempDir::new("hostile-qd");
    let base = qdirty_base(tmp.path());
    let with_qemu = have_tool("qemu-img");
    let rows = run_corpus(&base, with_qemu, &tmp);
    report(&rows, "qdirty-made base");
}

#[test]
fn hostile_corpus_qemu_base() {
    if std::env::var("QDIRTY_HOSTILE_CHILD").is_ok() || !require_qemu("hostile_corpus_qemu_base") {
        return;
    }
    let tmp = TempDir::new("hostile-qemu");
    let base = qemu_base(tmp.path());
    let rows = run_corpus(&base, true, &tmp);
    report(&rows, "QEMU-made base");
}

// ------------------------------------------------------------------------------------------
// Read-write sessions never make an accepted image worse
// ------------------------------------------------------------------------------------------

/// The problems `qemu-img check` (human output) lists: leaked clusters, errors, corruptions.
fn check_findings(img: &Path) -> (std::collections::BTreeSet<String>, CheckResult) {
    let (dir, base) = split(img);
    let out = run("qemu-img", &["check", "-f", "qcow2", &base], &dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let set = text
        .lines()
        .filter(|l| l.starts_with("Leaked cluster") || l.contains("ERROR") || l.contains("Warning"))
        .map(str::to_string)
        .collect();
    (set, qemu_img_check(img))
}

/// A qdirty read-write session with every kind of operation: load everything, add a persistent
/// bitmap, set bits through the write hook and directly, merge, remove one stored bitmap
/// (in_use ones included: removal is allowed on them), store, close; then a second session.
fn rw_sessions(img: &Path) {
    let mut im = Image::open(img, true).unwrap_or_else(|e| panic!("rw open: {e}"));
    let names: Vec<Vec<u8>> = im
        .bitmap_ids()
        .into_iter()
        .filter_map(|id| im.bitmap(id).and_then(|b| b.name().map(<[u8]>::to_vec)))
        .collect();
    let id = im
        .add_bitmap(
            b"session",
            65536,
            AddOptions {
                persistent: true,
                ..Default::default()
            },
        )
        .expect("add");
    im.write_hook().set(4 << 20, 1 << 20);
    im.bitmap_mut(id).unwrap().set_dirty(0, 65536).unwrap();
    for n in &names {
        let _ = im.merge_bitmap(b"session", n);
    }
    if let Some(n) = names.first() {
        im.remove_bitmap(n).expect("remove");
    }
    im.store_bitmaps().expect("store");
    im.close().expect("close");
    let mut im = Image::open(img, true).expect("second rw open");
    im.set_dirty(8 << 20, 4096);
    im.close().expect("second close");
}

#[test]
fn rw_sessions_never_make_images_worse() {
    if std::env::var("QDIRTY_HOSTILE_CHILD").is_ok()
        || !require_qemu("rw_sessions_never_make_images_worse")
    {
        return;
    }
    let tmp = TempDir::new("hostile-worse");
    // Each case: an image QEMU accepts, with a pre-existing problem.
    type Prep = fn(&Path);
    let cases: Vec<(&str, Prep)> = vec![
        ("in_use bitmaps (qemu-io abort)", |img| {
            qemu_io_abort(img, &["write 0 64k".to_string()]);
        }),
        (
            "leaked clusters (bitmaps extension dropped by a bitmap-unaware writer)",
            |img| {
                // Clear autoclear bit 0 and let QEMU drop the extension: the directory, tables and
                // data clusters leak.
                let mut b = read_file(img);
                b[95] &= !1;
                std::fs::write(img, &b).unwrap();
                qemu_io(img, &["write 2M 64k".to_string()]);
                qemu_img_bitmap_add(img, "later", None, false);
            },
        ),
        (
            "leaked cluster (refcount of an unreferenced cluster raised)",
            |img| {
                // Raise the refcount of the first cluster past the end of the file (16-bit
                // refcounts, refblock 0 covers it): a leak QEMU reports.
                let b = read_file(img);
                let cs = 1u64 << be_u32(&b, 20);
                let rt = be_u64(&b, 48);
                let rb = be_u64(&b, rt as usize);
                let idx = b.len() as u64 / cs;
                let mut f = b.clone();
                f[(rb + 2 * idx) as usize + 1] = 1;
                f.resize(b.len() + cs as usize, 0);
                std::fs::write(img, &f).unwrap();
            },
        ),
        ("unknown autoclear bit 5 and compatible bit 7", |img| {
            let mut b = read_file(img);
            b[95] |= 0x20;
            b[87] |= 0x80;
            std::fs::write(img, &b).unwrap();
        }),
    ];
    for (i, (what, prep)) in cases.into_iter().enumerate() {
        let img = tmp.path().join(format!("worse-{i}.qcow2"));
        qemu_img_create(&img, DISK, "", &[]);
        qemu_img_bitmap_add(&img, "b0", Some(65536), false);
        qemu_img_bitmap_add(&img, "b1", Some(512), true);
        qemu_io_write(&img, &[(0, 1 << 20)]);
        prep(&img);
        let (before, cb) = check_findings(&img);
        assert_eq!(
            cb.corruptions, 0,
            "{what}: the prepared image is corrupt: {cb}"
        );
        let copy = tmp.path().join(format!("worse-{i}-orig.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        rw_sessions(&img);
        let (after, ca) = check_findings(&img);
        let new: Vec<_> = after.difference(&before).collect();
        assert!(
            new.is_empty() && ca.corruptions == 0 && ca.check_errors == 0 && ca.leaks <= cb.leaks,
            "{what}: qemu-img check found new problems after qdirty sessions: {new:?}\nbefore: {cb}\nafter: {ca}"
        );
        let (code, out) = qemu_img_compare(&copy, &img);
        assert_eq!(code, 0, "{what}: guest data changed: {out}");
    }
}

// ------------------------------------------------------------------------------------------
// Table entries that name other metadata: stores and removals are refused, nothing is freed
// ------------------------------------------------------------------------------------------

/// A QEMU-made image with an internal snapshot "s1" and bitmaps "b" and "c" (64 KiB granularity,
/// both dirty over 0..1 MiB), then bitmap "b"'s first data cluster (its first non-zero table
/// entry) patched to name other metadata. qdirty opens it read-write, changes "b" (cleared: every old cluster is freed; or
/// one more bit: one entry is rewritten) or removes it; the store or removal must fail naming
/// what it was about to free and what lives there, and `qemu-img check` must find nothing new
/// (QEMU itself, `qemu-img bitmap --clear` on the same image, frees the refcount table).
#[test]
fn table_entries_naming_metadata_are_refused() {
    if std::env::var("QDIRTY_HOSTILE_CHILD").is_ok()
        || !require_qemu("table_entries_naming_metadata_are_refused")
    {
        return;
    }
    let tmp = TempDir::new("hostile-overlap");
    let base = tmp.join("base.qcow2");
    qemu_img_create(&base, DISK, "", &[]);
    qemu_io_write(&base, &[(0, 1 << 20)]);
    let (dir, name) = split(&base);
    run_ok("qemu-img", &["snapshot", "-c", "s1", &name], &dir);
    qemu_img_bitmap_add(&base, "b", Some(65536), false);
    qemu_img_bitmap_add(&base, "c", Some(65536), false);
    qemu_io_write(&base, &[(0, 1 << 20)]);
    assert_check_clean(&base, "base");
    let bytes = read_file(&base);
    let l = layout(&bytes);
    let entry = |name: &str| l.entries.iter().find(|e| e.name == name).unwrap().clone();
    let (b, c) = (entry("b"), entry("c"));
    let b_data = b.data_table_entry.expect("b has a data cluster");
    let c_data = be_u64(&bytes, c.data_table_entry.expect("c has a data cluster"));
    let l1 = be_u64(&bytes, 40);
    let refblock0 = be_u64(&bytes, l.reftable_offset as usize);
    // The snapshot table (header offset 64), the snapshot's L1 table (first field of its
    // entry), and the L2 table of its first L1 entry (the active L2 was copied on write since).
    let snapshots = be_u64(&bytes, 64);
    let snap_l1 = be_u64(&bytes, snapshots as usize);
    let snap_l2 = be_u64(&bytes, snap_l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let l2 = be_u64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(snap_l2, l2);
    let targets = [
        (l.reftable_offset, "the refcount table"),
        (refblock0, "refcount block 0"),
        (l1, "the L1 table"),
        (l2, "an L2 table ("),
        (c.table_offset, "the table of bitmap 'c'"),
        (c_data, "data cluster 0 of bitmap 'c'"),
        (snapshots, "the snapshot table"),
        (snap_l1, "the L1 table of snapshot 's1'"),
        (snap_l2, "an L2 table of snapshot 's1'"),
    ];
    for (target, what) in targets {
        for op in ["clear", "set", "remove"] {
            let img = tmp.join(&format!("overlap-{target:x}-{op}.qcow2"));
            let mut b2 = bytes.clone();
            put64(&mut b2, b_data, target);
            std::fs::write(&img, &b2).unwrap();
            let (before, cb) = check_findings(&img);
            let mut im = Image::open(&img, true).unwrap_or_else(|e| panic!("rw open: {e}"));
            let id = im.find_bitmap(b"b").unwrap();
            let err = match op {
                "clear" => {
                    im.bitmap_mut(id).unwrap().clear().unwrap();
                    im.close().unwrap_err()
                }
                "set" => {
                    im.bitmap_mut(id)
                        .unwrap()
                        .set_dirty(DISK - 4096, 1)
                        .unwrap();
                    im.close().unwrap_err()
                }
                _ => {
                    let e = im.remove_bitmap(b"b").unwrap_err();
                    drop(im);
                    e
                }
            };
            let msg = err.to_string();
            assert!(
                msg.contains("Refusing to free data cluster 0 of bitmap 'b'")
                    && msg.contains(what)
                    && msg.contains(&format!("{target:#x}")),
                "{what}, {op}: {msg}"
            );
            let (after, ca) = check_findings(&img);
            let new: Vec<_> = after.difference(&before).collect();
            assert!(
                new.is_empty()
                    && ca.corruptions <= cb.corruptions
                    && ca.leaks <= cb.leaks
                    && ca.check_errors == 0,
                "{what}, {op}: qemu-img check found new problems: {new:?}\nbefore: {cb}\nafter: {ca}"
            );
            // The patched entry is still there: nothing was freed or rewritten.
            assert_eq!(be_u64(&read_file(&img), b_data), target, "{what}, {op}");
        }
    }
}
