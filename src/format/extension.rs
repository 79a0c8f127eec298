//! Header extensions (docs/format.md, 'Header extensions'): parse the area after the header, and
//! rebuild the whole cluster 0 the way QEMU's qcow2_update_header does.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::format::be::{get_u32, get_u64, put_u32, put_u64};
use crate::format::header::{validate_compression_type, FeatureName, Header};
use crate::format::{
    round_up, BACKING_FORMAT_BUF_SIZE, BITMAPS_EXT_SIZE, CRYPTO_EXT_SIZE, FEATURE_NAME_ENTRY_SIZE,
    FEAT_TYPE_AUTOCLEAR, FEAT_TYPE_COMPATIBLE, FEAT_TYPE_INCOMPATIBLE, INCOMPAT_DATA_FILE,
    MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW2_MAX_BITMAPS,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE, QCOW_CRYPT_LUKS, V3_HEADER_LENGTH,
};

/// Magic of the end-of-extensions marker. QEMU: QCOW2_EXT_MAGIC_END.
pub const EXT_END: u32 = 0;
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

/// The 24 bytes of the bitmaps extension (docs/format.md, 'The bitmaps extension').
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

/// The feature name table QEMU 10 writes (`qcow2_update_header`), in its order.
pub const QEMU_FEATURE_TABLE: [(u8, u8, &str); 8] = [
    (FEAT_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEAT_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEAT_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEAT_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEAT_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEAT_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEAT_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEAT_TYPE_AUTOCLEAR, 1, "raw external data"),
];

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

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidImage(msg.into())
}

/// Checks the header fields the extension code relies on (a `Header` may be built by hand).
fn check_geometry(header: &Header) -> Result<u64> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&header.cluster_bits) {
        return Err(Error::Unsupported(format!(
            "Unsupported cluster size: 2^{}",
            header.cluster_bits
        )));
    }
    let cluster_size = header.cluster_size();
    if header.backing_file_offset > cluster_size {
        return Err(invalid(format!(
            "Invalid backing file offset: backing_file_offset {:#x} is beyond the cluster size \
             {cluster_size}",
            header.backing_file_offset
        )));
    }
    Ok(cluster_size)
}

/// Returns `buf[..end]`, zero-extended when `buf` is shorter (QEMU reads zeros beyond EOF).
/// `end` is at most 2 MiB (checked by the caller).
fn zero_extended(buf: &[u8], end: usize) -> Cow<'_, [u8]> {
    if buf.len() >= end {
        Cow::Borrowed(&buf[..end])
    } else {
        let mut v = vec![0u8; end];
        v[..buf.len()].copy_from_slice(buf);
        Cow::Owned(v)
    }
}

fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    // QEMU reads the table into a zero-filled buffer: a partial last entry reads zero padded.
    data.chunks(FEATURE_NAME_ENTRY_SIZE)
        .map(|c| {
            let mut e = [0u8; FEATURE_NAME_ENTRY_SIZE];
            e[..c.len()].copy_from_slice(c);
            let mut name = e[2..].to_vec();
            while name.last() == Some(&0) {
                name.pop();
            }
            FeatureName {
                kind: e[0],
                bit: e[1],
                name,
            }
        })
        .collect()
}

impl Extensions {
    /// Parses the extension area of `buf` (the file's first cluster) for `header`, with QEMU's
    /// checks ("Header extension too large", bitmaps length 24 "bitmaps_ext: Invalid extension
    /// length", backing format length, crypto only with LUKS, ...).
    ///
    /// The area is [header.extensions_start(), header.extensions_end()); bytes beyond the end of
    /// `buf` read as zeros (as QEMU reads beyond EOF). Crypto extension: only with crypt_method
    /// 2, length 16 and a cluster aligned offset (QEMU's three checks and messages).
    pub fn parse(buf: &[u8], header: &Header) -> Result<Extensions> {
        let (exts, err) = Self::walk(buf, header);
        match err {
            Some(e) => Err(e),
            None => Ok(exts),
        }
    }

    /// The feature name table the way QEMU gets it for its "Unsupported qcow2 feature(s)"
    /// message: the extensions are walked ignoring errors (the walk just stops at the first
    /// one) and the last feature table found before that point is returned. Use it for
    /// [`Header::check_incompatible`] when [`Extensions::parse`] fails.
    pub fn feature_table_lenient(buf: &[u8], header: &Header) -> Option<Vec<FeatureName>> {
        Self::walk(buf, header).0.feature_table
    }

    /// QEMU's qcow2_read_extensions: returns what was parsed and the first error, if any.
    fn walk(buf: &[u8], header: &Header) -> (Extensions, Option<Error>) {
        let mut exts = Extensions::default();
        let cluster_size = match check_geometry(header) {
            Ok(c) => c,
            Err(e) => return (exts, Some(e)),
        };
        let start = header.extensions_start();
        let end = header.extensions_end();
        let area = zero_extended(buf, end as usize);
        let mut offset = start;
        while offset < end {
            // Here offset < end <= 2 MiB.
            let pos = offset;
            let hdr_end = offset + 8;
            if hdr_end > end {
                return (
                    exts,
                    Some(invalid(format!(
                        "Header extension too large: the extension header at offset {pos:#x} \
                         needs 8 bytes but the extension area ends at {end:#x}"
                    ))),
                );
            }
            let magic = get_u32(&area, pos as usize);
            let len = get_u32(&area, pos as usize + 4);
            offset = hdr_end;
            if u64::from(len) > end - offset {
                return (
                    exts,
                    Some(invalid(format!(
                        "Header extension too large: extension {magic:#010x} at offset {pos:#x} \
                         has length {len} but only {} bytes remain before the end of the \
                         extension area at {end:#x}",
                        end - offset
                    ))),
                );
            }
            let data = &area[offset as usize..(offset + u64::from(len)) as usize];
            match magic {
                EXT_END => return (exts, None),
                EXT_BACKING_FORMAT => {
                    if len >= BACKING_FORMAT_BUF_SIZE {
                        return (
                            exts,
                            Some(invalid(format!(
                                "ERROR: ext_backing_format: len={len} too large \
                                 (>={BACKING_FORMAT_BUF_SIZE})"
                            ))),
                        );
                    }
                    exts.backing_format = Some(data.to_vec());
                }
                EXT_FEATURE_TABLE => exts.feature_table = Some(parse_feature_table(data)),
                EXT_CRYPTO => {
                    if header.crypt_method != QCOW_CRYPT_LUKS {
                        return (
                            exts,
                            Some(invalid(format!(
                                "CRYPTO header extension only expected with LUKS encryption \
                                 method: crypt_method is {}",
                                header.crypt_method
                            ))),
                        );
                    }
                    if len != CRYPTO_EXT_SIZE {
                        return (
                            exts,
                            Some(invalid(format!(
                                "CRYPTO header extension size {len}, but expected size \
                                 {CRYPTO_EXT_SIZE}"
                            ))),
                        );
                    }
                    let off = get_u64(data, 0);
                    if off % cluster_size != 0 {
                        return (
                            exts,
                            Some(invalid(format!(
                                "Encryption header offset '{off}' is not a multiple of cluster \
                                 size '{cluster_size}'"
                            ))),
                        );
                    }
                    exts.crypto = Some(data.to_vec());
                }
                EXT_BITMAPS => {
                    if len != BITMAPS_EXT_SIZE {
                        return (
                            exts,
                            Some(invalid(format!(
                                "bitmaps_ext: Invalid extension length: {len} (expected \
                                 {BITMAPS_EXT_SIZE})"
                            ))),
                        );
                    }
                    exts.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: get_u32(data, 0),
                        reserved32: get_u32(data, 4),
                        bitmap_directory_size: get_u64(data, 8),
                        bitmap_directory_offset: get_u64(data, 16),
                    });
                }
                EXT_DATA_FILE => exts.data_file = Some(data.to_vec()),
                _ => exts.unknown.push((magic, data.to_vec())),
            }
            offset += round_up(u64::from(len), 8);
        }
        (exts, None)
    }

    /// Reads the backing file name described by the header from `buf` (cluster 0).
    ///
    /// `None` when backing_file_offset is 0. The bytes are returned verbatim (QEMU then cuts
    /// the name at the first NUL). Bytes beyond the end of `buf` read as zeros. Fails with
    /// QEMU's "Backing file name too long" when the size exceeds
    /// min(1023, cluster_size - backing_file_offset).
    pub fn backing_file_name(buf: &[u8], header: &Header) -> Result<Option<Vec<u8>>> {
        let cluster_size = check_geometry(header)?;
        let off = header.backing_file_offset;
        if off == 0 {
            return Ok(None);
        }
        let len = u64::from(header.backing_file_size);
        let room = (cluster_size - off).min(u64::from(MAX_BACKING_FILE_NAME));
        if len > room {
            return Err(invalid(format!(
                "Backing file name too long: backing_file_size {len} exceeds {room}"
            )));
        }
        let area = zero_extended(buf, (off + len) as usize);
        Ok(Some(area[off as usize..].to_vec()))
    }
}

impl BitmapsExt {
    /// The checks QEMU makes while parsing the extension when autoclear bit 0 is set, in QEMU's
    /// order and words: reserved 0, nb_bitmaps <= 65535, nb_bitmaps != 0, directory offset
    /// cluster aligned, directory size <= QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
    pub fn validate(&self, cluster_size: u64) -> Result<()> {
        if self.reserved32 != 0 {
            return Err(invalid(format!(
                "bitmaps_ext: Reserved field is not zero: reserved32 is {:#x}",
                self.reserved32
            )));
        }
        if self.nb_bitmaps > QCOW2_MAX_BITMAPS {
            return Err(invalid(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of \
                 {QCOW2_MAX_BITMAPS}",
                self.nb_bitmaps
            )));
        }
        if self.nb_bitmaps == 0 {
            return Err(invalid("found bitmaps extension with zero bitmaps"));
        }
        if self.bitmap_directory_offset.checked_rem(cluster_size) != Some(0) {
            return Err(invalid(format!(
                "bitmaps_ext: invalid bitmap directory offset: {:#x} is not a multiple of the \
                 cluster size {cluster_size}",
                self.bitmap_directory_offset
            )));
        }
        if self.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return Err(invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size \
                 ({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})",
                self.bitmap_directory_size
            )));
        }
        Ok(())
    }

    /// The 24 data bytes as QEMU writes them (reserved32 always 0).
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put_u32(&mut b, 0, self.nb_bitmaps);
        put_u64(&mut b, 8, self.bitmap_directory_size);
        put_u64(&mut b, 16, self.bitmap_directory_offset);
        b
    }
}

/// A C string's bytes: everything before the first NUL (QEMU keeps these names as C strings and
/// writes strlen() bytes).
fn c_str(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or(&[])
}

/// Builds the whole first cluster exactly as QEMU's qcow2_update_header would (docs/format.md,
/// 'Placement when qdirty writes cluster 0'): fixed header (v3: header_length = 112 + unknown
/// fields), unknown header fields, backing format, data file name, crypto pointer, a regenerated
/// feature name table (v3 and cluster size > 4096 only), the bitmaps extension if `exts.bitmaps`
/// is Some, unknown extensions, end marker, backing file name (backing_file_offset/size in the
/// result point at it). Returns
/// `Error::NoSpace` when it does not fit in one cluster. Only v3 headers are encoded.
///
/// QEMU details reproduced: the size field is written rounded down to a multiple of 512 (QEMU
/// writes total_sectors * 512); backing format, data file name and backing file name are cut at
/// their first NUL (QEMU keeps them as C strings); the data file name extension is written only
/// when incompatible bit 2 (external data file) is set; the crypto extension only when its
/// offset (first 8 bytes) is non-zero; the bitmaps extension's reserved field is written as 0;
/// `Some(b"")` as backing name records the offset with size 0. `header.backing_file_offset`,
/// `header.backing_file_size` and `header.header_length` are ignored (recomputed). Unknown
/// extensions are written in the order given (QEMU reverses the order it read them in; that is
/// the caller's choice). Errors: `Unsupported` for v2 or a bad cluster size, the compression
/// type errors of `Header::parse`, `NoSpace` when it does not fit.
pub fn encode_header_cluster(
    header: &Header,
    exts: &Extensions,
    backing_name: Option<&[u8]>,
) -> Result<Vec<u8>> {
    if header.version != 3 {
        return Err(Error::Unsupported(format!(
            "Cannot write a qcow2 v{} header: only version 3 headers are written",
            header.version
        )));
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&header.cluster_bits) {
        return Err(Error::Unsupported(format!(
            "Unsupported cluster size: 2^{}",
            header.cluster_bits
        )));
    }
    validate_compression_type(header.compression_type, header.incompatible_features)?;
    let cluster_size = header.cluster_size() as usize;

    // Collect the extensions in QEMU's order.
    let mut list: Vec<(u32, Cow<'_, [u8]>)> = Vec::new();
    if let Some(f) = &exts.backing_format {
        list.push((EXT_BACKING_FORMAT, Cow::Borrowed(c_str(f))));
    }
    if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        if let Some(d) = &exts.data_file {
            list.push((EXT_DATA_FILE, Cow::Borrowed(c_str(d))));
        }
    }
    if let Some(c) = &exts.crypto {
        if c.len() >= 8 && get_u64(c, 0) != 0 {
            list.push((EXT_CRYPTO, Cow::Borrowed(c.as_slice())));
        }
    }
    if cluster_size > 4096 {
        let mut t = vec![0u8; QEMU_FEATURE_TABLE.len() * FEATURE_NAME_ENTRY_SIZE];
        for (i, (kind, bit, name)) in QEMU_FEATURE_TABLE.iter().enumerate() {
            let e = &mut t[i * FEATURE_NAME_ENTRY_SIZE..(i + 1) * FEATURE_NAME_ENTRY_SIZE];
            e[0] = *kind;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        }
        list.push((EXT_FEATURE_TABLE, Cow::Owned(t)));
    }
    if let Some(b) = &exts.bitmaps {
        list.push((EXT_BITMAPS, Cow::Owned(b.encode().to_vec())));
    }
    for (magic, data) in &exts.unknown {
        list.push((*magic, Cow::Borrowed(data.as_slice())));
    }
    let backing = backing_name.map(c_str);

    // Total size, in u64 so that nothing can overflow.
    let mut needed = u64::from(V3_HEADER_LENGTH) + header.unknown_fields.len() as u64;
    for (_, d) in &list {
        needed += 8 + round_up(d.len() as u64, 8);
    }
    needed += 8; // end marker
    needed += backing.map_or(0, |b| b.len() as u64);
    if needed > cluster_size as u64 {
        return Err(Error::NoSpace(format!(
            "Failed to update header: the header, its extensions and the backing file name need \
             {needed} bytes but the cluster is {cluster_size} bytes"
        )));
    }

    let mut out = vec![0u8; cluster_size];
    put_u32(&mut out, 0, crate::format::QCOW_MAGIC);
    put_u32(&mut out, 4, 3);
    put_u32(&mut out, 20, header.cluster_bits);
    put_u64(&mut out, 24, header.size & !511);
    put_u32(&mut out, 32, header.crypt_method);
    put_u32(&mut out, 36, header.l1_size);
    put_u64(&mut out, 40, header.l1_table_offset);
    put_u64(&mut out, 48, header.refcount_table_offset);
    put_u32(&mut out, 56, header.refcount_table_clusters);
    put_u32(&mut out, 60, header.nb_snapshots);
    put_u64(&mut out, 64, header.snapshots_offset);
    put_u64(&mut out, 72, header.incompatible_features);
    put_u64(&mut out, 80, header.compatible_features);
    put_u64(&mut out, 88, header.autoclear_features);
    put_u32(&mut out, 96, header.refcount_order);
    // needed <= cluster_size <= 2 MiB, so this fits.
    put_u32(
        &mut out,
        100,
        V3_HEADER_LENGTH + header.unknown_fields.len() as u32,
    );
    out[crate::format::COMPRESSION_TYPE_OFFSET] = header.compression_type;

    let mut pos = V3_HEADER_LENGTH as usize;
    out[pos..pos + header.unknown_fields.len()].copy_from_slice(&header.unknown_fields);
    pos += header.unknown_fields.len();
    for (magic, d) in &list {
        put_u32(&mut out, pos, *magic);
        put_u32(&mut out, pos + 4, d.len() as u32);
        out[pos + 8..pos + 8 + d.len()].copy_from_slice(d);
        pos += 8 + round_up(d.len() as u64, 8) as usize;
    }
    pos += 8; // end marker: already zero
    if let Some(b) = backing {
        out[pos..pos + b.len()].copy_from_slice(b);
        put_u64(&mut out, 8, pos as u64);
        put_u32(&mut out, 16, b.len() as u32);
    }
    Ok(out)
}
