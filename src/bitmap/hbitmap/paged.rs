//! A chunk table that costs memory only where chunks have storage: slots in pages of
//! [`PAGE_SLOTS`], a page allocated with its first occupant and freed with its last, and the
//! page directory itself allocated with the first page and freed with the last. So a clean or
//! fully dirty bitmap of any size holds no table at all, and a bitmap whose dirt was cleared
//! gives its table back.

/// log2 of the slots per page.
const PAGE_BITS: u32 = 9;
/// Slots per page (one 4 KiB page of pointers).
const PAGE_SLOTS: usize = 1 << PAGE_BITS;

/// One page of slots and the number of them in use.
#[derive(Clone)]
struct Page<T> {
    slots: [Option<Box<T>>; PAGE_SLOTS],
    live: u32,
}

/// Optional boxed values for the indices `0..len`, paged (module documentation).
#[derive(Clone)]
pub(super) struct Paged<T> {
    /// Empty while no slot is in use; else `len.div_ceil(PAGE_SLOTS)` pages.
    pages: Vec<Option<Box<Page<T>>>>,
    /// Number of indices (at most 2^25 chunks: `MAX_GRANULES` / `CHUNK_GRANULES`).
    len: u32,
    /// Slots in use.
    live: u32,
}

impl<T> Paged<T> {
    /// A table of `len` empty slots (no memory).
    pub(super) fn new(len: usize) -> Self {
        Paged {
            pages: Vec::new(),
            len: u32::try_from(len).expect("at most 2^25 chunks"),
            live: 0,
        }
    }

    /// Number of indices.
    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// Slots in use.
    pub(super) fn live(&self) -> usize {
        self.live as usize
    }

    /// The value at `i` (None when empty or `i` >= len).
    #[inline]
    pub(super) fn get(&self, i: usize) -> Option<&T> {
        self.pages.get(i >> PAGE_BITS)?.as_ref()?.slots[i & (PAGE_SLOTS - 1)].as_deref()
    }

    #[inline]
    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.pages.get_mut(i >> PAGE_BITS)?.as_mut()?.slots[i & (PAGE_SLOTS - 1)].as_deref_mut()
    }

    /// Whether slot `i` holds a value.
    #[inline]
    pub(super) fn is_some(&self, i: usize) -> bool {
        self.get(i).is_some()
    }

    /// Takes the value at `i` out, freeing its page (and the directory) when it was the last.
    pub(super) fn take(&mut self, i: usize) -> Option<Box<T>> {
        let p = i >> PAGE_BITS;
        let page = self.pages.get_mut(p)?.as_mut()?;
        let v = page.slots[i & (PAGE_SLOTS - 1)].take()?;
        page.live -= 1;
        self.live -= 1;
        if page.live == 0 {
            self.pages[p] = None;
            if self.live == 0 {
                self.pages = Vec::new();
            }
        }
        Some(v)
    }

    /// Puts `v` at `i` (< len), returning the value it replaces.
    pub(super) fn put(&mut self, i: usize, v: Box<T>) -> Option<Box<T>> {
        assert!(i < self.len(), "slot {i} of a table of {}", self.len);
        if self.pages.is_empty() {
            self.pages
                .resize_with(self.len().div_ceil(PAGE_SLOTS), || None);
        }
        let page = self.pages[i >> PAGE_BITS].get_or_insert_with(|| {
            Box::new(Page {
                slots: std::array::from_fn(|_| None),
                live: 0,
            })
        });
        let old = page.slots[i & (PAGE_SLOTS - 1)].replace(v);
        if old.is_none() {
            page.live += 1;
            self.live += 1;
        }
        old
    }

    /// Empties every slot and frees everything.
    pub(super) fn clear(&mut self) {
        self.pages = Vec::new();
        self.live = 0;
    }

    /// Changes the number of indices; the slots at `len` and beyond are dropped.
    pub(super) fn resize(&mut self, len: usize) {
        for i in len..self.len().min(self.pages.len() * PAGE_SLOTS) {
            if self.pages.get(i >> PAGE_BITS).is_some_and(Option::is_some) {
                self.take(i);
            }
        }
        self.len = u32::try_from(len).expect("at most 2^25 chunks");
        if !self.pages.is_empty() {
            self.pages.resize_with(len.div_ceil(PAGE_SLOTS), || None);
            self.pages.shrink_to_fit();
        }
    }

    /// The slots in use, by index, in ascending order (empty pages skipped).
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(p, page)| page.as_ref().map(|page| (p, page)))
            .flat_map(|(p, page)| {
                page.slots
                    .iter()
                    .enumerate()
                    .filter_map(move |(k, s)| s.as_deref().map(|v| ((p << PAGE_BITS) | k, v)))
            })
    }

    /// Heap bytes of the directory and the pages (the values' own memory not included).
    pub(super) fn heap_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<Option<Box<Page<T>>>>()
            + self.pages.iter().flatten().count() * std::mem::size_of::<Page<T>>()
    }
}
