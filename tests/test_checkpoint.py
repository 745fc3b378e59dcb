"""Checkpoints: kill -9 + restart is bit-identical, SIGTERM saves and exits 143, a damaged newest
checkpoint falls back to the previous one, a NaN stops without saving, a checkpoint of another
model/config is a one-line error, two processes save and restore, ``load`` and ``--mode eval``.

Signals and kills hit subprocesses (this file doubles as the worker script); restarts and the
rest run in-process. Tiny nets (CIFAR ResNet-8, width 4) on 8x8 synthetic images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import override

STEPS = 8
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One persistent compilation cache for every run here (in-process and subprocesses): the
    runs compile the same programs, and compiling dominates these tests on 2 cores."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    for name, value in zip(names, (path, 0.0, 0), strict=True):
        jax.config.update(name, value)
    yield {"JAX_COMPILATION_CACHE_DIR": path, **CACHE_ENV}
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


def tiny_config(**overrides: Any) -> Any:
    from resnet_jax.train.config import default_config

    c = default_config()
    c.model = "cifar_resnet"
    c.model_kwargs.depth = 8
    c.model_kwargs.width = 4
    c.dataset = "synthetic"
    c.data.image_size = 8
    c.data.num_train = 64
    c.data.num_eval = 32
    c.data.workers = 1
    c.data.prefetch = 1
    c.batch_size = 8
    c.eval_batch_size = 32
    c.num_train_steps = STEPS
    c.lr_boundaries = (5,)  # the LR changes mid-run, so a wrong resume step shows
    c.log_every_steps = 2
    c.eval_every_steps = 100  # only the final eval
    c.checkpoint_every_steps = 2
    return override(c, **overrides)


class _HookedStream:
    """The train stream; ``action()`` runs when the loop asks for batch ``at``."""

    def __init__(self, stream: Any, start: int, at: int, action: Any) -> None:
        self.stream, self.i, self.at, self.action = stream, start, at, action

    def __iter__(self) -> _HookedStream:
        return self

    def __next__(self) -> Any:
        if self.i == self.at:
            self.action()
        self.i += 1
        return next(self.stream)

    def close(self) -> None:
        self.stream.close()


def _worker(workdir: Path, action: str, at: int, overrides: dict) -> None:
    from resnet_jax import data
    from resnet_jax.train.loop import train_and_evaluate

    def act() -> None:
        if action == "block":  # wait here to be killed
            (workdir / "blocked").write_text(str(at))
            while True:
                time.sleep(0.05)
        elif action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)

    original = data.create

    def create(config: Any, split: str, **kwargs: Any) -> Any:
        stream = original(config, split, **kwargs)
        if split != "train":
            return stream
        return _HookedStream(stream, kwargs.get("start_step", 0), at, act)

    data.create = create
    from resnet_jax import errors

    try:
        train_and_evaluate(tiny_config(**overrides), str(workdir))
    except errors.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)


def _spawn(workdir: Path, action: str, at: int, cache_env: dict,
           overrides: dict | None = None) -> subprocess.Popen:
    """This file as a training worker on ``tiny_config(**overrides)``; ``action`` at batch
    ``at``: "block" (wait to be killed) or "sigterm"."""
    root = str(Path(__file__).resolve().parents[1])  # examples/ imports as "examples.*"
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, **cache_env}
    return subprocess.Popen(
        [sys.executable, __file__, "--workdir", str(workdir), "--action", action, "--at", str(at),
         "--overrides", json.dumps(overrides or {})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _variables(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    import jax

    import resnet_jax

    _, variables = resnet_jax.load(str(workdir), step=step)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for(condition: Any, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}: "
                                 f"{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(compilation_cache: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps (in-process; fills the compilation cache)."""
    from resnet_jax.train.loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("reference")
    train_and_evaluate(tiny_config(), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def workers(reference: Path, compilation_cache: dict,
            tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subprocess runs, started together once the cache is warm. ``*_at``: the step during
    which the worker is killed or signalled (the loop asks for batch ``step + device_prefetch``
    then: it places batches that many steps ahead)."""
    ahead = int(tiny_config().device_prefetch)
    kill_at = random.Random().randint(3, STEPS - 1 - ahead)  # the last batch is STEPS - 1
    kill_dir = tmp_path_factory.mktemp("kill9")
    term_dir = tmp_path_factory.mktemp("sigterm")
    return {
        "kill_at": kill_at, "kill_dir": kill_dir,
        "kill": _spawn(kill_dir, "block", kill_at + ahead, compilation_cache),
        "term_at": 4, "term_dir": term_dir,
        "term": _spawn(term_dir, "sigterm", 4 + ahead, compilation_cache),
    }


def test_kill9_at_a_random_step_then_restart_is_bit_identical(
    workers: dict, reference: Path, capsys: pytest.CaptureFixture
) -> None:
    from resnet_jax.train.loop import train_and_evaluate

    proc, workdir, at = workers["kill"], workers["kill_dir"], workers["kill_at"]
    _wait_for(lambda: (workdir / "blocked").exists() and _steps(workdir), proc,
              f"step {at} and a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = max(_steps(workdir))
    assert 2 <= resumed_from <= at, (resumed_from, at)

    train_and_evaluate(tiny_config(), str(workdir))
    out = capsys.readouterr().out
    assert f"resuming from checkpoint {resumed_from}" in out, out
    _assert_identical(_variables(workdir), _variables(reference),
                      f"killed in step {at}, resumed from {resumed_from}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps
    assert [r["step"] for r in records if "train_loss" in r] == list(range(2, STEPS + 1, 2))
    # TensorBoard: the resumed writer marks a purge at the first new step, so a reader drops the
    # killed run's events from there on and sees each step once, as in metrics.jsonl.
    events = _tensorboard_events(workdir)
    assert ("purge", resumed_from + 1) in events
    seen: list[tuple[int, float]] = []
    for kind, step, *value in events:
        if kind == "purge":
            seen = [(k, v) for k, v in seen if k < step]
        elif kind == "train_loss":
            seen.append((step, value[0]))
    want = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert [k for k, _ in seen] == [k for k, _ in want], (seen, want)
    assert [v for _, v in seen] == pytest.approx([v for _, v in want])


def _tensorboard_events(workdir: Path) -> list[tuple]:
    """("purge", step) and (tag, step, value) of every event file in ``workdir``, in the order
    written (files by their first event's time; a file is TFRecord-framed Event protos)."""
    from tensorboardX.proto import event_pb2

    files = []
    for path in workdir.glob("events.out.tfevents.*"):
        raw, i, events = path.read_bytes(), 0, []
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            events.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + n]))
            i += 12 + n + 4
        files.append(events)
    out: list[tuple] = []
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for e in events:
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                out.append(("purge", e.step))
            for v in e.summary.value if e.HasField("summary") else ():
                out.append((v.tag, e.step, v.simple_value))
    return out


def test_sigterm_saves_the_current_step_and_exits_143(workers: dict, reference: Path) -> None:
    from resnet_jax import errors
    from resnet_jax.train.loop import train_and_evaluate

    proc, workdir, at = workers["term"], workers["term_dir"], workers["term_at"]
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == errors.EXIT_SIGTERM == 143, output[-3000:]
    assert "stopped by SIGTERM after step 5" in output, output[-3000:]
    assert max(_steps(workdir)) == at + 1  # the step running when the signal came, finished

    train_and_evaluate(tiny_config(), str(workdir))
    _assert_identical(_variables(workdir), _variables(reference), "resumed after SIGTERM")


def test_first_signal_requests_a_stop_and_a_second_one_is_fatal() -> None:
    from resnet_jax.train.policy import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM
        # the next SIGTERM or SIGINT gets the OS default: immediate termination
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def _train_state(config: Any) -> tuple[Any, Any]:
    import jax

    from resnet_jax import data
    from resnet_jax.train import create_train_state
    from resnet_jax.train.loop import build_model

    info = data.info(config)
    model = build_model(config, info.num_classes)
    state = jax.eval_shape(lambda: create_train_state(  # abstract: restore needs the structure
        config, model, jax.random.PRNGKey(0), image_shape=info.image_shape))
    return state, info


@contextlib.contextmanager
def _checkpoints(workdir: Path, config: Any) -> Iterator[tuple[Any, Any]]:
    """``(TrainingCheckpoints, abstract state)`` for ``workdir``, closed on exit."""
    from resnet_jax.train.policy import TrainingCheckpoints

    state, info = _train_state(config)
    ckpt = TrainingCheckpoints(str(workdir), config, num_classes=info.num_classes,
                                          image_shape=info.image_shape)
    try:
        yield ckpt, state
    finally:
        ckpt.close()


def test_truncated_newest_checkpoint_falls_back_with_a_warning(
    reference: Path, tmp_path: Path
) -> None:
    import jax

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    newest, previous = _steps(workdir)[-1], _steps(workdir)[-2]
    files = [p for p in (workdir / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)

    config = tiny_config()
    with _checkpoints(workdir, config) as (ckpt, state):
        with pytest.warns(RuntimeWarning, match=f"checkpoint {newest} .* damaged.*moved"):
            restored, start, _ = ckpt.restore(state, jax.random.PRNGKey(1))
        assert start == previous == int(restored.step)
        assert ckpt.latest_step == previous  # the damaged one is out of the way of a re-save
    _assert_identical(_variables(workdir), _variables(reference, step=previous), "fallback")
    assert len(list((workdir / "checkpoints_damaged").iterdir())) == 1


def _poisoned_schedule(monkeypatch: pytest.MonkeyPatch, from_step: int) -> None:
    import jax.numpy as jnp

    from resnet_jax.train import optim

    def schedule(config: Any, steps_per_epoch: Any = None) -> Any:
        return lambda step: jnp.where(jnp.asarray(step) < from_step, 0.1, jnp.nan)

    monkeypatch.setattr(optim, "create_learning_rate_schedule", schedule)


@pytest.mark.parametrize(
    ("log_every", "ckpt_every", "message", "good"),
    [  # updates 5.. use a NaN learning rate: params are NaN after step 6, the loss from step 6
        (2, 4, "training loss is nan at step 6", 4),  # caught at the log step 8
        (4, 3, "params/.* is not finite after step 6", 3),  # caught at checkpoint step 6
    ],
)
def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_every: int, ckpt_every: int,
    message: str, good: int,
) -> None:
    from resnet_jax import errors
    from resnet_jax.train.loop import train_and_evaluate

    _poisoned_schedule(monkeypatch, from_step=5)
    config = tiny_config(num_train_steps=12, log_every_steps=log_every,
                         checkpoint_every_steps=ckpt_every)
    with pytest.raises(errors.TrainingDiverged, match=message) as info:
        train_and_evaluate(config, str(tmp_path))
    assert info.value.step == 6
    assert f"the newest checkpoint, {good}, is the last good one" in str(info.value)
    assert max(_steps(tmp_path)) == good
    assert all(np.isfinite(v).all() for v in _variables(tmp_path).values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_kwargs.width": 8}, r"written for model 'cifar_resnet' \{.*'width': 4\}, but "
                                    r"this config builds 'cifar_resnet' \{.*'width': 8\}"),
        ({"data.num_classes": 5}, r"does not fit this model: params/fc/bias is \(10,\) float32 "
                                  r"in the checkpoint but \(5,\) float32 here"),
        ({"learning_rate": 0.05}, r"written with another config: learning_rate 0.1 -> 0.05"),
    ],
)
def test_checkpoint_of_another_model_or_config_is_a_one_line_error(
    reference: Path, overrides: dict, message: str
) -> None:
    import jax

    from resnet_jax import checkpoint

    config = tiny_config(**overrides)
    with (
        _checkpoints(reference, config) as (ckpt, state),
        pytest.raises(checkpoint.CheckpointMismatch, match=message) as err,
    ):
        ckpt.restore(state, jax.random.PRNGKey(1))
    assert "\n" not in str(err.value)


def test_resume_safe_fields_may_change(reference: Path, tmp_path: Path) -> None:
    import jax

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    config = tiny_config(num_train_steps=20, log_every_steps=5, keep_checkpoints=5)
    with _checkpoints(workdir, config) as (ckpt, state):
        _, start, rng = ckpt.restore(state, jax.random.PRNGKey(1))
    assert start == STEPS
    # the saved base rng, not the one passed in: the loop's split of PRNGKey(seed)
    assert np.array_equal(rng, jax.random.split(jax.random.PRNGKey(0))[1])


def test_load_and_eval_mode_reproduce_the_final_test_error(reference: Path) -> None:
    import jax.numpy as jnp

    import resnet_jax
    from resnet_jax import checkpoint
    from resnet_jax.train.evaluate import evaluate_checkpoint

    model, variables = resnet_jax.load(str(reference))
    logits = model.apply(variables, jnp.zeros((2, 8, 8, 3)), train=False)
    assert logits.shape == (2, 10)

    results = evaluate_checkpoint(tiny_config(), str(reference))
    final = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert results["step"] == STEPS
    assert results["test_error"] == final[-1]["test_error"]
    assert results["test_loss"] == pytest.approx(final[-1]["test_loss"], rel=1e-6)
    record = json.loads((reference / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == STEPS and record["eval_protocol"] == "center"

    with pytest.raises(checkpoint.CheckpointNotFound, match="no checkpoint 3 in"):
        resnet_jax.load(str(reference), step=3)


def test_store_keeps_every_field_of_a_state_subclass_and_reads_a_part(tmp_path: Path) -> None:
    import flax

    from resnet_jax import checkpoint, errors
    from resnet_jax.train.state import TrainState

    class ScaledState(TrainState):  # a fork's extra field
        loss_scale: Any

    def state(scale: float, w: float) -> ScaledState:
        return ScaledState(step=np.int32(3), params={"w": np.full(2, w, np.float32)},
                           batch_stats={}, opt_state=(np.zeros(2, np.float32),), apply_fn=None,
                           tx=None, loss_scale=np.float32(scale))

    store = checkpoint.CheckpointStore(str(tmp_path / "ckpt"), keep=2)
    store.save(3, state(2.0, 1.5), {"note": "mine"})
    store.close()
    store = checkpoint.CheckpointStore(str(tmp_path / "ckpt"), read_only=True)
    step, tree, meta = store.restore(state(0.0, 0.0))
    restored = checkpoint.with_tree(state(0.0, 0.0), tree)
    assert step == 3 and meta["note"] == "mine" and float(restored.loss_scale) == 2.0
    assert np.array_equal(restored.params["w"], [1.5, 1.5]) and len(restored.opt_state) == 1
    _, part, _ = store.restore({"params": {"w": np.zeros(2, np.float32)}})
    assert set(part) == {"params"}

    @flax.struct.dataclass
    class Wider:
        params: Any
        ema_params: Any

    with pytest.raises(errors.CheckpointMismatch, match="ema_params/w is missing"):
        store.restore(Wider({"w": np.zeros(2, np.float32)}, {"w": np.zeros(2, np.float32)}))
    store.close()


def _multiprocess_worker(workdir: Path, process_id: int, port: int) -> None:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    from resnet_jax.train.loop import train_and_evaluate

    config = tiny_config(num_train_steps=4)
    train_and_evaluate(config, str(workdir))
    # the loop's resume path (a second training run would only add compile time)
    with _checkpoints(workdir, config) as (ckpt, state):
        restored, start, _ = ckpt.restore(state, jax.random.PRNGKey(1))
    assert start == 4, start
    flat = _variables(workdir)
    for key, value in jax.tree_util.tree_flatten_with_path(
        {"params": restored.params, "batch_stats": restored.batch_stats}
    )[0]:
        assert np.array_equal(flat[jax.tree_util.keystr(key)], value), key
    np.savez(workdir / f"process{process_id}.npz", **flat)


def test_two_processes_save_and_restore_without_hanging(
    tmp_path: Path, compilation_cache: dict
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--workdir", str(tmp_path), "--process-id", str(i),
             "--port", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "resuming from checkpoint 4" in outputs[0]
    assert _steps(tmp_path) == [2, 4]
    p0, p1 = (dict(np.load(tmp_path / f"process{i}.npz")) for i in range(2))
    _assert_identical(p0, p1, "process 0 vs 1")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--action", choices=("block", "sigterm"))
    parser.add_argument("--at", type=int, default=0)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--overrides", default="{}")
    a = parser.parse_args()
    if a.process_id is not None:
        _multiprocess_worker(a.workdir, a.process_id, a.port)
    else:
        _worker(a.workdir, a.action, a.at, json.loads(a.overrides))
