//! Lazy loading on the image side: the storage handle shared with bitmaps whose data is still
//! on disk, and the [`LazySource`] that reads one bitmap's data clusters (large sequential
//! reads of contiguous runs). See `bitmap/bits.rs` for the bitmap side.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::storage::Storage;
use crate::bitmap::{HBitmap, LazySource};
use crate::error::{Error, Result};
use crate::format::bitmap_table::TableEntry;

/// Largest single read or write of bitmap data (bounded buffer).
pub(super) const MAX_IO_BYTES: u64 = 16 << 20;

/// The image's storage, shared by the image and the sources of its lazily loaded bitmaps.
/// Every use locks it briefly; nothing holds the lock while touching bitmaps.
#[derive(Clone)]
pub(super) struct SharedStorage(Arc<Mutex<Box<dyn Storage>>>);

impl SharedStorage {
    pub(super) fn new(storage: Box<dyn Storage>) -> Self {
        SharedStorage(Arc::new(Mutex::new(storage)))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Box<dyn Storage>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The stored data of one consistent bitmap: its validated table.
#[derive(Debug)]
pub(super) struct TableSource {
    storage: SharedStorageRef,
    name: String,
    table_offset: u64,
    table: Vec<TableEntry>,
    cluster_size: u64,
    /// Cleared when the image frees the table (the data may be reused).
    valid: AtomicBool,
}

/// Debug-printable wrapper.
#[derive(Clone)]
struct SharedStorageRef(SharedStorage);

impl std::fmt::Debug for SharedStorageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStorage")
    }
}

impl TableSource {
    pub(super) fn new(
        storage: &SharedStorage,
        name: String,
        table_offset: u64,
        table: Vec<TableEntry>,
        cluster_size: u64,
    ) -> Arc<TableSource> {
        Arc::new(TableSource {
            storage: SharedStorageRef(storage.clone()),
            name,
            table_offset,
            table,
            cluster_size,
            valid: AtomicBool::new(true),
        })
    }

    pub(super) fn invalidate(&self) {
        self.valid.store(false, Ordering::Release);
    }

    /// The bitmap's name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Whether the table on disk still says what it said when this source was made (a table
    /// that cannot be read or decoded any more has changed).
    pub(super) fn table_unchanged(&self) -> bool {
        let mut raw = vec![0u8; self.table.len() * 8];
        if self
            .storage
            .0
            .lock()
            .read_exact_at(&mut raw, self.table_offset)
            .is_err()
        {
            return false;
        }
        raw.chunks_exact(8).enumerate().all(|(i, c)| {
            let v = crate::format::be::get_u64(c, 0);
            TableEntry::decode(v, self.cluster_size, self.name.as_bytes(), i as u64)
                .is_ok_and(|t| t == self.table[i])
        })
    }

    /// Fills `into` from the table: contiguous runs of data clusters are read with one read
    /// each (at most [`LOAD_READ_BYTES`], a buffer that stays in the CPU cache and is reused
    /// across loads on the thread) and converted with [`HBitmap::load_words_le`]. `max_run`
    /// caps a run in clusters (tests use 1).
    pub(super) fn load_into(&self, into: &mut HBitmap, max_run: u64) -> Result<()> {
        if !self.valid.load(Ordering::Acquire) {
            return Err(Error::InvalidImage(format!(
                "Could not read bitmap '{}' from image: its stored copy was replaced",
                self.name
            )));
        }
        let cs = self.cluster_size;
        let size = into.size();
        let per_cluster = (8 * cs) << into.granularity_bits();
        let max_run = max_run.clamp(1, (LOAD_READ_BYTES / cs).max(1));
        LOAD_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let n = self.table.len();
            let mut i = 0;
            while i < n {
                let start = i as u64 * per_cluster;
                if start >= size {
                    break;
                }
                match self.table[i] {
                    TableEntry::Zeroes => i += 1,
                    TableEntry::Ones => {
                        into.deserialize_ones(start, per_cluster.min(size - start));
                        i += 1;
                    }
                    TableEntry::Cluster(off) => {
                        let mut run = 1u64;
                        while (i + run as usize) < n
                            && run < max_run
                            && (i as u64 + run) * per_cluster < size
                            && self.table[i + run as usize] == TableEntry::Cluster(off + run * cs)
                        {
                            run += 1;
                        }
                        let len = (run * cs) as usize;
                        if buf.len() < len {
                            buf.resize(len, 0);
                        }
                        self.storage
                            .0
                            .lock()
                            .read_exact_at(&mut buf[..len], off)
                            .map_err(|err| {
                                // QEMU's message first (scripts match it), then where: the
                                // errno stays EIO whatever the storage reported.
                                let msg = format!("{err} (bitmap data at offset {off:#x})");
                                Error::io(
                                    format!("Could not read bitmap '{}' from image", self.name),
                                    io::Error::new(err.kind(), msg),
                                )
                            })?;
                        into.load_words_le(i as u64 * (cs / 8), &buf[..len]);
                        i += run as usize;
                    }
                }
            }
            Ok(())
        })?;
        into.deserialize_finish();
        Ok(())
    }
}

/// Largest single read of bitmap data when loading: 1 MiB, like a plain sequential read, so
/// that the buffer is still in the CPU cache when it is converted.
const LOAD_READ_BYTES: u64 = 1 << 20;

thread_local! {
    /// The load buffer, reused by every load on the thread (no allocation per bitmap).
    static LOAD_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl LazySource for TableSource {
    fn load(&self, into: &mut HBitmap) -> Result<()> {
        self.load_into(into, u64::MAX)
    }
}

/// The sources handed out, by table offset, to invalidate those whose tables get freed: each
/// registration and invalidation is O(1) (amortized) whatever the number of bitmaps.
#[derive(Default)]
pub(super) struct Sources {
    /// By table offset: (registration number, source).
    by_table: HashMap<u64, Vec<(u64, Weak<TableSource>)>>,
    /// Registrations so far.
    registered: u64,
    /// Entries held (dropped sources included, until the next sweep).
    held: usize,
    /// Entries left by the last sweep.
    swept: usize,
}

impl Sources {
    pub(super) fn register(&mut self, s: &Arc<TableSource>) {
        if self.held > 2 * self.swept + 64 {
            self.sweep();
        }
        self.registered += 1;
        self.held += 1;
        self.by_table
            .entry(s.table_offset)
            .or_default()
            .push((self.registered, Arc::downgrade(s)));
    }

    /// Drops the entries of sources that no longer exist.
    fn sweep(&mut self) {
        self.by_table.retain(|_, v| {
            v.retain(|(_, w)| w.strong_count() > 0);
            !v.is_empty()
        });
        self.held = self.by_table.values().map(Vec::len).sum();
        self.swept = self.held;
    }

    /// The sources still in use, in the order they were registered.
    pub(super) fn live(&self) -> Vec<Arc<TableSource>> {
        let mut v: Vec<(u64, Arc<TableSource>)> = self
            .by_table
            .values()
            .flatten()
            .filter_map(|(n, w)| w.upgrade().map(|s| (*n, s)))
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Invalidates every source reading the table at `table_offset`.
    pub(super) fn invalidate(&mut self, table_offset: u64) {
        if let Some(v) = self.by_table.remove(&table_offset) {
            self.held -= v.len();
            for (_, w) in v {
                if let Some(s) = w.upgrade() {
                    s.invalidate();
                }
            }
        }
    }
}
