//! Big-endian field access on byte slices.
//!
//! STUB: signatures are the contract; bodies are being written.

/// Reads a big-endian u16 at `pos` (caller guarantees bounds).
pub fn get_u16(buf: &[u8], pos: usize) -> u16 {
    u16::from_be_bytes([buf[pos], buf[pos + 1]])
}
/// Reads a big-endian u32 at `pos` (caller guarantees bounds).
pub fn get_u32(buf: &[u8], pos: usize) -> u32 {
    u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap())
}
/// Reads a big-endian u64 at `pos` (caller guarantees bounds).
pub fn get_u64(buf: &[u8], pos: usize) -> u64 {
    u64::from_be_bytes(buf[pos..pos + 8].try_into().unwrap())
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
