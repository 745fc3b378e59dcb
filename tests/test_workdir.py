"""One run per workdir: a second run on a busy workdir exits 5 at once, touching nothing, while
the first finishes; a lock left by a kill -9'd run does not block the next one; ``--mode eval``
honours ``cpu_devices``; jit and pmap share one placement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_jax import errors
from resnet_jax.train import workdir as workdir_lib

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
HOLD = """
import sys
from resnet_jax.train import workdir
held = workdir.lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin (or kills this process)
"""
# digits (configs/digits.py) at width 4 with only the final eval: ~10-20 s on 2 cores
TINY_DIGITS = ["--config.model_kwargs.width=4", "--config.num_train_steps=150",
               "--config.lr_boundaries=(100,)", "--config.eval_every_steps=1000",
               "--config.log_every_steps=50", "--config.checkpoint_every_steps=1000",
               "--config.data.workers=0"]


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=ENV, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _train_py(workdir: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", str(workdir),
         *TINY_DIGITS, *args], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_second_run_on_a_busy_workdir_exits_5_and_touches_nothing(tmp_path):
    from helpers import config_module

    from resnet_jax.train.evaluate import evaluate_checkpoint

    holder = _holder(tmp_path)
    t0 = time.monotonic()
    proc = _train_py(tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.EXIT_BUSY, err
    assert time.monotonic() - t0 < 60  # import + config only: nothing loaded or compiled
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {tmp_path} is in use by pid {holder.pid} on "), err
    assert lines[0].endswith("or use another --workdir.")
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    (tmp_path / "checkpoints").mkdir()  # so --mode eval gets as far as the lock
    with pytest.raises(errors.WorkdirBusy, match=f"in use by pid {holder.pid} on "):
        evaluate_checkpoint(config_module("digits").get_config(), str(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".lock", "checkpoints"]
    assert holder.poll() is None  # the first run is unaffected ...
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0  # ... and finishes


def test_exit_code_of_a_busy_workdir_is_5():
    assert errors.exit_code(errors.WorkdirBusy("x")) == errors.EXIT_BUSY == 5
    assert isinstance(errors.WorkdirBusy("x"), errors.ConfigError)


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(errors.WorkdirBusy, match=rf"in use by pid {holder.pid} on .*started "):
        workdir_lib.lock(str(tmp_path))
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # left behind
    with workdir_lib.lock(str(tmp_path)) as held:
        assert held.held
        assert workdir_lib.holder(str(tmp_path / ".lock"))["pid"] == os.getpid()
    assert not held.held


def test_scoped_releases_the_lock_when_the_call_raises(tmp_path):
    @workdir_lib.scoped
    def run(fail: bool) -> None:
        workdir_lib.lock(str(tmp_path))
        with pytest.raises(errors.WorkdirBusy):  # one lock per run, even in one process
            workdir_lib.lock(str(tmp_path))
        if fail:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(True)
    run(False)  # the failed call's lock is gone
    workdir_lib.lock(str(tmp_path)).release()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The must-show: ``train.py`` on configs/digits.py, a second one started on the same
    workdir while the first trains exits 5 at once, and the first finishes."""
    work = tmp_path_factory.mktemp("digits")
    first = _train_py(work)
    deadline = time.monotonic() + 120
    while workdir_lib.holder(str(work / ".lock"), wait=0).get("pid") != first.pid:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    t0 = time.monotonic()
    second = _train_py(work)
    _, err = second.communicate(timeout=120)
    took = time.monotonic() - t0
    still_running = first.poll() is None
    out, first_err = first.communicate(timeout=300)
    print(f"second run refused in {took:.1f} s; first run: {out.strip().splitlines()[-1]}")
    assert second.returncode == errors.EXIT_BUSY, err
    assert err.strip().splitlines() == [err.strip()] and f"pid {first.pid}" in err
    assert still_running, "the first run ended before the second was refused"
    assert first.returncode == 0, first_err[-3000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]
    return work


@pytest.mark.slow
def test_second_run_exits_5_while_the_first_finishes(digits_run):
    assert (digits_run / "checkpoints" / "150").is_dir()


@pytest.mark.slow
def test_eval_mode_honours_cpu_devices(digits_run):
    proc = _train_py(digits_run, "--mode", "eval", "--config.cpu_devices=2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "(center, 2 cpu device(s))" in out, out
    final = json.loads((digits_run / "metrics.jsonl").read_text().splitlines()[-1])
    record = json.loads((digits_run / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 150
    assert record["test_error"] == final["test_error"]  # 2 devices: the same predictions
    assert record["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)


def test_jit_and_pmap_share_one_placement_without_a_device_axis():
    """Both modes take and give global arrays replicated on the same mesh, so replicate, fetch
    and checkpoints have one code path (no pmap device axis to strip)."""
    import jax
    import jax.numpy as jnp

    from resnet_jax import parallel

    def step(state, batch, *, axis_name=None):
        total = batch["x"].sum()
        if axis_name is not None:
            total = jax.lax.psum(total, axis_name)
        return {"w": state["w"] + total}, {"sum": total}

    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    outs = {}
    for mode in parallel.MODES:
        fn = parallel.compile(step, mode)
        state = fn.replicate({"w": np.ones(3, np.float32)})
        new, metrics = fn(state, {"x": x})
        assert new["w"].shape == (3,) and new["w"].sharding == fn.placement.replicated
        outs[mode] = fn.fetch((new, metrics))
    for a, b in zip(jax.tree.leaves(outs["jit"]), jax.tree.leaves(outs["pmap"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(outs["jit"][1]["sum"]) == 15.0
    # a device array the caller still holds is copied, not aliased: donation cannot delete it
    held = jnp.ones(3, jnp.float32)
    fn = parallel.compile(step, "jit")
    fn(fn.replicate({"w": held}), {"x": x})
    assert not held.is_deleted()


MULTI = """
import sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", 2, int(sys.argv[3]))
from resnet_jax import errors
from resnet_jax.train import workdir
try:
    held = workdir.lock(sys.argv[1])
except errors.WorkdirBusy as e:
    print(f"busy: {e}", flush=True)
    sys.exit(errors.EXIT_BUSY)
print(f"locked {held.path}", flush=True)
"""


def test_each_process_locks_its_own_file_and_a_refusal_is_agreed(tmp_path):
    import socket

    def run_two() -> list[tuple[int, str]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, "-c", MULTI, str(tmp_path), str(port), str(i)],
                                  env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        return [(p.wait(timeout=180), p.stdout.read()) for p in procs]

    # one run's processes share a host and a workdir without contending
    (rc0, out0), (rc1, out1) = run_two()
    assert (rc0, rc1) == (0, 0), out0 + out1
    assert f"locked {tmp_path / '.lock'}" in out0 and f"locked {tmp_path / '.lock.1'}" in out1
    # a run holding only process 1's file: the new run is refused on both processes
    script = HOLD.replace("workdir.lock(sys.argv[1])",
                          "workdir._try_lock(workdir.lock_path(sys.argv[1], 1))")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=ENV, cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    (rc0, out0), (rc1, out1) = run_two()
    holder.stdin.close()
    holder.wait(timeout=30)
    assert (rc0, rc1) == (errors.EXIT_BUSY, errors.EXIT_BUSY), out0 + out1
    assert f"in use by pid {holder.pid} on " in out1
    assert "process 1 of this run could not lock" in out0


def test_two_metric_writers_on_one_workdir_never_tear_a_line(tmp_path):
    """What killed two runs on one workdir (``error: Extra data: line 1 column 18``): both
    opened ``metrics.jsonl`` with truncation and wrote at their own offsets, so one's lines
    overwrote the other's and left tails like ``2.302585092994046, "train_error": ...``."""
    from resnet_jax.train import metrics

    first = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2):
        first.write(step, {"train_loss": 2.302585092994046, "train_error": 0.9})
    second = metrics.MetricWriter(str(tmp_path))  # a new file, by rename
    second.write(1, {"train_loss": 2.3})
    first.write(3, {"train_loss": 2.302585092994046, "train_error": 0.9})
    second.write(2, {"train_loss": 2.2})
    first.close()
    second.close()
    records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert records == [{"step": 1, "train_loss": 2.3}, {"step": 2, "train_loss": 2.2}]
