"""``python -m resnet_jax.export``: the exported function, reloaded in a fresh process with
``jax.export.deserialize`` alone, gives ``resnet_jax.load``'s logits; load and export read the
preprocessing from the checkpoint, so both work after the dataset is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import data_config, override
from test_data_archive import known, write_archive

import resnet_jax
from resnet_jax import data, errors, export
from resnet_jax.data import sources
from resnet_jax.train import config as config_lib
from resnet_jax.train.evaluate import Preprocessing
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.preprocess import make_preprocess

ROOT = Path(__file__).resolve().parent.parent

RELOAD = """
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1] + "/model.stablehlo", "rb").read())
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two steps on a CIFAR-10 archive, then the archive moved away: what the eval path made
    of its test images while it existed (uint8 batch, model input) stays for comparison."""
    root = tmp_path_factory.mktemp("run")
    archive = write_archive(root / "cifar-10-python.tar.gz", "cifar10", known(16, 10, 0),
                            known(12, 10, 1))
    path = root / "work"
    c = override(config_lib.default_config(), **{
        "model": "cifar_resnet", "model_kwargs.depth": 8, "model_kwargs.width": 4,
        "dataset": "cifar10", "data.archive": str(archive), "data.workers": 0,
        "batch_size": 8, "eval_batch_size": 12, "num_train_steps": 2, "log_every_steps": 2,
        "eval_every_steps": 2, "checkpoint_every_steps": 2})
    train_and_evaluate(c, str(path))
    (batch,) = list(data.create(c, "eval"))  # uint8, as the eval pipeline makes them
    model_input = np.asarray(make_preprocess(c)(batch)["image"])  # the eval step's own
    mean = data.device_recipe(c).mean
    moved = root / "moved.tar.gz"
    archive.rename(moved)  # from here on the dataset is gone
    return {"path": path, "config": c, "batch": batch, "input": model_input, "mean": mean,
            "archive": archive, "moved": moved}


def test_load_gives_the_eval_paths_preprocessing_without_the_dataset(run):
    with pytest.raises(data.DataError):
        data.info(run["config"])  # the dataset is really gone
    loaded = resnet_jax.load(str(run["path"]))
    model, variables = loaded  # unpacks as before
    pre = loaded.preprocess
    assert (pre.kind, pre.pad, pre.size, pre.channels, pre.scale) == ("cifar", 4, 32, 3, 255.0)
    np.testing.assert_array_equal(pre.mean, run["mean"])  # exact: float32 through JSON
    np.testing.assert_array_equal(np.asarray(pre(run["batch"]["image"])), run["input"])
    image = run["batch"]["image"][3]
    np.testing.assert_array_equal(pre.prepare(image), image)  # the stored image as it is
    assert loaded.step == 2 and model is loaded.model and variables is loaded.variables
    logits = model.apply(variables, pre(run["batch"]["image"]), train=False)
    assert logits.shape == (12, 10)


def test_the_imagenet_recipe_record_matches_its_eval_pipeline():
    c = data_config("synthetic", eval_batch_size=4, image_size=24, pipeline="imagenet",
                    eval_resize=28, num_eval=4)
    pre = Preprocessing.from_json(json.loads(json.dumps(Preprocessing.from_config(c).to_json())))
    (batch,) = list(data.create(c, "eval"))
    _, stored = sources.synthetic(c.data.num_train, 4, 24, c.data.num_classes, 0)  # as stored
    assert (pre.kind, pre.size, pre.eval_resize) == ("imagenet", 24, 28)
    for i in range(4):  # resize the shorter side to 28, centre 24x24 crop (§3.4)
        np.testing.assert_array_equal(pre.prepare(stored[i]["image"]), batch["image"][i])
    np.testing.assert_array_equal(
        np.asarray(pre(batch["image"])), np.asarray(make_preprocess(c)(batch)["image"]))


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_exported_model_matches_load_in_a_fresh_process(run, tmp_path, input_dtype):
    path, batch = run["path"], run["batch"]
    out = tmp_path / "export"
    assert export.main([str(path), str(out), "--input", input_dtype]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["input"] == {"shape": ["batch", 32, 32, 3], "dtype": input_dtype,
                             "layout": "NHWC, RGB"}
    assert meta["model"] == "cifar_resnet" and meta["step"] == 2 and meta["num_classes"] == 10
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert meta["preprocessing"]["mean_kind"] == "per_pixel"
    assert meta["preprocessing"]["recipe"] == "cifar"
    np.testing.assert_array_equal(np.asarray(meta["preprocessing"]["mean"], np.float32),
                                  run["mean"])

    model, variables = resnet_jax.load(str(path))
    want = np.asarray(model.apply(variables, run["input"], train=False))
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


def test_export_command_works_where_the_dataset_is_gone(run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_jax.export", str(run["path"]), str(tmp_path / "out"),
         "--platforms", "cpu"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not run["archive"].exists()
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    np.testing.assert_array_equal(np.asarray(meta["preprocessing"]["mean"], np.float32),
                                  run["mean"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.json",
                                                                   "model.stablehlo"]


def test_a_checkpoint_without_the_record_recomputes_it_or_names_the_fix(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run["path"], old)
    (old / ".lock").unlink()
    meta_file = old / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["model"]["preprocess"]  # as checkpoints were written before the record
    meta_file.write_text(json.dumps(meta))

    loaded = resnet_jax.load(str(old))  # the weights load without the data
    with pytest.raises(errors.ConfigError, match=r"predates checkpoints that record their "
                       r"preprocessing.*point to the data \(export: --archive"):
        loaded.preprocess  # noqa: B018
    with pytest.raises(SystemExit) as e:
        export.main([str(old), str(tmp_path / "out"), "--platforms", "cpu"])
    assert e.value.code == errors.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint 2 in ") and "\n" not in err

    # where the data is (it moved): recomputed from it, equal to the recorded one
    assert export.main([str(old), str(tmp_path / "out"), "--platforms", "cpu",
                        "--archive", str(run["moved"])]) == 0
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    np.testing.assert_array_equal(np.asarray(meta["preprocessing"]["mean"], np.float32),
                                  run["mean"])
    pre = resnet_jax.load(str(old), data_overrides={"archive": str(run["moved"])}).preprocess
    np.testing.assert_array_equal(pre.mean, run["mean"])


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert e.value.code == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoints in") and "\n" not in err
    with pytest.raises(ValueError, match="input='int8' is not one of"):
        export.export_run(str(tmp_path), str(tmp_path / "out"), input_dtype="int8")
    assert jax.devices()  # the process is still usable
