"""Bookkeeping shared by images, bitmaps, iterators and transactions, so that no freed C handle
is ever passed to libqdirty.

Each :class:`~qdirty.Image` owns an :class:`ImageState`: its handle, the Python wrappers of its
bitmaps (weakly, by address), the iterators not yet freed and the transactions with prepared
actions on it. Finalizers only ever see these state objects, never the Python objects, so they
run correctly in any order (e.g. when an image and its iterators are collected together).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

from . import _ffi
from ._common import addr, lib

if TYPE_CHECKING:  # pragma: no cover
    from ._bitmap import Bitmap


class ImageState:
    """The C side of one image, as far as Python knows it."""

    def __init__(self, handle: Any, io: Any = None) -> None:
        self.handle: Optional[Any] = handle
        self.bitmaps: "weakref.WeakValueDictionary[int, Bitmap]" = weakref.WeakValueDictionary()
        self.iters: Dict[int, Any] = {}
        self.txns: Set["TxnState"] = set()
        self.io = io  # keeps the embedding callbacks alive until the image is closed

    def live_addresses(self) -> Set[int]:
        """The addresses of every bitmap the image has now."""
        out: Set[int] = set()
        if self.handle is None:
            return out
        p = lib.qdirty_image_first_bitmap(self.handle)
        while p:
            out.add(addr(p))
            p = lib.qdirty_bitmap_next(p)
        return out

    def sync(self, why: str = "it no longer exists") -> None:
        """Invalidates the wrappers of bitmaps the image no longer has."""
        live = self.live_addresses()
        for key, bm in list(self.bitmaps.items()):
            if key not in live:
                bm._invalidate(why)
                self.bitmaps.pop(key, None)

    def forget(self, key: int, why: str) -> None:
        bm = self.bitmaps.pop(key, None)
        if bm is not None:
            bm._invalidate(why)

    def shutdown(self) -> Optional[Any]:
        """Ends prepared transactions, frees iterators, invalidates bitmaps and closes the
        image. Returns the close error (a ``qdirty_error *``, caller frees) or None."""
        handle = self.handle
        if handle is None:
            return None
        for ts in list(self.txns):
            res = ts.end(commit=False)  # abort, quietly
            if res is not None and res[0]:
                lib.qdirty_error_free(res[0])
        for it in list(self.iters.values()):
            lib.qdirty_iter_free(it)
        self.iters.clear()
        for bm in list(self.bitmaps.values()):
            bm._invalidate("its image was closed")
        self.bitmaps.clear()
        self.handle = None
        err = _ffi.ErrorP()
        rc = lib.qdirty_image_close(handle, ctypes.byref(err))
        if rc < 0:
            return (err, -rc)
        return None


def finalize_image(state: ImageState) -> None:
    """Finalizer of an Image never closed: closes it, ignoring errors."""
    res = state.shutdown()
    if res is not None and res[0]:
        lib.qdirty_error_free(res[0])


class TxnState:
    """The C side of one transaction."""

    def __init__(self, handle: Any) -> None:
        self.handle: Optional[Any] = handle
        self.images: Dict[int, ImageState] = {}
        self.pending = False

    def touch(self, image: ImageState) -> None:
        self.images[id(image)] = image
        image.txns.add(self)
        self.pending = True

    def end(self, commit: bool) -> Optional[Any]:
        """Commits or aborts; the transaction is empty afterwards. Returns (error, errno) on
        failure (the caller frees the error) or None."""
        result = None
        if self.handle is not None and self.pending:
            err = _ffi.ErrorP()
            fn = lib.qdirty_txn_commit if commit else lib.qdirty_txn_abort
            rc = fn(self.handle, ctypes.byref(err))
            if rc < 0:
                result = (err, -rc)
        self.pending = False
        images: List[ImageState] = list(self.images.values())
        self.images.clear()
        for st in images:
            st.txns.discard(self)
        for st in images:
            st.sync("its transaction released it")
        return result

    def __hash__(self) -> int:
        return id(self)


def finalize_txn(ts: TxnState) -> None:
    """Finalizer of a Transaction: aborts prepared actions, then frees it."""
    res = ts.end(commit=False)
    if res is not None and res[0]:
        lib.qdirty_error_free(res[0])
    if ts.handle is not None:
        lib.qdirty_txn_free(ts.handle)
        ts.handle = None
