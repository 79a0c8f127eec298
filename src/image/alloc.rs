//! Cluster allocation and freeing through the qcow2 refcount structures (docs/format.md,
//! 'Refcounts and allocation').
//!
//! Allocation is first-fit from the lowest free cluster, as QEMU does (the hint restarts at 0 on
//! every open). New refcount blocks and a grown refcount table are written before anything points
//! at them, each followed by a flush, so a crash can only leak clusters. Increments and
//! decrements of existing blocks stay in memory until [`Refcounts::write_dirty_blocks`].
//!
//! Every cluster the allocator writes a structure of its own into (a new refcount block, a new
//! table) first passes the caller's [`Guard`] (the overlap check, `overlap.rs`): a free cluster
//! of a corrupt image may still hold metadata.

use std::collections::BTreeMap;

use super::overlap::Structure;
use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::{be, refcount, MAX_HOST_OFFSET, QCOW_MAX_REFTABLE_SIZE};

/// Called with (offset, clusters, what) before the allocator writes a structure of its own into
/// clusters it found free; an error stops the allocation before that write.
pub type Guard<'a> = &'a dyn Fn(u64, u64, Structure) -> Result<()>;

/// One refcount block in memory.
#[derive(Debug)]
struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// The refcount table and a cache of refcount blocks.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    /// Refcount entries per block.
    entries_per_block: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
    /// Decoded table: block offsets, 0 where no block exists.
    reftable: Vec<u64>,
    blocks: BTreeMap<u64, Block>,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// One past the highest cluster handed out in this session (may be beyond EOF).
    alloc_end: u64,
    /// Changes whenever a refcount block is added or the table moves.
    generation: u64,
}

impl Refcounts {
    /// Reads and validates the refcount table.
    pub fn load(
        storage: &dyn Storage,
        cluster_bits: u32,
        refcount_order: u32,
        reftable_offset: u64,
        reftable_clusters: u32,
    ) -> Result<Refcounts> {
        let cluster_size = 1u64 << cluster_bits;
        let bytes = u64::from(reftable_clusters) * cluster_size;
        if bytes > QCOW_MAX_REFTABLE_SIZE {
            return Err(Error::InvalidImage(format!(
                "Reference count table too large: {reftable_clusters} clusters"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        storage
            .read_exact_at(&mut raw, reftable_offset)
            .map_err(|e| Error::io("Could not read the refcount table", e))?;
        let mut reftable = Vec::with_capacity(raw.len() / 8);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let v = be::get_u64(chunk, 0);
            let off = refcount::decode_reftable_entry(v, i as u64, cluster_size)?;
            reftable.push(off.unwrap_or(0));
        }
        Ok(Refcounts {
            cluster_bits,
            refcount_order,
            entries_per_block: refcount::refblock_entries(cluster_bits, refcount_order),
            reftable_offset,
            reftable_clusters,
            reftable,
            blocks: BTreeMap::new(),
            free_hint: 0,
            alloc_end: 0,
            generation: 0,
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Current refcount table location (offset, clusters), for the header.
    pub fn reftable_location(&self) -> (u64, u32) {
        (self.reftable_offset, self.reftable_clusters)
    }

    /// Changes whenever a refcount block is added or the table moves (see
    /// [`Refcounts::block_offsets`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The refcount blocks: (index in the table, offset).
    pub fn block_offsets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.reftable
            .iter()
            .enumerate()
            .filter(|(_, &off)| off != 0)
            .map(|(i, &off)| (i as u64, off))
    }

    fn block(&mut self, storage: &dyn Storage, index: u64) -> Result<Option<&mut Block>> {
        let Some(&offset) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        if offset == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&index) {
            let mut data = vec![0u8; self.cluster_size() as usize];
            storage.read_exact_at(&mut data, offset).map_err(|e| {
                Error::io(format!("Could not read refcount block at {offset:#x}"), e)
            })?;
            self.blocks.insert(
                index,
                Block {
                    offset,
                    data,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&index))
    }

    /// Refcount of cluster `cluster` (0 when no block covers it).
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        let epb = self.entries_per_block;
        let order = self.refcount_order;
        Ok(match self.block(storage, cluster / epb)? {
            Some(b) => refcount::get_refcount(&b.data, cluster % epb, order),
            None => 0,
        })
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`, whose block must exist.
    fn update(&mut self, storage: &dyn Storage, cluster: u64, add: bool) -> Result<()> {
        let epb = self.entries_per_block;
        let order = self.refcount_order;
        let max = refcount::refcount_max(order);
        let cluster_size = self.cluster_size();
        let Some(b) = self.block(storage, cluster / epb)? else {
            return Err(Error::InvalidImage(format!(
                "Refcount of cluster {cluster} (offset {:#x}) cannot be changed: no refcount \
                 block covers it",
                cluster * cluster_size
            )));
        };
        let old = refcount::get_refcount(&b.data, cluster % epb, order);
        let new = if add {
            if old >= max {
                return Err(Error::InvalidImage(format!(
                    "Refcount of cluster {cluster} would exceed its maximum {max}"
                )));
            }
            old + 1
        } else {
            if old == 0 {
                return Err(Error::InvalidImage(format!(
                    "Refcount of cluster {cluster} (offset {:#x}) is already 0; the image's \
                     refcounts are corrupt (run 'qemu-img check -r all')",
                    cluster * cluster_size
                )));
            }
            old - 1
        };
        refcount::set_refcount(&mut b.data, cluster % epb, order, new);
        b.dirty = true;
        if new == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Lowest cluster index >= `from` whose refcount is 0 (beyond the table counts as free).
    fn next_free(&mut self, storage: &dyn Storage, from: u64) -> Result<u64> {
        let mut c = from.max(1);
        loop {
            let epb = self.entries_per_block;
            let bi = c / epb;
            if bi >= self.reftable.len() as u64 || self.reftable[bi as usize] == 0 {
                return Ok(c);
            }
            if self.get(storage, c)? == 0 {
                return Ok(c);
            }
            c += 1;
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the offset of the first.
    ///
    /// New refcount blocks and a grown table are written (and flushed) at once; the increments
    /// themselves reach the disk with [`Refcounts::write_dirty_blocks`], which the caller runs
    /// (and flushes) before anything on disk points at the new clusters. The returned clusters
    /// are the caller's to check; new refcount structures pass `guard` before they are written.
    pub fn alloc(&mut self, storage: &mut dyn Storage, n: u64, guard: Guard<'_>) -> Result<u64> {
        if n == 0 {
            return Err(Error::Precondition("Cannot allocate zero clusters".into()));
        }
        'search: loop {
            // First fit: n consecutive clusters with refcount 0.
            let mut start = self.next_free(storage, self.free_hint)?;
            let mut len = 0;
            while len < n {
                let c = start + len;
                let bi = c / self.entries_per_block;
                if bi < self.reftable.len() as u64
                    && self.reftable[bi as usize] != 0
                    && self.get(storage, c)? != 0
                {
                    start = self.next_free(storage, c + 1)?;
                    len = 0;
                    continue;
                }
                len += 1;
            }
            let end_offset = (start + n)
                .checked_mul(self.cluster_size())
                .filter(|&e| e <= MAX_HOST_OFFSET)
                .ok_or_else(|| {
                    Error::TooBig("Cannot allocate clusters: host offsets would exceed 2^56".into())
                })?;
            let _ = end_offset;
            // Every cluster of the range needs a refcount block; creating one may land inside
            // the range, so search again afterwards.
            let first_block = start / self.entries_per_block;
            let last_block = (start + n - 1) / self.entries_per_block;
            for bi in first_block..=last_block {
                if bi >= self.reftable.len() as u64 {
                    self.grow_reftable(storage, bi, guard)?;
                    continue 'search;
                }
                if self.reftable[bi as usize] == 0 {
                    self.create_block(storage, bi, guard)?;
                    continue 'search;
                }
            }
            for c in start..start + n {
                self.update(storage, c, true)?;
            }
            self.free_hint = start + n;
            self.alloc_end = self.alloc_end.max(start + n);
            return Ok(start * self.cluster_size());
        }
    }

    /// Creates the refcount block for table index `bi`: written and flushed before the table
    /// entry that points at it.
    fn create_block(&mut self, storage: &mut dyn Storage, bi: u64, guard: Guard<'_>) -> Result<()> {
        let epb = self.entries_per_block;
        let cs = self.cluster_size();
        loop {
            let j = self.next_free(storage, 0)?;
            // The lowest free cluster is where this block (or the one created first) goes.
            guard(j * cs, 1, Structure::RefcountBlock(bi))?;
            let mut data = vec![0u8; cs as usize];
            if j / epb == bi {
                // Self-describing: the block counts itself.
                refcount::set_refcount(&mut data, j % epb, self.refcount_order, 1);
            } else if (j / epb) >= self.reftable.len() as u64 {
                self.grow_reftable(storage, j / epb, guard)?;
                continue;
            } else if self.reftable[(j / epb) as usize] == 0 {
                // The free cluster's own region has no block yet: create that one first.
                self.create_block(storage, j / epb, guard)?;
                continue;
            } else {
                self.update(storage, j, true)?;
                self.write_dirty_blocks(storage)?;
            }
            let offset = j * cs;
            storage
                .write_all_at(&data, offset)
                .map_err(|e| Error::io("Could not write a new refcount block", e))?;
            flush(storage)?;
            let mut entry = [0u8; 8];
            be::put_u64(&mut entry, 0, offset);
            storage
                .write_all_at(&entry, self.reftable_offset + 8 * bi)
                .map_err(|e| Error::io("Could not update the refcount table", e))?;
            flush(storage)?;
            self.reftable[bi as usize] = offset;
            self.blocks.insert(
                bi,
                Block {
                    offset,
                    data,
                    dirty: false,
                },
            );
            self.alloc_end = self.alloc_end.max(j + 1);
            self.generation += 1;
            return Ok(());
        }
    }

    /// Grows the refcount table so that it has an entry for block index `need`: new
    /// self-describing blocks and the new table are
    /// placed after everything in use, written and flushed, then the header is switched with
    /// one 12-byte write at offset 48, and the old table is freed.
    fn grow_reftable(
        &mut self,
        storage: &mut dyn Storage,
        need: u64,
        guard: Guard<'_>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let epb = self.entries_per_block;
        let file_clusters = storage
            .size()
            .map_err(|e| Error::io("Could not get the image length", e))?
            .div_ceil(cs);
        let a = file_clusters.max(self.alloc_end).max(1);
        // Fixed point: blocks (B) and table clusters (T) placed at a.. must all be covered.
        let (mut b, mut t) = (0u64, 1u64);
        let mut entries;
        loop {
            let covered_blocks = (a + b + t).div_ceil(epb).max(need + 1);
            entries = covered_blocks.max(self.reftable.len() as u64);
            entries += entries / 2; // 50 % headroom, as QEMU
            let new_t = (entries * 8).div_ceil(cs);
            entries = new_t * cs / 8;
            let end = a + b + new_t;
            let new_b = (a / epb..end.div_ceil(epb))
                .filter(|&bi| bi >= self.reftable.len() as u64 || self.reftable[bi as usize] == 0)
                .count() as u64;
            if new_b == b && new_t == t {
                break;
            }
            (b, t) = (new_b, new_t);
        }
        if t * cs > QCOW_MAX_REFTABLE_SIZE {
            return Err(Error::TooBig(format!(
                "Cannot grow the refcount table to {} bytes: the maximum is {QCOW_MAX_REFTABLE_SIZE}",
                t * cs
            )));
        }
        let end = a + b + t;
        if end.checked_mul(cs).is_none_or(|e| e > MAX_HOST_OFFSET) {
            return Err(Error::TooBig(
                "Cannot grow the refcount table beyond 2^56".into(),
            ));
        }
        let mut new_table = self.reftable.clone();
        new_table.resize(entries as usize, 0);
        // New blocks, in order, for the regions without one.
        let mut next_block_cluster = a;
        let mut new_blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for bi in a / epb..end.div_ceil(epb) {
            if new_table[bi as usize] == 0 {
                new_table[bi as usize] = next_block_cluster * cs;
                new_blocks.insert(bi, vec![0u8; cs as usize]);
                next_block_cluster += 1;
            }
        }
        debug_assert_eq!(next_block_cluster, a + b);
        for bi in new_blocks.keys() {
            guard(new_table[*bi as usize], 1, Structure::RefcountBlock(*bi))?;
        }
        guard((a + b) * cs, t, Structure::RefcountTable)?;
        // Refcount 1 for every new metadata cluster, in whichever block covers it.
        for c in a..end {
            let bi = c / epb;
            if let Some(data) = new_blocks.get_mut(&bi) {
                refcount::set_refcount(data, c % epb, self.refcount_order, 1);
            } else {
                self.update(storage, c, true)?;
            }
        }
        self.write_dirty_blocks(storage)?;
        for (bi, data) in &new_blocks {
            storage
                .write_all_at(data, new_table[*bi as usize])
                .map_err(|e| Error::io("Could not write a new refcount block", e))?;
        }
        flush(storage)?;
        let mut raw = vec![0u8; (t * cs) as usize];
        for (i, &off) in new_table.iter().enumerate() {
            be::put_u64(&mut raw, i * 8, off);
        }
        let table_offset = (a + b) * cs;
        storage
            .write_all_at(&raw, table_offset)
            .map_err(|e| Error::io("Could not write the new refcount table", e))?;
        flush(storage)?;
        let mut hdr = [0u8; 12];
        be::put_u64(&mut hdr, 0, table_offset);
        be::put_u32(&mut hdr, 8, t as u32);
        storage
            .write_all_at(&hdr, 48)
            .map_err(|e| Error::io("Could not switch to the new refcount table", e))?;
        flush(storage)?;
        let (old_offset, old_clusters) = (self.reftable_offset, self.reftable_clusters);
        self.reftable = new_table;
        self.reftable_offset = table_offset;
        self.reftable_clusters = t as u32;
        for (bi, data) in new_blocks {
            let offset = self.reftable[bi as usize];
            self.blocks.insert(
                bi,
                Block {
                    offset,
                    data,
                    dirty: false,
                },
            );
        }
        self.alloc_end = self.alloc_end.max(end);
        self.generation += 1;
        self.free(storage, old_offset, u64::from(old_clusters))?;
        self.write_dirty_blocks(storage)?;
        flush(storage)
    }

    /// Decrements the refcount of `n` clusters starting at `offset`. Call only after the
    /// metadata that pointed at them has been durably replaced.
    pub fn free(&mut self, storage: &dyn Storage, offset: u64, n: u64) -> Result<()> {
        let first = offset >> self.cluster_bits;
        for c in first..first + n {
            self.update(storage, c, false)?;
        }
        Ok(())
    }

    /// Writes every changed refcount block (no flush).
    pub fn write_dirty_blocks(&mut self, storage: &mut dyn Storage) -> Result<()> {
        for b in self.blocks.values_mut().filter(|b| b.dirty) {
            storage
                .write_all_at(&b.data, b.offset)
                .map_err(|e| Error::io("Could not write a refcount block", e))?;
            b.dirty = false;
        }
        Ok(())
    }
}

/// fdatasync with a message.
pub fn flush(storage: &mut dyn Storage) -> Result<()> {
    storage
        .flush()
        .map_err(|e| Error::io("Could not flush the image", e))
}
