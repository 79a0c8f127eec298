"""Transactions: bitmap actions on one or several images, all or nothing (QEMU's
``transaction`` QMP command)."""

from __future__ import annotations

import errno as _errno
import weakref
from typing import Any, List, Optional, Tuple, Union

from ._bitmap import Bitmap
from ._common import Name, QdirtyError, check_ptr, check_rc, encode_name, lib, take_error, uint
from ._image import Image, bitmap_flags
from ._state import TxnState, finalize_txn
from ._warn import emit, public

Target = Union[Image, Bitmap]


@public
class Transaction:
    """A transaction. Each action (:meth:`add`, :meth:`clear`, :meth:`enable`,
    :meth:`disable`, :meth:`merge`, :meth:`remove`) takes effect at once and raises on its own;
    :meth:`commit` makes them all final, :meth:`abort` undoes them all exactly, in reverse
    order.

    As a context manager it commits on normal exit and aborts when an exception leaves the
    block, then frees itself::

        with qdirty.Transaction() as txn:
            txn.add(img, "backup-1", persistent=True)
            txn.clear(img, "backup-0")

    Actions name a bitmap by ``(image, name)``; a named :class:`Bitmap` may be given instead
    (``txn.clear(bm)``). The transaction keeps its images alive; closing an image aborts the
    transactions with prepared actions on it. Not thread-safe: one thread at a time.
    """

    def __init__(self) -> None:
        h = lib.qdirty_txn_new()
        if not h:
            raise QdirtyError(_errno.ENOMEM, "qdirty_txn_new failed")
        self._ts = TxnState(h)
        self._images: List[Image] = []
        self._finalizer = weakref.finalize(self, finalize_txn, self._ts)

    def _h(self) -> Any:
        if self._ts.handle is None:
            raise ValueError("the transaction was freed")
        return self._ts.handle

    def _touch(self, image: Image) -> Any:
        h = self._h()
        ih = image._h()
        self._ts.touch(image._state)
        if all(i is not image for i in self._images):
            self._images.append(image)
        return h, ih

    @staticmethod
    def _target(target: Target, name: Optional[Name]) -> Tuple[Image, bytes]:
        if isinstance(target, Bitmap):
            if name is not None:
                raise TypeError("give a Bitmap, or an Image and a name")
            raw = target.name_bytes
            if raw is None:
                raise ValueError("an anonymous bitmap cannot be named in a transaction")
            target._p()
            return target.image, raw
        if name is None:
            raise TypeError("a bitmap name is needed with an Image")
        return target, encode_name(name)

    @property
    def pending(self) -> bool:
        """Whether actions are prepared (neither committed nor aborted)."""
        return self._ts.pending

    def add(
        self,
        image: Image,
        name: Name,
        granularity: int = 0,
        persistent: bool = False,
        disabled: bool = False,
        autoload: Optional[bool] = None,
    ) -> Bitmap:
        """block-dirty-bitmap-add: adds the bitmap now (as :meth:`Image.add_bitmap`); abort
        releases it (its Bitmap object becomes unusable)."""
        granularity = uint(granularity, "granularity", 32)
        h, ih = self._touch(image)
        p = check_ptr(
            lib.qdirty_txn_add_bitmap,
            h,
            ih,
            encode_name(name),
            granularity,
            bitmap_flags(persistent, disabled, autoload),
            io=image._state.io,
        )
        return image._wrap_new(p)

    def clear(self, image: Target, name: Optional[Name] = None) -> None:
        """block-dirty-bitmap-clear: clears the bitmap now; abort gives the bits back."""
        img, raw = self._target(image, name)
        h, ih = self._touch(img)
        check_rc(lib.qdirty_txn_clear_bitmap, h, ih, raw)

    def enable(self, image: Target, name: Optional[Name] = None) -> None:
        """block-dirty-bitmap-enable: enables the bitmap now; abort restores its state."""
        img, raw = self._target(image, name)
        h, ih = self._touch(img)
        check_rc(lib.qdirty_txn_enable_bitmap, h, ih, raw)

    def disable(self, image: Target, name: Optional[Name] = None) -> None:
        """block-dirty-bitmap-disable: disables the bitmap now; abort restores its state."""
        img, raw = self._target(image, name)
        h, ih = self._touch(img)
        check_rc(lib.qdirty_txn_disable_bitmap, h, ih, raw)

    def merge(self, image: Image, target: Name, source: Name, src_image: Optional[Image] = None) -> None:
        """block-dirty-bitmap-merge: target |= source now (``source`` a bitmap of
        ``src_image``, or of ``image``); abort restores the target."""
        h, ih = self._touch(image)
        sh = None
        if src_image is not None and src_image is not image:
            _, sh = self._touch(src_image)
        check_rc(lib.qdirty_txn_merge_bitmap, h, ih, encode_name(target), sh, encode_name(source))

    def remove(self, image: Target, name: Optional[Name] = None) -> None:
        """block-dirty-bitmap-remove: the bitmap is held (busy, not stored) until commit
        releases it; its stored copy is deleted now. Abort gives it back."""
        img, raw = self._target(image, name)
        h, ih = self._touch(img)
        check_rc(lib.qdirty_txn_remove_bitmap, h, ih, raw, io=img._state.io)

    def _end(self, commit: bool) -> None:
        self._h()
        res = self._ts.end(commit)
        self._images.clear()
        if res is not None:
            raise take_error(*res)

    def commit(self) -> None:
        """Makes every prepared action final (removed bitmaps are released). The transaction is
        empty afterwards, whatever the result."""
        self._end(True)

    def abort(self) -> None:
        """Undoes every prepared action exactly, in reverse order (added bitmaps are
        released). The transaction is empty afterwards, whatever the result."""
        self._end(False)

    def close(self) -> None:
        """Frees the transaction, aborting prepared actions first (no-op when freed)."""
        self._finalizer()
        self._images.clear()

    free = close

    def __enter__(self) -> "Transaction":
        self._h()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                try:
                    self.abort()
                except QdirtyError as e:
                    # The original exception goes on; this one must not vanish with it.
                    emit(f"aborting the transaction after an exception failed too: {e}")
        finally:
            self.close()

    def __repr__(self) -> str:
        if self._ts.handle is None:
            return "<qdirty.Transaction freed>"
        return f"<qdirty.Transaction {'pending' if self.pending else 'empty'}>"

