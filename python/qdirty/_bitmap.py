"""Bitmaps, their backups and their iterators."""

from __future__ import annotations

import ctypes
import itertools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Tuple, TypeVar

from . import _ffi
from ._common import U64_MAX, QdirtyError, addr, check_ptr, check_rc, lib, uint
from ._state import ImageState
from ._warn import public

if TYPE_CHECKING:  # pragma: no cover
    from ._image import Image

_T = TypeVar("_T")

#: :meth:`Bitmap.check` flag (QEMU's BDRV_BITMAP_BUSY): fail if the bitmap is busy.
CHECK_BUSY = _ffi.QDIRTY_CHECK_BUSY
#: :meth:`Bitmap.check` flag (BDRV_BITMAP_RO): fail if the bitmap is readonly.
CHECK_RO = _ffi.QDIRTY_CHECK_RO
#: :meth:`Bitmap.check` flag (BDRV_BITMAP_INCONSISTENT): fail if the bitmap is inconsistent.
CHECK_INCONSISTENT = _ffi.QDIRTY_CHECK_INCONSISTENT
#: BUSY | RO | INCONSISTENT: for operations that change bits (BDRV_BITMAP_DEFAULT).
CHECK_DEFAULT = _ffi.QDIRTY_CHECK_DEFAULT
#: BUSY | INCONSISTENT: for operations that read or change state (BDRV_BITMAP_ALLOW_RO).
CHECK_ALLOW_RO = _ffi.QDIRTY_CHECK_ALLOW_RO


def _pieces(runs: Iterable[Tuple[int, int]], max_len: int) -> Iterator[Tuple[int, int]]:
    """``runs`` cut into pieces at most ``max_len`` bytes long, in order."""
    for off, length in runs:
        while length > 0:
            piece = min(length, max_len)
            yield off, piece
            off += piece
            length -= piece


@public
class Backup:
    """The bits a bitmap had before :meth:`Bitmap.clear_with_backup` or
    :meth:`Bitmap.merge` changed them (QEMU's HBitmap backup).

    Give it to :meth:`Bitmap.restore` to put the bits back (which leaves it empty). Free it with
    :meth:`free` or a ``with`` block; a collected Backup is freed.
    """

    def __init__(self, handle: Any) -> None:
        self._handle: Optional[Any] = handle
        self._finalizer = weakref.finalize(self, lib.qdirty_backup_free, handle)

    def _h(self) -> Any:
        if self._handle is None:
            raise ValueError("the backup was freed")
        return self._handle

    def free(self) -> None:
        """Frees the backup (no-op when already freed)."""
        self._handle = None
        self._finalizer()

    close = free

    @property
    def freed(self) -> bool:
        """Whether :meth:`free` was called."""
        return self._handle is None

    def __enter__(self) -> "Backup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"<qdirty.Backup {'freed' if self.freed else 'live'}>"


def _free_iter(state: ImageState, key: int) -> None:
    h = state.iters.pop(key, None)
    if h is not None and state.handle is not None:
        lib.qdirty_iter_free(h)


@public
class DirtyIterator:
    """An iterator over the dirty granules of a bitmap (QEMU's ``BdrvDirtyBitmapIter``),
    yielding the offset of each dirty granule in increasing order.

    While it lives the bitmap cannot be released nor the image truncated: close it (or use a
    ``with`` block). Closing its image closes it too. :meth:`seek` moves it; iteration stops at
    the end but may resume after a seek.
    """

    def __init__(self, bitmap: "Bitmap", handle: Any) -> None:
        self._bitmap = bitmap
        self._state: ImageState = bitmap._image._state
        self._key = addr(handle)
        self._state.iters[self._key] = handle
        self._finalizer = weakref.finalize(self, _free_iter, self._state, self._key)

    def _h(self) -> Any:
        h = self._state.iters.get(self._key)
        if h is None or not self._finalizer.alive:
            raise ValueError("the iterator is closed")
        return h

    @property
    def bitmap(self) -> "Bitmap":
        """The bitmap iterated over."""
        return self._bitmap

    def __iter__(self) -> "DirtyIterator":
        return self

    def __next__(self) -> int:
        """The next dirty granule's offset. :class:`QdirtyError` when the bitmap is (or
        becomes, e.g. its data unreadable) inconsistent, or is gone: never a silent end."""
        h = self._h()
        bh = self._bitmap._p()
        check_rc(lib.qdirty_bitmap_check, bh, CHECK_INCONSISTENT)
        r = lib.qdirty_iter_next(h)
        if r == -1:
            raise StopIteration
        if r < 0:
            # -errno: the iteration cannot go on (the bitmap is gone, its data unreadable).
            check_rc(lib.qdirty_bitmap_check, bh, CHECK_INCONSISTENT)
            raise QdirtyError(-int(r), "the iteration could not go on")
        return int(r)

    def seek(self, offset: int) -> None:
        """The next offset returned is the first dirty granule at or after the granule
        containing ``offset`` (EINVAL at or beyond the bitmap's size)."""
        offset = uint(offset, "offset")
        check_rc(lib.qdirty_iter_seek, self._h(), offset)

    def close(self) -> None:
        """Frees the iterator (no-op when already closed)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether the iterator was closed (by :meth:`close` or by closing the image)."""
        return not self._finalizer.alive or self._key not in self._state.iters

    def __enter__(self) -> "DirtyIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@public
class Bitmap:
    """A dirty bitmap of an :class:`~qdirty.Image`. Obtained from the image (or a transaction),
    never created directly; the same C bitmap always gives the same Bitmap object while it is
    referenced.

    A Bitmap keeps its image alive. Once the C bitmap is gone (removed, released, abdicated,
    reclaimed, dropped by a transaction) or its image is closed, every use raises
    ``ValueError`` instead of touching freed memory.
    """

    def __init__(self, image: "Image", handle: Any) -> None:
        self._image = image
        self._handle: Optional[Any] = handle
        self._why = ""
        self._last_name: Optional[bytes] = lib.qdirty_bitmap_name(handle)

    # -- handle ------------------------------------------------------------------------------

    def _invalidate(self, why: str) -> None:
        self._handle = None  # the C bitmap may be freed already: do not read it
        self._why = why

    def _p(self) -> Any:
        h = self._handle
        if h is None:
            raise ValueError(f"{self._label()} cannot be used: {self._why}")
        return h

    def _label(self) -> str:
        return f"bitmap {self._last_name.decode('utf-8', 'replace')!r}" if self._last_name else "anonymous bitmap"

    @property
    def valid(self) -> bool:
        """Whether the bitmap still exists (not removed, released, ... and its image open)."""
        return self._handle is not None

    def __repr__(self) -> str:
        if self._handle is None:
            return f"<qdirty.Bitmap {self._label()} ({self._why})>"
        return f"<qdirty.Bitmap {self.name!r}>"

    # -- properties --------------------------------------------------------------------------

    @property
    def image(self) -> "Image":
        """The image the bitmap belongs to."""
        return self._image

    @property
    def name_bytes(self) -> Optional[bytes]:
        """The name as bytes; None for an anonymous bitmap."""
        if self._handle is not None:
            self._last_name = lib.qdirty_bitmap_name(self._handle)
        return self._last_name

    @property
    def name(self) -> Optional[str]:
        """The name (undecodable bytes escaped with surrogateescape); None for an anonymous
        bitmap (a successor, or :meth:`Image.create_bitmap` without a name)."""
        raw = self.name_bytes
        return raw.decode("utf-8", "surrogateescape") if raw is not None else None

    @property
    def granularity(self) -> int:
        """The granularity in bytes."""
        return int(lib.qdirty_bitmap_granularity(self._p()))

    @property
    def size(self) -> int:
        """The number of bytes covered (the disk size)."""
        return int(lib.qdirty_bitmap_size(self._p()))

    @property
    def enabled(self) -> bool:
        """Whether guest writes are recorded (stored with the ``auto`` flag)."""
        return bool(lib.qdirty_bitmap_enabled(self._p()))

    @property
    def persistent(self) -> bool:
        """Whether the bitmap is stored in the image."""
        return bool(lib.qdirty_bitmap_persistent(self._p()))

    @property
    def inconsistent(self) -> bool:
        """Whether the bitmap was found in use on open (only removal is allowed)."""
        return bool(lib.qdirty_bitmap_inconsistent(self._p()))

    @property
    def readonly(self) -> bool:
        """Whether the bitmap's bits cannot change (read-only image, or :meth:`set_readonly`)."""
        return bool(lib.qdirty_bitmap_readonly(self._p()))

    @property
    def busy(self) -> bool:
        """Whether an operation holds the bitmap (successor, export, transactional remove)."""
        return bool(lib.qdirty_bitmap_busy(self._p()))

    @property
    def recording(self) -> bool:
        """QEMU's ``recording``: enabled, or frozen with an enabled successor."""
        return bool(lib.qdirty_bitmap_recording(self._p()))

    @property
    def has_successor(self) -> bool:
        """Whether the bitmap is frozen by :meth:`create_successor`."""
        return bool(lib.qdirty_bitmap_has_successor(self._p()))

    @property
    def skip_store(self) -> bool:
        """Whether the bitmap is left out of the next store even if persistent."""
        return bool(lib.qdirty_bitmap_skip_store(self._p()))

    # -- state -------------------------------------------------------------------------------

    def check(self, flags: int = CHECK_DEFAULT) -> None:
        """QEMU's gatekeeper: raises :class:`QdirtyError` with QEMU's message if the bitmap is in
        a state ``flags`` forbids (checked in the order BUSY (EBUSY), RO (EPERM),
        INCONSISTENT (EINVAL)). ``flags``: ``CHECK_*`` constants; 0 always passes."""
        check_rc(lib.qdirty_bitmap_check, self._p(), flags)

    def set_busy(self, busy: bool = True) -> None:
        """Sets or clears the busy flag (no checks)."""
        check_rc(lib.qdirty_bitmap_set_busy, self._p(), bool(busy))

    def set_readonly(self, readonly: bool = True) -> None:
        """Sets or clears the readonly flag (no checks)."""
        check_rc(lib.qdirty_bitmap_set_readonly, self._p(), bool(readonly))

    def set_persistence(self, persistent: bool) -> None:
        """Sets or clears the persistent flag (no checks: a bitmap that cannot be stored makes
        the next store fail)."""
        check_rc(lib.qdirty_bitmap_set_persistence, self._p(), bool(persistent))

    def set_skip_store(self, skip: bool = True) -> None:
        """Sets or clears skip_store (no checks)."""
        check_rc(lib.qdirty_bitmap_set_skip_store, self._p(), bool(skip))

    def set_inconsistent(self) -> None:
        """Marks a persistent bitmap inconsistent (and disabled); there is no way back."""
        check_rc(lib.qdirty_bitmap_set_inconsistent, self._p())

    def enable(self) -> None:
        """Starts recording guest writes (QMP ``block-dirty-bitmap-enable``)."""
        check_rc(lib.qdirty_bitmap_enable, self._p())

    def disable(self) -> None:
        """Stops recording guest writes (QMP ``block-dirty-bitmap-disable``)."""
        check_rc(lib.qdirty_bitmap_disable, self._p())

    def release(self) -> None:
        """Drops the bitmap from memory (QEMU's ``bdrv_release_dirty_bitmap``); a stored copy
        stays in the file. Refused (EINVAL) while busy, frozen or iterated. The Bitmap object is
        unusable afterwards."""
        h = self._p()
        check_rc(lib.qdirty_bitmap_release, h)
        self._image._state.forget(addr(h), "it was released")

    # -- bits --------------------------------------------------------------------------------

    def set_dirty(self, offset: int, length: int) -> None:
        """Marks [offset, offset + length) dirty, rounded outward to granules (works on
        disabled bitmaps too)."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        check_rc(lib.qdirty_bitmap_set_dirty, self._p(), offset, length)

    def reset_dirty(self, offset: int, length: int) -> None:
        """Clears [offset, offset + length); granule-aligned, except a length reaching the
        end."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        check_rc(lib.qdirty_bitmap_reset_dirty, self._p(), offset, length)

    def clear(self) -> None:
        """Clears every bit (QMP ``block-dirty-bitmap-clear``)."""
        check_rc(lib.qdirty_bitmap_clear, self._p())

    def clear_with_backup(self) -> Backup:
        """Clears every bit and returns the old bits, for :meth:`restore`."""
        bp = _ffi.BackupP()
        check_rc(lib.qdirty_bitmap_clear_with_backup, self._p(), ctypes.byref(bp))
        return Backup(bp)

    def restore(self, backup: Backup) -> None:
        """Puts back the bits saved in ``backup`` (which is left empty, not freed)."""
        check_rc(lib.qdirty_bitmap_restore, self._p(), backup._h())

    def merge(self, src: "Bitmap", backup: bool = False) -> Optional[Backup]:
        """self |= src (QEMU's ``bdrv_merge_dirty_bitmap``), between any two bitmaps, of any
        images of the same size. With ``backup=True`` returns this bitmap's previous bits."""
        if backup:
            bp = _ffi.BackupP()
            check_rc(lib.qdirty_bitmap_merge, self._p(), src._p(), ctypes.byref(bp))
            return Backup(bp)
        check_rc(lib.qdirty_bitmap_merge, self._p(), src._p(), None)
        return None

    # Reads. A bitmap that cannot be used must never read as clean: each read runs
    # qdirty_bitmap_check(INCONSISTENT) first, which fails for an inconsistent bitmap, loads the
    # data of one still on disk (failing with EIO when it cannot be read) and fails with ENOENT
    # for one that no longer exists. The check runs again after reads whose C function has no
    # error channel: if such a read had to load the data and could not, the check fails too
    # (the data still cannot be read, or the failed load marked the bitmap inconsistent).
    # dirty_extents needs neither: its C function fails by itself.

    def _check_readable(self, h: Any) -> None:
        check_rc(lib.qdirty_bitmap_check, h, CHECK_INCONSISTENT)

    def _read(self, fn: Callable[[Any], _T]) -> _T:
        """``fn(handle)`` between two readability checks."""
        h = self._p()
        self._check_readable(h)
        r = fn(h)
        self._check_readable(h)
        return r

    def get(self, offset: int) -> bool:
        """Whether the granule containing ``offset`` is dirty (False beyond the end).
        :class:`QdirtyError` if the bitmap is inconsistent, its data unreadable or gone."""
        offset = uint(offset, "offset")
        return self._read(lambda h: bool(lib.qdirty_bitmap_get(h, offset)))

    def __contains__(self, offset: int) -> bool:
        return self.get(offset)

    def count(self) -> int:
        """Dirty bytes: dirty granules times the granularity. :class:`QdirtyError` if the
        bitmap is inconsistent, its data unreadable or gone."""
        return self._read(lambda h: int(lib.qdirty_bitmap_count(h)))

    def next_dirty(self, offset: int = 0, length: Optional[int] = None) -> Optional[int]:
        """The first dirty offset in [offset, offset + length), or None. :class:`QdirtyError`
        if the bitmap is inconsistent, its data unreadable or gone."""
        offset = uint(offset, "offset")
        length = U64_MAX if length is None else uint(length, "length")
        r = self._read(lambda h: int(lib.qdirty_bitmap_next_dirty(h, offset, length)))
        return None if r < 0 else r

    def next_zero(self, offset: int = 0, length: Optional[int] = None) -> Optional[int]:
        """The first clean offset in [offset, offset + length), or None. :class:`QdirtyError`
        if the bitmap is inconsistent, its data unreadable or gone."""
        offset = uint(offset, "offset")
        length = U64_MAX if length is None else uint(length, "length")
        r = self._read(lambda h: int(lib.qdirty_bitmap_next_zero(h, offset, length)))
        return None if r < 0 else r

    @staticmethod
    def _next_area(h: Any, start: int, end: int, max_count: int) -> Optional[Tuple[int, int]]:
        s = ctypes.c_uint64()
        c = ctypes.c_uint64()
        found = lib.qdirty_bitmap_next_dirty_area(
            h, start, end, max_count, ctypes.byref(s), ctypes.byref(c)
        )
        return (int(s.value), int(c.value)) if found else None

    def next_dirty_area(
        self, start: int = 0, end: Optional[int] = None, max_count: Optional[int] = None
    ) -> Optional[Tuple[int, int]]:
        """The next dirty run ``(offset, length)`` in [start, end), at most ``max_count``
        bytes long, or None. :class:`QdirtyError` if the bitmap is inconsistent, its data
        unreadable or gone."""
        start = uint(start, "start")
        end = U64_MAX if end is None else uint(end, "end")
        max_count = U64_MAX if max_count is None else uint(max_count, "max_count")
        return self._read(lambda h: self._next_area(h, start, end, max_count))

    @staticmethod
    def _status(h: Any, offset: int, length: int) -> Tuple[bool, int]:
        count = ctypes.c_uint64()
        rc = check_rc(lib.qdirty_bitmap_status, h, offset, length, ctypes.byref(count))
        return rc == 1, int(count.value)

    def status(self, offset: int, length: Optional[int] = None) -> Tuple[bool, int]:
        """``(dirty, run)``: whether ``offset`` is dirty, and the length of the run of granules
        in the same state starting there, capped at ``length`` (default: to the end).
        :class:`QdirtyError` if the bitmap is inconsistent, its data unreadable or gone."""
        offset = uint(offset, "offset")
        if length is not None:
            length = uint(length, "length")
        h = self._p()
        if length is None:
            length = max(int(lib.qdirty_bitmap_size(h)) - offset, 0)
        n = length
        return self._read(lambda h: self._status(h, offset, n))

    def dirty_extents(
        self,
        start: int = 0,
        end: Optional[int] = None,
        batch: int = 1024,
        *,
        max_len: Optional[int] = None,
    ) -> Iterator[Tuple[int, int]]:
        """Yields every dirty run ``(offset, length)`` in [start, end) (``end`` clamped to the
        bitmap's size), in order: maximal runs of dirty granules clipped to the range, or,
        with ``max_len``, pieces of them at most ``max_len`` bytes long.

        The runs come from ``qdirty_bitmap_dirty_extents``, ``batch`` per C call into one
        reused array. :class:`QdirtyError` if the bitmap is inconsistent, its data unreadable
        or gone (from the first call, or the call of a later batch). The arguments are checked
        here, the bitmap when iteration starts."""
        start = uint(start, "start")
        stop = U64_MAX if end is None else uint(end, "end")
        if uint(batch, "batch") == 0:
            raise ValueError("batch must be positive")
        if max_len is not None and uint(max_len, "max_len") == 0:
            raise ValueError("max_len must be positive")
        return self._dirty_extents(start, stop, batch, max_len)

    def _dirty_extents(
        self, start: int, stop: int, batch: int, max_len: Optional[int]
    ) -> Iterator[Tuple[int, int]]:
        # One generator step per batch, none per run: chain walks the batches' zips in C.
        return itertools.chain.from_iterable(self._extent_batches(start, stop, batch, max_len))

    def _extent_batches(
        self, start: int, stop: int, batch: int, max_len: Optional[int]
    ) -> Iterator[Iterable[Tuple[int, int]]]:
        """The runs of each ``qdirty_bitmap_dirty_extents`` call, as an iterable of tuples.

        The extents are decoded as one list of words (``offset, length, offset, ...``: the
        ``qdirty_extent`` array seen as native ``uint64_t``), paired by ``zip``: no Python
        code runs per run unless ``max_len`` cuts it."""
        h = self._p()
        out = (_ffi.Extent * batch)()
        words = memoryview(out).cast("B").cast("Q")
        n = ctypes.c_size_t()
        n_ref = ctypes.byref(n)
        fn = lib.qdirty_bitmap_dirty_extents
        pos = start
        while True:
            check_rc(fn, h, pos, stop, out, batch, n_ref)
            count = n.value
            flat = words[: 2 * count].tolist()
            pairs = iter(flat)
            runs: Iterable[Tuple[int, int]] = zip(pairs, pairs)
            if max_len is not None and max(flat[1::2], default=0) > max_len:
                runs = _pieces(runs, max_len)
            yield runs
            if count < batch:
                return
            pos = flat[-2] + flat[-1]
            if pos >= stop:
                return

    def clean_extents(
        self, start: int = 0, end: Optional[int] = None, max_len: Optional[int] = None
    ) -> Iterator[Tuple[int, int]]:
        """Yields every clean run ``(offset, length)`` in [start, end), in order, each at most
        ``max_len`` bytes long. :class:`QdirtyError` if the bitmap is inconsistent, its data
        unreadable or gone."""
        start = uint(start, "start")
        if end is not None:
            end = uint(end, "end")
        if max_len is not None and uint(max_len, "max_len") == 0:
            raise ValueError("max_len must be positive")
        return self._clean_extents(start, end, max_len)

    def _clean_extents(
        self, start: int, end: Optional[int], max_len: Optional[int]
    ) -> Iterator[Tuple[int, int]]:
        size = self.size
        stop = size if end is None else min(end, size)
        pos = start
        while pos < stop:
            dirty, run = self.status(pos, stop - pos)
            if not dirty:
                off, left = pos, run
                while left > 0:
                    n = left if max_len is None else min(left, max_len)
                    yield off, n
                    off += n
                    left -= n
            pos += run

    def iter_granules(self, start: int = 0) -> DirtyIterator:
        """A :class:`DirtyIterator` over the offsets of the dirty granules, from the granule
        containing ``start`` (QEMU's ``bdrv_dirty_iter_new``)."""
        start = uint(start, "start")
        bh = self._p()
        self._check_readable(bh)
        h = check_ptr(lib.qdirty_bitmap_iter_new, bh)
        it = DirtyIterator(self, h)
        if start:
            try:
                it.seek(start)
            except BaseException:
                it.close()
                raise
        return it

    def sha256(self) -> str:
        """SHA-256 of the bits, as QEMU's ``x-debug-block-dirty-bitmap-sha256``.
        :class:`QdirtyError` if the bitmap is inconsistent, its data unreadable or gone."""

        def digest(h: Any) -> str:
            p = check_ptr(lib.qdirty_bitmap_sha256, h)
            try:
                return ctypes.string_at(p).decode("ascii")
            finally:
                lib.qdirty_string_free(p)

        return self._read(digest)

    # -- successors --------------------------------------------------------------------------

    def create_successor(self) -> "Bitmap":
        """Freezes the bitmap for an operation such as a backup: returns a new anonymous
        successor that records guest writes in its place; this bitmap becomes disabled and
        busy. End with :meth:`abdicate` (success) or :meth:`reclaim` (failure)."""
        p = check_ptr(lib.qdirty_bitmap_create_successor, self._p())
        return self._image._wrap_new(p)

    def abdicate(self) -> "Bitmap":
        """The operation succeeded: the successor takes this bitmap's name and persistence and
        is returned; this Bitmap object becomes unusable (the bitmap is dropped)."""
        h = self._p()
        p = check_ptr(lib.qdirty_bitmap_abdicate, h)
        st = self._image._state
        st.forget(addr(h), "it abdicated to its successor")
        succ = self._image._wrap(p)
        assert succ is not None
        succ._last_name = lib.qdirty_bitmap_name(p)
        return succ

    def reclaim(self) -> "Bitmap":
        """The operation failed: this bitmap takes back the successor's bits and enabled state
        and stops being busy; the successor's Bitmap object becomes unusable. Returns self."""
        h = self._p()
        check_ptr(lib.qdirty_bitmap_reclaim, h)
        self._image._state.sync("it was reclaimed by its parent")
        return self

    def enable_successor(self) -> None:
        """Enables the successor of a frozen bitmap (EINVAL without one)."""
        check_rc(lib.qdirty_bitmap_enable_successor, self._p())

    # -- serialization (migration streams) ----------------------------------------------------

    @property
    def serialization_align(self) -> int:
        """Chunk alignment in bytes of disk (64 granules)."""
        return int(lib.qdirty_bitmap_serialization_align(self._p()))

    def serialization_size(self, offset: int, length: int) -> int:
        """Buffer bytes needed to serialize [offset, offset + length)."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        return check_rc(lib.qdirty_bitmap_serialization_size, self._p(), offset, length)

    def serialize_part(self, offset: int, length: int) -> bytes:
        """The bits of [offset, offset + length) in QEMU's layout (64-bit little-endian
        words)."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        h = self._p()
        n = check_rc(lib.qdirty_bitmap_serialization_size, h, offset, length)
        buf = ctypes.create_string_buffer(max(n, 1))
        check_rc(lib.qdirty_bitmap_serialize_part, h, buf, n, offset, length)
        return buf.raw[:n]

    def deserialize_part(self, data: bytes, offset: int, length: int, finish: bool = False) -> None:
        """Overwrites [offset, offset + length) from ``data`` (layout of
        :meth:`serialize_part`); counts and searches see the new bits after ``finish`` or
        :meth:`deserialize_finish`."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        raw = bytes(data)
        check_rc(lib.qdirty_bitmap_deserialize_part, self._p(), raw, len(raw), offset, length, bool(finish))

    def deserialize_zeroes(self, offset: int, length: int, finish: bool = False) -> None:
        """Fills [offset, offset + length) with clean granules."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        check_rc(lib.qdirty_bitmap_deserialize_zeroes, self._p(), offset, length, bool(finish))

    def deserialize_ones(self, offset: int, length: int, finish: bool = False) -> None:
        """Fills [offset, offset + length) with dirty granules."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        check_rc(lib.qdirty_bitmap_deserialize_ones, self._p(), offset, length, bool(finish))

    def deserialize_finish(self) -> None:
        """Rebuilds summaries and count after deserialize calls made with ``finish=False``."""
        check_rc(lib.qdirty_bitmap_deserialize_finish, self._p())
