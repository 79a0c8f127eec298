//! The refcount part of `qemu-img check`, with the bitmap structures singled out
//! (QEMU: qcow2_check_refcounts, qcow2_check_bitmaps_refcounts).
//!
//! Leaks and corruptions are counted the way QEMU counts them, over the whole image: every
//! reference (header, active L1/L2 tables and data clusters incl. compressed and extended-L2
//! entries, snapshot table and snapshot L1/L2 tables, refcount table and blocks, the LUKS
//! header, the bitmap directory, tables and allocated data clusters of every bitmap, in_use or
//! not) is counted in memory and compared with the on-disk refcounts, so the numbers equal
//! `qemu-img check`'s. Each mismatch is attributed: to a bitmap structure when the cluster is
//! part of the bitmap directory, a table or data (also of a stale bitmaps extension that a
//! bitmap-unaware program invalidated), else to the rest of the image.
//!
//! Repair ([`check_bitmaps`] with `repair`) reclaims leaked clusters (refcount above the
//! references) like `qemu-img check -r leaks`, but only when the check found no corruption:
//! since every reference in the image was counted, a leaked cluster is referenced by nothing
//! (or by fewer structures than its refcount says) and decrementing it is safe. A stale bitmaps
//! extension is dropped first, as QEMU's read-write open does. Corruptions are never repaired:
//! that needs `qemu-img check -r all`.
//!
//! QEMU's COPIED-flag checks on the active L1/L2 tables (`check_oflag_copied`) are counted too.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::alloc::{self, Refcounts};
use super::header_cluster::HeaderCluster;
use super::inspect::{open_header_cluster, read_directory, StoredBitmapInfo};
use super::storage::{FileStorage, Storage};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{parse_directory, BitmapDirEntry};
use crate::format::bitmap_table::TableEntry;
use crate::format::{
    be, refcount, AUTOCLEAR_BITMAPS, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, QCOW_MAX_L1_SIZE,
};

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
const REFT_RESERVED_MASK: u64 = 0x1ff;

/// What a cluster belongs to, as far as bitmaps are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The bitmap directory.
    BitmapDirectory,
    /// The table of the named bitmap.
    BitmapTable(String),
    /// A data cluster of the named bitmap.
    BitmapData(String),
    /// A structure of a bitmaps extension that is present but invalidated (autoclear bit 0
    /// clear): QEMU ignores it, so its clusters are leaked.
    StaleBitmaps,
    /// Anything else (guest data, L1/L2, snapshots, refcounts) or nothing at all.
    Other,
}

impl Owner {
    /// Whether the cluster is part of a bitmap structure.
    pub fn is_bitmap(&self) -> bool {
        !matches!(self, Owner::Other)
    }
}

/// A cluster whose on-disk refcount differs from the references found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Cluster index (offset / cluster size).
    pub cluster: u64,
    /// Refcount on disk.
    pub refcount: u64,
    /// References found.
    pub reference: u64,
    /// What the cluster belongs to.
    pub owner: Owner,
}

impl Mismatch {
    /// More refcount than references: wasted space, no harm.
    pub fn is_leak(&self) -> bool {
        self.refcount > self.reference
    }
}

/// The result of [`check_bitmaps`].
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Leaked clusters, counted as `qemu-img check` counts them (after a repair: those left).
    pub leaks: u64,
    /// Corruptions, counted as `qemu-img check` counts them.
    pub corruptions: u64,
    /// Errors that kept parts of the check from running (I/O errors).
    pub check_errors: u64,
    /// Leaks in clusters of bitmap structures.
    pub bitmap_leaks: u64,
    /// Corruptions that involve bitmap structures (refcount mismatches of their clusters,
    /// invalid bitmap table entries).
    pub bitmap_corruptions: u64,
    /// Every refcount mismatch, by cluster.
    pub mismatches: Vec<Mismatch>,
    /// QEMU-style lines for each problem ("Leaked cluster 26 refcount=1 reference=0",
    /// "ERROR ..."), in the order found.
    pub messages: Vec<String>,
    /// Leaked clusters whose refcount a repair decremented.
    pub leaks_fixed: u64,
    /// Of those, clusters of bitmap structures.
    pub bitmap_leaks_fixed: u64,
    /// A repair dropped a stale (invalidated) bitmaps extension from the header.
    pub stale_extension_dropped: bool,
    /// A stale bitmaps extension is present (autoclear bit 0 clear).
    pub stale_extension: bool,
    /// The bitmaps in the directory (in_use ones are inconsistent).
    pub bitmaps: Vec<StoredBitmapInfo>,
    /// Clusters of the image file.
    pub total_clusters: u64,
    /// Clusters of the virtual disk (QEMU's BlockFragInfo.total_clusters, what `qemu-img
    /// check` reports as total-clusters).
    pub virtual_clusters: u64,
    /// Clusters the active L1/L2 tables map to data, compressed or not (QEMU's
    /// BlockFragInfo.allocated_clusters).
    pub allocated_clusters: u64,
    /// Of those, clusters not right after the previous one of the same L2 table, and every
    /// compressed cluster (BlockFragInfo.fragmented_clusters).
    pub fragmented_clusters: u64,
    /// Of those, compressed clusters (BlockFragInfo.compressed_clusters).
    pub compressed_clusters: u64,
    /// One past the highest cluster in use (bytes), as `qemu-img check` reports it.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit status: 0 clean, 2 corruptions, 3 only leaks (1 is for errors).
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 || self.check_errors > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Reads `len` bytes at `offset`, zero-filled beyond the end of the file (as QEMU's block layer
/// reads).
fn read_padded(storage: &dyn Storage, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let file_len = storage.size()?;
    if offset < file_len {
        let n = ((file_len - offset) as usize).min(len);
        storage.read_exact_at(&mut buf[..n], offset)?;
    }
    Ok(buf)
}

struct Checker<'a> {
    storage: &'a dyn Storage,
    cs: u64,
    cluster_bits: u32,
    file_len: u64,
    /// References per cluster (QEMU's in-memory refcount table).
    refs: Vec<u64>,
    refcount_max: u64,
    data_file: bool,
    extl2: bool,
    report: CheckReport,
    owners: HashMap<u64, Owner>,
}

impl Checker<'_> {
    /// qcow2_inc_refcounts_imrt.
    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        if offset.saturating_add(size).saturating_sub(self.file_len) >= self.cs {
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.report.corruptions += 1;
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        for k in first..=last {
            let k = k as usize;
            if k >= self.refs.len() {
                self.refs.resize(k + 1, 0);
            }
            if self.refs[k] == self.refcount_max {
                self.report.messages.push(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    (k as u64) << self.cluster_bits
                ));
                self.report.corruptions += 1;
                continue;
            }
            self.refs[k] += 1;
        }
    }

    fn own(&mut self, offset: u64, size: u64, owner: &Owner) {
        if size == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        for k in first..=last {
            self.owners.entry(k).or_insert_with(|| owner.clone());
        }
    }

    /// check_refcounts_l1 + check_refcounts_l2; `frag`: count the allocation of the clusters
    /// (the active L1 only, as QEMU's CHECK_FRAG_INFO).
    fn l1(&mut self, l1_offset: u64, l1_size: u32, frag: bool) {
        let bytes = u64::from(l1_size) * 8;
        if bytes == 0 {
            return;
        }
        self.inc(l1_offset, bytes);
        let Ok(l1) = read_padded(self.storage, l1_offset, bytes as usize) else {
            self.report
                .messages
                .push("ERROR: I/O error in check_refcounts_l1".into());
            self.report.check_errors += 1;
            return;
        };
        for i in 0..l1_size as usize {
            let e = be::get_u64(&l1, i * 8);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.report.messages.push(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.report.corruptions += 1;
            }
            let l2_offset = e & L1E_OFFSET_MASK;
            self.inc(l2_offset, self.cs);
            if l2_offset % self.cs != 0 {
                self.report.messages.push(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                ));
                self.report.corruptions += 1;
            }
            self.l2(l2_offset, frag);
        }
    }

    fn l2(&mut self, l2_offset: u64, frag: bool) {
        // Where the next data cluster would be if this table's clusters were contiguous.
        let mut next_contiguous = 0u64;
        let Ok(l2) = read_padded(self.storage, l2_offset, self.cs as usize) else {
            self.report
                .messages
                .push("ERROR: I/O error in check_refcounts_l2".into());
            self.report.check_errors += 1;
            return;
        };
        let esize = if self.extl2 { 16 } else { 8 };
        for i in 0..(self.cs as usize / esize) {
            let mut entry = be::get_u64(&l2, i * esize);
            let bitmap = if self.extl2 {
                be::get_u64(&l2, i * esize + 8)
            } else {
                0
            };
            if entry & OFLAG_COMPRESSED != 0 {
                if entry & OFLAG_COPIED != 0 {
                    self.report.messages.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                         clusters",
                        entry & ((1u64 << (62 - (self.cluster_bits - 8))) - 1)
                    ));
                    entry &= !OFLAG_COPIED;
                    self.report.corruptions += 1;
                }
                if self.data_file {
                    self.report.messages.push(format!(
                        "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                    ));
                    self.report.corruptions += 1;
                    continue;
                }
                if bitmap != 0 {
                    self.report.messages.push(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation \
                         bitmap, entry={entry:#x}"
                    ));
                    self.report.corruptions += 1;
                    continue;
                }
                let shift = 62 - (self.cluster_bits - 8);
                let mask = (1u64 << (self.cluster_bits - 8)) - 1;
                let coffset = entry & ((1u64 << shift) - 1);
                let sectors = ((entry >> shift) & mask) + 1;
                let csize = sectors * 512 - (coffset & 511);
                self.inc(coffset, csize);
                if frag {
                    // Compressed clusters count as fragmented by nature, as in QEMU.
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    self.report.fragmented_clusters += 1;
                }
                continue;
            }
            if entry & L2E_STD_RESERVED_MASK != 0 {
                self.report.messages.push(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                self.report.corruptions += 1;
            }
            let offset = entry & L2E_OFFSET_MASK;
            let zero = entry & OFLAG_ZERO != 0 && !self.extl2;
            let allocated = if zero {
                offset != 0
            } else {
                offset != 0 || (self.data_file && entry & OFLAG_COPIED != 0)
            };
            if allocated && frag {
                self.report.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.report.fragmented_clusters += 1;
                }
                next_contiguous = offset + self.cs;
            }
            if !allocated {
                if !zero && bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                    self.report.messages.push(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap"
                            .into(),
                    );
                    self.report.corruptions += 1;
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.report.messages.push(format!(
                    "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                     allocation bitmap"
                ));
                self.report.corruptions += 1;
            }
            if offset % self.cs != 0 {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR offset={offset:x}: cluster is not properly aligned; L2 entry corrupted."
                ));
            }
            if !self.data_file {
                self.inc(offset, self.cs);
            }
        }
    }

    /// The snapshot table: its size, and every snapshot's L1 table.
    fn snapshots(&mut self, offset: u64, n: u32) {
        let mut pos = offset;
        let mut l1s = Vec::new();
        for _ in 0..n {
            let Ok(h) = read_padded(self.storage, pos, 40) else {
                self.report.check_errors += 1;
                return;
            };
            let l1_offset = be::get_u64(&h, 0);
            let l1_size = be::get_u32(&h, 8);
            let id_len = u64::from(be::get_u16(&h, 12));
            let name_len = u64::from(be::get_u16(&h, 14));
            let extra = u64::from(be::get_u32(&h, 36));
            pos += (40 + extra + id_len + name_len).next_multiple_of(8);
            l1s.push((l1_offset, l1_size));
        }
        if self.data_file && n > 0 {
            self.report
                .messages
                .push("ERROR: Snapshots are not supported with data files".into());
            self.report.corruptions += 1;
        }
        for (o, s) in l1s {
            if u64::from(s) * 8 > QCOW_MAX_L1_SIZE {
                self.report.messages.push(format!(
                    "ERROR snapshot L1 table at {o:#x}: l1_size is too big"
                ));
                self.report.corruptions += 1;
                continue;
            }
            self.l1(o, s, false);
        }
        self.inc(offset, pos - offset);
    }

    /// qcow2_check_bitmaps_refcounts over the directory (loaded and validated by the caller).
    fn bitmaps(&mut self, dir_offset: u64, dir_size: u64, entries: &[BitmapDirEntry]) {
        self.inc(dir_offset, dir_size);
        self.own(dir_offset, dir_size, &Owner::BitmapDirectory);
        for e in entries {
            let name = String::from_utf8_lossy(e.qemu_name()).into_owned();
            let bytes = u64::from(e.table_size) * 8;
            self.inc(e.table_offset, bytes);
            self.own(e.table_offset, bytes, &Owner::BitmapTable(name.clone()));
            let Ok(raw) = read_padded(self.storage, e.table_offset, bytes as usize) else {
                self.report.corruptions += 1;
                self.report.bitmap_corruptions += 1;
                break;
            };
            for i in 0..e.table_size as usize {
                let v = be::get_u64(&raw, i * 8);
                match TableEntry::decode(v, self.cs, &e.name, i as u64) {
                    Err(err) => {
                        self.report.messages.push(format!("ERROR {err}"));
                        self.report.corruptions += 1;
                        self.report.bitmap_corruptions += 1;
                    }
                    Ok(TableEntry::Cluster(off)) => {
                        self.inc(off, self.cs);
                        self.own(off, self.cs, &Owner::BitmapData(name.clone()));
                    }
                    Ok(_) => {}
                }
            }
        }
    }

    /// The clusters of an invalidated extension's structures, as far as they can be read.
    fn stale_bitmaps(&mut self, header_cluster: &HeaderCluster) {
        let Some(ext) = header_cluster.exts.bitmaps else {
            return;
        };
        let size = ext.bitmap_directory_size;
        if size == 0 || size > crate::format::QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return;
        }
        self.own(ext.bitmap_directory_offset, size, &Owner::StaleBitmaps);
        let Ok(buf) = read_padded(self.storage, ext.bitmap_directory_offset, size as usize) else {
            return;
        };
        let Ok(entries) = parse_directory(
            &buf,
            ext.nb_bitmaps,
            self.cs,
            header_cluster.header.size & !511,
        ) else {
            return;
        };
        for e in entries {
            let bytes = u64::from(e.table_size) * 8;
            self.own(e.table_offset, bytes, &Owner::StaleBitmaps);
            let Ok(raw) = read_padded(self.storage, e.table_offset, bytes as usize) else {
                continue;
            };
            for i in 0..e.table_size as usize {
                if let Ok(TableEntry::Cluster(off)) =
                    TableEntry::decode(be::get_u64(&raw, i * 8), self.cs, &e.name, i as u64)
                {
                    self.own(off, self.cs, &Owner::StaleBitmaps);
                }
            }
        }
    }
}

/// On-disk refcounts, read straight from the table (QEMU's qcow2_get_refcount).
struct DiskRefcounts<'a> {
    storage: &'a dyn Storage,
    table: Vec<u64>,
    epb: u64,
    order: u32,
    cs: u64,
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl DiskRefcounts<'_> {
    fn get(&mut self, cluster: u64) -> std::result::Result<u64, String> {
        let idx = cluster / self.epb;
        let Some(&raw) = self.table.get(idx as usize) else {
            return Ok(0);
        };
        let off = raw & refcount::REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if off % self.cs != 0 {
            return Err(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {idx:#x})"
            ));
        }
        if !self.blocks.contains_key(&idx) {
            let b = read_padded(self.storage, off, self.cs as usize).map_err(|e| e.to_string())?;
            self.blocks.insert(idx, b);
        }
        Ok(refcount::get_refcount(
            &self.blocks[&idx],
            cluster % self.epb,
            self.order,
        ))
    }
}

fn run_check(
    storage: &dyn Storage,
    header_cluster: &HeaderCluster,
    entries: Option<&[BitmapDirEntry]>,
) -> Result<CheckReport> {
    let h = &header_cluster.header;
    let cs = h.cluster_size();
    let file_len = storage
        .size()
        .map_err(|e| Error::io("Could not get the image length", e))?;
    let nb_clusters = file_len.div_ceil(cs);
    let mut c = Checker {
        storage,
        cs,
        cluster_bits: h.cluster_bits,
        file_len,
        refs: vec![0; nb_clusters as usize],
        refcount_max: refcount::refcount_max(h.refcount_order),
        data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
        extl2: h.incompatible_features & INCOMPAT_EXTL2 != 0,
        report: CheckReport::default(),
        owners: HashMap::new(),
    };
    c.report.total_clusters = nb_clusters;
    // Header, active L1, snapshots, refcount table, crypto header, bitmaps.
    c.inc(0, cs);
    if u64::from(h.l1_size) * 8 > QCOW_MAX_L1_SIZE {
        return Err(Error::InvalidImage("Active L1 table too large".into()));
    }
    c.report.virtual_clusters = h.size.next_multiple_of(512).div_ceil(cs);
    c.l1(h.l1_table_offset, h.l1_size, true);
    c.snapshots(h.snapshots_offset, h.nb_snapshots);
    let reft_bytes = u64::from(h.refcount_table_clusters) * cs;
    c.inc(h.refcount_table_offset, reft_bytes);
    if let Some(crypto) = &header_cluster.exts.crypto {
        if crypto.len() >= 16 {
            c.inc(be::get_u64(crypto, 0), be::get_u64(crypto, 8));
        }
    }
    match (entries, header_cluster.exts.bitmaps) {
        (Some(entries), Some(ext)) if !entries.is_empty() => {
            c.bitmaps(
                ext.bitmap_directory_offset,
                ext.bitmap_directory_size,
                entries,
            );
        }
        _ => {}
    }
    if h.version >= 3 && h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        c.stale_bitmaps(header_cluster);
        c.report.stale_extension = header_cluster.exts.bitmaps.is_some();
    }
    // check_refblocks.
    let raw = read_padded(storage, h.refcount_table_offset, reft_bytes as usize)
        .map_err(|e| Error::io("Could not read the refcount table", e))?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|b| be::get_u64(b, 0)).collect();
    let mut table_ok = Vec::with_capacity(table.len());
    for (i, &e) in table.iter().enumerate() {
        let off = e & refcount::REFT_OFFSET_MASK;
        if e & REFT_RESERVED_MASK != 0 {
            c.report.messages.push(format!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            c.report.corruptions += 1;
            table_ok.push(0);
            continue;
        }
        if off % cs != 0 {
            c.report.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            c.report.corruptions += 1;
            table_ok.push(0);
            continue;
        }
        let cluster = off / cs;
        if cluster >= c.refs.len() as u64 {
            c.report
                .messages
                .push(format!("ERROR refcount block {i} is outside image"));
            c.report.corruptions += 1;
            table_ok.push(off);
            continue;
        }
        table_ok.push(off);
        if off != 0 {
            c.inc(off, cs);
            let r = c.refs[cluster as usize];
            if r != 1 {
                c.report
                    .messages
                    .push(format!("ERROR refcount block {i} refcount={r}"));
                c.report.corruptions += 1;
            }
        }
    }
    // compare_refcounts.
    let mut disk = DiskRefcounts {
        storage,
        table,
        epb: refcount::refblock_entries(h.cluster_bits, h.refcount_order),
        order: h.refcount_order,
        cs,
        blocks: BTreeMap::new(),
    };
    let mut highest = 0u64;
    let refs = std::mem::take(&mut c.refs);
    for (i, &reference) in refs.iter().enumerate() {
        let i = i as u64;
        let rc = match disk.get(i) {
            Ok(v) => v,
            Err(e) => {
                c.report
                    .messages
                    .push(format!("Can't get refcount for cluster {i}: {e}"));
                c.report.check_errors += 1;
                continue;
            }
        };
        if rc > 0 || reference > 0 {
            highest = i;
        }
        if rc != reference {
            let owner = c.owners.get(&i).cloned().unwrap_or(Owner::Other);
            let leak = rc > reference;
            c.report.messages.push(format!(
                "{} cluster {i} refcount={rc} reference={reference}",
                if leak { "Leaked" } else { "ERROR" }
            ));
            if leak {
                c.report.leaks += 1;
                if owner.is_bitmap() {
                    c.report.bitmap_leaks += 1;
                }
            } else {
                c.report.corruptions += 1;
                if owner.is_bitmap() {
                    c.report.bitmap_corruptions += 1;
                }
            }
            c.report.mismatches.push(Mismatch {
                cluster: i,
                refcount: rc,
                reference,
                owner,
            });
        }
    }
    c.report.image_end_offset = (highest + 1) * cs;
    // check_oflag_copied on the active L1/L2 tables.
    let l1 = read_padded(storage, h.l1_table_offset, h.l1_size as usize * 8).unwrap_or_default();
    for (i, chunk) in l1.chunks_exact(8).enumerate() {
        let e = be::get_u64(chunk, 0);
        let l2_offset = e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        let Ok(rc) = disk.get(l2_offset / cs) else {
            continue;
        };
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            c.report.corruptions += 1;
            c.report.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
        }
        let Ok(l2) = read_padded(storage, l2_offset, cs as usize) else {
            continue;
        };
        let esize = if c.extl2 { 16 } else { 8 };
        for j in 0..(cs as usize / esize) {
            let le = be::get_u64(&l2, j * esize);
            if le & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let off = le & L2E_OFFSET_MASK;
            let normal = off != 0 || (c.data_file && le & OFLAG_COPIED != 0);
            if !normal {
                continue;
            }
            let rc = if c.data_file {
                1
            } else {
                match disk.get(off / cs) {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            if (rc == 1) != (le & OFLAG_COPIED != 0) {
                c.report.corruptions += 1;
                c.report.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={le:x} refcount={rc}"
                ));
            }
        }
    }
    let _ = table_ok;
    Ok(c.report)
}

/// Checks an image's refcounts as `qemu-img check` does (see the module documentation), with
/// the bitmap structures singled out, and with `repair` reclaims leaked clusters (only when no
/// corruption was found). After a repair the image is checked again and the report gives what
/// is left, plus what was fixed. Fails like QEMU's open where the image cannot be checked at
/// all (not qcow2, a bitmap directory that breaks QEMU's constraints).
///
/// Holds QEMU's image locks for the whole check (write locks when repairing), so it fails with
/// [`Error::InUse`] while QEMU uses the image, as `qemu-img check` does.
pub fn check_bitmaps(path: impl AsRef<Path>, repair: bool) -> Result<CheckReport> {
    check_bitmaps_with(path, repair, false)
}

/// [`check_bitmaps`] with QEMU's force-share (`qemu-img check -U`): no locks, to check an
/// image another process has open (what it writes meanwhile may show as errors, as with
/// qemu-img). Refused with `repair`.
pub fn check_bitmaps_with(
    path: impl AsRef<Path>,
    repair: bool,
    force_share: bool,
) -> Result<CheckReport> {
    let path = path.as_ref();
    // The reads and the repair below use other descriptors of this process, which take no
    // locks of their own: these locks cover them.
    let _locks = FileStorage::open_locked(path, repair, force_share)?;
    check_locked(path, repair)
}

/// [`check_bitmaps`] once the caller holds the locks.
fn check_locked(path: &Path, repair: bool) -> Result<CheckReport> {
    let name = path.display().to_string();
    let ctx = || format!("Could not open '{name}'");
    let (storage, header_cluster) = open_header_cluster(path, true)?;
    let entries = read_directory(&storage, &header_cluster).map_err(|e| e.context(ctx()))?;
    let mut report = run_check(&storage, &header_cluster, entries.as_deref())?;
    report.bitmaps = entries
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(StoredBitmapInfo::from_entry)
        .collect();
    drop(storage);
    let leaks: Vec<Mismatch> = report
        .mismatches
        .iter()
        .filter(|m| m.is_leak())
        .cloned()
        .collect();
    if !repair || report.corruptions > 0 || report.check_errors > 0 {
        return Ok(report);
    }
    if leaks.is_empty() && !report.stale_extension {
        return Ok(report);
    }
    let mut storage = FileStorage::open(path, true).map_err(|e| Error::io(ctx(), e))?;
    let mut header_cluster = HeaderCluster::read(&storage).map_err(|e| e.context(ctx()))?;
    let mut dropped = false;
    if report.stale_extension {
        // As QEMU's read-write open does: the invalidated extension goes first.
        header_cluster.exts.bitmaps = None;
        header_cluster.write(&mut storage)?;
        alloc::flush(&mut storage)?;
        dropped = true;
    }
    let h = &header_cluster.header;
    let mut rc = Refcounts::load(
        &storage,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )?;
    let cs = h.cluster_size();
    let (mut fixed, mut bitmap_fixed) = (0, 0);
    for m in &leaks {
        for _ in m.reference..m.refcount {
            rc.free(&storage, m.cluster * cs, 1)?;
        }
        fixed += 1;
        if m.owner.is_bitmap() {
            bitmap_fixed += 1;
        }
    }
    rc.write_dirty_blocks(&mut storage)?;
    alloc::flush(&mut storage)?;
    drop(storage);
    let mut again = check_locked(path, false)?;
    again.leaks_fixed = fixed;
    again.bitmap_leaks_fixed = bitmap_fixed;
    again.stale_extension_dropped = dropped;
    Ok(again)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AddOptions, Image};

    fn tmp(name: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("qdirty-check-{}-{name}.qcow2", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn with_bitmaps(p: &Path) {
        Image::create(p, 64 << 20, 0).unwrap();
        let mut img = Image::open(p, true).unwrap();
        let opts = AddOptions {
            persistent: true,
            ..AddOptions::default()
        };
        img.add_bitmap(b"a", 0, opts).unwrap();
        img.add_bitmap(b"b", 4096, opts).unwrap();
        img.set_dirty(0, 1 << 20);
        img.close().unwrap();
    }

    #[test]
    fn clean_image_is_clean() {
        let p = tmp("clean");
        with_bitmaps(&p);
        let r = check_bitmaps(&p, false).unwrap();
        assert_eq!((r.leaks, r.corruptions, r.check_errors), (0, 0, 0), "{r:?}");
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.bitmaps.len(), 2);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn stale_extension_leaks_and_repair() {
        let p = tmp("stale");
        with_bitmaps(&p);
        // A bitmap-unaware writer: autoclear bit 0 cleared.
        let mut h = [0u8; 8];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut h, 88).unwrap();
        let v = u64::from_be_bytes(h) & !1;
        f.write_all_at(&v.to_be_bytes(), 88).unwrap();
        drop(f);
        let r = check_bitmaps(&p, false).unwrap();
        // Directory, two tables, two data clusters.
        assert_eq!(r.leaks, 5, "{r:?}");
        assert_eq!(r.bitmap_leaks, 5);
        assert_eq!(r.corruptions, 0);
        assert_eq!(r.exit_code(), 3);
        assert!(r.messages[0].starts_with("Leaked cluster"));
        let r = check_bitmaps(&p, true).unwrap();
        assert_eq!((r.leaks, r.leaks_fixed, r.bitmap_leaks_fixed), (0, 5, 5));
        assert!(r.stale_extension_dropped);
        assert_eq!(r.exit_code(), 0);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn zeroed_refcount_is_a_bitmap_corruption_and_not_repaired() {
        let p = tmp("corrupt");
        with_bitmaps(&p);
        let info = Image::inspect(&p).unwrap();
        let table = info.bitmaps[0].table_offset;
        // Zero the table cluster's refcount (16-bit refcounts, block at the reftable's entry 0).
        let (storage, header_cluster) = open_header_cluster(&p, false).unwrap();
        let mut e = [0u8; 8];
        storage
            .read_exact_at(&mut e, header_cluster.header.refcount_table_offset)
            .unwrap();
        let block = u64::from_be_bytes(e);
        drop(storage);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0, 0], block + 2 * (table / 65536))
            .unwrap();
        drop(f);
        let r = check_bitmaps(&p, true).unwrap();
        assert_eq!(
            (r.corruptions, r.bitmap_corruptions, r.leaks),
            (1, 1, 0),
            "{r:?}"
        );
        assert_eq!(r.leaks_fixed, 0);
        assert_eq!(r.exit_code(), 2);
        assert!(matches!(r.mismatches[0].owner, Owner::BitmapTable(_)));
        std::fs::remove_file(&p).unwrap();
    }
}
