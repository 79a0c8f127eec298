//! Quiescent-state-based reclamation: pieces of memory that lock-free readers reach through
//! atomic pointers ([`AtomicBox`]) and that one owner unlinks ([`AtomicBox::retire`]) and frees
//! once no reader can still hold them ([`Limbo::reclaim`] after [`synchronize`]). The write
//! log (src/bitmap/log.rs) gives its pieces back this way after each absorb.
//!
//! # Readers
//!
//! Every thread that reads through an [`AtomicBox`] holds a [`Guard`] ([`pin`]) while it uses
//! what it loaded. Each thread has a *slot* of its own (found through a thread-local, claimed
//! from a process-wide registry on the thread's first [`pin`], given back when the thread
//! exits, 64-byte aligned so that no two threads write the same cache line): a counter that
//! the thread increments when it enters a guard (the counter becomes odd) and again when it
//! leaves (even). Entering is a plain store (release) followed by a compiler fence, leaving a
//! plain store (release): no locked instruction, no fence instruction on the reader's path.
//! A thread that can no longer use its thread-locals (it is exiting) counts itself in a shared
//! counter instead, with a locked increment and a full fence.
//!
//! # Reclaiming
//!
//! The owner unlinks a piece by swapping its pointer to null (`SeqCst`) and keeps it in a
//! [`Limbo`], where the piece stays valid: readers that loaded the pointer before the swap may
//! still use it. [`synchronize`] then calls membarrier(2) (MEMBARRIER_CMD_PRIVATE_EXPEDITED,
//! src/sys.rs): every thread of the process executes a full memory barrier at some
//! point `M` of its program order during the call (or passes one when it is next scheduled),
//! which turns that thread's compiler fences into full fences with respect to the caller. Then
//! it reads every slot (acquire) and waits until each slot that was odd has changed. For a
//! reader thread and a piece unlinked before the call:
//!
//! - if the thread's entry store of a guard comes after `M` in its program order, its loads of
//!   pointers in that guard come after `M` too (compiler fence), so they see the swap (which
//!   preceded the call): they load null or a newer pointer, never the unlinked piece;
//! - if the entry store comes before `M`, it is visible to the caller after the call: the
//!   caller reads that odd value or a later one. An odd value read is waited for until it
//!   changes. An even value, or a changed one, was stored (release) after the guard's last use
//!   of the piece, and the caller's acquire load of it orders those uses before the free.
//!   The thread's later guards enter after `M` (first case).
//!
//! A thread counted in the shared counter increments it (`SeqCst`) and issues a `SeqCst` fence
//! before loading pointers; the caller issues a `SeqCst` fence after the swap and reads the
//! counter: if it reads zero, that thread's loads see the swap (the two fences order the two
//! sides), and a non-zero counter is waited for.
//!
//! So when [`synchronize`] returns a [`Grace`], no reader holds a piece unlinked before it
//! started, and [`Limbo::reclaim`] hands the pieces back to the owner as plain boxes. The grace
//! period waits a bounded time ([`GRACE_WAIT`]); a reader that stays inside a guard longer (a
//! thread descheduled in the middle of a write hook) leaves the pieces in limbo for a later
//! attempt. Without membarrier (not Linux, before Linux 4.14, or refused by a seccomp filter)
//! there is never a grace period: [`reclaim_supported`] says so, and pieces are never freed
//! before their owner is dropped.
//!
//! # Pieces in pages of their own
//!
//! An [`AtomicBox`] owns its piece through an [`Owner`]: a [`Box`] (the C allocator), or
//! [`Pages`], a mapping of its own (mmap, given back with munmap when the piece is dropped).
//! Large pieces that come and go while long-lived heap blocks are allocated between them (the
//! write log's nodes, freed after every absorb that gives memory back, among a bitmap's
//! chunks) would otherwise leave holes in the C allocator's heap that it keeps resident.
//!
//! This module holds the crate's only raw-pointer code outside the C ABI: the conversions
//! between owners and the pointers an [`AtomicBox`] stores.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};
use std::sync::atomic::{
    compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU64, Ordering::Acquire, Ordering::Relaxed,
    Ordering::Release, Ordering::SeqCst,
};
use std::time::{Duration, Instant};

use once_cell::race::OnceBox;

use crate::sys::{map_pages, membarrier_available, membarrier_private_expedited, unmap_pages};

/// How long [`synchronize`] waits for readers inside a guard before it gives up (their pieces
/// stay in limbo for the next attempt).
pub(crate) const GRACE_WAIT: Duration = Duration::from_millis(5);

/// One reader thread's state: odd while the thread is inside a guard.
#[repr(align(64))]
struct Slot {
    /// Incremented at each entry into a guard and at each exit.
    state: AtomicU64,
    /// Claimed by a living thread.
    owned: AtomicBool,
    /// The next slot of the registry (a list that only grows).
    next: OnceBox<Slot>,
}

impl Slot {
    const fn new(owned: bool) -> Self {
        Slot {
            state: AtomicU64::new(0),
            owned: AtomicBool::new(owned),
            next: OnceBox::new(),
        }
    }
}

/// The registry's first slot; the others hang off it.
static HEAD: Slot = Slot::new(false);

/// Readers inside a guard that have no slot (their thread is exiting).
static SLOTLESS: AtomicU64 = AtomicU64::new(0);

/// Incremented at the start of each grace period: a piece retired while it read `n` is covered
/// by the grace period that incremented it from `n`.
static GRACE_SEQ: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's slot, once claimed.
    static MINE: Cell<Option<&'static Slot>> = const { Cell::new(None) };
    /// Gives the slot back when the thread exits.
    static RELEASE: GiveBack = const { GiveBack };
}

/// Its destructor runs at thread exit and frees the thread's slot for another thread.
struct GiveBack;

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(slot) = MINE.with(Cell::take) {
            slot.owned.store(false, Release);
        }
    }
}

/// A free slot of the registry, claimed, or a new one appended.
fn claim() -> &'static Slot {
    let mut slot: &'static Slot = &HEAD;
    loop {
        if !slot.owned.load(Relaxed)
            && slot
                .owned
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_ok()
        {
            return slot;
        }
        match slot.next.get() {
            Some(next) => slot = next,
            None => {
                if slot.next.set(Box::new(Slot::new(true))).is_ok() {
                    return slot.next.get().expect("just set");
                }
                // Another thread appended first: go on from its slot.
            }
        }
    }
}

/// Every slot of the registry.
fn slots() -> impl Iterator<Item = &'static Slot> {
    std::iter::successors(Some(&HEAD), |s| s.next.get())
}

/// Proof that the current thread may use what it loads from an [`AtomicBox`]: no piece
/// unlinked after the guard loaded it is freed before the guard is dropped. Not `Send`.
#[must_use]
pub(crate) struct Guard {
    kind: Kind,
    _not_send: PhantomData<*const ()>,
}

enum Kind {
    /// Entered through this slot; the slot's value to store on exit.
    Slot(&'static Slot, u64),
    /// The thread was already inside a guard.
    Nested,
    /// Counted in [`SLOTLESS`].
    Slotless,
}

/// Enters a guard (see the module documentation): two plain loads and a plain store once the
/// thread has its slot.
#[inline(always)]
pub(crate) fn pin() -> Guard {
    match MINE.with(Cell::get) {
        Some(slot) => {
            let state = slot.state.load(Relaxed);
            if state & 1 != 0 {
                return Guard {
                    kind: Kind::Nested,
                    _not_send: PhantomData,
                };
            }
            slot.state.store(state + 1, Release);
            // The loads of pointers stay after the store (membarrier makes this a full fence
            // with respect to `synchronize`).
            compiler_fence(SeqCst);
            Guard {
                kind: Kind::Slot(slot, state + 2),
                _not_send: PhantomData,
            }
        }
        None => pin_slow(),
    }
}

/// First guard of a thread: claims a slot; while the thread exits, counts it slotless.
#[cold]
#[inline(never)]
fn pin_slow() -> Guard {
    // The destructor that gives the slot back is registered by this access; while the thread
    // exits it cannot be, and the thread must not take a slot it would never give back.
    if RELEASE.try_with(|_| ()).is_ok() {
        MINE.with(|m| m.set(Some(claim())));
        return pin();
    }
    SLOTLESS.fetch_add(1, SeqCst);
    fence(SeqCst);
    Guard {
        kind: Kind::Slotless,
        _not_send: PhantomData,
    }
}

impl Drop for Guard {
    #[inline(always)]
    fn drop(&mut self) {
        match self.kind {
            Kind::Slot(slot, exit) => slot.state.store(exit, Release),
            Kind::Nested => {}
            Kind::Slotless => {
                SLOTLESS.fetch_sub(1, Release);
            }
        }
    }
}

/// A grace period that started after every piece retired before it (see [`synchronize`]).
pub(crate) struct Grace {
    /// [`GRACE_SEQ`] as this grace period found it.
    covers: u64,
}

/// Whether grace periods can happen in this process (membarrier works).
pub(crate) fn reclaim_supported() -> bool {
    membarrier_available()
}

/// Waits, at most [`GRACE_WAIT`], until no reader can hold a piece retired before this call:
/// None when that could not be established (no membarrier, a reader stayed inside its guard,
/// or the calling thread is itself inside a guard).
pub(crate) fn synchronize() -> Option<Grace> {
    let covers = GRACE_SEQ.fetch_add(1, SeqCst);
    if !membarrier_private_expedited() {
        return None;
    }
    fence(SeqCst);
    if MINE
        .with(Cell::get)
        .is_some_and(|s| s.state.load(Relaxed) & 1 != 0)
    {
        return None;
    }
    let mut inside: Vec<(&Slot, u64)> = slots()
        .map(|s| (s, s.state.load(Acquire)))
        .filter(|&(_, v)| v & 1 != 0)
        .collect();
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        inside.retain(|&(s, v)| s.state.load(Acquire) == v);
        if inside.is_empty() && SLOTLESS.load(SeqCst) == 0 {
            return Some(Grace { covers });
        }
        if round >= 64 && start.elapsed() > GRACE_WAIT {
            return None;
        }
        if round < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        round += 1;
    }
}

/// An owning pointer that an [`AtomicBox`] can store raw and take back.
pub(crate) trait Owner: DerefMut + Sized {
    /// The pointer, ownership passed to the caller.
    fn into_raw(self) -> *mut Self::Target;
    /// Ownership taken back.
    ///
    /// # Safety
    /// `p` came from `into_raw` of the same type, and nothing uses it afterwards.
    unsafe fn from_raw(p: *mut Self::Target) -> Self;
}

impl<T> Owner for Box<T> {
    fn into_raw(self) -> *mut T {
        Box::into_raw(self)
    }

    unsafe fn from_raw(p: *mut T) -> Self {
        // SAFETY: the caller's contract: `p` came from Box::into_raw.
        unsafe { Box::from_raw(p) }
    }
}

/// A piece in a private anonymous mapping of its own, unmapped when dropped (module
/// documentation, 'Pieces in pages of their own').
pub(crate) struct Pages<T> {
    ptr: NonNull<T>,
    /// Owns a `T` (drop check).
    _owns: PhantomData<T>,
}

// SAFETY: Pages<T> owns its T as a Box<T> does.
unsafe impl<T: Send> Send for Pages<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Pages<T> {}

impl<E, const N: usize> Pages<[E; N]> {
    /// `N` elements built one by one in place (no large temporary on the stack). Aborts, as
    /// `Box::new` does, when the system has no memory to map.
    pub(crate) fn from_fn(mut f: impl FnMut(usize) -> E) -> Self {
        let layout = std::alloc::Layout::new::<[E; N]>();
        assert!(
            layout.size() > 0 && layout.align() <= 4096,
            "page-aligned, non-empty"
        );
        let Some(base) = map_pages(layout.size()) else {
            std::alloc::handle_alloc_error(layout)
        };
        let ptr = base.cast::<[E; N]>();
        let first = base.cast::<E>();
        for i in 0..N {
            // SAFETY: the mapping holds N elements of E, page-aligned (so aligned for E), and
            // element i is written once, before anything reads it.
            unsafe { first.as_ptr().add(i).write(f(i)) };
        }
        Pages {
            ptr,
            _owns: PhantomData,
        }
    }
}

impl<T> Deref for Pages<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: initialised by `from_fn`, valid until `drop`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` is exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Pages<T> {
    fn drop(&mut self) {
        // SAFETY: the T is initialised and dropped once, here; then nothing uses the mapping,
        // which `from_fn` made with exactly this size.
        unsafe {
            ptr::drop_in_place(self.ptr.as_ptr());
            unmap_pages(self.ptr.cast(), std::mem::size_of::<T>());
        }
    }
}

impl<T> Owner for Pages<T> {
    fn into_raw(self) -> *mut T {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    unsafe fn from_raw(p: *mut T) -> Self {
        Pages {
            // SAFETY: the caller's contract: `p` came from `into_raw`, non-null.
            ptr: unsafe { NonNull::new_unchecked(p) },
            _owns: PhantomData,
        }
    }
}

/// An atomic, nullable owning pointer that readers follow under a [`Guard`] and its owner
/// unlinks into a [`Limbo`]. Installing is lock-free: one compare-and-swap from null. The
/// piece is held by an [`Owner`] `O` (a Box unless told).
pub(crate) struct AtomicBox<T, O: Owner<Target = T> = Box<T>> {
    ptr: AtomicPtr<T>,
    /// Owns an `O` (drop check), and is neither `Send` nor `Sync` by itself (see below).
    _owns: PhantomData<*mut O>,
}

// SAFETY: an AtomicBox hands out `&T` to any thread (T: Sync) and the thread that frees a `T`
// may not be the one that made it (T: Send), as for a `Box<T>` shared behind a lock.
unsafe impl<T: Send + Sync, O: Owner<Target = T>> Send for AtomicBox<T, O> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync, O: Owner<Target = T>> Sync for AtomicBox<T, O> {}

impl<T, O: Owner<Target = T>> AtomicBox<T, O> {
    /// Null.
    pub(crate) const fn new() -> Self {
        AtomicBox {
            ptr: AtomicPtr::new(ptr::null_mut()),
            _owns: PhantomData,
        }
    }

    /// The piece, if any, valid as long as the guard and the borrow of `self`.
    #[inline(always)]
    pub(crate) fn get<'a>(&'a self, _guard: &'a Guard) -> Option<&'a T> {
        let p = self.ptr.load(Acquire);
        // SAFETY: a non-null pointer stored here comes from `Box::into_raw` (get_or_init). It is
        // freed only by `drop` (which needs `&mut self`, excluded by the borrow of `self`) or,
        // once unlinked by `retire`, by the owner of a Limbo after a grace period that started
        // after the unlink; such a grace period waits for this thread's guard to end, if this
        // load saw the pointer (module documentation). So it stays valid for 'a.
        unsafe { p.as_ref() }
    }

    /// The piece, made by `make` and installed if there is none; true when this call installed
    /// it (a racing installer's piece is dropped, never published).
    #[inline]
    pub(crate) fn get_or_init<'a>(
        &'a self,
        guard: &'a Guard,
        make: impl FnOnce() -> O,
    ) -> (&'a T, bool) {
        if let Some(t) = self.get(guard) {
            return (t, false);
        }
        let new = make().into_raw();
        match self
            .ptr
            .compare_exchange(ptr::null_mut(), new, SeqCst, Acquire)
        {
            // SAFETY: `new` is published, and valid for 'a as in `get`.
            Ok(_) => (unsafe { &*new }, true),
            Err(current) => {
                // SAFETY: `new` came from into_raw above and was never published.
                drop(unsafe { O::from_raw(new) });
                // SAFETY: `current` is non-null (the exchange from null failed); valid for 'a as
                // in `get`.
                (unsafe { &*current }, false)
            }
        }
    }

    /// The piece, with exclusive access (no reader can hold it: they borrow `self`).
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        // SAFETY: as in `get`; `&mut self` excludes every other access.
        unsafe { self.ptr.get_mut().as_mut() }
    }

    /// Unlinks the piece (the pointer becomes null) into `limbo`, with `tag` (the owner's note
    /// of what it was). False when there was none.
    pub(crate) fn retire(&self, limbo: &mut Limbo<T, O>, tag: u64) -> bool {
        let Some(p) = NonNull::new(self.ptr.swap(ptr::null_mut(), SeqCst)) else {
            return false;
        };
        limbo.newest = Some(GRACE_SEQ.load(SeqCst));
        limbo.pieces.push((p, tag));
        true
    }
}

impl<T, O: Owner<Target = T>> Default for AtomicBox<T, O> {
    fn default() -> Self {
        AtomicBox::new()
    }
}

impl<T, O: Owner<Target = T>> Drop for AtomicBox<T, O> {
    fn drop(&mut self) {
        let p = *self.ptr.get_mut();
        if !p.is_null() {
            // SAFETY: as in `get_mut`; the pointer came from into_raw.
            drop(unsafe { O::from_raw(p) });
        }
    }
}

/// Pieces unlinked by [`AtomicBox::retire`], each with its tag: still valid (readers may use
/// them) until [`Limbo::reclaim`] hands them back after a grace period.
pub(crate) struct Limbo<T, O: Owner<Target = T> = Box<T>> {
    pieces: Vec<(NonNull<T>, u64)>,
    /// [`GRACE_SEQ`] at the newest retire, None when empty.
    newest: Option<u64>,
    /// Owns `O`s.
    _owns: PhantomData<O>,
}

// SAFETY: as for AtomicBox: the pieces are shared with readers (T: Sync) and freed by the
// owner's thread (T: Send).
unsafe impl<T: Send + Sync, O: Owner<Target = T>> Send for Limbo<T, O> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync, O: Owner<Target = T>> Sync for Limbo<T, O> {}

impl<T, O: Owner<Target = T>> Limbo<T, O> {
    /// Empty.
    pub(crate) const fn new() -> Self {
        Limbo {
            pieces: Vec::new(),
            newest: None,
            _owns: PhantomData,
        }
    }

    /// Whether no piece waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Bytes of the list itself (the pieces are the owner's to count).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.pieces.capacity() * std::mem::size_of::<(NonNull<T>, u64)>()
    }

    /// The waiting pieces with their tags (readers may be using them at the same time).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&T, u64)> {
        // SAFETY: a piece in limbo is freed only by `reclaim` or `drop`, which need `&mut self`.
        self.pieces
            .iter()
            .map(|&(p, tag)| (unsafe { p.as_ref() }, tag))
    }

    /// Hands every piece to `f` as its owner when `grace` covers them all (it started after
    /// the newest retire); else keeps them and returns false.
    pub(crate) fn reclaim(&mut self, grace: &Grace, mut f: impl FnMut(O, u64)) -> bool {
        if self.newest.is_some_and(|n| n > grace.covers) {
            return false;
        }
        for (p, tag) in std::mem::take(&mut self.pieces) {
            // SAFETY: unlinked before the grace period started (`newest` <= `covers`), so no
            // reader holds it any more; it came from into_raw and leaves the limbo here.
            f(unsafe { O::from_raw(p.as_ptr()) }, tag);
        }
        self.newest = None;
        true
    }
}

impl<T, O: Owner<Target = T>> Drop for Limbo<T, O> {
    /// Frees the pieces after a grace period; leaks them if there is none (never frees a piece
    /// a reader may hold).
    fn drop(&mut self) {
        if self.pieces.is_empty() {
            return;
        }
        let reclaimed = synchronize().is_some_and(|g| self.reclaim(&g, |b, _| drop(b)));
        if !reclaimed {
            self.pieces.clear();
        }
    }
}

/// Serialises the tests whose threads stay inside guards (writers hammering a hook) with the
/// tests that need grace periods to complete in time: slots are process-wide, so a grace
/// period waits for every thread of the test binary that is inside a guard.
#[cfg(test)]
pub(crate) fn test_exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many of the pages of `[addr, addr + len)` no mapping of this process covers (from
/// /proc/self/maps; the kernel merges neighbouring anonymous mappings, so a range is no
/// mapping of its own there).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn unmapped_pages(addr: usize, len: usize) -> usize {
    let maps: Vec<(usize, usize)> = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    (addr..addr + len)
        .step_by(4096)
        .filter(|&p| !maps.iter().any(|&(a, b)| a <= p && p < b))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Counts live pieces: a piece freed while a reader holds it would be seen dead.
    struct Piece {
        alive: AtomicU64,
        live: Arc<AtomicUsize>,
    }
    impl Drop for Piece {
        fn drop(&mut self) {
            self.alive.store(0, SeqCst);
            self.live.fetch_sub(1, SeqCst);
        }
    }

    /// A piece in pages of its own is built in place, sits alone in its mapping, drops its
    /// elements, and gives the mapping back when dropped.
    #[test]
    #[cfg(target_os = "linux")]
    fn pages_are_a_mapping_of_their_own_and_given_back() {
        struct Counted(u64, Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.1.fetch_add(1, SeqCst);
            }
        }
        // 25 pages: a size nothing else in the process maps.
        const N: usize = 25 * 4096 / 16;
        let dropped = Arc::new(AtomicUsize::new(0));
        let p = Pages::<[Counted; N]>::from_fn(|i| Counted(i as u64 * 3, dropped.clone()));
        assert!(p.iter().enumerate().all(|(i, c)| c.0 == i as u64 * 3));
        let addr = p.ptr.as_ptr() as usize;
        assert_eq!(addr % 4096, 0);
        assert_eq!(unmapped_pages(addr, 25 * 4096), 0);
        // Stored raw and taken back, as an AtomicBox does.
        let cell = AtomicBox::<[Counted; N], Pages<_>>::new();
        let g = pin();
        let (q, made) = cell.get_or_init(&g, || p);
        assert!(made && q.as_ptr() as usize == addr);
        drop(g);
        drop(cell);
        assert_eq!(dropped.load(SeqCst), N);
        // Other threads of the test binary may map pieces in the hole meanwhile, not all of
        // it.
        assert!(
            unmapped_pages(addr, 25 * 4096) > 0,
            "the mapping is given back"
        );
    }

    #[test]
    fn nested_guards_and_slot_reuse() {
        let _x = test_exclusive();
        let g1 = pin();
        let g2 = pin();
        assert!(matches!(g2.kind, Kind::Nested));
        drop(g2);
        // Inside a guard, this thread cannot end a grace period.
        assert!(synchronize().is_none());
        drop(g1);
        if reclaim_supported() {
            assert!(synchronize().is_some());
        }
        // Threads that come and go reuse slots.
        let before = slots().count();
        for _ in 0..32 {
            std::thread::spawn(|| drop(pin())).join().unwrap();
        }
        assert!(slots().count() <= before + 2);
    }

    /// Readers load and check pieces while the owner retires and frees them: no reader ever
    /// sees a freed piece, and every piece is freed.
    #[test]
    fn readers_never_see_a_freed_piece() {
        if !reclaim_supported() {
            return;
        }
        let _x = test_exclusive();
        let live = Arc::new(AtomicUsize::new(0));
        let cell = Arc::new(AtomicBox::<Piece>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (cell, stop, live) = (cell.clone(), stop.clone(), live.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Relaxed) {
                        let g = pin();
                        let (p, made) = cell.get_or_init(&g, || {
                            live.fetch_add(1, SeqCst);
                            Box::new(Piece {
                                alive: AtomicU64::new(1),
                                live: live.clone(),
                            })
                        });
                        let _ = made;
                        for _ in 0..16 {
                            assert_eq!(p.alive.load(SeqCst), 1, "use after free");
                        }
                        seen += 1;
                    }
                    seen
                })
            })
            .collect();
        let mut limbo = Limbo::new();
        let mut freed = 0;
        let start = Instant::now();
        while freed < 2000 && start.elapsed() < Duration::from_secs(60) {
            cell.retire(&mut limbo, 0);
            if let Some(g) = synchronize() {
                limbo.reclaim(&g, |b, _| {
                    freed += 1;
                    drop(b)
                });
            }
        }
        stop.store(true, SeqCst);
        let seen: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        drop(limbo);
        drop(Arc::try_unwrap(cell).ok().unwrap());
        // A reclaim frees every piece whose grace period passed: the last one may go past 2000.
        assert!(seen > 0 && freed >= 2000, "{seen} {freed}");
        assert_eq!(live.load(SeqCst), 0);
    }
}
