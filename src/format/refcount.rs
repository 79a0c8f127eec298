//! Refcount table and refcount block entries (qcow2-format.md §3.1).
//!
//! STUB: signatures are the contract; bodies are being written.

use crate::error::Result;

/// Offset bits of a refcount table entry. QEMU: REFT_OFFSET_MASK.
pub const REFT_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFFF_FE00;
/// Reserved bits of a refcount table entry. QEMU: REFT_RESERVED_MASK.
pub const REFT_RESERVED_MASK: u64 = 0x1FF;

/// Refcount entries per refcount block: cluster_size * 8 / refcount_bits.
pub fn refblock_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    let _ = (cluster_bits, refcount_order);
    todo!()
}

/// Largest refcount value for the width: 2^(2^order) - 1.
pub fn refcount_max(refcount_order: u32) -> u64 {
    let _ = refcount_order;
    todo!()
}

/// Reads entry `index` of a refcount block (big-endian for widths >= 8, LSB-first packed below).
pub fn get_refcount(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    let _ = (block, index, refcount_order);
    todo!()
}

/// Writes entry `index` of a refcount block (value <= refcount_max).
pub fn set_refcount(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    let _ = (block, index, refcount_order, value);
    todo!()
}

/// Decodes a refcount table entry: Ok(None) when 0, Ok(Some(offset)) when valid; an error naming
/// the index and value when reserved bits are set or the offset is not cluster aligned.
pub fn decode_reftable_entry(raw: u64, index: u64, cluster_size: u64) -> Result<Option<u64>> {
    let _ = (raw, index, cluster_size);
    todo!()
}
