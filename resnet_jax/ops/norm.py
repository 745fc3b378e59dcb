"""Batch norm with a hand-written backward pass: a drop-in for ``flax.linen.BatchNorm``.

Same constructor fields as the ``functools.partial(nn.BatchNorm, use_running_average=...,
momentum=..., epsilon=..., dtype=..., param_dtype=..., axis_name=...)`` that ``ResNet`` builds,
same parameters (``scale``, ``bias``) and ``batch_stats`` (``mean``, ``var``), same function:
statistics in float32 with flax's fast variance (E[x^2] - E[x]^2, clipped at 0), running
statistics ``momentum * old + (1 - momentum) * batch`` (not updated at init), ``axis_name``
averaging both moments over devices with one ``lax.pmean``.

Training mode differentiates through a ``jax.custom_vjp`` whose backward is the closed form

    dx = scale * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)),
    dscale = sum(dy * xhat), dbias = sum(dy)

(means over the batch and, with ``axis_name``, over devices), instead of autodiff through the
mean, the variance and the normalisation, so XLA sees one reduction pass and one elementwise
pass. The returned batch statistics are not differentiable (their cotangents must be zero,
as in a train step where they are auxiliary outputs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = Any


def _moments(x: Array, axis_name: str | None, groups: Any) -> tuple[Array, Array]:
    """float32 (mean, var) over all axes but the last; with ``axis_name``, over devices too."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mu, mu2 = x.mean(axes), lax.square(x).mean(axes)
    if axis_name is not None:
        stacked = lax.pmean(jnp.stack([mu, mu2]), axis_name, axis_index_groups=groups)
        mu, mu2 = stacked[0], stacked[1]
    return mu, jnp.maximum(0.0, mu2 - lax.square(mu))


def _normalize(x, mean, var, scale, bias, epsilon, out_dtype):
    mul = lax.rsqrt(var + epsilon) * scale
    y = (x - mean) * mul + bias
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None, groups: Any, out_dtype: Any):
    """(y, batch mean, batch var) of training-mode batch norm over all axes but the last."""
    mean, var = _moments(x, axis_name, groups)
    return _normalize(x, mean, var, scale, bias, epsilon, out_dtype), mean, var


def _fwd(x, scale, bias, epsilon, axis_name, groups, out_dtype):
    x, scale, bias = x.value, scale.value, bias.value
    mean, var = _moments(x, axis_name, groups)
    y = _normalize(x, mean, var, scale, bias, epsilon, out_dtype)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale, bias)


def _bwd(epsilon, axis_name, groups, out_dtype, res, cts):
    x, mean, inv_std, scale, bias = res
    dy, dmean, dvar = cts
    if not (isinstance(dmean, SymbolicZero) and isinstance(dvar, SymbolicZero)):
        raise NotImplementedError(
            "resnet_jax.ops.norm.batch_norm_train: the batch statistics are not differentiable")
    axes = tuple(range(x.ndim - 1))
    if isinstance(dy, SymbolicZero):
        return (jnp.zeros_like(x), jnp.zeros_like(scale), jnp.zeros_like(bias))
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    g = dy.astype(f32)
    xhat = (x.astype(f32) - mean) * inv_std
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    n = x.size // x.shape[-1]
    mg, mgx = dbias / n, dscale / n
    if axis_name is not None:
        stacked = lax.pmean(jnp.stack([mg, mgx]), axis_name, axis_index_groups=groups)
        mg, mgx = stacked[0], stacked[1]
    dx = (scale * inv_std) * (g - mg - xhat * mgx)
    return (dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype))


batch_norm_train.defvjp(_fwd, _bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` over the last axis, with :func:`batch_norm_train` for training."""

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable[..., Array] = nn.initializers.zeros
    scale_init: Callable[..., Array] = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        if self.axis not in (-1, x.ndim - 1):
            raise ValueError(f"resnet_jax.ops.norm.BatchNorm normalises the last axis only "
                             f"(axis={self.axis}); use flax.linen.BatchNorm")
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        f32 = jnp.promote_types(self.param_dtype, jnp.float32)  # flax: stats promote params
        args = [x]
        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
            args.append(scale)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            args.append(bias)
        out_dtype = dtypes.canonicalize_dtype(*args, dtype=self.dtype)
        scale_v = jnp.ones(features, f32) if scale is None else scale
        bias_v = jnp.zeros(features, f32) if bias is None else bias

        if use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale_v, bias_v, self.epsilon,
                              out_dtype)
        initializing = self.is_initializing()
        axis_name = None if initializing else self.axis_name
        groups = self.axis_index_groups
        groups = None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)
        y, mean, var = batch_norm_train(x, scale_v, bias_v, self.epsilon, axis_name, groups,
                                        out_dtype)
        if not initializing:
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
