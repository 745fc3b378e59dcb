"""resnet_jax.ops.pool: the stem's max pool with a cheap backward equals flax's, ties included."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.ops.pool import flax_max_pool


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 8, 5), (1, 112, 112, 8)])
@pytest.mark.parametrize(("window", "stride", "padding"), [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # the ImageNet stem's (Table 1)
    ((2, 2), (2, 2), "VALID"),
    ((3, 3), (1, 1), "SAME"),
])
def test_values_and_gradients_equal_flax_max_pool(shape, window, stride, padding) -> None:
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    x = jnp.round(x * 4) / 4  # post-ReLU and rounded: many tied maxima, zeros above all
    ours = jax.jit(lambda x: flax_max_pool(x, window, stride, padding))
    ref = lambda x: nn.max_pool(x, window, stride, padding)
    y, vjp = jax.vjp(ours, x)
    y_ref, vjp_ref = jax.vjp(ref, x)
    g = jax.random.normal(jax.random.key(1), y_ref.shape)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-5, atol=1e-6)  # sum order


def test_what_it_does_not_take_names_flax() -> None:
    with pytest.raises(ValueError, match=r"flax\.linen\.max_pool"):
        flax_max_pool(jnp.zeros((1, 8, 8, 2)), (3, 2), (2, 2), "VALID")
