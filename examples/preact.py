"""Pre-activation ResNet (v2; He et al. 2016, *Identity Mappings in Deep Residual Networks*).

Each block is BN-ReLU-conv, BN-ReLU-conv, and the sum is left unactivated (Fig. 4(e)); the stem
is a bare conv and the head adds the final BN-ReLU before pooling. Train it with::

    python train.py --config configs/digits.py --workdir runs/preact \\
        --config.model_kwargs.block=examples.preact:PreActBlock \\
        --config.model_kwargs.stem=examples.preact:PreActStem \\
        --config.model_kwargs.head=examples.preact:PreActHead
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax import models


class PreActBlock(nn.Module):
    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: Any = nn.Conv
    norm: Any = nn.BatchNorm
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = self.act(self.norm(name="bn1")(x))
        y = self.conv(self.features, (3, 3), s, padding=1, name="conv1")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
        if self.shortcut == "none":
            return y
        return y + models.Shortcut(self.features, self.strides, self.shortcut, self.conv,
                                   self.norm, name="shortcut")(x)


class PreActStem(nn.Module):
    features: int
    conv: Any = nn.Conv

    @nn.compact
    def __call__(self, x):
        return self.conv(self.features, (3, 3), padding=1, name="conv")(x)


class PreActHead(nn.Module):
    num_classes: int
    norm: Any = nn.BatchNorm
    act: Callable = nn.relu
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = self.act(self.norm(name="bn")(x)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
