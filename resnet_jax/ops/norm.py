"""Batch norm as one ``jax.custom_jvp``: a drop-in for ``flax.linen.BatchNorm`` that composes.

Same constructor fields as ``flax.linen.BatchNorm``, same parameters (``scale``, ``bias``) and
``batch_stats`` (``mean``, ``var``), same function: statistics in float32 with flax's fast
variance (E[x^2] - E[x]^2, clipped at 0), running statistics ``momentum * old +
(1 - momentum) * batch`` (not updated at init), ``axis_name`` averaging both moments over
devices with one ``lax.pmean``. One field more, ``batch_groups``: "ghost" batch norm, the batch
split into that many equal groups with their own statistics (§3.4: the paper's BN batches are
the per-GPU slices of the minibatch), the running statistics averaged over the groups.

Training mode is :func:`batch_norm_train`, a ``jax.custom_jvp`` whose tangent rule is the
closed form (means over the group's batch and, with ``axis_name``, over devices)

    dy = scale * inv_std * (dx - mean(dx) - xhat * mean(dx * xhat)) + dscale * xhat + dbias

written so that its transpose (what ``grad`` runs) is the classic backward: two per-channel
reductions, ``sum(g)`` and ``sum(g * xhat)``, shared with ``dbias`` and ``dscale``, and one
elementwise pass for ``dx``. Being a JVP in plain ``lax`` ops, it composes with every transform:
``jvp``, ``linearize``, ``jacfwd``, ``hessian``, grad-of-grad, ``vmap`` of grad. The batch
statistics are differentiable too (``dmean = mean(dx)``, ``dvar = 2 mean((x - mean) dx)``,
0 where the variance is clipped).
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

from resnet_jax.errors import ConfigError
from resnet_jax.ops import norm_prims

Array = Any


def _split(x: Array, groups: int) -> tuple[Array, tuple[int, ...]]:
    """``x`` as (groups, N / groups, ...) (unchanged for one group) and its reduction axes."""
    if groups > 1:
        x = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        return x, tuple(range(1, x.ndim - 1))
    return x, tuple(range(x.ndim - 1))


def _pmean2(a: Array, b: Array, axis_name: str | None, axis_index_groups: Any):
    """``a``, ``b`` averaged over ``axis_name`` with one collective (as they are without)."""
    if axis_name is None:
        return a, b
    stacked = lax.pmean(jnp.stack([a, b]), axis_name, axis_index_groups=axis_index_groups)
    return stacked[0], stacked[1]


def _per_channel(s: Array, groups: int) -> Array:
    """(C,) from keepdims statistics of shape (groups, 1, ..., 1, C): the mean over groups."""
    s = s.reshape(groups, s.shape[-1]) if groups > 1 else s.reshape(s.shape[-1])
    return s.mean(0) if groups > 1 else s


def _stats(xf, axes, epsilon, axis_name, axis_index_groups):
    mean, mean2 = _pmean2(xf.mean(axes, keepdims=True), lax.square(xf).mean(axes, keepdims=True),
                          axis_name, axis_index_groups)
    return (mean, *norm_prims.variance(mean, mean2, epsilon))


def _merge_act(y, residual, relu, out_dtype):
    """BN's output (``out_dtype``) plus the residual, then ReLU: what a block does after it."""
    if residual is not None:
        y = y + residual.astype(out_dtype)
    return jnp.maximum(y, 0).astype(out_dtype) if relu else y


def _primal(x, scale, bias, residual, epsilon, axis_name, axis_index_groups, out_dtype, groups,
            relu):
    xg, axes = _split(x, groups)
    xf = xg.astype(jnp.promote_types(xg.dtype, jnp.float32))
    mean, var, raw_var, inv_std = _stats(xf, axes, epsilon, axis_name, axis_index_groups)
    y = _normalize(xg, mean, var, scale, bias, epsilon, out_dtype).reshape(x.shape)
    return _merge_act(y, residual, relu, out_dtype), mean, var, raw_var, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _bn_act(x, scale, bias, residual, epsilon, axis_name, axis_index_groups, out_dtype, groups,
            relu):
    y, mean, var, _, _ = _primal(x, scale, bias, residual, epsilon, axis_name,
                                 axis_index_groups, out_dtype, groups, relu)
    return y, _per_channel(mean, groups), _per_channel(var, groups)


def _tangent(x, y, mean, raw_var, inv_std, scale, dx, dscale, dbias, dresidual, *, axis_name,
             axis_index_groups, groups, relu):
    """The JVP's tangent from what the forward keeps anyway: the input ``x``, the output ``y``
    (the ReLU mask is ``y > 0``, as PyTorch's in-place ReLU) and per-channel statistics."""
    xg, axes = _split(x, groups)
    xf = xg.astype(jnp.promote_types(xg.dtype, jnp.float32))
    xhat = (xf - mean) * inv_std
    a = inv_std * scale
    dxg = _split(dx, groups)[0].astype(xf.dtype)
    d_mean, d_corr = _pmean2(dxg.mean(axes, keepdims=True),
                             (xhat * dxg).mean(axes, keepdims=True), axis_name, axis_index_groups)
    # Grouped so the transpose reduces the cotangent g only as sum(g) and sum(xhat * g), each
    # shared by the dx term and dbias / dscale; the Jacobian in x is self-adjoint per channel.
    dy = a * dxg + xhat * (dscale - a * d_corr) + (dbias - a * d_mean)
    dy = dy.astype(y.dtype).reshape(x.shape)
    if dresidual is not None:
        dy = dy + dresidual.astype(y.dtype)
    if relu:
        dy = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    d_var = jnp.where(raw_var > 0, 2.0 * d_corr / inv_std, 0.0)  # 2 mean((x - mean) dx)
    return dy, _per_channel(d_mean, groups), _per_channel(d_var, groups)


@_bn_act.defjvp
def _bn_act_jvp(epsilon, axis_name, axis_index_groups, out_dtype, groups, relu, primals,
                tangents):
    x, scale, bias, residual = primals
    dx, dscale, dbias, dresidual = tangents
    y, mean, var, raw_var, inv_std = _primal(x, scale, bias, residual, epsilon, axis_name,
                                             axis_index_groups, out_dtype, groups, relu)
    dy, d_mean, d_var = _tangent(x, y, mean, raw_var, inv_std, scale, dx, dscale, dbias,
                                 dresidual, axis_name=axis_name,
                                 axis_index_groups=axis_index_groups, groups=groups, relu=relu)
    return (y, _per_channel(mean, groups), _per_channel(var, groups)), (dy, d_mean, d_var)


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None, axis_index_groups: Any, out_dtype: Any,
                     groups: int = 1, *, residual: Array | None = None,
                     relu: bool = False) -> tuple[Array, Array, Array]:
    """(y, batch mean, batch var) of training-mode batch norm over all axes but the last.

    ``groups > 1``: the leading (batch) axis is split into that many equal groups, each
    normalised with its own statistics; the returned (C,) mean and var are averaged over groups.
    ``residual`` (x's shape) is added to the normalised output and ``relu`` applies ReLU after
    that: a block's ``relu(bn(x) + shortcut)`` (§3.2) as one differentiable op.
    """
    return _bn_act(x, scale, bias, residual, epsilon, axis_name, axis_index_groups, out_dtype,
                   groups, relu)


def _normalize(x, mean, var, scale, bias, epsilon, out_dtype):
    mul = lax.rsqrt(var + epsilon) * scale
    y = (x - mean) * mul + bias
    return y.astype(out_dtype)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` (a subclass: same fields, variables and ``isinstance``) over the
    last axis, :func:`batch_norm_train` for training.

    ``batch_groups``: ghost batch norm, statistics per group of ``N / batch_groups`` examples
    (a ``ConfigError`` when the batch does not split), running statistics averaged over groups.

    ``act`` (default None: none) and ``__call__(x, residual=r)``: ``act(bn(x) + r)`` in one op,
    what a block does after its BN (§3.2: ReLU after the addition). With ``act=nn.relu`` the
    ReLU is part of the op's JVP (its mask read from the output, as PyTorch's in-place ReLU),
    so the gradient keeps no pre-activation tensor; any other ``act`` is applied after.
    """

    batch_groups: int = 1
    act: Callable[[Array], Array] | None = None
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, residual: Array | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        if mask is not None:
            raise ConfigError("resnet_jax.ops.norm.BatchNorm takes no mask; call "
                              "flax.linen.BatchNorm for masked statistics")
        if self.axis not in (-1, x.ndim - 1):
            raise ConfigError(f"resnet_jax.ops.norm.BatchNorm normalises the last axis only "
                              f"(axis={self.axis}); use flax.linen.BatchNorm")
        if not (self.use_fast_variance and self.force_float32_reductions):
            raise ConfigError("resnet_jax.ops.norm.BatchNorm computes flax's fast float32 "
                              "statistics only; drop use_fast_variance/force_float32_reductions")
        groups = int(self.batch_groups)
        if groups < 1 or (groups > 1 and (x.ndim < 2 or x.shape[0] % groups)):
            raise ConfigError(f"a BN batch of {x.shape[0] if x.ndim else 0} examples does not "
                              f"split into bn_groups={groups}; make the batch a multiple of it")
        if groups > 1 and self.axis_name is not None:
            raise ConfigError(f"bn_groups={groups} with axis_name={self.axis_name!r}: per-group "
                              "statistics are not synced; use one of them (bn_sync=False)")
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

        if residual is not None and residual.shape != x.shape:
            raise ConfigError(f"BatchNorm residual of shape {residual.shape} does not match its "
                              f"input {x.shape}; project or pad the shortcut to the same shape")
        relu = self.act is jax.nn.relu
        act = None if relu else self.act
        if use_running_average:
            y = _normalize(x, ra_mean.value, ra_var.value, scale_v, bias_v, self.epsilon,
                           out_dtype)
            y = _merge_act(y, residual, relu, out_dtype)
            return y if act is None else act(y)
        initializing = self.is_initializing()
        axis_name = None if initializing else self.axis_name
        aig = self.axis_index_groups
        aig = None if aig is None else tuple(tuple(int(i) for i in g) for g in aig)
        if self.impl != "xla" and groups == 1 and x.dtype == out_dtype == jnp.float32 and (
                residual is None or residual.dtype == jnp.float32):
            # the CPU fast path (``impl="onednn"``): fused reduction kernels (ops/norm_prims.py)
            y, mean, var = norm_prims.bn_act(x, scale_v, bias_v, residual, self.epsilon,
                                             axis_name, aig, relu, self.impl)
        else:
            y, mean, var = batch_norm_train(x, scale_v, bias_v, self.epsilon, axis_name, aig,
                                            out_dtype, groups, residual=residual, relu=relu)
        if not initializing:
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y if act is None else act(y)


_FUSING = BatchNorm  # this class, even where a test patches the module's name


def norm_act(norm: Callable[..., nn.Module], act: Callable[[Array], Array], x: Array, *,
             name: str, residual: Array | None = None) -> Array:
    """``act(norm(x) + residual)`` for a block: one fused op where ``norm`` builds this module's
    :class:`BatchNorm` (a class or ``functools.partial`` of it), else the three steps as written
    (a fork's own norm: ``flax.linen.BatchNorm``, a LayerNorm ...). Same variables either way."""
    cls = getattr(norm, "func", norm)
    if isinstance(cls, type) and issubclass(cls, _FUSING):
        return norm(name=name, act=act)(x, residual=residual)
    y = norm(name=name)(x)
    if residual is not None:
        y = y + residual.astype(y.dtype)
    return act(y)

