//! Header extensions (qcow2-format.md §2): parse the area after the header, and rebuild the whole
//! cluster 0 the way QEMU's qcow2_update_header does.
//!
//! STUB: signatures are the contract; bodies are being written.

use crate::error::Result;
use crate::format::header::Header;

/// Magic of the backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Magic of the feature name table extension.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Magic of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Magic of the full disk encryption header pointer extension.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;
/// Magic of the external data file name extension.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The 24 bytes of the bitmaps extension (qcow2-format.md §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of directory entries.
    pub nb_bitmaps: u32,
    /// Must be zero.
    pub reserved32: u32,
    /// Directory size in bytes.
    pub bitmap_directory_size: u64,
    /// Directory offset (cluster aligned).
    pub bitmap_directory_offset: u64,
}

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, trailing NULs removed.
    pub name: Vec<u8>,
}

/// Everything found in the extension area, by kind. Known extensions appear once (the last
/// occurrence wins, as in QEMU); unknown ones are kept in file order with their data verbatim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name.
    pub backing_format: Option<Vec<u8>>,
    /// Feature name table as read (regenerated on write).
    pub feature_table: Option<Vec<FeatureName>>,
    /// Raw 24 data bytes of the bitmaps extension when present (length already checked to be
    /// 24), decoded; not yet validated (see `BitmapsExt::validate`).
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header pointer (16 bytes verbatim).
    pub crypto: Option<Vec<u8>>,
    /// External data file name.
    pub data_file: Option<Vec<u8>>,
    /// Unknown extensions: (magic, data) in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

impl Extensions {
    /// Parses the extension area of `buf` (the file's first cluster) for `header`, with QEMU's
    /// checks ("Header extension too large", bitmaps length 24 "bitmaps_ext: Invalid extension
    /// length", backing format length, crypto only with LUKS, ...).
    pub fn parse(buf: &[u8], header: &Header) -> Result<Extensions> {
        let _ = (buf, header);
        todo!()
    }
    /// Reads the backing file name described by the header from `buf` (cluster 0).
    pub fn backing_file_name(buf: &[u8], header: &Header) -> Result<Option<Vec<u8>>> {
        let _ = (buf, header);
        todo!()
    }
}

impl BitmapsExt {
    /// The checks QEMU makes while parsing the extension when autoclear bit 0 is set, in QEMU's
    /// order and words: reserved 0, nb_bitmaps <= 65535, nb_bitmaps != 0, directory offset
    /// cluster aligned, directory size <= QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
    pub fn validate(&self, cluster_size: u64) -> Result<()> {
        let _ = cluster_size;
        todo!()
    }
}

/// Builds the whole first cluster exactly as QEMU's qcow2_update_header would (qcow2-format.md
/// §2.3): fixed header (v3: header_length = 112 + unknown fields), unknown header fields,
/// backing format, data file name, crypto pointer, a regenerated feature name table (v3 and
/// cluster size > 4096 only), the bitmaps extension if `exts.bitmaps` is Some, unknown extensions,
/// end marker, backing file name (backing_file_offset/size in the result point at it). Returns
/// `Error::NoSpace` when it does not fit in one cluster. Only v3 headers are encoded.
pub fn encode_header_cluster(
    header: &Header,
    exts: &Extensions,
    backing_name: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let _ = (header, exts, backing_name);
    todo!()
}
