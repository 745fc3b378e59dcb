"""Device placement: wraps ONE step function as ``jax.jit`` (global view) or ``jax.pmap``.

The loop never branches on the mode: it asks a :class:`ParallelStep` to ``replicate`` the
state, calls it with host-local numpy batches (sharded here), and ``fetch``-es outputs.

* ``jit``: a ``Mesh`` over all devices (of all processes) with one axis ``"data"``; state and
  other arguments replicated, the batch sharded on its leading axis and assembled from each
  process's slice with ``jax.make_array_from_process_local_data``; state buffers donated.
* ``pmap``: the step gets ``axis_name="devices"`` and reduces over it; the state carries a
  leading local-device axis. ``bn_sync=False`` gives per-device BN (the paper's multi-GPU
  setup, §3.4) with ``batch_stats`` averaged after each step so the replicas stay identical;
  under ``jit`` the same per-device statistics come from ``bn_groups = device count``.

Step contract: ``step(state, batch, *args, axis_name=None, [bn_sync=..., bn_groups=...])``
returns outputs that are identical on all devices (reduced metrics, the new state).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import ConfigError

MODES = ("jit", "pmap")
DATA_AXIS = "data"  # the jit mesh axis
PMAP_AXIS = "devices"  # the pmap axis name handed to the step


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
    (oneDNN's) faster (benchmarks/RESULTS.md). The cost: the process keeps its peak memory.
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
    return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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


class ParallelStep:
    """A compiled step plus the placement its inputs need.

    ``replicate(tree)``: put a host/device tree on every device (the state).
    ``shard(batch)``: host-local numpy batch -> sharded device batch (called for you on numpy).
    ``fetch(tree)``: device outputs -> host numpy, one replica (blocks).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        mode: str,
        *,
        replicate: Callable[[Any], Any],
        shard: Callable[[dict[str, np.ndarray]], Any],
        fetch: Callable[[Any], Any],
        place_arg: Callable[[Any], Any],
        num_devices: int,
    ) -> None:
        self._fn = fn
        self.mode = mode
        self.replicate = replicate
        self.shard = shard
        self.fetch = fetch
        self._place_arg = place_arg
        self.num_devices = num_devices

    def __call__(self, state: Any, batch: Any, *args: Any) -> Any:
        if any(isinstance(v, np.ndarray) for v in jax.tree.leaves(batch)):
            batch = self.shard(batch)
        return self._fn(state, batch, *(self._place_arg(a) for a in args))


def _first_replica(x: Any, *, strip_axis: bool) -> np.ndarray:
    """One device's copy of a replicated output, as host numpy.

    ``strip_axis``: a pmap output, ``(local devices, ...)``. Its first shard is ``x[0]`` with the
    device axis kept, ``(1, ...)``, under the pmap of jax >= 0.8 (jit + shard_map,
    ``NamedSharding``) and without it, ``(...)``, under the older one (``PmapSharding``), so it
    is reshaped to ``x.shape[1:]`` rather than indexed: right under both.
    """
    shard = np.asarray(x.addressable_data(0))
    return shard.reshape(x.shape[1:]) if strip_axis else shard


def compile(
    step: Callable[..., Any],
    mode: str,
    *,
    bn_sync: bool = True,
    donate_state: bool = True,
    per_example: bool = False,
) -> ParallelStep:
    """Wrap ``step(state, batch, *args, axis_name=...)`` for ``mode`` in {"jit", "pmap"}.

    ``bn_sync=False`` asks for per-device BN statistics: under pmap the step gets
    ``bn_sync=False``, under jit ``bn_groups=jax.device_count()``. Only non-default keywords
    are passed, so an eval step needs none of them. ``per_example=True``: the outputs are
    batches, left sharded like the input batch (ready for the next step) instead of
    replicated; e.g. ``preprocess.gather`` with the device-resident images as "state".
    """
    if mode not in MODES:
        raise ConfigError(f"parallel={mode!r} is not one of {MODES}; use --config.parallel=jit.")
    donate = (0,) if donate_state else ()

    if mode == "jit":
        mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
        replicated = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P(DATA_AXIS))
        bound = step if bn_sync else functools.partial(step, bn_groups=jax.device_count())
        fn = jax.jit(bound, out_shardings=data if per_example else replicated,
                     donate_argnums=donate)

        def put_replicated(x: Any) -> jax.Array:
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(replicated, x, x.shape)

        def shard(batch: dict[str, np.ndarray]) -> Any:
            def put(x: np.ndarray) -> jax.Array:
                x = np.asarray(x)
                global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
                return jax.make_array_from_process_local_data(data, x, global_shape)

            return jax.tree.map(put, batch)

        return ParallelStep(
            fn,
            mode,
            replicate=lambda tree: jax.tree.map(put_replicated, tree),
            shard=shard,
            fetch=lambda tree: jax.tree.map(
                functools.partial(_first_replica, strip_axis=False), tree
            ),
            place_arg=put_replicated,
            num_devices=jax.device_count(),
        )

    devices = jax.local_devices()
    n_local = len(devices)
    local = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
    kwargs: dict[str, Any] = {"axis_name": PMAP_AXIS}
    if not bn_sync:
        kwargs["bn_sync"] = False
    bound = functools.partial(step, **kwargs)

    compiled: dict[int, Any] = {}  # by number of extra (broadcast) arguments

    def pmapped(state: Any, batch: Any, *args: Any) -> Any:
        if len(args) not in compiled:
            in_axes = (0, 0, *([None] * len(args)))
            compiled[len(args)] = jax.pmap(
                bound, axis_name=PMAP_AXIS, in_axes=in_axes, donate_argnums=donate
            )
        return compiled[len(args)](state, batch, *args)

    def replicate(tree: Any) -> Any:
        return jax.tree.map(
            lambda x: jax.device_put(np.stack([np.asarray(x)] * n_local), local), tree
        )

    def shard(batch: dict[str, np.ndarray]) -> Any:
        def put(x: np.ndarray) -> jax.Array:
            x = np.asarray(x)
            if x.shape[0] % n_local:
                raise ValueError(
                    f"per-process batch of {x.shape[0]} does not split over {n_local} devices."
                )
            return jax.device_put(x.reshape(n_local, -1, *x.shape[1:]), local)

        return jax.tree.map(put, batch)

    return ParallelStep(
        pmapped,
        mode,
        replicate=replicate,
        shard=shard,
        fetch=lambda tree: jax.tree.map(functools.partial(_first_replica, strip_axis=True), tree),
        place_arg=lambda x: x,
        num_devices=jax.device_count(),
    )

