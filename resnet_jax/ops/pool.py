"""NHWC max pooling with a cheap backward pass: a drop-in for ``flax.linen.max_pool``.

XLA:CPU differentiates ``reduce_window`` max into a select-and-scatter that is the slowest op
of a ResNet-50 CPU step after the convolutions (~10 % of it). Here the max pool is a
``jax.custom_jvp``: the forward pass also records which of the k*k window positions won (an
int8 code; the first maximum in row-major window order wins, as XLA's), and the tangent is the
input tangent gathered at the winners: ``select_n(code, *k*k strided views of the zero-padded
tangent)``. That tangent is linear in plain ``lax`` ops, so every transform composes (jvp,
linearize, jacfwd, hessian, grad-of-grad, vmap), and its transpose, what ``grad`` runs, places
the cotangent with k*k strided pads from the int8 code: 0.43x the time of XLA's forward +
backward on the ImageNet stem's 112x112x64 maps, same values and gradients (ties included;
tests/test_pool.py). Used by ``conv_impl="onednn"`` (the CPU fast path).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.errors import ConfigError

Pads = tuple[tuple[int, int], tuple[int, int]]


def _windows(x: jax.Array, k: int, s: int, pads: Pads, fill: float = -jnp.inf) -> list[jax.Array]:
    """The k*k strided views of the (``fill``) padded input, in row-major window order."""
    (pt, pb), (pl, pr) = pads
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    h, w = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    return [lax.slice(xp, (0, di, dj, 0),
                      (xp.shape[0], di + (h - 1) * s + 1, dj + (w - 1) * s + 1, xp.shape[3]),
                      (1, s, s, 1))
            for di in range(k) for dj in range(k)]


def _winners(views: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(max, int8 code of the first position attaining it) over the window views."""
    y, code = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for n, v in enumerate(views[1:], 1):
        code = jnp.where(v > y, jnp.int8(n), code)  # strictly greater: the first maximum wins
        y = jnp.maximum(y, v)
    return y, code


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, k: int, s: int, pads: Pads) -> jax.Array:
    """k x k max pool with stride s and explicit padding over the H, W axes of NHWC ``x``."""
    return functools.reduce(jnp.maximum, _windows(x, k, s, pads))


@max_pool.defjvp
def _jvp(k, s, pads, primals, tangents):
    (x,), (t,) = primals, tangents
    code = _winners(_windows(x, k, s, pads))[1]  # its max is y's: XLA computes the chain once
    # y through max_pool itself, so a transform of this rule (forward-over-reverse, jvp of
    # jvp) differentiates y by this rule too, not by jnp.maximum's tie-splitting one.
    y = max_pool(x, k, s, pads)
    # The tangent at each window's winner; zero padding (a padded position never wins over a
    # real one, as every window holds one). Transposed: k*k strided pads of the cotangent.
    t_views = _windows(t, k, s, pads, fill=0)
    return y, lax.select_n(code, *t_views)


def flax_max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
                  padding: Sequence[tuple[int, int]] | str = "VALID") -> jax.Array:
    """``flax.linen.max_pool``'s signature for square 2-D windows and strides on NHWC input."""
    strides = tuple(strides or (1, 1))
    if (x.ndim != 4 or len(window_shape) != 2 or window_shape[0] != window_shape[1]
            or strides[0] != strides[1] or window_shape[0] ** 2 > 127):
        raise ConfigError(f"resnet_jax.ops.pool.max_pool takes NHWC input with a square window "
                          f"and stride (got {x.shape}, {tuple(window_shape)}, {strides}); use "
                          "flax.linen.max_pool")
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return max_pool(x, int(window_shape[0]), int(strides[0]), pads)
