//! Bitmap table entries (docs/format.md, 'Bitmap table' and 'Bitmap data').

use crate::error::{Error, Result};
use crate::format::be::get_u64;
use crate::format::{
    BME_TABLE_ENTRY_FLAG_ALL_ONES, BME_TABLE_ENTRY_OFFSET_MASK, BME_TABLE_ENTRY_RESERVED_MASK,
};

/// One decoded bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// The data cluster reads as all zeros (raw value 0).
    Zeroes,
    /// The data cluster reads as all ones (raw value 1; QEMU never writes it).
    Ones,
    /// Data stored in the cluster at this host offset.
    Cluster(u64),
}

fn table_error(bitmap: &[u8], index: u64, raw: u64, why: String) -> Error {
    Error::InvalidImage(format!(
        "Could not read bitmap_table table from image for bitmap '{}': entry {index} has invalid \
         value {raw:#018x}: {why}",
        String::from_utf8_lossy(bitmap.split(|&c| c == 0).next().unwrap_or(&[]))
    ))
}

impl TableEntry {
    /// Decodes and checks a raw entry (reserved bits, alignment, all-ones with an offset).
    /// The error message names the entry index, the bitmap and the raw value.
    ///
    /// QEMU's check_table_entry: reserved bits (mask 0xFF000000000001FE) must be 0; with a
    /// non-zero offset bit 0 must be 0 and the offset must be cluster aligned.
    pub fn decode(raw: u64, cluster_size: u64, bitmap: &[u8], index: u64) -> Result<TableEntry> {
        let reserved = raw & BME_TABLE_ENTRY_RESERVED_MASK;
        if reserved != 0 {
            return Err(table_error(
                bitmap,
                index,
                raw,
                format!("reserved bits {reserved:#x} are set"),
            ));
        }
        let offset = raw & BME_TABLE_ENTRY_OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeroes
            });
        }
        if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
            return Err(table_error(
                bitmap,
                index,
                raw,
                "the all-ones flag (bit 0) is set together with an offset".into(),
            ));
        }
        if offset.checked_rem(cluster_size) != Some(0) {
            return Err(table_error(
                bitmap,
                index,
                raw,
                format!("offset {offset:#x} is not a multiple of the cluster size {cluster_size}"),
            ));
        }
        Ok(TableEntry::Cluster(offset))
    }
    /// Encodes the entry.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeroes => 0,
            TableEntry::Ones => BME_TABLE_ENTRY_FLAG_ALL_ONES,
            TableEntry::Cluster(off) => off,
        }
    }
}

/// Exact table size QEMU requires: ceil(ceil(disk_size / granularity) / (8 * cluster_size)).
///
/// Computed in 128-bit arithmetic, so it never overflows; a cluster size of 0 gives 0.
pub fn table_size_for(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    if cluster_size == 0 {
        return 0;
    }
    let d = u128::from(disk_size);
    let bits = if granularity_bits >= 64 {
        u128::from(disk_size != 0)
    } else {
        let g = 1u128 << granularity_bits;
        d.div_ceil(g)
    };
    let per_cluster = u128::from(cluster_size) * 8;
    // bits <= 2^64, per_cluster >= 8: the result fits in u64.
    bits.div_ceil(per_cluster) as u64
}

/// What `qemu-img measure` reports as "bitmaps" for persistent bitmaps of the given
/// granularities and name lengths on a disk of `disk_size` bytes: for each bitmap its data
/// clusters (ceil(bitmap bytes / cluster) whole clusters) plus its table rounded up to whole
/// clusters, plus the directory rounded up to whole clusters (QEMU:
/// qcow2_get_persistent_dirty_bitmap_size via qcow2_measure).
pub fn measure_bitmaps(
    disk_size: u64,
    cluster_size: u64,
    bitmaps: impl IntoIterator<Item = (u64, usize)>,
) -> u64 {
    if cluster_size == 0 {
        return 0;
    }
    let mut total = 0u64;
    let mut dir = 0u64;
    for (granularity, name_len) in bitmaps {
        let bytes = disk_size.div_ceil(granularity.max(1)).div_ceil(8);
        let data_clusters = bytes.div_ceil(cluster_size);
        total = total
            .saturating_add(data_clusters.saturating_mul(cluster_size))
            .saturating_add(
                data_clusters
                    .saturating_mul(8)
                    .div_ceil(cluster_size)
                    .saturating_mul(cluster_size),
            );
        dir = dir.saturating_add((24 + name_len as u64).next_multiple_of(8));
    }
    if dir > 0 {
        total = total.saturating_add(dir.div_ceil(cluster_size) * cluster_size);
    }
    total
}

/// Decodes a whole table read from disk (`buf.len()` = 8 * table_size).
///
/// A length that is not a multiple of 8 is an `InvalidArgument` error.
pub fn decode_table(buf: &[u8], cluster_size: u64, bitmap: &[u8]) -> Result<Vec<TableEntry>> {
    if buf.len() % 8 != 0 {
        return Err(Error::InvalidArgument(format!(
            "bitmap table of bitmap '{}' is {} bytes, not a multiple of 8",
            String::from_utf8_lossy(bitmap),
            buf.len()
        )));
    }
    buf.chunks_exact(8)
        .enumerate()
        .map(|(i, c)| TableEntry::decode(get_u64(c, 0), cluster_size, bitmap, i as u64))
        .collect()
}

/// Encodes a table.
pub fn encode_table(entries: &[TableEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.encode().to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 65536;

    fn msg(r: Result<TableEntry>) -> String {
        match r {
            Err(Error::InvalidImage(m)) => m,
            other => panic!("expected InvalidImage, got {other:?}"),
        }
    }

    #[test]
    fn decode_valid() {
        assert_eq!(
            TableEntry::decode(0, C, b"b", 0).unwrap(),
            TableEntry::Zeroes
        );
        assert_eq!(TableEntry::decode(1, C, b"b", 0).unwrap(), TableEntry::Ones);
        assert_eq!(
            TableEntry::decode(0x50000, C, b"b", 0).unwrap(),
            TableEntry::Cluster(0x50000)
        );
        let top = 0x00FF_FFFF_FFFF_0000;
        assert_eq!(
            TableEntry::decode(top, C, b"b", 0).unwrap(),
            TableEntry::Cluster(top)
        );
        for e in [
            TableEntry::Zeroes,
            TableEntry::Ones,
            TableEntry::Cluster(0x30000),
        ] {
            assert_eq!(TableEntry::decode(e.encode(), C, b"b", 0).unwrap(), e);
        }
    }

    #[test]
    fn decode_invalid() {
        let m = msg(TableEntry::decode(0x50002, C, b"b1", 7));
        assert!(m.starts_with("Could not read bitmap_table table from image for bitmap 'b1': entry 7 has invalid value 0x0000000000050002"), "{m}");
        assert!(m.contains("reserved bits 0x2"), "{m}");
        let m = msg(TableEntry::decode(0x0100_0000_0005_0000, C, b"b1", 1));
        assert!(m.contains("reserved bits 0x100000000000000"), "{m}");
        let m = msg(TableEntry::decode(0x50001, C, b"b1", 2));
        assert!(m.contains("entry 2") && m.contains("all-ones"), "{m}");
        let m = msg(TableEntry::decode(0x50200, C, b"b1", 3));
        assert!(
            m.contains("offset 0x50200 is not a multiple of the cluster size 65536"),
            "{m}"
        );
        // cluster size 0 never panics
        assert!(TableEntry::decode(0x200, 0, b"x", 0).is_err());
        assert!(TableEntry::decode(u64::MAX, C, b"x", u64::MAX).is_err());
    }

    #[test]
    fn table_round_trip() {
        let t = vec![
            TableEntry::Cluster(0x40000),
            TableEntry::Zeroes,
            TableEntry::Ones,
        ];
        let b = encode_table(&t);
        assert_eq!(b.len(), 24);
        assert_eq!(&b[..8], &[0, 0, 0, 0, 0, 4, 0, 0]);
        assert_eq!(decode_table(&b, C, b"x").unwrap(), t);
        assert!(matches!(
            decode_table(&b[..7], C, b"x"),
            Err(Error::InvalidArgument(_))
        ));
        let mut bad = b.clone();
        bad[23] = 3; // entry 2 = 3: reserved bit 1
        let m = format!("{}", decode_table(&bad, C, b"x").unwrap_err());
        assert!(
            m.contains("entry 2 has invalid value 0x0000000000000003"),
            "{m}"
        );
    }

    #[test]
    fn table_sizes() {
        const K: u64 = 1024;
        const M: u64 = K * K;
        const G: u64 = K * M;
        assert_eq!(table_size_for(64 * M, 16, 64 * K), 1);
        assert_eq!(table_size_for(40 * G, 16, 64 * K), 2);
        assert_eq!(table_size_for(40 * G, 10, 64 * K), 80);
        assert_eq!(table_size_for(4096 * G, 10, 64 * K), 8192);
        assert_eq!(table_size_for(G, 12, 512), 64);
        // 100 MiB, 512 B granularity, 4 KiB clusters: each entry covers 4096 * 8 * 512 = 16 MiB,
        // so 7 entries.
        assert_eq!(table_size_for(100 * M, 9, 4096), 7);
        assert_eq!(table_size_for(0, 16, 65536), 0);
        assert_eq!(table_size_for(1, 16, 65536), 1);
        assert_eq!(
            table_size_for(u64::MAX, 9, 512),
            (1u64 << 55).div_ceil(4096)
        );
        assert_eq!(table_size_for(u64::MAX, 200, 512), 1);
        assert_eq!(table_size_for(u64::MAX, 0, u64::MAX), 1);
        assert_eq!(table_size_for(5, 9, 0), 0);
    }

    /// `qemu-img measure` (QEMU 10.0.2) on a 10 GiB image with 64 KiB clusters and bitmaps
    /// "b1" (64 KiB granularity) and "longname-bitmap" (512 B) reports "bitmaps": 2883584.
    #[test]
    fn measure_matches_qemu_img_measure() {
        let got = measure_bitmaps(10 << 30, 65536, [(65536, 2), (512, 15)]);
        assert_eq!(got, 2_883_584);
        assert_eq!(measure_bitmaps(10 << 30, 65536, []), 0);
    }
}
