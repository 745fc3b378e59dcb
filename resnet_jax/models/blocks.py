"""Residual blocks and shortcuts of He et al. 2015 (§3.2, §3.3, Fig. 2 and Fig. 5).

A block is a small linen module with the constructor fields
``features, strides, shortcut, conv, norm, act`` and ``__call__(x) -> y``. ``conv`` and ``norm``
arrive as partials built once by the network (so ``norm`` already knows train vs eval mode and the
BN axis, and a fork swaps one argument); a research fork supplies its own class with the same
fields. ``shortcut`` selects the paper's variants:

* ``"A"``: identity; where the shape changes, a parameter-free stride-2 subsample with the new
  channels zero-padded (§3.3, option A).
* ``"B"``: identity; where the shape changes, a 1x1 projection + BN (§3.3, option B; Eqn. 2).
* ``"C"``: a 1x1 projection + BN on every block (§4.1, option C).
* ``"none"``: the plain network: the same layers without the addition (§3.3, "Plain Network").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.errors import ConfigError
from resnet_jax.ops.norm import norm_act

ModuleDef = Any
Array = Any

SHORTCUTS = ("A", "B", "C", "none")
STRIDE_IN = ("1x1", "3x3")


def pad_for(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric ``k // 2`` padding, as Caffe/PyTorch: a 7x7/2 conv maps 224 -> 112 the same way."""
    p = kernel // 2
    return ((p, p), (p, p))


def check_shortcut(shortcut: str) -> None:
    if shortcut not in SHORTCUTS:
        raise ConfigError(
            f"shortcut={shortcut!r} is not one of {SHORTCUTS}; use 'A', 'B', 'C' or 'none' (plain)."
        )


def subsample_and_pad(x: Array, features: int, strides: int) -> Array:
    """Option A: identity with stride-``strides`` subsampling and zero-padded new channels."""
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ConfigError(
            f"shortcut 'A' cannot shrink {x.shape[-1]} channels to {features}; "
            "use shortcut 'B' or 'C'."
        )
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x


class Shortcut(nn.Module):
    """The shortcut branch of one block: identity, option-A padding, or a 1x1 projection + BN."""

    features: int
    strides: int
    shortcut: str
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: Array) -> Array:
        reshape = self.strides != 1 or x.shape[-1] != self.features
        if self.shortcut == "C" or (self.shortcut == "B" and reshape):
            # Eqn. (2): y = F(x) + W_s x, a 1x1 convolution (with BN, as every conv in §3.4).
            x = self.conv(self.features, (1, 1), (self.strides, self.strides), name="conv")(x)
            return self.norm(name="bn")(x)
        if reshape:  # option A (and the no-parameter case of "B" never reaches here)
            return subsample_and_pad(x, self.features, self.strides)
        return x


def _merge(block: nn.Module, y: Array, x: Array, name: str) -> Array:
    """ReLU(BN(y) + shortcut(x)), or ReLU(BN(y)) for the plain network (§3.2: ReLU after the
    add), with the branch's last BN ``name``: one op where the norm fuses them (ops/norm.py)."""
    check_shortcut(block.shortcut)
    sc = None
    if block.shortcut != "none":
        sc = Shortcut(
            y.shape[-1], block.strides, block.shortcut, block.conv, block.norm, name="shortcut"
        )(x)
    return norm_act(_last_norm(block), block.act, y, name=name, residual=sc)


def _last_norm(block: nn.Module) -> Callable[..., nn.Module]:
    """The branch's last BN; scale starts at zero with ``zero_init_last_bn`` (not in the paper)."""
    if block.zero_init_last_bn:
        return functools.partial(block.norm, scale_init=nn.initializers.zeros)
    return block.norm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 5 left): conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    act: Callable[[Array], Array] = nn.relu
    zero_init_last_bn: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=pad_for(3), name="conv1")(x)
        y = norm_act(self.norm, self.act, y, name="bn1")
        y = self.conv(self.features, (3, 3), padding=pad_for(3), name="conv2")(y)
        return _merge(self, y, x, "bn2")


class BottleneckBlock(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (restore, 4x) (Fig. 5 right), BN after each conv.

    ``features`` is the bottleneck width (64 in conv2_x); the block outputs ``4 * features``.
    ``stride_in="1x1"`` puts the stride on the first 1x1 conv (the paper's, Caffe release);
    ``"3x3"`` on the 3x3 conv (ResNet v1.5, torchvision's layout).
    """

    features: int
    strides: int = 1
    shortcut: str = "B"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    act: Callable[[Array], Array] = nn.relu
    zero_init_last_bn: bool = False
    stride_in: str = "1x1"

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.stride_in not in STRIDE_IN:
            raise ConfigError(f"stride_in={self.stride_in!r} is not one of {STRIDE_IN}.")
        s = (self.strides, self.strides)
        s1, s3 = (s, (1, 1)) if self.stride_in == "1x1" else ((1, 1), s)
        y = self.conv(self.features, (1, 1), s1, name="conv1")(x)
        y = norm_act(self.norm, self.act, y, name="bn1")
        y = self.conv(self.features, (3, 3), s3, padding=pad_for(3), name="conv2")(y)
        y = norm_act(self.norm, self.act, y, name="bn2")
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        return _merge(self, y, x, "bn3")
