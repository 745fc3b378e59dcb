"""resnet_jax.ops.pool: the stem's max pool with a cheap backward equals flax's, ties included,
on the lax path and on the CPU kernel (impl="onednn"), under every transform and over a mesh."""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import onednn_status, run_on_cpu_devices

from resnet_jax.errors import ConfigError
from resnet_jax.ops import pool
from resnet_jax.ops.pool import flax_max_pool

AVAILABLE, WHY = onednn_status()
IMPLS = ["xla", pytest.param("onednn", marks=pytest.mark.skipif(
    not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}"))]


def _tied(shape, seed=0):
    x = jax.nn.relu(jax.random.normal(jax.random.key(seed), shape))
    return jnp.round(x * 4) / 4  # post-ReLU and rounded: many tied maxima, zeros above all


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 8, 5), (1, 112, 112, 8)])
@pytest.mark.parametrize(("window", "stride", "padding"), [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # the ImageNet stem's (Table 1)
    ((2, 2), (2, 2), "VALID"),
    ((3, 3), (1, 1), "SAME"),
    ((3, 3), (2, 2), ((0, 2), (2, 1))),  # uneven pads: the kernel's offsets and crop
])
def test_values_and_gradients_equal_flax_max_pool(shape, window, stride, padding, impl) -> None:
    x = _tied(shape)
    ours = jax.jit(lambda x: flax_max_pool(x, window, stride, padding, impl=impl))
    ref = lambda x: nn.max_pool(x, window, stride, padding)
    y, vjp = jax.vjp(ours, x)
    y_ref, vjp_ref = jax.vjp(ref, x)
    g = jax.random.normal(jax.random.key(1), y_ref.shape)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-5, atol=1e-6)  # sum order


@pytest.mark.parametrize("impl", IMPLS)
def test_the_backward_composes_with_vmap_jvp_and_second_order(impl) -> None:
    x = _tied((2, 3, 9, 9, 4))  # a leading vmap axis over batches of 3
    w = jnp.linspace(0.5, 1.5, 4)

    def loss(pool_fn, w, x):
        y = pool_fn(x * w, (3, 3), (2, 2), ((1, 1), (1, 1)))
        return jnp.sum(jnp.sin(y) * y)

    ours = lambda *a, **k: flax_max_pool(*a, **k, impl=impl)
    for f in (
        lambda p: jax.vmap(jax.grad(lambda x: loss(p, w, x)))(x),  # per-batch input gradients
        lambda p: jax.grad(lambda w: jax.grad(lambda w: loss(p, w, x[0]))(w).sum())(w),
        lambda p: jax.jvp(jax.grad(lambda x: loss(p, w, x)), (x[0],), (x[1],))[1],  # HVP
        lambda p: jax.vmap(jax.grad(lambda x: loss(p, w, x)), in_axes=1)(x),  # vmap on axis 1
    ):
        np.testing.assert_allclose(jax.jit(lambda f=f: f(ours))(), f(nn.max_pool),
                                   rtol=1e-5, atol=1e-5)


def test_the_cpu_kernel_runs_in_the_backward_on_the_onednn_impl_only() -> None:
    if not AVAILABLE:
        pytest.skip(f"oneDNN extension unavailable: {WHY}")
    f = jax.jit(jax.grad(lambda x: flax_max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)),
                                                 impl="onednn").sum()))
    x = jnp.zeros((2, 8, 8, 4))
    assert "resnet_jax_pool_scatter" in f.lower(x).as_text()
    xla = jax.jit(jax.grad(lambda x: flax_max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))).sum()))
    assert "resnet_jax_pool_scatter" not in xla.lower(x).as_text()


def test_what_it_does_not_take_names_flax() -> None:
    with pytest.raises(ValueError, match=r"flax\.linen\.max_pool"):
        flax_max_pool(jnp.zeros((1, 8, 8, 2)), (3, 2), (2, 2), "VALID")
    with pytest.raises(ConfigError, match="not one of"):
        flax_max_pool(jnp.zeros((1, 8, 8, 2)), (3, 3), (2, 2), "VALID", impl="cuda")
    with pytest.raises(NotImplementedError, match="linear in its tangent only"):
        code = jnp.zeros((1, 4, 4, 2), jnp.int8)
        jax.linear_transpose(lambda c: pool.gather_p.bind(
            c, jnp.ones((1, 8, 8, 2)), k=2, s=2, pads=((0, 0), (0, 0)), impl="xla"),
            code.astype(jnp.float32))(jnp.ones((1, 4, 4, 2)))


PARTITIONED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_jax.ops.pool import flax_max_pool
    assert jax.device_count() == 2
    x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 10, 10, 8))) * 4) / 4
    g = jax.random.normal(jax.random.key(1), (4, 5, 5, 8))
    f = jax.jit(lambda x, g: jax.vjp(lambda x: flax_max_pool(
        x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl="onednn"), x)[1](g)[0])
    one = f(x, g)
    shard = NamedSharding(jax.make_mesh((2,), ("data",)), P("data"))
    xs, gs = jax.device_put(x, shard), jax.device_put(g, shard)
    two = f(xs, gs)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(two))
    hlo = f.lower(xs, gs).compile().as_text()
    assert "resnet_jax_pool_scatter" in hlo and "all-gather" not in hlo, "gathered the batch"
    print("ok")
""")


@pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}")
def test_the_kernel_runs_on_each_shard_of_a_mesh():
    run_on_cpu_devices(PARTITIONED, 2)
