//! Broken QEMU-made images for the salvage tests (tests/salvage.rs, cli/tests/salvage.rs):
//! QEMU makes the image and its bitmaps, then one directory entry or table is damaged in a way
//! that makes QEMU refuse the whole image. Independent of qdirty's codecs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::qemu::*;
use crate::raw_header::*;
use crate::tools::*;

pub const SIZE: u64 = 64 << 20;

/// The bitmaps of the base image: (name, granularity).
pub const BITMAPS: &[(&str, u64)] = &[("b1", 65536), ("b2", 4096), ("b3", 512)];

/// A QEMU image with three bitmaps and guest writes recorded in them (b3 only sees the last
/// ones). Returns the dirty extents of every bitmap as nbdinfo shows them.
pub fn qemu_base(img: &Path) -> BTreeMap<String, Vec<(u64, u64)>> {
    qemu_img_create(img, SIZE, "cluster_size=65536", &[]);
    qemu_img_bitmap_add(img, "b1", Some(65536), false);
    qemu_img_bitmap_add(img, "b2", Some(4096), false);
    qemu_io_write(img, &[(0, 65536), (5 << 20, 12288), (40 << 20, 1 << 20)]);
    qemu_img_bitmap_add(img, "b3", Some(512), false);
    qemu_io_write(img, &[(1 << 20, 4096), (63 << 20, 512)]);
    BITMAPS
        .iter()
        .map(|(n, _)| (n.to_string(), nbd_dirty_extents(img, n)))
        .collect()
}

/// One directory entry, decoded here.
#[derive(Clone, Debug)]
pub struct Ent {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub gbits: u8,
    pub name: Vec<u8>,
    pub extra: Vec<u8>,
}

/// (directory offset, nb_bitmaps, entries).
pub fn read_dir(img: &Path) -> (u64, u32, Vec<Ent>) {
    let h = raw_header(img);
    let ext = h.ext(EXT_BITMAPS).expect("bitmaps extension");
    let nb = be_u32(ext, 0);
    let size = be_u64(ext, 8) as usize;
    let off = be_u64(ext, 16);
    let d = read_at(img, off, size);
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < d.len() {
        let e = &d[pos..];
        let ns = u16::from_be_bytes([e[18], e[19]]) as usize;
        let es = be_u32(e, 20) as usize;
        out.push(Ent {
            table_offset: be_u64(e, 0),
            table_size: be_u32(e, 8),
            flags: be_u32(e, 12),
            kind: e[16],
            gbits: e[17],
            extra: e[24..24 + es].to_vec(),
            name: e[24 + es..24 + es + ns].to_vec(),
        });
        pos += (24 + ns + es).next_multiple_of(8);
    }
    (off, nb, out)
}

/// Writes `entries` as the directory at the same offset and updates the extension (size, and
/// nb_bitmaps = `nb` or the entry count).
pub fn write_dir(img: &Path, entries: &[Ent], nb: Option<u32>) {
    let (off, _, _) = read_dir(img);
    let mut d = Vec::new();
    for e in entries {
        let start = d.len();
        d.extend_from_slice(&e.table_offset.to_be_bytes());
        d.extend_from_slice(&e.table_size.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
        d.push(e.kind);
        d.push(e.gbits);
        d.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        d.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        d.extend_from_slice(&e.extra);
        d.extend_from_slice(&e.name);
        d.resize(
            start + (24 + e.name.len() + e.extra.len()).next_multiple_of(8),
            0,
        );
    }
    assert!(d.len() <= 65536, "the directory must stay in its cluster");
    write_at(img, off, &d);
    let h = raw_header(img);
    let exts: Vec<(u32, Vec<u8>)> = h
        .extensions
        .iter()
        .map(|(m, data)| {
            if *m != EXT_BITMAPS {
                return (*m, data.clone());
            }
            let mut x = data.clone();
            x[0..4].copy_from_slice(&nb.unwrap_or(entries.len() as u32).to_be_bytes());
            x[8..16].copy_from_slice(&(d.len() as u64).to_be_bytes());
            (*m, x)
        })
        .collect();
    let unknown = h.cluster0[112..h.header_length as usize].to_vec();
    rewrite_header(img, &unknown, &exts);
}

/// A damage to apply to the base image.
pub struct Case {
    pub name: &'static str,
    /// Names of the bitmaps it breaks (in directory order).
    pub broken: &'static [&'static str],
    /// How broken bitmaps are listed (name, or "entry N").
    pub listed: &'static [&'static str],
    /// What QEMU says (a part of its message).
    pub qemu_says: &'static str,
    /// What qdirty's reason starts with.
    pub reason_starts: &'static str,
    pub apply: fn(&Path),
}

fn edit(img: &Path, i: usize, f: impl FnOnce(&mut Ent)) {
    let (_, _, mut es) = read_dir(img);
    f(&mut es[i]);
    write_dir(img, &es, None);
}

fn table_entry_or(img: &Path, i: usize, entry: u64, bits: u64) {
    let (_, _, es) = read_dir(img);
    let at = es[i].table_offset + entry * 8;
    let v = be_u64(&read_at(img, at, 8), 0) | bits;
    write_at(img, at, &v.to_be_bytes());
}

pub const CONSTRAINTS: &str = "Bitmap 'b2' doesn't satisfy the constraints";

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "reserved_flag",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: CONSTRAINTS,
            reason_starts:
                "Bitmap 'b2' doesn't satisfy the constraints: flags 0x6 has reserved bits set",
            apply: |p| edit(p, 1, |e| e.flags |= 4),
        },
        Case {
            name: "granularity_bits",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: CONSTRAINTS,
            reason_starts:
                "Bitmap 'b2' doesn't satisfy the constraints: granularity_bits 40 is outside 9..31",
            apply: |p| edit(p, 1, |e| e.gbits = 40),
        },
        Case {
            name: "table_offset_unaligned",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: CONSTRAINTS,
            reason_starts: "Bitmap 'b2' doesn't satisfy the constraints: table_offset",
            apply: |p| edit(p, 1, |e| e.table_offset += 512),
        },
        Case {
            name: "bad_type",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: CONSTRAINTS,
            reason_starts: "Bitmap 'b2' doesn't satisfy the constraints: type 2 is not 1",
            apply: |p| edit(p, 1, |e| e.kind = 2),
        },
        Case {
            name: "name_too_long",
            broken: &["b2"],
            listed: &["b2xxx"],
            qemu_says: "doesn't satisfy the constraints",
            reason_starts: "Bitmap 'b2xxx",
            apply: |p| {
                edit(p, 1, |e| {
                    e.name = b"b2".to_vec();
                    e.name.resize(1024, b'x');
                })
            },
        },
        Case {
            name: "extra_data",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: "Bitmap extra data is not supported",
            reason_starts:
                "Bitmap extra data is not supported: bitmap 'b2' (entry 1) has extra_data_size 8",
            apply: |p| edit(p, 1, |e| e.extra = vec![0; 8]),
        },
        Case {
            name: "empty_name",
            broken: &[""],
            listed: &["entry 1"],
            qemu_says: "Bitmap '' doesn't satisfy the constraints",
            reason_starts: "Bitmap '' doesn't satisfy the constraints: entry 1: granularity_bits 8",
            apply: |p| {
                edit(p, 1, |e| {
                    e.name.clear();
                    e.gbits = 8;
                })
            },
        },
        Case {
            name: "table_entry_reserved_bits",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: "Could not read bitmap_table table from image for bitmap 'b2'",
            reason_starts: "Could not read bitmap_table table from image for bitmap 'b2': entry 0",
            apply: |p| table_entry_or(p, 1, 0, 0x2),
        },
        Case {
            name: "table_size_wrong",
            broken: &["b2"],
            listed: &["b2"],
            qemu_says: "Could not read bitmap 'b2' from image",
            reason_starts:
                "Could not read bitmap 'b2' from image: Invalid argument (bitmap_table_size is 2",
            apply: |p| edit(p, 1, |e| e.table_size = 2),
        },
        Case {
            name: "two_broken",
            broken: &["b1", "b3"],
            listed: &["b1", "b3"],
            qemu_says: "Bitmap 'b1' doesn't satisfy the constraints",
            reason_starts: "",
            apply: |p| {
                edit(p, 0, |e| e.flags |= 0x80);
                table_entry_or(p, 2, 0, 1u64 << 60);
            },
        },
    ]
}

/// `qemu-img info IMG`: exit code and stderr.
pub fn qemu_info_refusal(img: &Path) -> (i32, String) {
    let (dir, base) = split(img);
    let o = run("qemu-img", &["info", "-f", "qcow2", &base], &dir);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The checks after the broken bitmaps were removed: QEMU opens the image, the remaining
/// bitmaps are listed with unchanged extents, only leaks (repaired by -r leaks), same guest data.
pub fn assert_recovered(
    img: &Path,
    pristine: &Path,
    reference: &BTreeMap<String, Vec<(u64, u64)>>,
    removed: &[&str],
    ctx: &str,
) {
    let (code, err) = qemu_info_refusal(img);
    assert_eq!(code, 0, "{ctx}: qemu-img info still refuses: {err}");
    let names: Vec<String> = qemu_img_info_bitmaps(img, false)
        .into_iter()
        .map(|b| b.name)
        .collect();
    let expect: Vec<String> = BITMAPS
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| !removed.contains(&n.as_str()))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, expect, "{ctx}: bitmaps QEMU lists");
    for n in &expect {
        assert_eq!(
            &nbd_dirty_extents(img, n),
            &reference[n],
            "{ctx}: extents of {n} changed"
        );
    }
    let c = qemu_img_check(img);
    assert!(
        c.corruptions == 0 && c.check_errors == 0 && (c.exit_code == 0 || c.exit_code == 3),
        "{ctx}: {c}"
    );
    assert!(
        c.leaks > 0,
        "{ctx}: the clusters of the broken bitmaps should be leaked, not freed: {c}"
    );
    let r = qemu_img_check_args(img, &["-r", "leaks"]);
    assert!(r.corruptions == 0, "{ctx}: {r}");
    assert_check_clean(img, ctx);
    let (code, out) = qemu_img_compare(img, pristine);
    assert_eq!(code, 0, "{ctx}: guest data changed: {out}");
}
