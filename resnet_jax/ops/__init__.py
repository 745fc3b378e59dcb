"""Kernels beyond XLA's own: ``onednn`` (oneDNN convolutions for XLA:CPU, the ``[onednn]`` extra).

Imported by name (``from resnet_jax.ops import onednn``) only where selected, so the package
never needs the extra.
"""
