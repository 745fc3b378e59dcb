"""A trained model's inference function as a portable artefact (``jax.export``, StableHLO).

    python -m resnet_jax.export WORKDIR OUT [--step N] [--ema] [--input uint8|float32]

writes ``OUT/model.stablehlo`` (the serialized ``jax.export.Exported``: weights inside, batch
dimension symbolic, lowered for CPU, CUDA and TPU) and ``OUT/model.json`` (model, image size,
input dtype and layout, the preprocessing inside and the one left to the caller). Reload it
anywhere jax runs, without this package::

    exported = jax.export.deserialize(open("OUT/model.stablehlo", "rb").read())
    logits = exported.call(images)  # images: (batch, H, W, C) as model.json says

``--input uint8`` (default): the function takes the uint8 RGB pixels the eval pipeline makes
(CIFAR: the 32x32 image; ImageNet: shorter side resized to ``eval_resize``, centre crop) and
subtracts the training mean inside, as the training step does. ``--input float32``: it takes
``(pixels - mean) / 255`` (the mean is in model.json).

The mean and the recipe come from the checkpoint (``resnet_jax.load``'s ``preprocess``): no
dataset is opened. ``--archive`` / ``--data_dir`` only serve a checkpoint written before it
recorded them, whose mean is recomputed from the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import cli
from resnet_jax.errors import ConfigError
from resnet_jax.train import config as config_lib
from resnet_jax.train.evaluate import load_run

INPUTS = ("uint8", "float32")
PLATFORMS = ("cpu", "cuda", "tpu")


def export_run(workdir: str, out: str, *, step: int | None = None, ema: bool = False,
               input_dtype: str = "uint8", platforms: Sequence[str] = PLATFORMS,
               data_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exports the checkpoint of ``workdir`` (newest, or ``step``; ``ema``: the average) into
    the folder ``out``; returns what ``model.json`` holds. ``data_overrides`` set
    ``config.data`` fields (where the dataset is now) for the training mean of a checkpoint
    that does not record it."""
    if input_dtype not in INPUTS:
        raise ConfigError(f"input={input_dtype!r} is not one of {INPUTS}; e.g. --input uint8")
    run = load_run(workdir, step, ema=ema, data_overrides=data_overrides)
    config, pre = run.config, run.preprocess  # the training mean (§4.2 per pixel, §3.4 channel)
    h, w, c = pre.size, pre.size, pre.channels
    model, variables = run.model, run.variables

    def infer(images: jax.Array) -> jax.Array:
        if input_dtype == "uint8":
            images = pre(images)
        return model.apply(variables, images, train=False).astype(jnp.float32)

    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, h, w, c), jnp.dtype(input_dtype))
    exported = jax.export.export(jax.jit(infer), platforms=tuple(platforms))(spec)
    os.makedirs(out, exist_ok=True)
    _write_atomically(os.path.join(out, "model.stablehlo"), exported.serialize())
    host = ("the stored image as it is (no resize or crop)" if pre.kind == "cifar" else
            f"resize the shorter side to {pre.eval_resize} (bilinear, antialiased), "
            f"then take the centre {h}x{w} crop")
    mean = np.asarray(pre.mean, np.float32)
    meta = {
        "format": "jax.export.Exported, serialized (StableHLO); load with "
                  "jax.export.deserialize(bytes) and call .call(images)",
        "model": config.model,
        "model_kwargs": config_lib.model_overrides(config),
        "dataset": config.dataset,
        "num_classes": run.num_classes,
        "step": run.step,
        "ema": ema,
        "input": {"shape": ["batch", h, w, c], "dtype": input_dtype,
                  "layout": "NHWC, RGB" if c == 3 else "NHWC"},
        "output": {"shape": ["batch", run.num_classes], "dtype": "float32",
                   "meaning": "logits (softmax for probabilities)"},
        "preprocessing": {
            "by_caller": host + (", pixels as uint8 0..255" if input_dtype == "uint8" else
                                 ", then (pixels - mean) / 255 as float32"),
            "inside": ("(pixels - mean) / 255" if input_dtype == "uint8" else "none"),
            "recipe": pre.kind,  # "cifar" (§4.2) or "imagenet" (§3.4)
            "scale": pre.scale,
            "mean_kind": "per_pixel" if mean.ndim == 3 else "per_channel",
            "mean": mean.tolist(),
        },
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
    }
    _write_atomically(os.path.join(out, "model.json"), json.dumps(meta, indent=1).encode())
    return meta


def _write_atomically(path: str, content: bytes) -> None:
    """``path`` holds ``content`` or what it held before, never a mix of two writers' (tmp in
    the same folder, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a training workdir (its checkpoints/)")
    parser.add_argument("out", help="folder to write model.stablehlo and model.json into")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (newest)")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights")
    parser.add_argument("--input", default="uint8", choices=INPUTS)
    parser.add_argument("--platforms", default=",".join(PLATFORMS),
                        help="lowering platforms, comma-separated")
    parser.add_argument("--archive", default=None,
                        help="CIFAR archive, for a checkpoint that does not record its mean")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir, for a checkpoint that does not record its mean")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("archive", args.archive), ("data_dir", args.data_dir)) if v}
    with cli.exit_on_error():  # one line and a documented status for every expected failure
        meta = export_run(args.workdir, args.out, step=args.step, ema=args.ema,
                          input_dtype=args.input, platforms=args.platforms.split(","),
                          data_overrides=overrides)
        print(f"wrote {args.out}/model.stablehlo and model.json: {meta['model']} at step "
              f"{meta['step']}, input {meta['input']['dtype']} {meta['input']['shape']}, "
              f"platforms {', '.join(meta['platforms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
