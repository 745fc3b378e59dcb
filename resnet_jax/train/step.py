"""One pure training step and one evaluation step, per device or global-view.

``axis_name=None``: the global-view program that ``jax.jit`` shards (BN statistics over the
whole batch it sees; XLA inserts the all-reduces). With an axis name (``jax.pmap``): gradients
and metrics are averaged over that axis, and BN statistics too when ``bn_sync``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.errors import ConfigError
from resnet_jax.train import ghost, optim
from resnet_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Preprocess = Callable[[Batch], Batch]


def _forward_train(
    state: TrainState,
    params: Any,
    images: jax.Array,
    rng: jax.Array,
    *,
    bn_axis_name: str | None,
    bn_groups: int,
) -> tuple[jax.Array, Any]:
    """Logits and updated batch_stats from one call of the model on the whole batch.

    ``bn_groups > 1``: "ghost" BN in the global view, one BN batch per group of
    ``B / bn_groups`` examples, as if each group were a device of the paper's multi-GPU setup
    (§3.4); the norm splits the batch (``resnet_jax.ops.norm``) and averages the running
    statistics over the groups. The dropout stream is then a :func:`ghost.grouped_key`, so
    group ``g`` draws its masks with ``fold_in(rng, g)``, exactly as device ``g`` does under
    ``pmap`` with ``bn_sync=False`` (``train_step`` folds the device index into ``rng``).
    """
    variables = {"params": params, "batch_stats": state.batch_stats}
    groups: dict[str, int] = {}
    if bn_groups != 1:
        b = images.shape[0]
        if bn_groups < 1 or b % bn_groups:
            raise ConfigError(
                f"the batch of {b} examples does not split into bn_groups={bn_groups} BN "
                f"batches (bn_sync=False under jit: one per device); use a batch size that "
                f"is a multiple of {bn_groups}")
        rng = ghost.grouped_key(rng, bn_groups)
        groups["bn_groups"] = bn_groups  # only then: a fork's model without ghost BN still runs
    logits, new = state.apply_fn(
        variables, images, train=True, mutable=["batch_stats"], bn_axis_name=bn_axis_name,
        rngs={"dropout": rng}, **groups,
    )
    return logits, new.get("batch_stats", {})  # {} for a net without BN (VGG-19)

def _errors(log_probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example top-1 and top-5 errors (0./1.) from (B, K) scores."""
    _, top = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))
    hit = top == labels[:, None]
    return 1.0 - hit[:, 0].astype(jnp.float32), 1.0 - hit.any(-1).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    axis_name: str | None = None,
    bn_sync: bool = True,
    bn_groups: int = 1,
    label_smoothing: float = 0.0,
    preprocess: Preprocess | None = None,
) -> tuple[TrainState, Metrics]:
    """One SGD step on softmax cross-entropy; returns the new state and batch-mean metrics.

    ``preprocess``: the device half of the input recipe (``resnet_jax.train.preprocess``: uint8
    pixels and augmentation draws -> float images), applied first; None: ``batch["image"]`` is
    the model input already.

    ``bn_sync=False`` with an axis name: per-device BN statistics (the paper's multi-GPU
    "ghost" batches, §3.4); the running ``batch_stats`` are then averaged over the axis after
    the step so replicas stay identical. ``bn_groups``: the same per-slice BN in the global
    view (jit), splitting the batch into that many groups.
    Metrics: loss, error, top5_error (fractions), learning_rate, grad_norm.
    """
    if preprocess is not None:
        batch = preprocess(batch)
    images, labels = batch["image"], batch["label"]
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    bn_axis_name = axis_name if bn_sync else None

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
        logits, batch_stats = _forward_train(
            state, params, images, rng, bn_axis_name=bn_axis_name, bn_groups=bn_groups
        )
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        scaled = loss if loss_scale is None else loss * loss_scale
        return scaled, (loss, logits, batch_stats)

    # float16 (config.dtype): the loss is scaled so small gradients survive the backward pass;
    # the optimiser (optim.dynamic_loss_scale) skips steps whose gradients overflowed.
    loss_scale = optim.current_loss_scale(state.opt_state)
    (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if loss_scale is not None:
        grads = jax.tree.map(lambda g: g / loss_scale, grads)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        if not bn_sync:
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = state.apply_gradients(grads, batch_stats=batch_stats)

    top1, top5 = _errors(logits, labels)
    metrics = {
        "loss": loss,
        "error": top1.mean(),
        "top5_error": top5.mean(),
    }
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = optim.current_learning_rate(new_state.opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None,
              preprocess: Preprocess | None = None) -> Metrics:
    """Sums and counts over the batch; examples with ``mask == 0`` count zero.

    Every key starting with "image" is a group of views: (B, H, W, C) is one view, (B, V, H, W, C)
    is V views of one size. Softmax probabilities are averaged over all views of all groups
    before the errors are taken (the paper's 10-crop and multi-scale testing, §3.4).
    Returns loss_sum (cross-entropy of the averaged probabilities), error_sum, top5_error_sum,
    count; divide by ``count`` after summing over batches.
    """
    if preprocess is not None:
        batch = preprocess(batch)
    keys = sorted(k for k in batch if k.startswith("image"))
    if not keys:
        raise ValueError(f"eval batch has no 'image*' key; keys: {sorted(batch)}.")
    log_probs = []
    for key in keys:
        x = batch[key]
        if x.ndim == 4:
            b, v = x.shape[0], 1
        elif x.ndim == 5:
            b, v = x.shape[:2]
            x = x.reshape(b * v, *x.shape[2:])
        else:
            raise ValueError(f"batch[{key!r}] has shape {x.shape}; expected rank 4 or 5.")
        logits = state.apply_fn(state.variables, x, train=False)
        log_probs.append(jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, v, -1))
    all_views = jnp.concatenate(log_probs, axis=1)
    mean_log_probs = jax.nn.logsumexp(all_views, axis=1) - math.log(all_views.shape[1])

    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(labels.shape)
    nll = -jnp.take_along_axis(mean_log_probs, labels[:, None], axis=-1)[:, 0]
    top1, top5 = _errors(mean_log_probs, labels)
    counted = mask > 0
    sums = {
        "loss_sum": jnp.where(counted, nll, 0.0).sum(),
        "error_sum": jnp.where(counted, top1, 0.0).sum(),
        "top5_error_sum": jnp.where(counted, top5, 0.0).sum(),
        "count": counted.astype(jnp.float32).sum(),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums
