"""Loading libqdirty and declaring every exported function (the one prototype table).

The library loaded is, in order:

1. ``QDIRTY_LIB`` when it is set (a path to a ``libqdirty.so``): an explicit override, and an
   error when that file does not exist;
2. the library shipped inside this package (``_libqdirty*.so``, which the wheel's build makes
   from the same sources);
3. only for a package built without it (``QDIRTY_PYTHON_SYSTEM_LIB=1``): the installed
   ``libqdirty.so.N`` (:data:`SONAME`), found by the dynamic loader.

``tests/test_ffi_table.py`` checks that ``PROTOTYPES`` declares exactly the functions of
``include/qdirty.h``: undeclared ``restype``/``argtypes`` default to C ``int`` and truncate
64-bit pointers.
"""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_bool,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._errors import QdirtyError


class _Image(ctypes.Structure):
    """Opaque ``qdirty_image``: never instantiated or dereferenced."""


class _Bitmap(ctypes.Structure):
    """Opaque ``qdirty_bitmap``."""


class _Error(ctypes.Structure):
    """Opaque ``qdirty_error``."""


class _Iter(ctypes.Structure):
    """Opaque ``qdirty_iter``."""


class _Backup(ctypes.Structure):
    """Opaque ``qdirty_backup``."""


class _Txn(ctypes.Structure):
    """Opaque ``qdirty_txn``."""


class BitmapInfo(ctypes.Structure):
    """``qdirty_bitmap_info``: one bitmap of ``qdirty_image_query_bitmaps``."""

    _fields_ = [
        ("name", c_char_p),
        ("count", c_uint64),
        ("granularity", c_uint32),
        ("recording", c_bool),
        ("busy", c_bool),
        ("persistent", c_bool),
        ("inconsistent", c_bool),
    ]


class Extent(ctypes.Structure):
    """``qdirty_extent``: one dirty run of ``qdirty_bitmap_dirty_extents``, in bytes."""

    _fields_ = [("offset", c_uint64), ("length", c_uint64)]


ImageP = POINTER(_Image)
BitmapP = POINTER(_Bitmap)
ErrorP = POINTER(_Error)
ErrorPP = POINTER(ErrorP)
IterP = POINTER(_Iter)
BackupP = POINTER(_Backup)
BackupPP = POINTER(BackupP)
TxnP = POINTER(_Txn)
BitmapInfoP = POINTER(BitmapInfo)
ExtentP = POINTER(Extent)

#: ``typedef void (*qdirty_warning_fn)(const char *message, void *opaque);``
WARNING_FN = CFUNCTYPE(None, c_char_p, c_void_p)

#: ``char *`` that must be freed with ``qdirty_string_free``: c_void_p keeps the pointer.
OwnedString = c_void_p

#: name -> (restype, argtypes) for every function of include/qdirty.h.
PROTOTYPES: Dict[str, Tuple[object, List[object]]] = {
    # version, strings, warnings
    "qdirty_version": (c_char_p, []),
    "qdirty_version_number": (c_uint32, []),
    "qdirty_string_free": (None, [c_void_p]),
    "qdirty_set_warning_handler": (None, [WARNING_FN, c_void_p]),
    # errors
    "qdirty_error_message": (c_char_p, [ErrorP]),
    "qdirty_error_hint": (c_char_p, [ErrorP]),
    "qdirty_error_errno": (c_int, [ErrorP]),
    "qdirty_error_free": (None, [ErrorP]),
    # images
    "qdirty_image_create": (c_int, [c_char_p, c_uint64, c_uint32, ErrorPP]),
    "qdirty_image_open": (ImageP, [c_char_p, c_uint32, ErrorPP]),
    "qdirty_image_close": (c_int, [ImageP, ErrorPP]),
    "qdirty_image_store_bitmaps": (c_int, [ImageP, ErrorPP]),
    "qdirty_image_size": (c_uint64, [ImageP]),
    "qdirty_image_read_only": (c_bool, [ImageP]),
    "qdirty_image_first_bitmap": (BitmapP, [ImageP]),
    "qdirty_image_find_bitmap": (BitmapP, [ImageP, c_char_p]),
    "qdirty_image_add_bitmap": (BitmapP, [ImageP, c_char_p, c_uint32, c_uint32, ErrorPP]),
    "qdirty_image_remove_bitmap": (c_int, [ImageP, c_char_p, ErrorPP]),
    "qdirty_image_merge_bitmap": (c_int, [ImageP, c_char_p, ImageP, c_char_p, ErrorPP]),
    "qdirty_image_set_dirty": (None, [ImageP, c_uint64, c_uint64]),
    # durable mode
    "qdirty_image_open_durable": (ImageP, [c_char_p, c_uint64, ErrorPP]),
    "qdirty_image_prepare_write": (c_int, [ImageP, c_uint64, c_uint64, ErrorPP]),
    "qdirty_image_zone_bytes": (c_uint64, [ImageP]),
    # embedding: ops is a ``const qdirty_io_ops *`` (declared as an untyped pointer here)
    "qdirty_image_open_with_io": (ImageP, [c_void_p, c_void_p, c_char_p, c_uint32, ErrorPP]),
    # bitmaps
    "qdirty_bitmap_next": (BitmapP, [BitmapP]),
    "qdirty_bitmap_name": (c_char_p, [BitmapP]),
    "qdirty_bitmap_granularity": (c_uint32, [BitmapP]),
    "qdirty_bitmap_size": (c_uint64, [BitmapP]),
    "qdirty_bitmap_enabled": (c_bool, [BitmapP]),
    "qdirty_bitmap_persistent": (c_bool, [BitmapP]),
    "qdirty_bitmap_inconsistent": (c_bool, [BitmapP]),
    "qdirty_bitmap_readonly": (c_bool, [BitmapP]),
    "qdirty_bitmap_enable": (c_int, [BitmapP, ErrorPP]),
    "qdirty_bitmap_disable": (c_int, [BitmapP, ErrorPP]),
    "qdirty_bitmap_set_dirty": (c_int, [BitmapP, c_uint64, c_uint64, ErrorPP]),
    "qdirty_bitmap_reset_dirty": (c_int, [BitmapP, c_uint64, c_uint64, ErrorPP]),
    "qdirty_bitmap_clear": (c_int, [BitmapP, ErrorPP]),
    "qdirty_bitmap_get": (c_bool, [BitmapP, c_uint64]),
    "qdirty_bitmap_count": (c_uint64, [BitmapP]),
    "qdirty_bitmap_next_dirty": (c_int64, [BitmapP, c_uint64, c_uint64]),
    "qdirty_bitmap_next_zero": (c_int64, [BitmapP, c_uint64, c_uint64]),
    "qdirty_bitmap_next_dirty_area": (
        c_bool,
        [BitmapP, c_uint64, c_uint64, c_uint64, POINTER(c_uint64), POINTER(c_uint64)],
    ),
    "qdirty_bitmap_sha256": (OwnedString, [BitmapP, ErrorPP]),
    "qdirty_bitmap_dirty_extents": (
        c_int,
        [BitmapP, c_uint64, c_uint64, ExtentP, c_size_t, POINTER(c_size_t), ErrorPP],
    ),
    # state and check
    "qdirty_bitmap_check": (c_int, [BitmapP, c_uint32, ErrorPP]),
    "qdirty_bitmap_busy": (c_bool, [BitmapP]),
    "qdirty_bitmap_set_busy": (c_int, [BitmapP, c_bool, ErrorPP]),
    "qdirty_bitmap_set_readonly": (c_int, [BitmapP, c_bool, ErrorPP]),
    "qdirty_bitmap_set_persistence": (c_int, [BitmapP, c_bool, ErrorPP]),
    "qdirty_bitmap_skip_store": (c_bool, [BitmapP]),
    "qdirty_bitmap_set_skip_store": (c_int, [BitmapP, c_bool, ErrorPP]),
    "qdirty_bitmap_set_inconsistent": (c_int, [BitmapP, ErrorPP]),
    "qdirty_bitmap_recording": (c_bool, [BitmapP]),
    "qdirty_bitmap_has_successor": (c_bool, [BitmapP]),
    # create/release, successors
    "qdirty_image_create_bitmap": (BitmapP, [ImageP, c_char_p, c_uint32, ErrorPP]),
    "qdirty_bitmap_release": (c_int, [BitmapP, ErrorPP]),
    "qdirty_bitmap_create_successor": (BitmapP, [BitmapP, ErrorPP]),
    "qdirty_bitmap_abdicate": (BitmapP, [BitmapP, ErrorPP]),
    "qdirty_bitmap_reclaim": (BitmapP, [BitmapP, ErrorPP]),
    "qdirty_bitmap_enable_successor": (c_int, [BitmapP, ErrorPP]),
    # backups and merge
    "qdirty_bitmap_clear_with_backup": (c_int, [BitmapP, BackupPP, ErrorPP]),
    "qdirty_bitmap_restore": (c_int, [BitmapP, BackupP, ErrorPP]),
    "qdirty_backup_free": (None, [BackupP]),
    "qdirty_bitmap_merge": (c_int, [BitmapP, BitmapP, BackupPP, ErrorPP]),
    # iterators and status
    "qdirty_bitmap_iter_new": (IterP, [BitmapP, ErrorPP]),
    "qdirty_iter_next": (c_int64, [IterP]),
    "qdirty_iter_seek": (c_int, [IterP, c_uint64, ErrorPP]),
    "qdirty_iter_free": (None, [IterP]),
    "qdirty_bitmap_status": (c_int, [BitmapP, c_uint64, c_uint64, POINTER(c_uint64), ErrorPP]),
    # serialization
    "qdirty_bitmap_serialization_align": (c_uint64, [BitmapP]),
    "qdirty_bitmap_serialization_size": (c_int64, [BitmapP, c_uint64, c_uint64, ErrorPP]),
    "qdirty_bitmap_serialize_part": (
        c_int,
        [BitmapP, c_void_p, c_size_t, c_uint64, c_uint64, ErrorPP],
    ),
    "qdirty_bitmap_deserialize_part": (
        c_int,
        [BitmapP, c_void_p, c_size_t, c_uint64, c_uint64, c_bool, ErrorPP],
    ),
    "qdirty_bitmap_deserialize_zeroes": (c_int, [BitmapP, c_uint64, c_uint64, c_bool, ErrorPP]),
    "qdirty_bitmap_deserialize_ones": (c_int, [BitmapP, c_uint64, c_uint64, c_bool, ErrorPP]),
    "qdirty_bitmap_deserialize_finish": (c_int, [BitmapP, ErrorPP]),
    # query
    "qdirty_image_query_bitmaps": (
        c_int,
        [ImageP, POINTER(BitmapInfoP), POINTER(c_size_t), ErrorPP],
    ),
    "qdirty_bitmap_info_free": (None, [BitmapInfoP, c_size_t]),
    # space a store needs
    "qdirty_image_store_space": (
        c_int,
        [ImageP, POINTER(c_uint64), POINTER(c_uint64), POINTER(c_uint64), ErrorPP],
    ),
    # salvage
    "qdirty_image_broken_bitmap_count": (c_int, [ImageP, ErrorPP]),
    "qdirty_image_broken_bitmap": (
        c_int,
        [ImageP, c_uint32, POINTER(c_uint32), POINTER(OwnedString), POINTER(OwnedString), ErrorPP],
    ),
    "qdirty_image_remove_broken_bitmap": (c_int, [ImageP, c_uint32, ErrorPP]),
    "qdirty_image_drop_bitmaps_extension": (c_int, [c_char_p, POINTER(c_int), ErrorPP]),
    # standalone images, reopen, truncate
    "qdirty_image_new_memory": (ImageP, [c_uint64, ErrorPP]),
    "qdirty_image_truncate": (c_int, [ImageP, c_uint64, ErrorPP]),
    "qdirty_image_reopen": (c_int, [ImageP, c_uint32, ErrorPP]),
    "qdirty_image_default_granularity": (c_uint32, [ImageP]),
    "qdirty_image_has_readonly_bitmaps": (c_bool, [ImageP]),
    "qdirty_image_remove_stored_bitmap": (c_int, [ImageP, c_char_p, ErrorPP]),
    # transactions
    "qdirty_txn_new": (TxnP, []),
    "qdirty_txn_add_bitmap": (BitmapP, [TxnP, ImageP, c_char_p, c_uint32, c_uint32, ErrorPP]),
    "qdirty_txn_clear_bitmap": (c_int, [TxnP, ImageP, c_char_p, ErrorPP]),
    "qdirty_txn_enable_bitmap": (c_int, [TxnP, ImageP, c_char_p, ErrorPP]),
    "qdirty_txn_disable_bitmap": (c_int, [TxnP, ImageP, c_char_p, ErrorPP]),
    "qdirty_txn_merge_bitmap": (c_int, [TxnP, ImageP, c_char_p, ImageP, c_char_p, ErrorPP]),
    "qdirty_txn_remove_bitmap": (c_int, [TxnP, ImageP, c_char_p, ErrorPP]),
    "qdirty_txn_commit": (c_int, [TxnP, ErrorPP]),
    "qdirty_txn_abort": (c_int, [TxnP, ErrorPP]),
    "qdirty_txn_free": (None, [TxnP]),
}

# Flags, as in include/qdirty.h.
QDIRTY_OPEN_RDWR = 1
QDIRTY_OPEN_FORCE_SHARE = 2
QDIRTY_OPEN_SALVAGE = 4
QDIRTY_OPEN_DURABLE = 8
QDIRTY_BITMAP_PERSISTENT = 1
QDIRTY_BITMAP_DISABLED = 2
QDIRTY_BITMAP_AUTOLOAD = 4
QDIRTY_CHECK_BUSY = 1
QDIRTY_CHECK_RO = 2
QDIRTY_CHECK_INCONSISTENT = 4
QDIRTY_CHECK_DEFAULT = 7
QDIRTY_CHECK_ALLOW_RO = 5


#: The soname of the C library this package was written for: ``libqdirty.so.<ABI major>``
#: (``QDIRTY_ABI_MAJOR`` in the C header; a test checks they agree).
SONAME = "libqdirty.so.0"


def bundled_library() -> Optional[Path]:
    """The library shipped inside this package, or None for a package built without it."""
    found = sorted(Path(__file__).resolve().parent.glob("_libqdirty*.so"))
    return found[0] if found else None


def find_library() -> str:
    """The path (or, for an installed library, the soname) of the libqdirty to load."""
    env = os.environ.get("QDIRTY_LIB")
    if env:
        if not Path(env).is_file():
            raise ImportError(f"QDIRTY_LIB={env} does not exist")
        return env
    bundled = bundled_library()
    if bundled is not None:
        return str(bundled)
    return SONAME


def _missing(name: str, path: str) -> Callable[..., Any]:
    """Stands for a function the loaded library lacks: fails when called, naming it."""

    def call(*_args: Any, **_kwargs: Any) -> Any:
        raise QdirtyError(
            errno.ENOSYS,
            f"{name} is not in {path}: this libqdirty is older than the qdirty package "
            "(rebuild it, or point QDIRTY_LIB at a newer one)",
        )

    call.__name__ = name
    return call


def load(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads the library and declares every prototype. A function the library lacks (an older
    build) does not fail the load: it is listed in the library's ``qdirty_missing`` and raises
    :class:`~qdirty.QdirtyError` (ENOSYS, naming it and the library) when called."""
    path = path or find_library()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        if path == SONAME:
            raise ImportError(
                f"this qdirty package was built without libqdirty and {SONAME} cannot be "
                f"loaded ({e}): install libqdirty, or set QDIRTY_LIB to a libqdirty.so"
            ) from e
        raise ImportError(f"cannot load libqdirty from {path}: {e}") from e
    missing: List[str] = []
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            setattr(lib, name, _missing(name, path))
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    setattr(lib, "qdirty_missing", missing)
    return lib


library_path = find_library()
"""What was loaded: ``QDIRTY_LIB``, the bundled library's path, or :data:`SONAME`."""
lib = load(library_path)
