"""The batch executor: ``make(k)`` for every step ``k``, computed ahead in worker processes.

    with Batches(plan.train_batch, range(start, sys.maxsize), prefetch=2, workers=4) as it:
        batch = next(it)

``workers >= 1``: grain's worker processes (``MapDataset.map(make).mp_prefetch``), each computing
whole batches, worker ``i`` the steps ``i, i + workers, ...``, merged back in step order; the
batches come back through shared memory. ``workers == 0``: ``make`` runs in this process.
Either way one background thread (the "pump") drives the stream, at most ``prefetch`` batches
ahead of the consumer, so the host overlaps with the device. Batch ``k`` is ``make(k)`` whatever
the number of workers, so a stream started at step ``k`` continues the uninterrupted one exactly.

Processes are started with "spawn" (grain's choice: a fresh interpreter, never a fork of this
process and its JAX threads), so ``make`` is pickled (cloudpickle) to each worker, and each
worker re-imports the entry script as ``__mp_main__``: keep a script's work under
``if __name__ == "__main__":``. Start-up is about a second per worker (imports). Workers ignore
SIGINT/SIGTERM from the first instruction (they inherit them blocked from the pump thread), so
Ctrl-C or a scheduler's SIGTERM reaches the training loop only, and they exit when this process
dies. A failed ``make(k)`` is re-raised by ``next`` at batch ``k`` as the same exception with a
note naming the step and the worker's traceback (none for an expected ``DataError``, already one
line naming what to fix), and the stream closes.

A worker that dies (kill -9, the kernel's out-of-memory killer) is not an error: the pump closes
the pool and starts a fresh one at the first batch not yet handed on, so the stream stays
``make(k)`` for every ``k``, bit for bit. A pool whose workers die ``_MAX_RESTARTS`` times in a
row without producing a batch raises ``DataError`` naming the worker, its pid and the signal.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from resnet_jax.errors import ConfigError, DataError, exit_code

Batch = dict[str, np.ndarray]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_POLL_S = 0.1  # how often a blocked pump checks for close()
_CLOSE_TIMEOUT_S = 60.0  # close() waits this long for the batch a worker is computing
_MIN_SHM_BYTES = 1 << 16  # smaller arrays are pickled through the pipe instead of shared memory
_MAX_RESTARTS = 3  # fresh worker pools in a row that produce no batch before a DataError
_WATCH_S = 0.05  # how often a starting pool's pid files are read (to know its processes)


def resolve_workers(workers: int, kind: str) -> int:
    """``data.workers`` as a number of worker processes: -1 (auto) is all CPU cores this process
    may use but one (at least 1) for the streaming "imagenet" recipe (decode-bound) and 0
    (in-process) for the in-memory "cifar" recipe (an array gather; processes would each copy
    the dataset and every evaluation would pay their start-up)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(f"data.workers={workers!r}: use -1 (auto), 0 (in-process) or the number "
                          "of worker processes, e.g. --config.data.workers=-1")
    if workers != -1:
        return workers
    if kind != "imagenet":
        return 0
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, cores - 1)


@dataclasses.dataclass
class _Failure:
    """``make(step)`` raised; sent in place of the batch so the order is kept."""

    step: int
    error: BaseException | None  # None when it does not survive pickling to this process
    kind: str
    message: str
    trace: str  # the worker's formatted traceback ("" in-process: the exception keeps its own)

    def exception(self) -> BaseException:
        where = f"data batch {self.step}" + (" (in a worker process)" if self.trace else "")
        if self.error is None:
            return RuntimeError(f"{where} failed: {self.kind}: {self.message}\n{self.trace}")
        expected = exit_code(self.error) is not None  # one line that says what to fix
        self.error.add_note(f"raised computing {where}" +
                            (f"; the worker's traceback:\n{self.trace}"
                             if self.trace and not expected else ""))
        return self.error


@dataclasses.dataclass(frozen=True)
class _Guarded:
    """``make`` that returns a ``_Failure`` instead of raising (pickled to the workers)."""

    make: Callable[[int], Batch]
    in_worker: bool

    def __call__(self, step: int) -> Batch | _Failure:
        try:
            return self.make(step)
        except Exception as e:  # every failure is re-raised by the consumer
            if not self.in_worker:
                return _Failure(step, e, type(e).__name__, str(e), "")
            trace = "".join(traceback.format_exception(e))
            try:
                error: BaseException | None = pickle.loads(pickle.dumps(e))
            except Exception:  # an exception that cannot cross processes
                error = None
            return _Failure(step, error, type(e).__name__, str(e), trace)


@dataclasses.dataclass(frozen=True)
class _InitWorker:
    """First thing in each worker process (grain's ``worker_init_fn``): signals as below, then
    the worker's pid in ``directory/<index>``, so the parent can tell which worker died."""

    directory: str

    def __call__(self, index: int, count: int) -> None:
        _init_worker(index, count)
        path = os.path.join(self.directory, str(index))
        with open(f"{path}.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f"{path}.tmp", path)


def _init_worker(index: int, count: int) -> None:
    """Signals of a worker process: SIGINT/SIGTERM ignored, exit with the parent."""
    del index, count
    for s in _SIGNALS:  # the training loop handles these; its workers just stop with it
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    parent = multiprocessing.parent_process()
    if parent is not None:  # ignoring SIGTERM must not leave orphans when the parent is killed
        threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                         name="resnet_jax_data_watchdog").start()


def _exit_with(parent: Any) -> None:
    parent.join()
    os._exit(1)


_END = object()


@dataclasses.dataclass
class _Crash:
    """The stream itself failed (a worker died, ``make`` did not pickle, ...)."""

    error: BaseException


def _as_sequence(steps: Iterable[int]) -> Sequence[int]:
    if isinstance(steps, Sequence):
        return steps
    if isinstance(steps, itertools.count):
        raise TypeError("steps must be a sequence (random access for the workers); for an "
                        "infinite stream from step k pass range(k, sys.maxsize)")
    return list(steps)


def _plain(batch: Any) -> Any:
    """The batch with the arrays a worker sent through shared memory copied into ordinary ones,
    the shared memory unlinked now rather than by grain's asynchronous ``__del__`` (which at
    interpreter exit may not run, and the resource tracker then warns of a leak)."""
    if not isinstance(batch, dict):
        return batch
    out = {}
    for key, value in batch.items():
        if type(value) is not np.ndarray:
            out[key] = np.array(value)
            shm = getattr(value, "shm", None)
            if shm is not None and getattr(value, "_unlink_on_del", False):
                value._unlink_on_del = False  # grain's __del__ only closes it now
                shm.unlink()
        else:
            out[key] = value
    return out


def _acquire(slots: threading.Semaphore, stop: threading.Event) -> bool:
    while not stop.is_set():
        if slots.acquire(timeout=_POLL_S):
            return not stop.is_set()
    return False


@dataclasses.dataclass
class _Death:
    """A worker process of the pool that is gone."""

    index: int
    pid: int
    signum: int | None  # the signal that ended it
    status: int | None  # else its exit status (None: not seen, already reaped)

    def how(self) -> str:
        if self.signum is not None:
            name = signal.Signals(self.signum).name if self.signum in signal.valid_signals() \
                else f"signal {self.signum}"
            return f"was killed by {name}"
        if self.status is not None:
            return f"exited with status {self.status}"
        return "died (its exit status was not seen)"


class _Workers:
    """The worker processes of one pool: each writes its pid to ``directory/<index>`` when it
    starts (``_InitWorker``); their ``multiprocessing.Process`` objects are looked up while they
    run, as grain reaps a dead worker (and drops it) before its error reaches the pump."""

    def __init__(self, directory: str, count: int) -> None:
        self.directory = directory
        self.count = count
        os.makedirs(directory)
        self._procs: dict[int, Any] = {}  # pid -> multiprocessing.Process
        self._ended = threading.Event()
        threading.Thread(target=self._watch_until_known, daemon=True,
                         name="resnet_jax_data_workers").start()

    def _watch_until_known(self) -> None:
        while not self._ended.wait(_WATCH_S) and len(self._procs) < self.count:
            self.watch()

    def end(self) -> None:
        """The pool is closed: stop looking for its processes."""
        self._ended.set()

    def pids(self) -> dict[int, int]:
        """worker index -> pid, for the workers started so far."""
        out: dict[int, int] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:  # the stream ended: its pool is gone
            return out
        for name in names:
            if name.isdigit():
                with open(os.path.join(self.directory, name)) as f:
                    out[int(name)] = int(f.read())
        return out

    def watch(self) -> None:
        """Keeps the ``Process`` of every started worker (cheap once all are known)."""
        pids = set(self.pids().values())
        if pids <= set(self._procs):
            return
        for proc in multiprocessing.active_children():
            if proc.pid in pids:
                self._procs.setdefault(proc.pid, proc)

    def dead(self) -> _Death | None:
        """The first worker (by index) that is gone, or None when all are alive."""
        self.watch()
        for index, pid in sorted(self.pids().items()):
            proc = self._procs.get(pid)
            if proc is not None:
                code = proc.exitcode
                if code is not None and code != 0:
                    return _Death(index, pid, -code if code < 0 else None,
                                  code if code > 0 else None)
                continue
            try:  # not seen running: still a zombie (WNOWAIT leaves it to grain) or gone
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
                if not _pid_exists(pid):
                    return _Death(index, pid, None, None)
            if info is not None:
                if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
                    return _Death(index, pid, info.si_status, None)
                if info.si_status != 0:
                    return _Death(index, pid, None, info.si_status)
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dying_error(death: _Death, where: str, workers: int) -> DataError:
    if death.signum == signal.SIGKILL:
        fix = ("SIGKILL is what the kernel's out-of-memory killer sends: set fewer "
               f"--config.data.workers (now {workers}; 0 computes batches in this process) or "
               "give the job more memory")
    else:
        fix = ("the output above may say why; --config.data.workers=0 computes batches in this "
               f"process (now {workers} workers)")
    return DataError(f"data worker {death.index} (pid {death.pid}) {death.how()} at {where}, "
                     f"and {_MAX_RESTARTS} fresh worker pool(s) in a row died before making a "
                     f"batch; {fix}")


def _at(steps: Sequence[int], done: int) -> str:
    return f"data batch {steps[done]}" if done < len(steps) else "the end of the stream"


@dataclasses.dataclass
class _Shared:
    """What the pump shares with the consumer's thread."""

    workers: _Workers | None = None  # the current pool's
    restarts: int = 0  # worker pools restarted after a worker died


def _pump(build: Callable[[Sequence[int], Any], Any], steps: Sequence[int], workers: int,
          q: queue.Queue, slots: threading.Semaphore, stop: threading.Event, shared: _Shared,
          root: str | None) -> None:
    """Background thread: drives the grain iterator into ``q``, taking one of the ``prefetch``
    ``slots`` (given back by the consumer) before each batch; closes the iterator (joining the
    worker processes) when the stream ends or fails, or ``stop`` is set. A worker that died
    closes the pool and starts a fresh one at the first batch not yet in ``q``."""
    done = 0  # batches put in q
    fruitless = 0  # pools in a row that died before a batch
    slot = False  # one of the slots is held for the next batch
    try:
        for generation in itertools.count():
            if stop.is_set():
                return
            pool = (_Workers(os.path.join(root, str(generation)), workers)
                    if root is not None else None)
            shared.workers = pool
            it = None
            try:
                it = iter(build(steps[done:], pool))
                while True:
                    if not slot:
                        if not _acquire(slots, stop):
                            return
                        slot = True
                    try:
                        item = next(it)
                    except StopIteration:
                        q.put(_END)
                        return
                    slot = False
                    failed = isinstance(item, _Failure)
                    q.put(_plain(item))
                    del item  # no reference to a worker's shared memory while waiting for a slot
                    if failed:
                        return
                    done += 1
                    fruitless = 0
                    if pool is not None:
                        pool.watch()
            except Exception as e:  # a dead worker restarts the pool, anything else is handed on
                death = pool.dead() if pool is not None else None
                if death is None:
                    raise
                if stop.is_set():
                    return
                if fruitless == _MAX_RESTARTS:
                    raise _dying_error(death, _at(steps, done), workers) from e
                fruitless += 1
                shared.restarts += 1
                warnings.warn(f"data worker {death.index} (pid {death.pid}) {death.how()}; "
                              f"restarting the {workers} data worker(s) at {_at(steps, done)} "
                              f"(attempt {fruitless} of {_MAX_RESTARTS} in a row)",
                              RuntimeWarning, stacklevel=1)
            finally:
                if it is not None:
                    _close_quietly(it)
                if pool is not None:
                    pool.end()
    except BaseException as e:  # handed to the consumer
        q.put(_Crash(e))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)  # pid files of workers that are all gone


def _close_quietly(it: Any) -> None:
    try:
        it.close()
    except Exception as e:  # the workers are gone either way
        warnings.warn(f"closing the data workers failed: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=1)


_LIVE: weakref.WeakSet[Batches] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Before multiprocessing's own exit hook (registered earlier, so run later): stop the pumps
    # in order rather than have grain's iterators torn down under them.
    for batches in list(_LIVE):
        batches.close()


class Batches(Iterator[Batch]):
    """Iterates ``make(k)`` for k in ``steps`` (a sequence: ``range(n)``, or
    ``range(k, sys.maxsize)`` for an infinite stream), computed by ``workers`` worker processes
    (0: in this process), at most ``prefetch`` batches ahead of the consumer (computed or being
    computed; with workers, each also holds up to three). A failed ``make(k)`` is re-raised at
    batch ``k`` and the iterator closes. A worker that dies is replaced (a fresh pool from the
    first batch not handed on: ``restarts`` counts them); one that keeps dying is a
    ``DataError``.

    ``num_batches`` is the length of a finite (eval) stream, else None.
    """

    def __init__(self, make: Callable[[int], Batch], steps: Iterable[int], *, prefetch: int,
                 workers: int, num_batches: int | None = None) -> None:
        self._thread: threading.Thread | None = None
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigError(f"data.prefetch={prefetch!r} must be >= 1 (batches ready ahead of "
                              "the consumer), e.g. --config.data.prefetch=2")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers={workers!r} must be >= 0 (0: in-process); resolve "
                              "data.workers=-1 with loader.resolve_workers")
        import grain  # imports jax (its profiler hooks); deferred to the first stream

        steps = _as_sequence(steps)
        workers = min(workers, len(steps))  # no idle processes for a short eval stream
        self.num_batches = num_batches
        self.workers = workers
        if workers:
            _absl_flags_parsed()
            # Started here, not by grain in a thread below: its launcher unblocks SIGINT/SIGTERM
            # in the thread that starts it (instead of restoring that thread's mask).
            resource_tracker.ensure_running()
        guarded = _Guarded(make, in_worker=workers > 0)

        def build(todo: Sequence[int], pool: _Workers | None) -> Any:
            ds = grain.MapDataset.source(todo).map(guarded)
            # One batch at a time per process: the parallelism is the worker processes.
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            if pool is None:
                return ds
            ds = grain.experimental.WithOptionsIterDataset(
                ds, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES))
            return ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
                worker_init_fn=_InitWorker(pool.directory))

        root = tempfile.mkdtemp(prefix="resnet_jax_data_") if workers else None
        self._shared = _Shared()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._slots = threading.Semaphore(prefetch)
        self._stop = threading.Event()
        thread = threading.Thread(
            target=_pump, args=(build, steps, workers, self._queue, self._slots, self._stop,
                                self._shared, root),
            daemon=True, name="resnet_jax_data")
        del build
        # Threads and processes inherit the signal mask: the pump, grain's threads (started by
        # the pump) and the workers (started by those) begin with SIGINT/SIGTERM blocked, so
        # they never run Python's handlers; the main thread keeps receiving them.
        with _signals_blocked():
            thread.start()
        self._thread = thread
        _LIVE.add(self)

    @property
    def restarts(self) -> int:
        """How many times the worker pool was restarted after a worker died."""
        return self._shared.restarts

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of the current pool's worker processes started so far."""
        pool = self._shared.workers
        return pool.pids() if pool is not None else {}

    def __iter__(self) -> Batches:
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a training stream is infinite")
        return self.num_batches

    def __next__(self) -> Batch:
        thread = self._thread
        if thread is None:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the data pump thread ended without a result") from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exception()
        if isinstance(item, _Crash):
            self.close()
            raise item.error
        self._slots.release()
        return item

    def close(self) -> None:
        """Stops the pump and joins the worker processes (each finishes the batch it is
        computing, at most ``_CLOSE_TIMEOUT_S``); pending batches are dropped."""
        self._close(wait=True)

    def _close(self, *, wait: bool) -> None:
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        self._thread = None
        self._stop.set()
        _drain(self._queue)
        if wait and thread is not threading.current_thread():
            thread.join(_CLOSE_TIMEOUT_S)
            if thread.is_alive():
                warnings.warn(f"the data workers did not stop within {_CLOSE_TIMEOUT_S:.0f} s; "
                              "leaving them to exit with this process", RuntimeWarning,
                              stacklevel=3)
            _drain(self._queue)
        _LIVE.discard(self)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never block in a finalizer (it may run in any thread, even one the pump waits on):
        # the pump closes the grain iterator, stopping and joining the workers, by itself.
        self._close(wait=False)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: workers ignore them from their init
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _absl_flags_parsed() -> None:
    """grain reads its absl flags when it starts workers; outside ``absl.app.run`` (tests,
    notebooks) nothing has parsed them, so they take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
