"""Smoke tests of the benchmark harness: each script runs on a tiny net and ends in valid JSON.

Speed is never asserted here (benchmarks/RESULTS.md holds the measured numbers).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_json(script: str, *args: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY = ["--arch", "resnet20", "--width", "4", "--batch", "8", "--image", "16",
        "--warmup", "1", "--steps", "2", "--no-peak"]


@pytest.mark.parametrize("script", ["train_step.py", "eval_step.py"])
def test_step_benchmarks_print_json_with_a_same_run_baseline(script):
    r = run_json(script, *TINY, "--baseline", "plain")
    for key in ("images_per_second", "compile_seconds", "step_seconds_median", "vs_plain",
                "peak_memory_bytes", "flops_per_image"):
        assert r[key] > 0, key
    assert r["timed_steps"] == 2 and r["backend"] == "cpu"
    assert "flop_utilization" in r


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
