"""Errors with the same codes and messages the CLI prints (``CODE: reason``).

Every failure of a murmur operation is a :class:`MurmurError` whose ``code`` is one of the
CLI's codes and whose ``str()`` is the line the CLI prints to stderr. Catch a subclass to
handle one kind (``except murmur.PermissionDenied``), or :class:`MurmurError` for all.
"""

from __future__ import annotations

import re
from typing import ClassVar


class MurmurError(Exception):
    """A murmur operation failed; ``str(e)`` is ``CODE: reason``, as the CLI prints it."""

    code: ClassVar[str] = "INTERNAL"
    #: The CLI's exit code for this error (1: the operation failed; 69: unavailable).
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(MurmurError):
    """Malformed or out-of-range input."""

    code = "INVALID_ARGUMENT"


class NotFound(MurmurError):
    """The named thing does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(MurmurError):
    """The system is not in a state that allows the operation."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(MurmurError):
    """Missing, expired or forged identity."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MurmurError):
    """The identity lacks the permission."""

    code = "PERMISSION_DENIED"


class Internal(MurmurError):
    """Something broke on murmur's side."""

    code = "INTERNAL"


class Unavailable(MurmurError):
    """Temporal could not be reached, or the pool did not answer."""

    code = "UNAVAILABLE"
    exit_code = 69


#: Every error class by its code.
BY_CODE: dict[str, type[MurmurError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        Internal,
        Unavailable,
    )
}

_CODE_LINE = re.compile(r"\b(" + "|".join(BY_CODE) + r"): (.+)", re.DOTALL)


def parse(message: str) -> MurmurError | None:
    """The ``CODE: reason`` error in ``message`` (at its start or inside it), if there is one."""
    match = _CODE_LINE.search(message)
    if match is None:
        return None
    return BY_CODE[match.group(1)](match.group(2).strip())


def from_failure(message: str) -> MurmurError:
    """The error a worker's failure message carries; ``INTERNAL`` when it carries none."""
    return parse(message) or Internal(message)
