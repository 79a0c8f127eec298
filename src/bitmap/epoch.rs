//! Guest writes taken out of the write log but not yet OR-ed into every bitmap that records
//! them: the lazy half of the hook's fan-out.
//!
//! Draining the [`WriteLog`](super::log::WriteLog) into every enabled bitmap would cost one set
//! per write *per enabled bitmap* (QEMU's cost, moved from the hook to the drain). Instead, the
//! set *absorbs* the log into one shared bitmap per granularity (an *epoch*: one set per
//! write, whatever the number of bitmaps), and each bitmap takes the epochs it has not seen
//! when it is itself read or changed (its *catch-up*). A bitmap's *cursor* is the sequence
//! number of the first epoch it still needs; catching up ORs every epoch from the cursor on
//! into the bitmap, *seals* the open epoch (later writes go to a new one) and moves the
//! cursor past it. Sealing makes cursors exact: a bitmap that is cleared or reset after its
//! catch-up never gets the old writes back.
//!
//! Epochs that no recording bitmap needs any more are dropped, and two neighbouring epochs
//! that no cursor separates are merged, so there are at most as many epochs as distinct
//! cursors, and together they hold at most the union of the writes not yet seen by the
//! bitmap that is furthest behind: memory is bounded by one bitmap's worth per granularity.

use std::collections::BTreeMap;

use super::hbitmap::HBitmap;

/// The writes between two seals, one bitmap per log granularity in use.
#[derive(Debug)]
struct Epoch {
    seq: u64,
    layers: Vec<HBitmap>,
}

impl Epoch {
    fn merge_into(self, dst: &mut Epoch) {
        for mut h in self.layers {
            let g = h.granularity_bits();
            match dst.layers.iter_mut().find(|l| l.granularity_bits() == g) {
                Some(d) => {
                    // OR the smaller into the bigger (cost follows the smaller one).
                    if h.count() > d.count() {
                        std::mem::swap(d, &mut h);
                    }
                    d.merge_from(&h);
                }
                None => dst.layers.push(h),
            }
        }
    }
}

/// The epochs of a set, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Epochs {
    list: Vec<Epoch>,
    /// Sequence number of the open epoch (the one new writes go to, created on first write).
    next_seq: u64,
}

impl Epochs {
    /// The open epoch's bitmap at granularity `2^granularity_bits` over `size` bytes, created on demand.
    pub(crate) fn open_layer(&mut self, size: u64, granularity_bits: u32) -> &mut HBitmap {
        if self.list.last().is_none_or(|e| e.seq != self.next_seq) {
            self.list.push(Epoch {
                seq: self.next_seq,
                layers: Vec::new(),
            });
        }
        let e = self.list.last_mut().expect("pushed above");
        match e
            .layers
            .iter()
            .position(|l| l.granularity_bits() == granularity_bits)
        {
            Some(i) => &mut e.layers[i],
            None => {
                e.layers.push(HBitmap::new(size, granularity_bits));
                e.layers.last_mut().expect("pushed above")
            }
        }
    }

    /// Whether a bitmap whose cursor is `cursor` has nothing to take.
    #[inline]
    pub(crate) fn caught_up(&self, cursor: u64) -> bool {
        self.list.last().is_none_or(|e| e.seq < cursor)
    }

    /// The epoch bitmaps a bitmap with cursor `cursor` still needs.
    pub(crate) fn since(&self, cursor: u64) -> impl Iterator<Item = &HBitmap> {
        self.list
            .iter()
            .filter(move |e| e.seq >= cursor)
            .flat_map(|e| e.layers.iter())
    }

    /// Closes the open epoch (if it exists) and returns the cursor of a bitmap that has seen
    /// every write so far.
    pub(crate) fn seal(&mut self) -> u64 {
        if self.list.last().is_some_and(|e| e.seq == self.next_seq) {
            self.next_seq += 1;
        }
        self.next_seq
    }

    /// Drops the epochs older than every cursor in `cursors` (the cursors of the bitmaps that
    /// record writes, as keys) and merges neighbours no cursor separates. O(epochs · log
    /// cursors).
    pub(crate) fn compact<V>(&mut self, cursors: &BTreeMap<u64, V>) {
        let Some(&min) = cursors.keys().next() else {
            self.list.clear();
            return;
        };
        self.list.retain(|e| e.seq >= min);
        let mut out: Vec<Epoch> = Vec::with_capacity(self.list.len());
        for e in self.list.drain(..) {
            match out.last_mut() {
                // Unless some cursor c has prev.seq < c <= e.seq (a bitmap needs e but not
                // prev), nobody needs them apart.
                Some(prev) if cursors.range(prev.seq + 1..=e.seq).next().is_none() => {
                    e.merge_into(prev);
                }
                _ => out.push(e),
            }
        }
        self.list = out;
    }

    /// Drops every epoch.
    pub(crate) fn clear(&mut self) {
        self.list.clear();
    }

    /// Number of epochs held.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Bytes of heap the epochs hold.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.list
            .iter()
            .flat_map(|e| e.layers.iter())
            .map(HBitmap::heap_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursors(list: &[u64]) -> BTreeMap<u64, usize> {
        list.iter().map(|&c| (c, 1)).collect()
    }

    #[test]
    fn cursors_see_exactly_the_writes_after_them() {
        let mut e = Epochs::default();
        let size = 1 << 30;
        let a = e.seal();
        e.open_layer(size, 16).set(0, 1);
        let b = e.seal();
        e.open_layer(size, 16).set(1 << 20, 1);
        // count() is in bytes: granules of 64 KiB.
        let got = |e: &Epochs, c: u64| -> u64 { e.since(c).map(HBitmap::count).sum::<u64>() >> 16 };
        assert_eq!(got(&e, a), 2);
        assert_eq!(got(&e, b), 1);
        let c = e.seal();
        assert!(e.caught_up(c));
        assert!(!e.caught_up(b));
        // No cursor between the two epochs once b is gone: they merge into one.
        e.compact(&cursors(&[a]));
        assert_eq!(e.len(), 1);
        assert_eq!(got(&e, a), 2);
        // Nobody needs anything: everything goes.
        e.compact(&cursors(&[c]));
        assert_eq!(e.len(), 0);
        e.compact(&cursors(&[]));
        assert_eq!(e.heap_bytes(), 0);
    }

    #[test]
    fn separated_epochs_stay_apart() {
        let mut e = Epochs::default();
        let size = 1 << 30;
        let a = e.seal();
        e.open_layer(size, 16).set(0, 1);
        let b = e.seal();
        e.open_layer(size, 9).set(4096, 512);
        e.open_layer(size, 16).set(1 << 20, 1);
        e.compact(&cursors(&[a, b]));
        assert_eq!(e.len(), 2);
        assert_eq!(e.since(b).count(), 2);
        // count() is in bytes: two 64 KiB granules and one of 512 B.
        assert_eq!(e.since(a).map(HBitmap::count).sum::<u64>(), 2 * 65536 + 512);
    }
}
