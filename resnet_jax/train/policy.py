"""The run's checkpoint policy: when to save, what to check, when to stop.

* Saves every ``config.checkpoint_every_steps``, at the last step and on a stop request, keeping
  the newest ``config.keep_checkpoints`` (``resnet_jax.checkpoint`` writes them in the
  background). The whole state is saved (every field of a ``TrainState`` subclass), with the
  run's config, base RNG, model name and number of classes in the metadata.
* Resume: a workdir with checkpoints continues from the newest readable one. The loop's per-step
  rng is ``fold_in(base_rng, step)`` and the data stream restarts at the saved step, so on CPU a
  run killed at any step and restarted ends bit-identical to an uninterrupted run.
  ``metrics.jsonl`` drops records logged after the restored step, then appends. A checkpoint of
  another model or config (``config.check_same_model`` / ``check_resume``) is refused in one line,
  and so is a resume that changes the math through resume-safe fields: the cosine horizon (the
  run's length), boundaries/warm-up in steps, the BN group size (device count with
  ``bn_sync=False``) (``config.check_run_facts`` on the ``run`` record of the metadata).
* Preemption: the first SIGTERM or SIGINT finishes the current step, saves it and raises
  :class:`~resnet_jax.errors.Preempted` (exit ``128 + signum``). The first signal resets both
  handlers to the OS default, so a second one terminates the process at once. Single process:
  the stop takes effect after the current step. Multi-process: every process must save the same
  step, so the processes agree at the next log or checkpoint step (where the host waits on the
  device anyway); keep ``log_every_steps`` within the scheduler's grace period.
* NaN guard: the loss is checked where the loop fetches metrics anyway (log steps), and the
  pending losses plus every array of the state (on the devices) are checked before each save,
  so a non-finite state is never saved and the newest checkpoint stays the last good one
  (:class:`~resnet_jax.errors.TrainingDiverged` names the first non-finite step).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import checkpoint
from resnet_jax.errors import ConfigError, Preempted, TrainingDiverged
from resnet_jax.train import config as config_lib
from resnet_jax.train.evaluate import Preprocessing


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _all_finite(x: jax.Array) -> jax.Array:
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
        return jax.numpy.bool_(True)
    return jax.numpy.isfinite(x).all()


def _all_finite_host(x: np.ndarray) -> bool:
    return not np.issubdtype(x.dtype, np.inexact) or bool(np.isfinite(x).all())


def nonfinite_path(tree: Any) -> str | None:
    """The path of the first floating-point leaf of ``tree`` with a NaN or inf (else None).

    ``jax.Array`` leaves (any sharding) are checked on their devices in one jitted call, with
    one small explicit fetch of the per-leaf flags; numpy leaves on the host."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    finite = checkpoint.per_leaf([leaf for _, leaf in flat], _all_finite, _all_finite_host)
    for (path, _), ok in zip(flat, finite, strict=True):
        if not ok:
            return checkpoint.path_name(path)
    return None


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


class StopSignals:
    """SIGTERM/SIGINT set ``signum``; the first one resets both to the OS default (so a second
    one kills the process at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the signals (main thread only; elsewhere a warning)."""
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
        """Restore the handlers found by :meth:`install`."""
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python (e.g. JAX's preemption notifier).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


class TrainingCheckpoints:
    """The loop's checkpointing: restore, save/stop decisions, loss checks, close.

    ``num_classes`` and ``image_shape`` are recorded so ``resnet_jax.load`` needs no dataset;
    ``config.run_facts`` (resolved length, schedule horizon, BN group size; ``steps_per_epoch``
    resolves what is given in epochs) so a resume that would change them is refused.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, num_classes: int,
                 image_shape: Sequence[int], steps_per_epoch: float | None = None) -> None:
        if config.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1.")
        self.workdir = workdir
        self.directory = checkpoint.checkpoint_dir(workdir)
        self.config = config
        self._config_json = config_lib.to_json(config)
        self._model = {"name": config.model, "kwargs": config_lib.model_overrides(config),
                       "num_classes": int(num_classes), "image_shape": list(image_shape),
                       # the mean, padding, recipe: load and export need no dataset
                       "preprocess": Preprocessing.from_config(config).to_json()}
        self._run = config_lib.run_facts(config, steps_per_epoch, jax.device_count())
        self._store = checkpoint.CheckpointStore(self.directory,
                                                 keep=int(config.keep_checkpoints))
        self._signals = StopSignals()
        self._rng: jax.Array | None = None
        self.stop_signum: int | None = None

    @property
    def latest_step(self) -> int | None:
        """The newest checkpoint's step (None without one)."""
        return self._store.latest_step

    def restore(self, state: Any, rng: jax.Array) -> tuple[Any, int, jax.Array]:
        """``(state, start_step, rng)`` from the newest readable checkpoint, or the inputs and 0.

        ``state`` gives the structure and the placement: a leaf with a sharding (the state born
        on the mesh, or its ``jax.eval_shape`` with shardings) comes back as a global array in
        that sharding, one without (a plain ``jax.eval_shape``) as host numpy. ``rng`` and the
        returned one: the saved base key (JSON in the metadata) is ``jax.device_put`` on the
        default device. Raises ``CheckpointMismatch`` for a checkpoint of another model/config.
        """
        self._rng = rng
        if not self._store.steps():
            return state, 0, rng

        def prepare(meta: dict[str, Any], where: str) -> Any:
            config_lib.check_same_model(meta["config"], self._config_json, where)
            checkpoint.check_fits(state, meta, where)
            only = config_lib.check_resume(meta["config"], self._config_json, where)
            if only:
                _log(f"warning: {where}: config fields present on one side only (code "
                     f"changed?): {', '.join(only[:6])}")
            old = config_lib.check_run_facts(meta.get("run"), self._run, where, meta["config"])
            if old:
                _log(f"warning: {old}")
            return state

        step, tree, meta = self._store.restore(prepare)
        self._rng = checkpoint.rng_from_json(meta["rng"])
        if jax.process_index() == 0:
            dropped = truncate_metrics(self.workdir, step)
            if dropped:
                _log(f"metrics.jsonl: dropped {dropped} record(s) logged after step {step}.")
        _log(f"resuming from checkpoint {step} in {self.directory}")
        return checkpoint.with_tree(state, tree), int(meta["data_position"]), self._rng

    def watch_signals(self) -> None:
        """Catch SIGTERM/SIGINT until :meth:`close` (call right before the training loop)."""
        self._signals.install()

    def check_losses(self, losses: Sequence[Any], first_step: int) -> None:
        """Raise ``TrainingDiverged`` if any loss of steps ``first_step...`` is not finite."""
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

    def stop_requested(self, done: int, total_steps: int) -> bool:
        """After update ``done``: whether to stop (a signal; agreed by all processes)."""
        local = self._signals.signum
        if jax.process_count() == 1:
            self.stop_signum = local
            return local is not None
        sync_point = (done % self.config.log_every_steps == 0
                      or done % self.config.checkpoint_every_steps == 0 or done == total_steps)
        if not sync_point:
            return False
        # process_allgather puts the value on the devices explicitly but reads the gathered one
        # back with np.asarray: an implicit device-to-host copy the guard refuses on accelerators
        with jax.transfer_guard_device_to_host("allow"):
            signums = multihost_utils.process_allgather(np.int32(local or 0))
        agreed = int(np.max(signums))
        self.stop_signum = agreed or None
        return agreed != 0

    def save_if_due(self, done: int, state: Any, *, fetch: Callable[[Any], Any],
                    pending: Sequence[Mapping[str, Any]], total_steps: int, stop: bool) -> None:
        """Save after update ``done`` at a checkpoint step, the last step or a stop.

        ``pending``: the step metrics not yet fetched (steps ``done - len(pending)`` ...), whose
        losses ``fetch`` brings to the host and checks before saving.
        """
        due = done % self.config.checkpoint_every_steps == 0 or done == total_steps
        if due or stop:
            if pending:
                self.check_losses(fetch([m["loss"] for m in pending]), done - len(pending))
            self.save(done, state)

    def preempted(self, step: int) -> Preempted:
        """The exception to raise after a stop request was saved at ``step``."""
        assert self.stop_signum is not None
        return Preempted(self.stop_signum, step, self.directory)

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` (after ``step`` updates) unless that step is saved already.

        ``state``'s arrays go to the store as they are (global arrays in any sharding; no host
        copy here); the caller may donate them once this returns. Raises ``TrainingDiverged``
        (saving nothing) if any array is not finite (checked on the devices).
        """
        if step == self.latest_step:
            return
        if self._rng is None:
            raise RuntimeError("call restore() before save(): it fixes the run's base rng.")
        tree = checkpoint.state_tree(state)
        bad = nonfinite_path(tree)
        if bad is not None:
            self._diverged(f"{bad} is not finite after step {step}", step)
        self._store.save(step, tree, {
            "data_position": step,  # index of the next training batch (data.create start_step)
            "rng": checkpoint.rng_to_json(self._rng),
            "model": self._model,
            "config": self._config_json,
            "run": self._run,  # config.run_facts: checked on resume
        })

    def close(self) -> None:
        """Wait for pending saves, release orbax, restore the signal handlers."""
        try:
            self._store.close()
        finally:
            self._signals.uninstall()
