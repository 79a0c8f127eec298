//! Big-endian field access on byte slices.
//!
//! The `get_*`/`put_*` helpers panic when out of bounds (the caller checks bounds first); the
//! `try_get_*` variants return `None` instead and are what parsers of untrusted bytes use.

/// Reads a big-endian u16 at `pos` (caller guarantees bounds).
pub fn get_u16(buf: &[u8], pos: usize) -> u16 {
    u16::from_be_bytes([buf[pos], buf[pos + 1]])
}
/// Reads a big-endian u32 at `pos` (caller guarantees bounds).
pub fn get_u32(buf: &[u8], pos: usize) -> u32 {
    u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]])
}
/// Reads a big-endian u64 at `pos` (caller guarantees bounds).
pub fn get_u64(buf: &[u8], pos: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[pos..pos + 8]);
    u64::from_be_bytes(b)
}
/// Writes a big-endian u16 at `pos`.
pub fn put_u16(buf: &mut [u8], pos: usize, v: u16) {
    buf[pos..pos + 2].copy_from_slice(&v.to_be_bytes());
}
/// Writes a big-endian u32 at `pos`.
pub fn put_u32(buf: &mut [u8], pos: usize, v: u32) {
    buf[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
}
/// Writes a big-endian u64 at `pos`.
pub fn put_u64(buf: &mut [u8], pos: usize, v: u64) {
    buf[pos..pos + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads a big-endian u16 at `pos`, `None` when out of bounds.
pub fn try_get_u16(buf: &[u8], pos: usize) -> Option<u16> {
    let b = buf.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}
/// Reads a big-endian u32 at `pos`, `None` when out of bounds.
pub fn try_get_u32(buf: &[u8], pos: usize) -> Option<u32> {
    let b = buf.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
/// Reads a big-endian u64 at `pos`, `None` when out of bounds.
pub fn try_get_u64(buf: &[u8], pos: usize) -> Option<u64> {
    let b = buf.get(pos..pos.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut b = [0u8; 16];
        put_u16(&mut b, 0, 0x1234);
        put_u32(&mut b, 2, 0xDEAD_BEEF);
        put_u64(&mut b, 6, 0x0102_0304_0506_0708);
        assert_eq!(&b[..6], &[0x12, 0x34, 0xDE, 0xAD, 0xBE, 0xEF]);
        assert_eq!(get_u16(&b, 0), 0x1234);
        assert_eq!(get_u32(&b, 2), 0xDEAD_BEEF);
        assert_eq!(get_u64(&b, 6), 0x0102_0304_0506_0708);
        assert_eq!(try_get_u64(&b, 6), Some(0x0102_0304_0506_0708));
        assert_eq!(try_get_u64(&b, 9), None);
        assert_eq!(try_get_u32(&b, 13), None);
        assert_eq!(try_get_u16(&b, 15), None);
        assert_eq!(try_get_u16(&b, usize::MAX), None);
        assert_eq!(try_get_u64(&b, usize::MAX - 3), None);
    }
}
