"""Errors and the calling conventions of libqdirty (0 / -errno, NULL + ``errp``)."""

from __future__ import annotations

import ctypes
import errno as _errno
import operator
import os
from typing import Any, Callable, NoReturn, Optional, Union

from . import _ffi
from ._errors import QdirtyError as QdirtyError, clean_message

lib = _ffi.lib
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

Name = Union[str, bytes]
PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


class _ExcSource:
    """Something that may hold a Python exception raised inside a C callback (see _io.py)."""

    exc: Optional[BaseException] = None


def take_error(err: Any, fallback_errno: int) -> QdirtyError:
    """Builds the QdirtyError of ``err`` (a ``qdirty_error *``, maybe NULL) and frees it."""
    if not err:
        return QdirtyError(fallback_errno, os.strerror(fallback_errno))
    try:
        message = clean_message((lib.qdirty_error_message(err) or b"").decode("utf-8", "replace"))
        hint_b = lib.qdirty_error_hint(err)
        hint = hint_b.decode("utf-8", "replace") if hint_b is not None else None
        code = lib.qdirty_error_errno(err) or fallback_errno
    finally:
        lib.qdirty_error_free(err)
    return QdirtyError(code, message, hint)


def _raise(err: QdirtyError, io: Optional[_ExcSource]) -> NoReturn:
    cause = None
    if io is not None and io.exc is not None:
        cause, io.exc = io.exc, None
    if cause is not None:
        raise err from cause
    raise err


def check_rc(fn: Callable[..., int], *args: Any, io: Optional[_ExcSource] = None) -> int:
    """Calls ``fn(*args, &err)``, a function returning a value >= 0 or -errno; raises
    :class:`QdirtyError` on failure, returns the value otherwise."""
    err = _ffi.ErrorP()
    rc = fn(*args, ctypes.byref(err))
    if rc < 0:
        _raise(take_error(err, -rc), io)
    if err:  # never happens: success leaves errp alone
        lib.qdirty_error_free(err)
    if io is not None:
        io.exc = None
    return int(rc)


def check_ptr(fn: Callable[..., Any], *args: Any, io: Optional[_ExcSource] = None) -> Any:
    """Calls ``fn(*args, &err)``, a function returning an object or NULL."""
    err = _ffi.ErrorP()
    p = fn(*args, ctypes.byref(err))
    if not p:
        _raise(take_error(err, _errno.EIO), io)
    if io is not None:
        io.exc = None
    return p


def uint(value: Any, what: str, bits: int = 64) -> int:
    """``value`` checked as an unsigned C integer of ``bits`` bits (an offset, a length, a size,
    a granularity, a count or an index), before it reaches any C call: ctypes would wrap a
    negative value or one too large silently (``-5`` becomes ``2**64 - 5``, a whole disk).

    Raises ``TypeError`` for anything that is not an integer (``operator.index``), bool
    included (``True`` is an int in Python, but never a meaningful offset), and ``ValueError``
    for a negative value or one of ``2**bits`` or more."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{what} must not be negative (got {v})")
    if v >> bits:
        raise ValueError(f"{what} must be below 2**{bits} (got {v})")
    return v


def encode_name(name: Name) -> bytes:
    """A bitmap name as bytes (str is encoded as UTF-8)."""
    if isinstance(name, str):
        return name.encode("utf-8")
    if isinstance(name, (bytes, bytearray)):
        return bytes(name)
    raise TypeError(f"a bitmap name is str or bytes, not {type(name).__name__}")


def addr(p: Any) -> int:
    """The address of a ctypes pointer (0 for NULL)."""
    return ctypes.cast(p, ctypes.c_void_p).value or 0
