//! Change tracking for the incremental store: [`Touched`] records which data clusters (table
//! entries) of a bitmap's stored copy changed since it was loaded or last stored.

/// Which data clusters of the stored copy changed: one bit per table index.
#[derive(Clone, Debug)]
pub(crate) struct Touched {
    /// log2 of the disk bytes one data cluster covers (8 · cluster size · granularity).
    pub(crate) shift: u32,
    /// The table the tracking is relative to.
    pub(crate) base: u64,
    /// Everything changed (restore, clear with backup, raw engine access).
    pub(crate) all: bool,
    words: Vec<u64>,
    count: u64,
}

impl Touched {
    pub(crate) fn new(shift: u32, base: u64) -> Touched {
        Touched {
            shift: shift.min(63),
            base,
            all: false,
            words: Vec::new(),
            count: 0,
        }
    }

    pub(crate) fn touch(&mut self, offset: u64, bytes: u64) {
        if bytes == 0 || self.all {
            return;
        }
        let first = offset >> self.shift;
        let last = offset.saturating_add(bytes - 1) >> self.shift;
        for i in first..=last {
            self.touch_index(i);
        }
    }

    pub(crate) fn touch_index(&mut self, i: u64) {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let m = 1u64 << (i % 64);
        if self.words[w] & m == 0 {
            self.words[w] |= m;
            self.count += 1;
        }
    }

    /// Whether table entry `i` changed.
    pub(crate) fn is_touched(&self, i: u64) -> bool {
        self.all
            || self
                .words
                .get((i / 64) as usize)
                .is_some_and(|w| w >> (i % 64) & 1 != 0)
    }

    /// Whether nothing changed.
    pub(crate) fn is_clean(&self) -> bool {
        !self.all && self.count == 0
    }

    /// Number of changed entries (`all` not counted).
    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}
