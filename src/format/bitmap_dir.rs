//! The bitmap directory (qcow2-format.md §4.2, §4.6): entries, QEMU's checks, encoding.
//!
//! STUB: signatures are the contract; bodies are being written.

use crate::error::Result;

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
    /// Encoded size, padded to 8.
    pub fn encoded_len(&self) -> usize {
        todo!()
    }
    /// Appends the encoded entry (with zero padding) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }
    /// QEMU's check_dir_entry: the per-entry constraints of §4.6 step 2. On failure the error is
    /// `Error::InvalidImage("Bitmap 'NAME' doesn't satisfy the constraints: <field> <value> ...")`.
    pub fn check_constraints(&self, cluster_size: u64, disk_size: u64) -> Result<()> {
        let _ = (cluster_size, disk_size);
        todo!()
    }
}

/// Parses and validates a whole directory (§4.6 steps 1-3, QEMU's order and messages), including
/// duplicate names ("Bitmap already exists: NAME"). `buf.len()` is the directory size.
pub fn parse_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<BitmapDirEntry>> {
    let _ = (buf, nb_bitmaps, cluster_size, disk_size);
    todo!()
}

/// Encodes a directory (entries in order).
pub fn encode_directory(entries: &[BitmapDirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}
