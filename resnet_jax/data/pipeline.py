"""Batches as pure functions of (seed, step), and the streams that compute them ahead.

Training: the stream is the concatenation of epochs, epoch ``e`` being the permutation
``rng(seed, e)`` of the training split. Global batch ``k`` is stream positions
``k*G .. k*G + G-1``; process ``p`` takes the ``p``-th contiguous slice of it. Augmentation draws
for global batch ``k`` come from ``rng(seed, k)``, one row per position in the global batch, so
a batch depends only on (seed, step, position): resuming at step ``k`` needs no replay, and the
global stream is the same for any process count.

Evaluation: global batch ``k`` holds examples ``k*G ..`` in stored order, split the same way;
positions past the end are zero images with ``mask = 0``.

Batches carry uint8 pixels and the augmentation's random draws; the float work happens on the
device (``resnet_jax.train.preprocess``). Keys:

* train, both recipes: ``image`` uint8 (B, H, W, C), ``label`` int32 (B,);
* cifar recipe (§4.2) with ``augment``: ``crop`` int32 (B, 2), the (row, col) offset of the
  crop in the image zero-padded by ``pad`` after mean subtraction, and ``flip`` bool (B,); with
  ``data.on_device``, ``index`` int32 (B,) into the device-resident training images replaces
  ``image``;
* imagenet recipe (§3.4) with ``augment``: ``image`` is the scale-augmented crop, ``flip`` bool
  (B,) and, when ``pca_std > 0``, ``pca_alpha`` float32 (B, 3), the PCA colour coefficients;
* eval: every ``image*`` key uint8, ``label``, ``mask`` float32 (0 on padding).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from resnet_jax.data import augment
from resnet_jax.data.loader import Batches
from resnet_jax.data.sources import Source

Batch = dict[str, np.ndarray]
_PERMUTATION, _AUGMENT = 0, 1  # rng stream tags


def _rng(seed: int, counter: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, counter, tag])


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How examples become model inputs (see ``resnet_jax.data.default_config`` for fields)."""

    kind: str  # "cifar" (§4.2) or "imagenet" (§3.4)
    size: int  # output height = width
    channels: int
    mean: np.ndarray  # 0..255 units: per pixel (H, W, C) for "cifar", per channel for "imagenet"
    #   (used on the device: ``resnet_jax.data.device_recipe``)
    augment: bool
    flip: bool
    pad: int
    scale_range: tuple[int, int]
    eval_resize: int
    eval_protocol: str
    multi_scale_sizes: tuple[int, ...]
    pca_std: float


@dataclasses.dataclass(eq=False)
class Plan:
    """Builds batch ``k`` of one process's stream for a source and a recipe."""

    source: Source
    recipe: Recipe
    batch: int  # per process
    process_index: int
    process_count: int
    seed: int
    on_device: bool = False  # cifar recipe: send indices into the device-resident images

    @property
    def global_batch(self) -> int:
        return self.batch * self.process_count

    def _mine(self, a: np.ndarray) -> np.ndarray:
        return a[self.process_index * self.batch:(self.process_index + 1) * self.batch]

    _permutations: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, init=False,
                                                              repr=False)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch`` (the last two are kept; workers may race benignly)."""
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = _rng(self.seed, epoch, _PERMUTATION).permutation(len(self.source))
            self._permutations[epoch] = perm
            for old in [e for e in list(self._permutations) if e < epoch - 1]:
                self._permutations.pop(old, None)
        return perm

    def train_indices(self, step: int) -> np.ndarray:
        n = len(self.source)
        pos = step * self.global_batch + self.process_index * self.batch + np.arange(self.batch)
        epoch, offset = np.divmod(pos, n)
        out = np.empty(self.batch, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.permutation(int(e))[offset[sel]]
        return out

    def eval_num_batches(self) -> int:
        return -(-len(self.source) // self.global_batch)

    # -- training ----------------------------------------------------------------------------

    def train_batch(self, step: int) -> Batch:
        """uint8 images (or, ``on_device``, their indices) and the step's augmentation draws;
        every float operation is left to the device (``resnet_jax.train.preprocess``)."""
        r = self.recipe
        indices = self.train_indices(step)
        rng = _rng(self.seed, step, _AUGMENT)
        g = self.global_batch
        out: Batch = {}
        if r.kind == "cifar":
            offsets = self._mine(rng.integers(0, 2 * r.pad + 1, size=(g, 2)))
            flips = self._mine(rng.random(g) < 0.5)
            if self.on_device:  # the device holds the training images (``device_table``)
                out["index"] = indices.astype(np.int32)
                labels = np.asarray(self.source.labels)[indices]  # type: ignore[attr-defined]
            else:
                images, labels = self.source.read(indices)
                out["image"] = np.asarray(images)
            if r.augment:  # §4.2: 4-pixel pad, random 32x32 crop, horizontal flip (on device)
                out["crop"] = offsets.astype(np.int32)
                out["flip"] = flips & r.flip
        else:
            images, labels = self.source.read(indices)
            lo, hi = r.scale_range
            shorter = self._mine(rng.integers(lo, hi + 1, size=g))
            pos = self._mine(rng.random((g, 2)))
            flips = self._mine(rng.random(g) < 0.5) & r.flip
            alpha = self._mine(rng.normal(0.0, 1.0, size=(g, 3))).astype(np.float32) * r.pca_std
            if r.augment:
                # §3.4: shorter side in [256, 480], random 224 crop here; flip, mean and the
                # PCA colour shift (its coefficients drawn here) on the device.
                out["image"] = augment.imagenet_train(images, shorter, pos, r.size,
                                                      channels=r.channels)
                out["flip"] = flips
                if r.pca_std:
                    out["pca_alpha"] = alpha
            else:
                out["image"] = np.stack([augment.center_crop(im, r.eval_resize, r.size,
                                                             channels=r.channels)
                                         for im in images])
        out["label"] = np.asarray(labels).astype(np.int32)
        return out

    # -- evaluation --------------------------------------------------------------------------

    def eval_batch(self, k: int) -> Batch:
        r = self.recipe
        pos = k * self.global_batch + self.process_index * self.batch + np.arange(self.batch)
        valid = pos < len(self.source)
        n = int(valid.sum())  # valid positions come first
        images, labels = self.source.read(pos[:n]) if n else ([], np.zeros(0, np.int32))
        out: Batch = {}
        if r.kind == "cifar":  # §4.2: the single original image
            views = {"image": np.asarray(images)} if n else {}
            shapes = {"image": (r.size, r.size, r.channels)}
        elif r.eval_protocol == "center":
            views = {"image": [augment.center_crop(im, r.eval_resize, r.size,
                                                   channels=r.channels) for im in images]}
            shapes = {"image": (r.size, r.size, r.channels)}
        elif r.eval_protocol == "ten_crop":
            views = {"image": [augment.ten_crop(im, r.eval_resize, r.size, channels=r.channels)
                               for im in images]}
            shapes = {"image": (10, r.size, r.size, r.channels)}
        else:  # multi_scale
            per_image = [augment.multi_scale(im, r.multi_scale_sizes, channels=r.channels)
                         for im in images]
            shapes = {f"image_{s}": (s, s, r.channels) for s in r.multi_scale_sizes}
            views = {key: [v[key] for v in per_image] for key in shapes}
        for key, shape in shapes.items():
            x = np.zeros((self.batch, *shape), np.uint8)
            if n:
                x[:n] = np.stack(views[key]) if isinstance(views[key], list) else views[key]
            out[key] = x
        label = np.zeros(self.batch, np.int32)
        label[:n] = labels
        out["label"] = label
        out["mask"] = valid.astype(np.float32)
        return out


def train_stream(plan: Plan, start_step: int, *, prefetch: int, workers: int) -> Batches:
    """The infinite training stream from batch ``start_step`` on, computed by ``workers`` worker
    processes (0: in this process; ``resnet_jax.data.loader``)."""
    return Batches(plan.train_batch, range(start_step, sys.maxsize), prefetch=prefetch,
                   workers=workers)


def eval_stream(plan: Plan, *, prefetch: int, workers: int) -> Batches:
    """Every example of the split once, in fixed-size batches (the last padded, mask = 0)."""
    n = plan.eval_num_batches()
    return Batches(plan.eval_batch, range(n), prefetch=prefetch, workers=workers, num_batches=n)
