"""TrainState: everything that changes during training, as one pytree."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax import models
from resnet_jax.train import optim


class TrainState(flax.struct.PyTreeNode):
    """``step, params, batch_stats, opt_state``; ``apply_fn`` and ``tx`` are static.

    Checkpointed whole (with the data position and RNG) so a resumed run continues exactly.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params", "batch_stats"}`` as the model's ``apply`` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, grads: Any, **changes: Any) -> TrainState:
        """One optimiser update; ``changes`` replace other fields (e.g. ``batch_stats``)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)


def ema_keep(decay: float, count: jax.typing.ArrayLike) -> jax.Array:
    """The weight on the old average at update ``count`` (1, 2, ...) of a debiased EMA:
    ``d (1 - d^(k-1)) / (1 - d^k)``; 0 at the first update, -> ``d`` as ``k`` grows.

    ``avg_k = keep * avg_{k-1} + (1 - keep) * x_k`` is then exactly ``optax.ema(d,
    debias=True)``'s output, ``ema_k / (1 - d^k)`` with ``ema_0 = 0``: the weights ``(1-d)
    d^(k-i) / (1 - d^k)`` on ``x_1..x_k`` sum to 1 and the initial value has none. ``expm1``
    keeps ``1 - d^k`` accurate in float32 for ``d`` near 1.
    """
    log_d = jnp.float32(math.log(decay))
    k = jnp.asarray(count, jnp.float32)
    return (decay * jnp.expm1((k - 1.0) * log_d) / jnp.expm1(k * log_d)).astype(jnp.float32)


class EMATrainState(TrainState):
    """A :class:`TrainState` that also keeps an exponential moving average of the weights and
    the BN statistics, updated with every optimiser step (not in the paper).

    Debiased as ``optax.ema(ema_decay, debias=True)``: after ``k = step`` updates the average
    is ``sum_i (1-d) d^(k-i) x_i / (1 - d^k)`` over the values ``x_1..x_k`` after each update,
    with no weight on the random init (:func:`ema_keep`). ``ema_params``/``ema_batch_stats``
    hold that debiased average itself (evaluated and loaded as it is); the count is ``step``.
    The checkpoint saves it whole (``ema_params/...``, ``ema_batch_stats/...``).
    """

    ema_params: Any
    ema_batch_stats: Any
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.9999)

    @property
    def ema_variables(self) -> dict[str, Any]:
        """``{"params", "batch_stats"}`` of the average, as the model's ``apply`` takes them."""
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}

    def apply_gradients(self, grads: Any, **changes: Any) -> EMATrainState:
        """One optimiser update, then the debiased EMA of the new params and batch_stats."""
        new = super().apply_gradients(grads, **changes)
        keep = ema_keep(self.ema_decay, new.step)

        def ema(old: Any, now: Any) -> Any:
            return jax.tree.map(lambda a, b: (keep * a + (1.0 - keep) * b).astype(a.dtype),
                                old, now)

        return new.replace(ema_params=ema(self.ema_params, new.params),
                           ema_batch_stats=ema(self.ema_batch_stats, new.batch_stats))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    rng: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    steps_per_epoch: float | None = None,
) -> TrainState:
    """Initialise the model on a zero image of ``image_shape`` (H, W, C) and build the optimiser.

    ``steps_per_epoch`` converts epoch-valued LR boundaries to steps; ``config.ema_decay > 0``
    gives an :class:`EMATrainState`. Deterministic in ``rng``,
    so every process of a multi-host run builds the same state.
    """
    variables = models.init(model, rng, (1, *image_shape))
    tx = optim.create_optimizer(config, steps_per_epoch)
    params = variables["params"]
    fields = dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        apply_fn=model.apply,
        tx=tx,
    )
    decay = float(config.get("ema_decay", 0.0))
    if decay > 0:
        return EMATrainState(**fields, ema_params=params, ema_batch_stats=fields["batch_stats"],
                             ema_decay=decay)
    return TrainState(**fields)
