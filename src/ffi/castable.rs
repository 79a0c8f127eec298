//! The one way a C pointer becomes a Rust object and back, for every object type of the header
//! (`qdirty_image`, `qdirty_bitmap`, `qdirty_txn`, `qdirty_iter`, `qdirty_backup`,
//! `qdirty_error`).
//!
//! Each C type is an opaque struct of the header that implements [`Castable`]: it names the
//! Rust object its pointers point to, who frees that object ([`Ownership`]), and a tag. The
//! object lives in a [`Tagged`] box, `repr(C)` with the tag first, so that a pointer that is not
//! a live object of that type (another type's, a freed one, garbage) is recognized by reading
//! only its first 8 bytes, whatever the size of the rest; freeing clears the tag (best effort
//! against use after free). Two ownership kinds, as rustls-ffi's `Castable` has (its `Arc` kind
//! has no use here: no C object shares ownership of another):
//!
//! - [`OwnedByCaller`] (a `Box`): C owns the object from its constructor ([`to_raw`]) until its
//!   destructor ([`take`]): images, transactions, iterators, backups, errors.
//! - [`OwnedByParent`]: another object owns it, and C only borrows it: the bitmap handles, which
//!   their image keeps in a [`Children`] map. Such a handle is freed only when its owner is
//!   (a bitmap handle when its image is closed), never before, so its pointer stays safe to
//!   pass for the owner's whole life: the handle names its object by a key that is never reused
//!   (a `BitmapId`), every call looks the object up, and a call on the handle of an object that
//!   is gone fails with ENOENT (`handle::BitmapHandle::gone`) rather than reaching another one.

use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::error::FfiError;

/// Who frees the object behind a C pointer: [`OwnedByCaller`] or [`OwnedByParent`].
pub(crate) trait Ownership {}

/// C owns the object (a `Box`): [`to_raw`] hands it out, [`take`] takes it back.
pub(crate) enum OwnedByCaller {}
impl Ownership for OwnedByCaller {}

/// Another object owns it through a [`Children`] map, which frees it when dropped; C never does.
pub(crate) enum OwnedByParent {}
impl Ownership for OwnedByParent {}

/// An opaque C type of the header and what its pointers really point to.
pub(crate) trait Castable {
    /// The Rust object behind the pointer.
    type RustType;
    /// Who frees it.
    type Ownership: Ownership;
    /// The tag of a live object of this type (eight ASCII letters, "qdirtyXX").
    const MAGIC: u64;
    /// What follows the argument's name in the EINVAL message for a pointer that is not a live
    /// object of this type (e.g. "is not a valid qdirty_txn").
    const NOT_LIVE: &'static str;
}

/// What every C pointer points to. `repr(C)` with the tag first (see the module documentation).
#[repr(C)]
struct Tagged<T> {
    magic: u64,
    value: T,
}

/// Clears the tag of an object about to be freed, so that a stale pointer to it is refused.
fn clear_tag<T>(t: &mut Tagged<T>) {
    // SAFETY: a plain write to a field of a live object (volatile, so that it is not dropped as
    // a dead store before the free).
    unsafe { std::ptr::write_volatile(&mut t.magic, 0) };
}

/// Hands a new object to C, which owns it until [`take`].
pub(crate) fn to_raw<C: Castable<Ownership = OwnedByCaller>>(value: C::RustType) -> *mut C {
    Box::into_raw(Box::new(Tagged {
        magic: C::MAGIC,
        value,
    }))
    .cast()
}

/// The tagged object behind `p`, if it is a live object of type `C`.
///
/// # Safety
/// `p` is NULL or a pointer handed out for some [`Castable`] type (by [`to_raw`] or a
/// [`Children`] map) whose object is not yet freed.
#[inline(always)]
unsafe fn tagged<'a, C: Castable>(p: *const C) -> Option<&'a Tagged<C::RustType>> {
    // SAFETY: caller's contract: NULL or a live Tagged box, whose first 8 bytes are its tag.
    let t = unsafe { p.cast::<Tagged<C::RustType>>().as_ref() }?;
    (t.magic == C::MAGIC).then_some(t)
}

/// The error for NULL or a pointer that is not a live `C`.
fn refused<C: Castable>(p: *const C, what: &str) -> FfiError {
    if p.is_null() {
        FfiError::null_arg(what)
    } else {
        FfiError::invalid(format!("{what} {}", C::NOT_LIVE))
    }
}

/// The object behind `p`, for calls that do not report errors (the write hook, the getters of
/// an error): None for NULL or a pointer that is not a live `C`. Builds no error, so that it
/// inlines into the hook as two loads and a compare.
///
/// # Safety
/// As [`try_ref`].
#[inline(always)]
pub(crate) unsafe fn peek<'a, C: Castable>(p: *const C) -> Option<&'a C::RustType> {
    // SAFETY: caller's contract.
    unsafe { tagged::<C>(p) }.map(|t| &t.value)
}

/// Borrows the object behind `p`; `what` names the argument in the error (EINVAL for NULL or a
/// pointer that is not a live `C`).
///
/// # Safety
/// `p` is NULL or a pointer handed out for some [`Castable`] type whose object is not yet
/// freed, and stays so for `'a`. Objects that several threads may use at once are only
/// borrowed shared (their interior is locked).
pub(crate) unsafe fn try_ref<'a, C: Castable>(
    p: *const C,
    what: &str,
) -> Result<&'a C::RustType, FfiError> {
    // SAFETY: caller's contract.
    unsafe { peek::<C>(p) }.ok_or_else(|| refused(p, what))
}

/// Borrows mutably an object that C owns and uses from one thread at a time (a transaction, an
/// iterator, a backup: documented so in the header).
///
/// # Safety
/// As [`try_ref`], and no other borrow of the object is alive during `'a`.
pub(crate) unsafe fn try_mut<'a, C: Castable<Ownership = OwnedByCaller>>(
    p: *mut C,
    what: &str,
) -> Result<&'a mut C::RustType, FfiError> {
    // SAFETY: caller's contract.
    unsafe { tagged::<C>(p) }.ok_or_else(|| refused(p, what))?;
    // SAFETY: a live object (checked above) that nothing else borrows (caller's contract).
    Ok(unsafe { &mut (*p.cast::<Tagged<C::RustType>>()).value })
}

/// Takes an object back from C (its close or free): checked as [`try_ref`] checks it, then its
/// tag is cleared and its memory freed.
///
/// # Safety
/// As [`try_ref`]; C gives up the pointer, and no borrow of the object is alive.
pub(crate) unsafe fn take<C: Castable<Ownership = OwnedByCaller>>(
    p: *mut C,
    what: &str,
) -> Result<C::RustType, FfiError> {
    // SAFETY: caller's contract.
    unsafe { tagged::<C>(p) }.ok_or_else(|| refused(p, what))?;
    // SAFETY: checked above: a live object that came from `to_raw`'s Box::into_raw, freed once
    // (its tag is cleared here, so a second take is refused while the memory is not reused).
    let mut b = unsafe { Box::from_raw(p.cast::<Tagged<C::RustType>>()) };
    clear_tag(&mut b);
    Ok(b.value)
}

/// The objects a parent owns on C's behalf ([`OwnedByParent`]), by key: created on first use,
/// freed together when the map is dropped (with its parent), never one by one. Raw pointers
/// (from `Box::into_raw`), so that moving the map never moves what C points to.
pub(crate) struct Children<K, C: Castable<Ownership = OwnedByParent>> {
    map: HashMap<K, NonNull<Tagged<C::RustType>>>,
    _c: PhantomData<*const C>,
}

impl<K, C: Castable<Ownership = OwnedByParent>> Default for Children<K, C> {
    fn default() -> Self {
        Children {
            map: HashMap::new(),
            _c: PhantomData,
        }
    }
}

impl<K: Eq + Hash, C: Castable<Ownership = OwnedByParent>> Children<K, C> {
    /// The object of `key`, if it was created.
    pub(crate) fn get(&self, key: &K) -> Option<&C::RustType> {
        // SAFETY: the map's pointers are live until the map drops.
        self.map.get(key).map(|p| unsafe { &p.as_ref().value })
    }

    /// C's pointer to the object of `key`, created by `make` on first use; NULL if `make`
    /// gives nothing.
    pub(crate) fn get_or_insert_with(
        &mut self,
        key: K,
        make: impl FnOnce() -> Option<C::RustType>,
    ) -> *mut C {
        if let Some(p) = self.map.get(&key) {
            return p.as_ptr().cast();
        }
        let Some(value) = make() else {
            return std::ptr::null_mut();
        };
        let p = NonNull::from(Box::leak(Box::new(Tagged {
            magic: C::MAGIC,
            value,
        })));
        self.map.insert(key, p);
        p.as_ptr().cast()
    }
}

impl<K, C: Castable<Ownership = OwnedByParent>> Drop for Children<K, C> {
    fn drop(&mut self) {
        for (_, p) in self.map.drain() {
            // SAFETY: every pointer in the map came from Box::leak and leaves the map before it
            // is freed, so it is freed exactly once.
            let mut b = unsafe { Box::from_raw(p.as_ptr()) };
            clear_tag(&mut b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned;
    impl Castable for Owned {
        type RustType = u32;
        type Ownership = OwnedByCaller;
        const MAGIC: u64 = 1;
        const NOT_LIVE: &'static str = "is not an Owned";
    }

    struct Borrowed;
    impl Castable for Borrowed {
        type RustType = String;
        type Ownership = OwnedByParent;
        const MAGIC: u64 = 2;
        const NOT_LIVE: &'static str = "is not a Borrowed";
    }

    #[test]
    fn a_pointer_of_another_type_is_refused() {
        let mut kids = Children::<u8, Borrowed>::default();
        let b = kids.get_or_insert_with(7, || Some("seven".to_owned()));
        // SAFETY: a live Borrowed, passed as an Owned: only its tag is read.
        let e = unsafe { try_ref::<Owned>(b.cast(), "x") }.unwrap_err();
        assert_eq!(
            (e.errno, e.message.as_str()),
            (libc::EINVAL, "x is not an Owned")
        );
        // SAFETY: NULL.
        let e = unsafe { try_ref::<Owned>(std::ptr::null(), "x") }.unwrap_err();
        assert_eq!(e.errno, libc::EINVAL);
        let o = to_raw::<Owned>(5);
        // SAFETY: a live Owned.
        assert_eq!(unsafe { take(o, "o") }.unwrap(), 5);
    }

    #[test]
    fn children_keep_one_pointer_per_key() {
        let mut kids = Children::<u8, Borrowed>::default();
        let a = kids.get_or_insert_with(1, || Some("one".to_owned()));
        assert!(kids.get_or_insert_with(2, || None).is_null());
        for k in 3..100 {
            kids.get_or_insert_with(k, || Some(k.to_string()));
        }
        // The map grew and moved; the first object did not.
        assert_eq!(kids.get_or_insert_with(1, || unreachable!()), a);
        // SAFETY: a live child of `kids`.
        assert_eq!(unsafe { try_ref(a, "a") }.unwrap(), "one");
        assert_eq!(kids.get(&1).map(String::as_str), Some("one"));
    }
}
