"""benchmarks/op_profile.py: the per-op-class profile of the CPU train step, resnet_jax and
PyTorch, and its memory figures, on a tiny net. No time is asserted, only what the profile must
hold: every conv of the step found and classed, the classes adding up, both memory subprocesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_op_profile_classifies_every_conv_and_reports_memory():
    pytest.importorskip("torch")
    # XLA skips its costly optimizations (compiling is most of this run on 2 cores)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "--arch", "resnet20",
         "--width", "4", "--batch", "8", "--image", "16", "--warmup", "1", "--steps", "2",
         "--baseline", "torch", "--memory", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| class | resnet_jax ms/step (%) | torch ms/step (%) |" in out.stdout
    r = json.loads(out.stdout.strip().splitlines()[-1])

    jx = r["resnet_jax"]
    # ResNet-20: 19 convolutions forward; backward, 19 weight gradients and 18 input gradients
    # (none for the image): 56 conv thunks per step, whatever the trace's loops.
    assert jx["ops_per_step"]["conv"] == 56
    for cls in ("conv", "BN statistics (reductions)", "BN elementwise", "optimizer"):
        assert jx["ms_per_step"][cls] > 0, cls
    summed = sum(jx["ms_per_step"].values())
    assert summed == pytest.approx(jx["summed_ms_per_step"])
    assert 0 < jx["busy_ms_per_step"] <= summed * (1 + 1e-9)
    assert jx["memory_analysis"]["temp"] > 0

    th = r["torch"]
    for cls in ("conv", "BN (stats+elementwise, one op)", "optimizer"):
        assert th["ms_per_step"][cls] > 0, cls
    assert th["peak_rss_bytes"] > 0

    default, off = r["memory"]["default"], r["memory"]["no_concurrency_scheduler"]
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in off["xla_flags"]
    assert "concurrency_optimized_scheduler" not in default["xla_flags"]
    for m in (default, off):
        assert m["temp"] > 0 and m["argument"] == jx["memory_analysis"]["argument"]
        assert m["peak_rss_bytes"] > 0
