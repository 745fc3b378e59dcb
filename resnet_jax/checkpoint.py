"""Checkpoints (orbax): periodic saves, auto-resume, preemption, damage and NaN guards, ``load``.

Layout: ``workdir/checkpoints/<step>/{state,meta}``. ``<step>`` counts the updates done, which is
also the data position (the index of the next training batch). ``state`` holds the whole
``TrainState`` pytree (step, params, batch_stats, opt_state); ``meta`` is JSON: the run config,
the base RNG, the model's name and number of classes, and the shape, dtype and CRC-32 of every
array (so a damaged checkpoint is detected even where orbax reads it without error).

* Saves every ``config.checkpoint_every_steps`` and at the last step, keeping the newest
  ``config.keep_checkpoints``. Each save copies the state to host memory, then orbax writes it in
  a background thread while training goes on; :meth:`TrainingCheckpoints.close` waits for it.
* Resume: a workdir with checkpoints continues from the newest readable one. The loop's per-step
  rng is ``fold_in(base_rng, step)`` and the data stream restarts at the saved step, so on CPU a
  run killed at any step and restarted ends bit-identical to an uninterrupted run.
  ``metrics.jsonl`` drops records logged after the restored step, then appends.
* Preemption: the first SIGTERM or SIGINT finishes the current step, saves it and raises
  :class:`Preempted`; ``train.py`` exits with ``128 + signum`` (:data:`EXIT_SIGTERM` = 143,
  :data:`EXIT_SIGINT` = 130). The first signal resets both handlers to the OS default, so a
  second one terminates the process at once, even inside a device computation.
  Single process: the stop takes effect after the current step. Multi-process: every process
  must save the same step, so the processes agree at the next log or checkpoint step (where the
  host waits on the device anyway); keep ``log_every_steps`` within the scheduler's grace period.
* Damage: an unreadable latest checkpoint (truncated file, bad CRC) is moved to
  ``workdir/checkpoints_damaged/`` with a warning naming the step, and the previous one is used;
  if none is readable, :class:`CheckpointDamaged`. A checkpoint of another model or config:
  :class:`CheckpointMismatch`, one line naming the model, the array path or the config fields.
* NaN guard: the loss is checked where the loop fetches metrics anyway (log steps), and the
  pending losses plus every array of the state are checked before each save, so a non-finite
  state is never saved and the newest checkpoint stays the last good one. Between log steps the
  device runs ahead unchecked; the stop names the first non-finite step (:class:`TrainingDiverged`).
* Multi-host: every process calls save and restore (orbax's barriers); the state is saved as
  host numpy arrays, identical on every process, which orbax writes from process 0 only.
  ``workdir`` must be on a file system all processes share.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.train import config as config_lib
from resnet_jax.train.state import TrainState

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: stopped by SIGTERM after saving (resumable)
EXIT_SIGINT = 128 + signal.SIGINT  # 130: stopped by SIGINT (Ctrl-C) after saving (resumable)
EXIT_DIVERGED = 3  # non-finite loss or state; the newest checkpoint is the last good one
FORMAT_VERSION = 1
STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")

# Config fields that may change between a checkpoint and its resume: they steer the run, not
# what is computed. Any other difference is a CheckpointMismatch. A key matches itself and its
# sub-keys ("distributed" covers "distributed.process_id").
RESUME_SAFE_FIELDS = (
    "num_train_steps", "num_epochs", "eval_every_steps", "log_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "parallel", "cpu_devices",
    "distributed",
    "data.archive", "data.data_dir", "data.manual_dir", "data.download", "data.tfds_eval_split",
    "data.eval_protocol", "data.eval_resize", "data.multi_scale_sizes", "data.prefetch",
    "data.workers", "data.on_device",
)
MODEL_FIELDS = ("model", "model_kwargs")


class CheckpointMismatch(ValueError):
    """The checkpoint was written for another model or config than the one running."""


class CheckpointDamaged(RuntimeError):
    """No checkpoint in the directory can be read."""


class CheckpointNotFound(FileNotFoundError):
    """The workdir has no checkpoint (or not the step asked for)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or state; ``step`` is the first bad step found."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class Preempted(Exception):
    """SIGTERM/SIGINT: the state of ``step`` was saved; exit with ``exit_code`` to be requeued."""

    def __init__(self, signum: int, step: int, directory: str) -> None:
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {step} saved "
            f"in {directory}; exit code {self.exit_code}. Rerun the same command to resume."
        )


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints``."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _path_name(path: Sequence[Any]) -> str:
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
        x = np.asarray(leaf)
        entry: list = [list(x.shape), str(x.dtype)]
        if checksum:
            entry.append(zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
        out[_path_name(path)] = entry
    return out


def host_state(state: TrainState, fetch: Callable[[Any], Any] = jax.device_get) -> dict[str, Any]:
    """``{step, params, batch_stats, opt_state}`` as host numpy copies (one replica)."""
    tree = fetch({f: getattr(state, f) for f in STATE_FIELDS})
    return jax.tree.map(np.array, tree)  # np.array copies: the device buffers get donated


def _rng_to_json(rng: jax.Array) -> dict[str, Any]:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)),
                "data": np.asarray(jax.random.key_data(rng)).tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}


def _rng_from_json(saved: Mapping[str, Any]) -> jax.Array:
    data = np.asarray(saved["data"], np.uint32)
    if saved["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=saved["impl"])


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _covered(key: str, fields: Sequence[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def _describe_model(config: Mapping[str, Any]) -> str:
    kwargs = {k: v for k, v in (config.get("model_kwargs") or {}).items() if v is not None}
    return f"{config.get('model')!r}" + (f" {kwargs}" if kwargs else "")


def _check_model(saved: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
    a, b = _flatten({k: saved.get(k) for k in MODEL_FIELDS}), _flatten(
        {k: config.get(k) for k in MODEL_FIELDS})
    if any(a.get(k) != b.get(k) for k in set(a) | set(b)):
        raise CheckpointMismatch(
            f"{where} was written for model {_describe_model(saved)}, but this config builds "
            f"{_describe_model(config)}; use the checkpoint's model or another --workdir."
        )


def _check_arrays(saved: Mapping[str, list], expected: Mapping[str, list], where: str) -> None:
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
    problems += [f"{path} is in the checkpoint but not in this model"
                 for path in saved if path not in expected]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointMismatch(f"{where} does not fit this model: {problems[0]}{more}.")


def _check_config(saved: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
    a, b = _flatten(saved), _flatten(config)
    changed = sorted(k for k in set(a) & set(b)
                     if a[k] != b[k] and not _covered(k, RESUME_SAFE_FIELDS))
    if changed:
        diffs = ", ".join(f"{k} {a[k]!r} -> {b[k]!r}" for k in changed[:4])
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise CheckpointMismatch(
            f"{where} was written with another config: {diffs}{more}; resuming would not "
            "continue that run. Restore those values or use another --workdir."
        )
    only = sorted(k for k in set(a) ^ set(b) if not _covered(k, RESUME_SAFE_FIELDS))
    if only:
        _log(f"warning: {where}: config fields present on one side only (code changed?): "
             f"{', '.join(only[:6])}")


def _nonfinite_path(tree: Any) -> str | None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(leaf)
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            return _path_name(path)
    return None


class _StopSignals:
    """SIGTERM/SIGINT set ``signum``; the first one resets both to the OS default (so a second
    one kills the process at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            _log("warning: not on the main thread, so SIGTERM/SIGINT are not caught: a "
                 "preemption will not save a checkpoint.")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        print(f"received {signal.Signals(signum).name}: finishing the step, saving a checkpoint, "
              f"then exiting with {128 + signum}; send it again to abort at once.",
              file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python (e.g. JAX's preemption notifier).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


def _manager(directory: str, keep: int | None, *, reader: bool = False) -> ocp.CheckpointManager:
    """``reader``: never saves (orbax's read_only mode would log two warnings per use)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not reader, enable_async_checkpointing=not reader,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"meta is not a format-{FORMAT_VERSION} record")
    return meta


def _read_arrays(manager: ocp.CheckpointManager, step: int, template: Mapping[str, Any],
                 meta: Mapping[str, Any]) -> dict[str, Any]:
    """Restore ``template``'s subtree of the state as numpy and verify the CRCs."""
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), template)
    partial = set(template) != set(STATE_FIELDS)
    item = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=template, restore_args=restore_args, partial_restore=partial)))["state"]
    item = {k: item[k] for k in template}
    for path, entry in describe_arrays(item).items():
        if entry != meta["arrays"].get(path):
            raise ValueError(f"{path}: CRC-32/shape differs from the one recorded at save time")
    return item


def _restore_newest(
    manager: ocp.CheckpointManager,
    directory: str,
    prepare: Callable[[dict[str, Any], str], dict[str, Any]],
    *,
    step: int | None = None,
    move_damaged: bool = True,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, meta, arrays) of ``step``, or else of the newest readable checkpoint.

    ``prepare(meta, where)`` raises :class:`CheckpointMismatch` before any array is read and
    returns the template (a subtree of the state) to restore. A damaged checkpoint is reported
    and (``move_damaged``) moved aside, then the next older one is tried.
    """
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in available:
        raise CheckpointNotFound(f"no checkpoint {step} in {directory}; it has {available}.")
    steps = [step] if step is not None else available
    if not steps:
        raise CheckpointNotFound(f"no checkpoint in {directory}.")
    damaged = []
    for s in steps:
        try:
            meta = _read_meta(manager, s)
        except (ValueError, OSError, KeyError) as e:
            damaged.append((s, e))
            continue
        template = prepare(meta, f"checkpoint {s} in {directory}")
        try:
            arrays = _read_arrays(manager, s, template, meta)
        except (ValueError, OSError, KeyError) as e:
            damaged.append((s, e))
            continue
        move = move_damaged and step is None
        _report_damaged(damaged, directory, s, move=move)
        if damaged and move:
            manager.reload()
        return s, meta, arrays
    raise CheckpointDamaged(
        f"no readable checkpoint in {directory}: "
        + "; ".join(f"step {s}: {_one_line(e)}" for s, e in damaged)
        + ". Move the damaged ones away (or use another --workdir) to start afresh."
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _report_damaged(damaged: list, directory: str, used: int, *, move: bool) -> None:
    if not damaged:
        return
    aside = os.path.join(os.path.dirname(directory), "checkpoints_damaged")
    for s, e in damaged:
        action = f"moved to {aside}" if move else "skipped"
        warnings.warn(
            f"checkpoint {s} in {directory} is damaged ({_one_line(e)}); {action}; "
            f"using checkpoint {used}.", RuntimeWarning, stacklevel=3,
        )
    if not move:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("resnet_jax.checkpoint: damaged found")
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for s, _ in damaged:
            target = os.path.join(aside, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(directory, str(s)), target)
    multihost_utils.sync_global_devices("resnet_jax.checkpoint: damaged moved")


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop ``metrics.jsonl`` records after ``step`` (and a torn last line); returns how many."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class TrainingCheckpoints:
    """The loop's checkpointing: restore, per-step save/stop decisions, loss checks, close.

    ``num_classes`` and ``image_shape`` are recorded so :func:`load` needs no dataset.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, num_classes: int,
                 image_shape: Sequence[int]) -> None:
        if config.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1.")
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.config = config
        self._config_json = _config_json(config)
        self._model = {"name": config.model, "kwargs": config_lib.model_overrides(config),
                       "num_classes": int(num_classes), "image_shape": list(image_shape)}
        self._manager = _manager(self.directory, int(config.keep_checkpoints))
        self._signals = _StopSignals()
        self._rng: jax.Array | None = None
        self.stop_signum: int | None = None
        self.last_save_seconds: float | None = None  # blocking part of the newest save

    @property
    def latest_step(self) -> int | None:
        """The newest checkpoint's step (None without one)."""
        return self._manager.latest_step()

    def restore(self, state: TrainState, rng: jax.Array) -> tuple[TrainState, int, jax.Array]:
        """``(state, start_step, rng)`` from the newest readable checkpoint, or the inputs and 0.

        ``state`` gives the structure (its leaves may be abstract, e.g. from ``jax.eval_shape``);
        the restored leaves are host numpy arrays.

        Raises :class:`CheckpointMismatch` for a checkpoint of another model/config.
        """
        self._rng = rng
        if not self._manager.all_steps():
            return state, 0, rng
        template = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype),
                                {f: getattr(state, f) for f in STATE_FIELDS})
        expected = describe_arrays(template, checksum=False)

        def prepare(meta: dict[str, Any], where: str) -> dict[str, Any]:
            _check_model(meta["config"], self._config_json, where)
            _check_arrays(meta["arrays"], expected, where)
            _check_config(meta["config"], self._config_json, where)
            return template

        step, meta, arrays = _restore_newest(self._manager, self.directory, prepare)
        self._rng = _rng_from_json(meta["rng"])
        if jax.process_index() == 0:
            dropped = truncate_metrics(self.workdir, step)
            if dropped:
                _log(f"metrics.jsonl: dropped {dropped} record(s) logged after step {step}.")
        _log(f"resuming from checkpoint {step} in {self.directory}")
        restored = state.replace(**{f: arrays[f] for f in STATE_FIELDS})
        return restored, int(meta["data_position"]), self._rng

    def watch_signals(self) -> None:
        """Catch SIGTERM/SIGINT until :meth:`close` (call right before the training loop)."""
        self._signals.install()

    def check_losses(self, losses: Sequence[Any], first_step: int) -> None:
        """Raise :class:`TrainingDiverged` if any of the losses of steps ``first_step...`` is
        not finite."""
        for i, loss in enumerate(losses):
            if not math.isfinite(float(loss)):
                self._diverged(f"training loss is {float(loss)} at step {first_step + i}",
                               first_step + i)

    def _diverged(self, what: str, step: int) -> None:
        latest = self.latest_step
        keep = (f"the newest checkpoint, {latest}, is the last good one" if latest is not None
                else "no checkpoint was saved")
        raise TrainingDiverged(
            f"{what}; stopping without saving ({keep}). Lower the learning rate or add warm-up.",
            step,
        )

    def _stop_agreed(self, done: int, total_steps: int) -> bool:
        local = self._signals.signum
        if jax.process_count() == 1:
            self.stop_signum = local
            return local is not None
        sync_point = (done % self.config.log_every_steps == 0
                      or done % self.config.checkpoint_every_steps == 0 or done == total_steps)
        if not sync_point:
            return False
        from jax.experimental import multihost_utils

        signums = multihost_utils.process_allgather(np.int32(local or 0))
        agreed = int(np.max(signums))
        self.stop_signum = agreed or None
        return agreed != 0

    def step_done(self, done: int, state: TrainState, *, fetch: Callable[[Any], Any],
                  pending: Sequence[Mapping[str, Any]], total_steps: int) -> bool:
        """After update ``done``: save if due (checkpoint step, last step, stop request).

        ``pending``: the step metrics not yet fetched (steps ``done - len(pending)`` ...), whose
        losses are checked before saving. True when a stop was requested (state saved): raise
        :meth:`preempted` once this step's metrics are written.
        """
        stop = self._stop_agreed(done, total_steps)
        due = done % self.config.checkpoint_every_steps == 0 or done == total_steps
        if due or stop:
            if pending:
                self.check_losses(fetch([m["loss"] for m in pending]), done - len(pending))
            self.save(done, state, fetch=fetch)
        return stop

    def preempted(self, step: int) -> Preempted:
        """The exception to raise after a stop request was saved at ``step``."""
        assert self.stop_signum is not None
        return Preempted(self.stop_signum, step, self.directory)

    def save(self, step: int, state: TrainState, *,
             fetch: Callable[[Any], Any] = jax.device_get) -> None:
        """Save ``state`` (after ``step`` updates) unless that step is saved already.

        Raises :class:`TrainingDiverged` (saving nothing) if any array is not finite.
        """
        if step == self.latest_step:
            return
        if self._rng is None:
            raise RuntimeError("call restore() before save(): it fixes the run's base rng.")
        t0 = time.perf_counter()
        tree = host_state(state, fetch)
        bad = _nonfinite_path(tree)
        if bad is not None:
            self._diverged(f"{bad} is not finite after step {step}", step)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "data_position": step,  # index of the next training batch (data.create start_step)
            "rng": _rng_to_json(self._rng),
            "model": self._model,
            "config": self._config_json,
            "arrays": describe_arrays(tree),
            "versions": {"jax": jax.__version__, "orbax": ocp.__version__},
        }
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        self.last_save_seconds = time.perf_counter() - t0

    def close(self) -> None:
        """Wait for pending saves, release orbax, restore the signal handlers."""
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        finally:
            self._signals.uninstall()


def _variables_template(model: Any, image_shape: Sequence[int]) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return {k: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes.get(k, {}))
            for k in ("params", "batch_stats")}


def _restore_variables(
    workdir: str, step: int | None, model_for: Callable[[dict[str, Any], str], Any]
) -> tuple[Any, dict[str, Any], int]:
    """(model, {params, batch_stats} as numpy, step); ``model_for(meta, where)`` builds the
    model (or raises :class:`CheckpointMismatch`)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFound(f"no checkpoints in {workdir} (expected {directory}).")
    models: dict[str, Any] = {}

    def prepare(meta: dict[str, Any], where: str) -> dict[str, Any]:
        model = models["model"] = model_for(meta, where)
        template = _variables_template(model, meta["model"]["image_shape"])
        saved = {k: v for k, v in meta["arrays"].items() if k.split("/")[0] in template}
        _check_arrays(saved, describe_arrays(template, checksum=False), where)
        return template

    manager = _manager(directory, None, reader=True)
    try:
        s, _, arrays = _restore_newest(manager, directory, prepare, step=step,
                                       move_damaged=False)
    finally:
        manager.close()
    return models["model"], arrays, s


def _model_from_meta(meta: Mapping[str, Any], where: str) -> Any:
    from resnet_jax.train.loop import build_model

    del where
    return build_model(ml_collections.ConfigDict(meta["config"]), int(meta["model"]["num_classes"]))


def load(workdir: str, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` of the newest readable checkpoint (or ``step``).

    The model is rebuilt from the config saved in the checkpoint; ``model.apply(variables, x,
    train=False)`` gives logits. A damaged newest checkpoint is skipped with a warning.
    """
    model, arrays, _ = _restore_variables(workdir, step, _model_from_meta)
    variables = jax.tree.map(jax.numpy.asarray, arrays)
    return model, variables


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, float]:
    """Evaluate a checkpoint of ``workdir`` with ``config``'s test protocol and eval data.

    The checkpoint must hold ``config``'s model (else :class:`CheckpointMismatch`). Prints the
    errors and appends ``{"step", "dataset", "eval_protocol", "test_*"}`` to
    ``workdir/eval.jsonl`` (process 0). Returns the test scalars and ``"step"``.
    """
    import optax

    from resnet_jax import data, parallel
    from resnet_jax.train import loop

    config_lib.validate(config)
    parallel.initialize_distributed(config)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    info = data.info(config)
    model = loop.build_model(config, info.num_classes)
    wanted = _config_json(config)

    def model_for(meta: dict[str, Any], where: str) -> Any:
        _check_model(meta["config"], wanted, where)
        if int(meta["model"]["num_classes"]) != info.num_classes:
            raise CheckpointMismatch(
                f"{where} has {meta['model']['num_classes']} classes but {config.dataset!r} has "
                f"{info.num_classes}; evaluate it on the dataset it was trained on."
            )
        return model

    _, arrays, s = _restore_variables(workdir, step, model_for)
    state = TrainState(step=np.int32(s), params=arrays["params"],
                       batch_stats=arrays["batch_stats"], opt_state=(), apply_fn=model.apply,
                       tx=optax.identity())
    eval_fn = loop.compile_eval(config)
    results = loop.evaluate(eval_fn, eval_fn.replicate(state), config)
    protocol = config.data.eval_protocol
    _log(f"checkpoint {s} of {config.model} on {config.dataset} ({protocol}): test error "
         f"{100 * results['test_error']:.2f}% (top-5 {100 * results['test_top5_error']:.2f}%), "
         f"loss {results['test_loss']:.4f}")
    if jax.process_index() == 0:
        record = {"step": s, "dataset": config.dataset, "eval_protocol": protocol, **results}
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return {"step": s, **results}
