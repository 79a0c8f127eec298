"""Loading libqdirty and declaring every exported function (the one prototype table).

The library is found through, in order:

1. the ``QDIRTY_LIB`` environment variable (a path to ``libqdirty.so``);
2. the repository's build folder relative to this package: ``target/debug`` then
   ``target/release`` (also ``$CARGO_TARGET_DIR``);
3. ``ctypes.util.find_library("qdirty")``.

``tests/test_ffi_table.py`` checks that ``PROTOTYPES`` declares exactly the functions of
``include/qdirty.h``: undeclared ``restype``/``argtypes`` default to C ``int`` and truncate
64-bit pointers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import CFUNCTYPE, POINTER, c_bool, c_char_p, c_int, c_int64, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class _Image(ctypes.Structure):
    """Opaque ``qdirty_image``: never instantiated or dereferenced."""


class _Bitmap(ctypes.Structure):
    """Opaque ``qdirty_bitmap``."""


class _Error(ctypes.Structure):
    """Opaque ``qdirty_error``."""


ImageP = POINTER(_Image)
BitmapP = POINTER(_Bitmap)
ErrorP = POINTER(_Error)
ErrorPP = POINTER(ErrorP)

#: ``typedef void (*qdirty_warning_fn)(const char *message, void *opaque);``
WARNING_FN = CFUNCTYPE(None, c_char_p, c_void_p)

#: ``char *`` that must be freed with ``qdirty_string_free``: c_void_p keeps the pointer.
OwnedString = c_void_p

#: name -> (restype, argtypes) for every function of include/qdirty.h.
PROTOTYPES: Dict[str, Tuple[object, List[object]]] = {
    # version, strings, warnings
    "qdirty_version": (c_char_p, []),
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
}

# Flags, as in include/qdirty.h.
QDIRTY_OPEN_RDWR = 1
QDIRTY_BITMAP_PERSISTENT = 1
QDIRTY_BITMAP_DISABLED = 2
QDIRTY_BITMAP_AUTOLOAD = 4


def _candidates() -> List[Path]:
    out: List[Path] = []
    env = os.environ.get("QDIRTY_LIB")
    if env:
        out.append(Path(env))
        return out
    repo = Path(__file__).resolve().parent.parent.parent
    targets = []
    if os.environ.get("CARGO_TARGET_DIR"):
        targets.append(Path(os.environ["CARGO_TARGET_DIR"]))
    targets.append(repo / "target")
    for t in targets:
        for profile in ("debug", "release"):
            out.append(t / profile / "libqdirty.so")
    return out


def find_library() -> str:
    """The path (or name) of libqdirty to load."""
    for p in _candidates():
        if p.is_file():
            return str(p)
    if os.environ.get("QDIRTY_LIB"):
        raise ImportError(f"QDIRTY_LIB={os.environ['QDIRTY_LIB']} does not exist")
    name = ctypes.util.find_library("qdirty")
    if name:
        return name
    raise ImportError(
        "libqdirty not found: set QDIRTY_LIB, or build it with `cargo build` in the repository"
    )


def load(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads the library and declares every prototype."""
    lib = ctypes.CDLL(path or find_library())
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


lib = load()
