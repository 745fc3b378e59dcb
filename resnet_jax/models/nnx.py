"""Flax NNX interop: any registered linen network, with its variables, as an NNX module.

    net = to_nnx(models.create("resnet20"), variables)   # e.g. from resnet_jax.load(workdir)
    logits = net(x)                                       # inference (running BN statistics)
    logits = net(x, train=True)                           # batch statistics; running ones update

Built on ``flax.nnx.bridge.ToNNX``: parameters become ``nnx.Param`` and BN statistics
``nnx.BatchStat`` at the linen paths (``net.net.stage1...``), so ``nnx.Optimizer(net, tx,
wrt=nnx.Param)`` trains it. The linen module stays the source of truth (DESIGN.md: no NNX port).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from resnet_jax.errors import ConfigError


class NNXNetwork(nnx.Module):
    """A linen network and its variables as one NNX module (see :func:`to_nnx`)."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], *,
                 rngs: nnx.Rngs | None = None) -> None:
        if "params" not in variables:
            raise ConfigError(f"variables need a 'params' collection, got {sorted(variables)}; "
                              "pass what resnet_jax.load or models.init returns")
        self.net = bridge.ToNNX(model, rngs=rngs if rngs is not None else nnx.Rngs(0))
        attrs = bridge_variables.linen_vars_to_nnx_attrs(
            jax.tree.map(jax.numpy.asarray, dict(variables)))
        for name, value in attrs.items():  # the given variables, no re-initialisation
            setattr(self.net, name, value)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits; ``train=True`` normalises with batch statistics and updates the running
        ones in place (the linen model's ``mutable=["batch_stats"]``)."""
        if train:
            return self.net(x, train=True, mutable=["batch_stats"])
        return self.net(x, train=False)


def to_nnx(model: nn.Module, variables: Mapping[str, Any], *,
           rngs: nnx.Rngs | None = None) -> NNXNetwork:
    """``model`` (any ``models.create`` network) with ``variables`` ({"params", "batch_stats"})
    as an NNX module whose outputs equal ``model.apply(variables, ...)``."""
    return NNXNetwork(model, variables, rngs=rngs)
