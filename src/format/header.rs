//! The qcow2 header (docs/format.md, 'Header' and 'Feature bits'; QEMU's docs/interop/qcow2.txt):
//! parse, validate, encode, and the names of its feature bits ([`FeatureName`]: the entries of
//! the feature name table extension, which the unknown-feature message quotes).
//!
//! [`Header::parse`] runs the open-time checks QEMU's `qcow2_do_open` makes on the header itself,
//! in QEMU's order and with QEMU's messages, except the unknown-incompatible-feature check: QEMU
//! names the offending bits from the image's feature name table, which is only known once the
//! extensions are parsed, so that check is [`Header::check_incompatible`], to be called by the
//! image layer right after [`crate::format::extension::Extensions::parse`] (or, when parsing the
//! extensions fails, with [`crate::format::extension::Extensions::feature_table_lenient`]).
//!
//! The fixed header is encoded by [`crate::format::extension::encode_header_cluster`], which
//! rebuilds the whole cluster 0 as QEMU does.

use crate::error::{Error, Result};
use crate::format::be::{get_u32, get_u64};
use crate::format::{
    COMPRESSION_TYPE_OFFSET, COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD, FEATURE_NAME_LEN,
    FEAT_TYPE_INCOMPATIBLE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, INCOMPAT_MASK,
    MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS,
    QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER, QCOW_MAGIC, QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE,
    QCOW_MAX_SNAPSHOTS, SNAPSHOT_HEADER_SIZE, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
};

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

/// QEMU's `report_unsupported_feature`: the full error message for the unknown incompatible
/// bits `mask`, naming each bit from `table` (type 0 entries; like QEMU, the walk stops at the
/// first entry whose name is empty or starts with NUL, names are cut at the first NUL and at 46
/// bytes), and the bits left without a name as `Unknown incompatible feature: <hex mask>`.
/// Example: "Unsupported qcow2 feature(s): my feature, Unknown incompatible feature: 8000000000000000".
pub fn unsupported_features_message(mask: u64, table: Option<&[FeatureName]>) -> String {
    let mut mask = mask;
    let mut parts: Vec<String> = Vec::new();
    for f in table.unwrap_or(&[]) {
        if matches!(f.name.first(), None | Some(0)) {
            break;
        }
        if f.kind != FEAT_TYPE_INCOMPATIBLE || f.bit >= 64 {
            continue;
        }
        let bit = 1u64 << f.bit;
        if mask & bit != 0 {
            let n = &f.name[..f.name.len().min(FEATURE_NAME_LEN)];
            let n = n.split(|&c| c == 0).next().unwrap_or(&[]);
            parts.push(String::from_utf8_lossy(n).into_owned());
            mask &= !bit;
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
}

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

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidImage(msg.into())
}

/// QEMU's `validate_compression_type`: the type must be known and agree with incompatible bit 3.
pub(crate) fn validate_compression_type(compression_type: u8, incompatible: u64) -> Result<()> {
    if compression_type != COMPRESSION_TYPE_ZLIB && compression_type != COMPRESSION_TYPE_ZSTD {
        return Err(Error::Unsupported(format!(
            "qcow2: unknown compression type: {compression_type}"
        )));
    }
    let bit = incompatible & INCOMPAT_COMPRESSION != 0;
    if compression_type == COMPRESSION_TYPE_ZLIB && bit {
        return Err(invalid(
            "qcow2: Compression type incompatible feature bit must not be set",
        ));
    }
    if compression_type != COMPRESSION_TYPE_ZLIB && !bit {
        return Err(invalid(
            "qcow2: Compression type incompatible feature bit must be set",
        ));
    }
    Ok(())
}

/// QEMU's `qcow2_validate_table`: `entries * entry_len <= max_bytes` ("NAME too large", EFBIG)
/// and the table lies below INT64_MAX and is cluster aligned ("NAME offset invalid").
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    name: &str,
    field: &str,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::TooBig(format!(
            "{name} too large: {entries} entries of {entry_len} bytes exceed the maximum of \
             {max_bytes} bytes"
        )));
    }
    // entries * entry_len <= max_bytes here, so no overflow.
    let bytes = entries * entry_len;
    let end_ok = (i64::MAX as u64 - bytes) >= offset;
    if !end_ok || offset % cluster_size != 0 {
        return Err(invalid(format!(
            "{name} offset invalid: {field} {offset:#x} is {}",
            if end_ok {
                format!("not a multiple of the cluster size {cluster_size}")
            } else {
                format!("too large (the table of {bytes} bytes would end beyond 2^63)")
            }
        )));
    }
    Ok(())
}

impl Header {
    /// Parses and validates the header from the start of the file (`buf` holds at least the
    /// first min(file length, 2 MiB) bytes, normally all of cluster 0). Runs QEMU's open-time
    /// checks on the header itself with QEMU's messages.
    ///
    /// Order (QEMU 10 `qcow2_do_open`): magic, version (Unsupported), cluster_bits (Unsupported),
    /// v3 header_length >= 104, header_length <= cluster size, `buf` long enough for the header,
    /// backing_file_offset <= cluster size, backing_file_size (QEMU checks it later, after the
    /// extensions; it only depends on the header), compression type, [unknown incompatible bits:
    /// deferred to [`Header::check_incompatible`]], subcluster size with extended L2,
    /// refcount_order <= 6, refcount_table_clusters != 0, reftable size (TooBig) and offset,
    /// snapshot table size (TooBig) and offset, L1 size (TooBig) and offset, disk size vs
    /// INT_MAX L1 entries ("Image is too big", TooBig), l1_size large enough.
    ///
    /// Does NOT fail on unknown incompatible feature bits (see [`Header::check_incompatible`]) nor
    /// on the corrupt bit (the image layer decides, it depends on the open mode). Checks QEMU
    /// skips in `BDRV_O_CHECK` mode (reftable present, snapshot table) are always made.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        // QEMU reads sizeof(QCowHeader) = 112 bytes; beyond the end of the file it reads zeros.
        let mut fixed = [0u8; V3_HEADER_LENGTH as usize];
        let n = buf.len().min(fixed.len());
        fixed[..n].copy_from_slice(&buf[..n]);
        let b = &fixed[..];

        let magic = get_u32(b, 0);
        if magic != QCOW_MAGIC {
            return Err(invalid(format!(
                "Image is not in qcow2 format: magic is {magic:#010x}, expected {QCOW_MAGIC:#010x}"
            )));
        }
        let version = get_u32(b, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = get_u32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "Unsupported cluster size: 2^{cluster_bits}: cluster_bits {cluster_bits} is \
                 outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        let (incompatible_features, compatible_features, autoclear_features, refcount_order) =
            if version == 2 {
                (0, 0, 0, 4)
            } else {
                (
                    get_u64(b, 72),
                    get_u64(b, 80),
                    get_u64(b, 88),
                    get_u32(b, 96),
                )
            };
        let header_length = if version == 2 {
            V2_HEADER_LENGTH
        } else {
            get_u32(b, 100)
        };
        if version == 3 && header_length < V3_MIN_HEADER_LENGTH {
            return Err(invalid(format!(
                "qcow2 header too short: header_length {header_length} is less than \
                 {V3_MIN_HEADER_LENGTH}"
            )));
        }
        if u64::from(header_length) > cluster_size {
            return Err(invalid(format!(
                "qcow2 header exceeds cluster size: header_length {header_length} is larger than \
                 the cluster size {cluster_size}"
            )));
        }
        let needed = header_length as usize; // <= 2 MiB
        if buf.len() < needed {
            return Err(invalid(format!(
                "Could not read qcow2 header: header_length is {header_length} but only {} bytes \
                 are available",
                buf.len()
            )));
        }
        let unknown_fields = if header_length > V3_HEADER_LENGTH {
            buf[V3_HEADER_LENGTH as usize..needed].to_vec()
        } else {
            Vec::new()
        };

        let backing_file_offset = get_u64(b, 8);
        let backing_file_size = get_u32(b, 16);
        if backing_file_offset > cluster_size {
            return Err(invalid(format!(
                "Invalid backing file offset: backing_file_offset {backing_file_offset:#x} is \
                 beyond the cluster size {cluster_size}"
            )));
        }
        if backing_file_offset != 0 {
            let room = (cluster_size - backing_file_offset).min(u64::from(MAX_BACKING_FILE_NAME));
            if u64::from(backing_file_size) > room {
                return Err(invalid(format!(
                    "Backing file name too long: backing_file_size {backing_file_size} exceeds \
                     {room} (at most {MAX_BACKING_FILE_NAME} bytes, within the first cluster)"
                )));
            }
        }

        let compression_type = if header_length as usize > COMPRESSION_TYPE_OFFSET {
            b[COMPRESSION_TYPE_OFFSET]
        } else {
            0
        };
        validate_compression_type(compression_type, incompatible_features)?;

        if incompatible_features & INCOMPAT_EXTL2 != 0 {
            let sub = cluster_size / QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER;
            if sub < (1 << MIN_CLUSTER_BITS) {
                return Err(invalid(format!(
                    "Unsupported subcluster size: {sub}: extended L2 entries need cluster_bits \
                     >= 14, cluster_bits is {cluster_bits}"
                )));
            }
        }

        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(invalid(format!(
                "Reference count entry width too large; may not exceed 64 bits: refcount_order \
                 {refcount_order} is larger than {MAX_REFCOUNT_ORDER}"
            )));
        }

        let refcount_table_offset = get_u64(b, 48);
        let refcount_table_clusters = get_u32(b, 56);
        if refcount_table_clusters == 0 {
            return Err(invalid(
                "Image does not contain a reference count table: refcount_table_clusters is 0",
            ));
        }
        validate_table(
            refcount_table_offset,
            u64::from(refcount_table_clusters),
            cluster_size,
            QCOW_MAX_REFTABLE_SIZE,
            cluster_size,
            "Reference count table",
            "refcount_table_offset",
        )?;

        let nb_snapshots = get_u32(b, 60);
        let snapshots_offset = get_u64(b, 64);
        validate_table(
            snapshots_offset,
            u64::from(nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * u64::from(QCOW_MAX_SNAPSHOTS),
            cluster_size,
            "Snapshot table",
            "snapshots_offset",
        )?;

        let l1_size = get_u32(b, 36);
        let l1_table_offset = get_u64(b, 40);
        validate_table(
            l1_table_offset,
            u64::from(l1_size),
            8,
            QCOW_MAX_L1_SIZE,
            cluster_size,
            "Active L1 table",
            "l1_table_offset",
        )?;

        let size = get_u64(b, 24);
        let l2_entry_bits = if incompatible_features & INCOMPAT_EXTL2 != 0 {
            4
        } else {
            3
        };
        let shift = cluster_bits + (cluster_bits - l2_entry_bits);
        // QEMU computes this in int64_t: a size >= 2^63 becomes negative and ends up as a huge
        // unsigned index, i.e. "Image is too big" as well.
        let l1_needed = if size > i64::MAX as u64 {
            u64::MAX
        } else {
            ((u128::from(size) + (1u128 << shift) - 1) >> shift) as u64
        };
        if l1_needed > i32::MAX as u64 {
            return Err(Error::TooBig(format!(
                "Image is too big: size {size} needs more than {} L1 entries",
                i32::MAX
            )));
        }
        if u64::from(l1_size) < l1_needed {
            return Err(invalid(format!(
                "L1 table is too small: l1_size {l1_size} but size {size} needs {l1_needed} \
                 entries"
            )));
        }

        Ok(Header {
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method: get_u32(b, 32),
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            unknown_fields,
        })
    }

    /// QEMU's unknown-incompatible-feature check, made after the extensions are parsed so that
    /// the offending bits can be named from the image's own feature name table (`table`, as
    /// parsed by `Extensions::parse`/`Extensions::feature_table_lenient`; `None` when the image
    /// has none). Fails with `Error::Unsupported` and QEMU's message
    /// ("Unsupported qcow2 feature(s): NAME, Unknown incompatible feature: MASK") when any
    /// incompatible bit outside `INCOMPAT_MASK` is set.
    pub fn check_incompatible(&self, table: Option<&[FeatureName]>) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported(unsupported_features_message(
                unknown, table,
            )));
        }
        Ok(())
    }

    /// Cluster size in bytes (`cluster_bits` is validated by `parse`; a hand-built header with
    /// cluster_bits >= 64 gives 2^63 instead of overflowing).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }
    /// Where header extensions start (72 for v2, header_length for v3).
    pub fn extensions_start(&self) -> u64 {
        if self.version == 2 {
            u64::from(V2_HEADER_LENGTH)
        } else {
            u64::from(self.header_length)
        }
    }
    /// Where the extension area ends: backing_file_offset if non-zero, else the cluster size.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }
}
