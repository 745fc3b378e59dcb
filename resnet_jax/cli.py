"""Command-line error handling shared by the entry points (``train.py``, ``python -m
resnet_jax.experiments``, ``python -m resnet_jax.export``): every expected failure is one line on
stderr and a documented status (:mod:`resnet_jax.errors`), never a traceback. Anything else (a
bug, a fork's shape error) propagates with its traceback and exit status 1."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from resnet_jax import errors
from resnet_jax.errors import EXIT_CONFIG, EXIT_NO_CHECKPOINT, CommandFailed

__all__ = ["EXIT_CONFIG", "EXIT_NO_CHECKPOINT", "CommandFailed", "exit_on_error"]


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn the library's expected errors (``errors.exit_code``) into ``error: <message>`` and an
    exit status: 2 config/data (``ConfigError``, ``DataError``), 3 diverged, 4 no readable
    checkpoint, a ``CommandFailed``'s own status, 143/130 SIGTERM/SIGINT after the checkpoint was
    saved (``errors.Preempted``). Any other exception, a plain ``ValueError`` included, is
    re-raised untouched: its traceback shows where it broke."""
    try:
        yield
    except errors.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        code = errors.exit_code(e)
        if code is None:
            raise
        _fail(e, code)


def _fail(error: BaseException, code: int) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)
