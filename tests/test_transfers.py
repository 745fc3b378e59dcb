"""No implicit transfers: the digits run under ``JAX_TRANSFER_GUARD=disallow`` on 2 CPU devices
trains, evaluates, saves, resumes after kill -9 bit-identically and evaluates again with
``--mode eval``, under jit and under pmap (with the images on the devices), and computes what
one device does (synced BN); the loop syncs with the device once per logging window and
nowhere else.

The guarded runs are subprocesses (this file doubles as the worker script): the device count
and the guard are fixed before JAX starts. Tiny net (CIFAR ResNet-8, width 4) on digits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import override

STEPS = 8
# pmap also keeps the training images on the devices (data.on_device: each step's batch is
# gathered there from placed indices)
OVERRIDES = {"jit": {"parallel": "jit", "cpu_devices": 2},
             "pmap": {"parallel": "pmap", "cpu_devices": 2, "data.on_device": True}}


def tiny_config(**overrides: Any) -> Any:
    from resnet_jax.train.config import default_config

    c = default_config()
    c.model = "cifar_resnet"
    c.model_kwargs.depth = 8
    c.model_kwargs.width = 4
    c.dataset = "digits"
    c.data.workers = 0
    c.batch_size = 8
    c.eval_batch_size = 40  # 360 test images: 9 batches
    c.num_train_steps = STEPS
    c.lr_boundaries = (5,)  # the LR changes mid-run, so a wrong resume step shows
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    return override(c, **overrides)


def _hook_train_stream(on_batch: Any, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """``on_batch(k)`` runs when the loop asks the train stream for batch ``k``."""
    from resnet_jax import data

    original = data.create

    def create(config: Any, split: str, **kwargs: Any) -> Any:
        stream = original(config, split, **kwargs)
        return stream if split != "train" else _Hooked(stream, kwargs.get("start_step", 0),
                                                       on_batch)

    if monkeypatch is None:
        data.create = create
    else:
        monkeypatch.setattr(data, "create", create)


class _Hooked:
    def __init__(self, stream: Any, start: int, on_batch: Any) -> None:
        self.stream, self.i, self.on_batch = stream, start, on_batch

    def __iter__(self) -> _Hooked:
        return self

    def __next__(self) -> Any:
        self.on_batch(self.i)
        self.i += 1
        return next(self.stream)

    def close(self) -> None:
        self.stream.close()


def _final_arrays(workdir: Path) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """The newest checkpoint's record of every array (shape, dtype, checksum: params,
    batch_stats, opt_state, step) and its variables as numpy."""
    import jax

    import resnet_jax
    from resnet_jax import checkpoint

    store = checkpoint.CheckpointStore(checkpoint.checkpoint_dir(str(workdir)), read_only=True)
    try:
        record = store.read_meta(store.latest_step)["arrays"]
    finally:
        store.close()
    _, variables = resnet_jax.load(str(workdir))
    return record, {checkpoint.path_name(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _worker(root: Path, mode: str) -> None:
    import jax

    assert jax.config.jax_transfer_guard == "disallow", "the worker needs the guard on"
    from resnet_jax.train.evaluate import evaluate_checkpoint
    from resnet_jax.train.loop import train_and_evaluate

    config = tiny_config(**OVERRIDES[mode])
    reference = train_and_evaluate(config, str(root / "reference"))
    assert jax.device_count() == 2

    killed = root / "killed"
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", "--root", str(root), "--mode", mode],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    ckpts = killed / "checkpoints"
    while not ((killed / "blocked").exists() and ckpts.exists()
               and any(p.name.isdigit() for p in ckpts.iterdir())):
        if child.poll() is not None:
            raise AssertionError(f"child exited ({child.returncode}): {child.stdout.read()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("timed out waiting for the child's checkpoint")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

    resumed = train_and_evaluate(config, str(killed))
    evaluated = evaluate_checkpoint(config, str(root / "reference"))
    with jax.transfer_guard("allow"):  # the test's own reads
        (ref_record, ref_vars), (res_record, res_vars) = (_final_arrays(root / "reference"),
                                                          _final_arrays(killed))
    assert ref_record == res_record and any(k.startswith("opt_state") for k in ref_record), (
        f"resumed from {saved}: the saved arrays' checksums differ")
    assert ref_vars.keys() == res_vars.keys() and ref_vars
    differ = [k for k in ref_vars if not np.array_equal(ref_vars[k], res_vars[k])]
    assert not differ, f"resumed from {saved}: {differ[:5]} differ"
    timing = {"images_per_second"}
    assert ({k: v for k, v in resumed.items() if k not in timing}
            == {k: v for k, v in reference.items() if k not in timing}), (resumed, reference)
    assert evaluated["test_error"] == reference["test_error"], (evaluated, reference)
    print(json.dumps({"resumed_from": saved, "reference": reference}))


def _child(root: Path, mode: str) -> None:
    from resnet_jax.train.loop import train_and_evaluate

    workdir = root / "killed"

    def block(k: int) -> None:
        if k == STEPS - 2:  # wait here to be killed (checkpoints are due every 2 steps)
            (workdir / "blocked").write_text("")
            while True:
                time.sleep(0.05)

    _hook_train_stream(block)
    train_and_evaluate(tiny_config(**OVERRIDES[mode]), str(workdir))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_guarded_run_trains_evaluates_saves_and_resumes_after_kill9(
    mode: str, tmp_path: Path
) -> None:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_TRANSFER_GUARD": "disallow",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, __file__, "--root", str(tmp_path), "--mode", mode],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 2 <= result["resumed_from"] < STEPS
    if mode == "jit":  # cpu_devices=2 splits the host and keeps the math: one device here
        import jax

        from resnet_jax.train.loop import train_and_evaluate

        with jax.transfer_guard("disallow"):
            one = train_and_evaluate(tiny_config(), str(tmp_path / "one_device"))
        for key in ("train_loss", "train_error", "test_loss", "test_error"):
            assert one[key] == pytest.approx(result["reference"][key], rel=1e-4), key


def test_the_loop_syncs_once_per_logging_window(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """Between log steps the host never waits on the device: one ``jax.device_get`` (the
    metrics of the window) at each log step, no implicit conversion of a device array."""
    import jax
    from jax._src import array as array_impl

    from resnet_jax.train.loop import train_and_evaluate

    syncs: list[str] = []
    inside_get = [False]
    real_get = jax.device_get

    def device_get(x: Any) -> Any:
        syncs.append("device_get")
        inside_get[0] = True
        try:
            return real_get(x)
        finally:
            inside_get[0] = False

    monkeypatch.setattr(jax, "device_get", device_get)
    for name in ("__array__", "__float__", "__int__", "__bool__", "__index__", "item", "tolist"):
        real = getattr(array_impl.ArrayImpl, name)

        def counted(self: Any, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            if not inside_get[0]:  # an implicit sync (device_get converts its leaves itself)
                syncs.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(array_impl.ArrayImpl, name, counted)
    before: dict[int, int] = {}
    _hook_train_stream(lambda k: before.setdefault(k, len(syncs)), monkeypatch)
    steps, log_every = 10, 4
    train_and_evaluate(tiny_config(num_train_steps=steps, log_every_steps=log_every,
                                   eval_every_steps=100, checkpoint_every_steps=100,
                                   device_prefetch=0), str(tmp_path))
    # syncs made while step k ran (between asking for batch k and batch k + 1); the last step
    # also evaluates and saves
    per_step = {k: before[k + 1] - before[k] for k in range(steps - 1)}
    want = {k: int((k + 1) % log_every == 0) for k in range(steps - 1)}
    assert per_step == want, (per_step, syncs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--mode", choices=["jit", "pmap"], required=True)
    parser.add_argument("--child", action="store_true")
    a = parser.parse_args()
    (_child if a.child else _worker)(a.root, a.mode)
