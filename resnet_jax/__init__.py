"""resnet_jax: He et al. 2015, Deep Residual Learning for Image Recognition, in JAX/Flax."""

from typing import Any

from resnet_jax.models import create

__all__ = ["create", "load"]
__version__ = "0.1.0"


def load(workdir: str, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` from a training workdir's newest checkpoint (or
    ``step``), for ``model.apply(variables, x, train=False)``; see ``resnet_jax.checkpoint``."""
    from resnet_jax.checkpoint import load as load_checkpoint  # imports orbax only when used

    return load_checkpoint(workdir, step)
