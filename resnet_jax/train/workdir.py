"""One run per workdir: an exclusive lock that a killed run cannot leave behind.

``train.py`` (training and ``--mode eval``) calls :func:`lock` before it touches anything in the
workdir. The lock is ``fcntl.flock`` on ``workdir/.lock``: the kernel drops it when the process
dies, however it dies (a ``kill -9`` included), so a stale lock never blocks the next run; the
file keeps the holder's pid, host and start time only to name it in the refusal. A second run
on a busy workdir raises :class:`~resnet_jax.errors.WorkdirBusy` (exit 5) at once, before it
creates, reads or writes anything there (two runs on one workdir interleaved their
``metrics.jsonl`` and died reading it back).

Multi-process runs: every process locks its own file, ``.lock`` for process 0 and
``.lock.<i>`` for process ``i``, so the processes of one run never contend with each other
(they may share one host) while process ``i`` of a second run meets process ``i`` of the first;
then all processes agree (one ``process_allgather``), so a run refused on any process is refused
on every process at once instead of hanging in its first collective. The workdir is on a file
system all processes share (the checkpoints require it); Linux NFS clients implement ``flock``
with NFS byte-range locks, so the lock holds across hosts (a crashed *host*'s lock lasts until
the server's lease expires, ~90 s on NFSv4). A file system without ``flock`` is refused in one
line rather than run unlocked.

Locks are released by :meth:`WorkdirLock.release`, at the end of the call decorated with
:func:`scoped` that took them, or at process exit.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from resnet_jax.errors import ConfigError, WorkdirBusy

__all__ = ["LOCK_NAME", "WorkdirLock", "holder", "lock", "lock_path", "scoped"]

LOCK_NAME = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

F = TypeVar("F", bound=Callable[..., Any])
_scopes = threading.local()  # per thread: a stack of lists of the locks each scoped call took


def lock_path(workdir: str, process_index: int = 0) -> str:
    """``workdir/.lock`` (process 0) or ``workdir/.lock.<i>``."""
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    return os.path.join(os.path.abspath(workdir), name)


def holder(path: str, *, wait: float = 1.0) -> dict[str, Any]:
    """The record a lock's holder wrote into ``path`` (``{}`` if none appears within ``wait``
    seconds: the holder may be between taking the lock and writing it)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path) as f:
                record = json.loads(f.read() or "null")
            if isinstance(record, dict):
                return record
        except (OSError, json.JSONDecodeError):
            pass  # absent, or half-written this instant: read again
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "another run (its pid is not recorded yet)"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')}, started {when}"


class WorkdirLock:
    """A held lock (one open file with an exclusive ``flock``)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: removing it would let a run that opened
        it before the removal lock a file no one else sees."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: str) -> WorkdirLock | None:
    """The lock on ``path``, or None when another open file holds it."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no O_TRUNC: not ours
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ConfigError(f"cannot create the workdir lock {path} ({os.strerror(e.errno)}); "
                              "use a --workdir this user can write to.") from e
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if e.errno in _UNSUPPORTED:
            raise ConfigError(
                f"{path}: the file system does not support flock ({os.strerror(e.errno)}), so "
                "one run per workdir cannot be enforced; put --workdir on one that does "
                "(local disk, NFS with locking)."
            ) from e
        raise
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return WorkdirLock(path, fd)


def _process() -> tuple[int, int]:
    """(index, count) of this process; no device is touched unless ``jax.distributed`` is up."""
    import jax

    if not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def lock(workdir: str) -> WorkdirLock:
    """Take this process's lock on ``workdir`` (call after ``jax.distributed.initialize``, before
    anything else touches the workdir); raises :class:`~resnet_jax.errors.WorkdirBusy` naming the
    holder when another run has it. Inside a :func:`scoped` call it is released when that call
    ends; otherwise by :meth:`WorkdirLock.release` or at process exit."""
    index, count = _process()
    path = lock_path(workdir, index)
    error: BaseException | None = None
    held: WorkdirLock | None = None
    try:
        held = _try_lock(path)
    except (OSError, ConfigError) as e:
        error = e
    busy_pid = 0
    if held is None and error is None:
        record = holder(path)
        busy_pid = int(record.get("pid") or -2)
        error = WorkdirBusy(
            f"{workdir} is in use by {_describe(record)} ({path} is locked); wait for that "
            "run to finish or stop it, or use another --workdir."
        )
    if count > 1:  # agree, so no process of a refused run goes on alone
        import numpy as np
        from jax.experimental import multihost_utils

        status = -1 if error is not None and not busy_pid else busy_pid
        statuses = np.asarray(multihost_utils.process_allgather(np.int64(status)))
        bad = [i for i, s in enumerate(statuses.tolist()) if s != 0]
        if bad and error is None:
            error = WorkdirBusy(
                f"{workdir}: process {bad[0]} of this run could not lock "
                f"{lock_path(workdir, bad[0])} (another run holds it, or it failed: see that "
                "process's message); wait for the other run or use another --workdir."
            )
    if error is not None:
        if held is not None:
            held.release()
        raise error
    assert held is not None
    stack = getattr(_scopes, "stack", None)
    if stack:
        stack[-1].append(held)
    return held


def scoped(fn: F) -> F:
    """Decorator: the locks :func:`lock` takes during a call of ``fn`` are released when the call
    returns or raises (an in-process caller may then run on the same workdir again)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _scopes.__dict__.setdefault("stack", [])
        stack.append([])
        try:
            return fn(*args, **kwargs)
        finally:
            for held in stack.pop():
                held.release()

    return wrapper  # type: ignore[return-value]
