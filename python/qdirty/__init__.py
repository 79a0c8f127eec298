"""Python bindings (ctypes) for libqdirty: QEMU-compatible persistent dirty bitmaps in qcow2
images.

Example::

    import qdirty

    qdirty.Image.create("disk.qcow2", 1 << 30)
    with qdirty.Image.open("disk.qcow2", rw=True) as img:
        bm = img.add_bitmap("backup-0", persistent=True)
        img.set_dirty(0, 65536)            # the guest write hook: every enabled bitmap
        for offset, length in bm.dirty_extents():
            print(offset, length)
    # closing a read-write image stores its persistent bitmaps

Errors raise :class:`QdirtyError`, which carries the positive ``errno``, the ``message`` and an
optional ``hint``. Using a closed image, or a bitmap after it was removed, raises ``ValueError``.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import _ffi
from ._ffi import (
    QDIRTY_BITMAP_AUTOLOAD,
    QDIRTY_BITMAP_DISABLED,
    QDIRTY_BITMAP_PERSISTENT,
    QDIRTY_OPEN_RDWR,
)

__all__ = [
    "Bitmap",
    "Image",
    "QdirtyError",
    "set_warning_handler",
    "version",
    "__version__",
    "QDIRTY_OPEN_RDWR",
    "QDIRTY_BITMAP_PERSISTENT",
    "QDIRTY_BITMAP_DISABLED",
    "QDIRTY_BITMAP_AUTOLOAD",
]

_lib = _ffi.lib
_U64_MAX = (1 << 64) - 1

Name = Union[str, bytes]
PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def version() -> str:
    """The version of the loaded libqdirty."""
    return _lib.qdirty_version().decode()


__version__ = version()


class QdirtyError(Exception):
    """A qdirty call failed.

    Attributes:
        errno: the positive errno (``errno.EINVAL``, ``errno.ENOENT``, ...).
        message: the library's message (QEMU's wording where QEMU has one).
        hint: a hint that may help fixing the problem, or None.
    """

    def __init__(self, errno: int, message: str, hint: Optional[str] = None) -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        text = f"[{name}] {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


def _raise_from(err: "ctypes._Pointer", fallback_errno: int) -> None:
    """Raises the error in ``err`` (freeing it)."""
    if not err:
        raise QdirtyError(fallback_errno, os.strerror(fallback_errno))
    try:
        message = (_lib.qdirty_error_message(err) or b"").decode("utf-8", "replace")
        hint_b = _lib.qdirty_error_hint(err)
        hint = hint_b.decode("utf-8", "replace") if hint_b is not None else None
        code = _lib.qdirty_error_errno(err) or fallback_errno
    finally:
        _lib.qdirty_error_free(err)
    raise QdirtyError(code, message, hint)


def _check_rc(fn: Callable[..., int], *args: object) -> None:
    """Calls a function returning 0 / -errno with a trailing errp."""
    err = _ffi.ErrorP()
    rc = fn(*args, ctypes.byref(err))
    if rc != 0:
        _raise_from(err, -rc if rc < 0 else _errno.EIO)
    elif err:  # never happens: success leaves errp alone
        _lib.qdirty_error_free(err)


def _check_ptr(fn: Callable[..., object], *args: object) -> object:
    """Calls a function returning an object or NULL with a trailing errp."""
    err = _ffi.ErrorP()
    p = fn(*args, ctypes.byref(err))
    if not p:
        _raise_from(err, _errno.EIO)
    return p


def _name(name: Name) -> bytes:
    if isinstance(name, str):
        return name.encode("utf-8")
    if isinstance(name, (bytes, bytearray)):
        return bytes(name)
    raise TypeError(f"a bitmap name is str or bytes, not {type(name).__name__}")


def _path(path: PathLike) -> bytes:
    return os.fsencode(path)


def _addr(p: "ctypes._Pointer") -> int:
    return ctypes.cast(p, ctypes.c_void_p).value or 0


def _close_quietly(handle: "ctypes._Pointer") -> None:
    """Finalizer of an Image that was never closed: closes it, ignoring errors."""
    err = _ffi.ErrorP()
    _lib.qdirty_image_close(handle, ctypes.byref(err))
    if err:
        _lib.qdirty_error_free(err)


class Image:
    """An open qcow2 image and its dirty bitmaps.

    Use :meth:`open` (or :meth:`create` then :meth:`open`); close with :meth:`close` or a ``with``
    block. Closing an image opened read-write stores its persistent bitmaps. An image that is
    garbage-collected while open is closed quietly.
    """

    def __init__(self, handle: "ctypes._Pointer", path: PathLike) -> None:
        """Wraps a handle from ``qdirty_image_open``; use :meth:`open` instead."""
        self._handle: Optional["ctypes._Pointer"] = handle
        self._path = path
        self._bitmaps: Dict[int, Bitmap] = {}
        self._finalizer = weakref.finalize(self, _close_quietly, handle)

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def create(path: PathLike, size: int, cluster_size: int = 0) -> None:
        """Creates a blank qcow2 v3 image of ``size`` bytes (rounded up to 512).

        ``cluster_size``: a power of two from 512 to 2 MiB; 0 means 64 KiB. Fails (EEXIST) if the
        file exists.
        """
        _check_rc(_lib.qdirty_image_create, _path(path), size, cluster_size)

    @classmethod
    def open(cls, path: PathLike, rw: bool = False) -> "Image":
        """Opens an image. ``rw=True`` opens it read-write: its bitmaps are marked in use in the
        file until :meth:`close` stores them."""
        flags = QDIRTY_OPEN_RDWR if rw else 0
        handle = _check_ptr(_lib.qdirty_image_open, _path(path), flags)
        return cls(handle, path)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stores the persistent bitmaps (read-write images) and closes the image.

        The image is closed even when storing fails (the error is raised). Closing twice is a
        no-op.
        """
        handle = self._handle
        if handle is None:
            return
        self._handle = None
        self._finalizer.detach()
        for bm in self._bitmaps.values():
            bm._invalidate("its image was closed")
        self._bitmaps.clear()
        _check_rc(_lib.qdirty_image_close, handle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._handle is None

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except QdirtyError:
                pass  # keep the original exception

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("read-only" if self.read_only else "read-write")
        return f"<qdirty.Image {self._path!r} {state}>"

    def _h(self) -> "ctypes._Pointer":
        if self._handle is None:
            raise ValueError("the image is closed")
        return self._handle

    # -- properties --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return int(_lib.qdirty_image_size(self._h()))

    @property
    def read_only(self) -> bool:
        """Whether the image is read-only."""
        return bool(_lib.qdirty_image_read_only(self._h()))

    @property
    def path(self) -> PathLike:
        """The path given to :meth:`open`."""
        return self._path

    # -- bitmaps -----------------------------------------------------------------------------

    def _wrap(self, p: "ctypes._Pointer") -> Optional["Bitmap"]:
        if not p:
            return None
        key = _addr(p)
        bm = self._bitmaps.get(key)
        if bm is None:
            bm = Bitmap(self, p)
            self._bitmaps[key] = bm
        return bm

    def __iter__(self) -> Iterator["Bitmap"]:
        """The bitmaps, newest first (QEMU's order)."""
        p = _lib.qdirty_image_first_bitmap(self._h())
        while p:
            bm = self._wrap(p)
            assert bm is not None
            yield bm
            p = _lib.qdirty_bitmap_next(bm._p())

    @property
    def bitmaps(self) -> List["Bitmap"]:
        """The bitmaps as a list, newest first."""
        return list(self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: Name) -> bool:
        return self.find(name) is not None

    def find(self, name: Name) -> Optional["Bitmap"]:
        """The bitmap named ``name``, or None."""
        return self._wrap(_lib.qdirty_image_find_bitmap(self._h(), _name(name)))

    def add_bitmap(
        self,
        name: Name,
        granularity: int = 0,
        persistent: bool = False,
        disabled: bool = False,
        autoload: Optional[bool] = None,
    ) -> "Bitmap":
        """Adds a bitmap (QMP ``block-dirty-bitmap-add``).

        ``granularity`` 0 means QEMU's default. ``autoload`` is QEMU's deprecated option: any
        value other than None is accepted, ignored, and produces the warning "Autoload option
        is deprecated and its value is ignored".
        """
        flags = 0
        if persistent:
            flags |= QDIRTY_BITMAP_PERSISTENT
        if disabled:
            flags |= QDIRTY_BITMAP_DISABLED
        if autoload is not None:
            flags |= QDIRTY_BITMAP_AUTOLOAD
        p = _check_ptr(_lib.qdirty_image_add_bitmap, self._h(), _name(name), granularity, flags)
        bm = self._wrap(p)  # type: ignore[arg-type]
        assert bm is not None
        return bm

    def remove_bitmap(self, name: Name) -> None:
        """Removes a bitmap, from the file too when it is persistent. :class:`Bitmap` objects
        for it become unusable."""
        h = self._h()
        p = _lib.qdirty_image_find_bitmap(h, _name(name))
        _check_rc(_lib.qdirty_image_remove_bitmap, h, _name(name))
        if p:
            bm = self._bitmaps.pop(_addr(p), None)
            if bm is not None:
                bm._invalidate("it was removed")

    def merge_bitmap(self, target: Name, source: Name, src_image: Optional["Image"] = None) -> None:
        """target |= source (QMP ``block-dirty-bitmap-merge``); ``source`` is a bitmap of
        ``src_image``, or of this image when it is None."""
        src = src_image._h() if src_image is not None else None
        _check_rc(_lib.qdirty_image_merge_bitmap, self._h(), _name(target), src, _name(source))

    def set_dirty(self, offset: int, length: int) -> None:
        """The guest write hook: marks the range in every enabled bitmap."""
        _lib.qdirty_image_set_dirty(self._h(), offset, length)

    def store_bitmaps(self) -> None:
        """Stores the persistent bitmaps now, without closing."""
        _check_rc(_lib.qdirty_image_store_bitmaps, self._h())


class Bitmap:
    """A dirty bitmap of an :class:`Image`. Obtained from the image, never created directly.

    A Bitmap keeps its image alive. It becomes unusable (``ValueError``) once removed or once
    its image is closed.
    """

    def __init__(self, image: Image, handle: "ctypes._Pointer") -> None:
        self._image = image
        self._handle: Optional["ctypes._Pointer"] = handle
        self._why = ""
        raw = _lib.qdirty_bitmap_name(handle)
        self._name: bytes = raw if raw is not None else b""

    def _invalidate(self, why: str) -> None:
        self._handle = None
        self._why = why

    def _p(self) -> "ctypes._Pointer":
        if self._handle is None:
            raise ValueError(f"bitmap {self.name!r} cannot be used: {self._why}")
        return self._handle

    def __repr__(self) -> str:
        return f"<qdirty.Bitmap {self.name!r}>"

    # -- properties --------------------------------------------------------------------------

    @property
    def image(self) -> Image:
        """The image the bitmap belongs to."""
        return self._image

    @property
    def name(self) -> str:
        """The name (undecodable bytes escaped with surrogateescape)."""
        return self._name.decode("utf-8", "surrogateescape")

    @property
    def name_bytes(self) -> bytes:
        """The name as bytes."""
        return self._name

    @property
    def granularity(self) -> int:
        """The granularity in bytes."""
        return int(_lib.qdirty_bitmap_granularity(self._p()))

    @property
    def size(self) -> int:
        """The number of bytes covered (the disk size)."""
        return int(_lib.qdirty_bitmap_size(self._p()))

    @property
    def enabled(self) -> bool:
        """Whether guest writes are recorded."""
        return bool(_lib.qdirty_bitmap_enabled(self._p()))

    @property
    def persistent(self) -> bool:
        """Whether the bitmap is stored in the image."""
        return bool(_lib.qdirty_bitmap_persistent(self._p()))

    @property
    def inconsistent(self) -> bool:
        """Whether the bitmap was found in use (only removal is allowed)."""
        return bool(_lib.qdirty_bitmap_inconsistent(self._p()))

    @property
    def readonly(self) -> bool:
        """Whether the bitmap belongs to a read-only image."""
        return bool(_lib.qdirty_bitmap_readonly(self._p()))

    # -- state -------------------------------------------------------------------------------

    def enable(self) -> None:
        """Starts recording guest writes."""
        _check_rc(_lib.qdirty_bitmap_enable, self._p())

    def disable(self) -> None:
        """Stops recording guest writes."""
        _check_rc(_lib.qdirty_bitmap_disable, self._p())

    # -- bits --------------------------------------------------------------------------------

    def set_dirty(self, offset: int, length: int) -> None:
        """Marks [offset, offset + length) dirty, rounded outward to granules."""
        _check_rc(_lib.qdirty_bitmap_set_dirty, self._p(), offset, length)

    def reset_dirty(self, offset: int, length: int) -> None:
        """Clears [offset, offset + length); must be granule-aligned except at the end."""
        _check_rc(_lib.qdirty_bitmap_reset_dirty, self._p(), offset, length)

    def clear(self) -> None:
        """Clears every bit."""
        _check_rc(_lib.qdirty_bitmap_clear, self._p())

    def get(self, offset: int) -> bool:
        """Whether the granule containing ``offset`` is dirty."""
        return bool(_lib.qdirty_bitmap_get(self._p(), offset))

    def count(self) -> int:
        """Dirty bytes: dirty granules times the granularity."""
        return int(_lib.qdirty_bitmap_count(self._p()))

    def next_dirty(self, offset: int = 0, length: Optional[int] = None) -> Optional[int]:
        """The first dirty offset in [offset, offset + length), or None."""
        r = _lib.qdirty_bitmap_next_dirty(self._p(), offset, _U64_MAX if length is None else length)
        return None if r < 0 else int(r)

    def next_zero(self, offset: int = 0, length: Optional[int] = None) -> Optional[int]:
        """The first clean offset in [offset, offset + length), or None."""
        r = _lib.qdirty_bitmap_next_zero(self._p(), offset, _U64_MAX if length is None else length)
        return None if r < 0 else int(r)

    def next_dirty_area(
        self, start: int = 0, end: Optional[int] = None, max_count: Optional[int] = None
    ) -> Optional[Tuple[int, int]]:
        """The next dirty run (offset, length) in [start, end), at most ``max_count`` long."""
        s = ctypes.c_uint64()
        c = ctypes.c_uint64()
        found = _lib.qdirty_bitmap_next_dirty_area(
            self._p(),
            start,
            _U64_MAX if end is None else end,
            _U64_MAX if max_count is None else max_count,
            ctypes.byref(s),
            ctypes.byref(c),
        )
        return (int(s.value), int(c.value)) if found else None

    def dirty_extents(
        self, start: int = 0, end: Optional[int] = None, max_count: Optional[int] = None
    ) -> Iterator[Tuple[int, int]]:
        """Yields every dirty run (offset, length) in [start, end), each at most
        ``max_count`` long."""
        pos = start
        while True:
            area = self.next_dirty_area(pos, end, max_count)
            if area is None:
                return
            yield area
            pos = area[0] + area[1]

    def sha256(self) -> str:
        """SHA-256 of the bits, as QEMU's ``x-debug-block-dirty-bitmap-sha256``."""
        p = _check_ptr(_lib.qdirty_bitmap_sha256, self._p())
        try:
            return ctypes.string_at(p).decode("ascii")  # type: ignore[arg-type]
        finally:
            _lib.qdirty_string_free(p)


_warning_callback: Optional[object] = None


def set_warning_handler(handler: Optional[Callable[[str], None]]) -> None:
    """Sends qdirty's warnings (e.g. "Autoload option is deprecated and its value is ignored")
    to ``handler(message)``; None restores the default (stderr).

    The handler runs on the thread that called into qdirty and must not call qdirty itself.
    Exceptions it raises are printed and ignored.
    """
    global _warning_callback
    if handler is None:
        _lib.qdirty_set_warning_handler(_ffi.WARNING_FN(), None)
        _warning_callback = None
        return

    def trampoline(message: Optional[bytes], _opaque: object) -> None:
        handler((message or b"").decode("utf-8", "replace"))

    cb = _ffi.WARNING_FN(trampoline)
    _lib.qdirty_set_warning_handler(cb, None)
    _warning_callback = cb  # keep it alive while the library may call it
