"""Ghost BN inside the norm: per-group statistics, one model call, a distinct key per group.

jit with ``bn_groups = G`` equals pmap with ``bn_sync=False`` on G devices (a subprocess with
2 simulated CPU devices), dropout masks included: group g draws as device g does.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import run_on_cpu_devices

from resnet_jax import models
from resnet_jax.errors import ConfigError
from resnet_jax.ops.norm import BatchNorm
from resnet_jax.train import create_train_state, train_step
from resnet_jax.train.step import _forward_train

KW = dict(momentum=0.9, epsilon=1e-5)


def _close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_norm_groups_equal_flax_on_each_group():
    """Values, gradients (params and x) and running statistics (mean over groups)."""
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 5)) * 2 + 1
    v = nn.BatchNorm(use_running_average=False, **KW).init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))

    def ours(params, x):
        y, new = BatchNorm(use_running_average=False, batch_groups=2, **KW).apply(
            {"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return (y * w).sum(), (y, new["batch_stats"])

    def ref(params, x):
        def one(x):
            y, new = nn.BatchNorm(use_running_average=False, **KW).apply(
                {"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
            return y, new["batch_stats"]
        y, stats = jax.vmap(one)(x.reshape(2, 4, *x.shape[1:]))
        y = y.reshape(x.shape)
        return (y * w).sum(), (y, jax.tree.map(lambda s: s.mean(0), stats))

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(v["params"], x)
    _close(grad(ref), grad(ours), rtol=1e-5, atol=1e-5)
    synced = BatchNorm(use_running_average=False, **KW).apply(v, x, mutable=["batch_stats"])
    assert not np.allclose(synced[0], grad(ours)[0][1][0], atol=1e-3)


def test_a_batch_that_does_not_split_is_a_config_error():
    x = jnp.zeros((6, 2, 2, 3))
    with pytest.raises(ConfigError, match="does not split into bn_groups=4"):
        BatchNorm(use_running_average=False, batch_groups=4).init(jax.random.key(0), x)
    state = _state(models.create("cifar_resnet", depth=8, width=4))
    with pytest.raises(ConfigError, match="6 examples does not split into bn_groups=4"):
        jax.jit(train_step, static_argnames="bn_groups")(
            state, {"image": jnp.zeros((6, 8, 8, 3)), "label": jnp.zeros(6, jnp.int32)},
            jax.random.key(0), bn_groups=4)


class DropoutBlock(nn.Module):
    """A basic block followed by dropout (a fork drawing from the "dropout" stream)."""

    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: Any = nn.Conv
    norm: Any = nn.BatchNorm
    act: Any = nn.relu
    rate: float = 0.5

    @nn.compact
    def __call__(self, x):
        x = models.BasicBlock(self.features, self.strides, self.shortcut, self.conv, self.norm,
                              self.act, name="basic")(x)
        return nn.Dropout(self.rate, deterministic=False)(x)


class ScalarDrawBlock(DropoutBlock):
    @nn.compact
    def __call__(self, x):
        keep = jax.random.bernoulli(self.make_rng("dropout"), 0.5)  # one draw per BN batch
        return x * keep


def _state(model, image=(8, 8, 3)):
    config = ml_collections.ConfigDict(dict(
        learning_rate=0.1, scale_lr_by_batch=False, batch_size=4, momentum=0.9, nesterov=False,
        weight_decay=0.0, weight_decay_mask="kernels", schedule="piecewise", lr_boundaries=(),
        lr_boundaries_unit="steps", lr_decay_factor=0.1, warmup_steps=0,
        warmup_type="constant", warmup_lr=0.01, num_train_steps=1))
    return create_train_state(config, model, jax.random.key(0), image_shape=image)


def test_dropout_fork_draws_per_group_as_each_device_would():
    """One model call with bn_groups=2 == each group run alone with fold_in(rng, g) (what
    device g runs under pmap); identical inputs in both groups give different masks. Depth 14:
    block0 of each stage unscanned, block1 in the scan (which splits the key)."""
    model = models.create("cifar_resnet", depth=14, width=4, block_cls=DropoutBlock,
                          scan_blocks=True)
    state = _state(model)
    half = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    images = jnp.concatenate([half, half])  # group 0 and group 1 see the same examples
    rng = jax.random.PRNGKey(7)
    fwd = jax.jit(_forward_train, static_argnames=("bn_axis_name", "bn_groups"))
    logits, stats = fwd(state, state.params, images, rng, bn_axis_name=None, bn_groups=2)
    per_group = [fwd(state, state.params, half, jax.random.fold_in(rng, g), bn_axis_name=None,
                     bn_groups=1) for g in range(2)]
    _close(logits, jnp.concatenate([p[0] for p in per_group]), rtol=1e-5, atol=1e-5)
    _close(stats, jax.tree.map(lambda a, b: (a + b) / 2, per_group[0][1], per_group[1][1]),
           rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[:2], logits[2:], atol=1e-3), "same mask in both groups"


def test_a_draw_without_a_batch_axis_is_refused_under_groups():
    model = models.create("cifar_resnet", depth=8, width=4, block_cls=ScalarDrawBlock)
    state = _state(model)
    images = jnp.zeros((4, 8, 8, 3))
    with pytest.raises(ConfigError, match=r"random draw of shape \(\) under bn_groups=2"):
        _forward_train(state, state.params, images, jax.random.key(0), bn_axis_name=None,
                       bn_groups=2)


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_ghost_bn import DropoutBlock, _state
    from resnet_jax import models, parallel
    from resnet_jax.train import train_step
    assert jax.device_count() == 2

    def one_step(model, mode, image):
        state = _state(model, image)
        step = parallel.compile(train_step, mode, bn_sync=False, donate_state=False)
        rs = np.random.RandomState(0)
        batch = {"image": rs.randn(8, *image).astype(np.float32),
                 "label": rs.randint(0, 10, 8).astype(np.int32)}
        new, metrics = step(step.replicate(state), batch, jax.random.PRNGKey(3))
        new = step.fetch((new.params, new.batch_stats, metrics))
        delta = jax.tree.map(lambda a, b: (a - b) / 0.1, new[0], state.params)  # -grads
        return delta, new[1], new[2]["loss"], new[2]["grad_norm"]

    # depth 14: block0 of each stage unscanned, block1 in the scan, each with dropout
    model = models.create("cifar_resnet", depth=14, width=4, block_cls=DropoutBlock,
                          scan_blocks=True)
    jit, pmap = one_step(model, "jit", (8, 8, 3)), one_step(model, "pmap", (8, 8, 3))
    for a, b in zip(jax.tree.leaves(jit), jax.tree.leaves(pmap), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    print("ok")
""")


@pytest.mark.slow  # jit and pmap compiles of a scanned net's step, in a fresh process
def test_jit_groups_equal_pmap_per_device_bn_on_two_devices():
    """Loss, gradients and batch_stats of one step of a dropout fork with scanned stages (the
    paper's nets' layout; one net: the default ResNet-20 adds only depth to the scan)."""
    here = os.path.dirname(os.path.abspath(__file__))
    run_on_cpu_devices(TWO_DEVICES, 2, here, timeout=600)
