"""A squeeze-and-excitation block (Hu et al. 2018): the paper's basic block whose residual is
rescaled per channel by a gate computed from its global average. Train it with::

    python train.py --config configs/digits.py --workdir runs/se \\
        --config.model_kwargs.block=examples.se:SEBlock
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from resnet_jax import models


class SEBlock(nn.Module):
    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: Any = nn.Conv
    norm: Any = nn.BatchNorm
    act: Callable = nn.relu
    reduction: int = 4

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        gate = nn.Dense(max(1, self.features // self.reduction), name="se_reduce")(y.mean((1, 2)))
        gate = nn.sigmoid(nn.Dense(self.features, name="se_expand")(self.act(gate)))
        y = y * gate[:, None, None, :].astype(y.dtype)
        if self.shortcut == "none":
            return self.act(y)
        short = models.Shortcut(self.features, self.strides, self.shortcut, self.conv, self.norm,
                                name="shortcut")(x)
        return self.act(y + short)
