"""``python -m resnet_jax.export``: the exported function, reloaded in a fresh process with
``jax.export.deserialize`` alone, gives ``resnet_jax.load``'s logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import override

import resnet_jax
from resnet_jax import data, export
from resnet_jax.train import config as config_lib
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.preprocess import make_preprocess

ROOT = Path(__file__).resolve().parent.parent

RELOAD = """
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1] + "/model.stablehlo", "rb").read())
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("run")
    c = override(config_lib.default_config(), **{
        "model": "cifar_resnet", "model_kwargs.depth": 8, "model_kwargs.width": 4,
        "dataset": "synthetic", "data.num_train": 32, "data.num_eval": 12,
        "data.image_size": 16, "data.workers": 0, "batch_size": 8, "eval_batch_size": 12,
        "num_train_steps": 2, "log_every_steps": 2, "eval_every_steps": 2,
        "checkpoint_every_steps": 2})
    train_and_evaluate(c, str(path))
    return path, c


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_exported_model_matches_load_in_a_fresh_process(workdir, tmp_path, input_dtype):
    path, config = workdir
    out = tmp_path / "export"
    assert export.main([str(path), str(out), "--input", input_dtype]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["input"] == {"shape": ["batch", 16, 16, 3], "dtype": input_dtype,
                             "layout": "NHWC, RGB"}
    assert meta["model"] == "cifar_resnet" and meta["step"] == 2 and meta["num_classes"] == 10
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert meta["preprocessing"]["mean_kind"] == "per_pixel"

    (batch,) = list(data.create(config, "eval"))  # uint8, as the eval pipeline makes them
    model, variables = resnet_jax.load(str(path))
    pre = make_preprocess(config)
    want = np.asarray(model.apply(variables, pre(batch)["image"], train=False))
    given = batch["image"] if input_dtype == "uint8" else (
        (batch["image"] - np.asarray(meta["preprocessing"]["mean"], np.float32)) / 255.0
    ).astype(np.float32)
    for n in (12, 5):  # the batch dimension is symbolic
        np.save(tmp_path / "x.npy", given[:n])
        proc = subprocess.run(
            [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "x.npy"),
             str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want[:n], atol=1e-5, rtol=0)


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert e.value.code == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoints in") and "\n" not in err
    with pytest.raises(ValueError, match="input='int8' is not one of"):
        export.export_run(str(tmp_path), str(tmp_path / "out"), input_dtype="int8")
    assert jax.devices()  # the process is still usable
