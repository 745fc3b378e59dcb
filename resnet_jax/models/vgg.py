"""VGG-19 (Simonyan & Zisserman 2015, configuration E), the paper's baseline for cost (§3.3).

He et al. compare against it in Fig. 3 and §3.3: "VGG-19 ... 19.6 billion FLOPs" (multiply-adds)
at 224x224, while ResNet-34 has 3.6 billion (18%). Sixteen 3x3 convolutions with biases and ReLU
in five blocks, each followed by a 2x2/2 max pool, then fc 4096 - 4096 - ``num_classes``.
No dropout (the original uses 0.5 on fc6/fc7); ``use_bn=True`` puts BN after every conv.

Parameter layout: ``block{b}_conv{i}/{kernel,bias}`` (``block{b}_bn{i}``), ``fc6``, ``fc7``,
``fc8``: one top-level part per weight layer, so ``summary`` lists all 19. Same contract
as :class:`~resnet_jax.models.ResNet`: ``init(rng, x, train=False)``, ``apply(..., train=True,
mutable=["batch_stats"], bn_axis_name=None, bn_groups=1)``; ``batch_stats`` exist only with
``use_bn`` (``resnet_jax.ops.norm.BatchNorm``, as ResNet's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.errors import ConfigError
from resnet_jax.models.conv import conv_function
from resnet_jax.ops.norm import BatchNorm

Array = Any

# Configuration E: convolutions per block; block b has 64 * 2**(b-1) filters (512 at most).
VGG19_BLOCKS = (2, 2, 4, 4, 4)


class VGG(nn.Module):
    """A VGG network: ``blocks[b]`` 3x3 convs per block, max pool after each block, three fc."""

    blocks: Sequence[int] = VGG19_BLOCKS
    width: int = 64  # filters of the first block (the original: 64)
    fc_features: int = 4096
    num_classes: int = 1000
    use_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    act: Callable[[Array], Array] = nn.relu
    kernel_init: Callable[..., Array] = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    default_image_size: int = 224  # for ``summary.summarize`` (and its 19.6 G check)
    return_features: bool = False
    conv_impl: str = "xla"  # "xla" | "onednn", as ResNet's

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, bn_axis_name: str | None = None,
        bn_groups: int = 1,
    ) -> Array | tuple[Array, dict[str, Array]]:
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        conv_fn = conv_function(self.conv_impl)
        conv_args = {} if conv_fn is None else {"conv_general_dilated": conv_fn}
        x = jnp.asarray(x, dtype)
        features: dict[str, Array] = {}
        for b, n in enumerate(self.blocks):
            block = f"block{b + 1}"
            feats = min(self.width * 2**b, self.width * 8)
            for i in range(n):
                x = nn.Conv(
                    feats, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                    kernel_init=self.kernel_init, dtype=dtype, param_dtype=param_dtype,
                    name=f"{block}_conv{i + 1}", **conv_args,
                )(x)
                if self.use_bn:
                    x = BatchNorm(
                        use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                        axis_name=bn_axis_name, batch_groups=bn_groups,
                        name=f"{block}_bn{i + 1}",
                    )(x)
                x = self.act(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            features[block] = x
        x = x.reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            x = self.act(nn.Dense(self.fc_features, dtype=dtype, param_dtype=param_dtype,
                                  name=name)(x))
        x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=param_dtype, name="fc8")(x)
        logits = jnp.asarray(x, jnp.float32)
        if self.return_features:
            return logits, features
        return logits


def vgg19(**overrides: Any) -> VGG:
    """VGG-19 (configuration E), dropout-free, BN off unless ``use_bn=True``."""
    fields = {f.name for f in dataclasses.fields(VGG)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown VGG override(s) {unknown}; valid fields: {sorted(fields)}.")
    return VGG(**overrides)
