"""The offline quick start learns (a shortened digits run), and writes its artefacts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.errors import CheckpointMismatch
from resnet_jax.train import config as config_lib
from resnet_jax.train import optim
from resnet_jax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parent.parent


def _digits_config():
    spec = importlib.util.spec_from_file_location("cfg_digits", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_digits_quick_start_learns(tmp_path: Path) -> None:
    c = _digits_config()
    c.model, c.model_kwargs.depth, c.model_kwargs.width = "cifar_resnet", 8, 8
    c.num_train_steps, c.lr_boundaries, c.log_every_steps, c.eval_every_steps = 120, (80,), 40, 60
    c.batch_size, c.weight_decay = 64, 1e-4

    final = train_and_evaluate(c, str(tmp_path))

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [40, 60, 80, 120]
    train_keys = {"train_loss", "train_error", "learning_rate", "images_per_second"}
    test_keys = {"test_error", "test_top5_error"}
    assert all(train_keys <= r.keys() for r in records if r["step"] % 40 == 0)
    assert all(test_keys <= r.keys() for r in records if r["step"] % 60 == 0)
    assert not test_keys & records[0].keys() and not train_keys & records[1].keys()
    for r in records:
        for k, v in r.items():
            if "error" in k:
                assert 0.0 <= v <= 1.0, (k, v)
    assert [r["learning_rate"] for r in records if "learning_rate" in r] == [
        np.float32(0.1), np.float32(0.1), np.float32(0.01)]
    # Learns: chance is 90 % error; the full quick start reaches <= 3 %.
    assert final["test_error"] < 0.35, final
    assert records[-1]["train_loss"] < records[0]["train_loss"] / 2, records
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert list(tmp_path.glob("events.out.tfevents.*"))


def _train_py(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``train.py`` on configs/digits.py at a tiny width (the quick start's data and recipe)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/digits.py"),
         "--workdir", str(workdir), "--config.model=cifar_resnet",
         "--config.model_kwargs.depth=8", "--config.model_kwargs.width=4", *overrides],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)


def test_digits_cosine_over_num_epochs_ends_near_zero_and_keeps_its_horizon(
        tmp_path: Path) -> None:
    # The must-show: schedule=cosine, num_epochs=3 on the step-counted digits config runs
    # 3 epochs (the given unit wins) and its cosine decays over those 135 steps to ~0.
    args = ("--config.schedule=cosine", "--config.log_every_steps=45")
    r = _train_py(tmp_path, *args, "--config.num_epochs=3")
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = round(3 * 1437 / 32)
    assert [r["step"] for r in records] == [45, 90, 135] and steps == 135
    c = config_lib.default_config()
    c.schedule, c.num_epochs, c.num_train_steps, c.batch_size = "cosine", 3.0, -1, 32
    schedule = optim.create_learning_rate_schedule(c, 1437 / 32)  # what the loop builds
    assert [r["learning_rate"] for r in records] == pytest.approx(
        [float(schedule(k - 1)) for k in (45, 90, 135)], rel=1e-6)  # jit vs eager: 1 ulp
    assert records[-1]["learning_rate"] < 0.01 * 0.1  # < 1 % of the peak (it was 0.096)
    # A longer run would change every remaining LR of the saved one: refused (before anything
    # is compiled), fix named. The config as train.py builds it from the same flags:
    d = _digits_config()
    overrides = {"model": "cifar_resnet", "model_kwargs.depth": 8, "model_kwargs.width": 4,
                 "schedule": "cosine", "log_every_steps": 45, "num_epochs": 4.0}
    d.update_from_flattened_dict(overrides)
    config_lib.length_from_overrides(d, overrides)
    with pytest.raises(CheckpointMismatch) as e:
        train_and_evaluate(d, str(tmp_path))
    assert "schedule_horizon=135, this run has 180" in str(e.value)
    assert "--config.num_epochs=3.0" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_bn_group_size_change_is_refused_on_resume(tmp_path: Path) -> None:
    # bn_sync=False on 2 devices: BN over 16 of the 32 examples; resuming on 1 device would
    # make it 32 (cpu_devices is resume-safe otherwise).
    base = ("--config.bn_sync=False", "--config.batch_size=32", "--config.log_every_steps=2",
            "--config.eval_every_steps=100")
    r = _train_py(tmp_path, *base, "--config.cpu_devices=2", "--config.num_train_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train_py(tmp_path, *base, "--config.cpu_devices=0", "--config.num_train_steps=4")
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("written with bn_group_size=16, this run has 32" in r.stderr
            and "--config.cpu_devices=2" in r.stderr), r.stderr[-2000:]


def test_run_facts_refuse_what_changes_the_math_on_resume() -> None:
    from resnet_jax.errors import CheckpointMismatch

    c = config_lib.default_config()
    c.bn_sync, c.batch_size = False, 128
    saved = config_lib.run_facts(c, None, device_count=2)
    assert (saved["bn_group_size"], saved["schedule_horizon"], saved["lr_boundaries_steps"]) == (
        64, None, [32_000, 48_000])
    where, cfg = "checkpoint 5", config_lib.to_json(c)
    c.num_train_steps = 80_000  # piecewise: a longer run has the same LR at every step
    assert config_lib.check_run_facts(saved, config_lib.run_facts(c, None, 2), where, cfg) == ""
    with pytest.raises(CheckpointMismatch, match=r"bn_group_size=64, this run has 32: .*"
                       r"--config.cpu_devices=2 on CPU"):
        config_lib.check_run_facts(saved, config_lib.run_facts(c, None, 4), where, cfg)
    c.bn_sync = True  # one BN batch: the global one, on any number of devices
    synced = config_lib.run_facts(c, None, 2)
    assert config_lib.check_run_facts(synced, config_lib.run_facts(c, None, 4), where, cfg) == ""
    c.schedule = "cosine"
    cosine = config_lib.run_facts(c, None, 2)
    c.num_train_steps = 64_000
    with pytest.raises(CheckpointMismatch, match=r"schedule_horizon=80000, this run has 64000"):
        config_lib.check_run_facts(cosine, config_lib.run_facts(c, None, 2), where, cfg)
    assert "not checked" in config_lib.check_run_facts(None, cosine, where, cfg)


def test_resume_of_a_checkpoint_without_the_run_record_warns(tmp_path: Path, capsys) -> None:
    from helpers import override

    def config(steps: int):
        return override(config_lib.default_config(), **{
            "model": "cifar_resnet", "model_kwargs.depth": 8, "model_kwargs.width": 4,
            "dataset": "synthetic", "data.num_train": 32, "data.num_eval": 8,
            "data.image_size": 8, "batch_size": 8, "eval_batch_size": 8,
            "num_train_steps": steps, "schedule": "cosine", "log_every_steps": 2,
            "eval_every_steps": 100, "checkpoint_every_steps": 2})

    train_and_evaluate(config(2), str(tmp_path))
    meta_path = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    assert meta["run"] == {"total_steps": 2, "schedule_horizon": 2, "lr_boundaries_steps": [],
                           "warmup_steps": 0, "bn_group_size": 8, "device_count": 1}
    del meta["run"]  # as written before the record existed
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    train_and_evaluate(config(4), str(tmp_path))  # accepted, with one warning line
    out = capsys.readouterr().out
    assert "warning: checkpoint 2 in" in out and "not checked on this resume" in out, out
    assert "resuming from checkpoint 2" in out
