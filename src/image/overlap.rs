//! The metadata overlap check for what qdirty writes and frees (QEMU: the qcow2 driver's
//! `overlap-check`, qcow2_check_metadata_overlap; docs/crash-safety.md, 'Overlap checks').
//!
//! In a corrupt image a bitmap table entry can name a cluster that holds other metadata (the
//! refcount table, an L1 or L2 table, cluster 0, another bitmap's table), and a host's
//! allocator can hand out such a cluster. Freeing it as bitmap data, or writing bitmap data into
//! it, destroys that metadata. So qdirty checks every cluster it is about to touch against
//! [`MetaClusters`], the image's metadata by cluster:
//!
//! * a cluster newly allocated and about to be written must hold nothing;
//! * a cluster about to be freed, or rewritten in place (the bitmap directory, a refcount
//!   block), must hold the structure qdirty means and nothing else.
//!
//! A refusal is an error that names both: what qdirty was about to write or free, and what lives
//! in the cluster. Stores and removals check what they will free before they write anything,
//! and allocations are checked before the clusters are written, so a refused operation leaves
//! the image as it was (a refused allocation from the image's refcounts is undone; one from a
//! host's allocator is not given back, see [`Qcow2File::alloc_clusters`]).
//!
//! The set covers QEMU's overlap-check set (cluster 0, the active and the snapshots' L1 and L2
//! tables, the refcount table and blocks, the snapshot table, the bitmap directory), the
//! encryption header, and the tables and data clusters of every bitmap in the directory. Guest
//! data clusters are not in it (QEMU does not check them either: finding them means reading
//! every L2 table). It is built once per read-write session, on the first write, and kept up to
//! date as qdirty allocates and frees; with a host allocator, which changes the image's
//! metadata between qdirty's calls, it is built again for every operation
//! ([`Qcow2File::begin_update`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::alloc::Refcounts;
use super::header_cluster::HeaderCluster;
use super::storage::Storage;
use super::Qcow2File;
use crate::error::{Error, Result};
use crate::format::bitmap_dir::BitmapDirEntry;
use crate::format::bitmap_table::TableEntry;
use crate::format::extension::BitmapsExt;
use crate::format::{be, refcount, QCOW_MAX_L1_SIZE, SNAPSHOT_HEADER_SIZE};

/// Offset bits of an L1 entry (QEMU: L1E_OFFSET_MASK).
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Largest read while building the set (tables are read in pieces of this size).
const READ_BYTES: u64 = 1 << 20;

/// Marks an L2 table of the active L1 table in [`MetaClusters::l2`].
const ACTIVE: u32 = u32::MAX;

/// One structure of the image, for checks and messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Structure {
    /// Cluster 0: the header, its extensions, the backing file name.
    Header,
    /// The refcount table.
    RefcountTable,
    /// The refcount block at this index of the refcount table.
    RefcountBlock(u64),
    /// The active L1 table.
    L1Table,
    /// An L2 table of the active L1 table.
    L2Table,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of the snapshot at this index of the snapshot table.
    SnapshotL1(u32),
    /// An L2 table of the snapshot at this index.
    SnapshotL2(u32),
    /// The encryption (LUKS) header.
    CryptoHeader,
    /// The bitmap directory.
    BitmapDirectory,
    /// The table of the named bitmap.
    BitmapTable(Arc<[u8]>),
    /// The data cluster at this table index of the named bitmap.
    BitmapData(Arc<[u8]>, u64),
}

/// A structure spanning clusters `first..end`.
#[derive(Clone, Debug)]
struct Span {
    first: u64,
    end: u64,
    what: Structure,
}

/// Spans that may overlap, sorted by first cluster, with the running maximum of their ends for
/// lookups.
#[derive(Debug, Default)]
struct Spans {
    spans: Vec<Span>,
    max_end: Vec<u64>,
}

impl Spans {
    fn rebuild(&mut self) {
        self.spans.sort_by_key(|s| s.first);
        let mut m = 0;
        self.max_end = self
            .spans
            .iter()
            .map(|s| {
                m = m.max(s.end);
                m
            })
            .collect();
    }

    fn push(&mut self, first: u64, n: u64, what: Structure) {
        if n > 0 {
            self.spans.push(Span {
                first,
                end: first.saturating_add(n),
                what,
            });
        }
    }

    /// Whether a span covers exactly `first..end`.
    fn contains(&self, first: u64, end: u64) -> bool {
        let i = self.spans.partition_point(|s| s.first < first);
        self.spans[i..]
            .iter()
            .take_while(|s| s.first == first)
            .any(|s| s.end == end)
    }

    /// The structures of the spans holding cluster `c` that pass `keep`.
    fn owners(&self, c: u64, out: &mut Vec<Structure>, keep: impl Fn(&Span) -> bool) {
        let mut j = self.spans.partition_point(|s| s.first <= c);
        while j > 0 && self.max_end[j - 1] > c {
            j -= 1;
            if self.spans[j].end > c && keep(&self.spans[j]) {
                out.push(self.spans[j].what.clone());
            }
        }
    }
}

/// The image's metadata by cluster (module documentation).
#[derive(Debug)]
pub(super) struct MetaClusters {
    cluster_bits: u32,
    /// Snapshot names by index, for messages.
    snapshot_names: Vec<String>,
    /// Cluster 0, the L1 tables, the snapshot table, the encryption header: never changed by
    /// qdirty.
    fixed: Spans,
    /// L2 tables by cluster, with the snapshot index ([`ACTIVE`] for the active L1 table),
    /// sorted: never changed by qdirty.
    l2: Vec<(u64, u32)>,
    /// The refcount table (first cluster, end), replaced when the allocator moves it.
    refcount_table: (u64, u64),
    /// Refcount blocks by cluster, with their table index, sorted; replaced when the allocator
    /// adds one.
    refcount_blocks: Vec<(u64, u64)>,
    /// The layout generation of the allocator the refcount part was taken from (None: read from
    /// the image).
    refcount_generation: Option<u64>,
    /// The bitmap directory and tables found in the image (ranges: a table of an in_use
    /// bitmap may claim many clusters); those freed since are in `freed_spans`.
    bitmap_spans: Spans,
    /// Ranges (first, end) of `bitmap_spans` freed since.
    freed_spans: HashSet<(u64, u64)>,
    /// Bitmap data clusters found in the image, and every bitmap structure qdirty allocated
    /// since, by cluster (usually one owner each).
    bitmap_clusters: HashMap<u64, Vec<Structure>>,
}

/// Reads the big-endian u64 entries `0..count` of a table at `offset`, in pieces; entries
/// beyond the end of the file are not visited (they read as zero).
fn for_each_entry(
    storage: &dyn Storage,
    file_len: u64,
    offset: u64,
    count: u64,
    mut f: impl FnMut(u64, u64),
) -> Result<()> {
    let in_file = file_len.saturating_sub(offset) / 8;
    let count = count.min(in_file);
    let per_read = READ_BYTES / 8;
    let mut buf = Vec::new();
    let mut i = 0;
    while i < count {
        let k = (count - i).min(per_read);
        buf.resize((k * 8) as usize, 0);
        storage
            .read_exact_at(&mut buf, offset + i * 8)
            .map_err(|e| {
                Error::io(
                    format!("Could not read metadata at {offset:#x} to check for overlaps"),
                    e,
                )
            })?;
        for (j, c) in buf.chunks_exact(8).enumerate() {
            f(i + j as u64, be::get_u64(c, 0));
        }
        i += k;
    }
    Ok(())
}

/// Reads `len` bytes at `offset`, zero-filled beyond the end of the file.
fn read_padded(storage: &dyn Storage, file_len: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if offset < file_len {
        let n = ((file_len - offset) as usize).min(len);
        storage.read_exact_at(&mut buf[..n], offset).map_err(|e| {
            Error::io(
                format!("Could not read metadata at {offset:#x} to check for overlaps"),
                e,
            )
        })?;
    }
    Ok(buf)
}

impl MetaClusters {
    /// Reads the image's metadata: the header fields in `header_cluster`, the structures they point to,
    /// and the bitmap directory `dir` with `entries`.
    pub(super) fn build(
        storage: &dyn Storage,
        header_cluster: &HeaderCluster,
        dir: Option<&BitmapsExt>,
        entries: &[BitmapDirEntry],
    ) -> Result<MetaClusters> {
        let h = &header_cluster.header;
        let bits = h.cluster_bits;
        let cs = 1u64 << bits;
        let file_len = storage
            .size()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        let clusters = |off: u64, bytes: u64| -> (u64, u64) {
            let first = off >> bits;
            let end = off.saturating_add(bytes).div_ceil(cs);
            (first, end.saturating_sub(first))
        };
        let mut m = MetaClusters {
            cluster_bits: bits,
            snapshot_names: Vec::new(),
            fixed: Spans::default(),
            l2: Vec::new(),
            refcount_table: (0, 0),
            refcount_blocks: Vec::new(),
            refcount_generation: None,
            bitmap_spans: Spans::default(),
            freed_spans: HashSet::new(),
            bitmap_clusters: HashMap::new(),
        };
        m.fixed.push(0, 1, Structure::Header);

        // Refcount table and blocks.
        let (first, n) = clusters(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        m.refcount_table = (first, first + n);
        for_each_entry(
            storage,
            file_len,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
            |i, v| {
                let off = v & refcount::REFT_OFFSET_MASK;
                if off != 0 {
                    m.refcount_blocks.push((off >> bits, i));
                }
            },
        )?;
        m.refcount_blocks.sort_unstable();

        // Active L1 and its L2 tables.
        let l1_bytes = u64::from(h.l1_size) * 8;
        let (first, n) = clusters(h.l1_table_offset, l1_bytes);
        if h.l1_size > 0 {
            m.fixed.push(first, n, Structure::L1Table);
        }
        let mut l2 = Vec::new();
        for_each_entry(
            storage,
            file_len,
            h.l1_table_offset,
            u64::from(h.l1_size),
            |_, v| {
                let off = v & L1E_OFFSET_MASK;
                if off != 0 {
                    l2.push((off >> bits, ACTIVE));
                }
            },
        )?;

        // Snapshot table, and every snapshot's L1 table and L2 tables.
        if h.nb_snapshots > 0 {
            let mut pos = h.snapshots_offset;
            let mut l1s = Vec::new();
            for _ in 0..h.nb_snapshots {
                if pos >= file_len {
                    break;
                }
                let sh = read_padded(storage, file_len, pos, SNAPSHOT_HEADER_SIZE as usize)?;
                let l1_offset = be::get_u64(&sh, 0);
                let l1_size = be::get_u32(&sh, 8);
                let id_len = u64::from(be::get_u16(&sh, 12));
                let name_len = u64::from(be::get_u16(&sh, 14));
                let extra = u64::from(be::get_u32(&sh, 36));
                let name_at = pos + SNAPSHOT_HEADER_SIZE + extra + id_len;
                let name = read_padded(storage, file_len, name_at, name_len as usize)?;
                m.snapshot_names
                    .push(String::from_utf8_lossy(&name).into_owned());
                l1s.push((l1_offset, l1_size));
                pos = pos
                    .saturating_add(SNAPSHOT_HEADER_SIZE + extra + id_len + name_len)
                    .next_multiple_of(8);
            }
            let (first, n) = clusters(h.snapshots_offset, pos - h.snapshots_offset);
            m.fixed.push(first, n, Structure::SnapshotTable);
            for (i, (off, size)) in l1s.into_iter().enumerate() {
                let bytes = u64::from(size) * 8;
                if bytes > QCOW_MAX_L1_SIZE {
                    continue;
                }
                let (first, n) = clusters(off, bytes);
                m.fixed.push(first, n, Structure::SnapshotL1(i as u32));
                for_each_entry(storage, file_len, off, u64::from(size), |_, v| {
                    let l2_off = v & L1E_OFFSET_MASK;
                    if l2_off != 0 {
                        l2.push((l2_off >> bits, i as u32));
                    }
                })?;
            }
        }
        l2.sort_unstable();
        l2.dedup();
        m.l2 = l2;

        // Encryption header.
        if let Some(c) = header_cluster
            .exts
            .crypto
            .as_deref()
            .filter(|c| c.len() >= 16)
        {
            let (first, n) = clusters(be::get_u64(c, 0), be::get_u64(c, 8));
            m.fixed.push(first, n, Structure::CryptoHeader);
        }
        m.fixed.rebuild();

        // Bitmap directory, tables and data. A table named by several entries is read once (its
        // data would only repeat; the shared table itself is a conflict already).
        if let Some(ext) = dir {
            let (first, n) = clusters(ext.bitmap_directory_offset, ext.bitmap_directory_size);
            m.bitmap_spans.push(first, n, Structure::BitmapDirectory);
        }
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            let name: Arc<[u8]> = Arc::from(e.qemu_name());
            let bytes = u64::from(e.table_size) * 8;
            let (first, n) = clusters(e.table_offset, bytes);
            m.bitmap_spans
                .push(first, n, Structure::BitmapTable(name.clone()));
            if !seen.insert(e.table_offset) {
                continue;
            }
            let mut data = Vec::new();
            for_each_entry(
                storage,
                file_len,
                e.table_offset,
                u64::from(e.table_size),
                |i, v| {
                    if let Ok(TableEntry::Cluster(off)) = TableEntry::decode(v, cs, &e.name, i) {
                        data.push((off >> bits, i));
                    }
                },
            )?;
            for (c, i) in data {
                m.bitmap_clusters
                    .entry(c)
                    .or_default()
                    .push(Structure::BitmapData(name.clone(), i));
            }
        }
        m.bitmap_spans.rebuild();
        Ok(m)
    }

    /// Everything the cluster at index `c` holds.
    fn owners(&self, c: u64) -> Vec<Structure> {
        let mut out = Vec::new();
        self.fixed.owners(c, &mut out, |_| true);
        let i = self.l2.partition_point(|&(x, _)| x < c);
        for &(_, s) in self.l2[i..].iter().take_while(|&&(x, _)| x == c) {
            out.push(if s == ACTIVE {
                Structure::L2Table
            } else {
                Structure::SnapshotL2(s)
            });
        }
        if (self.refcount_table.0..self.refcount_table.1).contains(&c) {
            out.push(Structure::RefcountTable);
        }
        let i = self.refcount_blocks.partition_point(|&(x, _)| x < c);
        for &(_, bi) in self.refcount_blocks[i..]
            .iter()
            .take_while(|&&(x, _)| x == c)
        {
            out.push(Structure::RefcountBlock(bi));
        }
        self.bitmap_spans.owners(c, &mut out, |sp| {
            !self.freed_spans.contains(&(sp.first, sp.end))
        });
        if let Some(d) = self.bitmap_clusters.get(&c) {
            out.extend(d.iter().cloned());
        }
        out
    }

    /// A structure in words, for messages ("the refcount table", "data cluster 3 of bitmap
    /// 'b'").
    pub(super) fn describe(&self, s: &Structure) -> String {
        let snap = |i: u32| match self.snapshot_names.get(i as usize) {
            Some(name) => format!("snapshot '{name}'"),
            None => format!("snapshot {i}"),
        };
        match s {
            Structure::Header => "the image header (cluster 0)".into(),
            Structure::RefcountTable => "the refcount table".into(),
            Structure::RefcountBlock(i) => format!("refcount block {i}"),
            Structure::L1Table => "the L1 table".into(),
            Structure::L2Table => "an L2 table".into(),
            Structure::SnapshotTable => "the snapshot table".into(),
            Structure::SnapshotL1(i) => format!("the L1 table of {}", snap(*i)),
            Structure::SnapshotL2(i) => format!("an L2 table of {}", snap(*i)),
            Structure::CryptoHeader => "the encryption header".into(),
            Structure::BitmapDirectory => "the bitmap directory".into(),
            Structure::BitmapTable(n) => {
                format!("the table of bitmap '{}'", String::from_utf8_lossy(n))
            }
            Structure::BitmapData(n, i) => format!(
                "data cluster {i} of bitmap '{}'",
                String::from_utf8_lossy(n)
            ),
        }
    }

    /// Clusters `off..off + n * cluster size`, newly allocated, that qdirty is about to write
    /// with `what(k)` (k-th cluster): each must hold nothing.
    pub(super) fn check_new(
        &self,
        off: u64,
        n: u64,
        what: &dyn Fn(u64) -> Structure,
    ) -> std::result::Result<(), Conflict> {
        self.check_free_clusters(off, n, what, false)
    }

    /// [`MetaClusters::check_new`] for the refcount allocator's own new structures, while it
    /// changes them: the refcount structures are its own to know (they may have moved since
    /// [`MetaClusters::sync_refcounts`]).
    pub(super) fn check_new_refcount_structure(
        &self,
        off: u64,
        n: u64,
        what: &Structure,
    ) -> std::result::Result<(), Conflict> {
        self.check_free_clusters(off, n, &|_| what.clone(), true)
    }

    fn check_free_clusters(
        &self,
        off: u64,
        n: u64,
        what: &dyn Fn(u64) -> Structure,
        skip_refcounts: bool,
    ) -> std::result::Result<(), Conflict> {
        let first = off >> self.cluster_bits;
        for k in 0..n {
            let other = self.owners(first + k).into_iter().find(|o| {
                !(skip_refcounts
                    && matches!(o, Structure::RefcountTable | Structure::RefcountBlock(_)))
            });
            if let Some(other) = other {
                return Err(Conflict {
                    offset: (first + k) << self.cluster_bits,
                    what: self.describe(&what(k)),
                    other: self.describe(&other),
                });
            }
        }
        Ok(())
    }

    /// Clusters `off..off + n * cluster size` that qdirty is about to free or rewrite in place
    /// as `what`: each must hold `what` once and nothing else.
    pub(super) fn check_owned(
        &self,
        off: u64,
        n: u64,
        what: &dyn Fn(u64) -> Structure,
    ) -> std::result::Result<(), Conflict> {
        let first = off >> self.cluster_bits;
        for k in 0..n {
            let want = what(k);
            let owners = self.owners(first + k);
            let mut mine = false;
            for o in owners {
                if o == want && !mine {
                    mine = true;
                    continue;
                }
                return Err(Conflict {
                    offset: (first + k) << self.cluster_bits,
                    what: self.describe(&want),
                    other: self.describe(&o),
                });
            }
        }
        Ok(())
    }

    /// Records clusters qdirty allocated: `what(k)` lives in the k-th.
    pub(super) fn add(&mut self, off: u64, n: u64, what: &dyn Fn(u64) -> Structure) {
        let first = off >> self.cluster_bits;
        for k in 0..n {
            self.bitmap_clusters
                .entry(first + k)
                .or_default()
                .push(what(k));
        }
    }

    /// Forgets the bitmap structures in clusters qdirty freed (`n` clusters at `off`: a whole
    /// table or directory, or data clusters), which held nothing else (checked before).
    pub(super) fn forget(&mut self, off: u64, n: u64) {
        let first = off >> self.cluster_bits;
        let end = first.saturating_add(n);
        if self.bitmap_spans.contains(first, end) {
            self.freed_spans.insert((first, end));
        }
        for c in first..end {
            self.bitmap_clusters.remove(&c);
        }
    }

    /// Takes the refcount table and blocks from the allocator when it changed them.
    pub(super) fn sync_refcounts(&mut self, rc: &Refcounts) {
        if self.refcount_generation == Some(rc.generation()) {
            return;
        }
        let (off, n) = rc.reftable_location();
        let first = off >> self.cluster_bits;
        self.refcount_table = (first, first + u64::from(n));
        self.refcount_blocks = rc
            .block_offsets()
            .map(|(i, off)| (off >> self.cluster_bits, i))
            .collect();
        self.refcount_blocks.sort_unstable();
        self.refcount_generation = Some(rc.generation());
    }

    /// Refcount blocks and the table are written in place: each of their clusters must hold
    /// nothing else.
    pub(super) fn check_refcount_structures(&self) -> std::result::Result<(), Conflict> {
        let (first, end) = self.refcount_table;
        let cs_bits = self.cluster_bits;
        self.check_owned(first << cs_bits, end - first, &|_| Structure::RefcountTable)?;
        for &(c, i) in &self.refcount_blocks {
            self.check_owned(c << cs_bits, 1, &|_| Structure::RefcountBlock(i))?;
        }
        Ok(())
    }
}

/// A cluster qdirty was about to touch holds something else.
#[derive(Debug)]
pub(super) struct Conflict {
    /// The cluster's offset.
    offset: u64,
    /// What qdirty was about to write or free there.
    what: String,
    /// What lives there.
    other: String,
}

/// The advice that comes with a conflict found in the image.
const REPAIR_HINT: &str = "the image is corrupt; repair it with 'qemu-img check -r all'";

impl Conflict {
    /// A conflict found in the image: `verb` is what qdirty was about to do ("write", "free",
    /// "rewrite").
    pub(super) fn in_image(self, verb: &str) -> Error {
        let also = if verb == "write" { "" } else { "also " };
        Error::InvalidImage(format!(
            "Refusing to {verb} {} at offset {:#x}: the cluster {also}holds {} ({REPAIR_HINT})",
            self.what, self.offset, self.other
        ))
    }

    /// A conflict in clusters a host's allocator handed out.
    pub(super) fn by_host(self) -> Error {
        Error::InvalidArgument(format!(
            "The host allocated the cluster at {:#x} for {}, but it holds {}",
            self.offset, self.what, self.other
        ))
    }
}

impl Qcow2File {
    /// The image's metadata by cluster, built on first use (module documentation).
    pub(super) fn metadata(&mut self) -> Result<&mut MetaClusters> {
        if self.overlap.is_none() {
            let mut guard = self.storage.lock();
            let built = if guard.allocator().is_some() {
                // The host changes its metadata between calls: take the header as it is now.
                let fresh = HeaderCluster::read(guard.as_ref())?;
                MetaClusters::build(
                    guard.as_ref(),
                    &fresh,
                    self.dir.ext.as_ref(),
                    self.dir.entries(),
                )
            } else {
                MetaClusters::build(
                    guard.as_ref(),
                    &self.header_cluster,
                    self.dir.ext.as_ref(),
                    self.dir.entries(),
                )
            }
            .map_err(|e| e.context("Could not check the image's metadata before writing"))?;
            drop(guard);
            let mut built = built;
            if let Some(rc) = &self.refcounts {
                built.sync_refcounts(rc);
            }
            self.overlap = Some(built);
        }
        Ok(self.overlap.as_mut().expect("built above"))
    }

    /// Starts an operation that writes: with a host allocator the set is read again (the host
    /// changed its metadata since the last operation).
    pub(super) fn begin_update(&mut self) {
        if self.overlap.is_some() && self.storage.lock().allocator().is_some() {
            self.overlap = None;
        }
    }

    /// Checks, before anything is written, that `n` clusters at `off` that the operation will
    /// free or rewrite in place hold `what(k)` and nothing else.
    pub(super) fn check_owned(
        &mut self,
        off: u64,
        n: u64,
        what: &dyn Fn(u64) -> Structure,
        verb: &str,
    ) -> Result<()> {
        self.metadata()?
            .check_owned(off, n, what)
            .map_err(|c| c.in_image(verb))
    }

    /// Checks the clusters of a stored bitmap that the operation will free: its table and the
    /// data clusters `table` names.
    pub(super) fn check_entry_owned(
        &mut self,
        e: &BitmapDirEntry,
        table: &[TableEntry],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let name: Arc<[u8]> = Arc::from(e.qemu_name());
        let n = (u64::from(e.table_size) * 8).div_ceil(cs);
        self.check_owned(
            e.table_offset,
            n,
            &|_| Structure::BitmapTable(name.clone()),
            "free",
        )?;
        for (i, t) in table.iter().enumerate() {
            if let TableEntry::Cluster(off) = *t {
                self.check_owned(
                    off,
                    1,
                    &|_| Structure::BitmapData(name.clone(), i as u64),
                    "free",
                )?;
            }
        }
        Ok(())
    }

    /// Checks the current bitmap directory, which the operation frees or rewrites in place.
    pub(super) fn check_directory_owned(&mut self, verb: &str) -> Result<()> {
        let Some(ext) = self.dir.ext else {
            return Ok(());
        };
        let n = ext.bitmap_directory_size.div_ceil(self.cluster_size());
        self.check_owned(
            ext.bitmap_directory_offset,
            n,
            &|_| Structure::BitmapDirectory,
            verb,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::super::create::blank_image;
    use super::super::storage::{ClusterAllocator, Storage};
    use super::super::tests::Shared;
    use super::super::{AddOptions, OpenOptions};
    use crate::error::Error;
    use crate::format::be;

    const MIB: u64 = 1 << 20;
    const P: AddOptions = AddOptions {
        persistent: true,
        disabled: false,
        autoload: None,
    };

    /// Where things are, read from the bytes (not through qdirty's own parsers).
    struct Layout {
        reftable: u64,
        refblock0: u64,
        l1: u64,
        /// (name, table offset, position of its directory entry)
        bitmaps: Vec<(String, u64, u64)>,
    }

    fn layout(b: &[u8]) -> Layout {
        let reftable = be::get_u64(b, 48);
        let mut pos = be::get_u32(b, 100) as usize;
        let mut dir = None;
        loop {
            let magic = be::get_u32(b, pos);
            let len = be::get_u32(b, pos + 4) as usize;
            if magic == 0 {
                break;
            }
            if magic == 0x2385_2875 {
                dir = Some((be::get_u32(b, pos + 8), be::get_u64(b, pos + 24)));
            }
            pos += 8 + len.div_ceil(8) * 8;
        }
        let mut bitmaps = Vec::new();
        if let Some((nb, off)) = dir {
            let mut p = off as usize;
            for _ in 0..nb {
                let table = be::get_u64(b, p);
                let name_len = u16::from_be_bytes([b[p + 18], b[p + 19]]) as usize;
                let name = String::from_utf8_lossy(&b[p + 24..p + 24 + name_len]).into_owned();
                bitmaps.push((name, table, p as u64));
                p += (24 + name_len).div_ceil(8) * 8;
            }
        }
        Layout {
            reftable,
            refblock0: be::get_u64(b, reftable as usize),
            l1: be::get_u64(b, 40),
            bitmaps,
        }
    }

    /// A 64 MiB image with 64 KiB clusters and bitmaps "b" and "c", each with one data cluster
    /// (first table entry).
    fn base() -> Shared {
        let s = Shared::new(blank_image(64 * MIB, 65536).unwrap());
        let mut img = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(s.clone()), "mem")
            .unwrap();
        for name in ["b", "c"] {
            let id = img.add_bitmap(name.as_bytes(), 65536, P).unwrap();
            img.bitmap_mut(id).unwrap().set_dirty(0, MIB).unwrap();
        }
        img.close().unwrap();
        s
    }

    fn set_entry(s: &Shared, at: u64, v: u64) {
        let mut st = s.clone();
        st.write_all_at(&v.to_be_bytes(), at).unwrap();
    }

    /// Opens read-write, changes bitmap "b" (`partial`: one more bit, else cleared), closes:
    /// the close must fail naming `want`, and leave the bytes as the open left them.
    fn refused(s: &Shared, partial: bool, want: &[&str]) {
        let mut img = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(s.clone()), "mem")
            .unwrap();
        let opened = s.bytes();
        let id = img.find_bitmap(b"b").unwrap();
        if partial {
            img.bitmap_mut(id).unwrap().set_dirty(60 * MIB, 1).unwrap();
        } else {
            img.bitmap_mut(id).unwrap().clear().unwrap();
        }
        let err = img.close().unwrap_err();
        let msg = err.to_string();
        for w in want {
            assert!(msg.contains(w), "'{w}' not in: {msg}");
        }
        assert!(matches!(err, Error::InvalidImage(_)), "{err:?}");
        assert!(
            s.bytes() == opened,
            "the refused store wrote to the image: {msg}"
        );
    }

    /// Bitmap "b"'s first data cluster (a table entry) made to name other metadata. (A table
    /// entry cannot name cluster 0: offset 0 means "all zeroes".)
    #[test]
    fn table_entries_naming_metadata_stop_the_store() {
        let l = layout(&base().bytes());
        let c = l.bitmaps.iter().find(|b| b.0 == "c").unwrap();
        let (c_table, c_data) = (c.1, be::get_u64(&base().bytes(), c.1 as usize));
        // The first table entry of "b" names its data cluster.
        let b_entry = l.bitmaps.iter().find(|b| b.0 == "b").unwrap().1;
        let cases = [
            (l.reftable, "the refcount table"),
            (l.refblock0, "refcount block 0"),
            (l.l1, "the L1 table"),
            (c_table, "the table of bitmap 'c'"),
            (c_data, "data cluster 0 of bitmap 'c'"),
        ];
        for (target, what) in cases {
            for partial in [false, true] {
                let s = base();
                set_entry(&s, b_entry, target);
                refused(
                    &s,
                    partial,
                    &["Refusing to free data cluster 0 of bitmap 'b'", what],
                );
            }
        }
    }

    /// Bitmap "b"'s table offset made to name the L1 table (all zeroes in a blank image, so the
    /// table is valid) or bitmap "c"'s table; and a removal, which frees the same clusters.
    #[test]
    fn table_offsets_naming_metadata_stop_the_store_and_the_removal() {
        let b0 = base().bytes();
        let l = layout(&b0);
        let c_table = l.bitmaps.iter().find(|b| b.0 == "c").unwrap().1;
        // The table offset is the first field of the directory entry.
        let dir_off = l.bitmaps.iter().find(|b| b.0 == "b").unwrap().2;
        for (target, what) in [(l.l1, "the L1 table"), (c_table, "the table of bitmap 'c'")] {
            for partial in [false, true] {
                let s = base();
                set_entry(&s, dir_off, target);
                refused(
                    &s,
                    partial,
                    &["Refusing to free the table of bitmap 'b'", what],
                );
            }
            let s = base();
            set_entry(&s, dir_off, target);
            let mut img = OpenOptions::new()
                .read_write(true)
                .open_storage(Box::new(s.clone()), "mem")
                .unwrap();
            let opened = s.bytes();
            let msg = img.remove_bitmap(b"b").unwrap_err().to_string();
            assert!(
                msg.contains("Refusing to free the table of bitmap 'b'") && msg.contains(what),
                "{msg}"
            );
            assert!(s.bytes() == opened, "the refused removal wrote: {msg}");
            drop(img);
        }
    }

    /// A metadata cluster with refcount 0 (corrupt refcounts): the built-in allocator hands it
    /// out first, and the write into it is refused.
    #[test]
    fn allocations_into_metadata_are_refused() {
        let s = base();
        let l = layout(&s.bytes());
        // 16-bit refcounts: entry k of block 0 at refblock0 + 2k.
        let mut st = s.clone();
        st.write_all_at(&[0, 0], l.refblock0 + 2 * (l.l1 / 65536))
            .unwrap();
        let mut img = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(s.clone()), "mem")
            .unwrap();
        let opened = s.bytes();
        let id = img.add_bitmap(b"n", 65536, P).unwrap();
        img.bitmap_mut(id).unwrap().set_dirty(0, 1).unwrap();
        let msg = img.close().unwrap_err().to_string();
        assert!(
            msg.contains("Refusing to write data cluster 0 of bitmap 'n'")
                && msg.contains(&format!("{:#x}", l.l1))
                && msg.contains("the L1 table"),
            "{msg}"
        );
        assert!(s.bytes() == opened, "the refused store wrote: {msg}");
    }

    /// A host allocator that answers from a list.
    struct Host {
        mem: Shared,
        answers: Vec<u64>,
        freed: Vec<(u64, u64)>,
    }

    impl ClusterAllocator for Host {
        fn alloc(&mut self, _n: u64, _cs: u64) -> io::Result<u64> {
            if self.answers.is_empty() {
                return Err(io::ErrorKind::StorageFull.into());
            }
            Ok(self.answers.remove(0))
        }
        fn free(&mut self, offset: u64, n: u64, _cs: u64) -> io::Result<()> {
            self.freed.push((offset, n));
            Ok(())
        }
    }

    impl Storage for Host {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.mem.read_exact_at(buf, offset)
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.mem.write_all_at(buf, offset)
        }
        fn size(&self) -> io::Result<u64> {
            self.mem.size()
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn allocator(&mut self) -> Option<&mut dyn ClusterAllocator> {
            Some(self)
        }
    }

    /// Clusters a host allocator hands back are checked: aligned, not cluster 0, below 2^56,
    /// holding no metadata, not handed out twice.
    #[test]
    fn host_allocations_are_checked() {
        let b = base().bytes();
        let l = layout(&b);
        let c_table = l.bitmaps.iter().find(|x| x.0 == "c").unwrap().1;
        let end = (b.len() as u64).next_multiple_of(65536);
        let cases: Vec<(Vec<u64>, &[&str])> = vec![
            (vec![end + 512], &["0x", "not a valid place"]),
            (vec![0], &["at 0x0 ", "not a valid place"]),
            (vec![1 << 56], &["not a valid place", "2^56"]),
            (vec![u64::MAX - 65535], &["not a valid place", "2^56"]),
            (
                vec![l.l1],
                &["data cluster 0 of bitmap 'n'", "the L1 table"],
            ),
            (vec![l.reftable], &["the refcount table"]),
            (vec![c_table], &["the table of bitmap 'c'"]),
            // The data run, then the table at the same place.
            (
                vec![end, end],
                &[
                    "the table of bitmap 'n'",
                    "holds data cluster 0 of bitmap 'n'",
                ],
            ),
        ];
        for (answers, want) in cases {
            let mem = Shared::new(b.clone());
            let host = Host {
                mem: mem.clone(),
                answers: answers.clone(),
                freed: Vec::new(),
            };
            let mut img = OpenOptions::new()
                .read_write(true)
                .open_storage(Box::new(host), "host")
                .unwrap();
            let opened = mem.bytes();
            let id = img.add_bitmap(b"n", 65536, P).unwrap();
            // One data cluster (it covers 32 GiB of disk), then the table.
            img.bitmap_mut(id).unwrap().set_dirty(0, 1).unwrap();
            let err = img.close().unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{answers:?}: {err:?}"
            );
            for w in want {
                assert!(msg.contains(w), "{answers:?}: '{w}' not in: {msg}");
            }
            if answers.len() == 1 {
                assert!(
                    mem.bytes() == opened,
                    "{answers:?}: the refused store wrote: {msg}"
                );
            }
        }
    }
}
