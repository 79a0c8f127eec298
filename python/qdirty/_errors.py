"""qdirty's errors as Python's: :class:`QdirtyError` is an :class:`OSError`.

An error whose errno Python maps to a built-in subclass of ``OSError`` (``ENOENT`` to
``FileNotFoundError``, ``EACCES``/``EPERM`` to ``PermissionError``, ``EAGAIN`` to
``BlockingIOError``, ``EEXIST`` to ``FileExistsError``, ...) is raised as a subclass of both
``QdirtyError`` and that class, as ``OSError(errno, message)`` itself does; others (``EINVAL``,
``EBUSY``, ``EIO``, ...) as ``QdirtyError``. Either way it reads as ``qdirty.QdirtyError``.
"""

from __future__ import annotations

import errno as _errno
import re
from typing import Any, Dict, Optional, Tuple, Type

#: Rust's rendering of an OS error ("No such file or directory (os error 2)"): the errno is
#: already the exception's own.
_OS_ERROR_SUFFIX = re.compile(r" \(os error -?\d+\)")


def clean_message(message: str) -> str:
    """A library message without Rust's ``(os error N)``."""
    return _OS_ERROR_SUFFIX.sub("", message)


class QdirtyError(OSError):
    """A qdirty call failed.

    ``QdirtyError(errno, message, hint=None)`` makes an instance of the subclass that also
    derives from the built-in ``OSError`` subclass of that errno, if any (so ``except
    FileNotFoundError`` catches a missing image, ``except BlockingIOError`` an image another
    process holds).

    Attributes:
        errno: the positive errno (``errno.EINVAL``, ``errno.ENOENT``, ...).
        message: the library's message (QEMU's wording where QEMU has one); also ``strerror``.
        hint: a hint that may help fixing the problem, or None.
    """

    errno: int
    message: str
    hint: Optional[str]

    def __new__(cls, errno: int, message: str, hint: Optional[str] = None) -> "QdirtyError":
        if cls is QdirtyError:
            cls = _subclass_for(errno)
        return super().__new__(cls, errno, message)

    def __init__(self, errno: int, message: str, hint: Optional[str] = None) -> None:
        super().__init__(errno, message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        text = f"[{name}] {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def __repr__(self) -> str:
        hint = f", hint={self.hint!r}" if self.hint is not None else ""
        return f"qdirty.QdirtyError({self.errno!r}, {self.message!r}{hint})"

    def __reduce__(self) -> Tuple[Any, ...]:
        # Rebuilt through QdirtyError itself, which picks the subclass again.
        return (QdirtyError, (self.errno, self.message, self.hint), self.__dict__)


QdirtyError.__module__ = "qdirty"

#: The built-in OSError subclass -> its QdirtyError subclass.
_SUBCLASSES: Dict[Type[OSError], Type[QdirtyError]] = {}


def _subclass_for(code: int) -> Type[QdirtyError]:
    """QdirtyError, or its subclass that also derives from the built-in OSError subclass Python
    maps ``code`` to (OSError's own mapping, asked rather than copied)."""
    builtin = type(OSError(code, ""))
    if builtin is OSError:
        return QdirtyError
    sub = _SUBCLASSES.get(builtin)
    if sub is None:
        sub = type(
            "QdirtyError",
            (QdirtyError, builtin),
            {
                "__module__": "qdirty",
                "__qualname__": "QdirtyError",
                "__doc__": f"A QdirtyError that is also a {builtin.__name__}.",
            },
        )
        _SUBCLASSES[builtin] = sub
    return sub
