//! Durable mode's view of the disk in zones (docs/durable.md): which zones the stored bitmaps
//! cover on disk, and which zones guest writes are in flight in. No I/O: the image layer writes
//! the zones into the stored bitmaps and tells this tracker when they are durable.
//!
//! The disk is cut into zones of `1 << zone_shift` bytes. A zone is *covered* when every stored
//! bitmap that records on disk has every granule of it dirty, durably: a guest write into
//! covered zones may be issued at once. A zone has writes *in flight* between a write's
//! [`ZoneTracker::prepare`] and its [`ZoneTracker::complete`] (the write hook): whatever rewrites
//! a stored bitmap meanwhile (a store, a clear, a new bitmap) must keep those zones dirty on
//! disk, as their data may reach the disk before the hook records it exactly.
//!
//! Ordering: `prepare` raises the zones' in-flight counts, then reads their covered bits; a
//! rewrite of the stored bitmaps clears every covered bit, then reads the in-flight counts (both
//! sequentially consistent). So either the rewrite sees the write in flight and keeps its zones,
//! or the write sees its zones uncovered and waits for them to be covered again.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

/// Zone size of durable mode when the host does not choose one: 16 MiB. With 1% of a 1 TiB
/// disk written in 1 MiB runs, the first backup after a crash reads 1.1% of the disk when the
/// writes come in sequential extents and 15% when they are spread uniformly (64 MiB zones:
/// 1.6% and 47%), for a few hundred to a few thousand zone commits (BENCHMARKS.md, 'Durable
/// mode').
pub const DEFAULT_ZONE_BYTES: u64 = 16 << 20;

/// Smallest zone size accepted: 64 KiB.
pub const MIN_ZONE_BYTES: u64 = 64 << 10;

/// Most zones a disk is cut into: larger zones are used on disks where the chosen size would
/// make more (each zone costs 1 bit, and 4 bytes of counters per writer thread, up to
/// 8 threads).
pub const MAX_ZONES: u64 = 1 << 20;

/// Shards of the in-flight counters (threads are spread over them by the address of their
/// stack, so some may share one).
pub(crate) const SHARDS: usize = 8;

/// This thread's shard, from the address of its stack: threads' stacks are separate mappings
/// (megabytes apart), so the bits above the first megabyte tell threads apart, and they stay
/// the same across the calls of one thread (a call chain never moves its stack by a megabyte).
/// No thread-local lookup (a library call in a shared object). Only speed depends on the
/// choice: counts are summed over every shard.
#[inline]
fn shard() -> usize {
    let marker = 0u8;
    let sp = std::hint::black_box(std::ptr::addr_of!(marker)) as usize;
    ((sp >> 20).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) % SHARDS
}

/// Which zones are covered on disk and which have writes in flight (see the module docs).
#[derive(Debug)]
pub struct ZoneTracker {
    zone_shift: u32,
    size: u64,
    /// One bit per zone: covered on disk.
    covered: Box<[AtomicU64]>,
    /// Per zone: writes prepared and not yet completed, as the sum over the shards. Each
    /// thread counts in its own shard (allocated on first use), so that writer threads do not
    /// take each other's cache lines on every write; a write completed on another thread than
    /// the one that prepared it leaves +1 in one shard and -1 in another.
    in_flight: [OnceLock<Box<[AtomicI32]>>; SHARDS],
    /// Zones other threads found uncovered and wait for: whoever commits next takes them all
    /// (one write and one flush for all of them).
    pending: Mutex<Vec<u64>>,
    /// Completions that found no prepared write in their zone (a host that skipped
    /// `prepare_write`).
    violations: AtomicU64,
}

impl ZoneTracker {
    /// A tracker over a disk of `size` bytes with zones of `zone_bytes` (a power of two, at
    /// least [`MIN_ZONE_BYTES`]; raised so that the disk has at most [`MAX_ZONES`] zones).
    pub(crate) fn new(size: u64, zone_bytes: u64) -> Self {
        let mut shift = zone_bytes
            .max(MIN_ZONE_BYTES)
            .next_power_of_two()
            .trailing_zeros();
        while size.div_ceil(1u64 << shift) > MAX_ZONES {
            shift += 1;
        }
        let zones = size.div_ceil(1u64 << shift).max(1) as usize;
        debug_assert!(zones as u64 <= MAX_ZONES);
        ZoneTracker {
            zone_shift: shift,
            size,
            covered: (0..zones.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            in_flight: std::array::from_fn(|_| OnceLock::new()),
            pending: Mutex::new(Vec::new()),
            violations: AtomicU64::new(0),
        }
    }

    /// Zone size in bytes.
    pub fn zone_bytes(&self) -> u64 {
        1 << self.zone_shift
    }

    /// The byte range of zone `z`, clamped to the disk.
    pub(crate) fn zone_range(&self, z: u64) -> (u64, u64) {
        let start = z << self.zone_shift;
        (start, ((z + 1) << self.zone_shift).min(self.size))
    }

    /// The zones `[offset, offset + bytes)` touches, clamped to the disk (None: none).
    #[inline]
    fn zones_of(&self, offset: u64, bytes: u64) -> Option<(u64, u64)> {
        if bytes == 0 || offset >= self.size {
            return None;
        }
        let last = offset.saturating_add(bytes - 1).min(self.size - 1);
        Some((offset >> self.zone_shift, last >> self.zone_shift))
    }

    /// Shard `i` of the in-flight counters, allocated on first use.
    #[inline]
    fn counters(&self, i: usize) -> &[AtomicI32] {
        self.in_flight[i].get_or_init(|| (0..self.zones()).map(|_| AtomicI32::new(0)).collect())
    }

    fn zones(&self) -> usize {
        self.size.div_ceil(1u64 << self.zone_shift).max(1) as usize
    }

    /// Writes in flight in zone `z`: the sum over the shards.
    fn in_flight_in(&self, z: u64) -> i64 {
        self.in_flight
            .iter()
            .filter_map(OnceLock::get)
            .map(|c| i64::from(c[z as usize].load(SeqCst)))
            .sum()
    }

    #[inline]
    fn is_covered(&self, z: u64) -> bool {
        self.covered[(z / 64) as usize].load(SeqCst) >> (z % 64) & 1 != 0
    }

    /// Refuses a guest write that does not end inside the disk: no stored bitmap can cover
    /// it (the disk grew without the bitmaps), so a crash could lose it.
    #[inline]
    pub fn check_in_disk(&self, offset: u64, bytes: u64) -> crate::Result<()> {
        if bytes == 0
            || offset
                .checked_add(bytes)
                .is_some_and(|end| end <= self.size)
        {
            Ok(())
        } else {
            Err(self.past_end_error(offset, bytes))
        }
    }

    /// [`ZoneTracker::check_in_disk`]'s refusal, off the fast path.
    #[cold]
    #[inline(never)]
    fn past_end_error(&self, offset: u64, bytes: u64) -> crate::Error {
        crate::Error::InvalidArgument(format!(
            "Durable mode: a guest write at offset {offset} ({bytes} bytes) ends past the end \
             of the disk ({} bytes), where no bitmap can cover it: close the image and open it \
             again after the disk grew",
            self.size
        ))
    }

    /// A write to `[offset, offset + bytes)` is about to be issued: counts it in flight in its
    /// zones, and answers whether they are all covered (true: the write may be issued; false:
    /// the zones must be covered first, with the write still counted in flight:
    /// `Image::commit_prepared`). No lock, no allocation.
    #[inline]
    pub fn prepare(&self, offset: u64, bytes: u64) -> bool {
        let Some((first, last)) = self.zones_of(offset, bytes) else {
            return true;
        };
        let c = self.counters(shard());
        if first == last {
            // The common case: one zone.
            c[first as usize].fetch_add(1, SeqCst);
            return self.is_covered(first);
        }
        for z in first..=last {
            c[z as usize].fetch_add(1, SeqCst);
        }
        (first..=last).all(|z| self.is_covered(z))
    }

    /// Undoes [`ZoneTracker::prepare`] for a write that will not be issued.
    pub(crate) fn unprepare(&self, offset: u64, bytes: u64) {
        if let Some((first, last)) = self.zones_of(offset, bytes) {
            let c = self.counters(shard());
            for z in first..=last {
                c[z as usize].fetch_sub(1, SeqCst);
            }
        }
    }

    /// The write to `[offset, offset + bytes)` completed and was recorded exactly (the hook):
    /// its zones are no longer in flight for it. Answers false, counting a violation, when a
    /// zone had no write in flight: no `prepare_write` covered the write (the host skipped
    /// it, or completed a write twice). The count is put back then: left one short, it would
    /// hide a later write in flight in that zone from the next store, which a crash could
    /// then lose. A zone not covered is always checked (every thread's counters are read);
    /// a covered one only when this thread's counter goes below zero (the completions of
    /// writes prepared on other threads, and the violations), so that a host completing
    /// writes on the thread that prepared them reads one counter per zone.
    #[inline]
    pub fn complete(&self, offset: u64, bytes: u64) -> bool {
        let Some((first, last)) = self.zones_of(offset, bytes) else {
            return true;
        };
        let c = self.counters(shard());
        let mut ok = true;
        for z in first..=last {
            let was = c[z as usize].fetch_sub(1, SeqCst);
            if (was <= 0 || !self.is_covered(z)) && self.in_flight_in(z) < 0 {
                // Back to zero: the count must stay right for the writes that follow.
                c[z as usize].fetch_add(1, SeqCst);
                ok = false;
            }
        }
        if !ok {
            self.violations.fetch_add(1, SeqCst);
        }
        ok
    }

    /// The zones of `[offset, offset + bytes)` not covered now.
    pub(crate) fn uncovered(&self, offset: u64, bytes: u64) -> Vec<u64> {
        match self.zones_of(offset, bytes) {
            Some((first, last)) => (first..=last).filter(|&z| !self.is_covered(z)).collect(),
            None => Vec::new(),
        }
    }

    /// Queues zones for whoever commits next (group commit).
    pub(crate) fn push_pending(&self, zones: &[u64]) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.extend_from_slice(zones);
    }

    /// Takes the queued zones that are still uncovered.
    pub(crate) fn take_pending(&self) -> Vec<u64> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = std::mem::take(&mut *p);
        v.retain(|&z| !self.is_covered(z));
        v
    }

    /// The zones are covered on disk now (their commit was flushed).
    pub(crate) fn cover(&self, zones: &[u64]) {
        for &z in zones {
            self.covered[(z / 64) as usize].fetch_or(1 << (z % 64), SeqCst);
        }
    }

    /// No zone is covered any more (the stored bitmaps are about to be rewritten). Must come
    /// before [`ZoneTracker::in_flight_zones`] is read for that rewrite.
    pub(crate) fn uncover_all(&self) {
        for w in self.covered.iter() {
            w.store(0, SeqCst);
        }
    }

    /// The zones with writes in flight now, ascending.
    pub(crate) fn in_flight_zones(&self) -> Vec<u64> {
        let shards: Vec<&[AtomicI32]> = self
            .in_flight
            .iter()
            .filter_map(|c| c.get().map(|b| &b[..]))
            .collect();
        (0..self.zones())
            .filter(|&z| {
                shards
                    .iter()
                    .map(|c| i64::from(c[z].load(SeqCst)))
                    .sum::<i64>()
                    > 0
            })
            .map(|z| z as u64)
            .collect()
    }

    /// Completions so far that found no prepared write in their zone.
    pub fn violations(&self) -> u64 {
        self.violations.load(SeqCst)
    }

    /// Number of zones covered now.
    pub fn covered_zones(&self) -> u64 {
        self.covered
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_size_is_raised_to_a_power_of_two_and_the_zone_limit() {
        assert_eq!(ZoneTracker::new(1 << 40, 3 << 20).zone_bytes(), 4 << 20);
        assert_eq!(ZoneTracker::new(1 << 30, 1).zone_bytes(), MIN_ZONE_BYTES);
        // 1 TiB at 64 KiB would be 2^24 zones.
        assert_eq!(ZoneTracker::new(1 << 40, 1).zone_bytes(), 1 << 20);
        // 1 PiB at 64 KiB would be 2^34 zones.
        let t = ZoneTracker::new(1 << 50, 64 << 10);
        assert_eq!(t.zone_bytes(), (1u64 << 50) / MAX_ZONES);
    }

    #[test]
    fn prepare_sees_coverage_and_counts_in_flight() {
        let t = ZoneTracker::new(1 << 30, 1 << 20);
        assert!(!t.prepare(5 << 20, 4096));
        assert_eq!(t.uncovered((5 << 20) - 1, 2), vec![4, 5]);
        t.cover(&[5]);
        assert!(t.prepare(5 << 20, 4096));
        assert_eq!(t.in_flight_zones(), vec![5]);
        assert!(t.complete(5 << 20, 4096));
        assert!(t.complete(5 << 20, 4096));
        assert!(t.in_flight_zones().is_empty());
        // In a covered zone too, a completion with no write in flight is found (it takes this
        // thread's count below zero) and the count is put back: the next write in flight
        // there shows.
        assert!(!t.complete(5 << 20, 4096));
        assert_eq!(t.violations(), 1);
        assert!(t.prepare(5 << 20, 4096));
        assert_eq!(t.in_flight_zones(), vec![5]);
        assert!(t.complete(5 << 20, 4096));
        // In a zone not covered, a completion without a prepare is a violation and leaves the
        // count at zero.
        assert!(!t.complete(8 << 20, 4096));
        assert_eq!(t.violations(), 2);
        assert!(!t.prepare(8 << 20, 4096));
        assert_eq!(t.in_flight_zones(), vec![8]);
        assert!(t.complete(8 << 20, 4096));
        assert!(t.in_flight_zones().is_empty());
        // A write across two zones counts in both; unprepare gives both back.
        assert!(!t.prepare((7 << 20) - 1, 2));
        assert_eq!(t.in_flight_zones(), vec![6, 7]);
        t.unprepare((7 << 20) - 1, 2);
        assert!(t.in_flight_zones().is_empty());
        t.uncover_all();
        assert_eq!(t.covered_zones(), 0);
        // Past the end of the disk: nothing to track.
        assert!(t.prepare(1 << 30, 4096));
        assert!(t.complete(1 << 30, 4096));
    }

    /// Writes prepared on one thread and completed on another (an I/O completion thread):
    /// the counts of both threads' shards add up.
    #[test]
    fn writes_completed_on_other_threads_are_counted_right() {
        let t = ZoneTracker::new(1 << 30, 1 << 20);
        let threads = 2 * SHARDS;
        std::thread::scope(|s| {
            for k in 0..threads as u64 {
                let t = &t;
                s.spawn(move || assert!(!t.prepare(k << 20, 4096)));
            }
        });
        assert_eq!(t.in_flight_zones(), (0..threads as u64).collect::<Vec<_>>());
        std::thread::scope(|s| {
            let t = &t;
            s.spawn(move || {
                for k in 0..threads as u64 {
                    assert!(t.complete(k << 20, 4096), "zone {k}");
                }
            });
        });
        assert!(t.in_flight_zones().is_empty());
        assert_eq!(t.violations(), 0);
    }

    #[test]
    fn pending_zones_go_to_the_next_committer_once() {
        let t = ZoneTracker::new(1 << 30, 1 << 20);
        t.push_pending(&[3, 9]);
        t.cover(&[9]);
        assert_eq!(t.take_pending(), vec![3]);
        assert!(t.take_pending().is_empty());
    }
}
