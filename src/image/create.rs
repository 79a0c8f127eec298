//! Creating a blank qcow2 v3 image, laid out as `qemu-img create -f qcow2` does: header, refcount
//! table, refcount blocks, L1 table; 16-bit refcounts; no lazy refcounts.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::extension::{encode_header_cluster, Extensions};
use crate::format::header::Header;
use crate::format::{
    be, refcount, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW_MAX_L1_SIZE, V3_HEADER_LENGTH,
};

/// Refcount order of new images (16-bit refcounts, QEMU's default).
const REFCOUNT_ORDER: u32 = 4;
/// Default cluster size (64 KiB).
const DEFAULT_CLUSTER_SIZE: u32 = 65536;

/// Builds the bytes of a blank image.
pub fn blank_image(size: u64, cluster_size: u32) -> Result<Vec<u8>> {
    let cluster_size = if cluster_size == 0 {
        DEFAULT_CLUSTER_SIZE
    } else {
        cluster_size
    };
    let cluster_bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
    {
        return Err(Error::InvalidArgument(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cluster_size})"
        )));
    }
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::InvalidArgument(format!("Image size {size} is too large")))?;
    let cs = u64::from(cluster_size);
    // Each L2 table maps cs / 8 clusters.
    let l2_coverage = cs * (cs / 8);
    let l1_entries = size.div_ceil(l2_coverage);
    if l1_entries * 8 > QCOW_MAX_L1_SIZE {
        return Err(Error::TooBig(format!(
            "Image size {size} is too large for a cluster size of {cluster_size}: its L1 table \
             would need {} bytes (maximum {QCOW_MAX_L1_SIZE})",
            l1_entries * 8
        )));
    }
    // An empty disk has no L1 table at all (offset 0), as qemu-img creates it.
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let epb = refcount::refblock_entries(cluster_bits, REFCOUNT_ORDER);
    // Fixed point: header + reftable (t) + refblocks (b) + L1 all covered by b blocks whose
    // offsets fit in t table clusters.
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = 1 + t + b + l1_clusters;
        let nb = total.div_ceil(epb);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    let total = 1 + t + b + l1_clusters;
    let mut img = vec![0u8; (total * cs) as usize];
    let reftable_off = cs;
    let refblocks_off = (1 + t) * cs;
    let l1_off = (1 + t + b) * cs;
    for i in 0..b {
        be::put_u64(
            &mut img,
            (reftable_off + 8 * i) as usize,
            refblocks_off + i * cs,
        );
    }
    for c in 0..total {
        let block = (refblocks_off + (c / epb) * cs) as usize;
        refcount::set_refcount(
            &mut img[block..block + cs as usize],
            c % epb,
            REFCOUNT_ORDER,
            1,
        );
    }
    let header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries == 0 { 0 } else { l1_off },
        refcount_table_offset: reftable_off,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V3_HEADER_LENGTH,
        compression_type: 0,
        unknown_fields: Vec::new(),
    };
    let cluster0 = encode_header_cluster(&header, &Extensions::default(), None)?;
    img[..cs as usize].copy_from_slice(&cluster0);
    Ok(img)
}

/// Creates the file `path` (which must not exist) holding a blank image.
pub fn create(path: &Path, size: u64, cluster_size: u32) -> Result<()> {
    let bytes = blank_image(size, cluster_size)?;
    let name = path.display();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("Could not create '{name}'"), e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("Could not write '{name}'"), e))
}
