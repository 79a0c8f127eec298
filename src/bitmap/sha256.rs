//! SHA-256 (FIPS 180-4), our own implementation, so the C library needs no crypto dependency.
//!
//! STUB: signatures are the contract; bodies are being written.

/// Streaming SHA-256.
#[derive(Clone, Debug)]
pub struct Sha256 {
    _todo: (),
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// A fresh hasher.
    pub fn new() -> Self {
        todo!()
    }
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let _ = data;
        todo!()
    }
    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        todo!()
    }
}

/// Lowercase hex of a digest.
pub fn to_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
