"""The README's forks (``examples/``) end to end. The pre-activation fork (its block, stem and
head by import path) with an EMA of the weights trains through the engine, resumes bit-exactly
after kill -9 (its whole state, the EMA included), loads with ``resnet_jax.load`` and
``--mode eval`` and runs the Fig. 7 responses measurement; the SE fork runs the experiment
commands and ``--mode eval`` in fresh processes. (A fork's state is the paper net's, so one
fork under kill -9 covers both; test_checkpoint pins kill -9 on the paper net.)

Tiny nets (CIFAR ResNet-8, width 4) on 8x8 synthetic images; the kill machinery is
``test_checkpoint``'s.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import test_checkpoint
from test_checkpoint import (
    STEPS,
    _assert_identical,
    _spawn,
    _steps,
    _variables,
    _wait_for,
    tiny_config,
)

compilation_cache = test_checkpoint.compilation_cache  # its module-scoped autouse cache, here too

# the pre-activation fork also keeps an EMA of the weights: the whole state must survive the
# kill. Batches load in-process (workers=0): a kill with loader workers alive is test_checkpoint's.
PREACT_EMA = {"model_kwargs.block": "examples.preact:PreActBlock",
              "model_kwargs.stem": "examples.preact:PreActStem",
              "model_kwargs.head": "examples.preact:PreActHead",
              "ema_decay": 0.5, "data.workers": 0}


def _ema_variables(workdir: Path) -> dict[str, np.ndarray]:
    import jax

    import resnet_jax

    _, variables = resnet_jax.load(str(workdir), ema=True)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def test_preact_fork_with_ema_trains_resumes_after_kill9_loads_and_measures_responses(
    compilation_cache: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import resnet_jax
    from resnet_jax import data
    from resnet_jax.experiments import responses
    from resnet_jax.train.evaluate import evaluate_checkpoint
    from resnet_jax.train.loop import train_and_evaluate
    from resnet_jax.train.preprocess import make_preprocess

    overrides, fork = PREACT_EMA, "preact+ema"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train_and_evaluate(tiny_config(**overrides), str(reference))  # fills the compilation cache

    # killed in step ``at``, when the loop asks for the batch ``ahead`` steps on (one it trains)
    ahead = int(tiny_config().get("device_prefetch", 0))
    at = random.Random().randint(3, STEPS - 1 - ahead)
    proc = _spawn(killed, "block", at + ahead, compilation_cache, overrides)
    _wait_for(lambda: (killed / "blocked").exists() and _steps(killed), proc,
              f"step {at} and a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed_from = max(_steps(killed))
    capsys.readouterr()
    train_and_evaluate(tiny_config(**overrides), str(killed))
    assert f"resuming from checkpoint {resumed_from}" in capsys.readouterr().out
    _assert_identical(_variables(killed), _variables(reference),
                      f"{fork}: killed in step {at}, resumed from {resumed_from}")

    final = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    results = evaluate_checkpoint(tiny_config(**overrides), str(killed))
    assert results["test_error"] == final["test_error"]
    ema = _ema_variables(killed)
    _assert_identical(ema, _ema_variables(reference), f"{fork}: EMA")
    assert not all(np.array_equal(a, b) for a, b in zip(
        ema.values(), _variables(killed).values(), strict=True))
    assert results["ema_test_error"] == final["ema_test_error"]

    config = tiny_config(**overrides)
    model, variables = resnet_jax.load(str(killed))
    stream = data.create(config, "eval", seed=config.seed)
    try:
        layers = responses.layer_responses(model, variables, stream,
                                           preprocess=make_preprocess(config))
    finally:
        stream.close()
    assert len(layers) >= 6 and all(np.isfinite(r.std) and r.std > 0 for r in layers)


def test_experiment_commands_and_eval_mode_run_on_a_fork_workdir(tmp_path: Path) -> None:
    """The depth study trains a fork named by import path; ``responses`` and ``--mode eval``
    rebuild it from the string stored with the checkpoint, in fresh processes."""
    import csv
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    work = tmp_path / "study"
    model = ["--config.model_kwargs.depth=8", "--config.model_kwargs.width=4",
             "--config.model_kwargs.block=examples.se:SEBlock"]

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout

    run("-m", "resnet_jax.experiments", "depth", f"--config={root}/configs/digits.py",
        "--archs=cifar_resnet", "--steps=2", f"--workdir={work}", "--config.batch_size=32",
        *model)
    run("-m", "resnet_jax.experiments", "responses", f"--workdir={work}")
    with open(work / "responses.csv") as f:
        assert len(list(csv.DictReader(f))) == 7  # stem + 3 blocks x 2
    out = run(str(root / "train.py"), f"--config={root}/configs/digits.py", "--mode=eval",
              f"--workdir={work / 'cifar_resnet'}", "--config.model=cifar_resnet", *model)
    assert "checkpoint 2 of cifar_resnet on digits" in out
