"""Per-group random keys for ghost BN under ``jit``: each group draws as its device would.

Under ``pmap`` with ``bn_sync=False`` device ``g`` runs the model on its slice of the batch with
the key ``fold_in(rng, g)``, so a dropout mask of its local shape comes from that key. Under
``jit`` with ``bn_groups = G`` the model runs once on the whole batch (the norm splits it into
groups, ``resnet_jax.ops.norm``); :func:`grouped_key` makes its random draws match the pmap
ones exactly. It is a typed key of a PRNG implementation whose key data are the G keys
``fold_in(rng, g)``: ``split`` and ``fold_in`` (what flax's ``make_rng`` and ``nn.scan`` do)
apply to each of them, and ``random_bits`` of a shape (N, ...) draws group g's rows
``[g N/G, (g+1) N/G)`` with key g and shape (N/G, ...), the device's draw. A draw whose leading
axis is not the batch (does not split into G) has no pmap counterpart and is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp

from resnet_jax.errors import ConfigError


@functools.cache
def _grouped_impl(groups: int, base: Any) -> Hashable:
    """The PRNG implementation whose keys hold ``groups`` keys of the ``base`` implementation."""
    base_shape = jax.random.key_data(jax.random.key(0, impl=base)).shape

    def wrap(data: jax.Array) -> jax.Array:
        return jax.random.wrap_key_data(data, impl=base)

    def seed(s: jax.Array) -> jax.Array:
        return jax.random.key_data(_fold_groups(jax.random.key(s, impl=base), groups))

    def split(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        out = jax.vmap(lambda k: jax.random.key_data(jax.random.split(wrap(k), shape)))(data)
        return jnp.moveaxis(out, 0, len(shape))  # (*shape, groups, *base_shape)

    def fold_in(data: jax.Array, value: jax.Array) -> jax.Array:
        return jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(wrap(k), value)))(data)

    def random_bits(data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
        if not shape or shape[0] % groups:
            raise ConfigError(
                f"a random draw of shape {tuple(shape)} under bn_groups={groups}: ghost BN "
                f"gives each group of the batch its own key, so draws must have the batch as "
                f"their leading axis (a multiple of {groups}); draw per example, or run "
                "parallel=pmap")
        local = (shape[0] // groups, *shape[1:])
        dtype = jnp.dtype(f"uint{bit_width}")
        bits = jax.vmap(lambda k: jax.random.bits(wrap(k), local, dtype))(data)
        return bits.reshape(shape)

    return jex_random.define_prng_impl(
        key_shape=(groups, *base_shape), seed=seed, split=split, random_bits=random_bits,
        fold_in=fold_in, name=f"ghost{groups}[{base}]", tag=f"g{groups}")


def _fold_groups(key: jax.Array, groups: int) -> jax.Array:
    return jnp.stack([jax.random.fold_in(key, g) for g in range(groups)])


def grouped_key(rng: jax.Array, groups: int) -> jax.Array:
    """A scalar typed key whose draws equal, group by group, those of ``fold_in(rng, g)``."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 key of the default implementation
    base = jax.random.key_impl(rng)
    data = jax.random.key_data(_fold_groups(rng, groups))
    return jax.random.wrap_key_data(data, impl=_grouped_impl(groups, base))
