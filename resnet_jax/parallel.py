"""Device placement: ONE mesh and one placement; wraps ONE step function as ``jax.jit``
(global view) or as a per-device program (``pmap``'s model, built as ``jit(shard_map)``).

The loop never branches on the mode: a :class:`ParallelStep` builds the state on the devices
(``init``: ``jit`` with ``out_shardings``), places batches (``shard``, ``prefetch``) and other
arguments (``place``), and ``fetch``-es outputs. Every transfer is explicit
(``jax.device_put``, ``jax.make_array_from_process_local_data``, ``jax.device_get``), so a
run works under ``jax.transfer_guard("disallow")``.

* The mesh: ``jax.make_mesh`` over all devices (of all processes; it orders them by the
  interconnect's topology) with one axis ``"data"``. The state, the per-step key and other
  arguments are global arrays replicated on it; a batch is sharded on its leading axis and
  assembled from each process's slice with ``jax.make_array_from_process_local_data``. State
  buffers are donated. Both modes use the same arrays, so fetch, replication and checkpoints
  have one code path.
* ``jit``: the step sees the whole global batch (``axis_name=None``); XLA partitions it.
* ``pmap``: the step runs per device on its shard (``jax.shard_map`` over the mesh axis, which
  is what ``jax.pmap`` itself has become) with ``axis_name="data"`` and reduces over it.
  ``bn_sync=False`` gives per-device BN (the paper's multi-GPU setup, §3.4) with
  ``batch_stats`` averaged after each step so the replicas stay identical; under ``jit`` the
  same per-device statistics come from ``bn_groups = device count``.

Step contract: ``step(state, batch, *args, axis_name=None, [bn_sync=..., bn_groups=...])``
returns outputs that are identical on all devices (reduced metrics, the new state).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import sys
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import ConfigError

MODES = ("jit", "pmap")
DATA_AXIS = "data"  # the mesh axis; also the axis name the pmap-mode step reduces over


def set_cpu_devices(count: int) -> None:
    """Split the host CPU into ``count`` JAX devices (``jax_num_cpu_devices``); 0 keeps JAX's
    one. The data-parallel step then runs one batch shard per device at once: on a 2-core host,
    2 devices train CIFAR ResNet-20 1.2-1.3x and evaluate it 1.4-1.6x faster than one device
    using both cores (``benchmarks/RESULTS.md``). Only the CPU backend is affected; with
    ``bn_sync`` (the default) the statistics are those of the whole batch, so the math is one
    device's. Must run before JAX touches a device (the loop calls it first)."""
    if count < 0:
        raise ConfigError(f"cpu_devices={count} must be >= 0 (0: JAX's default, one CPU device).")
    if count == 0 or jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as e:  # JAX refuses once a backend is up: say which call must move
        raise ConfigError(
            f"cpu_devices={count} comes too late: JAX already touched a device in this process; "
            "call resnet_jax.parallel.set_cpu_devices right after `import jax`."
        ) from e


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the process for reuse instead of returning it to the OS.

    XLA:CPU allocates every step's temporaries afresh (ResNet-20 at batch 128: ~320 MB); glibc
    hands blocks that large out as new mappings and unmaps them on free, so every 4 KiB page
    faults again on its first touch each step (~79,000 faults, ~120 ms of system time in a
    ~250-350 ms step on this project's 2-core VM). One arena, no mmap for large blocks and no
    trimming make the step reuse its memory: 0 faults, 1.2x (XLA convolutions) and 1.4x
    (oneDNN's) faster (benchmarks/RESULTS.md). Trimming is off altogether (threshold -1, glibc's
    "never"): the largest threshold mallopt takes, 2 GiB, was below ResNet-50 b32's 2.7 GB of
    temporaries, which then faulted in afresh every step (690,000 faults, 6-10 s of system time
    a step). The cost: the process keeps its peak memory.

    A kept block is only reused if it is free when the next step asks for it. XLA:CPU frees a
    step's temporaries on its own thread just after the outputs are ready, so a loop that
    dispatches the next step at once often allocates a second block (ResNet-50 b32: 6.0
    against 3.4 GiB, both kept). So this also turns off asynchronous dispatch on the CPU
    (``jax_cpu_enable_async_dispatch``): a one-device CPU step then runs in the calling thread
    and frees its buffers before it returns (multi-device steps stay asynchronous; the loop
    bounds them with :class:`InFlight`). With :func:`settle_heap` after the first step, every
    step reuses one block.
    Only takes effect before JAX starts its CPU client (the loop calls it first); returns
    whether glibc accepted the settings (False off Linux/glibc, changing nothing).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    global _keeping_freed_memory
    _keeping_freed_memory = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                                 and mallopt(_M_TRIM_THRESHOLD, -1))
    if _keeping_freed_memory:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return _keeping_freed_memory


_keeping_freed_memory = False


def settle_heap() -> bool:
    """Once, after a program's first step has finished: return the pages of the heap's free
    blocks to the OS (glibc ``malloc_trim``, the top kept), where :func:`keep_freed_memory` is on.

    Why: XLA:CPU allocates each step's temporaries as one aligned block (ResNet-50 b32: 2.6 GB).
    The first step also leaves long-lived allocations (caches, ~90 MB) after it, so its freed
    block sits inside the heap, and an aligned request of its size asks a little more than it
    holds: in most runs measured the second step's block came from the heap's top and the first
    stayed resident, never used (peak 6.2 against 3.5 GiB). Trimming between the first and the
    second step drops the stranded pages; from then on every step reuses the block at the top
    (0 page faults). Sleeps 10 ms first: an asynchronous (multi-device) step's buffers are
    freed on XLA's thread just after its outputs are ready. The trim itself took
    ~0.25 s for ResNet-50's heap. Returns whether it trimmed (False where keep_freed_memory is
    off or the C library is not glibc).
    """
    if not _keeping_freed_memory:
        return False
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    time.sleep(0.01)
    trim(1 << 40)  # the pad: keep the whole top (the next step's block); free the rest's pages
    return True


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Join a multi-process run if ``config.distributed`` asks for it; True if it did.

    ``distributed.coordinator_address`` set: explicit ``host:port``, ``num_processes`` and
    ``process_id`` (-1 = detect). ``distributed.initialize=True`` without an address: JAX's
    cluster auto-detection (SLURM, Open MPI, Cloud TPU, GKE, ...). Must run before any other
    JAX call touches the devices.
    """
    dist = config.get("distributed")
    if dist is None or not (dist.initialize or dist.coordinator_address):
        return False
    kwargs: dict[str, Any] = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
        kwargs["num_processes"] = int(dist.num_processes)
    if dist.process_id >= 0:
        kwargs["process_id"] = int(dist.process_id)
    jax.distributed.initialize(**kwargs)
    return True


def check_batch_size(batch_size: int, field: str = "batch_size") -> None:
    """Raise a one-line ValueError unless ``batch_size`` splits over processes and devices."""
    n_proc, n_dev = jax.process_count(), jax.device_count()
    if batch_size <= 0 or batch_size % n_dev or batch_size % n_proc:
        fix = (batch_size // n_dev + 1) * n_dev if batch_size > 0 else n_dev
        raise ConfigError(
            f"{field}={batch_size} is not divisible by the {n_dev} devices / {n_proc} processes; "
            f"use a multiple of {n_dev}, e.g. --config.{field}={fix}."
        )


def make_mesh() -> Mesh:
    """All devices of all processes on one ``"data"`` axis, ordered by ``jax.make_mesh`` (the
    interconnect's topology: a ring on TPU slices, NVLink islands on GPU hosts). The axis type
    is ``Auto``: XLA's partitioner places what the step does not constrain."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _is_host(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic | int | float | bool)


class Placement:
    """Explicit transfers onto and off one mesh: the only place data crosses the host boundary.

    ``replicated``/``batch``: the shardings of the state (and other arguments) and of a batch.
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch = NamedSharding(mesh, P(DATA_AXIS))

    def replicate(self, tree: Any) -> Any:
        """Every leaf replicated on the mesh: host values are placed, device arrays copied
        (never aliasing the source: a step donates what it is given, and the caller may still
        hold the source); a leaf already replicated on the mesh is returned as it is."""
        leaves, treedef = jax.tree.flatten(tree)
        moved = {i: jax.device_put(x, self.replicated) for i, x in enumerate(leaves)
                 if isinstance(x, jax.Array) and x.sharding != self.replicated
                 and x.is_fully_addressable and jax.process_count() == 1}
        if moved:  # device_put keeps the source buffer as the shard on its own device
            moved = dict(zip(moved, self._copy(list(moved.values())), strict=True))
        out = [moved[i] if i in moved else self._put_replicated(x) for i, x in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out)

    @functools.cached_property
    def _copy(self) -> Callable[[Any], Any]:
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.replicated)

    def place(self, tree: Any) -> Any:
        """Arguments that are not donated (the per-step key), replicated on the mesh: as
        :meth:`replicate`, but a device array is moved without a copy."""
        def put(x: Any) -> jax.Array:
            if (isinstance(x, jax.Array) and x.sharding != self.replicated
                    and x.is_fully_addressable and jax.process_count() == 1):
                return jax.device_put(x, self.replicated)
            return self._put_replicated(x)

        return jax.tree.map(put, tree)

    def _put_replicated(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array):
            if x.sharding == self.replicated:
                return x
            x = jax.device_get(x)  # another process's placement: through this host
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(self.replicated, x, x.shape)

    def shard(self, batch: Any) -> Any:
        """A host-local batch (this process's rows) -> global arrays sharded on the leading
        axis over the mesh."""
        def put(x: Any) -> jax.Array:
            x = np.asarray(x)
            n_local = jax.local_device_count()
            if x.shape[0] % n_local:
                raise ConfigError(
                    f"a per-process batch of {x.shape[0]} does not split over the "
                    f"{n_local} local devices; use a batch size that is a multiple of "
                    f"{jax.device_count()}.")
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            return jax.make_array_from_process_local_data(self.batch, x, global_shape)

        return jax.tree.map(put, batch)

    def fetch(self, tree: Any) -> Any:
        """Replicated outputs -> host numpy (one replica each), in ONE ``jax.device_get``: the
        host waits for the device here and nowhere else."""
        return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))


class ParallelStep:
    """A compiled step plus the placement its inputs need (the same for both modes).

    ``init(fn, *args)``: ``fn`` run on the devices with replicated outputs (state born there).
    ``replicate(tree)``: put a host/device tree on every device.
    ``shard(batch)``: host-local numpy batch -> sharded device batch (called for you on numpy).
    ``prefetch(batches, size)``: batches placed ``size`` steps ahead of their use.
    ``place(x)``: one replicated argument (the per-step key).
    ``fetch(tree)``: device outputs -> host numpy, one replica (blocks).
    """

    def __init__(self, fn: Callable[..., Any], mode: str, placement: Placement) -> None:
        self._fn = fn
        self.mode = mode
        self.placement = placement
        self.replicate = placement.replicate
        self.shard = placement.shard
        self.fetch = placement.fetch
        self.place = placement.place
        self.num_devices = placement.mesh.devices.size

    def __call__(self, state: Any, batch: Any, *args: Any) -> Any:
        if any(_is_host(v) for v in jax.tree.leaves(batch)):
            batch = self.shard(batch)
        return self._fn(state, batch, *(self.place(a) for a in args))

    def init(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` compiled with replicated outputs: a state is born on the mesh, with no
        host copy and no eager op (each would be a transfer). ``args`` are placed first."""
        return jax.jit(fn, out_shardings=self.placement.replicated)(*self.place(args))

    def abstract(self, fn: Callable[..., Any], *args: Any) -> Any:
        """What :meth:`init` would return, as ``jax.ShapeDtypeStruct``s with their shardings
        (nothing computed): the template a checkpoint is restored into."""
        shapes = jax.eval_shape(fn, *args)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.placement.replicated),
            shapes)

    def prefetch(self, batches: Iterable[Any], size: int,
                 transform: Callable[[Any], Any] | None = None) -> Generator[Any, None, None]:
        """:func:`prefetch` with this step's :meth:`shard` (then ``transform``, e.g. the
        on-device gather)."""
        put = self.shard if transform is None else (lambda b: transform(self.shard(b)))
        return prefetch(batches, put, size)


def check_prefetch(size: Any) -> None:
    """A one-line ConfigError unless ``size`` (``config.device_prefetch``) is an int >= 0."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"device_prefetch={size!r} must be an int >= 0 (batches placed on "
                          "the devices ahead of the step), e.g. --config.device_prefetch=2")


def check_steps_in_flight(value: Any) -> None:
    """A one-line ConfigError unless ``value`` (``config.steps_in_flight``) is an int >= -1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ConfigError(f"steps_in_flight={value!r} must be an int >= -1 (-1: auto, 1 on CPU; "
                          "0: no bound; N: at most N), e.g. --config.steps_in_flight=1")


def steps_in_flight(value: Any) -> int:
    """``config.steps_in_flight`` resolved: the most steps dispatched and not finished (0: no
    bound). -1 (auto) is 1 on a CPU backend and unbounded elsewhere.

    XLA:CPU allocates a step's temporaries when the step is dispatched, not when it starts:
    a loop that dispatches ahead holds one set per queued step (up to the CPU client's 32).
    ResNet-50 at batch 32 has 2.6 GB of them: four steps dispatched ahead peaked at 11.4 GiB
    against 3.5 GiB one at a time (benchmarks/RESULTS.md). Accelerators allocate at run time
    on their stream, so their queue stays unbounded. A one-line ConfigError for anything but an
    int >= -1 (:func:`check_steps_in_flight`).
    """
    check_steps_in_flight(value)
    if value == -1:
        return 1 if jax.default_backend() == "cpu" else 0
    return value


class InFlight:
    """Keeps at most ``limit`` dispatched steps unfinished (0: no bound): :meth:`wait` before
    dispatching the next step blocks on the oldest ones, :meth:`add` records the new one by any
    of its outputs (the step's outputs are ready together)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: collections.deque[Any] = collections.deque()
        self._settled = False

    def wait(self) -> None:
        """Block until fewer than ``limit`` recorded steps are unfinished; after the first
        step, :func:`settle_heap` (once)."""
        while self.limit and len(self._queue) >= self.limit:
            jax.block_until_ready(self._queue.popleft())
            if not self._settled:
                self._settled = True
                settle_heap()

    def add(self, output: Any) -> None:
        """Record a just-dispatched step by one of its outputs (a small one: it is kept)."""
        if self.limit:
            self._queue.append(output)


def prefetch(batches: Iterable[Any], put: Callable[[Any], Any],
             size: int) -> Generator[Any, None, None]:
    """``put(batch)`` for each batch, ``size`` batches ahead of the consumer: the copies of the
    next batches (asynchronous ``device_put``) overlap the step that runs now. ``size=0``
    places each batch when it is asked for. An error while fetching or placing a batch is
    raised when the consumer reaches that batch, so every batch before it is still used."""
    check_prefetch(size)
    source = iter(batches)
    ready: collections.deque[Any] = collections.deque()
    failure: list[BaseException] = []

    def fill(target: int) -> None:
        while not failure and len(ready) < target:
            try:
                ready.append(put(next(source)))
            except StopIteration:
                return
            except Exception as e:  # re-raised, unchanged, when its own batch is due
                failure.append(e)

    while True:
        fill(max(size, 1))
        if not ready:
            if failure:
                raise failure[0]
            return
        item = ready.popleft()
        fill(size)  # the next ones go out before this one is used
        yield item


def compile(
    step: Callable[..., Any],
    mode: str,
    *,
    bn_sync: bool = True,
    donate_state: bool = True,
    per_example: bool = False,
    mesh: Mesh | None = None,
) -> ParallelStep:
    """Wrap ``step(state, batch, *args, axis_name=...)`` for ``mode`` in {"jit", "pmap"}.

    ``bn_sync=False`` asks for per-device BN statistics: under pmap the step gets
    ``bn_sync=False``, under jit ``bn_groups=jax.device_count()``. Only non-default keywords
    are passed, so an eval step needs none of them. ``per_example=True``: the outputs are
    batches, left sharded like the input batch (ready for the next step) instead of
    replicated; e.g. ``preprocess.gather`` with the device-resident images as "state".
    ``mesh``: default :func:`make_mesh`.
    """
    if mode not in MODES:
        raise ConfigError(f"parallel={mode!r} is not one of {MODES}; use --config.parallel=jit.")
    placement = Placement(make_mesh() if mesh is None else mesh)
    donate = (0,) if donate_state else ()
    out_sharding = placement.batch if per_example else placement.replicated

    if mode == "jit":
        bound = step if bn_sync else functools.partial(step, bn_groups=jax.device_count())
        return ParallelStep(jax.jit(bound, out_shardings=out_sharding, donate_argnums=donate),
                            mode, placement)

    kwargs: dict[str, Any] = {"axis_name": DATA_AXIS}
    if not bn_sync:
        kwargs["bn_sync"] = False
    bound = functools.partial(step, **kwargs)
    out_spec = P(DATA_AXIS) if per_example else P()
    compiled: dict[int, Any] = {}  # by number of extra (replicated) arguments

    def per_device(state: Any, batch: Any, *args: Any) -> Any:
        if len(args) not in compiled:
            # check_vma=False as jax.pmap's own shard_map: the step's reductions over the axis
            # make its outputs the same on every device (the step contract).
            mapped = jax.shard_map(bound, mesh=placement.mesh,
                                   in_specs=(P(), P(DATA_AXIS), *([P()] * len(args))),
                                   out_specs=out_spec, check_vma=False)
            compiled[len(args)] = jax.jit(mapped, out_shardings=out_sharding,
                                          donate_argnums=donate)
        return compiled[len(args)](state, batch, *args)

    return ParallelStep(per_device, mode, placement)
