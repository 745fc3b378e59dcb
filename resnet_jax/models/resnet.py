"""The ResNet and plain networks of He et al. 2015, CIFAR (§4.2) and ImageNet (Table 1) families.

Parameter layout (what checkpoints and weight converters see)::

    stem/conv/kernel, stem/bn/{scale,bias}
    stage{k}/block0/{conv1,bn1,conv2,bn2[,conv3,bn3][,shortcut/{conv,bn}]}/...
    stage{k}/block{i}/...            i = 1 .. n-1, when scan_blocks=False
    stage{k}/blocks/...              blocks 1 .. n-1 stacked on a leading axis of size n-1,
                                     when scan_blocks=True
    fc/{kernel,bias}                 (a custom ``head``: head/...)

The seams a fork swaps (module classes; in a config, import paths such as
``"my_pkg.blocks:SEBlock"``, resolved by ``models.create``):

* ``block_cls``: fields ``features, strides, shortcut, conv, norm, act`` (+ ``zero_init_last_bn``,
  ``stride_in`` where declared) and ``__call__(x)``; see ``models/blocks.py``.
* ``stem``: "cifar" | "imagenet" (:class:`Stem`), or a module class constructed with those of
  ``features, conv, norm, act, dtype, param_dtype`` it declares, ``__call__(x)``.
* ``head``: None (global average pooling + ``fc``, the paper's), or a module class constructed
  with those of ``num_classes, conv, norm, act, dtype, param_dtype`` it declares,
  ``__call__(x) -> logits``.

Block 0 of a stage may change the shape (stride 2, more channels); blocks 1..n-1 are identical, so
``scan_blocks=True`` runs them with one ``nn.scan`` and compile time grows with the number of
stages, not blocks (ResNet-1202 has 200 blocks per stage). ``batch_stats`` follow the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.errors import ConfigError
from resnet_jax.models.blocks import (
    BasicBlock,
    BottleneckBlock,
    ModuleDef,
    check_shortcut,
    pad_for,
)
from resnet_jax.models.conv import conv_function
from resnet_jax.models.conv import conv_general_dilated as canonical_grad_conv
from resnet_jax.ops import norm as fast_norm
from resnet_jax.ops import pool as fast_pool
from resnet_jax.ops.norm import norm_act

Array = Any

STEMS = ("cifar", "imagenet")

# The paper's [13] (He et al., "Delving deep into rectifiers"): N(0, 2/n), n = k*k*c_in, as the
# "msra" filler of the released Caffe models. Untruncated, unlike jax.nn.initializers.he_normal.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _block_field_names(block_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(block_cls)} if dataclasses.is_dataclass(
        block_cls
    ) else set()


def _declared(cls: type, offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``cls`` has a field for."""
    fields = _block_field_names(cls)
    return {k: v for k, v in offered.items() if k in fields}


class Stem(nn.Module):
    """CIFAR: 3x3 conv, 16 filters (§4.2). ImageNet: 7x7/2 conv, 64 filters, 3x3/2 max pool."""

    kind: str
    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    pool: Callable[..., Array] = nn.max_pool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.kind == "cifar":
            x = self.conv(self.features, (3, 3), padding=pad_for(3), name="conv")(x)
            return norm_act(self.norm, self.act, x, name="bn")
        x = self.conv(self.features, (7, 7), (2, 2), padding=pad_for(7), name="conv")(x)
        x = norm_act(self.norm, self.act, x, name="bn")
        return self.pool(x, (3, 3), strides=(2, 2), padding=pad_for(3))


class Stage(nn.Module):
    """``num_blocks`` blocks; the first may downsample, the rest are identical (maybe scanned)."""

    block: ModuleDef  # a partial of the block class with everything but features/strides bound
    num_blocks: int
    features: int
    strides: int
    scan_blocks: bool
    scan_block: ModuleDef | None = None  # the block used inside the scan (default: ``block``)
    unroll: bool = False  # emit the scanned blocks as straight-line code (same parameters)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.block(features=self.features, strides=self.strides, name="block0")(x)
        rest = self.num_blocks - 1
        if rest <= 0:
            return x
        if not self.scan_blocks:
            for i in range(1, self.num_blocks):
                x = self.block(features=self.features, strides=1, name=f"block{i}")(x)
            return x

        def body(block: nn.Module, carry: Array, _: None) -> tuple[Array, None]:
            return block(carry), None

        scanned = nn.scan(
            body,
            variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
            split_rngs={True: True},  # every RNG stream (params, dropout, stochastic depth)
            length=rest,
            unroll=rest if self.unroll else 1,
        )
        block = self.scan_block or self.block
        x, _ = scanned(block(features=self.features, strides=1, name="blocks"), x, None)
        return x


class ResNet(nn.Module):
    """A residual (or, with ``shortcut="none"``, plain) network.

    Stage ``k`` (0-based) has ``stage_sizes[k]`` blocks of width ``width * 2**k`` (times the
    block's ``expansion``); every stage after the first starts with a stride-2 block.
    ``__call__(x, train, bn_axis_name=None, bn_groups=1)``: with ``bn_axis_name`` BN statistics
    are averaged over that named axis (synced BN under ``pmap``); ``bn_groups > 1`` splits the
    batch into that many "ghost" BN batches with their own statistics (§3.4: the paper's BN
    batches are per-GPU slices). The module itself holds no axis name and no group count; every
    block gets ``resnet_jax.ops.norm.BatchNorm`` (equal to ``flax.linen.BatchNorm``, same
    variables) whichever ``conv_impl`` runs.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef = BasicBlock
    stem: str | ModuleDef = "cifar"
    width: int = 16
    num_classes: int = 10
    shortcut: str = "A"
    stride_in: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_last_bn: bool = False
    act: Callable[[Array], Array] = nn.relu
    kernel_init: Callable[..., Array] = he_normal
    scan_blocks: bool = False
    return_features: bool = False
    head: ModuleDef | None = None
    # "xla" (jax's convolution) | "onednn" (resnet_jax.ops.onednn, the [onednn] extra: oneDNN
    # kernels on CPU, XLA's convolution on GPU/TPU). Changes the speed, not the function.
    conv_impl: str = "xla"

    def validate(self) -> None:
        """Raise a one-line ``ConfigError`` for any invalid field combination."""
        check_shortcut(self.shortcut)
        if isinstance(self.stem, str) and self.stem not in STEMS:
            raise ConfigError(f"stem={self.stem!r} is not one of {STEMS} (or a module class, "
                              "or its import path 'my_pkg.stems:MyStem').")
        for field in ("block_cls", "stem", "head"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str) and not callable(value):
                raise ConfigError(f"{field}={value!r} is not a module class.")
        if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
            raise ConfigError(f"stage_sizes={tuple(self.stage_sizes)} needs >= 1 block per stage.")
        if self.width < 1 or self.num_classes < 1:
            raise ConfigError(
                f"width={self.width} and num_classes={self.num_classes} must be positive."
            )
        self._block_extras()
        conv_function(self.conv_impl)

    def _block_extras(self) -> dict[str, Any]:
        """Fields beyond the block contract, passed only where the block class declares them."""
        fields = _block_field_names(self.block_cls)
        extras: dict[str, Any] = {}
        wanted = {"zero_init_last_bn": (self.zero_init_last_bn, False),
                  "stride_in": (self.stride_in, None)}
        for name, (value, default) in wanted.items():
            if name in fields:
                if value is not None:
                    extras[name] = value
            elif value != default:
                raise ConfigError(
                    f"{name}={value!r} is set but block {self.block_cls.__name__} has no field "
                    f"{name!r}; drop the override or add the field to the block."
                )
        return extras

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, bn_axis_name: str | None = None,
        bn_groups: int = 1,
    ) -> Array | tuple[Array, dict[str, Array]]:
        self.validate()
        conv_fn = conv_function(self.conv_impl)
        conv = functools.partial(
            nn.Conv,
            use_bias=False,  # BN follows every conv (§3.4), so a bias is redundant
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **({} if conv_fn is None else {"conv_general_dilated": conv_fn}),
        )
        # conv_impl="onednn" is the CPU fast path: oneDNN convolutions, a max pool with a cheap
        # backward and the scanned blocks emitted as straight-line code; the same function and
        # parameters (tests/test_onednn.py). Every conv_impl gets the same norm class, ops.norm's
        # (flax's BatchNorm with a closed-form JVP and ghost groups), so a fork's self.norm is one.
        fast = self.conv_impl == "onednn"
        norm = functools.partial(
            fast_norm.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=bn_axis_name,
            batch_groups=bn_groups,
            impl=self.conv_impl,  # "onednn": BN's reductions on the fused kernels too
        )
        block = functools.partial(
            self.block_cls,
            shortcut=self.shortcut,
            conv=conv,
            norm=norm,
            act=self.act,
            **self._block_extras(),
        )
        scan_block = None
        if self.scan_blocks and conv_fn is None:
            # conv_impl="xla": XLA:CPU runs conv gradients inside loops ~60x slower unless kept
            # canonical (models/conv.py); elsewhere this primitive lowers to XLA's standard.
            scan_conv = functools.partial(conv, conv_general_dilated=canonical_grad_conv)
            scan_block = functools.partial(block, conv=scan_conv)
        x = jnp.asarray(x, self.dtype)
        features: dict[str, Array] = {}
        parts = dict(conv=conv, norm=norm, act=self.act, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        if isinstance(self.stem, str):
            x = Stem(self.stem, self.width, conv, norm, self.act,
                     functools.partial(fast_pool.flax_max_pool, impl="onednn") if fast
                     else nn.max_pool, name="stem")(x)
        else:
            x = self.stem(**_declared(self.stem, {"features": self.width, **parts}),
                          name="stem")(x)
        for k, n in enumerate(self.stage_sizes):
            x = Stage(
                block,
                int(n),
                self.width * 2**k,
                1 if k == 0 else 2,
                self.scan_blocks,
                scan_block,
                unroll=fast,
                name=f"stage{k + 1}",
            )(x)
            features[f"stage{k + 1}"] = x
        if self.head is None:
            x = jnp.mean(x, axis=(1, 2))  # global average pooling
            x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="fc")(x)
        else:
            x = self.head(**_declared(self.head, {"num_classes": self.num_classes, **parts}),
                          name="head")(x)
        logits = jnp.asarray(x, jnp.float32)
        if self.return_features:
            return logits, features
        return logits


def cifar_stage_sizes(depth: int) -> tuple[int, int, int]:
    """§4.2: depth = 6n + 2 -> three stages of n basic blocks."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"CIFAR depth {depth} is not 6n+2 with n >= 1; use 8, 14, 20, 32, 44, 56, 110, ..."
        )
    n = (depth - 2) // 6
    return (n, n, n)


# Table 1: blocks per stage and block type for the ImageNet depths.
IMAGENET_STAGES: dict[int, tuple[tuple[int, ...], ModuleDef]] = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
}
