"""Batches as pure functions of (seed, step), and a bounded background prefetcher.

Training: the stream is the concatenation of epochs, epoch ``e`` being the permutation
``rng(seed, e)`` of the training split. Global batch ``k`` is stream positions
``k*G .. k*G + G-1``; process ``p`` takes the ``p``-th contiguous slice of it. Augmentation draws
for global batch ``k`` come from ``rng(seed, k)``, one row per position in the global batch, so
a batch depends only on (seed, step, position): resuming at step ``k`` needs no replay, and the
global stream is the same for any process count.

Evaluation: global batch ``k`` holds examples ``k*G ..`` in stored order, split the same way;
positions past the end are zero images with ``mask = 0``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from resnet_jax.data import augment
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
        r = self.recipe
        images, labels = self.source.read(self.train_indices(step))
        rng = _rng(self.seed, step, _AUGMENT)
        g = self.global_batch
        if r.kind == "cifar":
            offsets = self._mine(rng.integers(0, 2 * r.pad + 1, size=(g, 2)))
            flips = self._mine(rng.random(g) < 0.5)
            x = augment.normalize(np.asarray(images), r.mean)
            if r.augment:
                # §4.2: 4-pixel pad, random 32x32 crop, horizontal flip.
                x = augment.pad_crop_flip(x, offsets, flips & r.flip, r.pad)
        else:
            lo, hi = r.scale_range
            shorter = self._mine(rng.integers(lo, hi + 1, size=g))
            pos = self._mine(rng.random((g, 2)))
            flips = self._mine(rng.random(g) < 0.5) & r.flip
            alpha = self._mine(rng.normal(0.0, 1.0, size=(g, 3))).astype(np.float32) * r.pca_std
            if r.augment:
                # §3.4: shorter side in [256, 480], random 224 crop, flip, mean, PCA colour.
                x = augment.imagenet_train(images, shorter, pos, flips, alpha, r.size, r.mean)
            else:
                x = np.stack([augment.center_crop(im, r.eval_resize, r.size, r.mean)
                              for im in images])
        return {"image": x.astype(np.float32, copy=False), "label": labels.astype(np.int32)}

    # -- evaluation --------------------------------------------------------------------------

    def eval_batch(self, k: int) -> Batch:
        r = self.recipe
        pos = k * self.global_batch + self.process_index * self.batch + np.arange(self.batch)
        valid = pos < len(self.source)
        n = int(valid.sum())  # valid positions come first
        images, labels = self.source.read(pos[:n]) if n else ([], np.zeros(0, np.int32))
        out: Batch = {}
        if r.kind == "cifar":  # §4.2: the single original image
            views = {"image": augment.normalize(np.asarray(images), r.mean)} if n else {}
            shapes = {"image": (r.size, r.size, r.channels)}
        elif r.eval_protocol == "center":
            views = {"image": [augment.center_crop(im, r.eval_resize, r.size, r.mean)
                               for im in images]}
            shapes = {"image": (r.size, r.size, r.channels)}
        elif r.eval_protocol == "ten_crop":
            views = {"image": [augment.ten_crop(im, r.eval_resize, r.size, r.mean)
                               for im in images]}
            shapes = {"image": (10, r.size, r.size, r.channels)}
        else:  # multi_scale
            per_image = [augment.multi_scale(im, r.multi_scale_sizes, r.mean) for im in images]
            shapes = {f"image_{s}": (s, s, r.channels) for s in r.multi_scale_sizes}
            views = {key: [v[key] for v in per_image] for key in shapes}
        for key, shape in shapes.items():
            x = np.zeros((self.batch, *shape), np.float32)
            if n:
                x[:n] = np.stack(views[key]) if isinstance(views[key], list) else views[key]
            out[key] = x
        label = np.zeros(self.batch, np.int32)
        label[:n] = labels
        out["label"] = label
        out["mask"] = valid.astype(np.float32)
        return out


class Batches(Iterator[Batch]):
    """Iterates ``make(k)`` for k in ``steps``, computed ahead by ``workers`` background threads
    with at most ``max(prefetch, workers)`` batches in flight. A worker's exception is re-raised
    in the consumer at the batch that failed (and the iterator closes).

    ``num_batches`` is the length of a finite (eval) stream, else None.
    """

    def __init__(self, make: Callable[[int], Batch], steps: Iterable[int], *, prefetch: int,
                 workers: int, num_batches: int | None = None) -> None:
        if prefetch < 1 or workers < 1:
            raise ValueError(f"data.prefetch={prefetch} and data.workers={workers} must be >= 1")
        self.num_batches = num_batches
        self._make = make
        self._steps = iter(steps)
        self._depth = max(prefetch, workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="resnet_jax_data"))
        self._pending: collections.deque[concurrent.futures.Future[Batch]] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self._depth:
            step = next(self._steps, None)
            if step is None:
                return
            self._pending.append(self._pool.submit(self._make, step))

    def __iter__(self) -> Batches:
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a training stream is infinite")
        return self.num_batches

    def __next__(self) -> Batch:
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return batch

    def close(self) -> None:
        """Stops the workers; pending batches are dropped."""
        if getattr(self, "_pool", None) is not None:
            for f in self._pending:
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
            self._pool = None

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def train_stream(plan: Plan, start_step: int, *, prefetch: int, workers: int) -> Batches:
    """The infinite training stream from batch ``start_step`` on."""
    return Batches(plan.train_batch, itertools.count(start_step), prefetch=prefetch,
                   workers=workers)


def eval_stream(plan: Plan, *, prefetch: int, workers: int) -> Batches:
    """Every example of the split once, in fixed-size batches (the last padded, mask = 0)."""
    n = plan.eval_num_batches()
    return Batches(plan.eval_batch, range(n), prefetch=prefetch, workers=workers, num_batches=n)
