//! Pure byte codecs for the qcow2 structures qdirty reads and writes.
//!
//! No I/O and no `unsafe` here: every function takes bytes and returns typed values (or the
//! reverse), and every check QEMU makes on these structures lives here with QEMU's message.
//! Multi-byte fields are big-endian on disk.
#![deny(unsafe_code)]

pub mod be;
pub mod bitmap_dir;
pub mod bitmap_table;
pub mod extension;
pub mod header;
pub mod refcount;

/// qcow2 magic "QFI\xfb". QEMU: QCOW_MAGIC.
pub const QCOW_MAGIC: u32 = 0x5146_49FB;
/// Smallest cluster size, as a shift (512 B). QEMU: MIN_CLUSTER_BITS.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size, as a shift (2 MiB). QEMU: MAX_CLUSTER_BITS.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Length of the v2 header. QEMU: QCOW2 v2 header size.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest v3 header_length QEMU accepts.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Length of the v3 header QEMU writes (with the compression type byte and padding).
pub const V3_HEADER_LENGTH: u32 = 112;
/// Largest refcount table, in bytes. QEMU: QCOW_MAX_REFTABLE_SIZE.
pub const QCOW_MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// Largest L1 table, in bytes. QEMU: QCOW_MAX_L1_SIZE.
pub const QCOW_MAX_L1_SIZE: u64 = 32 << 20;
/// Largest number of internal snapshots. QEMU: QCOW_MAX_SNAPSHOTS.
pub const QCOW_MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets must stay below this. QEMU: QCOW_MAX_CLUSTER_OFFSET + 1 (2^56).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest refcount order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts). QEMU: QCOW2_INCOMPAT_DIRTY.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: image is corrupt. QEMU: QCOW2_INCOMPAT_CORRUPT.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: external data file. QEMU: QCOW2_INCOMPAT_DATA_FILE.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression type field. QEMU: QCOW2_INCOMPAT_COMPRESSION.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries. QEMU: QCOW2_INCOMPAT_EXTL2.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit QEMU 10 knows. QEMU: QCOW2_INCOMPAT_MASK.
pub const INCOMPAT_MASK: u64 = 0x1F;
/// Compatible feature bit 0: lazy refcounts. QEMU: QCOW2_COMPAT_LAZY_REFCOUNTS.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent. QEMU: QCOW2_AUTOCLEAR_BITMAPS.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: raw external data. QEMU: QCOW2_AUTOCLEAR_DATA_FILE_RAW.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit QEMU knows. QEMU: QCOW2_AUTOCLEAR_MASK.
pub const AUTOCLEAR_MASK: u64 = 0x03;

/// Smallest bitmap granularity, as a shift (512 B). QEMU: BME_MIN_GRANULARITY_BITS.
pub const BME_MIN_GRANULARITY_BITS: u32 = 9;
/// Largest bitmap granularity, as a shift (2 GiB). QEMU: BME_MAX_GRANULARITY_BITS.
pub const BME_MAX_GRANULARITY_BITS: u32 = 31;
/// Longest bitmap name in bytes. QEMU: BME_MAX_NAME_SIZE.
pub const BME_MAX_NAME_SIZE: usize = 1023;
/// Most entries in one bitmap table. QEMU: BME_MAX_TABLE_SIZE.
pub const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of bitmap data per bitmap (512 MiB). QEMU: BME_MAX_PHYS_SIZE.
pub const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Directory entry flag: the bitmap is being modified by a writer. QEMU: BME_FLAG_IN_USE.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks every write (enabled). QEMU: BME_FLAG_AUTO.
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Every flag bit QEMU rejects. QEMU: BME_RESERVED_FLAGS.
pub const BME_RESERVED_FLAGS: u32 = 0xFFFF_FFFC;
/// Directory entry type of a dirty tracking bitmap. QEMU: BT_DIRTY_TRACKING_BITMAP.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Most bitmaps in one image. QEMU: QCOW2_MAX_BITMAPS.
pub const QCOW2_MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory in bytes. QEMU: QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
pub const QCOW2_MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * QCOW2_MAX_BITMAPS as u64;

/// Length of the v2 part of the header / offset of `incompatible_features`. QEMU:
/// offsetof(QCowHeader, incompatible_features).
pub const V3_FIELDS_OFFSET: usize = 72;
/// Offset of the compression type byte. QEMU: offsetof(QCowHeader, compression_type).
pub const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Compression type deflate. QEMU: QCOW2_COMPRESSION_TYPE_ZLIB.
pub const COMPRESSION_TYPE_ZLIB: u8 = 0;
/// Compression type zstd. QEMU: QCOW2_COMPRESSION_TYPE_ZSTD.
pub const COMPRESSION_TYPE_ZSTD: u8 = 1;
/// No encryption. QEMU: QCOW_CRYPT_NONE.
pub const QCOW_CRYPT_NONE: u32 = 0;
/// Legacy AES encryption. QEMU: QCOW_CRYPT_AES.
pub const QCOW_CRYPT_AES: u32 = 1;
/// LUKS encryption. QEMU: QCOW_CRYPT_LUKS.
pub const QCOW_CRYPT_LUKS: u32 = 2;
/// Subclusters per cluster with extended L2 entries. QEMU: QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER.
pub const QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER: u64 = 32;
/// Size of one snapshot table header, used to bound nb_snapshots. QEMU: sizeof(QCowSnapshotHeader).
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// Longest backing file name QEMU reads (it also requires len < PATH_MAX = 4096).
/// QEMU: the `MIN(1023, ...)` in qcow2_do_open.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Backing format names must be shorter than this. QEMU: sizeof(bs->backing_format).
pub const BACKING_FORMAT_BUF_SIZE: u32 = 16;
/// Size of one feature name table entry. QEMU: sizeof(Qcow2Feature).
pub const FEATURE_NAME_ENTRY_SIZE: usize = 48;
/// Size of the name field of a feature name table entry. QEMU: Qcow2Feature.name.
pub const FEATURE_NAME_LEN: usize = 46;
/// Feature table entry type: incompatible. QEMU: QCOW2_FEAT_TYPE_INCOMPATIBLE.
pub const FEAT_TYPE_INCOMPATIBLE: u8 = 0;
/// Feature table entry type: compatible. QEMU: QCOW2_FEAT_TYPE_COMPATIBLE.
pub const FEAT_TYPE_COMPATIBLE: u8 = 1;
/// Feature table entry type: autoclear. QEMU: QCOW2_FEAT_TYPE_AUTOCLEAR.
pub const FEAT_TYPE_AUTOCLEAR: u8 = 2;
/// Size of the bitmaps extension data. QEMU: sizeof(Qcow2BitmapHeaderExt).
pub const BITMAPS_EXT_SIZE: u32 = 24;
/// Size of the full disk encryption pointer extension data. QEMU:
/// sizeof(Qcow2CryptoHeaderExtension).
pub const CRYPTO_EXT_SIZE: u32 = 16;
/// Reserved bits of a bitmap table entry. QEMU: BME_TABLE_ENTRY_RESERVED_MASK.
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xFF00_0000_0000_01FE;
/// Offset bits of a bitmap table entry. QEMU: BME_TABLE_ENTRY_OFFSET_MASK.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// "All ones" flag of a bitmap table entry. QEMU: BME_TABLE_ENTRY_FLAG_ALL_ONES.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// ceil(a / b) for b > 0.
pub fn div_round_up(a: u64, b: u64) -> u64 {
    a / b + u64::from(a % b != 0)
}

/// Rounds `a` up to a multiple of the power of two `align`.
pub fn round_up(a: u64, align: u64) -> u64 {
    div_round_up(a, align) * align
}

#[cfg(test)]
mod tests;
