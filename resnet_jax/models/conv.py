"""The convolutions a model's ``nn.Conv`` runs, chosen once by ``conv_impl`` (config ``conv``).

``conv_function(impl)`` is the ``conv_general_dilated`` for ``nn.Conv``;
:func:`conv_general_dilated` here is the canonical-gradient XLA convolution the scanned blocks
use (``impl="xla"`` of :mod:`resnet_jax.ops.conv`: on CPU its gradients stay in the canonical
form XLA:CPU runs fast inside loops; on other platforms it lowers to XLA's standard convolution
and transposes). Both are primitives with JVP, transpose and batching rules, so every transform
composes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

from resnet_jax.errors import ConfigError
from resnet_jax.ops import conv as conv_ops

_DN = ("NHWC", "HWIO", "NHWC")

# Convolution implementations a model may select (``conv_impl``, the config's ``conv``).
CONV_IMPLS = conv_ops.IMPLS
# What a config may say (``conv``): an implementation, or "auto" (train.config.resolve_conv).
CONV_CHOICES = ("auto", *CONV_IMPLS)


def conv_function(impl: str) -> Any | None:
    """The ``conv_general_dilated`` for ``nn.Conv`` of ``impl``; None keeps Flax's (XLA's).

    "onednn" loads (building once) the optional extension and raises
    :class:`~resnet_jax.errors.ExtensionUnavailable`, naming the extra, where it cannot.
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}.")
    if impl == "xla":
        return None
    from resnet_jax.ops import onednn  # the optional extra: imported only when selected

    onednn.load()
    return onednn.conv_general_dilated


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

    Plain 2-D NHWC/HWIO convolutions take :func:`resnet_jax.ops.conv.conv` with ``impl="xla"``
    (canonical gradients on CPU for stride 1); any other configuration (dilation, groups,
    precision, mixed dtypes) is handed to ``lax.conv_general_dilated`` as given.
    """
    args = dict(
        window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
    )
    plain = (
        lhs.ndim == 4
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
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return conv_ops.conv(lhs, rhs, strides, tuple(padding), impl="xla")
