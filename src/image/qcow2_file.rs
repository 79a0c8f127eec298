//! The qcow2 file behind an [`Image`](super::Image): the type and its basic calls (geometry,
//! cluster allocation, refcounts, header writes). The operations on it live with their job:
//! `load.rs` (open), `store.rs` (store, removal), `salvage.rs`, `overlap.rs` (the overlap
//! check).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use super::alloc::{self, Refcounts};
use super::header_cluster::HeaderCluster;
use super::overlap::{self, MetaClusters, Structure};
use super::table_source;
use crate::bitmap::BitmapId;
use crate::error::{Error, Result};
use crate::format::bitmap_dir::BitmapDirEntry;
use crate::format::extension::BitmapsExt;
use crate::format::MAX_HOST_OFFSET;

/// The bitmap directory as it is on disk now, with its entries indexed by name.
#[derive(Clone, Debug, Default)]
pub(super) struct StoredDirectory {
    /// The extension (None: the image has no bitmaps extension in use).
    pub(super) ext: Option<BitmapsExt>,
    /// The entries, in directory order.
    entries: Vec<BitmapDirEntry>,
    /// (hash of the name, position) of every entry, sorted: a lookup by name is a binary
    /// search, and building it is one allocation (the directory is rebuilt at every commit).
    by_name: Vec<(u64, u32)>,
    hasher: RandomState,
}

impl StoredDirectory {
    pub(super) fn new(ext: Option<BitmapsExt>, entries: Vec<BitmapDirEntry>) -> Self {
        let hasher = RandomState::new();
        let mut by_name: Vec<(u64, u32)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (hasher.hash_one(e.qemu_name()), i as u32))
            .collect();
        by_name.sort_unstable();
        StoredDirectory {
            ext,
            entries,
            by_name,
            hasher,
        }
    }

    /// The entries, in directory order.
    pub(super) fn entries(&self) -> &[BitmapDirEntry] {
        &self.entries
    }

    /// Replaces the entries (same extension).
    pub(super) fn set_entries(&mut self, entries: Vec<BitmapDirEntry>) {
        *self = StoredDirectory::new(self.ext, entries);
    }

    /// The first entry named `name` (QEMU's name, up to the first NUL) whose position passes
    /// `keep`: O(log n).
    pub(super) fn position(&self, name: &[u8], keep: impl Fn(usize) -> bool) -> Option<usize> {
        let h = self.hasher.hash_one(name);
        let from = self.by_name.partition_point(|&(x, _)| x < h);
        // Same hash: ascending positions, so the first match is the first in the directory.
        self.by_name[from..]
            .iter()
            .take_while(|&&(x, _)| x == h)
            .map(|&(_, i)| i as usize)
            .find(|&i| self.entries[i].qemu_name() == name && keep(i))
    }
}

/// The qcow2 file behind an image and what qdirty knows of it (QEMU: the qcow2 driver's
/// bitmap state, block/qcow2-bitmap.c).
pub(super) struct Qcow2File {
    /// Shared with the sources of lazily loaded bitmaps (table_source.rs).
    pub(super) storage: table_source::SharedStorage,
    /// The sources handed out, invalidated when their tables are freed.
    pub(super) sources: table_source::Sources,
    /// For messages.
    pub(super) name: String,
    pub(super) read_only: bool,
    /// Set when a header write failed: whether the commit reached the disk is unknown, so
    /// qdirty writes nothing more to this image (both outcomes are valid on disk).
    pub(super) failed: Option<String>,
    /// Bitmaps made readonly because they could not be marked in_use again after a store
    /// (their stored copies are consistent): writable again after a successful store.
    pub(super) frozen: Vec<BitmapId>,
    pub(super) header_cluster: HeaderCluster,
    /// Refcounts, loaded on the first allocation (read-write, built-in allocator only).
    pub(super) refcounts: Option<Refcounts>,
    /// The image's metadata by cluster, for the overlap check of writes and frees (read-write,
    /// built on the first write; see `overlap.rs`).
    pub(super) overlap: Option<MetaClusters>,
    pub(super) dir: StoredDirectory,
    /// Opened in salvage mode ([`OpenOptions::salvage`](super::OpenOptions::salvage)).
    pub(super) salvage: bool,
    /// Salvage: the directory entries (positions in `dir.entries`, ascending) that QEMU would
    /// refuse the image for, with the reason. They are kept in the directory (written back as
    /// they are) until removed, never loaded, and their clusters are never freed.
    pub(super) broken: Vec<(usize, String)>,
    /// Durable mode (durable.rs): which zones are covered on disk and which have writes in
    /// flight. None in the ordinary mode.
    pub(super) durable: Option<std::sync::Arc<crate::bitmap::ZoneTracker>>,
}

impl Qcow2File {
    /// Virtual disk size in bytes, as QEMU sees it (rounded down to 512).
    pub(super) fn size(&self) -> u64 {
        self.header_cluster.header.size & !511
    }

    pub(super) fn cluster_size(&self) -> u64 {
        self.header_cluster.header.cluster_size()
    }

    /// log2 of the disk bytes one data cluster of a bitmap with `granularity_bits` covers.
    pub(super) fn cluster_shift(&self, granularity_bits: u8) -> u32 {
        self.header_cluster.header.cluster_bits + 3 + u32::from(granularity_bits)
    }

    /// Allocates `n` contiguous clusters (refcount 1) for `what(k)` (the k-th cluster): through
    /// the host's allocator when the storage has one, else through the image's refcounts. The
    /// clusters pass the overlap check (they must hold nothing, `overlap.rs`) and are recorded
    /// as holding `what`. A host allocation that fails the check is not given back (the host's
    /// answer cannot be trusted to free); one of the image's refcounts is undone in memory.
    pub(super) fn alloc_clusters(
        &mut self,
        n: u64,
        what: &dyn Fn(u64) -> Structure,
    ) -> Result<u64> {
        let cs = self.cluster_size();
        self.metadata()?;
        let host = {
            let mut guard = self.storage.lock();
            match guard.allocator() {
                Some(a) => Some(
                    a.alloc(n, cs)
                        .map_err(|e| Error::io("The host could not allocate clusters", e))?,
                ),
                None => None,
            }
        };
        if let Some(off) = host {
            let end = n.checked_mul(cs).and_then(|b| off.checked_add(b));
            if off % cs != 0 || off == 0 || end.is_none_or(|e| e > MAX_HOST_OFFSET) {
                let map = self.overlap.as_ref().expect("built above");
                return Err(Error::InvalidArgument(format!(
                    "The host allocated {n} clusters at {off:#x} for {}, which is not a valid \
                     place: clusters must be aligned to {cs} bytes, not cluster 0, and end below \
                     2^56",
                    map.describe(&what(0))
                )));
            }
            let map = self.overlap.as_mut().expect("built above");
            map.check_new(off, n, what)
                .map_err(overlap::Conflict::by_host)?;
            map.add(off, n, what);
            return Ok(off);
        }
        self.refcounts()?;
        let rc = self.refcounts.as_mut().expect("loaded by refcounts()");
        let map = self.overlap.as_mut().expect("built above");
        let mut guard = self.storage.lock();
        let storage = guard.as_mut();
        let check: alloc::Guard<'_> = &|o, k, s| {
            map.check_new_refcount_structure(o, k, &s)
                .map_err(|c| c.in_image("write"))
        };
        let off = rc.alloc(storage, n, check);
        let (t_off, t_clusters) = rc.reftable_location();
        self.header_cluster.header.refcount_table_offset = t_off;
        self.header_cluster.header.refcount_table_clusters = t_clusters;
        let off = off?;
        map.sync_refcounts(rc);
        if let Err(c) = map.check_new(off, n, what) {
            // Undone in memory; a failure here only leaks (the increment may be written later).
            let _ = rc.free(storage, off, n);
            return Err(c.in_image("write"));
        }
        map.add(off, n, what);
        Ok(off)
    }

    /// The image's refcounts, read on first use. The refcount table and blocks are written in
    /// place, so their clusters must pass the overlap check (hold nothing else).
    pub(super) fn refcounts(&mut self) -> Result<&mut Refcounts> {
        if self.refcounts.is_none() {
            let h = &self.header_cluster.header;
            let rc = Refcounts::load(
                self.storage.lock().as_ref(),
                h.cluster_bits,
                h.refcount_order,
                h.refcount_table_offset,
                h.refcount_table_clusters,
            )?;
            let map = self.metadata()?;
            map.sync_refcounts(&rc);
            map.check_refcount_structures()
                .map_err(|c| c.in_image("rewrite"))?;
            self.refcounts = Some(rc);
        }
        Ok(self.refcounts.as_mut().expect("loaded above"))
    }

    /// Makes refcount increments durable-ready: writes changed refcount blocks (built-in
    /// allocator only; the host's flush covers its own).
    pub(super) fn write_refcounts(&mut self) -> Result<()> {
        if let Some(rc) = self.refcounts.as_mut() {
            rc.write_dirty_blocks(self.storage.lock().as_mut())?;
        }
        Ok(())
    }

    /// Writes the header from memory and flushes. With host I/O the header is read again first,
    /// so that only what qdirty owns (autoclear bit 0 and the bitmaps extension) changes.
    pub(super) fn write_header_sync(&mut self) -> Result<()> {
        let mut guard = self.storage.lock();
        if guard.allocator().is_some() {
            let fresh = HeaderCluster::read(guard.as_ref())?;
            let autoclear = self.header_cluster.header.autoclear_features;
            let bitmaps = self.header_cluster.exts.bitmaps;
            self.header_cluster = fresh;
            self.header_cluster.header.autoclear_features = autoclear;
            self.header_cluster.exts.bitmaps = bitmaps;
        }
        self.header_cluster.write(guard.as_mut())?;
        alloc::flush(guard.as_mut())
    }

    /// Reads the virtual size from the header on storage again (after a host resize).
    pub(super) fn refresh_size(&mut self) -> Result<()> {
        let fresh = HeaderCluster::read(self.storage.lock().as_ref())?;
        // The L1 table may have moved.
        self.overlap = None;
        self.header_cluster.header.size = fresh.header.size;
        self.header_cluster.header.l1_size = fresh.header.l1_size;
        self.header_cluster.header.l1_table_offset = fresh.header.l1_table_offset;
        Ok(())
    }
}
