//! The bitmap directory (docs/format.md, 'Bitmap directory' and 'Checks when loading'): entries,
//! QEMU's checks, encoding.
//!
//! Messages start with QEMU's text and then name the field and the bad value (qdirty's rule),
//! e.g. "Bitmap 'b1' doesn't satisfy the constraints: granularity_bits 40 is outside 9..31".

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::be::{get_u16, get_u32, get_u64};
use crate::format::{
    round_up, BME_MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE,
    BME_MIN_GRANULARITY_BITS, BME_RESERVED_FLAGS, BT_DIRTY_TRACKING_BITMAP,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidImage(msg.into())
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// BME_FLAG_* bits.
    pub flags: u32,
    /// Type; 1 = dirty tracking bitmap.
    pub kind: u8,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Name bytes as stored (not NUL terminated, may be empty when read from disk).
    pub name: Vec<u8>,
    /// Extra data (QEMU refuses any).
    pub extra_data: Vec<u8>,
}

impl BitmapDirEntry {
    /// Size of the fixed part of an entry.
    pub const FIXED_SIZE: usize = 24;
    /// in_use flag.
    pub fn in_use(&self) -> bool {
        self.flags & crate::format::BME_FLAG_IN_USE != 0
    }
    /// auto flag.
    pub fn auto(&self) -> bool {
        self.flags & crate::format::BME_FLAG_AUTO != 0
    }
    /// Encoded size of an entry with a name of `name_len` bytes and no extra data (what a new
    /// bitmap takes in the directory), padded to 8.
    pub fn size_for_name(name_len: usize) -> u64 {
        (Self::FIXED_SIZE as u64 + name_len as u64).next_multiple_of(8)
    }
    /// Encoded size, padded to 8.
    pub fn encoded_len(&self) -> usize {
        (Self::FIXED_SIZE + self.extra_data.len() + self.name.len()).div_ceil(8) * 8
    }
    /// Appends the encoded entry (with zero padding) to `out`.
    ///
    /// The caller keeps `name` within 1023 bytes (QEMU's limit, checked by
    /// `check_constraints`); name_size is a 16-bit field.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
    /// The name as QEMU uses it: the stored bytes up to the first NUL (QEMU copies names with
    /// g_strndup and prints them with "%.*s").
    pub fn qemu_name(&self) -> &[u8] {
        self.name.split(|&c| c == 0).next().unwrap_or(&[])
    }
    /// QEMU's check_dir_entry: the per-entry constraints (docs/format.md, 'Checks when loading',
    /// step 6). On failure the error is
    /// `Error::InvalidImage("Bitmap 'NAME' doesn't satisfy the constraints: <field> <value> ...")`.
    ///
    /// Checked in QEMU's order: table_size != 0, table_offset != 0, table_offset cluster aligned,
    /// table_size <= BME_MAX_TABLE_SIZE, granularity_bits in 9..=31, no reserved flags,
    /// name_size <= 1023, type 1, table_size * cluster_size <= BME_MAX_PHYS_SIZE, and (only when
    /// in_use is clear) table_size * cluster_size * 8 * granularity >= disk_size. `disk_size` is
    /// QEMU's bdrv_getlength (the header size rounded down to 512). QEMU does not require a
    /// non-empty name.
    pub fn check_constraints(&self, cluster_size: u64, disk_size: u64) -> Result<()> {
        self.check_constraints_at(cluster_size, disk_size, None)
    }

    fn check_constraints_at(
        &self,
        cluster_size: u64,
        disk_size: u64,
        index: Option<usize>,
    ) -> Result<()> {
        let detail = self.constraint_violation(cluster_size, disk_size);
        match detail {
            None => Ok(()),
            Some(d) => {
                let name = self.qemu_name();
                let at = match index {
                    Some(i) if name.is_empty() => format!("entry {i}: "),
                    _ => String::new(),
                };
                Err(Error::InvalidImage(format!(
                    "Bitmap '{}' doesn't satisfy the constraints: {at}{d}",
                    String::from_utf8_lossy(name)
                )))
            }
        }
    }

    fn constraint_violation(&self, cluster_size: u64, disk_size: u64) -> Option<String> {
        let ts = u64::from(self.table_size);
        if ts == 0 {
            return Some("table_size is 0".into());
        }
        if self.table_offset == 0 {
            return Some("table_offset is 0".into());
        }
        if self.table_offset.checked_rem(cluster_size) != Some(0) {
            return Some(format!(
                "table_offset {:#x} is not a multiple of the cluster size {cluster_size}",
                self.table_offset
            ));
        }
        if ts > BME_MAX_TABLE_SIZE {
            return Some(format!(
                "table_size {ts} exceeds the maximum of {BME_MAX_TABLE_SIZE} entries"
            ));
        }
        let g = u32::from(self.granularity_bits);
        if !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&g) {
            return Some(format!(
                "granularity_bits {g} is outside {BME_MIN_GRANULARITY_BITS}..{BME_MAX_GRANULARITY_BITS}"
            ));
        }
        if self.flags & BME_RESERVED_FLAGS != 0 {
            return Some(format!(
                "flags {:#x} has reserved bits set ({:#x})",
                self.flags,
                self.flags & BME_RESERVED_FLAGS
            ));
        }
        if self.name.len() > BME_MAX_NAME_SIZE {
            return Some(format!(
                "name_size {} exceeds the maximum of {BME_MAX_NAME_SIZE}",
                self.name.len()
            ));
        }
        if self.kind != BT_DIRTY_TRACKING_BITMAP {
            return Some(format!(
                "type {} is not {BT_DIRTY_TRACKING_BITMAP} (dirty tracking bitmap)",
                self.kind
            ));
        }
        let phys = u128::from(ts) * u128::from(cluster_size);
        if phys > u128::from(BME_MAX_PHYS_SIZE) {
            return Some(format!(
                "table_size {ts} * cluster size {cluster_size} = {phys} bytes of bitmap data \
                 exceeds the maximum of {BME_MAX_PHYS_SIZE}"
            ));
        }
        let covered = (phys * 8) << g;
        if !self.in_use() && u128::from(disk_size) > covered {
            return Some(format!(
                "table_size {ts} is too small: it covers {covered} bytes of the disk with \
                 granularity {} and cluster size {cluster_size}, but the disk is {disk_size} bytes",
                1u64 << g
            ));
        }
        None
    }
}

/// Parses and validates a whole directory (docs/format.md, 'Checks when loading', step 6: QEMU's
/// order and messages), including
/// duplicate names ("Bitmap already exists: NAME"). `buf.len()` is the directory size.
///
/// Like QEMU, a later entry whose name equals an earlier one is only an error when it is not
/// in_use (QEMU skips in_use entries whose bitmap already exists, they are kept as they are).
/// Names are compared the way QEMU does, up to the first NUL.
pub fn parse_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<BitmapDirEntry>> {
    let scan = scan_directory(buf, nb_bitmaps, cluster_size, disk_size);
    // QEMU stops at the first failing entry, which comes before any directory-level failure
    // found later in the walk; duplicates are found after the walk.
    if let Some(reason) = scan.entries.iter().find_map(|(_, r)| r.clone()) {
        return Err(invalid(reason));
    }
    if let Some(e) = scan.directory_error {
        return Err(e);
    }
    let entries: Vec<BitmapDirEntry> = scan.entries.into_iter().map(|(e, _)| e).collect();
    if let Some(reason) = duplicate_reasons(&entries, &vec![false; entries.len()])
        .into_iter()
        .flatten()
        .next()
    {
        return Err(invalid(reason));
    }
    Ok(entries)
}

/// The salvage form of [`parse_directory`]: the directory as a whole must be sound (the walk
/// over the entries, their count, the size: QEMU's "Broken bitmap directory", "More/Less bitmaps
/// found ...", which are returned as errors), but an entry that fails its own checks (extra
/// data, QEMU's per-entry constraints, a duplicate name) is returned with the reason QEMU would
/// refuse the image for, instead of failing the whole parse. Entries come in directory order.
///
/// A duplicate is only reported among the entries that pass their own checks (a broken entry is
/// never loaded, so it cannot make a valid one "already exist").
pub fn parse_directory_salvage(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<(BitmapDirEntry, Option<String>)>> {
    let scan = scan_directory(buf, nb_bitmaps, cluster_size, disk_size);
    if let Some(e) = scan.directory_error {
        return Err(e);
    }
    let mut out = scan.entries;
    let broken: Vec<bool> = out.iter().map(|(_, r)| r.is_some()).collect();
    let entries: Vec<BitmapDirEntry> = out.iter().map(|(e, _)| e.clone()).collect();
    for (i, dup) in duplicate_reasons(&entries, &broken).into_iter().enumerate() {
        if dup.is_some() {
            out[i].1 = dup;
        }
    }
    Ok(out)
}

/// What a walk over the directory found.
struct Scan {
    /// Entries walked so far, each with the reason it fails its own checks, if it does.
    entries: Vec<(BitmapDirEntry, Option<String>)>,
    /// A failure of the directory as a whole (the walk stops there).
    directory_error: Option<Error>,
}

fn scan_directory(buf: &[u8], nb_bitmaps: u32, cluster_size: u64, disk_size: u64) -> Scan {
    let mut scan = Scan {
        // Bounded by the directory size (every entry takes at least 24 bytes).
        entries: Vec::with_capacity((nb_bitmaps as usize).min(buf.len() / 24)),
        directory_error: None,
    };
    let size = buf.len() as u64;
    if size == 0 {
        scan.directory_error = Some(invalid("Requested bitmap directory size is zero"));
        return scan;
    }
    if size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
        scan.directory_error = Some(invalid(format!(
            "Requested bitmap directory size is too big: {size} bytes exceed the maximum of \
             {QCOW2_MAX_BITMAP_DIRECTORY_SIZE}"
        )));
        return scan;
    }
    let mut pos: usize = 0;
    let mut count: u64 = 0;
    while pos < buf.len() {
        let index = count;
        let remaining = buf.len() - pos;
        if remaining < BitmapDirEntry::FIXED_SIZE {
            scan.directory_error = Some(invalid(format!(
                "Broken bitmap directory: entry {index} at offset {pos} needs \
                 {} bytes but only {remaining} remain",
                BitmapDirEntry::FIXED_SIZE
            )));
            return scan;
        }
        count += 1;
        if count > u64::from(nb_bitmaps) {
            scan.directory_error = Some(invalid(format!(
                "More bitmaps found than specified in header extension: entry {index} at offset \
                 {pos} but nb_bitmaps is {nb_bitmaps}"
            )));
            return scan;
        }
        let e = &buf[pos..];
        let table_offset = get_u64(e, 0);
        let table_size = get_u32(e, 8);
        let flags = get_u32(e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = get_u16(e, 18);
        let extra_data_size = get_u32(e, 20);
        let entry_size = round_up(
            BitmapDirEntry::FIXED_SIZE as u64 + u64::from(name_size) + u64::from(extra_data_size),
            8,
        );
        if entry_size > remaining as u64 {
            scan.directory_error = Some(invalid(format!(
                "Broken bitmap directory: entry {index} at offset {pos} (name_size {name_size}, \
                 extra_data_size {extra_data_size}) needs {entry_size} bytes but only {remaining} \
                 remain"
            )));
            return scan;
        }
        // entry_size <= remaining: every slice below is in bounds.
        let extra_end = BitmapDirEntry::FIXED_SIZE + extra_data_size as usize;
        let name_end = extra_end + usize::from(name_size);
        let entry = BitmapDirEntry {
            table_offset,
            table_size,
            flags,
            kind,
            granularity_bits,
            name: e[extra_end..name_end].to_vec(),
            extra_data: e[BitmapDirEntry::FIXED_SIZE..extra_end].to_vec(),
        };
        let reason = if extra_data_size != 0 {
            Some(format!(
                "Bitmap extra data is not supported: bitmap '{}' (entry {index}) has \
                 extra_data_size {extra_data_size}",
                String::from_utf8_lossy(entry.qemu_name())
            ))
        } else {
            match entry.check_constraints_at(cluster_size, disk_size, Some(index as usize)) {
                Ok(()) => None,
                Err(e) => Some(match e {
                    Error::InvalidImage(m) => m,
                    other => other.to_string(),
                }),
            }
        };
        scan.entries.push((entry, reason));
        pos += entry_size as usize;
    }
    if count != u64::from(nb_bitmaps) {
        scan.directory_error = Some(invalid(format!(
            "Less bitmaps found than specified in header extension: found {count} but \
             nb_bitmaps is {nb_bitmaps}"
        )));
        return scan;
    }
    if pos != buf.len() {
        scan.directory_error = Some(invalid(format!(
            "Broken bitmap directory: the entries end at offset {pos} but the directory is {} \
             bytes",
            buf.len()
        )));
    }
    scan
}

/// For each entry, QEMU's "Bitmap already exists" reason when an earlier entry (not in `skip`)
/// has the same name and this one is not in_use (QEMU skips in_use duplicates). Entries in
/// `skip` are ignored both ways.
fn duplicate_reasons(entries: &[BitmapDirEntry], skip: &[bool]) -> Vec<Option<String>> {
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    let mut out = vec![None; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        if skip[i] {
            continue;
        }
        let name = e.qemu_name();
        match seen.get(name) {
            Some(&first) => {
                if !e.in_use() {
                    out[i] = Some(format!(
                        "Bitmap already exists: {}: directory entries {first} and {i} have the \
                         same name",
                        String::from_utf8_lossy(name)
                    ));
                }
            }
            None => {
                seen.insert(name, i);
            }
        }
    }
    out
}

/// Encodes a directory (entries in order).
pub fn encode_directory(entries: &[BitmapDirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BME_FLAG_AUTO, BME_FLAG_IN_USE};

    const C: u64 = 65536;
    const DISK: u64 = 64 << 20;

    fn entry(name: &[u8], offset: u64) -> BitmapDirEntry {
        BitmapDirEntry {
            table_offset: offset,
            table_size: 1,
            flags: BME_FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: name.to_vec(),
            extra_data: Vec::new(),
        }
    }

    fn err(r: Result<Vec<BitmapDirEntry>>) -> String {
        match r {
            Err(Error::InvalidImage(m)) => m,
            other => panic!("expected InvalidImage, got {other:?}"),
        }
    }

    fn cerr(e: &BitmapDirEntry) -> String {
        match e.check_constraints(C, DISK) {
            Err(Error::InvalidImage(m)) => m,
            other => panic!("expected InvalidImage, got {other:?}"),
        }
    }

    #[test]
    fn qemu_example_entry_bytes() {
        // The bytes `qemu-img bitmap --add` writes for "b1" on a new 64 MiB image with 64 KiB
        // clusters: table at 0x40000, table_size 1, flags auto, type 1, granularity_bits 16.
        let e = entry(b"b1", 0x40000);
        let mut out = Vec::new();
        e.encode_into(&mut out);
        assert_eq!(
            out,
            [
                0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0x10, 0, 2, 0, 0, 0, 0, b'b',
                b'1', 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(e.encoded_len(), 32);
        assert_eq!(parse_directory(&out, 1, C, DISK).unwrap(), vec![e]);
    }

    #[test]
    fn round_trip_many() {
        let mut es = Vec::new();
        for i in 0..20u64 {
            let mut e = entry(
                format!("bitmap-{i}-{}", "x".repeat(i as usize)).as_bytes(),
                (i + 3) * C,
            );
            e.flags = (i % 4) as u32;
            e.granularity_bits = 9 + (i % 23) as u8;
            e.table_size = 1 + (i % 3) as u32;
            es.push(e);
        }
        let dir = encode_directory(&es);
        assert_eq!(dir.len(), es.iter().map(|e| e.encoded_len()).sum::<usize>());
        assert_eq!(dir.len() % 8, 0);
        assert_eq!(parse_directory(&dir, 20, C, DISK).unwrap(), es);
        // 1023-byte name is accepted, empty name too (QEMU does on load).
        let long = entry(&[b'n'; 1023], C);
        let empty = entry(b"", 2 * C);
        let dir = encode_directory(&[long.clone(), empty.clone()]);
        assert_eq!(
            parse_directory(&dir, 2, C, DISK).unwrap(),
            vec![long, empty]
        );
    }

    #[test]
    fn directory_level_errors() {
        assert_eq!(
            err(parse_directory(&[], 1, C, DISK)),
            "Requested bitmap directory size is zero"
        );
        let big = vec![0u8; QCOW2_MAX_BITMAP_DIRECTORY_SIZE as usize + 1];
        assert!(err(parse_directory(&big, 1, C, DISK))
            .starts_with("Requested bitmap directory size is too big"));

        let one = encode_directory(&[entry(b"b1", C)]);
        let two = encode_directory(&[entry(b"b1", C), entry(b"b2", 2 * C)]);
        // fixed part does not fit
        let m = err(parse_directory(&one[..20], 1, C, DISK));
        assert!(
            m.starts_with(
                "Broken bitmap directory: entry 0 at offset 0 needs 24 bytes but only 20 remain"
            ),
            "{m}"
        );
        // whole entry does not fit
        let m = err(parse_directory(&one[..26], 1, C, DISK));
        assert!(
            m.starts_with("Broken bitmap directory: entry 0")
                && m.contains("needs 32 bytes but only 26"),
            "{m}"
        );
        // more than nb_bitmaps (checked before the entry size)
        let m = err(parse_directory(&two[..56], 1, C, DISK));
        assert!(
            m.starts_with("More bitmaps found than specified in header extension: entry 1"),
            "{m}"
        );
        // fewer
        let m = err(parse_directory(&one, 2, C, DISK));
        assert!(m.starts_with("Less bitmaps found than specified in header extension: found 1 but nb_bitmaps is 2"), "{m}");
        // trailing garbage shorter than an entry
        let mut t = one.clone();
        t.extend_from_slice(&[0; 8]);
        assert!(
            err(parse_directory(&t, 1, C, DISK)).starts_with("Broken bitmap directory: entry 1")
        );
        // extra data
        let mut e = entry(b"b1", C);
        e.extra_data = vec![0; 8];
        let m = err(parse_directory(&encode_directory(&[e]), 1, C, DISK));
        assert_eq!(
            m,
            "Bitmap extra data is not supported: bitmap 'b1' (entry 0) has extra_data_size 8"
        );
        // huge extra_data_size / name_size never panic
        let mut d = one.clone();
        d[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(err(parse_directory(&d, 1, C, DISK)).starts_with("Broken bitmap directory"));
        let mut d = one.clone();
        d[18..20].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(err(parse_directory(&d, 1, C, DISK)).starts_with("Broken bitmap directory"));
        // padding bytes are not checked (QEMU does not)
        let mut d = one.clone();
        d[31] = 0xFF;
        assert!(parse_directory(&d, 1, C, DISK).is_ok());
    }

    #[test]
    fn duplicates() {
        let d = encode_directory(&[entry(b"b1", C), entry(b"b2", 2 * C), entry(b"b1", 3 * C)]);
        assert_eq!(
            err(parse_directory(&d, 3, C, DISK)),
            "Bitmap already exists: b1: directory entries 0 and 2 have the same name"
        );
        // Names compare up to the first NUL, as in QEMU.
        let d = encode_directory(&[entry(b"b1", C), entry(b"b1\0zz", 2 * C)]);
        assert!(err(parse_directory(&d, 2, C, DISK)).starts_with("Bitmap already exists: b1:"));
        // A later in_use duplicate is skipped by QEMU, not an error.
        let mut dup = entry(b"b1", 2 * C);
        dup.flags = BME_FLAG_IN_USE;
        let d = encode_directory(&[entry(b"b1", C), dup]);
        assert_eq!(parse_directory(&d, 2, C, DISK).unwrap().len(), 2);
        // ... but an in_use first entry does not protect a consistent second one.
        let mut first = entry(b"b1", C);
        first.flags = BME_FLAG_IN_USE;
        let d = encode_directory(&[first, entry(b"b1", 2 * C)]);
        assert!(err(parse_directory(&d, 2, C, DISK)).starts_with("Bitmap already exists: b1"));
    }

    #[test]
    fn constraints_each_field() {
        let pre = "Bitmap 'b1' doesn't satisfy the constraints: ";
        let ok = entry(b"b1", C);
        assert!(ok.check_constraints(C, DISK).is_ok());

        let mut e = ok.clone();
        e.table_size = 0;
        assert_eq!(cerr(&e), format!("{pre}table_size is 0"));
        let mut e = ok.clone();
        e.table_offset = 0;
        assert_eq!(cerr(&e), format!("{pre}table_offset is 0"));
        let mut e = ok.clone();
        e.table_offset = C + 512;
        assert_eq!(
            cerr(&e),
            format!("{pre}table_offset 0x10200 is not a multiple of the cluster size 65536")
        );
        let mut e = ok.clone();
        e.table_size = BME_MAX_TABLE_SIZE as u32 + 1;
        assert!(cerr(&e).starts_with(&format!("{pre}table_size 134217729 exceeds the maximum")));
        let mut e = ok.clone();
        e.granularity_bits = 40;
        assert_eq!(
            cerr(&e),
            format!("{pre}granularity_bits 40 is outside 9..31")
        );
        e.granularity_bits = 8;
        assert_eq!(
            cerr(&e),
            format!("{pre}granularity_bits 8 is outside 9..31")
        );
        let mut e = ok.clone();
        e.flags = 0x6;
        assert_eq!(
            cerr(&e),
            format!("{pre}flags 0x6 has reserved bits set (0x4)")
        );
        let mut e = ok.clone();
        e.name = vec![b'a'; 1024];
        assert!(cerr(&e).contains(
            "doesn't satisfy the constraints: name_size 1024 exceeds the maximum of 1023"
        ));
        let mut e = ok.clone();
        e.kind = 2;
        assert_eq!(
            cerr(&e),
            format!("{pre}type 2 is not 1 (dirty tracking bitmap)")
        );
        // 512 MiB of bitmap data max: 8193 clusters of 64 KiB is too much.
        let mut e = ok.clone();
        e.table_size = 8193;
        e.flags = BME_FLAG_IN_USE;
        assert!(cerr(&e).starts_with(&format!(
            "{pre}table_size 8193 * cluster size 65536 = 536936448 bytes"
        )));
        e.table_size = 8192;
        assert!(e.check_constraints(C, DISK).is_ok());
        // too small a table, only when not in_use
        let mut e = ok.clone();
        e.granularity_bits = 9; // one cluster covers 256 MiB
        assert!(e.check_constraints(C, 256 << 20).is_ok());
        let m = match e.check_constraints(C, (256 << 20) + 1) {
            Err(Error::InvalidImage(m)) => m,
            r => panic!("{r:?}"),
        };
        assert!(
            m.starts_with(&format!(
                "{pre}table_size 1 is too small: it covers 268435456 bytes"
            )),
            "{m}"
        );
        e.flags |= BME_FLAG_IN_USE;
        assert!(e.check_constraints(C, u64::MAX).is_ok());
        // a bigger table than needed is fine here (the exact size is checked when loading data)
        let mut e = ok.clone();
        e.table_size = 2;
        assert!(e.check_constraints(C, DISK).is_ok());
        // cluster size 0 never panics
        assert!(ok.check_constraints(0, DISK).is_err());
        // Order: table_size 0 is reported before a bad type.
        let mut e = ok.clone();
        e.table_size = 0;
        e.kind = 7;
        assert!(cerr(&e).ends_with("table_size is 0"));
    }

    #[test]
    fn empty_name_gets_index() {
        let mut bad = entry(b"", 2 * C);
        bad.granularity_bits = 40;
        let d = encode_directory(&[entry(b"b1", C), bad]);
        assert_eq!(
            err(parse_directory(&d, 2, C, DISK)),
            "Bitmap '' doesn't satisfy the constraints: entry 1: granularity_bits 40 is outside 9..31"
        );
    }
}
