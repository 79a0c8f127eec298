//! Tests of the header and extension codecs: QEMU's checks and messages, byte-exact round trips
//! against images made by the installed qemu-img, and a deterministic fuzz loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;
use crate::format::be::{put_u32, put_u64};
use crate::format::bitmap_dir::{encode_directory, parse_directory, BitmapDirEntry};
use crate::format::bitmap_table::{decode_table, table_size_for, TableEntry};
use crate::format::extension::{
    encode_header_cluster, BitmapsExt, Extensions, EXT_BITMAPS, EXT_FEATURE_TABLE,
};
use crate::format::header::{unsupported_features_message, FeatureName, Header};
use crate::format::refcount::{
    decode_reftable_entry, get_refcount, refblock_entries, set_refcount,
};
use crate::format::*;

// ---------------------------------------------------------------------------------------------
// Helpers

fn sample_header(cluster_bits: u32) -> Header {
    let cs = 1u64 << cluster_bits;
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 64 << 20,
        crypt_method: 0,
        l1_size: 4096,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: AUTOCLEAR_BITMAPS,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        unknown_fields: Vec::new(),
    }
}

fn sample_exts() -> Extensions {
    Extensions {
        backing_format: Some(b"qcow2".to_vec()),
        bitmaps: Some(BitmapsExt {
            nb_bitmaps: 1,
            reserved32: 0,
            bitmap_directory_size: 32,
            bitmap_directory_offset: 0x50000,
        }),
        unknown: vec![(0x1111_1111, vec![1, 2, 3]), (0x2222_2222, Vec::new())],
        ..Default::default()
    }
}

fn valid_cluster(cluster_bits: u32) -> Vec<u8> {
    let mut h = sample_header(cluster_bits);
    h.l1_table_offset = 3 << cluster_bits;
    h.refcount_table_offset = 1 << cluster_bits;
    let mut e = sample_exts();
    if let Some(b) = &mut e.bitmaps {
        b.bitmap_directory_offset = 5 << cluster_bits;
    }
    encode_header_cluster(&h, &e, Some(b"base.qcow2")).unwrap()
}

fn parse_err(buf: &[u8]) -> Error {
    match Header::parse(buf) {
        Ok(h) => panic!("expected an error, parsed {h:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_invalid(e: Error, prefix: &str) {
    match &e {
        Error::InvalidImage(m) if m.starts_with(prefix) => {}
        _ => panic!("expected InvalidImage starting with {prefix:?}, got {e:?}"),
    }
}

#[track_caller]
fn assert_variant(e: Error, prefix: &str, errno: i32) {
    assert!(
        e.to_string().starts_with(prefix),
        "expected {prefix:?}, got {e:?}"
    );
    assert_eq!(e.errno(), errno, "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// Header::parse

#[test]
fn header_round_trip_fields() {
    let buf = valid_cluster(16);
    let h = Header::parse(&buf).unwrap();
    let mut want = sample_header(16);
    want.backing_file_offset = h.backing_file_offset;
    want.backing_file_size = 10;
    assert_eq!(h, want);
    assert_eq!(h.extensions_start(), 112);
    assert_eq!(h.extensions_end(), h.backing_file_offset);
    let e = Extensions::parse(&buf, &h).unwrap();
    assert_eq!(e.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert_eq!(e.feature_table.as_ref().map(|t| t.len()), Some(8));
    assert_eq!(e.unknown, sample_exts().unknown);
    assert_eq!(
        e.bitmaps,
        sample_exts().bitmaps.map(|mut b| {
            b.bitmap_directory_offset = 5 << 16;
            b
        })
    );
    assert_eq!(
        Extensions::backing_file_name(&buf, &h).unwrap().as_deref(),
        Some(&b"base.qcow2"[..])
    );
    assert_eq!(
        encode_header_cluster(&h, &e, Some(b"base.qcow2")).unwrap(),
        buf
    );
}

#[test]
fn header_checks_in_order() {
    let good = valid_cluster(16);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    assert_variant(
        parse_err(&with(&|b| b[0] = 0)),
        "Image is not in qcow2 format",
        libc::EINVAL,
    );
    assert_variant(parse_err(&[]), "Image is not in qcow2 format", libc::EINVAL);
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 4, 4))),
        "Unsupported qcow2 version 4",
        libc::ENOTSUP,
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 4, 1))),
        "Unsupported qcow2 version 1",
        libc::ENOTSUP,
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 20, 8))),
        "Unsupported cluster size: 2^8",
        libc::ENOTSUP,
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 20, 22))),
        "Unsupported cluster size: 2^22",
        libc::ENOTSUP,
    );
    // Version is checked before the cluster size.
    assert_variant(
        parse_err(&with(&|b| {
            put_u32(b, 4, 9);
            put_u32(b, 20, 99)
        })),
        "Unsupported qcow2 version 9",
        libc::ENOTSUP,
    );
    assert_invalid(
        parse_err(&with(&|b| put_u32(b, 100, 103))),
        "qcow2 header too short: header_length 103",
    );
    assert_invalid(
        parse_err(&with(&|b| {
            put_u32(b, 20, 9);
            put_u32(b, 100, 513)
        })),
        "qcow2 header exceeds cluster size: header_length 513 is larger than the cluster size 512",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u32(b, 100, 65537))),
        "qcow2 header exceeds cluster size",
    );
    assert_invalid(
        parse_err(&good[..111]),
        "Could not read qcow2 header: header_length is 112",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 8, 65537))),
        "Invalid backing file offset",
    );
    assert_invalid(
        parse_err(&with(&|b| {
            put_u64(b, 8, 65536 - 10);
            put_u32(b, 16, 11)
        })),
        "Backing file name too long: backing_file_size 11 exceeds 10",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u32(b, 16, 1024))),
        "Backing file name too long",
    );
    assert_variant(
        parse_err(&with(&|b| b[104] = 2)),
        "qcow2: unknown compression type: 2",
        libc::ENOTSUP,
    );
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 72, INCOMPAT_COMPRESSION))),
        "qcow2: Compression type incompatible feature bit must not be set",
    );
    assert_invalid(
        parse_err(&with(&|b| b[104] = 1)),
        "qcow2: Compression type incompatible feature bit must be set",
    );
    // compression checks come before refcount_order
    assert_invalid(
        parse_err(&with(&|b| {
            b[104] = 1;
            put_u32(b, 96, 7)
        })),
        "qcow2: Compression type",
    );
    assert_invalid(
        parse_err(&with(&|b| {
            put_u32(b, 20, 13);
            put_u64(b, 8, 0);
            put_u64(b, 72, INCOMPAT_EXTL2)
        })),
        "Unsupported subcluster size: 256",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u32(b, 96, 7))),
        "Reference count entry width too large; may not exceed 64 bits",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u32(b, 56, 0))),
        "Image does not contain a reference count table",
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 56, 129))),
        "Reference count table too large",
        libc::EFBIG,
    );
    assert!(Header::parse(&with(&|b| put_u32(b, 56, 128))).is_ok());
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 48, 0x10200))),
        "Reference count table offset invalid",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 48, !0xFFFF_u64))),
        "Reference count table offset invalid",
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 60, 65537))),
        "Snapshot table too large",
        libc::EFBIG,
    );
    assert!(Header::parse(&with(&|b| put_u32(b, 60, 65536))).is_ok());
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 64, 512))),
        "Snapshot table offset invalid",
    );
    assert_variant(
        parse_err(&with(&|b| put_u32(b, 36, (4 << 20) + 1))),
        "Active L1 table too large",
        libc::EFBIG,
    );
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 40, 0x30008))),
        "Active L1 table offset invalid",
    );
    assert_invalid(
        parse_err(&with(&|b| put_u64(b, 40, !0xFFFF_u64))),
        "Active L1 table offset invalid",
    );
    // The table must end below 2^63 (QEMU's INT64_MAX check): 4096 entries = 32 KiB.
    assert!(Header::parse(&with(&|b| put_u64(b, 40, i64::MAX as u64 & !0xFFFF))).is_ok());
    assert_invalid(
        parse_err(&with(&|b| {
            put_u32(b, 36, 8193);
            put_u64(b, 40, i64::MAX as u64 & !0xFFFF)
        })),
        "Active L1 table offset invalid: l1_table_offset 0x7fffffffffff0000 is too large",
    );
    assert_variant(
        parse_err(&with(&|b| put_u64(b, 24, u64::MAX))),
        "Image is too big",
        libc::EFBIG,
    );
    assert_variant(
        parse_err(&with(&|b| put_u64(b, 24, 1 << 63))),
        "Image is too big",
        libc::EFBIG,
    );
    // 64 KiB clusters: one L1 entry covers 512 MiB.
    assert!(Header::parse(&with(&|b| {
        put_u32(b, 36, 1);
        put_u64(b, 24, 512 << 20)
    }))
    .is_ok());
    assert_invalid(
        parse_err(&with(&|b| {
            put_u32(b, 36, 1);
            put_u64(b, 24, (512 << 20) + 1)
        })),
        "L1 table is too small: l1_size 1 but size 536870913 needs 2 entries",
    );
    // With extended L2 entries one L1 entry covers half as much.
    assert_invalid(
        parse_err(&with(&|b| {
            put_u32(b, 36, 1);
            put_u64(b, 24, 512 << 20);
            put_u64(b, 72, INCOMPAT_EXTL2)
        })),
        "L1 table is too small",
    );
}

#[test]
fn header_unknown_incompatible_bits_are_deferred() {
    let mut b = valid_cluster(16);
    put_u64(&mut b, 72, (1 << 63) | (1 << 40) | INCOMPAT_DIRTY);
    let h = Header::parse(&b).unwrap();
    let e = Extensions::parse(&b, &h).unwrap();
    // The table QEMU writes has no names for these bits.
    let err = h
        .check_incompatible(e.feature_table.as_deref())
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOTSUP);
    assert_eq!(
        err.to_string(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000010000000000"
    );
    let table = vec![
        FeatureName {
            kind: 1,
            bit: 40,
            name: b"compat forty".to_vec(),
        },
        FeatureName {
            kind: 0,
            bit: 40,
            name: b"forty".to_vec(),
        },
        FeatureName {
            kind: 0,
            bit: 40,
            name: b"forty again".to_vec(),
        },
        FeatureName {
            kind: 0,
            bit: 63,
            name: b"top\0hidden".to_vec(),
        },
    ];
    assert_eq!(
        unsupported_features_message((1 << 63) | (1 << 40) | (1 << 5), Some(&table)),
        "Unsupported qcow2 feature(s): forty, top, Unknown incompatible feature: 20"
    );
    assert_eq!(
        unsupported_features_message(1 << 40, Some(&table)),
        "Unsupported qcow2 feature(s): forty"
    );
    // The walk stops at the first empty name, like QEMU.
    let stop = vec![
        FeatureName {
            kind: 0,
            bit: 1,
            name: Vec::new(),
        },
        table[1].clone(),
    ];
    assert_eq!(
        unsupported_features_message(1 << 40, Some(&stop)),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"
    );
    let big_bit = vec![FeatureName {
        kind: 0,
        bit: 200,
        name: b"x".to_vec(),
    }];
    assert_eq!(
        unsupported_features_message(1, Some(&big_bit)),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 1"
    );
    assert!(sample_header(16).check_incompatible(None).is_ok());
}

#[test]
fn header_v2_and_lengths() {
    // v2: only 72 bytes are needed, v3 fields implied.
    let mut b = valid_cluster(16)[..72].to_vec();
    put_u32(&mut b, 4, 2);
    put_u64(&mut b, 8, 0);
    put_u32(&mut b, 16, 0);
    let h = Header::parse(&b).unwrap();
    assert_eq!((h.version, h.header_length, h.refcount_order), (2, 72, 4));
    assert_eq!(
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features
        ),
        (0, 0, 0)
    );
    assert_eq!(h.extensions_start(), 72);
    assert_eq!(Extensions::parse(&b, &h).unwrap(), Extensions::default());
    assert_variant(
        parse_err(&b[..71]),
        "Could not read qcow2 header",
        libc::EINVAL,
    );
    assert_variant(
        encode_header_cluster(&h, &Extensions::default(), None).unwrap_err(),
        "Cannot write a qcow2 v2 header",
        libc::ENOTSUP,
    );

    // header_length 104: bytes 104.. belong to the first extension, compression type is 0.
    let mut h = sample_header(16);
    h.autoclear_features = 0;
    let mut buf = encode_header_cluster(&h, &Extensions::default(), None).unwrap();
    buf.copy_within(112..600, 104);
    put_u32(&mut buf, 100, 104);
    let p = Header::parse(&buf).unwrap();
    assert_eq!(
        (p.header_length, p.compression_type, p.extensions_start()),
        (104, 0, 104)
    );
    let e = Extensions::parse(&buf, &p).unwrap();
    assert_eq!(e.feature_table.as_ref().map(Vec::len), Some(8));
    // Rewriting upgrades it to 112 exactly as QEMU does.
    assert_eq!(
        encode_header_cluster(&p, &e, None).unwrap(),
        encode_header_cluster(&h, &Extensions::default(), None).unwrap()
    );

    // header_length > 112: unknown fields kept and re-emitted.
    let mut h = sample_header(16);
    h.unknown_fields = (1..=16).collect();
    let buf = encode_header_cluster(&h, &sample_exts(), None).unwrap();
    assert_eq!(crate::format::be::get_u32(&buf, 100), 128);
    let p = Header::parse(&buf).unwrap();
    assert_eq!(p.unknown_fields, h.unknown_fields);
    assert_eq!(p.header_length, 128);
    assert_eq!(p.extensions_start(), 128);
    let e = Extensions::parse(&buf, &p).unwrap();
    assert_eq!(e.unknown, sample_exts().unknown);
    assert_eq!(encode_header_cluster(&p, &e, None).unwrap(), buf);
}

// ---------------------------------------------------------------------------------------------
// Extensions

/// A cluster with the given extensions (magic, declared len, data) written raw after a v3 header.
fn raw_exts(cluster_bits: u32, crypt_method: u32, exts: &[(u32, u32, &[u8])]) -> (Vec<u8>, Header) {
    let mut h = sample_header(cluster_bits);
    h.crypt_method = crypt_method;
    let mut buf = encode_header_cluster(&h, &Extensions::default(), None).unwrap();
    buf[112..].fill(0);
    let mut pos = 112;
    for (magic, len, data) in exts {
        put_u32(&mut buf, pos, *magic);
        put_u32(&mut buf, pos + 4, *len);
        buf[pos + 8..pos + 8 + data.len()].copy_from_slice(data);
        pos += 8 + data.len().div_ceil(8) * 8;
    }
    let h = Header::parse(&buf).unwrap();
    (buf, h)
}

#[track_caller]
fn ext_err(buf: &[u8], h: &Header, prefix: &str) {
    match Extensions::parse(buf, h) {
        Err(Error::InvalidImage(m)) if m.starts_with(prefix) => {}
        other => panic!("expected {prefix:?}, got {other:?}"),
    }
}

#[test]
fn extension_errors() {
    let (b, h) = raw_exts(16, 0, &[(0x1234, 65536, &[])]);
    ext_err(
        &b,
        &h,
        "Header extension too large: extension 0x00001234 at offset 0x70 has length 65536",
    );
    // Exactly filling the area is fine, and the end marker is then optional.
    let (b, h) = raw_exts(9, 0, &[(0x1234, 512 - 112 - 8, &[])]);
    let e = Extensions::parse(&b, &h).unwrap();
    assert_eq!(e.unknown, vec![(0x1234, vec![0; 392])]);
    // An extension header that does not fit (the area ends at an unaligned backing file name).
    let (b, mut h) = raw_exts(9, 0, &[(0x1234, 512 - 112 - 8 - 12, &[])]);
    h.backing_file_offset = 508;
    ext_err(&b, &h, "Header extension too large: the extension header at offset 0x1f8 needs 8 bytes but the extension area ends at 0x1fc");
    h.backing_file_offset = 504;
    assert_eq!(Extensions::parse(&b, &h).unwrap().unknown.len(), 1);
    h.backing_file_offset = 496;
    ext_err(&b, &h, "Header extension too large: extension 0x00001234 at offset 0x70 has length 380 but only 376");
    // An end marker with a length is checked too.
    let (b, h) = raw_exts(16, 0, &[(0, 70000, &[])]);
    ext_err(&b, &h, "Header extension too large");

    let (b, h) = raw_exts(16, 0, &[(EXT_BITMAPS, 16, &[0; 16])]);
    ext_err(
        &b,
        &h,
        "bitmaps_ext: Invalid extension length: 16 (expected 24)",
    );
    let (b, h) = raw_exts(16, 0, &[(0xE279_2ACA, 16, b"0123456789abcdef")]);
    ext_err(&b, &h, "ERROR: ext_backing_format: len=16 too large (>=16)");
    let (b, h) = raw_exts(16, 0, &[(0xE279_2ACA, 15, b"0123456789abcde")]);
    assert_eq!(
        Extensions::parse(&b, &h).unwrap().backing_format.unwrap(),
        b"0123456789abcde"
    );

    let crypto = [0u8, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0];
    let (b, h) = raw_exts(16, 0, &[(0x0537_BE77, 16, &crypto)]);
    ext_err(
        &b,
        &h,
        "CRYPTO header extension only expected with LUKS encryption method",
    );
    let (b, h) = raw_exts(16, 2, &[(0x0537_BE77, 8, &crypto[..8])]);
    ext_err(
        &b,
        &h,
        "CRYPTO header extension size 8, but expected size 16",
    );
    let mut unaligned = crypto;
    unaligned[6] = 2;
    let (b, h) = raw_exts(16, 2, &[(0x0537_BE77, 16, &unaligned)]);
    ext_err(
        &b,
        &h,
        "Encryption header offset '66048' is not a multiple of cluster size '65536'",
    );
    let (b, h) = raw_exts(16, 2, &[(0x0537_BE77, 16, &crypto)]);
    assert_eq!(
        Extensions::parse(&b, &h).unwrap().crypto.unwrap(),
        crypto.to_vec()
    );
}

#[test]
fn extension_last_wins_and_unknown_order() {
    let bm = |n: u8| {
        let mut d = [0u8; 24];
        d[3] = n;
        d
    };
    let (b1, b2) = (bm(1), bm(2));
    let mut ft = [0u8; 48 + 10];
    ft[2..6].copy_from_slice(b"abcd");
    ft[48] = 2;
    ft[49] = 7;
    ft[50..53].copy_from_slice(b"xyz");
    let (b, h) = raw_exts(
        16,
        0,
        &[
            (EXT_BITMAPS, 24, &b1),
            (0x3333_3333, 3, b"abc"),
            (0x4441_5441, 4, b"data"),
            (EXT_BITMAPS, 24, &b2),
            (0x1111_1111, 0, &[]),
            (EXT_FEATURE_TABLE, 58, &ft),
            (0xE279_2ACA, 3, b"raw"),
            (0xE279_2ACA, 5, b"qcow2"),
        ],
    );
    let e = Extensions::parse(&b, &h).unwrap();
    assert_eq!(e.bitmaps.unwrap().nb_bitmaps, 2);
    assert_eq!(
        e.unknown,
        vec![(0x3333_3333, b"abc".to_vec()), (0x1111_1111, Vec::new())]
    );
    assert_eq!(e.data_file.as_deref(), Some(&b"data"[..]));
    assert_eq!(e.backing_format.as_deref(), Some(&b"qcow2"[..]));
    // Partial last feature table entry reads zero padded.
    assert_eq!(
        e.feature_table.clone().unwrap(),
        vec![
            FeatureName {
                kind: 0,
                bit: 0,
                name: b"abcd".to_vec()
            },
            FeatureName {
                kind: 2,
                bit: 7,
                name: b"xyz".to_vec()
            },
        ]
    );
    // Re-encode: unknown extensions in the given order, data file dropped without incompat bit 2.
    let out = encode_header_cluster(&h, &e, None).unwrap();
    let p = Header::parse(&out).unwrap();
    let e2 = Extensions::parse(&out, &p).unwrap();
    assert_eq!(e2.unknown, e.unknown);
    assert_eq!(e2.data_file, None);
    assert_eq!(e2.bitmaps.unwrap().nb_bitmaps, 2);
}

#[test]
fn lenient_feature_table() {
    let mut ft = [0u8; 48];
    ft[1] = 50;
    ft[2..10].copy_from_slice(b"my thing");
    let (mut b, _) = raw_exts(
        16,
        0,
        &[(EXT_FEATURE_TABLE, 48, &ft), (EXT_BITMAPS, 8, &[0; 8])],
    );
    put_u64(&mut b, 72, 1 << 50);
    let h = Header::parse(&b).unwrap();
    assert!(Extensions::parse(&b, &h).is_err());
    let t = Extensions::feature_table_lenient(&b, &h);
    assert_eq!(
        h.check_incompatible(t.as_deref()).unwrap_err().to_string(),
        "Unsupported qcow2 feature(s): my thing"
    );
}

#[test]
fn bitmaps_ext_validate() {
    let ok = BitmapsExt {
        nb_bitmaps: 1,
        reserved32: 0,
        bitmap_directory_size: 32,
        bitmap_directory_offset: 0x50000,
    };
    ok.validate(65536).unwrap();
    let v = |f: &dyn Fn(&mut BitmapsExt), prefix: &str| {
        let mut b = ok;
        f(&mut b);
        match b.validate(65536) {
            Err(Error::InvalidImage(m)) if m.starts_with(prefix) => {}
            other => panic!("expected {prefix:?}, got {other:?}"),
        }
    };
    v(
        &|b| b.reserved32 = 1,
        "bitmaps_ext: Reserved field is not zero",
    );
    v(
        &|b| b.nb_bitmaps = 65536,
        "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535",
    );
    v(
        &|b| b.nb_bitmaps = 0,
        "found bitmaps extension with zero bitmaps",
    );
    v(
        &|b| b.bitmap_directory_offset = 0x50200,
        "bitmaps_ext: invalid bitmap directory offset",
    );
    v(
        &|b| b.bitmap_directory_size = 67107841,
        "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)",
    );
    // Order: reserved before count.
    v(
        &|b| {
            b.reserved32 = 1;
            b.nb_bitmaps = 0
        },
        "bitmaps_ext: Reserved",
    );
    let mut max = ok;
    max.nb_bitmaps = 65535;
    max.bitmap_directory_size = 67107840;
    max.validate(65536).unwrap();
    assert!(ok.validate(0).is_err());
}

#[test]
fn encode_no_space_and_layout() {
    // 512-byte clusters: header 112 + bitmaps ext 32 + end 8 = 152; a backing name of 361 bytes fits
    // exactly, 362 does not.
    let mut h = sample_header(9);
    h.l1_size = 1 << 14;
    let e = Extensions {
        bitmaps: sample_exts().bitmaps,
        ..Default::default()
    };
    let name = vec![b'n'; 360];
    let out = encode_header_cluster(&h, &e, Some(&name)).unwrap();
    assert_eq!(out.len(), 512);
    assert_eq!(crate::format::be::get_u64(&out, 8), 152);
    assert_eq!(crate::format::be::get_u32(&out, 16), 360);
    assert!(encode_header_cluster(&h, &e, Some(&[b'n'; 360][..])).is_ok());
    let err = encode_header_cluster(&h, &e, Some(&[b'n'; 361][..])).unwrap_err();
    assert_variant(
        err,
        "Failed to update header: the header, its extensions and the backing file name need 513 bytes but the cluster is 512 bytes",
        libc::ENOSPC,
    );
    // The feature table is written only above 4 KiB.
    for (bits, has) in [(12u32, false), (13, true)] {
        let out =
            encode_header_cluster(&sample_header(bits), &Extensions::default(), None).unwrap();
        let p = Header::parse(&out).unwrap();
        assert_eq!(
            Extensions::parse(&out, &p).unwrap().feature_table.is_some(),
            has
        );
    }
    // Backing name cut at the first NUL; empty backing name still recorded.
    let out = encode_header_cluster(&h, &Extensions::default(), Some(b"ab\0cd")).unwrap();
    assert_eq!(crate::format::be::get_u32(&out, 16), 2);
    let out = encode_header_cluster(&h, &Extensions::default(), Some(b"")).unwrap();
    assert_eq!(crate::format::be::get_u64(&out, 8), 120);
    assert_eq!(crate::format::be::get_u32(&out, 16), 0);
    // Size rounded down to 512 as QEMU writes total_sectors * 512.
    let mut odd = sample_header(16);
    odd.size = (64 << 20) + 100;
    let out = encode_header_cluster(&odd, &Extensions::default(), None).unwrap();
    assert_eq!(crate::format::be::get_u64(&out, 24), 64 << 20);
    // Invalid compression state is refused.
    let mut bad = sample_header(16);
    bad.compression_type = 1;
    assert!(encode_header_cluster(&bad, &Extensions::default(), None).is_err());
    let mut bad = sample_header(16);
    bad.cluster_bits = 40;
    assert!(encode_header_cluster(&bad, &Extensions::default(), None).is_err());
    // Huge unknown data never panics.
    let mut big = Extensions::default();
    big.unknown.push((1, vec![0; 1 << 21]));
    assert!(matches!(
        encode_header_cluster(&sample_header(21), &big, None),
        Err(Error::NoSpace(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Against qemu-img

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "qdirty-format-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether qemu-img can be used; prints a visible SKIP line (not captured by the test harness)
/// when it cannot, or fails when QDIRTY_REQUIRE_QEMU=1.
fn have_qemu(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: qemu-img is not available but QDIRTY_REQUIRE_QEMU=1");
        }
        let _ = writeln!(std::io::stderr(), "SKIP {test}: qemu-img not found");
    }
    ok
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything parsed from a QEMU-made image.
struct Parsed {
    file: Vec<u8>,
    header: Header,
    exts: Extensions,
    backing: Option<Vec<u8>>,
}

impl Parsed {
    fn cluster0(&self) -> &[u8] {
        &self.file[..self.header.cluster_size() as usize]
    }
    fn at(&self, off: u64, len: u64) -> &[u8] {
        &self.file[off as usize..(off + len) as usize]
    }
    fn refcount(&self, cluster: u64) -> u64 {
        let h = &self.header;
        let cs = h.cluster_size();
        let e = refblock_entries(h.cluster_bits, h.refcount_order);
        let raw =
            crate::format::be::get_u64(self.at(h.refcount_table_offset + 8 * (cluster / e), 8), 0);
        match decode_reftable_entry(raw, cluster / e, cs).unwrap() {
            None => 0,
            Some(off) => get_refcount(self.at(off, cs), cluster % e, h.refcount_order),
        }
    }
}

fn parse_file(path: &Path) -> Parsed {
    let file = std::fs::read(path).unwrap();
    let head = &file[..file.len().min(2 << 20)];
    let header = Header::parse(head).unwrap();
    let exts = Extensions::parse(head, &header).unwrap();
    header
        .check_incompatible(exts.feature_table.as_deref())
        .unwrap();
    if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
        if let Some(b) = &exts.bitmaps {
            b.validate(header.cluster_size()).unwrap();
        }
    }
    let backing = Extensions::backing_file_name(head, &header).unwrap();
    Parsed {
        file,
        header,
        exts,
        backing,
    }
}

#[track_caller]
fn assert_same_bytes(ours: &[u8], qemu: &[u8], what: &str) {
    assert_eq!(ours.len(), qemu.len(), "{what}: length");
    if let Some(i) = ours.iter().zip(qemu).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: ours {:02x?} qemu {:02x?}",
            &ours[i..(i + 16).min(ours.len())],
            &qemu[i..(i + 16).min(qemu.len())]
        );
    }
}

/// Creates an image with `create` options (relative names inside a temp dir), adds the bitmaps
/// (each an argument list for `qemu-img bitmap --add`), parses it, re-encodes cluster 0 and
/// checks that the bytes are QEMU's; then checks the directory and refcounts.
fn qemu_shape(tag: &str, create: &[&str], bitmaps: &[&[&str]]) -> Option<Parsed> {
    if !have_qemu(tag) {
        return None;
    }
    let dir = TempDir::new(tag);
    qemu_img(
        &dir.0,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    );
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    args.extend_from_slice(&["img.qcow2", "64M"]);
    qemu_img(&dir.0, &args);
    for b in bitmaps {
        let mut a = vec!["bitmap", "--add"];
        a.extend_from_slice(b);
        a.insert(2, "img.qcow2");
        qemu_img(&dir.0, &a);
    }
    let p = parse_file(&dir.0.join("img.qcow2"));
    let h = &p.header;
    if h.version == 3 {
        let ours = encode_header_cluster(h, &p.exts, p.backing.as_deref()).unwrap();
        assert_same_bytes(&ours, p.cluster0(), tag);
    }
    // Structures QEMU wrote: header and reftable clusters have refcount 1.
    assert_eq!(p.refcount(0), 1, "{tag}: refcount of cluster 0");
    let rt = h.refcount_table_offset / h.cluster_size();
    for c in rt..rt + u64::from(h.refcount_table_clusters) {
        assert_eq!(p.refcount(c), 1, "{tag}: refcount of reftable cluster {c}");
    }
    if let (Some(b), true) = (
        &p.exts.bitmaps,
        h.autoclear_features & AUTOCLEAR_BITMAPS != 0,
    ) {
        let cs = h.cluster_size();
        let dir = p.at(b.bitmap_directory_offset, b.bitmap_directory_size);
        let entries = parse_directory(dir, b.nb_bitmaps, cs, h.size & !511).unwrap();
        assert_same_bytes(&encode_directory(&entries), dir, "directory");
        assert_eq!(entries.len(), bitmaps.len());
        assert_eq!(
            p.refcount(b.bitmap_directory_offset / cs),
            1,
            "{tag}: directory refcount"
        );
        for e in &entries {
            assert_eq!(
                u64::from(e.table_size),
                table_size_for(h.size, u32::from(e.granularity_bits), cs)
            );
            assert_eq!(p.refcount(e.table_offset / cs), 1, "{tag}: table refcount");
            let t = decode_table(
                p.at(e.table_offset, 8 * u64::from(e.table_size)),
                cs,
                &e.name,
            )
            .unwrap();
            // fresh bitmaps are empty: no data clusters
            assert!(t.iter().all(|x| *x == TableEntry::Zeroes));
        }
    }
    Some(p)
}

fn names(t: &[FeatureName]) -> Vec<(u8, u8, String)> {
    t.iter()
        .map(|f| (f.kind, f.bit, String::from_utf8_lossy(&f.name).into_owned()))
        .collect()
}

#[test]
fn qemu_default_64k() {
    let Some(p) = qemu_shape("default", &[], &[&["b1"]]) else {
        return;
    };
    let h = &p.header;
    assert_eq!(
        (h.version, h.cluster_bits, h.size, h.refcount_order),
        (3, 16, 64 << 20, 4)
    );
    assert_eq!(
        (h.header_length, h.compression_type, h.crypt_method),
        (112, 0, 0)
    );
    assert_eq!(
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features
        ),
        (0, 0, 1)
    );
    assert_eq!(
        (
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.l1_size
        ),
        (0x10000, 1, 1)
    );
    assert_eq!(p.backing, None);
    assert_eq!(
        names(p.exts.feature_table.as_ref().unwrap()),
        QEMU_NAMES
            .iter()
            .map(|(k, b, n)| (*k, *b, n.to_string()))
            .collect::<Vec<_>>()
    );
    let b = p.exts.bitmaps.unwrap();
    assert_eq!((b.nb_bitmaps, b.bitmap_directory_size), (1, 32));
    // After the 112-byte header and QEMU's 8-entry feature name table: 112 + 8 + 8 * 48 = 0x1F8.
    assert_eq!(crate::format::be::get_u32(p.cluster0(), 0x1F8), EXT_BITMAPS);
}

const QEMU_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

#[test]
fn qemu_cluster_sizes() {
    for (cs, bits) in [("512", 9u32), ("4096", 12), ("65536", 16), ("2M", 21)] {
        let tag = format!("cs{cs}");
        let opt = format!("cluster_size={cs}");
        let Some(p) = qemu_shape(
            &tag,
            &["-o", &opt],
            &[&["b1"], &["-g", "512", "b2"], &["--disable", "b3"]],
        ) else {
            return;
        };
        assert_eq!(p.header.cluster_bits, bits);
        assert_eq!(p.exts.feature_table.is_some(), bits > 12, "{tag}");
        let b = p.exts.bitmaps.unwrap();
        assert_eq!(b.nb_bitmaps, 3);
        let d = parse_directory(
            p.at(b.bitmap_directory_offset, b.bitmap_directory_size),
            3,
            1 << bits,
            64 << 20,
        )
        .unwrap();
        let default_g = bits.clamp(12, 16) as u8;
        let got: Vec<_> = d
            .iter()
            .map(|e| (e.name.clone(), e.granularity_bits, e.flags))
            .collect();
        assert_eq!(
            got,
            vec![
                (b"b1".to_vec(), default_g, BME_FLAG_AUTO),
                (b"b2".to_vec(), 9, BME_FLAG_AUTO),
                (b"b3".to_vec(), default_g, 0),
            ],
            "{tag}"
        );
    }
}

#[test]
fn qemu_backing_file() {
    for cs in ["4096", "65536"] {
        let opt = format!("cluster_size={cs}");
        let Some(p) = qemu_shape(
            &format!("backing{cs}"),
            &["-o", &opt, "-b", "base.qcow2", "-F", "qcow2"],
            &[&["b1"]],
        ) else {
            return;
        };
        assert_eq!(p.backing.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(p.exts.backing_format.as_deref(), Some(&b"qcow2"[..]));
        assert_eq!(p.header.backing_file_size, 10);
        if cs == "4096" {
            // No feature name table with 4 KiB clusters: backing format at 0x70 (8 + 8 bytes),
            // bitmaps at 0x80 (8 + 24), end marker at 0xA0, name at 0xA8.
            assert_eq!(p.header.backing_file_offset, 0xA8);
        }
    }
}

#[test]
fn qemu_data_file() {
    let Some(p) = qemu_shape("datafile", &["-o", "data_file=data.raw"], &[&["b1"]]) else {
        return;
    };
    assert_eq!(p.header.incompatible_features, INCOMPAT_DATA_FILE);
    assert_eq!(p.exts.data_file.as_deref(), Some(&b"data.raw"[..]));
    // data-file-name ext at 0x70, feature table at 0x80, bitmaps at 0x208
    assert_eq!(crate::format::be::get_u32(p.cluster0(), 0x208), EXT_BITMAPS);
    let Some(p) = qemu_shape(
        "datafileraw",
        &["-o", "data_file=data.raw,data_file_raw=on"],
        &[],
    ) else {
        return;
    };
    assert_eq!(p.header.autoclear_features, AUTOCLEAR_DATA_FILE_RAW);
}

#[test]
fn qemu_v2_parse_only() {
    let Some(p) = qemu_shape("v2", &["-o", "compat=0.10"], &[]) else {
        return;
    };
    let h = &p.header;
    assert_eq!(
        (
            h.version,
            h.header_length,
            h.refcount_order,
            h.extensions_start()
        ),
        (2, 72, 4, 72)
    );
    assert_eq!(
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features
        ),
        (0, 0, 0)
    );
    assert_eq!(p.exts, Extensions::default());
    assert!(matches!(
        encode_header_cluster(h, &p.exts, None),
        Err(Error::Unsupported(_))
    ));
    let Some(p) = qemu_shape(
        "v2backing",
        &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
        &[],
    ) else {
        return;
    };
    assert_eq!(p.backing.as_deref(), Some(&b"base.qcow2"[..]));
    assert_eq!(p.exts.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert_eq!(crate::format::be::get_u32(p.cluster0(), 72), 0xE279_2ACA);
}

#[test]
fn qemu_refcount_widths() {
    for (bits, order) in [("1", 0u32), ("2", 1), ("8", 3), ("64", 6)] {
        let opt = format!("refcount_bits={bits}");
        let Some(p) = qemu_shape(&format!("rc{bits}"), &["-o", &opt], &[&["b1"]]) else {
            return;
        };
        assert_eq!(p.header.refcount_order, order);
    }
}

#[test]
fn qemu_feature_shapes() {
    let Some(p) = qemu_shape("extl2", &["-o", "extended_l2=on"], &[&["b1"]]) else {
        return;
    };
    assert_eq!(p.header.incompatible_features, INCOMPAT_EXTL2);
    let Some(p) = qemu_shape("zstd", &["-o", "compression_type=zstd"], &[&["b1"]]) else {
        return;
    };
    assert_eq!(p.header.incompatible_features, INCOMPAT_COMPRESSION);
    assert_eq!(p.header.compression_type, 1);
    let Some(p) = qemu_shape("lazy", &["-o", "lazy_refcounts=on"], &[&["b1"]]) else {
        return;
    };
    assert_eq!(p.header.compatible_features, COMPAT_LAZY_REFCOUNTS);
    let Some(p) = qemu_shape(
        "luks",
        &[
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ],
        &[],
    ) else {
        return;
    };
    assert_eq!(p.header.crypt_method, 2);
    let c = p.exts.crypto.as_ref().unwrap();
    assert_eq!(
        crate::format::be::get_u64(c, 0) % p.header.cluster_size(),
        0
    );
}

#[test]
fn qemu_backing_name_no_space() {
    // 512-byte clusters, a 353-character backing name, one bitmap: the header would need
    // 112 + 16 (backing format) + 32 (bitmaps) + 8 (end) + 353 = 521 bytes, so QEMU's store fails
    // with ENOSPC.
    if !have_qemu("nospace") {
        return;
    }
    let dir = TempDir::new("nospace");
    let name = format!("{}/base.qcow2", "d".repeat(342));
    assert_eq!(name.len(), 353);
    qemu_img(
        &dir.0,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-u",
            "-b",
            &name,
            "-F",
            "qcow2",
            "img.qcow2",
            "64M",
        ],
    );
    let mut p = parse_file(&dir.0.join("img.qcow2"));
    assert_eq!(p.backing.as_deref(), Some(name.as_bytes()));
    let ours = encode_header_cluster(&p.header, &p.exts, p.backing.as_deref()).unwrap();
    assert_same_bytes(&ours, p.cluster0(), "nospace");
    p.exts.bitmaps = Some(BitmapsExt {
        nb_bitmaps: 1,
        reserved32: 0,
        bitmap_directory_size: 32,
        bitmap_directory_offset: 0x1000,
    });
    assert!(matches!(
        encode_header_cluster(&p.header, &p.exts, p.backing.as_deref()),
        Err(Error::NoSpace(_))
    ));
}

#[test]
fn qemu_reads_what_we_write() {
    // A header we rewrite (unknown extension, unknown compatible bit, unknown fields) opens
    // cleanly in qemu-img check and keeps the bitmap.
    if !have_qemu("ourheader") {
        return;
    }
    let dir = TempDir::new("ourheader");
    qemu_img(&dir.0, &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"]);
    qemu_img(&dir.0, &["bitmap", "--add", "img.qcow2", "b1"]);
    let path = dir.0.join("img.qcow2");
    let mut p = parse_file(&path);
    p.header.compatible_features |= 1 << 40;
    p.header.unknown_fields = vec![0xAB; 8];
    p.exts.unknown.push((0x1234_5678, b"hello".to_vec()));
    let ours = encode_header_cluster(&p.header, &p.exts, None).unwrap();
    let mut file = p.file.clone();
    file[..ours.len()].copy_from_slice(&ours);
    std::fs::write(&path, &file).unwrap();
    qemu_img(&dir.0, &["check", "-q", "img.qcow2"]);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "img.qcow2"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("\"name\": \"b1\""), "{info}");
    // After a read-write open QEMU rewrote the header: our unknown bits survived.
    qemu_img(&dir.0, &["bitmap", "--add", "img.qcow2", "b2"]);
    let q = parse_file(&path);
    assert_eq!(q.header.unknown_fields, vec![0xAB; 8]);
    assert_eq!(q.header.compatible_features, 1 << 40);
    assert_eq!(q.exts.unknown, vec![(0x1234_5678, b"hello".to_vec())]);
    assert_eq!(q.exts.bitmaps.unwrap().nb_bitmaps, 2);
    let ours = encode_header_cluster(&q.header, &q.exts, None).unwrap();
    assert_same_bytes(&ours, q.cluster0(), "after qemu rewrite");
}

// ---------------------------------------------------------------------------------------------
// Fuzz: random and mutated inputs never panic.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn interesting(&mut self) -> u64 {
        const V: [u64; 14] = [
            0,
            1,
            7,
            8,
            24,
            72,
            104,
            112,
            512,
            65536,
            0x7FFF_FFFF,
            u32::MAX as u64,
            i64::MAX as u64,
            u64::MAX,
        ];
        let v = V[self.below(V.len())];
        match self.below(4) {
            0 => v.wrapping_sub(1),
            1 => v.wrapping_add(1),
            _ => v,
        }
    }
}

fn mutate(rng: &mut XorShift, seed: &[u8], hot: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        if b.is_empty() {
            break;
        }
        // Most mutations hit the first `hot` bytes where the fields live.
        let pos = if rng.below(4) == 0 {
            rng.below(b.len())
        } else {
            rng.below(hot.min(b.len()))
        };
        match rng.below(5) {
            0 => b[pos] = rng.next() as u8,
            1 => b[pos] ^= 1 << rng.below(8),
            2 => {
                let v = rng.interesting().to_be_bytes();
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let end = (pos + w).min(b.len());
                b[pos..end].copy_from_slice(&v[8 - (end - pos)..]);
            }
            3 => b.truncate(rng.below(b.len() + 1)),
            _ => {
                let v = rng.interesting();
                let p4 = pos & !3;
                if p4 + 4 <= b.len() {
                    put_u32(&mut b, p4, v as u32);
                }
            }
        }
    }
    b
}

/// Returns true when the input made it through parsing and re-encoding.
fn exercise_cluster(buf: &[u8]) -> bool {
    let Ok(h) = Header::parse(buf) else {
        return false;
    };
    let t = Extensions::feature_table_lenient(buf, &h);
    let _ = h.check_incompatible(t.as_deref());
    let _ = Extensions::backing_file_name(buf, &h);
    if let Ok(e) = Extensions::parse(buf, &h) {
        let _ = h.check_incompatible(e.feature_table.as_deref());
        if let Some(b) = &e.bitmaps {
            let _ = b.validate(h.cluster_size());
        }
        let name = Extensions::backing_file_name(buf, &h).ok().flatten();
        if let Ok(out) = encode_header_cluster(&h, &e, name.as_deref()) {
            assert_eq!(out.len() as u64, h.cluster_size());
            let h2 = Header::parse(&out).expect("re-encoded header parses");
            let e2 = Extensions::parse(&out, &h2).expect("re-encoded extensions parse");
            assert_eq!(
                e2.bitmaps,
                e.bitmaps.map(|mut b| {
                    b.reserved32 = 0;
                    b
                })
            );
            return true;
        }
    }
    false
}

#[test]
fn fuzz_header_and_extensions() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let seeds: Vec<Vec<u8>> = vec![valid_cluster(9), valid_cluster(12), valid_cluster(16)];
    for s in &seeds {
        assert!(exercise_cluster(s));
    }
    let mut deep = 0;
    for i in 0..30_000 {
        let seed = &seeds[i % seeds.len()];
        let b = mutate(&mut rng, seed, 512);
        deep += usize::from(exercise_cluster(&b));
    }
    // The mutations must not all be rejected by the first checks.
    assert!(
        deep > 3_000,
        "only {deep} mutated clusters reached the encoder"
    );
    // Pure random bytes with a valid magic/version prefix, and short buffers.
    for _ in 0..5_000 {
        let n = rng.below(700);
        let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if b.len() >= 8 && rng.below(2) == 0 {
            b[..8].copy_from_slice(&[0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3]);
        }
        exercise_cluster(&b);
    }
    // Hand-built hostile headers passed straight to the extension code.
    for _ in 0..5_000 {
        let mut h = sample_header(9 + rng.below(13) as u32);
        h.version = [2, 3, 0, 99][rng.below(4)];
        h.cluster_bits = [9, 16, 21, 0, 63, 64, u32::MAX][rng.below(7)];
        h.header_length = rng.interesting() as u32;
        h.backing_file_offset = rng.interesting();
        h.backing_file_size = rng.interesting() as u32;
        h.crypt_method = rng.below(4) as u32;
        h.compression_type = rng.below(3) as u8;
        h.incompatible_features = rng.interesting();
        let k = rng.below(3);
        let buf = mutate(&mut rng, &seeds[k], 512);
        let _ = h.cluster_size();
        let _ = h.extensions_start();
        let _ = h.extensions_end();
        let _ = Extensions::parse(&buf, &h);
        let _ = Extensions::feature_table_lenient(&buf, &h);
        let _ = Extensions::backing_file_name(&buf, &h);
        let _ = encode_header_cluster(&h, &sample_exts(), Some(b"x"));
    }
}

#[test]
fn fuzz_directory_and_tables() {
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    let mut es = Vec::new();
    for i in 0..5u64 {
        es.push(BitmapDirEntry {
            table_offset: (i + 2) << 16,
            table_size: 1,
            flags: (i % 4) as u32,
            kind: 1,
            granularity_bits: 16,
            name: format!("bitmap{i}").into_bytes(),
            extra_data: Vec::new(),
        });
    }
    let seed = encode_directory(&es);
    assert_eq!(parse_directory(&seed, 5, 65536, 64 << 20).unwrap(), es);
    let mut parsed = 0;
    for _ in 0..40_000 {
        let b = mutate(&mut rng, &seed, seed.len());
        let nb = if rng.below(2) == 0 {
            5
        } else {
            [0u32, 1, 4, 6, 65535, u32::MAX][rng.below(6)]
        };
        let cs = if rng.below(2) == 0 {
            65536
        } else {
            [512u64, 0, 3, u64::MAX][rng.below(4)]
        };
        let disk = if rng.below(2) == 0 {
            64 << 20
        } else {
            rng.interesting()
        };
        if let Ok(entries) = parse_directory(&b, nb, cs, disk) {
            parsed += 1;
            // What parses re-encodes to the same bytes, except padding QEMU does not check.
            let again = encode_directory(&entries);
            assert_eq!(again.len(), b.len());
            assert_eq!(parse_directory(&again, nb, cs, disk).unwrap(), entries);
            for e in &entries {
                let _ = e.check_constraints(cs, disk);
                let _ = table_size_for(disk, u32::from(e.granularity_bits), cs);
            }
        }
    }
    assert!(parsed > 500, "only {parsed} mutated directories parsed");
    for _ in 0..5_000 {
        let n = rng.below(64) * 8 + if rng.below(8) == 0 { rng.below(8) } else { 0 };
        let b: Vec<u8> = (0..n)
            .map(|_| {
                if rng.below(3) == 0 {
                    rng.next() as u8
                } else {
                    0
                }
            })
            .collect();
        let cs = [512u64, 65536, 0, 3][rng.below(4)];
        if let Ok(t) = decode_table(&b, cs, b"fuzz") {
            assert_eq!(crate::format::bitmap_table::encode_table(&t), b);
        }
        let _ = decode_reftable_entry(rng.interesting(), rng.next(), cs);
        let order = rng.below(9) as u32;
        let mut blk = b.clone();
        let idx = rng.interesting();
        let _ = get_refcount(&blk, idx, order);
        set_refcount(&mut blk, idx, order, rng.interesting());
        let _ = refblock_entries(rng.next() as u32, rng.next() as u32);
        let _ = table_size_for(rng.interesting(), rng.next() as u32, rng.interesting());
    }
}
