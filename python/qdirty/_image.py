"""Images: qcow2 files, standalone (in-memory) images and images over host callbacks."""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

from . import _ffi
from ._bitmap import Bitmap
from ._common import (
    Name,
    PathLike,
    QdirtyError,
    addr,
    check_ptr,
    check_rc,
    encode_name,
    lib,
    take_error,
    uint,
)
from ._io import IoAdapter
from ._state import ImageState, finalize_image
from ._warn import AUTOLOAD_WARNING, api, emit, public


def bitmap_flags(persistent: bool, disabled: bool, autoload: Optional[bool]) -> int:
    """The flags of a new bitmap. ``autoload`` (QEMU's deprecated option) is warned about here,
    before anything is done (so that ``-W error`` stops the call), and not passed on: the
    library would ignore it, and warn a second time."""
    flags = 0
    if persistent:
        flags |= _ffi.QDIRTY_BITMAP_PERSISTENT
    if disabled:
        flags |= _ffi.QDIRTY_BITMAP_DISABLED
    if autoload is not None:
        emit(AUTOLOAD_WARNING)
    return flags


@dataclass(frozen=True)
class StoreSpace:
    """What :meth:`Image.store_space` reports."""

    clusters: int
    bytes: int
    measure_bytes: int


@dataclass(frozen=True)
class BrokenBitmap:
    """A bitmap directory entry (or its table) that QEMU refuses the whole image for, listed by
    :meth:`Image.broken_bitmaps` of an image opened with ``salvage=True``."""

    #: Its position in the bitmap directory (what messages use when the name is empty).
    index: int
    #: Its name as stored (up to the first NUL; may be empty, need not be UTF-8).
    name: bytes
    #: Why QEMU refuses it (the message a normal open fails with).
    reason: str

    @property
    def display_name(self) -> str:
        """The name when it is printable text, else ``"entry N"``."""
        try:
            s = self.name.decode("utf-8")
        except UnicodeDecodeError:
            s = ""
        if not s or not s.isprintable():
            return f"entry {self.index}"
        return s


@api
def drop_bitmaps_extension(path: PathLike) -> bool:
    """Drops the whole bitmaps extension of the image file at ``path`` (one header write that
    removes it and clears autoclear bit 0, QEMU's rule for programs without bitmap support),
    for images whose bitmap directory is broken as a whole (``Image.open(salvage=True)`` then
    fails naming this function). Every persistent bitmap is lost and its clusters leaked
    (``qemu-img check -r leaks`` reclaims them); guest data is not touched. Returns whether
    there was anything to drop."""
    dropped = ctypes.c_int()
    check_rc(lib.qdirty_image_drop_bitmaps_extension, os.fsencode(path), ctypes.byref(dropped))
    return bool(dropped.value)


@dataclass(frozen=True)
class BitmapInfo:
    """One bitmap in the snapshot of :meth:`Image.query` (QEMU's ``BlockDirtyInfo``)."""

    #: The name; None for anonymous bitmaps (successors, unnamed :meth:`Image.create_bitmap`).
    name: Optional[str]
    #: Dirty granules times the granularity, in bytes.
    count: int
    #: The granularity in bytes.
    granularity: int
    #: Enabled, or frozen with an enabled successor.
    recording: bool
    #: Held by an operation.
    busy: bool
    #: The raw persistent flag.
    persistent: bool
    #: Found in_use on open.
    inconsistent: bool


@public
class Image:
    """An open image and its dirty bitmaps: a qcow2 file (:meth:`open`), a standalone image
    with no file (:meth:`new_memory`), or a qcow2 file whose I/O a host provides
    (:meth:`open_with_io`).

    Close with :meth:`close` or a ``with`` block. Closing an image opened read-write stores its
    persistent bitmaps. Closing first aborts transactions with prepared actions on the image and
    closes its iterators; every :class:`Bitmap` of it becomes unusable. An image collected
    while open is closed quietly.

    Thread safety: the C library locks the image for each call, so :meth:`set_dirty` (the guest
    write hook) and queries may run from several threads; closing must not race with other
    uses.
    """

    def __init__(self, handle: Any, path: Optional[PathLike], io: Optional[IoAdapter] = None) -> None:
        """Wraps a handle; use :meth:`open`, :meth:`new_memory` or :meth:`open_with_io`."""
        self._state = ImageState(handle, io)
        self._path = path
        self._finalizer = weakref.finalize(self, finalize_image, self._state)

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def create(path: PathLike, size: int, cluster_size: int = 0) -> None:
        """Creates a blank qcow2 v3 image of ``size`` bytes (rounded up to 512) without
        bitmaps. ``cluster_size``: a power of two from 512 to 2 MiB; 0 means 64 KiB. Fails
        (EEXIST) if the file exists."""
        size = uint(size, "size")
        cluster_size = uint(cluster_size, "cluster_size", 32)
        check_rc(lib.qdirty_image_create, os.fsencode(path), size, cluster_size)

    @classmethod
    def open(
        cls,
        path: PathLike,
        rw: bool = False,
        force_share: bool = False,
        salvage: bool = False,
        durable: bool = False,
        zone_bytes: Optional[int] = None,
    ) -> "Image":
        """Opens a qcow2 image and loads its bitmaps. ``rw=True`` opens it read-write: the
        loaded bitmaps are marked in use in the file until :meth:`close` stores them. The image
        is locked as QEMU locks it (QdirtyError with errno EAGAIN while QEMU uses it);
        ``force_share=True`` (read-only only) reads without locks, like ``qemu-img -U``.

        ``salvage=True`` opens an image QEMU refuses because of broken bitmap directory entries
        or tables: those become :meth:`broken_bitmaps` (removable only, with
        :meth:`remove_broken_bitmap`; their clusters are leaked) and the valid bitmaps load
        normally. QEMU refuses the image until every broken bitmap is removed. A directory
        broken as a whole still fails, naming :func:`drop_bitmaps_extension`.

        ``durable=True`` (with ``rw=True``) opens it in durable mode (``QDIRTY_OPEN_DURABLE``):
        the bitmaps are never marked in use in the file and stay valid QEMU bitmaps at every
        instant, so that after a crash QEMU and qdirty load them as consistent. The host then
        calls :meth:`prepare_write` before issuing each guest write and :meth:`set_dirty` when
        it completes; every call that changes bitmaps is stored before it returns.
        ``zone_bytes`` (durable mode only; a power of two of at least 64 KiB, else QdirtyError
        EINVAL) is the size of the zones :meth:`prepare_write` covers on disk; None means the
        library's default (:attr:`zone_bytes` tells the size in use).

        Raises ``ValueError`` before anything is opened for ``durable`` without ``rw``,
        ``zone_bytes`` without ``durable``, or ``zone_bytes`` with ``salvage`` or
        ``force_share`` (the C call that takes a zone size takes no other flags)."""
        if durable and not rw:
            raise ValueError("durable mode needs a read-write open (rw=True)")
        if zone_bytes is not None:
            if not durable:
                raise ValueError("zone_bytes is only meaningful with durable=True")
            zone_bytes = uint(zone_bytes, "zone_bytes")
            if salvage or force_share:
                raise ValueError("zone_bytes cannot be combined with salvage or force_share")
            handle = check_ptr(lib.qdirty_image_open_durable, os.fsencode(path), zone_bytes)
            return cls(handle, path)
        flags = (
            (_ffi.QDIRTY_OPEN_RDWR if rw else 0)
            | (_ffi.QDIRTY_OPEN_FORCE_SHARE if force_share else 0)
            | (_ffi.QDIRTY_OPEN_SALVAGE if salvage else 0)
            | (_ffi.QDIRTY_OPEN_DURABLE if durable else 0)
        )
        handle = check_ptr(lib.qdirty_image_open, os.fsencode(path), flags)
        return cls(handle, path)

    @classmethod
    def new_memory(cls, size: int) -> "Image":
        """A standalone image: bitmaps over ``size`` bytes with no file behind them (raw disks,
        guest RAM, tests). Persistent bitmaps are refused; closing stores nothing."""
        size = uint(size, "size")
        handle = check_ptr(lib.qdirty_image_new_memory, size)
        return cls(handle, None)

    @classmethod
    def open_with_io(
        cls, host: Any, name: str = "image", rw: bool = False, durable: bool = False
    ) -> "Image":
        """Opens a qcow2 image whose file a host owns, doing all I/O through ``host``'s
        methods (see :class:`qdirty._io.IoAdapter` for the protocol): ``pread(offset, length)
        -> bytes``, ``pwrite(offset, data)``, ``flush()``, ``get_length() -> int`` and,
        optionally, ``alloc_clusters(n, cluster_size) -> offset`` with
        ``free_clusters(offset, n, cluster_size)`` for the host's own allocator.

        The callbacks are kept alive until the image is closed. They run on the thread that
        calls into qdirty, with the image locked: they must not use this image. An exception
        raised by a callback becomes the ``__cause__`` of the resulting :class:`QdirtyError`.

        ``durable=True`` (with ``rw=True``, else ``ValueError``) opens it in durable mode with
        the default zone size, as :meth:`open` does.
        """
        if durable and not rw:
            raise ValueError("durable mode needs a read-write open (rw=True)")
        io = IoAdapter(host)
        flags = (_ffi.QDIRTY_OPEN_RDWR if rw else 0) | (_ffi.QDIRTY_OPEN_DURABLE if durable else 0)
        handle = check_ptr(
            lib.qdirty_image_open_with_io, ctypes.addressof(io.ops), None, name.encode("utf-8"), flags, io=io
        )
        return cls(handle, name, io)

    def close(self) -> None:
        """Stores the persistent bitmaps (read-write images) and closes the image.

        The image is closed even when storing fails (the error is raised). Closing twice is a
        no-op."""
        if self._state.handle is None:
            return
        self._finalizer.detach()
        res = self._state.shutdown()
        if res is not None:
            err, code = res
            e = take_error(err, code)
            io = self._state.io
            cause = io.exc if io is not None else None
            if cause is not None:
                raise e from cause
            raise e

    @property
    def closed(self) -> bool:
        """Whether the image was closed."""
        return self._state.handle is None

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except QdirtyError as e:
                # The original exception goes on; this one must not vanish with it.
                emit(f"closing the image after an exception failed too: {e}")

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        else:
            state = "read-only" if self.read_only else "read-write"
        where = "memory" if self._path is None else repr(self._path)
        return f"<qdirty.Image {where} {state}>"

    def _h(self) -> Any:
        h = self._state.handle
        if h is None:
            raise ValueError("the image is closed")
        return h

    def _rc(self, fn: Any, *args: Any) -> int:
        return check_rc(fn, *args, io=self._state.io)

    def store_bitmaps(self) -> None:
        """Stores the persistent bitmaps now, as a checkpoint, without closing (EROFS on a
        read-only image)."""
        self._rc(lib.qdirty_image_store_bitmaps, self._h())

    def store_space(self) -> StoreSpace:
        """How much a store would allocate now (``clusters``, ``bytes``; 0 when nothing
        changed) and what ``qemu-img measure`` reports as "bitmaps" for the persistent bitmaps
        (``measure_bytes``)."""
        clusters, nbytes, measure = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
        self._rc(
            lib.qdirty_image_store_space,
            self._h(),
            ctypes.byref(clusters),
            ctypes.byref(nbytes),
            ctypes.byref(measure),
        )
        return StoreSpace(clusters.value, nbytes.value, measure.value)

    def broken_bitmaps(self) -> List[BrokenBitmap]:
        """The broken bitmaps of an image opened with ``salvage=True``, in directory order
        (always empty otherwise)."""
        out: List[BrokenBitmap] = []
        n = self._rc(lib.qdirty_image_broken_bitmap_count, self._h())
        for i in range(n):
            index = ctypes.c_uint32()
            name = _ffi.OwnedString()
            reason = _ffi.OwnedString()
            self._rc(
                lib.qdirty_image_broken_bitmap,
                self._h(),
                i,
                ctypes.byref(index),
                ctypes.byref(name),
                ctypes.byref(reason),
            )
            try:
                out.append(
                    BrokenBitmap(
                        index.value,
                        ctypes.string_at(name.value) if name.value else b"",
                        (ctypes.string_at(reason.value) if reason.value else b"").decode(
                            "utf-8", "replace"
                        ),
                    )
                )
            finally:
                lib.qdirty_string_free(name.value)
                lib.qdirty_string_free(reason.value)
        return out

    def remove_broken_bitmap(self, i: int = 0) -> None:
        """Removes the broken bitmap number ``i`` of :meth:`broken_bitmaps` (the later ones move
        down by one) from an image opened with ``rw=True, salvage=True``. Its clusters are
        leaked, never freed (``qemu-img check -r leaks`` reclaims them)."""
        i = uint(i, "index", 32)
        self._rc(lib.qdirty_image_remove_broken_bitmap, self._h(), i)

    def reopen(self, rw: bool) -> None:
        """Switches between read-write and read-only (QEMU's qcow2_reopen_bitmaps_ro/_rw):
        read-only stores the persistent bitmaps and makes them readonly; read-write marks them
        in use again. Reopening in the current mode, or a standalone image, does nothing."""
        self._rc(lib.qdirty_image_reopen, self._h(), _ffi.QDIRTY_OPEN_RDWR if rw else 0)

    def truncate(self, size: int) -> None:
        """Resizes every bitmap to ``size`` bytes (new space is clean). For a qcow2 image the
        file must have been resized first (the header's size). Refused while a bitmap is busy,
        frozen or iterated."""
        size = uint(size, "size")
        self._rc(lib.qdirty_image_truncate, self._h(), size)

    # -- properties --------------------------------------------------------------------------

    @property
    def path(self) -> Optional[PathLike]:
        """The path given to :meth:`open` (the name for :meth:`open_with_io`; None for a
        standalone image)."""
        return self._path

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return int(lib.qdirty_image_size(self._h()))

    @property
    def read_only(self) -> bool:
        """Whether the image is read-only."""
        return bool(lib.qdirty_image_read_only(self._h()))

    @property
    def default_granularity(self) -> int:
        """QEMU's default granularity: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB for
        standalone images."""
        return int(lib.qdirty_image_default_granularity(self._h()))

    @property
    def zone_bytes(self) -> int:
        """The zone size of durable mode in bytes (see :meth:`open`); 0 for an image not in
        durable mode."""
        return int(lib.qdirty_image_zone_bytes(self._h()))

    @property
    def has_readonly_bitmaps(self) -> bool:
        """Whether a bitmap is readonly: the host must then refuse guest writes (EPERM)."""
        return bool(lib.qdirty_image_has_readonly_bitmaps(self._h()))

    # -- bitmaps -----------------------------------------------------------------------------

    def _wrap(self, p: Any) -> Optional[Bitmap]:
        if not p:
            return None
        key = addr(p)
        bm = self._state.bitmaps.get(key)
        if bm is None or not bm.valid:
            bm = Bitmap(self, p)
            self._state.bitmaps[key] = bm
        return bm

    def _wrap_new(self, p: Any) -> Bitmap:
        """Wraps a bitmap just created: a stale wrapper at the same address is dropped."""
        self._state.forget(addr(p), "it no longer exists")
        bm = self._wrap(p)
        assert bm is not None
        return bm

    @property
    def bitmaps(self) -> List[Bitmap]:
        """Every bitmap, newest first (QEMU's order), anonymous ones included."""
        out: List[Bitmap] = []
        p = lib.qdirty_image_first_bitmap(self._h())
        while p:
            bm = self._wrap(p)
            assert bm is not None
            out.append(bm)
            p = lib.qdirty_bitmap_next(p)
        return out

    def __iter__(self) -> Iterator[Bitmap]:
        """The bitmaps, newest first (a snapshot taken when iteration starts)."""
        return iter(self.bitmaps)

    def __len__(self) -> int:
        return len(self.bitmaps)

    def __contains__(self, name: Name) -> bool:
        return self.find(name) is not None

    def __getitem__(self, name: Name) -> Bitmap:
        bm = self.find(name)
        if bm is None:
            raise KeyError(name)
        return bm

    def find(self, name: Name) -> Optional[Bitmap]:
        """The bitmap named ``name``, or None."""
        return self._wrap(lib.qdirty_image_find_bitmap(self._h(), encode_name(name)))

    def add_bitmap(
        self,
        name: Name,
        granularity: int = 0,
        persistent: bool = False,
        disabled: bool = False,
        autoload: Optional[bool] = None,
    ) -> Bitmap:
        """Adds a bitmap (QMP ``block-dirty-bitmap-add``).

        ``granularity`` 0 means :attr:`default_granularity`. ``persistent``: stored in the
        image. ``disabled``: not recording writes. ``autoload`` is QEMU's deprecated option: any
        value other than None is accepted, ignored, and produces the warning "Autoload option
        is deprecated and its value is ignored"."""
        granularity = uint(granularity, "granularity", 32)
        p = check_ptr(
            lib.qdirty_image_add_bitmap,
            self._h(),
            encode_name(name),
            granularity,
            bitmap_flags(persistent, disabled, autoload),
            io=self._state.io,
        )
        return self._wrap_new(p)

    def create_bitmap(self, name: Optional[Name] = None, granularity: int = 0) -> Bitmap:
        """Creates an enabled, transient bitmap (QEMU's ``bdrv_create_dirty_bitmap``);
        ``name`` None makes it anonymous (listed and queried, never found by name or
        stored)."""
        granularity = uint(granularity, "granularity", 32)
        raw = encode_name(name) if name is not None else None
        p = check_ptr(lib.qdirty_image_create_bitmap, self._h(), raw, granularity)
        return self._wrap_new(p)

    def remove_bitmap(self, name: Name) -> None:
        """Removes a bitmap, from the file too when it is persistent (QMP
        ``block-dirty-bitmap-remove``). Its :class:`Bitmap` object becomes unusable."""
        h = self._h()
        raw = encode_name(name)
        self._rc(lib.qdirty_image_remove_bitmap, h, raw)
        self._state.sync("it was removed")

    def remove_stored_bitmap(self, name: Name) -> None:
        """Deletes the stored copy of bitmap ``name`` from the file, leaving the in-memory
        bitmap alone (a persistent one is stored again on the next store or close)."""
        self._rc(lib.qdirty_image_remove_stored_bitmap, self._h(), encode_name(name))

    def merge_bitmap(self, target: Name, source: Name, src_image: Optional["Image"] = None) -> None:
        """target |= source (QMP ``block-dirty-bitmap-merge``); ``source`` is a bitmap of
        ``src_image``, or of this image when it is None."""
        src = src_image._h() if src_image is not None else None
        self._rc(lib.qdirty_image_merge_bitmap, self._h(), encode_name(target), src, encode_name(source))

    def prepare_write(self, offset: int, length: int) -> None:
        """Durable mode: call before issuing a guest write to [offset, offset + length). Returns
        once every stored bitmap that records writes covers the range on disk (written and
        flushed); raises :class:`QdirtyError` otherwise, and then the write must not be issued
        (fail it to the guest). After the write completes, successfully or not, call
        :meth:`set_dirty` with the same range, exactly once.

        Cheap when the range's zones are covered already (no lock, no I/O). Does nothing for an
        image not in durable mode. May run from I/O threads."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        self._rc(lib.qdirty_image_prepare_write, self._h(), offset, length)

    def set_dirty(self, offset: int, length: int) -> None:
        """The guest write hook: marks [offset, offset + length) in every enabled bitmap
        (clamped to the disk size). May run from I/O threads. In durable mode it is called
        when the write completes, with the range of its :meth:`prepare_write`; one without a
        :meth:`prepare_write` before it gives a :class:`~qdirty.QdirtyWarning` (after a crash the
        stored bitmaps may miss that write)."""
        offset, length = uint(offset, "offset"), uint(length, "length")
        lib.qdirty_image_set_dirty(self._h(), offset, length)

    def query(self) -> List[BitmapInfo]:
        """A snapshot of every bitmap, newest first (QEMU's ``query-block`` dirty-bitmaps)."""
        arr = _ffi.BitmapInfoP()
        n = ctypes.c_size_t()
        check_rc(lib.qdirty_image_query_bitmaps, self._h(), ctypes.byref(arr), ctypes.byref(n))
        try:
            out = []
            for i in range(n.value):
                e = arr[i]
                out.append(
                    BitmapInfo(
                        name=e.name.decode("utf-8", "surrogateescape") if e.name is not None else None,
                        count=int(e.count),
                        granularity=int(e.granularity),
                        recording=bool(e.recording),
                        busy=bool(e.busy),
                        persistent=bool(e.persistent),
                        inconsistent=bool(e.inconsistent),
                    )
                )
            return out
        finally:
            lib.qdirty_bitmap_info_free(arr, n.value)
