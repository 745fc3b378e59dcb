"""resnet_jax: He et al. 2015, Deep Residual Learning for Image Recognition, in JAX/Flax."""

from typing import Any

from resnet_jax.models import create

__all__ = ["create", "load"]
__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, *, ema: bool = False
         ) -> tuple[Any, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` from a training workdir's newest checkpoint (or
    ``step``), for ``model.apply(variables, x, train=False)``; ``ema``: the moving average of
    a run with ``ema_decay > 0``. See ``resnet_jax.train.evaluate.load``."""
    # Deferred so ``import resnet_jax`` stays light (orbax, the data pipeline); no cycle: the
    # package root is imported by nothing inside it.
    from resnet_jax.train.evaluate import load as load_checkpoint

    return load_checkpoint(workdir, step, ema=ema)
