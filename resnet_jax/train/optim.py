"""Optimiser and learning-rate schedules, all from optax.

The paper's recipe (§3.4, §4.2): SGD with momentum 0.9, weight decay 1e-4, learning rate 0.1
divided by 10 at fixed points (CIFAR: iterations 32k and 48k, stop at 64k; ImageNet: when the
error plateaus, here at configurable epochs). ResNet-110/1202 warm up at 0.01 for ~400
iterations (§4.2). Weight decay is applied with ``optax.add_decayed_weights`` before the SGD
transform, which for SGD is exactly an L2 term ``wd/2 * |w|^2`` in the loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("piecewise", "cosine", "constant")
WARMUPS = ("constant", "linear")
WEIGHT_DECAY_MASKS = ("kernels", "all")
LR_BOUNDARY_UNITS = ("steps", "epochs")


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``config.learning_rate``, times ``batch_size / 256`` if ``config.scale_lr_by_batch``."""
    lr = float(config.learning_rate)
    if config.scale_lr_by_batch:
        lr *= config.batch_size / 256
    return lr


def check_run_length(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` unless exactly one of ``num_train_steps`` and ``num_epochs`` is
    > 0: the run's length is given in one unit (the other is -1, "from the other field")."""
    steps, epochs = int(config.num_train_steps), float(config.num_epochs)
    if steps > 0 and epochs > 0:
        raise ConfigError(
            f"num_train_steps={steps} and num_epochs={epochs:g} both set the run's length; keep "
            f"one: --config.num_epochs=-1 to run {steps} steps, or --config.num_train_steps=-1 "
            f"to run {epochs:g} epochs.")
    if steps <= 0 and epochs <= 0:
        raise ConfigError(
            f"num_train_steps={steps} and num_epochs={epochs:g}: set one of them > 0, e.g. "
            "--config.num_train_steps=1000 or --config.num_epochs=3.")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: float | None) -> int:
    """The run's number of updates: ``num_train_steps``, or ``num_epochs`` worth of global
    batches (``round(num_epochs * steps_per_epoch)``, at least 1).

    The one place the length is resolved: the loop runs this many steps and every schedule
    (cosine's horizon) is defined over it. ``steps_per_epoch`` = dataset size / ``batch_size``.
    """
    check_run_length(config)
    if config.num_epochs > 0:
        if steps_per_epoch is None:
            raise ConfigError("num_epochs needs the dataset size (steps_per_epoch).")
        return max(1, round(float(config.num_epochs) * steps_per_epoch))
    return int(config.num_train_steps)


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: float | None) -> int:
    """Steps of warm-up: ``warmup_epochs * steps_per_epoch`` when that is set (Goyal et al. 2017:
    5 epochs, whatever the batch), else ``warmup_steps``."""
    if config.get("warmup_epochs", 0.0) > 0:
        if steps_per_epoch is None:
            raise ConfigError("warmup_epochs needs the dataset size (steps_per_epoch).")
        return round(float(config.warmup_epochs) * steps_per_epoch)
    return int(config.warmup_steps)


def schedule_horizon(config: ml_collections.ConfigDict, steps_per_epoch: float | None
                     ) -> int | None:
    """The total steps the LR values depend on: :func:`total_steps` for "cosine"; None for
    "piecewise" and "constant" (a longer or shorter run has the same LR at every step)."""
    return total_steps(config, steps_per_epoch) if config.schedule == "cosine" else None


def boundaries_in_steps(
    config: ml_collections.ConfigDict, steps_per_epoch: float | None
) -> tuple[int, ...]:
    """``config.lr_boundaries`` as step indices (epochs are converted with ``steps_per_epoch``)."""
    if config.lr_boundaries_unit == "steps":
        return tuple(int(b) for b in config.lr_boundaries)
    if steps_per_epoch is None:
        raise ConfigError("lr_boundaries_unit='epochs' needs the dataset size (steps_per_epoch).")
    return tuple(round(float(b) * steps_per_epoch) for b in config.lr_boundaries)


def piecewise_constant(
    base_lr: float, boundaries: tuple[int, ...], factor: float
) -> optax.Schedule:
    """``base_lr * factor**k`` where ``k`` is the number of boundaries ``<= step``.

    Values are computed in Python and stored as float32, so each one is exact
    (``0.1 * 0.1 == 0.01`` as float32), unlike a running float32 product.
    """
    # numpy, not jax arrays: a schedule built inside a jitted init (or under a transfer guard)
    # must hold no device value; they become constants of the step that calls it.
    values = np.asarray([base_lr * factor**k for k in range(len(boundaries) + 1)], np.float32)
    bounds = np.asarray(boundaries, np.int32).reshape(-1)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        return jnp.asarray(values)[jnp.sum(jnp.asarray(step) >= bounds)]

    return schedule


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: float | None = None
) -> optax.Schedule:
    """The schedule ``config`` names, with the optional warm-up in front of it.

    ``schedule``: "piecewise" (divide by ``1/lr_decay_factor`` at ``lr_boundaries``), "cosine"
    (from the end of warm-up to the run's :func:`total_steps`, the count the loop runs) or
    "constant". Warm-up (:func:`warmup_steps` > 0) replaces the first steps: "constant" holds
    ``warmup_lr`` (the paper's 0.01 for ResNet-110/1202, §4.2), "linear" ramps from
    ``warmup_lr`` to the main schedule's value at the end of warm-up. Steps count from 0; the
    LR at step ``s`` is the one used by the ``s``-th update. ``steps_per_epoch`` (dataset size
    / batch) converts what is given in epochs: the run's length, boundaries, warm-up.
    """
    lr = base_learning_rate(config)
    warmup = warmup_steps(config, steps_per_epoch)
    if config.schedule == "piecewise":
        main = piecewise_constant(
            lr, boundaries_in_steps(config, steps_per_epoch), float(config.lr_decay_factor)
        )
    elif config.schedule == "cosine":
        cosine = optax.cosine_decay_schedule(
            lr, max(1, total_steps(config, steps_per_epoch) - warmup))
        main = lambda step: cosine(jnp.asarray(step) - warmup)
    elif config.schedule == "constant":
        main = optax.constant_schedule(np.float32(lr))
    else:
        raise ConfigError(f"schedule={config.schedule!r} is not one of {SCHEDULES}.")
    if warmup <= 0:
        return main

    warmup_lr = float(config.warmup_lr)
    if config.warmup_type == "constant":
        warm = lambda step: jnp.full(jnp.shape(step), warmup_lr, jnp.float32)
    elif config.warmup_type == "linear":
        peak = main(warmup)
        warm = lambda step: warmup_lr + (peak - warmup_lr) * (jnp.asarray(step) / warmup)
    else:
        raise ConfigError(f"warmup_type={config.warmup_type!r} is not one of {WARMUPS}.")

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step)
        return jnp.where(step < warmup, warm(step), main(step)).astype(jnp.float32)

    return schedule


def weight_decay_mask(params: Any, which: str = "kernels") -> Any:
    """A bool tree over ``params``: True where weight decay applies.

    "kernels": conv and dense kernels only (leaves named ``kernel``); BN scale/bias and the
    classifier bias are not decayed. "all": every parameter (Caffe's default, as in the paper).
    """
    if which == "all":
        return jax.tree.map(lambda _: True, params)
    if which == "kernels":
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params
        )
    raise ConfigError(f"weight_decay_mask={which!r} is not one of {WEIGHT_DECAY_MASKS}.")


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: float | None = None
) -> optax.GradientTransformation:
    """Weight decay (masked) then SGD with momentum (the paper's), or LARS
    (``config.optimizer="lars"``); the LR is readable from the state.

    The update is wrapped in ``optax.inject_hyperparams`` so the learning rate of the last
    update can be read back with :func:`current_learning_rate`.
    """
    tx = _optimizer(config, create_learning_rate_schedule(config, steps_per_epoch))
    if config.get("dtype") == "float16":  # float16 needs loss scaling; bfloat16 does not
        return dynamic_loss_scale(tx)
    return tx


def _optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
               ) -> optax.GradientTransformation:
    optimizer = config.get("optimizer", "sgd")
    if optimizer == "lars":
        # You, Gitman and Ginsburg 2017 (LARS): per-layer trust ratio ||w|| / ||g + wd w||;
        # like weight decay, it applies to conv/dense kernels only under the default mask.
        which = config.weight_decay_mask
        mask = lambda params: weight_decay_mask(params, which)
        return optax.inject_hyperparams(
            optax.lars, static_args=("nesterov", "weight_decay_mask", "trust_ratio_mask"))(
            learning_rate=schedule, weight_decay=float(config.weight_decay),
            weight_decay_mask=mask, trust_ratio_mask=mask,
            trust_coefficient=float(config.get("lars_trust_coefficient", 0.001)),
            momentum=float(config.momentum), nesterov=bool(config.nesterov))
    if optimizer != "sgd":
        raise ConfigError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}; "
                          "e.g. --config.optimizer=sgd.")
    sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(
        learning_rate=schedule,
        momentum=float(config.momentum) if config.momentum else None,
        nesterov=bool(config.nesterov),
    )
    mask = config.weight_decay_mask
    return optax.chain(
        optax.add_decayed_weights(
            float(config.weight_decay), mask=lambda params: weight_decay_mask(params, mask)
        ),
        sgd,
    )


class LossScaleState(NamedTuple):
    """:func:`dynamic_loss_scale`'s state: the wrapped optimiser's, the current scale and the
    number of finite steps since it last changed."""

    inner: optax.OptState
    loss_scale: jax.Array
    good_steps: jax.Array


def dynamic_loss_scale(inner: optax.GradientTransformation, *, initial: float = 2.0**15,
                       growth_interval: int = 2000, factor: float = 2.0
                       ) -> optax.GradientTransformation:
    """float16 training (Micikevicius et al. 2018): the step multiplies the loss by
    :func:`current_loss_scale` and divides the gradients by it; this wrapper skips the update
    when a gradient is not finite and halves the scale, and doubles it after ``growth_interval``
    finite steps in a row.

    A skipped update leaves the parameters and what the gradients feed (momentum) unchanged, but
    the step counters still advance (:func:`_skipped`), so the schedule stays on
    ``TrainState.step``: the LR of update ``k`` is ``schedule(k)`` whatever was skipped before.
    """

    def init(params: Any) -> LossScaleState:
        return LossScaleState(inner.init(params), jnp.float32(initial), jnp.int32(0))

    def update(grads: Any, state: LossScaleState, params: Any = None) -> tuple[Any, Any]:
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, new_inner = inner.update(safe, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(finite, jnp.where(grow, state.loss_scale * factor, state.loss_scale),
                          jnp.maximum(state.loss_scale / factor, 1.0))
        return updates, LossScaleState(_skipped(finite, new_inner, state.inner),
                                       scale.astype(jnp.float32),
                                       jnp.where(grow, 0, good).astype(jnp.int32))

    return optax.GradientTransformation(init, update)


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _skipped(finite: jax.Array, new: Any, old: Any) -> Any:
    """The optimiser state after an update that is skipped unless ``finite``: integer leaves
    (step counts) and ``optax.inject_hyperparams``' count, schedule states and LR are ``new``
    always; the other leaves (momentum, ...) are ``new`` only when ``finite``, else ``old``."""

    def pick(a: Any, b: Any) -> Any:
        if isinstance(a, _INJECT_STATES):  # everything but inner_state follows the step count
            return a._replace(inner_state=_skipped(finite, a.inner_state, b.inner_state))
        if jnp.issubdtype(jnp.result_type(a), jnp.integer):
            return a
        return jnp.where(finite, a, b)

    return jax.tree.map(pick, new, old, is_leaf=lambda x: isinstance(x, _INJECT_STATES))


def current_loss_scale(opt_state: optax.OptState) -> jax.Array | None:
    """The loss scale of a :func:`dynamic_loss_scale` optimiser state, else None."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LossScaleState)):
        if isinstance(node, LossScaleState):
            return node.loss_scale
    return None


def current_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate the last update used (from :func:`create_optimizer`'s state)."""
    return optax.tree_utils.tree_get(
        opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array)
    )
