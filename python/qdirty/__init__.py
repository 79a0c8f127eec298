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

Public names: :class:`Image`, :class:`Bitmap`, :class:`BitmapInfo`, :class:`Backup`,
:class:`DirtyIterator`, :class:`Transaction`, :class:`QdirtyError`, :func:`version`,
:func:`set_warning_handler`, the ``CHECK_*`` flags of :meth:`Bitmap.check` and the ``QDIRTY_*``
flags of the C API.

Errors raise :class:`QdirtyError`, an ``OSError`` that carries the positive ``errno``, the
``message`` and an optional ``hint``; for an errno Python maps to a subclass of ``OSError`` it is
also that subclass (``FileNotFoundError``, ``PermissionError``, ``BlockingIOError`` for an image
another process uses, ...). Warnings go through Python's :mod:`warnings`
(:class:`QdirtyWarning`; ``DeprecationWarning`` for ``autoload``). Using a closed image, or a bitmap that no longer exists (removed, released,
abdicated, reclaimed, or its image closed), raises ``ValueError``: no freed C handle is ever
passed to the library. Offsets, lengths, sizes, granularities, counts and indices are checked
before any C call: ``TypeError`` for anything but an integer (``bool`` included), ``ValueError``
for a negative value or one too large for the C parameter. Reads of bits raise
:class:`QdirtyError` for a bitmap that is inconsistent, whose data cannot be read, or that is
gone: an unusable bitmap never reads as clean.

The package carries libqdirty (``pip install`` builds it from the same sources) and loads that
copy; ``QDIRTY_LIB`` (a path to a ``libqdirty.so``) overrides it, and a package built without it
(``QDIRTY_PYTHON_SYSTEM_LIB=1``) loads the installed ``libqdirty.so.0``.
"""

from __future__ import annotations

from typing import Callable, Optional

from . import _warn
from ._bitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    CHECK_INCONSISTENT,
    CHECK_RO,
    Backup,
    Bitmap,
    DirtyIterator,
)
from ._common import lib as _lib
from ._errors import QdirtyError
from ._ffi import (
    QDIRTY_BITMAP_AUTOLOAD,
    QDIRTY_BITMAP_DISABLED,
    QDIRTY_BITMAP_PERSISTENT,
    QDIRTY_CHECK_ALLOW_RO,
    QDIRTY_CHECK_BUSY,
    QDIRTY_CHECK_DEFAULT,
    QDIRTY_CHECK_INCONSISTENT,
    QDIRTY_CHECK_RO,
    QDIRTY_OPEN_DURABLE,
    QDIRTY_OPEN_FORCE_SHARE,
    QDIRTY_OPEN_RDWR,
    QDIRTY_OPEN_SALVAGE,
)
from ._image import BitmapInfo, BrokenBitmap, Image, StoreSpace, drop_bitmaps_extension
from ._txn import Transaction
from ._warn import QdirtyWarning

__all__ = [
    "Backup",
    "Bitmap",
    "BitmapInfo",
    "BrokenBitmap",
    "DirtyIterator",
    "Image",
    "StoreSpace",
    "QdirtyError",
    "QdirtyWarning",
    "Transaction",
    "set_warning_handler",
    "version",
    "__version__",
    "CHECK_BUSY",
    "CHECK_RO",
    "CHECK_INCONSISTENT",
    "CHECK_DEFAULT",
    "CHECK_ALLOW_RO",
    "QDIRTY_OPEN_RDWR",
    "QDIRTY_OPEN_FORCE_SHARE",
    "QDIRTY_OPEN_SALVAGE",
    "QDIRTY_OPEN_DURABLE",
    "drop_bitmaps_extension",
    "QDIRTY_BITMAP_PERSISTENT",
    "QDIRTY_BITMAP_DISABLED",
    "QDIRTY_BITMAP_AUTOLOAD",
    "QDIRTY_CHECK_BUSY",
    "QDIRTY_CHECK_RO",
    "QDIRTY_CHECK_INCONSISTENT",
    "QDIRTY_CHECK_DEFAULT",
    "QDIRTY_CHECK_ALLOW_RO",
]


def version() -> str:
    """The version of the loaded libqdirty, e.g. "0.1.0"."""
    return str(_lib.qdirty_version().decode())


__version__ = version()

def set_warning_handler(handler: Optional[Callable[[str], None]]) -> None:
    """Sends qdirty's warnings (e.g. "Autoload option is deprecated and its value is ignored")
    to ``handler(message)``; None restores the default: Python's :mod:`warnings`, with
    ``DeprecationWarning`` for the autoload deprecation and :class:`QdirtyWarning` for the
    others.

    The handler is called when the call of the package that produced the warning ends (or, for
    a direct call of the C functions, while the library runs, with an image locked: it must not
    call qdirty then). An exception it raises is raised by that call.
    """
    _warn.set_handler(handler)
