"""resnet_jax: He et al. 2015, Deep Residual Learning for Image Recognition, in JAX/Flax."""

from collections.abc import Mapping
from typing import Any

from resnet_jax.models import create

__all__ = ["create", "load"]
__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, *, ema: bool = False,
         data_overrides: Mapping[str, Any] | None = None) -> Any:
    """``(model, {"params", "batch_stats"})`` from a training workdir's newest checkpoint (or
    ``step``), for ``model.apply(variables, x, train=False)``, with ``.preprocess``: the
    checkpoint's own preprocessing, so ``x = loaded.preprocess(uint8_images)`` needs no dataset.
    ``ema``: the moving average of a run with ``ema_decay > 0``. See
    ``resnet_jax.train.evaluate.load`` (it returns an ``evaluate.Loaded``)."""
    # Deferred so ``import resnet_jax`` stays light (orbax, the data pipeline); no cycle: the
    # package root is imported by nothing inside it.
    from resnet_jax.train.evaluate import load as load_checkpoint

    return load_checkpoint(workdir, step, ema=ema, data_overrides=data_overrides)
