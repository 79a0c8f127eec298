//! Bitmap table entries (qcow2-format.md §4.3, §4.4).
//!
//! STUB: signatures are the contract; bodies are being written.

use crate::error::Result;

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

impl TableEntry {
    /// Decodes and checks a raw entry (reserved bits, alignment, all-ones with an offset).
    /// The error message names the entry index, the bitmap and the raw value.
    pub fn decode(raw: u64, cluster_size: u64, bitmap: &[u8], index: u64) -> Result<TableEntry> {
        let _ = (raw, cluster_size, bitmap, index);
        todo!()
    }
    /// Encodes the entry.
    pub fn encode(self) -> u64 {
        todo!()
    }
}

/// Exact table size QEMU requires: ceil(ceil(disk_size / granularity) / (8 * cluster_size)).
pub fn table_size_for(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    let _ = (disk_size, granularity_bits, cluster_size);
    todo!()
}

/// Decodes a whole table read from disk (`buf.len()` = 8 * table_size).
pub fn decode_table(buf: &[u8], cluster_size: u64, bitmap: &[u8]) -> Result<Vec<TableEntry>> {
    let _ = (buf, cluster_size, bitmap);
    todo!()
}

/// Encodes a table.
pub fn encode_table(entries: &[TableEntry]) -> Vec<u8> {
    let _ = entries;
    todo!()
}
