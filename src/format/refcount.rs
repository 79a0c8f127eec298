//! Refcount table and refcount block entries (docs/format.md, 'Refcounts and allocation').
//!
//! Widths of 1..64 bits (refcount_order 0..6). Entries of 8 bits and more are big-endian
//! integers of width/8 bytes; narrower entries are packed LSB-first inside each byte (entry i
//! lives in byte i*bits/8 at bit (i*bits) % 8).

use crate::error::{Error, Result};
use crate::format::MAX_REFCOUNT_ORDER;

/// Offset bits of a refcount table entry. QEMU: REFT_OFFSET_MASK.
pub const REFT_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFFF_FE00;
/// Reserved bits of a refcount table entry. QEMU: REFT_RESERVED_MASK.
pub const REFT_RESERVED_MASK: u64 = 0x1FF;

/// Refcount entries per refcount block: cluster_size * 8 / refcount_bits.
///
/// Saturates at u64::MAX for absurd inputs instead of overflowing.
pub fn refblock_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    let shift = (u64::from(cluster_bits) + 3).saturating_sub(u64::from(refcount_order));
    if shift >= 64 {
        u64::MAX
    } else {
        1u64 << shift
    }
}

/// Largest refcount value for the width: 2^(2^order) - 1.
///
/// Orders >= 6 give u64::MAX.
pub fn refcount_max(refcount_order: u32) -> u64 {
    if refcount_order >= MAX_REFCOUNT_ORDER {
        u64::MAX
    } else {
        (1u64 << (1u32 << refcount_order)) - 1
    }
}

/// Where entry `index` lives: (byte offset, bit shift, width in bits); `None` when the entry is
/// not inside a block of `len` bytes or the order is above 6.
fn locate(len: usize, index: u64, refcount_order: u32) -> Option<(usize, u32, u32)> {
    if refcount_order > MAX_REFCOUNT_ORDER {
        return None;
    }
    let bits = 1u32 << refcount_order;
    let bit_pos = index.checked_mul(u64::from(bits))?;
    let byte = usize::try_from(bit_pos / 8).ok()?;
    let nbytes = (bits as usize).div_ceil(8);
    if byte.checked_add(nbytes)? > len {
        return None;
    }
    Some((byte, (bit_pos % 8) as u32, bits))
}

fn out_of_range(len: usize, index: u64, refcount_order: u32) -> Error {
    Error::Precondition(format!(
        "refcount entry {index} (refcount_order {refcount_order}) is outside a refcount block of \
         {len} bytes"
    ))
}

/// Reads entry `index` of a refcount block, failing when it lies outside the block or the order
/// is above 6.
pub fn try_get_refcount(block: &[u8], index: u64, refcount_order: u32) -> Result<u64> {
    let (byte, shift, bits) = locate(block.len(), index, refcount_order)
        .ok_or_else(|| out_of_range(block.len(), index, refcount_order))?;
    if bits < 8 {
        let mask = (1u8 << bits) - 1;
        Ok(u64::from((block[byte] >> shift) & mask))
    } else {
        let n = (bits / 8) as usize;
        Ok(block[byte..byte + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// Writes entry `index` of a refcount block, failing when it lies outside the block, the order
/// is above 6 or `value` exceeds `refcount_max(refcount_order)`.
pub fn try_set_refcount(
    block: &mut [u8],
    index: u64,
    refcount_order: u32,
    value: u64,
) -> Result<()> {
    let (byte, shift, bits) = locate(block.len(), index, refcount_order)
        .ok_or_else(|| out_of_range(block.len(), index, refcount_order))?;
    if value > refcount_max(refcount_order) {
        return Err(Error::Precondition(format!(
            "refcount value {value} does not fit in {bits} bits"
        )));
    }
    if bits < 8 {
        let mask = ((1u8 << bits) - 1) << shift;
        block[byte] = (block[byte] & !mask) | ((value as u8) << shift);
    } else {
        let n = (bits / 8) as usize;
        let be = value.to_be_bytes();
        block[byte..byte + n].copy_from_slice(&be[8 - n..]);
    }
    Ok(())
}

/// Reads entry `index` of a refcount block (big-endian for widths >= 8, LSB-first packed below).
///
/// The caller keeps `index < refblock_entries` for the block; an entry outside `block` (or an
/// order above 6) reads as 0 (see [`try_get_refcount`] for the checked form).
pub fn get_refcount(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    try_get_refcount(block, index, refcount_order).unwrap_or(0)
}

/// Writes entry `index` of a refcount block (value <= refcount_max).
///
/// The caller keeps the index in the block and the value in range; otherwise nothing is written
/// (see [`try_set_refcount`] for the checked form).
pub fn set_refcount(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    let _ = try_set_refcount(block, index, refcount_order, value);
}

/// Decodes a refcount table entry: Ok(None) when 0, Ok(Some(offset)) when valid; an error naming
/// the index and value when reserved bits are set or the offset is not cluster aligned.
pub fn decode_reftable_entry(raw: u64, index: u64, cluster_size: u64) -> Result<Option<u64>> {
    if raw == 0 {
        return Ok(None);
    }
    if raw & REFT_RESERVED_MASK != 0 {
        return Err(Error::InvalidImage(format!(
            "Refcount table entry {index} has reserved bits set: value {raw:#018x} (reserved \
             bits {:#x})",
            raw & REFT_RESERVED_MASK
        )));
    }
    let offset = raw & REFT_OFFSET_MASK;
    if offset.checked_rem(cluster_size) != Some(0) {
        return Err(Error::InvalidImage(format!(
            "Refblock offset {offset:#x} unaligned (reftable index: {index:#x}): not a multiple \
             of the cluster size {cluster_size}"
        )));
    }
    Ok(Some(offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(refblock_entries(16, 4), 32768);
        assert_eq!(refblock_entries(9, 0), 4096);
        assert_eq!(refblock_entries(9, 6), 64);
        assert_eq!(refblock_entries(21, 6), 262144);
        assert_eq!(refblock_entries(u32::MAX, 0), u64::MAX);
        assert_eq!(refblock_entries(0, 40), 1);
        assert_eq!(refcount_max(0), 1);
        assert_eq!(refcount_max(1), 3);
        assert_eq!(refcount_max(2), 15);
        assert_eq!(refcount_max(3), 255);
        assert_eq!(refcount_max(4), 65535);
        assert_eq!(refcount_max(5), u32::MAX as u64);
        assert_eq!(refcount_max(6), u64::MAX);
        assert_eq!(refcount_max(99), u64::MAX);
    }

    #[test]
    fn sub_byte_layout() {
        // 1-bit: entry i is bit i%8 of byte i/8.
        let mut b = vec![0u8; 4];
        set_refcount(&mut b, 0, 0, 1);
        set_refcount(&mut b, 9, 0, 1);
        assert_eq!(b, [0x01, 0x02, 0, 0]);
        assert_eq!(get_refcount(&b, 9, 0), 1);
        assert_eq!(get_refcount(&b, 8, 0), 0);
        // 2-bit: entry 1 at bits 2..3 of byte 0, entry 5 at bits 2..3 of byte 1.
        let mut b = vec![0u8; 2];
        set_refcount(&mut b, 1, 1, 3);
        set_refcount(&mut b, 5, 1, 2);
        assert_eq!(b, [0x0C, 0x08]);
        set_refcount(&mut b, 1, 1, 1);
        assert_eq!(b, [0x04, 0x08]);
        // 4-bit: entry 0 low nibble, entry 1 high nibble.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 2, 0xA);
        set_refcount(&mut b, 1, 2, 0x5);
        assert_eq!(b, [0x5A]);
        assert_eq!(get_refcount(&b, 0, 2), 0xA);
        assert_eq!(get_refcount(&b, 1, 2), 0x5);
    }

    #[test]
    fn byte_widths_big_endian() {
        let mut b = vec![0u8; 16];
        set_refcount(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[..4], &[0, 0, 0x12, 0x34]);
        set_refcount(&mut b, 1, 5, 0xDEAD_BEEF);
        assert_eq!(&b[4..8], &[0xDE, 0xAD, 0xBE, 0xEF]);
        set_refcount(&mut b, 1, 6, 0x0102_0304_0506_0708);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        set_refcount(&mut b, 3, 3, 0xFE);
        assert_eq!(b[3], 0xFE);
        assert_eq!(get_refcount(&b, 3, 3), 0xFE);
    }

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let n = 64 * 8 / (1u64 << order);
            let max = refcount_max(order);
            for i in 0..n {
                let v = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 3) & max;
                set_refcount(&mut b, i, order, v);
            }
            for i in 0..n {
                let v = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 3) & max;
                assert_eq!(get_refcount(&b, i, order), v, "order {order} entry {i}");
            }
            assert!(try_get_refcount(&b, n, order).is_err());
            assert!(try_set_refcount(&mut b, n, order, 0).is_err());
            if order < 6 {
                assert!(try_set_refcount(&mut b, 0, order, max + 1).is_err());
            }
        }
        let mut b = vec![0u8; 8];
        assert!(try_get_refcount(&b, 0, 7).is_err());
        assert!(try_get_refcount(&b, u64::MAX, 0).is_err());
        assert!(try_get_refcount(&b, u64::MAX, 6).is_err());
        assert_eq!(get_refcount(&b, u64::MAX, 3), 0);
        set_refcount(&mut b, u64::MAX, 4, 1);
        assert_eq!(b, [0u8; 8]);
    }

    #[test]
    fn reftable_entries() {
        assert_eq!(decode_reftable_entry(0, 0, 65536).unwrap(), None);
        assert_eq!(
            decode_reftable_entry(0x20000, 0, 65536).unwrap(),
            Some(0x20000)
        );
        assert_eq!(decode_reftable_entry(0x200, 0, 512).unwrap(), Some(0x200));
        let m = format!("{}", decode_reftable_entry(0x20001, 5, 65536).unwrap_err());
        assert!(
            m.contains("entry 5") && m.contains("0x0000000000020001") && m.contains("reserved"),
            "{m}"
        );
        let m = format!("{}", decode_reftable_entry(0x20200, 6, 65536).unwrap_err());
        assert!(
            m.starts_with("Refblock offset 0x20200 unaligned (reftable index: 0x6)"),
            "{m}"
        );
        assert!(decode_reftable_entry(u64::MAX, u64::MAX, 0).is_err());
        assert!(decode_reftable_entry(0x200, 0, 0).is_err());
    }
}
