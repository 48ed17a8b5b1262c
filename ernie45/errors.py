"""The root of every "bad input" error.

Everything a user can get wrong (a config field, a checkpoint file, a layout, a flag, a data set, a destination)
raises a subclass of :class:`InputError`, whose message names the file, tensor or field and what is wrong with
it. ``ernie45.cli.main`` turns exactly these (plus DCP's ``CheckpointException`` and ``OSError`` on a path, which
it translates) into one line and exit code 2. Any other exception is a bug in ernie45 and keeps its traceback.

It derives from ``ValueError`` so that code which already catches ``ValueError`` around a call keeps working.
"""

from __future__ import annotations

__all__ = ["InputError", "UsageError", "bad_input_message", "dcp_failure"]


class InputError(ValueError):
    """Bad input (names the file / tensor / field / flag and what is wrong with it)."""


class UsageError(InputError):
    """Options that do not fit together (a flag the chosen target would ignore, ...)."""


def bad_input_message(exc: BaseException) -> str | None:
    """The one-line report of ``exc`` if it is bad input, else None (a bug, or an interrupt: keep the traceback).

    Bad input is an :class:`InputError`; an ``OSError`` that names its path (permission denied, read-only file
    system, no space left, a name too long, ...), reported as ``path: reason``; or DCP's ``CheckpointException``
    (a ``BaseException``, so ``except Exception`` misses it), judged by what it wraps.
    """
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{where}: {exc.strerror or exc}"
    wrapped = dcp_failure(exc)
    if wrapped is not None:
        return bad_input_message(wrapped)
    return None


def dcp_failure(exc: BaseException) -> BaseException | None:
    """The first exception a DCP ``CheckpointException`` wraps (its per-rank failures), or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return None
    for failure in exc.failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return None
