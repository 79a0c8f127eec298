//! The lock-free write log: the guest write hook's fast path.
//!
//! QEMU's `bdrv_set_dirty` takes the node's mutex and sets the range in every enabled bitmap,
//! so a write costs O(number of enabled bitmaps) and serialises the I/O threads. qdirty's hook
//! instead sets the range once, with atomic word operations and no lock, in a [`WriteLog`]
//! shared (through an `Arc`) by the [`BitmapSet`](super::BitmapSet) and every writer. Under
//! exclusive access, [`BitmapSet::absorb`](super::BitmapSet::absorb) takes the pending words
//! out of the log (`swap(0)`) into the set, which applies them to every bitmap that records
//! writes at that moment. The set absorbs at the top of every `&mut` method, and the C ABI
//! right after taking the image lock, so every operation sees the writes that completed before
//! it and none that started after it (QEMU's ordering).
//!
//! # Layout
//!
//! The log records writes at its *base granularity*: the smallest granularity among the set's
//! bitmaps (inconsistent ones excepted), kept up to date by the set whenever a bitmap appears
//! or goes away. A log bit at the base granularity maps exactly onto the granules of any bitmap
//! with a granularity at least as coarse (powers of two, aligned), so the absorb rounds outward
//! exactly as QEMU's hook does. A writer may still hold an older base granularity while the set
//! changes it; the log therefore keeps one *layer* per granularity (512 B .. 2 GiB) and drains
//! them all. Bits of a layer coarser than a bitmap can only come from a write that read the
//! base granularity before that bitmap existed, i.e. a write concurrent with its creation: the set skips that bitmap for them,
//! which is one of the two outcomes QEMU allows for a concurrent write.
//!
//! A layer addresses up to 2^41 bits (QEMU's maximum number of granules) through a radix tree
//! of lazily allocated pieces ([`AtomicBox`]: one compare-and-swap installs a piece, a loser
//! frees its own): *leaves* of 64 words (4096 bits, 512 B: 2 MiB of disk at 512 B, 256 MiB at
//! 64 KiB), *mids* of 4096 leaf pointers (2^24 bits: 8 GiB of disk at 512 B, 1 TiB at 64 KiB),
//! *tops* of 4096 mid pointers (2^36 bits), and in the layer 32 top pointers. The layer also
//! holds its first mid (*near*) directly, so the hook's common case reads three pointers in a
//! row from the log: the near mid, the leaf, the word. Memory follows the distinct words
//! written: 512 B per leaf touched, plus 36 KiB per mid and per top touched.
//!
//! Each node keeps a "pending" bitmap of its children (one word per 64 children, on a cache
//! line of its own beside their pointers, never on the lines of pointers every writer reads),
//! each layer one word for its tops, and the log one word with bit l for layer l's near mid
//! and bit 32 + l for its tops. So absorbing an empty log is two loads (that word, and whether
//! retired pieces wait: below) and absorbing a sparse log costs O(pending leaves); a leaf's 64 words
//! are scanned.
//!
//! # Whole pieces
//!
//! A write that covers a child of a node entirely (a whole leaf of a mid, a whole mid of a
//! top) is recorded as a *full* bit of that child in its group, on the pending word's line,
//! without allocating or touching the child; a write that covers the near mid or a whole top
//! sets a bit of the layer's own full word. So a range costs in proportion to the pieces it
//! covers at the coarsest level that fits, at most two partial children per level and 64
//! children per atomic operation: one write over a whole 1 TiB disk at 512 B sets a few
//! words. A drain that takes a node's pending word takes its full word right after and hands
//! each full child to the absorb as one run of whole words, which the epoch sets in whole
//! chunks.
//!
//! # Giving memory back
//!
//! When the pieces hold more than [`RETAIN_BYTES`] after a drain, and the drain took fewer
//! than one non-zero word per [`KEEP_BYTES_PER_WORD`] bytes of pieces (a log written densely
//! between absorbs keeps its pieces, which the next writes would allocate again at once; the
//! next absorb drains it even when nothing is pending, and gives them back if that period
//! wrote sparsely or not at all), the drain unlinks every
//! piece (each layer's near mid and tops: their pointers become null, and the next write
//! allocates afresh) and frees them once no writer can still hold them, by quiescent-state
//! reclamation (src/qsbr.rs): every writer is inside a [`Guard`] while it follows the log's
//! pointers (a plain store to a thread-local slot on entry and on exit), and the drain calls
//! membarrier(2) and waits, at most [`qsbr::GRACE_WAIT`], until each writer that was inside
//! has left. It then drains the unlinked pieces a last time (writers that held them may have
//! written to them after the first drain) and frees them. Pieces whose writers have not left
//! in time stay in a limbo list: every later drain drains them too (a write that completed
//! before an operation may sit in one) and frees them at its own grace period. So right after
//! an absorb the log holds at most [`RETAIN_BYTES`] of pieces, or [`KEEP_BYTES_PER_WORD`] per
//! word that absorb took, plus what writers allocated meanwhile or still hold. Without membarrier (not Linux, Linux before 4.14, or a seccomp
//! filter refusing it) pieces are never unlinked and stay until the log is dropped.
//!
//! # Ordering argument
//!
//! Writer: `fetch_or` the data word (skipped when its bits are already set), or the full bit of
//! a whole child (likewise), then for each pending level bottom-up: load, and `fetch_or` the
//! bit if it is clear. ([`WriteLog::set`]
//! first tries a straight-line path for a range within one word of an allocated near leaf;
//! it performs exactly these operations in this order, and gives up to the general path,
//! which allocates what is missing, before changing anything.) Drainer: `swap(0)` each
//! pending level top-down, descending only where bits were taken, then load each word of a
//! leaf and `swap(0)` the non-zero ones. All these operations are `SeqCst`, so they are
//! totally ordered: if the drainer's swap of a pending bit comes after the writer's check of
//! it, the drainer descends and its later load and swap of the data word see the writer's
//! bits; otherwise the writer's checks come after the drainer cleared those bits and the
//! writer sets them again, for the next drain. No bit is lost. A writer that skipped the data
//! word saw its bits set: only a drainer's swap removes them, and that swap applies them, so
//! the argument holds for them as for bits it set itself. Full bits follow the same argument
//! one level up: the drainer swaps a group's full word after its pending word (and the
//! layer's full word after the log's pending word), and applies every full bit it takes,
//! whether or not it took that child's pending bit; a full bit it missed has its pending bit
//! set again after that swap, for the next drain. On x86-64 the writer's loads are
//! plain loads and only the data word (and, rarely, a clear pending bit) costs a locked
//! instruction; two threads share no written cache line unless they write near each other.
//!
//! Unlinking does not change this: a writer sets its bits in a piece it reached, linked or
//! unlinked, and every piece is drained while it is linked and, once unlinked, at every drain
//! until it is freed, the last time after the grace period, when no writer can reach it any
//! more (qsbr.rs gives that argument). A piece is freed only after that last drain. A writer
//! that finds a pointer null allocates a new piece, drained as any other.
//!
//! A write concurrent with a drain may be split by it at word boundaries (64 log granules):
//! each granule it marks is applied either before or after the concurrent operation, never
//! lost and never at a wrong place. A write that completed before an operation started is
//! entirely applied before it; one that starts after the operation ended is not applied
//! before it.
//!
//! The disk size used for clamping is an atomic: [`BitmapSet::truncate`](super::BitmapSet)
//! absorbs, resizes, then publishes the new size. A writer racing with a shrink may log bits
//! past the new end; the set clamps them to its size, and the tree bounds every index, so
//! nothing is ever written out of bounds.

use std::fmt;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::{Mutex, PoisonError};

use crate::qsbr::{self, AtomicBox, Guard, Limbo, Owner, Pages};

/// log2 of the words in a leaf.
const LEAF_WORDS_BITS: u32 = 6;
/// Words of log bits per leaf (64: 4096 bits, 512 B).
const LEAF_WORDS: usize = 1 << LEAF_WORDS_BITS;
/// log2 of the children of a node (mid or top).
const NODE_BITS: u32 = 12;
/// Children per node.
const NODE_SLOTS: usize = 1 << NODE_BITS;
/// Children per pending word of a node.
const GROUP_SLOTS: usize = 64;
/// log2 of the words under a mid.
const MID_WORDS_BITS: u32 = LEAF_WORDS_BITS + NODE_BITS;
/// log2 of the words under a top.
const TOP_WORDS_BITS: u32 = MID_WORDS_BITS + NODE_BITS;
/// log2 of the words of a layer: 2^41 bits, QEMU's maximum number of granules.
const LAYER_WORDS_BITS: u32 = 41 - 6;
/// Tops per layer.
const LAYER_TOPS: usize = 1 << (LAYER_WORDS_BITS - TOP_WORDS_BITS);
/// Smallest layer granularity (log2 of 512 B).
const MIN_GRANULARITY_BITS: u32 = 9;
/// Layers: granularities 2^9 .. 2^31.
const LAYERS: usize = 23;
/// The base granularity when the set has no bitmap: the hook returns at once.
const NO_BASE_GRANULARITY: u32 = u32::MAX;
/// In [`WriteLog::pending`], bit `l` is layer `l`'s near mid, bit `FAR_BIT + l` its tops.
const FAR_BIT: usize = 32;
/// Bytes of pieces a drain leaves in place (it unlinks and frees them all above this): so a
/// log written a little between absorbs keeps its pieces, and one written much gives them
/// back.
pub(crate) const RETAIN_BYTES: usize = 256 << 10;
/// Bytes of pieces each word a drain takes lets the log keep: a drain that takes at least one
/// non-zero word per this many bytes of pieces (one word in eight of the leaves, the nodes
/// counted) leaves them in place, whatever their size. Such a log is written densely between
/// absorbs (a host calling every millisecond while the guest writes): giving the pieces back
/// would only have the next writes allocate them again. Its memory stays within this many
/// bytes per word of the last drain, and the next drain that takes fewer words (an idle
/// period among them) gives the pieces back.
pub(crate) const KEEP_BYTES_PER_WORD: usize = 64;

/// A leaf: 64 words of log bits.
type Leaf = [AtomicU64; LEAF_WORDS];

/// A group's pending and full words, alone on their cache line.
#[repr(align(64))]
struct Pending {
    /// Bit i: child i may hold bits, or be full.
    bits: AtomicU64,
    /// Bit i: child i is entirely written (whatever it holds, and whether it exists or not).
    full: AtomicU64,
}

/// A piece of the log: how it is made and held.
trait Piece: Sized {
    /// What holds it: a leaf is a heap block, a node (36 KiB) a mapping of its own, so that
    /// nodes freed after every absorb leave no holes in the C allocator's heap (src/qsbr.rs,
    /// 'Pieces in pages of their own').
    type Own: Owner<Target = Self>;
    /// A new, empty piece.
    fn make() -> Self::Own;
}

/// Where a node keeps a child.
type Cell<C> = AtomicBox<C, <C as Piece>::Own>;

/// 64 children of a node and their pending and full words.
struct Group<C: Piece> {
    pending: Pending,
    children: [Cell<C>; GROUP_SLOTS],
}

/// A node of 4096 children, one allocation.
type Node<C> = [Group<C>; NODE_SLOTS / GROUP_SLOTS];

/// Leaves of 2^18 words.
type Mid = Node<Leaf>;

/// Mids of 2^30 words.
type Top = Node<Mid>;

/// Bytes of a leaf.
const LEAF_BYTES: usize = std::mem::size_of::<Leaf>();
/// Bytes of a mid or a top.
const NODE_BYTES: usize = std::mem::size_of::<Mid>();

impl Piece for Leaf {
    type Own = Box<Leaf>;
    fn make() -> Box<Leaf> {
        Box::new([const { AtomicU64::new(0) }; LEAF_WORDS])
    }
}

impl<C: Piece> Piece for Node<C> {
    type Own = Pages<Node<C>>;
    /// Built group by group in its pages (no large temporary on the stack, where a writer's
    /// thread may have little).
    fn make() -> Pages<Node<C>> {
        Pages::from_fn(|_| Group {
            pending: Pending {
                bits: AtomicU64::new(0),
                full: AtomicU64::new(0),
            },
            children: std::array::from_fn(|_| AtomicBox::new()),
        })
    }
}

/// Child `i` of a node, its pending word and bit.
#[inline(always)]
fn child<C: Piece>(node: &Node<C>, i: usize) -> (&Cell<C>, &AtomicU64, u64) {
    let i = i & (NODE_SLOTS - 1);
    let g = &node[i / GROUP_SLOTS];
    (
        &g.children[i % GROUP_SLOTS],
        &g.pending.bits,
        1 << (i % GROUP_SLOTS),
    )
}

/// The bits `lo..=hi` of a word.
#[inline(always)]
fn span(lo: u64, hi: u64) -> u64 {
    (!0u64 << lo) & (!0u64 >> (63 - hi))
}

/// Sets `bits` in a pending word unless they are set already (a load first: no cache-line
/// ping-pong between writers once they are set).
#[inline(always)]
fn mark(word: &AtomicU64, bits: u64) {
    if word.load(SeqCst) & bits != bits {
        word.fetch_or(bits, SeqCst);
    }
}

/// The piece in `cell`, allocated and installed if missing (its bytes counted in `bytes`,
/// before the guard ends: a drainer frees it, and uncounts it, only after that).
#[inline]
fn install<'a, C: Piece>(cell: &'a Cell<C>, guard: &'a Guard, bytes: &AtomicUsize) -> &'a C {
    let (piece, made) = cell.get_or_init(guard, C::make);
    if made {
        bytes.fetch_add(std::mem::size_of::<C>(), Relaxed);
    }
    piece
}

/// The whole words `a..=b` of a mid whose first word is `base`: whole leaves get their full
/// bits, the words of a leaf covered in part are set one by one (at most 63 at each end).
fn or_mid_words(mid: &Mid, guard: &Guard, base: u64, a: u64, b: u64, bytes: &AtomicUsize) {
    or_node_words(mid, base, LEAF_WORDS_BITS, a, b, |cell, l, h, leaf_base| {
        let leaf = install(cell, guard, bytes);
        for w in l..=h {
            mark(&leaf[(w - leaf_base) as usize], !0);
        }
    });
}

/// Word `w` (relative to the mid) |= mask, then the leaf's bit in the mid.
fn or_in(mid: &Mid, guard: &Guard, w: u64, mask: u64, bytes: &AtomicUsize) {
    let (cell, pending, bit) = child(mid, (w >> LEAF_WORDS_BITS) as usize);
    let leaf = install(cell, guard, bytes);
    mark(&leaf[w as usize & (LEAF_WORDS - 1)], mask);
    mark(pending, bit);
}

/// What a drain hands over: `f(first word, number of words, bits)`, each of the words holding
/// `bits` (all ones when there are several: a whole piece).
trait Sink: FnMut(u64, u64, u64) {}
impl<F: FnMut(u64, u64, u64)> Sink for F {}

/// Takes every non-zero word of a leaf (swap(0)), `base` the index of its first word.
fn drain_leaf(leaf: &Leaf, base: u64, f: &mut impl Sink) {
    for (i, word) in leaf.iter().enumerate() {
        if word.load(SeqCst) != 0 {
            let bits = word.swap(0, SeqCst);
            if bits != 0 {
                f(base + i as u64, 1, bits);
            }
        }
    }
}

/// What a drain of a node finds: a child entirely written, or a child that may hold bits.
enum Found<'a, C> {
    Full(usize),
    Child(&'a C, usize),
}

/// Takes the pending bits of a node (swap(0)), then its full bits (swap(0), after: see the
/// ordering argument), and calls `each` with every full child and every existing child the
/// pending bits name.
fn drain_node<'a, C: Piece>(
    node: &'a Node<C>,
    guard: &'a Guard,
    mut each: impl FnMut(Found<'a, C>),
) {
    for (gi, group) in node.iter().enumerate() {
        if group.pending.bits.load(SeqCst) == 0 {
            continue;
        }
        let mut taken = group.pending.bits.swap(0, SeqCst);
        if group.pending.full.load(SeqCst) != 0 {
            let mut full = group.pending.full.swap(0, SeqCst);
            while full != 0 {
                let s = full.trailing_zeros() as usize;
                full &= full - 1;
                each(Found::Full(gi * GROUP_SLOTS + s));
            }
        }
        while taken != 0 {
            let s = taken.trailing_zeros() as usize;
            taken &= taken - 1;
            if let Some(c) = group.children[s].get(guard) {
                each(Found::Child(c, gi * GROUP_SLOTS + s));
            }
        }
    }
}

/// The pending words of a mid whose first word is `base`.
fn drain_mid(mid: &Mid, guard: &Guard, base: u64, f: &mut impl Sink) {
    drain_node(mid, guard, |found| match found {
        Found::Full(i) => f(
            base + ((i as u64) << LEAF_WORDS_BITS),
            LEAF_WORDS as u64,
            !0,
        ),
        Found::Child(leaf, i) => drain_leaf(leaf, base + ((i as u64) << LEAF_WORDS_BITS), f),
    });
}

/// The pending words of a top whose first word is `base`.
fn drain_top(top: &Top, guard: &Guard, base: u64, f: &mut impl Sink) {
    drain_node(top, guard, |found| match found {
        Found::Full(i) => f(
            base + ((i as u64) << MID_WORDS_BITS),
            1 << MID_WORDS_BITS,
            !0,
        ),
        Found::Child(mid, i) => drain_mid(mid, guard, base + ((i as u64) << MID_WORDS_BITS), f),
    });
}

/// Sets the whole words `a..=b` under `node`, whose first word is `base` and whose children
/// span `2^child_bits` words each: a child covered entirely gets its full bit (64 children
/// per atomic operation); a child covered in part is handed to `partial(cell, first word,
/// last word, the child's first word)`, which writes into it; then the pending bits of every
/// child touched. `a..=b` lies within the node.
fn or_node_words<C: Piece>(
    node: &Node<C>,
    base: u64,
    child_bits: u32,
    a: u64,
    b: u64,
    mut partial: impl FnMut(&Cell<C>, u64, u64, u64),
) {
    let start = |c: u64| base + (c << child_bits);
    let end = |c: u64| start(c) + (1 << child_bits) - 1;
    let (c0, c1) = ((a - base) >> child_bits, (b - base) >> child_bits);
    // The first and the last child may be covered in part; those between are whole.
    let (mut first_whole, mut last_whole) = (c0, c1);
    if a != start(c0) || b < end(c0) {
        let (cell, pending, bit) = child(node, c0 as usize);
        partial(cell, a, b.min(end(c0)), start(c0));
        mark(pending, bit);
        first_whole = c0 + 1;
    }
    if c1 > c0 && b != end(c1) {
        let (cell, pending, bit) = child(node, c1 as usize);
        partial(cell, start(c1), b, start(c1));
        mark(pending, bit);
        last_whole = c1 - 1;
    }
    let mut c = first_whole;
    while c <= last_whole && c <= c1 {
        let gi = c as usize / GROUP_SLOTS;
        let group_end = last_whole.min((gi as u64 + 1) * GROUP_SLOTS as u64 - 1);
        let bits = span(c % GROUP_SLOTS as u64, group_end % GROUP_SLOTS as u64);
        let p = &node[gi].pending;
        mark(&p.full, bits);
        mark(&p.bits, bits);
        c = group_end + 1;
    }
}

/// Bytes of a mid and its leaves.
fn mid_bytes(mid: &mut Mid) -> usize {
    let leaves = mid
        .iter_mut()
        .flat_map(|g| g.children.iter_mut())
        .filter_map(AtomicBox::get_mut)
        .count();
    NODE_BYTES + leaves * LEAF_BYTES
}

/// Bytes of a top and everything under it.
fn top_bytes(top: &mut Top) -> usize {
    NODE_BYTES
        + top
            .iter_mut()
            .flat_map(|g| g.children.iter_mut())
            .filter_map(AtomicBox::get_mut)
            .map(mid_bytes)
            .sum::<usize>()
}

/// The log bits at one granularity, inline in the log: a writer reaches the first 2^24 bits
/// (8 GiB of disk at 512 B, 1 TiB at 64 KiB) in three dependent loads from the log (the near
/// mid, the leaf, the word), the rest through a top.
#[repr(align(64))]
struct Layer {
    /// Words `[0, 2^18)`.
    near: Cell<Mid>,
    /// Words `[2^30 t, 2^30 (t + 1))`, mids past the first (top 0's mid 0 is `near`).
    tops: [Cell<Top>; LAYER_TOPS],
    /// Bit t: top t may hold bits.
    far_pending: AtomicU64,
    /// Bit t: top t is entirely written; bit [`NEAR_FULL`]: the near mid is.
    full: AtomicU64,
}

/// In a layer's full word, the bit of the near mid.
const NEAR_FULL: u64 = 1 << 32;
/// Words of the near mid.
const NEAR_WORDS: u64 = 1 << MID_WORDS_BITS;

/// What a retired piece was: its layer and, for a top, its index.
fn tag(layer: usize, index: usize) -> u64 {
    layer as u64 | (index as u64) << 8
}

/// The granularity (log2) and first word of a retired top or mid from its tag.
fn untag(tag: u64, words_bits: u32) -> (u32, u64) {
    (
        (tag & 0xff) as u32 + MIN_GRANULARITY_BITS,
        (tag >> 8) << words_bits,
    )
}

impl Layer {
    fn new() -> Self {
        Layer {
            near: AtomicBox::new(),
            tops: std::array::from_fn(|_| AtomicBox::new()),
            far_pending: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    /// Sets the whole words `a..=b` (module documentation, 'Whole pieces'); returns the log's
    /// pending bits for the parts of the layer written (relative to the layer: bit 0 near,
    /// bit [`FAR_BIT`] far). Words past 2^41 bits are dropped.
    fn or_words(&self, guard: &Guard, a: u64, b: u64, bytes: &AtomicUsize) -> u64 {
        let b = b.min((1 << LAYER_WORDS_BITS) - 1);
        if a > b {
            return 0;
        }
        let mut parts = 0;
        for t in a >> TOP_WORDS_BITS..=b >> TOP_WORDS_BITS {
            let (ts, te) = (t << TOP_WORDS_BITS, ((t + 1) << TOP_WORDS_BITS) - 1);
            let (mut lo, hi) = (a.max(ts), b.min(te));
            if lo == ts && hi == te {
                mark(&self.full, 1 << t);
                parts |= 1 << FAR_BIT;
                continue;
            }
            if lo < NEAR_WORDS {
                let near_hi = hi.min(NEAR_WORDS - 1);
                if lo == 0 && near_hi == NEAR_WORDS - 1 {
                    mark(&self.full, NEAR_FULL);
                } else {
                    let mid = install(&self.near, guard, bytes);
                    or_mid_words(mid, guard, 0, lo, near_hi, bytes);
                }
                parts |= 1;
                lo = near_hi + 1;
                if lo > hi {
                    continue;
                }
            }
            let top = install(&self.tops[t as usize], guard, bytes);
            or_node_words(top, ts, MID_WORDS_BITS, lo, hi, |cell, l, h, base| {
                let mid = install(cell, guard, bytes);
                or_mid_words(mid, guard, base, l, h, bytes);
            });
            mark(&self.far_pending, 1 << t);
            parts |= 1 << FAR_BIT;
        }
        parts
    }

    /// Takes the layer's full bits (after the log's pending word: see the ordering argument)
    /// as runs of whole words.
    fn drain_full(&self, f: &mut impl Sink) {
        if self.full.load(SeqCst) == 0 {
            return;
        }
        let mut full = self.full.swap(0, SeqCst);
        if full & NEAR_FULL != 0 {
            f(0, NEAR_WORDS, !0);
            full &= !NEAR_FULL;
        }
        while full != 0 {
            let t = u64::from(full.trailing_zeros());
            full &= full - 1;
            f(t << TOP_WORDS_BITS, 1 << TOP_WORDS_BITS, !0);
        }
    }

    /// word[w] |= mask, then the pending bits bottom-up up to the layer's own; returns the
    /// log's pending bit for the part of the layer written (relative to the layer: 0 near,
    /// [`FAR_BIT`] far), None if nothing was. Indices past 2^41 bits are dropped (only a
    /// writer holding a stale, finer base granularity can produce them).
    fn or_word(&self, guard: &Guard, w: u64, mask: u64, bytes: &AtomicUsize) -> Option<usize> {
        if w >> LAYER_WORDS_BITS != 0 {
            return None;
        }
        let m = w >> MID_WORDS_BITS;
        if m == 0 {
            let mid = install(&self.near, guard, bytes);
            or_in(mid, guard, w, mask, bytes);
            return Some(0);
        }
        let t = (w >> TOP_WORDS_BITS) as usize;
        let top = install(&self.tops[t], guard, bytes);
        let (cell, pending, bit) = child(top, m as usize);
        let mid = install(cell, guard, bytes);
        or_in(mid, guard, w, mask, bytes);
        mark(pending, bit);
        mark(&self.far_pending, 1 << t);
        Some(FAR_BIT)
    }

    /// Takes every pending word of the near mid.
    fn drain_near(&self, guard: &Guard, f: &mut impl Sink) {
        if let Some(mid) = self.near.get(guard) {
            drain_mid(mid, guard, 0, f);
        }
    }

    /// The same for the tops.
    fn drain_far(&self, guard: &Guard, f: &mut impl Sink) {
        let mut taken = self.far_pending.swap(0, SeqCst);
        while taken != 0 {
            let t = taken.trailing_zeros() as usize;
            taken &= taken - 1;
            if let Some(top) = self.tops[t].get(guard) {
                drain_top(top, guard, (t as u64) << TOP_WORDS_BITS, f);
            }
        }
    }
}

/// Pieces unlinked from the layers, not yet freed (writers may still hold them).
struct Retired {
    /// Near mids, tagged with their layer.
    mids: Limbo<Mid, Pages<Mid>>,
    /// Tops, tagged with their layer and index.
    tops: Limbo<Top, Pages<Top>>,
}

impl Retired {
    fn is_empty(&self) -> bool {
        self.mids.is_empty() && self.tops.is_empty()
    }
}

/// The shared log of recent guest writes (see the module documentation). Cheap to share:
/// writers call [`WriteLog::set`] from any thread without a lock; only the owning
/// [`BitmapSet`](super::BitmapSet) drains it.
#[repr(C)]
pub struct WriteLog {
    /// Current base granularity (log2), or [`NO_BASE_GRANULARITY`].
    base_granularity_bits: AtomicU32,
    /// Disk size for clamping.
    size: AtomicU64,
    /// Bit l: layer l's near mid may hold bits; bit [`FAR_BIT`] + l: its tops may.
    pending: AtomicU64,
    /// One per granularity, inline: the near mid is one load from here.
    layers: [Layer; LAYERS],
    /// Memory bookkeeping, off the lines every writer reads.
    books: Books,
}

/// What the log allocated and gave back; written when pieces are allocated or freed.
#[repr(align(64))]
struct Books {
    /// Bytes of the pieces allocated and not yet freed (linked or retired).
    bytes: AtomicUsize,
    /// Bytes of the retired lists themselves.
    retired_bytes: AtomicUsize,
    /// Grace periods after which pieces were freed.
    reclaims: AtomicU64,
    /// Retired pieces wait for a grace period, or pieces were kept for a dense log: the next
    /// absorb drains.
    waiting: AtomicBool,
    /// The end of the furthest write that went past the disk's end since the last absorb
    /// took it (0: none): such writes are in no bitmap (see [`WriteLog::take_past_end`]).
    past_end: AtomicU64,
    /// Retired pieces; locked by the drainer only.
    retired: Mutex<Retired>,
}

impl fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteLog")
            .field("granularity_bits", &self.granularity_bits())
            .field("size", &self.size())
            .field("pending", &self.has_pending())
            .field("memory", &self.memory())
            .finish()
    }
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog::new(0)
    }
}

impl WriteLog {
    /// An empty log over `size` bytes that records nothing until a base granularity is set.
    pub(crate) fn new(size: u64) -> Self {
        WriteLog {
            base_granularity_bits: AtomicU32::new(NO_BASE_GRANULARITY),
            size: AtomicU64::new(size),
            pending: AtomicU64::new(0),
            layers: std::array::from_fn(|_| Layer::new()),
            books: Books {
                bytes: AtomicUsize::new(0),
                retired_bytes: AtomicUsize::new(0),
                reclaims: AtomicU64::new(0),
                waiting: AtomicBool::new(false),
                past_end: AtomicU64::new(0),
                retired: Mutex::new(Retired {
                    mids: Limbo::new(),
                    tops: Limbo::new(),
                }),
            },
        }
    }

    /// The guest write hook: logs `[offset, offset + bytes)` clamped to the disk size, rounded
    /// outward to the base granularity; a write reaching past the end is remembered for the
    /// next absorb, which reports it. Lock-free (atomic word operations, a plain store on
    /// entry and on exit); allocates only the first time a 512-byte leaf of the log (or a node
    /// above it) is touched since the last absorb gave memory back. Does nothing while the set
    /// has no bitmap.
    #[inline]
    pub fn set(&self, offset: u64, bytes: u64) {
        let g = self.base_granularity_bits.load(SeqCst);
        let size = self.size.load(SeqCst);
        if g == NO_BASE_GRANULARITY || bytes == 0 {
            return;
        }
        let end = offset.saturating_add(bytes);
        if end > size {
            self.note_past_end(end);
            if offset >= size {
                return;
            }
        }
        let last = offset.saturating_add(bytes - 1).min(size - 1);
        let li = (g - MIN_GRANULARITY_BITS) as usize;
        let Some(layer) = self.layers.get(li) else {
            return;
        };
        let (first, last) = (offset >> g, last >> g);
        let guard = qsbr::pin();
        if !self.set_fast(&guard, layer, li, first, last) {
            self.set_slow(&guard, layer, li, first, last);
        }
    }

    /// The common case, straight-line code without calls: granules `first..=last` within one
    /// log word of a layer's near mid whose leaf exists. False, having changed nothing,
    /// otherwise.
    #[inline(always)]
    fn set_fast(&self, guard: &Guard, layer: &Layer, li: usize, first: u64, last: u64) -> bool {
        let w = first >> 6;
        if w != last >> 6 || w >> MID_WORDS_BITS != 0 {
            return false;
        }
        let Some(mid) = layer.near.get(guard) else {
            return false;
        };
        let (cell, pending, bit) = child(mid, (w >> LEAF_WORDS_BITS) as usize);
        let Some(leaf) = cell.get(guard) else {
            return false;
        };
        // A plain fetch_or, not `mark`'s load-then-or: a random write mostly sets new bits, and
        // the load would fetch the line shared first, then the or take it exclusive: two
        // transfers where one does, which two writer threads pay on most writes (BENCHMARKS.md,
        // 'Write hook from C'). The marks below are mostly set already and stay loads.
        leaf[w as usize & (LEAF_WORDS - 1)].fetch_or(span(first & 63, last & 63), SeqCst);
        mark(pending, bit);
        mark(&self.pending, 1 << li);
        true
    }

    /// Every other case: several words, the tops, pieces to allocate (the same steps). The
    /// words covered in part at either end one by one, the whole words between by whole
    /// pieces (module documentation, 'Whole pieces').
    #[inline(never)]
    fn set_slow(&self, guard: &Guard, layer: &Layer, li: usize, first: u64, last: u64) {
        let (mut fw, mut lw) = (first >> 6, last >> 6);
        let bytes = &self.books.bytes;
        let mut parts = 0;
        let mut word = |w: u64, mask: u64| {
            if let Some(part) = layer.or_word(guard, w, mask, bytes) {
                parts |= 1 << (part + li);
            }
        };
        if fw == lw {
            word(fw, span(first & 63, last & 63));
        } else {
            if first & 63 != 0 {
                word(fw, span(first & 63, 63));
                fw += 1;
            }
            if last & 63 != 63 {
                word(lw, span(0, last & 63));
                lw -= 1;
            }
            if fw <= lw {
                parts |= layer.or_words(guard, fw, lw, bytes) << li;
            }
        }
        if parts != 0 {
            mark(&self.pending, parts);
        }
    }

    /// Whether some write may be waiting to be drained (one load).
    #[inline]
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(SeqCst) != 0
    }

    /// A write ending at `end`, past the disk's end: remembered for the next absorb.
    #[cold]
    fn note_past_end(&self, end: u64) {
        self.books.past_end.fetch_max(end, SeqCst);
    }

    /// The end of the furthest write since the last call that went past the disk's end (0:
    /// none). The part of such a write beyond the end is in no bitmap: the host resized the
    /// disk without resizing the bitmaps first.
    pub(crate) fn take_past_end(&self) -> u64 {
        if self.books.past_end.load(Relaxed) == 0 {
            return 0;
        }
        self.books.past_end.swap(0, SeqCst)
    }

    /// Whether a drain has something to do: writes, retired pieces still to free, or a write
    /// past the disk's end to report (three loads, the last two from one line). A write into a
    /// retired piece sets the log's pending bits as any other, so
    /// the retired pieces matter here only for the memory.
    #[inline]
    pub(crate) fn wants_drain(&self) -> bool {
        self.has_pending()
            || self.books.waiting.load(Relaxed)
            || self.books.past_end.load(Relaxed) != 0
    }

    /// Takes every logged word out of the log: `f(granularity_bits, word_index, words, bits)`:
    /// the `words` words from `word_index` on each hold `bits` (all ones when `words` > 1: a
    /// whole piece), bit b of word i being log granule `i * 64 + b` at granularity
    /// `1 << granularity_bits`. O(1) when nothing is pending, else O(pending leaves and whole
    /// pieces). Writers
    /// may run meanwhile: what they log after a word was taken waits for the next drain. Then
    /// gives memory back (module documentation): above [`RETAIN_BYTES`] of pieces not densely
    /// written, every piece is unlinked, drained once more after the grace period, and freed.
    pub(crate) fn drain(&self, mut f: impl FnMut(u32, u64, u64, u64)) {
        // Words taken one by one (from leaves), for the choice to keep the pieces.
        let words = std::cell::Cell::new(0usize);
        let mut f = |g, w, n, bits| {
            words.set(words.get() + usize::from(n == 1));
            f(g, w, n, bits)
        };
        let mut retired = self
            .books
            .retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let retired = &mut *retired;
        let parts = self.pending.swap(0, SeqCst);
        // Pieces above RETAIN_BYTES kept because this drain found them densely written.
        let dense;
        {
            let guard = qsbr::pin();
            let mut layers = (parts | parts >> FAR_BIT) & ((1 << LAYERS) - 1);
            while layers != 0 {
                let li = layers.trailing_zeros() as usize;
                layers &= layers - 1;
                let g = li as u32 + MIN_GRANULARITY_BITS;
                let layer = &self.layers[li];
                layer.drain_full(&mut |w, n, bits| f(g, w, n, bits));
                if parts & 1 << li != 0 {
                    layer.drain_near(&guard, &mut |w, n, bits| f(g, w, n, bits));
                }
                if parts & 1 << (FAR_BIT + li) != 0 {
                    layer.drain_far(&guard, &mut |w, n, bits| f(g, w, n, bits));
                }
            }
            // Writers that reached retired pieces before they were unlinked may have written
            // to them since the last drain.
            for (mid, tag) in retired.mids.iter() {
                let (g, base) = untag(tag, MID_WORDS_BITS);
                drain_mid(mid, &guard, base, &mut |w, n, bits| f(g, w, n, bits));
            }
            for (top, tag) in retired.tops.iter() {
                let (g, base) = untag(tag, TOP_WORDS_BITS);
                drain_top(top, &guard, base, &mut |w, n, bits| f(g, w, n, bits));
            }
            let bytes = self.books.bytes.load(Relaxed);
            dense =
                bytes > RETAIN_BYTES && bytes <= words.get().saturating_mul(KEEP_BYTES_PER_WORD);
            if bytes > RETAIN_BYTES && !dense && qsbr::reclaim_supported() {
                for (li, layer) in self.layers.iter().enumerate() {
                    layer.near.retire(&mut retired.mids, tag(li, 0));
                    for (t, top) in layer.tops.iter().enumerate() {
                        top.retire(&mut retired.tops, tag(li, t));
                    }
                }
            }
        }
        if !retired.is_empty() {
            if let Some(grace) = qsbr::synchronize() {
                // No writer holds a retired piece any more: a last drain, then free.
                let guard = qsbr::pin();
                let mut freed = 0;
                retired.mids.reclaim(&grace, |mut mid, tag| {
                    let (g, base) = untag(tag, MID_WORDS_BITS);
                    drain_mid(&mid, &guard, base, &mut |w, n, bits| f(g, w, n, bits));
                    freed += mid_bytes(&mut mid);
                });
                retired.tops.reclaim(&grace, |mut top, tag| {
                    let (g, base) = untag(tag, TOP_WORDS_BITS);
                    drain_top(&top, &guard, base, &mut |w, n, bits| f(g, w, n, bits));
                    freed += top_bytes(&mut top);
                });
                if freed > 0 {
                    self.books.bytes.fetch_sub(freed, Relaxed);
                    self.books.reclaims.fetch_add(1, Relaxed);
                    crate::sys::freed(freed);
                }
            }
        }
        // Kept pieces have the next absorb drain even if nothing is pending, so that an idle
        // period gives them back.
        self.books
            .waiting
            .store(!retired.is_empty() || dense, Relaxed);
        self.books.retired_bytes.store(
            retired.mids.heap_bytes() + retired.tops.heap_bytes(),
            Relaxed,
        );
    }

    /// The base granularity (log2) writers use now; None while nothing is recorded.
    pub fn granularity_bits(&self) -> Option<u32> {
        let g = self.base_granularity_bits.load(SeqCst);
        (g != NO_BASE_GRANULARITY).then_some(g)
    }

    /// Sets the base granularity (log2, clamped to 9..=31); None stops recording. Called by
    /// the set under exclusive access.
    pub(crate) fn set_granularity_bits(&self, g: Option<u32>) {
        let v = g.map_or(NO_BASE_GRANULARITY, |g| {
            g.clamp(
                MIN_GRANULARITY_BITS,
                MIN_GRANULARITY_BITS + LAYERS as u32 - 1,
            )
        });
        self.base_granularity_bits.store(v, SeqCst);
    }

    /// The disk size writes are clamped to.
    pub fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    /// Publishes a new disk size (after the set absorbed and resized its bitmaps).
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, SeqCst);
    }

    /// How many times a drain freed pieces after a grace period.
    #[cfg(test)]
    pub(crate) fn reclaims(&self) -> u64 {
        self.books.reclaims.load(Relaxed)
    }

    /// Bytes of memory the log holds: itself, every piece allocated and not yet freed (linked,
    /// or retired and waiting for its grace period), and the list of retired pieces. The
    /// per-thread slots of src/qsbr.rs (64 bytes per thread that ever wrote, shared by every
    /// log of the process) are not counted.
    pub fn memory(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.books.bytes.load(Relaxed)
            + self.books.retired_bytes.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word a drain takes, a whole piece as its words (small logs only).
    fn drained(log: &WriteLog) -> Vec<(u32, u64, u64)> {
        let mut v = Vec::new();
        log.drain(|g, w, n, b| {
            for i in 0..n {
                v.push((g, w + i, b));
            }
        });
        v
    }

    /// Granule ranges [first, last] by granularity, sorted and merged.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Ranges(std::collections::BTreeMap<u32, Vec<(u64, u64)>>);

    impl Ranges {
        fn add(&mut self, g: u32, first: u64, last: u64) {
            self.0.entry(g).or_default().push((first, last));
        }

        /// Sorted, overlapping and adjacent ranges merged.
        fn merged(mut self) -> Ranges {
            for v in self.0.values_mut() {
                v.sort_unstable();
                let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
                for &(a, b) in v.iter() {
                    match out.last_mut() {
                        Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                        _ => out.push((a, b)),
                    }
                }
                *v = out;
            }
            self.0.retain(|_, v| !v.is_empty());
            self
        }

        /// What a drain takes, as ranges (whole pieces without expanding them).
        fn drain(log: &WriteLog) -> Ranges {
            let mut r = Ranges::default();
            log.drain(|g, w, n, mut bits| {
                if n > 1 {
                    assert_eq!(bits, !0, "a whole piece is all ones");
                    r.add(g, w * 64, (w + n) * 64 - 1);
                    return;
                }
                while bits != 0 {
                    let s0 = u64::from(bits.trailing_zeros());
                    let run = u64::from((!(bits >> s0)).trailing_zeros());
                    r.add(g, w * 64 + s0, w * 64 + s0 + run - 1);
                    bits = if s0 + run >= 64 {
                        0
                    } else {
                        bits & !(((1u64 << run) - 1) << s0)
                    };
                }
            });
            r.merged()
        }
    }

    #[test]
    fn empty_log_records_nothing() {
        let log = WriteLog::new(1 << 30);
        log.set(0, 4096);
        assert!(!log.has_pending());
        assert!(drained(&log).is_empty());
    }

    #[test]
    fn set_rounds_outward_and_clamps() {
        let log = WriteLog::new(1 << 20);
        log.set_granularity_bits(Some(16));
        log.set(65535, 2);
        log.set((1 << 20) - 1, 1 << 30);
        log.set(1 << 20, 1);
        assert!(log.has_pending());
        assert_eq!(drained(&log), vec![(16, 0, 0b11 | 1 << 15)]);
        assert!(!log.has_pending());
        assert!(drained(&log).is_empty());
    }

    #[test]
    fn layers_and_far_chunks() {
        let log = WriteLog::new(u64::MAX);
        log.set_granularity_bits(Some(9));
        log.set(1 << 40, 512);
        log.set_granularity_bits(Some(31));
        log.set(0, 1);
        // Far beyond 2^41 granules at 512 B: dropped, never out of bounds.
        log.set_granularity_bits(Some(9));
        log.set(1 << 62, 512);
        let got = drained(&log);
        assert_eq!(got, vec![(9, (1u64 << 31) / 64, 1), (31, 0, 1)]);
        assert!(log.memory() > 0);
    }

    /// Random ranges at random granularities (near and far mids, one word and many, whole
    /// leaves, mids, the near mid and whole tops, pieces allocated or not, so every path of
    /// `set`) drain to exactly the granules a model marks.
    #[test]
    fn set_matches_a_model() {
        let mut rng = Rng::new(0x5eed);
        let size = 1u64 << 52;
        let log = WriteLog::new(size);
        let mut model = Ranges::default();
        let far: Vec<u64> = (0..4).map(|_| rng.below(size)).collect();
        for round in 0..40 {
            for _ in 0..200 {
                let g = [9, 12, 16, 16, 16, 21][rng.below(6) as usize];
                log.set_granularity_bits(Some(g));
                // Near the start, near the 2^30-granule boundary, or anywhere (far).
                let base = match rng.below(3) {
                    0 => 0,
                    1 => ((1u64 << 30) << g).saturating_sub(1 << (g + 8)),
                    _ => far[rng.below(4) as usize],
                };
                let off = (base + rng.below(1 << (g + 9))).min(size - 1);
                // In granules: within a word, many words, whole leaves (4096), whole mids
                // (2^24, the near mid among them) and whole tops (2^36).
                let len = match rng.below(6) {
                    0 => 1 + rng.below(1 << g),
                    1 => 1 + rng.below(1 << (g + 7)),
                    2 => 1 + rng.below(1 << (g + 13)),
                    3 => 1 + rng.below(1 << (g + 20)),
                    4 => 1 + rng.below(1 << (g + 27)),
                    _ => 1 + rng.below(1u64 << (g + 38).min(51)),
                };
                log.set(off, len);
                let last = (off + len - 1).min(size - 1);
                let (first, last) = (off >> g, (last >> g).min((1 << 41) - 1));
                if first <= last {
                    model.add(g, first, last);
                }
            }
            if round % 3 == 0 {
                let want = std::mem::take(&mut model).merged();
                assert_eq!(Ranges::drain(&log), want, "round {round}");
                assert!(!log.has_pending());
            }
        }
        assert_eq!(Ranges::drain(&log), model.merged());
    }

    /// One write over a whole 1 TiB disk at 512 B: whole pieces, no leaf allocated, and one
    /// run per whole piece at the drain.
    #[test]
    fn a_write_over_a_whole_disk_costs_whole_pieces() {
        let size = 1u64 << 40;
        let log = WriteLog::new(size);
        log.set_granularity_bits(Some(9));
        let empty = log.memory();
        log.set(0, size);
        // The near mid is full, mids 1..127 are full bits of top 0 (the one piece allocated).
        assert_eq!(log.memory() - empty, NODE_BYTES, "one top");
        let mut runs = 0;
        let mut want = Ranges::default();
        want.add(9, 0, (size >> 9) - 1);
        let mut got = Ranges::default();
        log.drain(|g, w, n, bits| {
            runs += 1;
            assert_eq!(bits, !0);
            got.add(g, w * 64, (w + n) * 64 - 1);
        });
        assert_eq!(got.merged(), want.merged());
        assert_eq!(runs, 128, "the near mid and 127 mids of top 0");
        // Unaligned ends: the words and leaves at either end one by one.
        log.set(100 * 512 + 7, size - 300 * 512);
        let mut want = Ranges::default();
        want.add(9, 100, (size - 200 * 512 - 1 + 7) >> 9);
        assert_eq!(Ranges::drain(&log), want.merged());
        // Whole tops: 2^36 granules each at 512 B (32 TiB).
        let size = 1u64 << 47;
        let log = WriteLog::new(size);
        log.set_granularity_bits(Some(9));
        log.set(0, size);
        assert_eq!(log.memory(), empty, "whole tops allocate nothing");
        let mut want = Ranges::default();
        want.add(9, 0, (size >> 9) - 1);
        assert_eq!(Ranges::drain(&log), want.merged());
    }

    /// Nodes (mids and tops, 36 KiB) sit in pages of their own, outside the C allocator's
    /// heap.
    #[test]
    #[cfg(target_os = "linux")]
    fn nodes_are_mappings_of_their_own() {
        let log = WriteLog::new(1 << 50);
        log.set_granularity_bits(Some(9));
        log.set(4096, 512);
        log.set(1 << 45, 512);
        let g = qsbr::pin();
        let layer = &log.layers[0];
        let near = layer.near.get(&g).unwrap();
        // Granule 2^36 is word 2^30: top 1, its mid 0.
        let w = 1u64 << 30;
        let top = layer.tops[(w >> TOP_WORDS_BITS) as usize].get(&g).unwrap();
        let (cell, _, _) = child(top, (w >> MID_WORDS_BITS) as usize);
        let mid = cell.get(&g).unwrap();
        // Page-aligned and mapped: the C allocator's 36 KiB blocks follow a header and are
        // never page-aligned.
        for node in [
            near.as_ptr() as usize,
            top.as_ptr() as usize,
            mid.as_ptr() as usize,
        ] {
            assert_eq!(node % 4096, 0, "{node:#x}");
            assert_eq!(qsbr::unmapped_pages(node, NODE_BYTES), 0, "{node:#x}");
        }
        drop(g);
        let mut want = Ranges::default();
        want.add(9, 8, 8);
        want.add(9, 1 << 36, 1 << 36);
        assert_eq!(Ranges::drain(&log), want.merged());
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let _x = qsbr::test_exclusive();
        let log = std::sync::Arc::new(WriteLog::new(1 << 40));
        log.set_granularity_bits(Some(12));
        let mut seen = vec![0u64; (1 << 16) / 64];
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..(1u64 << 14) {
                        log.set(((i * 4 + t) << 12) % (1 << 28), 4096);
                    }
                });
            }
            for _ in 0..200 {
                log.drain(|_, w, n, b| {
                    for i in w..w + n {
                        seen[i as usize] |= b;
                    }
                });
            }
        });
        log.drain(|_, w, n, b| {
            for i in w..w + n {
                seen[i as usize] |= b;
            }
        });
        let ones: u32 = seen.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 3 * (1 << 14));
    }

    /// 16,000 random 4 KiB writes over 1 TiB at granularity `g` through a set's hook: the
    /// log's memory while logging and after the next absorb, checked against bounds, and
    /// every written granule found in the bitmap.
    fn sparse_writes_memory(g: u32) -> (usize, usize) {
        const DISK: u64 = 1 << 40;
        const WRITES: u64 = 16_000;
        let mut set = BitmapSet::new(DISK);
        let id = set.create(Some(b"b"), 1 << g).unwrap();
        let hook = set.write_hook();
        let empty = hook.memory();
        let mut rng = Rng::new(0x5eed_1e55);
        let offsets: Vec<u64> = (0..WRITES).map(|_| rng.below(DISK / 4096) * 4096).collect();
        for &o in &offsets {
            hook.set(o, 4096);
        }
        let logging = hook.memory();
        // At least 512 bytes per distinct 64-word leaf written: memory() counts the pieces.
        let leaves: std::collections::BTreeSet<u64> =
            offsets.iter().map(|o| (o >> g) / 64 / 64).collect();
        assert!(
            logging >= empty + leaves.len() * 512,
            "{logging} {}",
            leaves.len()
        );
        set.absorb();
        let mut after = hook.memory();
        // Only a thread of another test stuck inside its guard for longer than GRACE_WAIT
        // (none runs a hook meanwhile: test_exclusive) defers the freeing to a later absorb.
        let mut absorbs = 1;
        while hook.wants_drain() && absorbs < 100 {
            eprintln!("grace period deferred: {after} bytes");
            set.absorb();
            after = hook.memory();
            absorbs += 1;
        }
        let bm = set.current(id).unwrap();
        for &o in &offsets {
            assert_eq!(bm.next_zero(o, 4096), None, "write at {o} lost");
        }
        let granules: std::collections::BTreeSet<u64> = offsets
            .iter()
            .flat_map(|o| (o >> g)..=((o + 4095) >> g))
            .collect();
        assert_eq!(bm.count(), granules.len() as u64 * (1 << g));
        (logging, after)
    }

    #[test]
    fn log_memory_follows_sparse_writes_and_falls_back_after_absorb() {
        let _x = qsbr::test_exclusive();
        for g in [9, 12] {
            let (logging, after) = sparse_writes_memory(g);
            eprintln!("granularity 2^{g}: {logging} bytes while logging, {after} after absorb");
            assert!(logging <= 16 << 20, "2^{g}: {logging} bytes while logging");
            if qsbr::reclaim_supported() {
                assert!(after <= 1 << 20, "2^{g}: {after} bytes after absorb");
            }
        }
    }

    /// A log written densely between absorbs (random 4 KiB writes over 1 TiB at 64 KiB, as a
    /// guest writes between two calls a millisecond apart) keeps its pieces: the next period's
    /// writes allocate nothing. The first absorb after a period without writes gives them back,
    /// and every write reaches the bitmap meanwhile.
    #[test]
    fn a_densely_written_log_keeps_its_pieces_until_an_idle_period() {
        let _x = qsbr::test_exclusive();
        const DISK: u64 = 1 << 40;
        const WRITES: u64 = 60_000;
        let mut set = BitmapSet::new(DISK);
        let id = set.create(Some(b"b"), 1 << 16).unwrap();
        let hook = set.write_hook();
        let empty = hook.memory();
        let mut rng = Rng::new(0xde45e);
        let mut granules = std::collections::BTreeSet::new();
        let mut period = |rng: &mut Rng| {
            for _ in 0..WRITES {
                let o = rng.below(DISK / 4096) * 4096;
                hook.set(o, 4096);
                granules.insert(o >> 16);
            }
        };
        period(&mut rng);
        // 2^24 granules: 4096 leaves under the near mid, nearly all of them written.
        let logging = hook.memory();
        assert!(logging >= empty + 4000 * LEAF_BYTES, "{logging}");
        set.absorb();
        assert_eq!(hook.memory(), logging, "dense pieces given back");
        period(&mut rng);
        assert_eq!(hook.memory(), logging, "the second period allocated");
        set.absorb();
        assert_eq!(hook.memory(), logging);
        let bm = set.current(id).unwrap();
        assert_eq!(bm.count(), granules.len() as u64 * (1 << 16));
        // A period without writes: the next absorb gives everything back.
        set.absorb();
        if qsbr::reclaim_supported() {
            let mut absorbs = 0;
            while hook.memory() > empty + 4096 && absorbs < 100 {
                set.absorb();
                absorbs += 1;
            }
            assert!(hook.memory() <= empty + 4096, "{}", hook.memory());
        }
        assert_eq!(
            set.current(id).unwrap().count(),
            granules.len() as u64 * (1 << 16)
        );
    }

    /// Writers hammer the hook (near leaves that stay hot, and far ones that allocate) while
    /// another thread absorbs over and over, unlinking and freeing the log's pieces each time:
    /// every written granule ends up dirty, nothing else does, and pieces were freed hundreds
    /// of times meanwhile.
    #[test]
    fn writers_and_a_reclaiming_absorber_lose_nothing() {
        let _x = qsbr::test_exclusive();
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};

        const DISK: u64 = 1 << 40;
        const WRITERS: u64 = 3;
        // Grace periods that freed pieces before the writers stop.
        let reclaims: u64 = if cfg!(debug_assertions) { 300 } else { 3000 };
        let mut set = BitmapSet::new(DISK);
        let id = set.create(Some(b"all"), 4096).unwrap();
        let hook = set.write_hook();
        let set = Arc::new(Mutex::new(set));
        let done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (hook, done) = (Arc::clone(&hook), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut rng = Rng::new(0xabcd_0123 + w * 7919);
                    let mut offsets = Vec::new();
                    let mut i = 0u64;
                    while !done.load(Relaxed) {
                        // Mostly the first 16 MiB (a few leaves, written again and again on the
                        // straight-line path while they are unlinked), else anywhere (a new
                        // leaf, mid or top: enough memory for every absorb to give it back).
                        let span = if i % 32 == 0 { DISK } else { 16 << 20 };
                        let off = rng.below(span / 512) * 512;
                        let len = 1 + rng.below(8192);
                        hook.set(off, len);
                        offsets.push((off, len));
                        i += 1;
                        if i % 128 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    offsets
                })
            })
            .collect();
        let mut absorbs = 0u64;
        let start = std::time::Instant::now();
        while hook.reclaims() < reclaims
            && (qsbr::reclaim_supported() || absorbs < 1000)
            && start.elapsed() < std::time::Duration::from_secs(120)
        {
            set.lock().unwrap().absorb();
            absorbs += 1;
        }
        done.store(true, SeqCst);
        let logs: Vec<Vec<(u64, u64)>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        let mut set = set.lock().unwrap();
        let bm = set.current(id).unwrap();
        let mut granules = std::collections::BTreeSet::new();
        for &(off, len) in logs.iter().flatten() {
            assert_eq!(bm.next_zero(off, len), None, "write [{off}, +{len}) lost");
            granules.extend(off / 4096..=(off + len - 1) / 4096);
        }
        assert_eq!(bm.count(), granules.len() as u64 * 4096, "extra bits");
        eprintln!(
            "{} writes, {absorbs} absorbs, {} grace periods freed pieces",
            logs.iter().map(Vec::len).sum::<usize>(),
            hook.reclaims()
        );
        if qsbr::reclaim_supported() {
            assert!(hook.reclaims() >= reclaims);
        }
    }

    /// Writers set whole leaves and whole mids (512 B granularity: a leaf covers 2 MiB, a mid
    /// 8 GiB), over and over in the same regions so that their full bits race with the drains
    /// of the same groups, and small far writes that make every absorb unlink and free the
    /// log's pieces (whose full bits are drained again before they are freed): the bitmap ends
    /// with exactly the granules written.
    #[test]
    fn whole_pieces_and_a_reclaiming_absorber_lose_nothing() {
        let _x = qsbr::test_exclusive();
        use std::sync::{Arc, Mutex};

        const DISK: u64 = 1 << 40;
        const WRITERS: u64 = 3;
        const WRITES: u64 = 20_000;
        let mut set = BitmapSet::new(DISK);
        let id = set.create(Some(b"all"), 512).unwrap();
        let hook = set.write_hook();
        let set = Arc::new(Mutex::new(set));
        // Writers finished.
        let done = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (hook, done) = (Arc::clone(&hook), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut rng = Rng::new(0xf011 + w * 104_729);
                    let mut writes = Vec::new();
                    for i in 0..WRITES {
                        let (off, len) = match i % 16 {
                            // Whole mids (and the near mid) in the first 64 GiB, often again.
                            0 => (rng.below(8) << 33, (1 + rng.below(2)) << 33),
                            // Unaligned ranges over whole leaves of the first 8 GiB.
                            1..=6 => {
                                let off = rng.below((8u64 << 30) / 512) * 512 + rng.below(512);
                                (off, 1 + rng.below(64 << 20))
                            }
                            // Small writes anywhere: new pieces for every absorb to free.
                            _ => (rng.below(DISK / 512) * 512, 1 + rng.below(8192)),
                        };
                        hook.set(off, len);
                        writes.push((off, len));
                        if i % 16 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    done.fetch_add(1, SeqCst);
                    writes
                })
            })
            .collect();
        let mut absorbs = 0u64;
        while done.load(SeqCst) < WRITERS {
            set.lock().unwrap().absorb();
            absorbs += 1;
        }
        let logs: Vec<Vec<(u64, u64)>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        let mut set = set.lock().unwrap();
        let bm = set.current(id).unwrap();
        let mut want = Ranges::default();
        for &(off, len) in logs.iter().flatten() {
            let last = (off + len - 1).min(DISK - 1);
            want.add(9, off >> 9, last >> 9);
        }
        let mut got = Ranges::default();
        for (s, len) in bm.dirty_runs(0, DISK).unwrap() {
            got.add(9, s >> 9, (s + len - 1) >> 9);
        }
        assert_eq!(got.merged(), want.merged(), "lost or extra granules");
        eprintln!(
            "{} writes, {absorbs} absorbs, {} grace periods freed pieces",
            logs.iter().map(Vec::len).sum::<usize>(),
            hook.reclaims()
        );
        if qsbr::reclaim_supported() {
            assert!(hook.reclaims() > 0, "no piece was freed meanwhile");
        }
    }

    // ---- The fan-out property: the log-based set equals per-bitmap sets. ----

    use crate::bitmap::{BitmapId, BitmapSet};

    use qdirty_testkit::Prng as Rng;

    fn pick(rng: &mut Rng, ids: &[BitmapId]) -> Option<BitmapId> {
        (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize])
    }

    /// Same ids, states and bits.
    fn assert_same(a: &mut BitmapSet, b: &BitmapSet, ctx: &str) {
        a.fold();
        assert_eq!(a.ids(), b.ids(), "{ctx}");
        assert_eq!(a.size(), b.size(), "{ctx}");
        for ia in a.ids() {
            let x = a.current(ia).unwrap();
            let y = b.get_unfolded(ia).unwrap();
            assert_eq!(x.enabled(), y.enabled(), "{ctx} {ia:?}");
            assert_eq!(x.granularity(), y.granularity(), "{ctx} {ia:?}");
            assert_eq!(x.count(), y.count(), "{ctx} {ia:?} count");
            assert_eq!(
                x.sha256().unwrap(),
                y.sha256().unwrap(),
                "{ctx} {ia:?} bits"
            );
        }
    }

    fn fan_out_sequence(seed: u64) {
        let mut rng = Rng::new(seed);
        let size = 512 * (1 + rng.below(1 << 16)) + rng.below(512);
        let mut a = BitmapSet::new(size);
        let mut b = BitmapSet::new(size);
        let hook = a.write_hook();
        for step in 0..400 {
            let ids = b.ids();
            let ctx = format!("seed {seed} step {step}");
            let size = b.size();
            match rng.below(100) {
                0..=54 => {
                    let off = rng.below(size + 4096);
                    let len = match rng.below(4) {
                        0 => 1 + rng.below(512),
                        1 | 2 => 1 + rng.below(256 << 10),
                        _ => 1 + rng.below(size + 1),
                    };
                    hook.set(off, len);
                    b.set_dirty(off, len);
                }
                55..=62 => {
                    let g = 1u64 << (9 + rng.below(12));
                    let name = (rng.below(3) != 0).then(|| format!("b{}", rng.below(8)));
                    let ra = a.create(name.as_deref().map(str::as_bytes), g);
                    let rb = b.create(name.as_deref().map(str::as_bytes), g);
                    assert_eq!(ra.is_ok(), rb.is_ok(), "{ctx}");
                }
                63..=66 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.release(id).is_ok(), b.release(id).is_ok(), "{ctx}");
                    }
                }
                67..=74 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let on = rng.below(2) == 0;
                        let f = |bm: &mut crate::DirtyBitmap| {
                            if on {
                                bm.enable()
                            } else {
                                bm.disable()
                            }
                        };
                        let ra = f(a.bitmap_mut(id).unwrap()).is_ok();
                        let rb = f(b.bitmap_mut(id).unwrap()).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                75..=77 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.bitmap_mut(id).unwrap().clear().is_ok();
                        let rb = b.bitmap_mut(id).unwrap().clear().is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                78..=82 => {
                    if let (Some(t), Some(s)) = (pick(&mut rng, &ids), pick(&mut rng, &ids)) {
                        let sa = a.current(s).unwrap().clone();
                        let sb = b.current(s).unwrap().clone();
                        let ra = a.merge(t, &sa, false).is_ok();
                        let rb = b.merge(t, &sb, false).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                83..=86 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.create_successor(id).is_ok();
                        let rb = b.create_successor(id).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                87..=89 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.abdicate(id).is_ok(), b.abdicate(id).is_ok(), "{ctx}");
                    }
                }
                90..=92 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        assert_eq!(a.reclaim(id).is_ok(), b.reclaim(id).is_ok(), "{ctx}");
                    }
                }
                93 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ra = a.enable_successor(id).is_ok();
                        let rb = b.enable_successor(id).is_ok();
                        assert_eq!(ra, rb, "{ctx}");
                    }
                }
                94..=95 => {
                    let n = 512 * (1 + rng.below(1 << 16)) + rng.below(512);
                    assert_eq!(a.truncate(n).is_ok(), b.truncate(n).is_ok(), "{ctx}");
                }
                96 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        let ro = rng.below(2) == 0;
                        a.bitmap_mut(id).unwrap().set_readonly(ro);
                        b.bitmap_mut(id).unwrap().set_readonly(ro);
                    }
                }
                97 => {
                    if let Some(id) = pick(&mut rng, &ids) {
                        for s in [&mut a, &mut b] {
                            let bm = s.bitmap_mut(id).unwrap();
                            bm.set_persistence(true);
                            bm.set_inconsistent().unwrap();
                        }
                    }
                }
                _ => assert_same(&mut a, &b, &ctx),
            }
        }
        assert_same(&mut a, &b, &format!("seed {seed} end"));
    }

    #[test]
    fn fan_out_matches_per_bitmap_sets() {
        for seed in 1..=150 {
            fan_out_sequence(seed);
        }
    }

    // ---- Concurrency stress: writers on the hook while a manager works under the lock. ----

    #[test]
    fn stress_hook_with_management() {
        let _x = qsbr::test_exclusive();
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};

        const SIZE: u64 = 1 << 30;
        const WRITERS: u64 = 3;
        const WRITES: u64 = 20_000;
        let mut set = BitmapSet::new(SIZE);
        let all = set.create(Some(b"all"), 4096).unwrap();
        let t = set.create(Some(b"t"), 65536).unwrap();
        let m = set.create(Some(b"m"), 4096).unwrap();
        set.bitmap_mut(m).unwrap().disable().unwrap();
        let hook = set.write_hook();
        let set = Arc::new(Mutex::new(set));
        // Even: stable; odd: a management call is changing things.
        let version = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));

        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (hook, version) = (Arc::clone(&hook), Arc::clone(&version));
                std::thread::spawn(move || {
                    let mut rng = Rng::new(0x1234_5678 + w * 77);
                    let mut log = Vec::with_capacity(WRITES as usize);
                    for _ in 0..WRITES {
                        let off = rng.below(SIZE / 512) * 512 + rng.below(2) * 100;
                        // Now and then whole leaves (16 MiB at 4 KiB): full bits racing with
                        // the management calls.
                        let len = if rng.below(256) == 0 {
                            1 + rng.below(64 << 20)
                        } else {
                            1 + rng.below(64 << 10)
                        };
                        let v1 = version.load(SeqCst);
                        hook.set(off, len);
                        let v2 = version.load(SeqCst);
                        log.push((off, len, v1, v2));
                    }
                    log
                })
            })
            .collect();

        let manager = {
            let (set, version, done) = (Arc::clone(&set), Arc::clone(&version), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut rng = Rng::new(99);
                // t's state in each stable period (index version / 2).
                let mut t_on = vec![true];
                let mut temp: Vec<BitmapId> = Vec::new();
                while !done.load(SeqCst) {
                    let mut s = set.lock().unwrap();
                    version.fetch_add(1, SeqCst);
                    s.fold();
                    match rng.below(6) {
                        0 => {
                            let on = !s.get(t).unwrap().enabled();
                            let bm = s.bitmap_mut(t).unwrap();
                            if on {
                                bm.enable().unwrap();
                            } else {
                                bm.disable().unwrap();
                            }
                        }
                        1 => {
                            let g = 1u64 << (9 + rng.below(12));
                            temp.push(s.create(None, g).unwrap());
                        }
                        2 => {
                            if let Some(id) = temp.pop() {
                                s.release(id).unwrap();
                            }
                        }
                        3 => {
                            let src = s.current(all).unwrap().clone();
                            s.bitmap_mut(m).unwrap().set_enabled_unchecked(true);
                            s.merge(m, &src, false).unwrap();
                            s.bitmap_mut(m).unwrap().set_enabled_unchecked(false);
                        }
                        4 => {
                            let mut it = s.iter_new(all).unwrap();
                            for _ in 0..32 {
                                if s.iter_next(&mut it).unwrap().is_none() {
                                    break;
                                }
                            }
                            s.iter_free(it);
                        }
                        _ => {
                            let q = s.query().unwrap();
                            assert!(q.iter().all(|i| i.count <= SIZE));
                        }
                    }
                    t_on.push(s.get(t).unwrap().enabled());
                    version.fetch_add(1, SeqCst);
                    drop(s);
                    std::thread::yield_now();
                }
                t_on
            })
        };

        let logs: Vec<Vec<(u64, u64, u64, u64)>> =
            writers.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, SeqCst);
        let t_on = manager.join().unwrap();
        let mut s = set.lock().unwrap();
        s.fold();

        let mut granules = vec![0u64; (SIZE / 4096 / 64) as usize];
        let (mut checked_t, mut spans) = (0, 0);
        for &(off, len, v1, v2) in logs.iter().flatten() {
            let end = (off + len).min(SIZE);
            assert_eq!(
                s.current(all).unwrap().next_zero(off, end - off),
                None,
                "write lost"
            );
            for g in off / 4096..=(end - 1) / 4096 {
                granules[(g / 64) as usize] |= 1 << (g % 64);
            }
            if v1 == v2 && v1 % 2 == 0 && t_on[(v1 / 2) as usize] {
                checked_t += 1;
                let z = s.current(t).unwrap().next_zero(off, end - off);
                assert_eq!(z, None, "write lost in t");
            }
            spans += u64::from(v1 != v2);
        }
        let distinct: u64 = granules.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            s.current(all).unwrap().count(),
            distinct * 4096,
            "extra bits"
        );
        assert!(checked_t > 0);
        eprintln!(
            "stress: {} writes, {} spanning a management call, {} checked in t, {} versions",
            logs.iter().map(Vec::len).sum::<usize>(),
            spans,
            checked_t,
            t_on.len()
        );
    }
}
