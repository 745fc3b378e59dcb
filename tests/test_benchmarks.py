"""Smoke tests of the benchmark harness: each script runs on a tiny net and ends in valid JSON;
unit tests of the interleaved timer with fake programs and a fake clock.

Speed is never asserted here (benchmarks/RESULTS.md holds the measured numbers).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import harness
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def run_json(script: str, *args: str) -> dict:
    """The script's last line as JSON. XLA skips its costly optimizations here (compiling is
    most of a smoke run on 2 cores, and no number of these runs is asserted but its sign)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def onednn_or_skip() -> None:
    """Skip unless resnet_jax.ops.onednn exists and its available() is True."""
    try:
        spec = importlib.util.find_spec("resnet_jax.ops.onednn")
    except ModuleNotFoundError:  # no resnet_jax.ops package
        spec = None
    if spec is None:
        pytest.skip("resnet_jax.ops.onednn does not exist (yet)")
    onednn = importlib.import_module("resnet_jax.ops.onednn")
    if not onednn.available():
        pytest.skip("resnet_jax.ops.onednn.available() is False: oneDNN does not build/load here")


TINY = ["--arch", "resnet20", "--width", "4", "--batch", "8", "--image", "16",
        "--warmup", "1", "--blocks", "2", "--steps", "1", "--no-peak"]


class FakeClock:
    """A clock that only moves when a fake program runs: each step takes what it is told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_programs(clock: FakeClock, seconds: dict[str, list[float]], calls: list[str],
                  steps_per_block: int) -> list[harness.Program]:
    """Programs whose steps take ``seconds[name][k // steps_per_block]`` for their ``k``-th step
    (warm-up included); ``calls`` records every call in order ("a:first", "a")."""
    state = {"steps": dict.fromkeys(seconds, 0)}

    def make(name: str) -> harness.Program:
        def first() -> None:
            calls.append(f"{name}:first")
            clock.now += 100.0

        def step() -> None:
            calls.append(name)
            block = state["steps"][name] // steps_per_block
            clock.now += seconds[name][block]
            state["steps"][name] += 1

        return harness.Program(name, step, first)

    return [make(name) for name in seconds]


def test_interleaved_blocks_rotate_the_first_program_and_time_each():
    clock, calls = FakeClock(), []
    seconds = {"a": [1.0, 1.0, 2.0], "b": [2.0, 3.0, 2.0], "c": [0.5, 0.5, 0.5]}
    programs = fake_programs(clock, seconds, calls, 2)
    r = harness.time_interleaved(programs, blocks=3, steps_per_block=2, clock=clock)
    # every program compiles (first) before any timed step, then blocks rotate the leader
    assert calls[:3] == ["a:first", "b:first", "c:first"]
    assert calls[3:] == ["a", "a", "b", "b", "c", "c",
                         "b", "b", "c", "c", "a", "a",
                         "c", "c", "a", "a", "b", "b"]
    assert r.block_order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert r.blocks == 3 and r.steps_per_block == 2 and r.names == ["a", "b", "c"]
    assert r.first_call_seconds == {"a": 100.0, "b": 100.0, "c": 100.0}
    assert r.block_medians("b") == [2.0, 3.0, 2.0]
    # per block: baseline median / primary median (a is 3x, 3x, 1x as fast as b)
    assert r.ratios("a", "b") == [2.0, 3.0, 1.0]
    ratio = r.ratio("a", "b")
    assert (ratio.median, ratio.min, ratio.max) == (2.0, 1.0, 3.0)
    assert ratio.min <= ratio.median <= ratio.max
    t = r.timing("a")
    assert t.step_seconds == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0] and t.median == 1.0
    assert t.first_call_seconds == 100.0 and t.compile_seconds == 99.0


def test_interleaved_warmup_and_argument_checks():
    clock, calls = FakeClock(), []
    programs = fake_programs(clock, {"a": [1.0, 1.0], "b": [1.0, 1.0]}, calls, 1)
    harness.time_interleaved(programs, blocks=1, steps_per_block=1, warmup=1, clock=clock)
    assert calls == ["a:first", "a", "b:first", "b", "a", "b"]
    assert harness.block_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    with pytest.raises(ValueError, match="unique"):
        harness.time_interleaved([programs[0], programs[0]], blocks=1, steps_per_block=1)
    with pytest.raises(ValueError, match="one block"):
        harness.time_interleaved(programs, blocks=0, steps_per_block=1)


def test_time_steps_keeps_its_single_program_meaning():
    calls = []
    t = harness.time_steps(lambda: calls.append("first"), lambda: calls.append("step"), 2, 3)
    assert calls == ["first"] + ["step"] * 5 and len(t.step_seconds) == 3


FACTORY = """
import os


def make(arrays, *, log):
    def step():
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('OMP_WAIT_POLICY')} {arrays['x'].sum()}\\n")
    return step
"""


def test_worker_programs_run_in_their_own_process_interleaved(tmp_path, monkeypatch):
    (tmp_path / "fake_factory.py").write_text(FACTORY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # set after start: the worker must not see it
    log = tmp_path / "log.txt"
    local = []
    with harness.Worker() as worker:
        arrays = worker.put({"x": [1.0, 2.0]})
        remote = worker.program("remote", "fake_factory:make", arrays, log=str(log))
        r = harness.time_interleaved([harness.Program("local", lambda: local.append(1)), remote],
                                     blocks=3, steps_per_block=2, warmup=1)
        with pytest.raises(RuntimeError, match="no_such_factory"):
            worker.program("bad", "fake_factory:no_such_factory")
    lines = log.read_text().splitlines()
    assert len(lines) == len(local) == 1 + 1 + 3 * 2  # first, warm-up, 3 blocks of 2
    policy = harness.OMP_WAIT_POLICY_AT_START
    assert str(os.getpid()) not in {line.split()[0] for line in lines}
    assert {tuple(line.split()[1:]) for line in lines} == {(str(policy), "3.0")}
    assert r.block_order == [["local", "remote"], ["remote", "local"], ["local", "remote"]]
    assert [len(block["remote"]) for block in r.block_seconds] == [2, 2, 2]
    ratio = r.ratio("local", "remote")
    assert ratio.min <= ratio.median <= ratio.max
    # the worker's own peak RSS (a Python process with numpy: tens of MiB), not this one's
    assert set(r.peak_memory) == {"remote"} and 10 * 2**20 < r.peak_memory["remote"] < 2**31


def test_train_step_benchmark_interleaves_plain_xla_and_torch_baselines():
    """The oneDNN step against all three same-run baselines (plain linen, XLA's convolutions,
    PyTorch) in one process."""
    onednn_or_skip()
    pytest.importorskip("torch")
    r = run_json("train_step.py", *TINY, "--conv", "onednn", "--baseline", "plain",
                 "--baseline", "xla", "--baseline", "torch", "--torch-channels-last")
    for key in ("images_per_second", "compile_seconds", "step_seconds_median",
                "peak_memory_bytes", "flops_per_image"):
        assert r[key] > 0, key
    assert r["timed_steps"] == 2 and r["blocks"] == 2 and r["steps_per_block"] == 1
    assert r["backend"] == "cpu" and r["conv"] == "onednn" and "flop_utilization" in r
    for name in ("plain", "xla", "torch"):
        assert r[f"{name}_images_per_second"] > 0
        assert r[f"vs_{name}_min"] <= r[f"vs_{name}"] <= r[f"vs_{name}_max"], name
    assert r["torch_note"].startswith("channels_last, own process, OpenMP ")


def test_eval_step_benchmark_prints_json_with_a_same_run_baseline():
    r = run_json("eval_step.py", *TINY, "--baseline", "plain")
    for key in ("images_per_second", "compile_seconds", "step_seconds_median", "vs_plain",
                "peak_memory_bytes", "flops_per_image"):
        assert r[key] > 0, key
    assert r["vs_plain_min"] <= r["vs_plain"] <= r["vs_plain_max"]
    assert r["timed_steps"] == 2 and r["blocks"] == 2


def test_conv_ops_benchmark_covers_the_strided_shapes():
    r = run_json("conv_ops.py", "--batch", "4", "--blocks", "2", "--reps", "1", "--no-torch",
                 "--only", "/2")
    assert [(row["conv"], row["out_side"]) for row in r[::3]] == [
        ("3x3/2 p1 ->32", 16), ("3x3/2 p1 ->128", 28), ("1x1/2 p0 ->512", 28),
        ("7x7/2 p3 ->64", 112)]
    stem = r[-1]
    assert stem["shape"] == "1x224x224x3" and stem["op"] == "weight_grad"
    assert stem["flops"] == 2 * 1 * 112 * 112 * 7 * 7 * 3 * 64
    assert all(row["xla_gflops"] > 0 and row["torch_gflops"] is None for row in r)


def test_conv_ops_rows_of_a_net_with_its_layer_counts():
    r = run_json("conv_ops.py", "--net", "resnet20", "--batch", "2", "--blocks", "1", "--reps",
                 "1", "--no-torch")
    forward = [row for row in r if row["op"] == "forward"]
    assert len(r) == 3 * len(forward) == 3 * 6
    assert sum(row["count"] for row in forward) == 19  # 6n + 1 convolutions, n = 3
    assert forward[0]["shape"] == "2x32x32x3" and all(row["batch"] == 2 for row in r)
    assert all(row["xla_seconds"] > 0 for row in r)


def test_conv_ops_onednn_column():
    onednn_or_skip()
    pytest.importorskip("torch")
    r = run_json("conv_ops.py", "--batch", "4", "--blocks", "2", "--reps", "1", "--conv",
                 "onednn", "--only", "32x32x16")
    assert {row["op"] for row in r} == {"forward", "input_grad", "weight_grad"}
    for row in r:
        assert row["onednn_gflops"] > 0 and row["xla_gflops"] > 0 and row["torch_gflops"] > 0
        for pair in ("onednn_vs_torch", "onednn_vs_xla", "xla_vs_torch"):
            assert row[f"{pair}_min"] <= row[pair] <= row[f"{pair}_max"], pair


def test_input_pipeline_benchmark_prints_json():
    r = run_json("input_pipeline.py", "--batch", "16", "--warmup", "1", "--batches", "3")
    assert r["images_per_second"] > 0 and r["image_shape"] == [32, 32, 3]


def test_input_pipeline_imagenet_recipe_prints_json():
    r = run_json("input_pipeline.py", "--recipe", "imagenet", "--jpegs", "16", "--workers", "1",
                 "--baseline", "none", "--batch", "4", "--warmup", "1", "--batches", "2")
    assert r["recipe"] == "imagenet" and r["backend"] == "cpu" and r["cpu_count"] > 0
    (run,) = r["runs"]
    assert run["workers"] == 1 and run["images_per_second"] > 0 and run["cpu_ms_per_image"] >= 0
    # uint8 224x224x3 crop + the draws: label int32, flip bool, 3 float32 PCA coefficients.
    assert run["bytes_per_image"] == 224 * 224 * 3 + 4 + 1 + 3 * 4
    assert "vs_tfdata" not in run


def test_cifar_on_device_benchmark_prints_json():
    r = run_json("on_device.py", "--num-train", "64", "--batch", "16", "--steps", "1",
                 "--repeats", "1")
    assert [run["feed"] for run in r["runs"]] == ["float_batch", "host", "on_device"]
    sent = {run["feed"]: run["host_bytes_per_image"] for run in r["runs"]}
    # label int32 + crop 2 x int32 + flip bool, and the uint8 image or (on_device) an int32 index
    assert sent == {"float_batch": 0.0, "host": 32 * 32 * 3 + 13, "on_device": 4 + 13}
    assert all(run["images_per_second"] > 0 for run in r["runs"])


TINY_TRANSFORMS = ["--width", "4", "--batch", "2", "--image", "8", "--warmup", "0",
                   "--blocks", "1", "--steps", "1"]


def test_transforms_benchmark_applies_every_transform_to_the_default_model():
    """The issue's script: jvp, linearize, an HVP, grad of grad and per-example grads of the
    default CPU resnet20 all run, each timed against grad in the same run (the oneDNN path's
    transforms: tests/test_transforms.py)."""
    conv = "xla"
    r = run_json("transforms.py", *TINY_TRANSFORMS, "--conv", conv)
    assert r["conv"] == conv and r["backend"] == "cpu"
    for name in ("grad", "jvp", "linearize", "hvp", "grad_of_grad", "per_example"):
        assert r[name]["median_seconds"] > 0, name
        assert r[name]["x_grad_min"] <= r[name]["x_grad"] <= r[name]["x_grad_max"], name
    assert r["grad"]["x_grad"] == 1.0
