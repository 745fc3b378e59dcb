"""Persistence only (orbax): any state pytree, whole, plus JSON metadata, in numbered steps.

Layout: ``<directory>/<step>/{state,meta}``. ``state`` holds the pytree: for a ``flax.struct``
dataclass (a ``TrainState`` or any subclass) every pytree field, by name (``params/...``,
``opt_state/...``, ``ema_params/...``); static fields (``apply_fn``, ``tx``) are code, not data.
``meta`` is JSON: the caller's record (e.g. the run config) plus the format version, the step,
and the shape, dtype and CRC-32 of every array, so damage is detected even where orbax reads a
file without error.

What it guarantees: saves are atomic (orbax writes to a temporary directory and renames it; the
caller's state is copied to host memory first, then written in a background thread);
:meth:`CheckpointStore.restore` reads the newest readable step, verifies every CRC, and moves a
damaged step aside to ``<directory>_damaged/`` (with a warning naming it) before trying the
previous one; a state that does not fit the template is refused in one line
(:class:`~resnet_jax.errors.CheckpointMismatch`) before any array is read. The store decides
nothing about a run: when to save, what to check and what a mismatch of configs means belong to
``resnet_jax.train.policy``. Multi-host: every process calls save and restore (orbax's
barriers); the arrays are host numpy, identical on every process, written from process 0 only,
so the directory must be on a file system all processes share.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from resnet_jax.errors import CheckpointDamaged, CheckpointMismatch, CheckpointNotFound

__all__ = [
    "FORMAT_VERSION", "CheckpointDamaged", "CheckpointMismatch", "CheckpointNotFound",
    "CheckpointStore", "Restored", "check_fits", "checkpoint_dir", "describe_arrays", "host_copy",
    "path_name", "rng_from_json", "rng_to_json", "state_tree", "with_tree",
]

FORMAT_VERSION = 1

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


def describe_arrays(tree: Any, *, checksum: bool = True) -> dict[str, list]:
    """``{"params/stem/conv/kernel": [shape, dtype(, crc32)], ...}`` for every leaf of ``tree``."""
    out: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if checksum:
            x = np.asarray(leaf)
            entry: list = [list(x.shape), str(x.dtype),
                           zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))]
        else:
            entry = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
        out[path_name(path)] = entry
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


def host_copy(state: Any, fetch: Callable[[Any], Any] = jax.device_get) -> Any:
    """:func:`state_tree` of ``state`` as host numpy copies (``fetch`` takes one replica)."""
    return jax.tree.map(np.array, fetch(state_tree(state)))  # copies: device buffers get donated


def rng_to_json(rng: jax.Array) -> dict[str, Any]:
    """A PRNG key (typed or raw uint32) as JSON."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)),
                "data": np.asarray(jax.random.key_data(rng)).tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}


def rng_from_json(saved: Mapping[str, Any]) -> jax.Array:
    """The inverse of :func:`rng_to_json`."""
    data = np.asarray(saved["data"], np.uint32)
    if saved["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=saved["impl"])


class Restored(NamedTuple):
    """What :meth:`CheckpointStore.restore` read."""

    step: int
    tree: Any  # host numpy arrays in the template's structure
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
        self._manager = ocp.CheckpointManager(directory, options=options,
                                              item_names=("state", "meta"))

    @property
    def latest_step(self) -> int | None:
        """The newest step (None without one)."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Write ``state`` (any pytree; a dataclass by its pytree fields) and the JSON ``meta``
        as ``step``, in the background. Host numpy input (:func:`host_copy`) is not copied again.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only.")
        tree = jax.tree.map(np.asarray, host_copy(state) if not _is_host(state) else
                            state_tree(state))
        record = {**meta, "format": FORMAT_VERSION, "step": int(step),
                  "arrays": describe_arrays(tree),
                  "versions": {"jax": jax.__version__, "orbax": ocp.__version__}}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(record)), force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of ``step`` (raises ValueError for one of another format)."""
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"meta is not a format-{FORMAT_VERSION} record")
        return meta

    def restore(self, template: Any, *, step: int | None = None,
                move_damaged: bool = True) -> Restored:
        """``step``, or else the newest readable checkpoint, in ``template``'s structure.

        ``template``: the state (leaves may be abstract, e.g. from ``jax.eval_shape``), or
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
            tree = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), state_tree(wanted))
            partial = check_fits(tree, meta, where)
            try:
                arrays = self._read(s, tree, meta, partial=partial)
            except (ValueError, OSError, KeyError) as e:
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

    def _read(self, step: int, tree: Any, meta: Mapping[str, Any], *, partial: bool) -> Any:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        item = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=tree, restore_args=restore_args, partial_restore=partial)))["state"]
        if isinstance(tree, Mapping):
            item = {k: item[k] for k in tree}
        for path, entry in describe_arrays(item).items():
            if entry != meta["arrays"].get(path):
                raise ValueError(f"{path}: CRC-32/shape differs from the one recorded at save time")
        return item

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
        multihost_utils.sync_global_devices("resnet_jax.checkpoint: damaged found")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s, _ in damaged:
                target = os.path.join(aside, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(s)), target)
        multihost_utils.sync_global_devices("resnet_jax.checkpoint: damaged moved")
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


def _is_host(state: Any) -> bool:
    return all(isinstance(x, np.ndarray | np.generic) for x in jax.tree.leaves(state_tree(state)))


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
