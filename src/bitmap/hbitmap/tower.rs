//! The summary tower over chunk indices (`nonempty`, `notfull`).
//!
//! The bit vector is kept in pages of [`PAGE_WORDS`] words, and a page whose bits are all
//! clear or all set holds no words: so the tower of a clean or fully dirty bitmap costs one
//! small enum per 4096 chunks plus its summaries (64 times smaller each), whatever the disk.
//! A vector of one page (up to 4096 chunks: 2^28 granules) always keeps its words, a few
//! hundred bytes at most, so that small bitmaps cost the same whatever their state.

/// log2 of the words per page.
const PAGE_WORD_BITS: u32 = 6;
/// Words per page (4096 bits).
const PAGE_WORDS: usize = 1 << PAGE_WORD_BITS;
/// Bits per page.
const PAGE_BITS: usize = PAGE_WORDS * 64;

/// The words of a page (the last one may be shorter) and its number of set bits.
#[derive(Clone)]
struct Words {
    words: Box<[u64]>,
    ones: u32,
}

/// A page of the bit vector.
#[derive(Clone)]
enum Page {
    Zeros,
    /// Every bit set (only a page entirely inside the vector).
    Ones,
    Words(Words),
}

/// A bit vector with "word non-zero" summary levels, for finding set bits fast.
#[derive(Clone, Default)]
pub(super) struct Tower {
    /// Number of bits.
    bits: usize,
    /// The bit vector, in pages.
    pages: Box<[Page]>,
    /// `upper[0]` bit n is set iff word n of the bit vector is non-zero; bit n of
    /// `upper[l + 1]` iff word n of `upper[l]` is. The last level has one word.
    upper: Box<[Vec<u64>]>,
}

/// The summary levels over `words` words whose non-zero flags `nonzero(w)` gives.
fn summaries(words: usize, nonzero: impl Fn(usize) -> bool) -> Vec<Vec<u64>> {
    let mut upper = Vec::new();
    if words <= 1 {
        return upper;
    }
    let mut first = vec![0u64; words.div_ceil(64)];
    for w in 0..words {
        if nonzero(w) {
            first[w >> 6] |= 1 << (w & 63);
        }
    }
    upper.push(first);
    while let Some(last) = upper.last().filter(|l| l.len() > 1) {
        let mut up = vec![0u64; last.len().div_ceil(64)];
        for (i, &w) in last.iter().enumerate() {
            if w != 0 {
                up[i >> 6] |= 1 << (i & 63);
            }
        }
        upper.push(up);
    }
    upper
}

impl Tower {
    /// `bits` bits, all clear (`ones` false) or all set.
    pub(super) fn new(bits: usize, ones: bool) -> Tower {
        let words = bits.div_ceil(64).max(1);
        let npages = words.div_ceil(PAGE_WORDS);
        let pages = (0..npages)
            .map(|p| {
                let n = (words - p * PAGE_WORDS).min(PAGE_WORDS);
                let whole = n == PAGE_WORDS && bits >= (p + 1) * PAGE_BITS;
                if npages > 1 && (!ones || whole) {
                    // Clean, or a whole page all set.
                    if ones {
                        Page::Ones
                    } else {
                        Page::Zeros
                    }
                } else {
                    let mut v = vec![0u64; n];
                    if ones {
                        for (k, w) in v.iter_mut().enumerate() {
                            let first = p * PAGE_BITS + k * 64;
                            *w = match bits.saturating_sub(first) {
                                0 => 0,
                                r if r >= 64 => !0,
                                r => (1u64 << r) - 1,
                            };
                        }
                    }
                    Self::page_of(v, npages)
                }
            })
            .collect();
        let mut t = Tower {
            bits,
            pages,
            upper: Box::default(),
        };
        t.upper = summaries(words, |w| t.word(w) != 0).into_boxed_slice();
        t
    }

    /// A page from its words (fewer than [`PAGE_WORDS`] for a partial last page), uniform
    /// when it can be in a vector of `npages` pages.
    fn page_of(words: Vec<u64>, npages: usize) -> Page {
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        if npages > 1 && ones == 0 {
            Page::Zeros
        } else if npages > 1 && ones as usize == PAGE_BITS {
            Page::Ones
        } else {
            Page::Words(Words {
                words: words.into_boxed_slice(),
                ones,
            })
        }
    }

    /// A tower over the given bit vector (`bits` bits; at least one word).
    pub(super) fn from_bits(bits: usize, v: &[u64]) -> Tower {
        let npages = v.len().div_ceil(PAGE_WORDS);
        let pages = v
            .chunks(PAGE_WORDS)
            .map(|c| Self::page_of(c.to_vec(), npages))
            .collect();
        let mut t = Tower {
            bits,
            pages,
            upper: Box::default(),
        };
        t.upper = summaries(v.len().max(1), |w| t.word(w) != 0).into_boxed_slice();
        t
    }

    /// The bit vector as words (`bits.div_ceil(64)`, at least one).
    pub(super) fn to_bits(&self) -> Vec<u64> {
        (0..self.bits.div_ceil(64).max(1))
            .map(|w| self.word(w))
            .collect()
    }

    /// Word `w` of the bit vector.
    #[inline]
    fn word(&self, w: usize) -> u64 {
        match self.pages.get(w >> PAGE_WORD_BITS) {
            Some(Page::Words(p)) => p.words.get(w & (PAGE_WORDS - 1)).copied().unwrap_or(0),
            Some(Page::Ones) => !0,
            Some(Page::Zeros) | None => 0,
        }
    }

    /// Word `w` of level `level` (0: the bit vector).
    #[inline]
    fn level_word(&self, level: usize, w: usize) -> Option<u64> {
        if level == 0 {
            (w < self.bits.div_ceil(64).max(1)).then(|| self.word(w))
        } else {
            self.upper[level - 1].get(w).copied()
        }
    }

    #[inline]
    pub(super) fn get(&self, idx: usize) -> bool {
        idx < self.bits && (self.word(idx >> 6) >> (idx & 63)) & 1 != 0
    }

    /// The words of the page holding bit `idx`, made explicit (a uniform page is filled; it
    /// is always a whole page).
    fn words_mut(&mut self, idx: usize) -> &mut Words {
        let page = &mut self.pages[idx / PAGE_BITS];
        if !matches!(page, Page::Words(_)) {
            let ones = matches!(page, Page::Ones);
            *page = Page::Words(Words {
                words: vec![if ones { !0 } else { 0 }; PAGE_WORDS].into_boxed_slice(),
                ones: if ones { PAGE_BITS as u32 } else { 0 },
            });
        }
        match page {
            Page::Words(w) => w,
            _ => unreachable!("made explicit above"),
        }
    }

    /// Sets bit `idx` (ignored past the end).
    #[inline]
    pub(super) fn set(&mut self, idx: usize) {
        if idx >= self.bits || matches!(self.pages[idx / PAGE_BITS], Page::Ones) {
            return;
        }
        let p = self.words_mut(idx);
        let word = &mut p.words[(idx >> 6) & (PAGE_WORDS - 1)];
        let was = *word;
        *word |= 1u64 << (idx & 63);
        if *word == was {
            return;
        }
        p.ones += 1;
        if p.ones as usize == PAGE_BITS && self.pages.len() > 1 {
            self.pages[idx / PAGE_BITS] = Page::Ones;
        }
        if was != 0 {
            return;
        }
        let mut i = idx >> 6;
        for level in self.upper.iter_mut() {
            let word = &mut level[i >> 6];
            let was = *word;
            *word |= 1u64 << (i & 63);
            if was != 0 {
                return;
            }
            i >>= 6;
        }
    }

    /// Clears bit `idx` (ignored past the end).
    #[inline]
    pub(super) fn clear(&mut self, idx: usize) {
        if idx >= self.bits || matches!(self.pages[idx / PAGE_BITS], Page::Zeros) {
            return;
        }
        let p = self.words_mut(idx);
        let word = &mut p.words[(idx >> 6) & (PAGE_WORDS - 1)];
        let was = *word;
        *word &= !(1u64 << (idx & 63));
        if *word == was {
            return;
        }
        let now = *word;
        p.ones -= 1;
        if p.ones == 0 && self.pages.len() > 1 {
            self.pages[idx / PAGE_BITS] = Page::Zeros;
        }
        if now != 0 {
            return;
        }
        let mut i = idx >> 6;
        for level in self.upper.iter_mut() {
            let word = &mut level[i >> 6];
            *word &= !(1u64 << (i & 63));
            if *word != 0 {
                return;
            }
            i >>= 6;
        }
    }

    /// First set bit >= `pos`.
    pub(super) fn find(&self, pos: usize) -> Option<usize> {
        let top = self.upper.len();
        let mut level = 0usize;
        let mut idx = pos;
        loop {
            let w = idx >> 6;
            let word = self.level_word(level, w)?;
            let bits = word & (!0u64 << (idx & 63));
            if bits != 0 {
                let mut found = (w << 6) | bits.trailing_zeros() as usize;
                while level > 0 {
                    level -= 1;
                    let word = self.level_word(level, found)?;
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
        self.pages.len() * std::mem::size_of::<Page>()
            + self
                .pages
                .iter()
                .map(|p| match p {
                    Page::Words(w) => w.words.len() * 8,
                    _ => 0,
                })
                .sum::<usize>()
            + self.upper.len() * std::mem::size_of::<Vec<u64>>()
            + self.upper.iter().map(|l| l.capacity() * 8).sum::<usize>()
    }

    /// The levels above the bit vector (tests: compared with a fresh build).
    #[cfg(test)]
    pub(super) fn summary_levels(&self) -> &[Vec<u64>] {
        &self.upper
    }

    /// Whether every page holding words holds both set and clear bits, with its count right
    /// (tests).
    #[cfg(test)]
    pub(super) fn pages_canonical(&self) -> bool {
        let many = self.pages.len() > 1;
        self.pages.iter().all(|p| match p {
            Page::Words(w) => {
                let ones: u32 = w.words.iter().map(|x| x.count_ones()).sum();
                ones == w.ones && (!many || (ones > 0 && (ones as usize) < PAGE_BITS))
            }
            _ => many,
        })
    }
}
