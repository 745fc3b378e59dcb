"""The device half of the input recipe: uint8 batches to model inputs, inside the jitted step.

Host batches carry uint8 pixels and the augmentation's random draws (keys in
``resnet_jax.data.pipeline``); this pure function does all the float work, so the host ships a
quarter of float32's bytes and spends no time on arithmetic:

* every ``image*`` key: ``(pixel - mean) / 255`` (§3.4 per-channel / §4.2 per-pixel mean);
* ``pca_alpha`` (B, 3): §3.4's PCA colour shift (AlexNet), folded into the subtracted mean;
* ``crop`` (B, 2): §4.2's zero padding by ``pad`` pixels and the crop at that offset;
* ``flip`` (B,): the horizontal mirror.

A batch of ``index`` into device-resident images (``data.on_device``) is first turned into one
with ``image`` by :func:`gather`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data
from resnet_jax.data import augment

Batch = dict[str, Any]
DRAW_KEYS = ("crop", "flip", "pca_alpha")  # consumed here; never reach the model


def preprocess(batch: Batch, *, mean: np.ndarray | jax.Array, pad: int = 0) -> Batch:
    """``batch`` with float32 model inputs in every ``image*`` key and the draws removed.

    ``mean``: 0..255, per pixel (H, W, C) or per channel (C,) (``data.device_recipe``).
    Already-float images (a caller that preprocessed them itself) are returned unchanged.
    """
    out = {k: v for k, v in batch.items() if k not in DRAW_KEYS}
    mean = jnp.asarray(mean, jnp.float32)
    for key in [k for k in batch if k.startswith("image")]:
        x = batch[key]
        if jnp.issubdtype(x.dtype, jnp.floating):
            continue
        offset = mean
        if "pca_alpha" in batch and key == "image":
            # x/255 + shift == (x - (mean - 255 * shift)) / 255 with shift in [0, 1] units.
            shift = augment.pca_shift(batch["pca_alpha"].astype(jnp.float32))  # (B, C)
            offset = mean - augment.PIXEL_SCALE * shift[:, None, None, :]
        x = (x.astype(jnp.float32) - offset) * jnp.float32(1.0 / augment.PIXEL_SCALE)
        if key == "image" and "crop" in batch:
            x = _pad_crop(x, batch["crop"], pad)
        if key == "image" and "flip" in batch:
            x = jnp.where(batch["flip"][:, None, None, None], x[:, :, ::-1], x)
        out[key] = x
    return out


def make_preprocess(config: ml_collections.ConfigDict) -> Callable[[Batch], Batch]:
    """The jit-able ``preprocess(batch)`` for ``config``'s batches (mean and padding bound)."""
    recipe = data.device_recipe(config)
    return functools.partial(preprocess, mean=recipe.mean, pad=recipe.pad)


def _pad_crop(x: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    """§4.2: zero-pad ``pad`` pixels per side (after mean subtraction, so padding equals the
    mean image), crop the original size at ``offsets`` (B, 2) (row, col in [0, 2 * pad])."""
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(one)(padded, offsets.astype(jnp.int32))


def gather(table: jax.Array, batch: Batch, *, axis_name: str | None = None) -> Batch:
    """``data.on_device``: ``batch["index"]`` rows of the device-resident uint8 ``table``
    as ``batch["image"]`` (a step of its own, so ``parallel`` places the table once)."""
    del axis_name  # per example: nothing to reduce
    out = {k: v for k, v in batch.items() if k != "index"}
    out["image"] = jnp.take(table, batch["index"], axis=0)
    return out
