//! The qcow2 header (qcow2-format.md §1): parse, validate, encode.
//!
//! STUB: signatures are the contract; bodies are being written.

use crate::error::Result;

/// Every field of a qcow2 v2/v3 header. For v2 the v3 fields hold QEMU's implied values
/// (features 0, refcount_order 4, header_length 72).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v3; 4 for v2).
    pub refcount_order: u32,
    /// Header length as read (v3; 72 for v2).
    pub header_length: u32,
    /// Compression type byte (0 deflate, 1 zstd); 0 when header_length <= 104.
    pub compression_type: u8,
    /// Bytes [112, header_length) when header_length > 112, kept verbatim.
    pub unknown_fields: Vec<u8>,
}

impl Header {
    /// Parses and validates the header from the start of the file (`buf` holds at least the
    /// first min(file length, 2 MiB) bytes, normally all of cluster 0). Runs QEMU's open-time
    /// checks on the header itself with QEMU's messages.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let _ = buf;
        todo!()
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// Where header extensions start (72 for v2, header_length for v3).
    pub fn extensions_start(&self) -> u64 {
        todo!()
    }
    /// Where the extension area ends: backing_file_offset if non-zero, else the cluster size.
    pub fn extensions_end(&self) -> u64 {
        todo!()
    }
    /// Refuses unknown incompatible features, naming them from the feature table.
    pub fn check_incompatible(
        &self,
        table: Option<&[crate::format::extension::FeatureName]>,
    ) -> Result<()> {
        let _ = table;
        todo!()
    }
}
