//! The summary tower over chunk indices (`nonempty`, `notfull`).

/// A bit vector with "word non-zero" summary levels, for finding set bits fast.
#[derive(Clone, Default)]
pub(super) struct Tower {
    /// `levels[0]` is the bit vector; bit n of `levels[l + 1]` is set iff word n of `levels[l]`
    /// is non-zero. The last level has one word.
    pub(super) levels: Vec<Vec<u64>>,
}

impl Tower {
    /// `bits` bits, all clear (`ones` false) or all set.
    pub(super) fn new(bits: usize, ones: bool) -> Tower {
        let words = bits.div_ceil(64).max(1);
        let mut v = vec![0u64; words];
        if ones {
            v.fill(!0);
            if bits % 64 != 0 {
                v[words - 1] = (1u64 << (bits % 64)) - 1;
            }
            if bits == 0 {
                v[0] = 0;
            }
        }
        Tower::from_bits(v)
    }

    /// A tower over the given bottom level (at least one word).
    pub(super) fn from_bits(bits: Vec<u64>) -> Tower {
        let mut levels = vec![bits];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            let mut up = vec![0u64; last.len().div_ceil(64)];
            for (o, chunk) in up.iter_mut().zip(last.chunks(64)) {
                *o = chunk
                    .iter()
                    .enumerate()
                    .fold(0, |v, (i, &w)| v | (u64::from(w != 0) << i));
            }
            levels.push(up);
        }
        Tower { levels }
    }

    #[inline]
    pub(super) fn get(&self, idx: usize) -> bool {
        self.levels[0]
            .get(idx >> 6)
            .is_some_and(|w| (w >> (idx & 63)) & 1 != 0)
    }

    #[inline]
    pub(super) fn set(&mut self, mut idx: usize) {
        for level in &mut self.levels {
            let Some(word) = level.get_mut(idx >> 6) else {
                return;
            };
            let was = *word;
            *word |= 1u64 << (idx & 63);
            if was != 0 {
                return;
            }
            idx >>= 6;
        }
    }

    #[inline]
    pub(super) fn clear(&mut self, mut idx: usize) {
        for level in &mut self.levels {
            let Some(word) = level.get_mut(idx >> 6) else {
                return;
            };
            *word &= !(1u64 << (idx & 63));
            if *word != 0 {
                return;
            }
            idx >>= 6;
        }
    }

    /// First set bit >= `pos`.
    pub(super) fn find(&self, pos: usize) -> Option<usize> {
        let top = self.levels.len() - 1;
        let mut level = 0usize;
        let mut idx = pos;
        loop {
            let w = idx >> 6;
            let word = *self.levels[level].get(w)?;
            let bits = word & (!0u64 << (idx & 63));
            if bits != 0 {
                let mut found = (w << 6) | bits.trailing_zeros() as usize;
                while level > 0 {
                    level -= 1;
                    let word = *self.levels[level].get(found)?;
                    found = (found << 6) | word.trailing_zeros() as usize;
                }
                return Some(found);
            }
            if level == top {
                return None;
            }
            level += 1;
            idx = w + 1;
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.levels.capacity() * std::mem::size_of::<Vec<u64>>()
            + self.levels.iter().map(|l| l.capacity() * 8).sum::<usize>()
    }
}
