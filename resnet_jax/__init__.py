"""resnet_jax: He et al. 2015, Deep Residual Learning for Image Recognition, in JAX/Flax."""

from resnet_jax.models import create

__all__ = ["create"]
__version__ = "0.1.0"
