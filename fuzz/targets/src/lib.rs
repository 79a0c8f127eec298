//! The fuzz targets' bodies, shared by the cargo-fuzz binaries (fuzz/fuzz_targets/*.rs) and by
//! the plain `cargo test` replay and mutation loop (tests/hostile_fuzz.rs). Each function must never panic, whatever the bytes; every
//! invariant it checks is an `assert!` (a finding).

use qdirty::format::bitmap_dir::{encode_directory, parse_directory};
use qdirty::format::bitmap_table::{decode_table, encode_table};
use qdirty::format::extension::{encode_header_cluster, Extensions};
use qdirty::format::header::Header;
use qdirty::image::fault::FaultyStorage;
use qdirty::image::storage::MemStorage;
use qdirty::{AddOptions, Image, OpenOptions};

/// Largest file the read-write storage grows to: writes beyond it fail with ENOSPC (a hostile
/// refcount structure must not make qdirty write gigabytes).
pub const MAX_FILE: usize = 64 << 20;

/// Header + extensions parser: parse, and for v3 headers that parse re-encode cluster 0 and
/// parse the result again (it must parse, with the same fields).
pub fn header_and_extensions(data: &[u8]) {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let mut buf = data.to_vec();
    let cs = h.cluster_size() as usize;
    if buf.len() < cs {
        buf.resize(cs, 0);
    }
    let _ = Extensions::feature_table_lenient(&buf, &h);
    let Ok(exts) = Extensions::parse(&buf, &h) else {
        return;
    };
    let _ = h.check_incompatible(exts.feature_table.as_deref());
    let Ok(backing) = Extensions::backing_file_name(&buf, &h) else {
        return;
    };
    if h.version != 3 {
        return;
    }
    let Ok(cluster) = encode_header_cluster(&h, &exts, backing.as_deref()) else {
        return;
    };
    assert_eq!(cluster.len(), cs, "the header cluster is one cluster");
    let h2 = Header::parse(&cluster).expect("re-encoded header parses");
    // QEMU writes the size rounded down to whole 512-byte sectors.
    assert_eq!(h2.size, h.size / 512 * 512);
    assert_eq!(h2.cluster_bits, h.cluster_bits);
    // Unknown autoclear bits are dropped on a rewrite (QEMU clears them on every writable open).
    assert_eq!(h2.autoclear_features & 3, h.autoclear_features & 3);
    let exts2 = Extensions::parse(&cluster, &h2).expect("re-encoded extensions parse");
    // QEMU writes reserved32 as 0; the other fields survive a rewrite.
    let key = |e: &Extensions| {
        e.bitmaps.map(|b| {
            (
                b.nb_bitmaps,
                b.bitmap_directory_size,
                b.bitmap_directory_offset,
            )
        })
    };
    assert_eq!(
        key(&exts2),
        key(&exts),
        "bitmaps extension survives a rewrite"
    );
    // The name survives up to its first NUL (QEMU uses it as a C string).
    let cut = |n: Option<Vec<u8>>| n.map(|n| n.split(|&c| c == 0).next().unwrap_or(&[]).to_vec());
    assert_eq!(
        cut(Extensions::backing_file_name(&cluster, &h2).expect("backing name parses")),
        cut(backing)
    );
}

/// Bitmap directory: bytes 0..4 nb_bitmaps, byte 4 cluster_bits (mod 13 + 9), bytes 5..13 disk
/// size, the rest the directory. A directory that parses re-encodes to one that parses to the
/// same entries.
pub fn bitmap_directory(data: &[u8]) {
    if data.len() < 13 {
        return;
    }
    let nb = u32::from_be_bytes(data[0..4].try_into().unwrap());
    let cs = 1u64 << (9 + u32::from(data[4]) % 13);
    let disk = u64::from_be_bytes(data[5..13].try_into().unwrap());
    let dir = &data[13..];
    let Ok(entries) = parse_directory(dir, nb, cs, disk) else {
        return;
    };
    assert_eq!(entries.len() as u32, nb);
    let enc = encode_directory(&entries);
    assert_eq!(enc.len(), dir.len(), "entry sizes are kept");
    let again = parse_directory(&enc, nb, cs, disk).expect("re-encoded directory parses");
    assert_eq!(again, entries);
}

/// Bitmap table: byte 0 cluster_bits (mod 13 + 9), the rest the table (cut to whole entries).
/// A table that decodes encodes back to the same bytes.
pub fn bitmap_table(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let cs = 1u64 << (9 + u32::from(data[0]) % 13);
    let raw = &data[1..];
    let raw = &raw[..raw.len() / 8 * 8];
    if let Ok(t) = decode_table(raw, cs, b"fuzz") {
        assert_eq!(t.len(), raw.len() / 8);
        assert_eq!(encode_table(&t), raw, "a valid table round-trips");
    }
}

/// The whole cycle on an in-memory image: read-only open; read-write open, add/set/merge/remove,
/// store, close. An image that qdirty opened read-write and stored must open again (qdirty never
/// makes a valid image invalid), with the new bitmap's bits.
pub fn open_cycle(data: &[u8]) {
    // Read-only: nothing is written, so no size cap is needed.
    let storage = MemStorage {
        data: data.to_vec(),
    };
    if let Ok(mut img) = OpenOptions::new().open_storage(Box::new(storage), "ro") {
        for id in img.bitmap_ids() {
            let _ = img.bitmap_current(id).map(|b| b.count());
        }
        let _ = img.query();
        let _ = img.close();
    }
    // The handle keeps the bytes reachable once the storage is moved into the image; writes
    // ending past MAX_FILE fail with ENOSPC.
    let (storage, bytes) = FaultyStorage::new(data.to_vec());
    bytes.set_size_limit(Some(MAX_FILE as u64));
    let Ok(mut img) = OpenOptions::new()
        .read_write(true)
        .open_storage(Box::new(storage), "rw")
    else {
        return;
    };
    let size = img.size();
    let names: Vec<Vec<u8>> = img
        .bitmap_ids()
        .into_iter()
        .filter_map(|id| img.bitmap(id).and_then(|b| b.name().map(<[u8]>::to_vec)))
        .collect();
    let persistent = AddOptions {
        persistent: true,
        ..Default::default()
    };
    let added = img.add_bitmap(b"fuzz-new", 0, persistent).is_ok();
    if added && size > 0 {
        let id = img.find_bitmap(b"fuzz-new").expect("added");
        let _ = img
            .bitmap_mut(id)
            .expect("added")
            .set_dirty(0, size.min(1 << 20));
        img.set_dirty(size / 2, 1);
        if let Some(first) = names.first() {
            let _ = img.merge_bitmap(b"fuzz-new", first);
        }
    }
    if let Some(last) = names.last() {
        let _ = img.remove_bitmap(last);
    }
    let stored = img.store_bitmaps().is_ok();
    let closed = img.close().is_ok();
    if stored && closed && refcounts_consistent(data) {
        let data = bytes.live_image();
        let mut again = OpenOptions::new()
            .open_storage(Box::new(MemStorage { data }), "reopen")
            .unwrap_or_else(|e| panic!("an image qdirty stored no longer opens: {e}"));
        if added {
            let id = again
                .find_bitmap(b"fuzz-new")
                .expect("the stored bitmap is there");
            if size > 0 {
                assert!(
                    again.bitmap_current(id).unwrap().get(0),
                    "stored bits are kept"
                );
            }
        }
        let _ = again.close();
    }
}

/// Whether qdirty's own `qemu-img check` equivalent finds no corruption in the input: only then
/// must a stored image reopen (with refcounts that call used clusters free, any writer, QEMU
/// included, overwrites live metadata).
fn refcounts_consistent(data: &[u8]) -> bool {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "qdirty-fuzz-{}-{}.qcow2",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if std::fs::write(&p, data).is_err() {
        return false;
    }
    let ok = matches!(qdirty::image::check::check_bitmaps(&p, false), Ok(r) if r.corruptions == 0 && r.check_errors == 0);
    let _ = std::fs::remove_file(&p);
    ok
}

/// Seed inputs for every target, built with qdirty itself (small 512-byte-cluster images with
/// bitmaps that have data clusters). `dir` is a scratch directory.
pub fn seeds(dir: &std::path::Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (cluster, size)) in [(512u32, 1u64 << 20), (4096, 4 << 20), (65536, 64 << 20)]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("seed{i}.qcow2"));
        let _ = std::fs::remove_file(&p);
        Image::create(&p, size, cluster).expect("create seed");
        let mut img = Image::open(&p, true).expect("open seed");
        for (name, g, off) in [("a", 512u64, 0u64), ("b", 4096, size / 3), ("c", 65536, 0)] {
            let id = img
                .add_bitmap(
                    name.as_bytes(),
                    g,
                    AddOptions {
                        persistent: true,
                        disabled: name == "c",
                        autoload: None,
                    },
                )
                .expect("add");
            if name != "c" {
                img.bitmap_mut(id).unwrap().set_dirty(off, 70_000).unwrap();
            }
        }
        img.close().expect("close seed");
        let bytes = std::fs::read(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        // Header target: the first cluster.
        out.push(("header", bytes[..cluster as usize].to_vec()));
        // Directory and table targets: read them out of the image.
        let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
        let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
        let mut pos = be32(100) as usize;
        while be32(pos) != 0 {
            if be32(pos) == 0x2385_2875 {
                let nb = be32(pos + 8);
                let dsize = be64(pos + 16) as usize;
                let doff = be64(pos + 24) as usize;
                let mut d = nb.to_be_bytes().to_vec();
                d.push((cluster.trailing_zeros() - 9) as u8);
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&bytes[doff..doff + dsize]);
                out.push(("directory", d));
                let toff = be64(doff) as usize;
                let tsize = be32(doff + 8) as usize;
                let mut t = vec![(cluster.trailing_zeros() - 9) as u8];
                t.extend_from_slice(&bytes[toff..toff + 8 * tsize]);
                out.push(("table", t));
            }
            pos += 8 + (be32(pos + 4) as usize).div_ceil(8) * 8;
        }
        if bytes.len() <= 1 << 20 {
            out.push(("open", bytes));
        }
    }
    out
}
