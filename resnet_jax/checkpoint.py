"""Persistence only (orbax): any state pytree, whole, plus JSON metadata, in numbered steps.

Layout: ``<directory>/<step>/{state,meta}``. ``state`` holds the pytree: for a ``flax.struct``
dataclass (a ``TrainState`` or any subclass) every pytree field, by name (``params/...``,
``opt_state/...``, ``ema_params/...``); static fields (``apply_fn``, ``tx``) are code, not data.
``meta`` is JSON: the caller's record (e.g. the run config) plus the format version, the step,
and the shape, dtype and checksum of every array (:data:`CHECKSUM`, computed on the devices), so
damage is detected even where orbax reads a file without error.

Leaves: ``jax.Array`` (any sharding, also one spanning processes) or host numpy. Arrays are
handed to orbax as they are: it copies each shard to host once, from its replica 0, before
:meth:`CheckpointStore.save` returns (so the caller may donate or overwrite the buffers right
after), and writes it in a background thread. This module makes no host copy of the state: the
checksums are one jitted reduction over the tree and one small explicit ``jax.device_get``.

What it guarantees: saves are atomic (orbax writes to a temporary directory and renames it);
:meth:`CheckpointStore.restore` reads the newest readable step, verifies every checksum, and
moves a damaged step aside to ``<directory>_damaged/`` (with a warning naming it) before trying
the previous one; a state that does not fit the template is refused in one line
(:class:`~resnet_jax.errors.CheckpointMismatch`) before any array is read. A template leaf with
a sharding (a ``jax.Array``, or a ``jax.ShapeDtypeStruct`` with ``.sharding``) comes back as a
global ``jax.Array`` in exactly that sharding; one without (numpy, a plain ``ShapeDtypeStruct``)
as host numpy. Save and restore make no implicit transfer, so they run under
``jax.transfer_guard("disallow")``. Format-1 checkpoints (CRC-32 of host copies) still restore,
through host memory. The store decides nothing about a run: when to save, what to check and
what a mismatch of configs means belong to ``resnet_jax.train.policy``.

Multi-host: every process calls save and restore with the same tree (orbax's barriers; the
checksum is a collective). Each process writes the shards whose replica 0 it holds (numpy
leaves, identical everywhere, from process 0), and reads the shards its devices hold, so the
directory must be on a file system all processes share.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from resnet_jax.errors import (
    CheckpointDamaged,
    CheckpointMismatch,
    CheckpointNotFound,
    ConfigError,
)

__all__ = [
    "CHECKSUM", "FORMAT_VERSION", "CheckpointDamaged", "CheckpointMismatch", "CheckpointNotFound",
    "CheckpointStore", "Restored", "check_fits", "checkpoint_dir", "checksums",
    "describe_arrays", "path_name", "per_leaf", "rng_from_json", "rng_to_json", "state_tree",
    "with_tree",
]

FORMAT_VERSION = 2  # 1: CRC-32 of host copies (still read); 2: CHECKSUM, computed on device
READABLE_FORMATS = (1, 2)
# Of each array's elements as 32-bit words w_i (1- and 2-byte types widened, 8-byte ones two
# words, low first) at flat (C-order) word index i: sum_i fmix32(w_i ^ fmix32(i + 0x9e3779b9))
# mod 2^32, fmix32 being MurmurHash3's finalizer. Exact, and independent of sharding and of the
# order of the reduction; a changed, moved or swapped word changes it (but for 2^-32).
CHECKSUM = "sum32-fmix32-indexed-words"

# A template may be given up front or built from the saved metadata (e.g. the model it names).
Prepare = Callable[[dict[str, Any], str], Any]


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints``."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as ``params/stage1/block0/conv1/kernel``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


# --- per-leaf reductions: jax.Arrays in one jitted call (per mesh), numpy leaves on the host ---

@functools.cache
def _jitted(device_fn: Callable[[jax.Array], jax.Array]) -> Callable[[list], jax.Array]:
    return jax.jit(lambda leaves: jnp.stack([device_fn(x) for x in leaves]))


def _placement(x: jax.Array) -> Any:
    """Leaves that may share one jitted call: the same mesh (or the same devices)."""
    mesh = getattr(x.sharding, "mesh", None)
    if mesh is not None:
        return mesh
    return tuple(sorted(d.id for d in x.sharding.device_set))


def _in_host_memory(x: jax.Array) -> bool:
    """A replicated array on CPU devices: its first shard is host memory, read in place (numpy
    views it without a copy), so no program needs compiling for it."""
    return (x.sharding.is_fully_replicated and x.size > 0
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            and all(d.platform == "cpu" for d in x.sharding.device_set))


def per_leaf(leaves: Sequence[Any], device_fn: Callable[[jax.Array], jax.Array],
             host_fn: Callable[[np.ndarray], Any], *, on_device: bool = False) -> list[Any]:
    """``[f(leaf) ...]``: ``device_fn`` (a module-level function to a scalar) on the ``jax.Array``
    leaves, in one jitted call per mesh and one explicit fetch of the small result; ``host_fn``
    on the others (as numpy) and, unless ``on_device``, on replicated arrays in CPU memory (read
    in place: a compile per state structure costs seconds on a CPU, the numpy pass
    milliseconds). Makes no host copy of an array and no implicit transfer."""
    out: list[Any] = [None] * len(leaves)
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array) and (on_device or not _in_host_memory(leaf)):
            groups.setdefault(_placement(leaf), []).append(i)
        elif isinstance(leaf, jax.Array):
            out[i] = host_fn(np.asarray(leaf.addressable_data(0)))
        else:
            out[i] = host_fn(np.asarray(leaf))
    for indices in groups.values():
        values = jax.device_get(_jitted(device_fn)([leaves[i] for i in indices]))
        for i, value in zip(indices, values, strict=True):
            out[i] = value
    return out


# --- the checksum (CHECKSUM): the same integer arithmetic in jnp (device) and numpy (host) ---

_M1, _M2, _SEED = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35), np.uint32(0x9E3779B9)
_S13, _S16 = np.uint32(13), np.uint32(16)


def _fmix32(h: Any) -> Any:
    h = h ^ (h >> _S16)
    h = h * _M1
    h = h ^ (h >> _S13)
    h = h * _M2
    return h ^ (h >> _S16)


def _device_checksum(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    dtype = np.dtype(x.dtype)
    if dtype.kind == "c":
        x = jnp.stack([x.real, x.imag], axis=-1)
        dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        words = x.astype(jnp.uint32)
    elif dtype.itemsize < 4:
        words = lax.bitcast_convert_type(x, np.dtype(f"uint{8 * dtype.itemsize}")).astype(
            jnp.uint32)
    else:  # 4 bytes: the same shape; 8 bytes: a trailing axis of 2 words, low word first
        words = lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat C-order index, mod 2^32, shard by shard
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
        stride = stride * words.shape[axis] % 2**32
    return jnp.sum(_fmix32(words ^ _fmix32(index + _SEED)), dtype=jnp.uint32)


def _host_checksum(x: np.ndarray) -> int:
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype.kind == "c":
        flat = flat.view(flat.real.dtype)
    if flat.dtype.kind not in "biufV" or flat.dtype.fields or flat.dtype.itemsize not in (
            1, 2, 4, 8):  # V: ml_dtypes' bfloat16, float8_*
        raise TypeError(f"cannot checksum an array of dtype {x.dtype}")
    if flat.dtype == np.bool_:
        words = flat.astype(np.uint32)
    elif flat.dtype.itemsize < 4:
        words = flat.view(f"uint{8 * flat.dtype.itemsize}").astype(np.uint32)
    else:  # 8-byte elements: two words each, low first (the device's bitcast on little-endian)
        words = flat.view(np.uint32)
    index = (np.arange(words.size, dtype=np.uint64) % 2**32).astype(np.uint32)
    return int(np.sum(_fmix32(words ^ _fmix32(index + _SEED)), dtype=np.uint32))


def checksums(leaves: Sequence[Any], *, on_device: bool = False) -> list[int]:
    """:data:`CHECKSUM` of each leaf (``jax.Array``: on its devices, or in place in CPU memory
    unless ``on_device``; numpy: on the host): :func:`per_leaf`."""
    return [int(c) for c in per_leaf(leaves, _device_checksum, _host_checksum,
                                     on_device=on_device)]


def _crc32(x: np.ndarray) -> int:  # format 1
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def describe_arrays(tree: Any, *, checksum: bool = True) -> dict[str, list]:
    """``{"params/stem/conv/kernel": [shape, dtype(, checksum)], ...}`` for every leaf of
    ``tree`` (leaves may be abstract when ``checksum=False``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [leaf for _, leaf in flat]
    sums: list[int | None] = checksums(leaves) if checksum else [None] * len(leaves)
    out: dict[str, list] = {}
    for (path, leaf), c in zip(flat, sums, strict=True):
        entry: list = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
        out[path_name(path)] = entry if c is None else [*entry, c]
    return out


def state_tree(state: Any) -> Any:
    """What is saved of ``state``: a ``flax.struct`` dataclass as ``{field: value}`` over all
    its pytree fields (subclasses' included); any other pytree as it is."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if f.metadata.get("pytree_node", True)}
    return state


def with_tree(state: Any, tree: Any) -> Any:
    """``state`` with the fields of ``tree`` (the inverse of :func:`state_tree`)."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return state.replace(**tree)
    return tree


def rng_to_json(rng: jax.Array) -> dict[str, Any]:
    """A PRNG key (typed or raw uint32; on a device, replicated, or numpy) as JSON."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)),
                "data": np.asarray(jax.device_get(jax.random.key_data(rng))).tolist()}
    return {"impl": None, "data": np.asarray(jax.device_get(rng)).tolist()}


def rng_from_json(saved: Mapping[str, Any]) -> jax.Array:
    """The inverse of :func:`rng_to_json`: the key on the default device (an explicit
    ``jax.device_put``; place it where it is used)."""
    data = jax.device_put(np.asarray(saved["data"], np.uint32))
    if saved["impl"] is None:
        return data
    return jax.random.wrap_key_data(data, impl=saved["impl"])


class Restored(NamedTuple):
    """What :meth:`CheckpointStore.restore` read."""

    step: int
    tree: Any  # the template's structure: jax.Arrays where it gives a sharding, else numpy
    meta: dict[str, Any]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _check_fits(saved: Mapping[str, list], expected: Mapping[str, list], where: str, *,
                tops: set[str] | None) -> None:
    problems = []
    order = {"params": 0, "batch_stats": 1}  # name a parameter before its optimizer slot
    for path in sorted(expected, key=lambda p: order.get(p.split("/")[0], 2)):
        if path not in saved:
            problems.append(f"{path} is missing from the checkpoint")
        elif saved[path][:2] != expected[path][:2]:
            problems.append(
                f"{path} is {tuple(saved[path][0])} {saved[path][1]} in the checkpoint but "
                f"{tuple(expected[path][0])} {expected[path][1]} here"
            )
    problems += [f"{path} is in the checkpoint but not in this state" for path in saved
                 if path not in expected and (tops is None or path.split("/")[0] in tops)]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointMismatch(f"{where} does not fit this model: {problems[0]}{more}.")


def _shardings(tree: Any) -> list[jax.sharding.Sharding | None]:
    """Where each template leaf is to be restored: its sharding, or None (host numpy)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = leaf.sharding if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) else None
        if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
            raise ConfigError(
                f"the restore template's {path_name(path)} is placed on an abstract mesh, not on "
                "devices; pass the state itself, jax.eval_shape of the jitted init (with "
                "out_shardings) or jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, "
                "spec)).")
        out.append(sharding)
    return out


def _place(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every process) as a global array in ``sharding``."""
    shards = [jax.device_put(x[index], device)  # explicit (make_array_from_callback is not)
              for device, index in sharding.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


class CheckpointStore:
    """Numbered checkpoints of a state pytree in ``directory``; keeps the newest ``keep``.

    ``read_only``: never saves or moves anything (loading a finished run)."""

    def __init__(self, directory: str, *, keep: int | None = None,
                 read_only: bool = False) -> None:
        self.directory = directory
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(  # not orbax's read_only: it warns on every use
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=not read_only,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    @property
    def latest_step(self) -> int | None:
        """The newest step (None without one)."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Write ``state`` (any pytree; a dataclass by its pytree fields; ``jax.Array`` leaves in
        any sharding, or numpy) and the JSON ``meta`` as ``step``, in the background.

        On return orbax holds its host copy of every shard: the caller may donate the buffers.
        Every process calls it (multi-host) with the same tree.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only.")
        tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x),
                            state_tree(state))
        record = {**meta, "format": FORMAT_VERSION, "checksum": CHECKSUM, "step": int(step),
                  "arrays": describe_arrays(tree),
                  "versions": {"jax": jax.__version__, "orbax": ocp.__version__}}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(tree),
                                  meta=ocp.args.JsonSave(record))
        # orbax fetches each replica-0 shard with np.asarray before this returns
        # (replica_slices.transfer_arrays_to_host): an implicit device-to-host copy, which the
        # guard refuses on accelerators (on CPU the buffer is shared, not copied).
        with jax.transfer_guard_device_to_host("allow"):
            self._manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of ``step`` (raises ValueError for one of an unknown format)."""
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"meta is not a format-{'/'.join(map(str, READABLE_FORMATS))} "
                             "record")
        if meta["format"] == 2 and meta.get("checksum") != CHECKSUM:
            raise ValueError(f"meta is not a format-2 record with the {CHECKSUM} checksum "
                             f"(it names {meta.get('checksum')!r})")
        return meta

    def restore(self, template: Any, *, step: int | None = None,
                move_damaged: bool = True) -> Restored:
        """``step``, or else the newest readable checkpoint, in ``template``'s structure.

        ``template``: the state (leaves may be abstract, e.g. from ``jax.eval_shape``; a leaf
        with a sharding is restored as a ``jax.Array`` in it, others as numpy), or
        ``prepare(meta, where) -> state``, which may raise (e.g. ``CheckpointMismatch``) before
        any array is read. A template with fewer top-level fields than were saved reads only
        those (a model's ``params`` out of a whole training state). A damaged checkpoint is
        reported, moved aside (``move_damaged``, and only when no ``step`` is asked for) and the
        next older one tried; :class:`CheckpointDamaged` when none is readable.
        """
        available = sorted(self._manager.all_steps(), reverse=True)
        if step is not None and step not in available:
            raise CheckpointNotFound(
                f"no checkpoint {step} in {self.directory}; it has {available}.")
        steps = [step] if step is not None else available
        if not steps:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}.")
        damaged: list[tuple[int, BaseException]] = []
        for s in steps:
            where = f"checkpoint {s} in {self.directory}"
            try:
                meta = self.read_meta(s)
            except (ValueError, OSError, KeyError) as e:
                damaged.append((s, e))
                continue
            wanted = template(meta, where) if callable(template) else template
            tree = state_tree(wanted)
            partial = check_fits(tree, meta, where)
            shardings = _shardings(tree)  # a template error is no damage: raised, not caught
            try:
                arrays = self._read(s, tree, shardings, meta, partial=partial)
            except (ValueError, OSError, KeyError, CheckpointDamaged) as e:
                damaged.append((s, e))
                continue
            move = move_damaged and step is None and not self.read_only
            self._report_damaged(damaged, s, move=move)
            return Restored(s, arrays, meta)
        raise CheckpointDamaged(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {_one_line(e)}" for s, e in damaged)
            + ". Move the damaged ones away (or use another --workdir) to start afresh."
        )

    def _read(self, step: int, tree: Any, shardings: list[jax.sharding.Sharding | None],
              meta: Mapping[str, Any], *, partial: bool) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        paths = _paths(tree)
        legacy = meta["format"] == 1  # CRC-32 of host arrays: read to host, check, then place
        wanted: dict[str, tuple[jax.ShapeDtypeStruct, ocp.RestoreArgs]] = {}
        for path, leaf, sharding in zip(paths, leaves, shardings, strict=True):
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
            if sharding is None or legacy:
                wanted[path] = (jax.ShapeDtypeStruct(shape, dtype),
                                ocp.RestoreArgs(restore_type=np.ndarray))
            else:
                wanted[path] = (jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),
                                ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape,
                                                     dtype=dtype))
        # Arrays are matched by path (as check_fits does), not by container type: orbax is given
        # the tree as it is on disk (a tuple saved is a list there, a namedtuple a dict).
        on_disk = self._manager.item_metadata(step)["state"].tree
        if partial:
            on_disk = {k: on_disk[k] for k in tree}
        item, restore_args = (jax.tree_util.tree_map_with_path(
            lambda p, _, i=i: wanted[path_name(p)][i], on_disk) for i in (0, 1))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                         partial_restore=partial)))["state"]
        by_path = {path_name(p): x
                   for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
        got = [by_path[p] for p in paths]
        if legacy:
            for path, x in zip(paths, got, strict=True):
                if [list(x.shape), str(x.dtype), _crc32(x)] != meta["arrays"].get(path):
                    raise CheckpointDamaged(f"{path}: CRC-32/shape differs from the one "
                                            "recorded at save time")
            got = [x if s is None else _place(x, s) for x, s in zip(got, shardings, strict=True)]
        else:
            for path, x, c in zip(paths, got, checksums(got), strict=True):
                if [list(x.shape), str(x.dtype), c] != meta["arrays"].get(path):
                    raise CheckpointDamaged(f"{path}: {CHECKSUM} checksum/shape differs from the "
                                            "one recorded at save time")
        return treedef.unflatten(got)

    def _report_damaged(self, damaged: list, used: int, *, move: bool) -> None:
        if not damaged:
            return
        aside = self.directory.rstrip("/") + "_damaged"
        for s, e in damaged:
            action = f"moved to {aside}" if move else "skipped"
            warnings.warn(
                f"checkpoint {s} in {self.directory} is damaged ({_one_line(e)}); {action}; "
                f"using checkpoint {used}.", RuntimeWarning, stacklevel=4,
            )
        if not move:
            return
        # the distributed runtime's barrier (no device round trip, nothing for the guard)
        ocp.multihost.sync_global_processes("resnet_jax.checkpoint: damaged found")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s, _ in damaged:
                target = os.path.join(aside, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(s)), target)
        ocp.multihost.sync_global_processes("resnet_jax.checkpoint: damaged moved")
        self._manager.reload()

    def wait(self) -> None:
        """Block until the background saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()


def _paths(tree: Any) -> list[str]:
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_fits(template: Any, meta: Mapping[str, Any], where: str) -> bool:
    """Raise :class:`CheckpointMismatch` (one line, naming the first array that differs) if the
    arrays recorded in ``meta`` do not fit ``template``; True when it is a part of them."""
    tree = state_tree(template)
    expected = describe_arrays(tree, checksum=False)
    saved = meta["arrays"]
    saved_tops = {p.split("/")[0] for p in saved}
    tops = set(tree) if isinstance(tree, Mapping) else saved_tops
    partial = tops < saved_tops
    _check_fits(saved, expected, where, tops=tops if partial else None)
    return partial
