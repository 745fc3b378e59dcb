"""Every config loads, validates and documents its run; bad values fail early in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import config_module

from resnet_jax import models
from resnet_jax.train import config as config_lib
from resnet_jax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "name,archs",
    [("cifar10", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                  "plain20", "plain56"]),
     ("imagenet", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain34"]),
     ("digits", [None])],
)
def test_configs_validate_and_document(name: str, archs: list) -> None:
    module = config_module(name)
    doc = module.__doc__
    assert "python train.py --config configs/" in doc and ("Cost" in doc or "Expect" in doc)
    for arch in archs:
        c = module.get_config() if arch is None else module.get_config(arch)
        config_lib.validate(c)
        assert c.model in models.names()
        assert set(c.keys()) == set(config_lib.default_config().keys())


def test_paper_recipes() -> None:
    c = config_module("cifar10").get_config("resnet56")
    assert (c.batch_size, c.num_train_steps, tuple(c.lr_boundaries)) == (128, 64_000,
                                                                        (32_000, 48_000))
    assert (c.learning_rate, c.momentum, c.weight_decay) == (0.1, 0.9, 1e-4)
    i = config_module("imagenet").get_config("resnet50")
    assert (i.batch_size, i.num_epochs, tuple(i.lr_boundaries), i.lr_boundaries_unit) == (
        256, 90.0, (30, 60), "epochs")


@pytest.mark.parametrize(
    "field,value,message",
    [("parallel", "pjit", "parallel='pjit' is not one of"),
     ("dtype", "float64", "dtype='float64' is not one of"),
     ("schedule", "step", "schedule='step' is not one of"),
     ("weight_decay_mask", "bn", "weight_decay_mask='bn'"),
     ("batch_size", 0, "batch_size=0 must be > 0"),
     ("momentum", 1.5, "momentum=1.5 must be in [0, 1)"),
     ("cpu_devices", -1, "cpu_devices=-1 must be >= 0"),
     ("steps_in_flight", -2, "steps_in_flight=-2 must be an int >= -1"),
     ("label_smoothing", 1.0, "label_smoothing=1.0"),
     ("lr_boundaries", (48_000, 32_000), "must be increasing")],
)
def test_invalid_values_raise_one_line(field: str, value, message: str) -> None:
    c = config_module("digits").get_config()
    c[field] = value
    with pytest.raises(ValueError) as e:
        train_and_evaluate(c, "/nonexistent/never/written")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_and_dataset(tmp_path: Path) -> None:
    c = config_module("digits").get_config()
    c.model = "resnet21"
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20"):
        train_and_evaluate(c, str(tmp_path))
    c.dataset = "no_such_dataset_xyz"  # the model is reported first, before any data is read
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'"):
        train_and_evaluate(c, str(tmp_path))
    c = config_module("digits").get_config()
    c.dataset = "no_such_dataset_xyz"
    with pytest.raises(Exception, match="no_such_dataset_xyz") as e:
        train_and_evaluate(c, str(tmp_path))
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir()), "nothing is written before the config is known good"


def test_batch_not_divisible_by_devices_and_cli_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/digits.py"),
         "--workdir", str(tmp_path), "--config.batch_size=60"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: batch_size=60 is not divisible by the 8 devices / 1 processes; use a multiple "
        "of 8, e.g. --config.batch_size=64."
    ], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_cpu_devices_after_jax_started_is_a_one_line_error() -> None:
    import jax

    from resnet_jax import parallel

    jax.devices()  # the backend is up
    n = len(jax.devices("cpu")) + 1
    with pytest.raises(ValueError, match="comes too late") as e:
        parallel.set_cpu_devices(n)
    assert "set_cpu_devices right after `import jax`" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="must be >= 0"):
        parallel.set_cpu_devices(-1)
