"""The embedding interface: ``qdirty_io_ops`` built from a Python object's methods."""

from __future__ import annotations

import ctypes
import errno as _errno
from ctypes import CFUNCTYPE, POINTER, c_int, c_int64, c_uint32, c_uint64, c_void_p
from typing import Any, Optional

from ._common import _ExcSource

PREAD_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_uint64, c_uint64)
PWRITE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_uint64, c_uint64)
FLUSH_FN = CFUNCTYPE(c_int, c_void_p)
GET_LENGTH_FN = CFUNCTYPE(c_int64, c_void_p)
ALLOC_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64, POINTER(c_uint64))
FREE_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64, c_uint64)


class IoOps(ctypes.Structure):
    """``qdirty_io_ops`` (include/qdirty.h)."""

    _fields_ = [
        ("size", c_uint32),
        ("pread", PREAD_FN),
        ("pwrite", PWRITE_FN),
        ("flush", FLUSH_FN),
        ("get_length", GET_LENGTH_FN),
        ("alloc_clusters", ALLOC_FN),
        ("free_clusters", FREE_FN),
    ]


class IoAdapter(_ExcSource):
    """Turns a Python host object into C callbacks.

    The host object has the methods::

        pread(offset: int, length: int) -> bytes        # exactly `length` bytes
        pwrite(offset: int, data: bytes) -> None        # optional for read-only opens
        flush() -> None
        get_length() -> int
        alloc_clusters(n: int, cluster_size: int) -> int     # optional, with free_clusters:
        free_clusters(offset: int, n: int, cluster_size: int) -> None  # the host's allocator

    A method that raises ``OSError`` makes the C call return ``-errno``; any other exception
    gives ``-EIO``. The exception is kept and becomes the ``__cause__`` of the
    :class:`QdirtyError` the failing qdirty call raises.
    """

    def __init__(self, host: Any) -> None:
        self.host = host
        self.exc: Optional[BaseException] = None
        ops = IoOps()
        ops.size = ctypes.sizeof(IoOps)
        # The CFUNCTYPE objects must outlive the image: they are attributes of this adapter,
        # which the image keeps until it is closed.
        # A method that is missing or None gives a NULL callback.
        def has(name: str) -> bool:
            return callable(getattr(host, name, None))

        self._pread = PREAD_FN(self._cb_pread) if has("pread") else PREAD_FN()
        self._pwrite = PWRITE_FN(self._cb_pwrite) if has("pwrite") else PWRITE_FN()
        self._flush = FLUSH_FN(self._cb_flush) if has("flush") else FLUSH_FN()
        self._get_length = GET_LENGTH_FN(self._cb_get_length) if has("get_length") else GET_LENGTH_FN()
        self._alloc = ALLOC_FN(self._cb_alloc) if has("alloc_clusters") else ALLOC_FN()
        self._free = FREE_FN(self._cb_free) if has("free_clusters") else FREE_FN()
        ops.pread = self._pread
        ops.pwrite = self._pwrite
        ops.flush = self._flush
        ops.get_length = self._get_length
        ops.alloc_clusters = self._alloc
        ops.free_clusters = self._free
        self.ops = ops

    def _fail(self, e: BaseException) -> int:
        self.exc = e
        if isinstance(e, OSError) and e.errno:
            return -abs(int(e.errno))
        return -_errno.EIO

    def _cb_pread(self, _opaque: Any, buf: int, length: int, offset: int) -> int:
        try:
            data = bytes(self.host.pread(offset, length))
            if len(data) != length:
                raise OSError(_errno.EIO, f"short read: {len(data)} of {length} bytes at {offset}")
            ctypes.memmove(buf, data, length)
            return 0
        except BaseException as e:  # noqa: BLE001 (must not unwind into C)
            return self._fail(e)

    def _cb_pwrite(self, _opaque: Any, buf: int, length: int, offset: int) -> int:
        try:
            self.host.pwrite(offset, ctypes.string_at(buf, length))
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)

    def _cb_flush(self, _opaque: Any) -> int:
        try:
            self.host.flush()
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)

    def _cb_get_length(self, _opaque: Any) -> int:
        try:
            return int(self.host.get_length())
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)

    def _cb_alloc(self, _opaque: Any, n: int, cluster_size: int, out: Any) -> int:
        try:
            out[0] = int(self.host.alloc_clusters(n, cluster_size))
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)

    def _cb_free(self, _opaque: Any, offset: int, n: int, cluster_size: int) -> int:
        try:
            self.host.free_clusters(offset, n, cluster_size)
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)
