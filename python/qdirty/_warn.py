"""qdirty's warnings (QEMU's ``warn_report``) as Python's.

At import the package installs its handler in the library (``qdirty_set_warning_handler``).
Each warning goes to :func:`warnings.warn`, the autoload deprecation as a ``DeprecationWarning``,
the others as :class:`QdirtyWarning`, attributed to the caller's code (the first frame outside
this package), so that Python's filters apply: ``-W error`` turns them into exceptions,
``-W ignore`` silences them. :func:`set_handler` sends them to a function instead.

The warnings of a call of the package's API (every public method, property and function, see
:func:`public`) are delivered when that call ends, not while the library runs: the library holds
an image's lock then, and an exception (a warning turned into an error, or the user's handler
raising) cannot unwind through it. By then the call's work is complete and the package's own
state follows it, so such an exception is raised by the call as any error would be. A warning
of a direct call of the C functions (``qdirty._ffi.lib``), of a generator's iteration or of a
finalizer is delivered at once; an exception it raises is reported by Python as unraisable
(``sys.unraisablehook``).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import warnings
from typing import Any, Callable, List, Optional, TypeVar, cast

from . import _ffi

#: The warning of QEMU's deprecated ``autoload`` option.
AUTOLOAD_WARNING = "Autoload option is deprecated and its value is ignored"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class QdirtyWarning(UserWarning):
    """A warning of libqdirty that is not a deprecation (QEMU's ``warn_report``): leaked
    clusters after a store, a bitmap whose data could not be read, ..."""


QdirtyWarning.__module__ = "qdirty"

_handler: Optional[Callable[[str], None]] = None


def set_handler(handler: Optional[Callable[[str], None]]) -> None:
    """Sends qdirty's warnings to ``handler(message)``; None restores Python's warnings."""
    global _handler
    _handler = handler


def _in_package(filename: str) -> bool:
    return os.path.dirname(os.path.abspath(filename)) == _PACKAGE_DIR


def _stacklevel() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called from :func:`emit`, that names the
    first frame outside this package."""
    frame = sys._getframe(1)  # emit
    level = 1
    while frame is not None and _in_package(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def emit(message: str) -> None:
    """Delivers one warning: to the handler of :func:`set_handler`, else to Python's warnings."""
    handler = _handler
    if handler is not None:
        handler(message)
        return
    category = DeprecationWarning if message == AUTOLOAD_WARNING else QdirtyWarning
    warnings.warn(message, category, stacklevel=_stacklevel())


class _State(threading.local):
    """Per thread: whether a call of the package's API is running (``depth``), and the warnings
    the library gave during it (``messages``, None while there are none)."""

    depth = 0
    messages: Optional[List[str]] = None


_local = _State()

F = TypeVar("F", bound=Callable[..., Any])


def _deliver() -> None:
    messages, _local.messages = _local.messages, None
    for message in messages or ():
        emit(message)


def api(fn: F) -> F:
    """Makes ``fn`` a boundary of the package's API: the library's warnings during the
    outermost such call on a thread are delivered (:func:`emit`) when it returns or raises."""

    @functools.wraps(fn)
    def boundary(*args: Any, **kwargs: Any) -> Any:
        state = _local
        if state.depth:  # within another API call: that one delivers
            return fn(*args, **kwargs)
        state.depth = 1
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            state.depth = 0
            if state.messages is not None:
                _deliver()  # raising here chains the error in flight
            raise
        state.depth = 0
        if state.messages is not None:
            _deliver()
        return result

    return cast(F, boundary)


#: The special methods that are part of the API (context managers, iteration, containers).
_PROTOCOL = {"__enter__", "__exit__", "__iter__", "__next__", "__getitem__", "__contains__",
             "__len__"}

C = TypeVar("C", bound=type)


def public(cls: C) -> C:
    """Applies :func:`api` to the public methods, properties, class and static methods and the
    protocol methods of ``cls``; generators stay as they are (their iteration is not a call)."""
    for name, value in list(vars(cls).items()):
        if name.startswith("_") and name not in _PROTOCOL:
            continue
        if isinstance(value, property):
            setattr(cls, name, property(
                api(value.fget) if value.fget else None,
                api(value.fset) if value.fset else None,
                api(value.fdel) if value.fdel else None,
                value.__doc__,
            ))
        elif isinstance(value, classmethod):
            setattr(cls, name, classmethod(_api_unless_generator(value.__func__)))
        elif isinstance(value, staticmethod):
            setattr(cls, name, staticmethod(_api_unless_generator(value.__func__)))
        elif inspect.isfunction(value):
            setattr(cls, name, _api_unless_generator(value))
    return cls


def _api_unless_generator(fn: F) -> F:
    return fn if inspect.isgeneratorfunction(fn) else api(fn)


def _from_library(message: Optional[bytes], _opaque: Any) -> None:
    text = (message or b"").decode("utf-8", "replace")
    if _local.depth:
        if _local.messages is None:
            _local.messages = []
        _local.messages.append(text)
        return
    emit(text)  # an exception here: ctypes reports it through sys.unraisablehook


# Kept alive for as long as the library may call it.
_CALLBACK = _ffi.WARNING_FN(_from_library)
_ffi.lib.qdirty_set_warning_handler(_CALLBACK, None)
