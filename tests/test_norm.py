"""resnet_jax.ops.norm.BatchNorm equals flax.linen.BatchNorm: outputs, gradients, batch_stats."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.ops.norm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)


def _variables(x):
    v = nn.BatchNorm(use_running_average=False, **KW).init(jax.random.key(1), x)
    # non-trivial scale/bias/running statistics
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)


def _loss(module, params, stats, x):
    y, new = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    w = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
    return (jnp.sin(y.astype(jnp.float32)) * w).sum(), (y, new["batch_stats"])


def _close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                   rtol=rtol, atol=atol)


def test_same_variables_layout():
    x = jnp.ones((4, 3, 3, 5))
    ref = nn.BatchNorm(use_running_average=False, **KW).init(jax.random.key(0), x)
    new = BatchNorm(use_running_average=False, **KW).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ref) == jax.tree.map(jnp.shape, new)
    _close(ref, new, 0, 0)


@pytest.mark.parametrize("jit", [False, True])
def test_train_forward_gradients_and_stats_match_flax(jit):
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) * 3 + 1
    v = _variables(x)
    grad = jax.value_and_grad(_loss, argnums=(1, 3), has_aux=True)
    if jit:
        grad = jax.jit(grad, static_argnums=0)
    out = {}
    for name, cls in (("flax", nn.BatchNorm), ("ours", BatchNorm)):
        m = cls(use_running_average=False, **KW)
        out[name] = grad(m, v["params"], v["batch_stats"], x)
    (l_ref, (y_ref, s_ref)), g_ref = out["flax"]
    (l_new, (y_new, s_new)), g_new = out["ours"]
    _close(y_ref, y_new)
    _close(l_ref, l_new)
    _close(s_ref, s_new)  # running mean/var updated identically
    _close(g_ref, g_new, rtol=1e-5, atol=1e-5)  # d params, d x


def test_eval_mode_and_bfloat16_dtype():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
    v = _variables(x)
    for train in (False, True):
        kw = dict(use_running_average=not train, dtype=jnp.bfloat16, **KW)
        ref = nn.BatchNorm(**kw).apply(v, x.astype(jnp.bfloat16), mutable=["batch_stats"])[0]
        new = BatchNorm(**kw).apply(v, x.astype(jnp.bfloat16), mutable=["batch_stats"])[0]
        assert new.dtype == ref.dtype == jnp.bfloat16
        _close(ref, new, rtol=1e-2, atol=1e-2)


def test_resnet_train_step_matches_flax_norm():
    """A ResNet-8 gradient with every BN swapped (the way a wiring would) equals flax's."""
    from resnet_jax import models
    from resnet_jax.models import resnet as resnet_mod

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    model = models.create("cifar_resnet", depth=8)
    v = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        logits, new = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
        return logits.sum() ** 2 / 100, new

    ref = jax.value_and_grad(loss, has_aux=True)(v["params"])
    old_bn = resnet_mod.nn.BatchNorm
    proxy = type("proxy", (), {k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")})
    proxy.BatchNorm = BatchNorm
    resnet_mod.nn = proxy
    try:
        new = jax.value_and_grad(loss, has_aux=True)(v["params"])
    finally:
        resnet_mod.nn = nn
    assert old_bn is nn.BatchNorm
    _close(ref, new, rtol=1e-4, atol=1e-5)


SYNCED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from resnet_jax.ops.norm import BatchNorm
    assert jax.device_count() == 2
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 3, 5)) * 2 + 0.5  # per device: 4 x 3x3x5
    v = nn.BatchNorm(use_running_average=False, momentum=0.9).init(jax.random.key(1), x[0])
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)

    def step(cls):
        m = cls(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name="d")
        def loss(p, x):
            y, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                             mutable=["batch_stats"])
            return (jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size).sum(), (y, new)
        f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        return jax.pmap(f, axis_name="d", in_axes=(None, 0))(v["params"], x)

    ref, new = step(nn.BatchNorm), step(BatchNorm)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(new)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # synced: both devices hold the same running statistics, the global batch's
    stats = new[0][1][1]["batch_stats"]
    np.testing.assert_allclose(stats["mean"][0], stats["mean"][1], rtol=1e-6)
    print("ok")
""")


def test_synced_batch_norm_on_two_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SYNCED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
