"""A stride-1 convolution whose gradients stay in XLA:CPU's fast canonical form inside loops.

Inside a ``while`` loop (``nn.scan`` over identical blocks) XLA:CPU does not rewrite the
backward convolutions into the canonical ``NHWC x HWIO -> NHWC`` form it runs through its fast
library kernels; the weight gradient then runs through a naive loop, about 60x slower (measured:
a 2-conv scan's gradient took 1.85 s against 55 ms unrolled; with this VJP, 32 ms). This VJP
writes both gradients as canonical convolutions itself and keeps XLA from folding the transposes
back into the convolution with ``optimization_barrier``. The forward pass is
``lax.conv_general_dilated`` unchanged, and the gradients equal autodiff's (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")

# Convolution implementations a model may select (``conv_impl``, the config's ``conv``).
CONV_IMPLS = ("xla", "onednn")


def conv_function(impl: str) -> Any | None:
    """The ``conv_general_dilated`` for ``nn.Conv`` of ``impl``; None keeps Flax's (XLA's).

    "onednn" loads (building once) the optional extension and raises
    :class:`~resnet_jax.errors.ExtensionUnavailable`, naming the extra, where it cannot.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}.")
    if impl == "xla":
        return None
    from resnet_jax.ops import onednn  # the optional extra: imported only when selected

    onednn.load()
    return onednn.conv_general_dilated


def _canonical_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return _canonical_conv(x, w, padding)


def _conv_fwd(x, w, padding):
    return _canonical_conv(x, w, padding), (x, w)


def _conv_bwd(padding, res, g):
    x, w = res
    kh, kw = w.shape[:2]
    # dx: the cotangent convolved with the flipped kernel, in/out channels swapped.
    w_t = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    back_pad = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    dx = _canonical_conv(g, w_t, back_pad)
    # dw: batch and channels swapped, so the reduction over the batch is the conv's "features".
    x_t, g_t = lax.optimization_barrier((x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3)))
    dw = _canonical_conv(x_t, g_t, padding).transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (``nn.Conv(conv_general_dilated=...)``).

    Plain 2-D NHWC/HWIO convolutions with stride 1 take the canonical-gradient path above; any
    other configuration is handed to ``lax.conv_general_dilated`` as given.
    """
    args = dict(
        window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
    )
    plain = (
        lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
    )
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, **args)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    return _conv(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding))
