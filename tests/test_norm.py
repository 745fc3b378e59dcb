"""resnet_jax.ops.norm.BatchNorm equals flax.linen.BatchNorm: outputs, gradients, batch_stats,
under jvp/linearize, grad-of-grad, HVPs, hessian and vmap of grad, and synced over devices."""

from __future__ import annotations

import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_cpu_devices

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


def test_resnet_train_step_matches_flax_norm(monkeypatch):
    """A ResNet-8 gradient with every BN swapped for flax's (the model's only norm) is equal."""
    from types import SimpleNamespace

    from resnet_jax import models
    from resnet_jax.models import resnet as resnet_mod

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    model = models.create("cifar_resnet", depth=8)
    v = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        logits, new = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
        return logits.sum() ** 2 / 100, new

    ours = jax.value_and_grad(loss, has_aux=True)(v["params"])

    def flax_bn(batch_groups: int = 1, impl: str = "xla", **kw):
        assert batch_groups == 1 and impl == "xla"
        return nn.BatchNorm(**kw)

    monkeypatch.setattr(resnet_mod, "fast_norm", SimpleNamespace(BatchNorm=flax_bn))
    ref = jax.value_and_grad(loss, has_aux=True)(v["params"])
    _close(ref, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv_impl", ["xla", "onednn"])
def test_model_hands_blocks_one_norm_class_for_every_conv_impl(conv_impl):
    from resnet_jax import models

    if conv_impl == "onednn":
        pytest.importorskip("resnet_jax.ops.onednn")
    seen = []

    class Spy(models.BasicBlock):
        def __call__(self, x):
            seen.append(self.norm.func if hasattr(self.norm, "func") else self.norm)
            return super().__call__(x)

    model = models.create("cifar_resnet", depth=8, width=4, block_cls=Spy, conv_impl=conv_impl)
    jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0),
                   jnp.zeros((2, 8, 8, 3)))
    assert seen and set(seen) == {BatchNorm}

def _flax_and_ours(**kw):
    return {name: cls(use_running_average=False, **KW, **kw)
            for name, cls in (("flax", nn.BatchNorm), ("ours", BatchNorm))}


def _apply(module, stats):
    def f(params, x):
        y, new = module.apply({"params": params, "batch_stats": stats}, x,
                              mutable=["batch_stats"])
        return y, new["batch_stats"]
    return f


def test_jvp_and_linearize_match_flax_including_batch_stats():
    x = jax.random.normal(jax.random.key(0), (6, 3, 3, 4)) * 2 + 1
    v = _variables(x)
    t = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), (v["params"], x))
    out = {name: jax.jvp(_apply(m, v["batch_stats"]), (v["params"], x), t)
           for name, m in _flax_and_ours().items()}
    _close(out["flax"], out["ours"], rtol=1e-5, atol=1e-5)  # y, stats and their tangents
    assert float(jnp.abs(out["ours"][1][1]["var"]).max()) > 1e-3  # the stats' tangents count
    lin = jax.linearize(_apply(_flax_and_ours()["ours"], v["batch_stats"]), v["params"], x)[1]
    _close(lin(*t), out["ours"][1], rtol=1e-5, atol=1e-5)


def test_grad_of_grad_and_hvp_match_flax():
    x = jax.random.normal(jax.random.key(0), (6, 3, 3, 4)) * 2 + 1
    v = _variables(x)
    probe = jax.random.normal(jax.random.key(4), x.shape)
    out = {}
    for name, m in _flax_and_ours().items():
        def loss(params, x, m=m):
            return _loss(m, params, v["batch_stats"], x)[0]

        def grad_dot(params, x, loss=loss):  # reverse over reverse
            return (jax.grad(loss, argnums=1)(params, x) * probe).sum()

        hvp = jax.jvp(jax.grad(loss, argnums=(0, 1)), (v["params"], x),  # forward over reverse
                      (jax.tree.map(jnp.zeros_like, v["params"]), probe))[1]
        out[name] = jax.grad(grad_dot, argnums=(0, 1))(v["params"], x), hvp
    _close(out["flax"], out["ours"], rtol=1e-4, atol=1e-5)


def test_hessian_in_x_matches_flax():
    x = jax.random.normal(jax.random.key(0), (4, 2)) * 2 + 1
    v = _variables(x)
    h = {name: jax.hessian(lambda x, m=m: _loss(m, v["params"], v["batch_stats"], x)[0])(x)
         for name, m in _flax_and_ours().items()}
    _close(h["flax"], h["ours"], rtol=1e-4, atol=1e-5)


def test_vmap_of_grad_matches_flax():
    """Per-slice gradients: vmap over independent BN batches, each with its own statistics."""
    xs = jax.random.normal(jax.random.key(0), (3, 4, 3, 3, 5)) * 2 + 1
    v = _variables(xs[0])
    out = {}
    for name, m in _flax_and_ours().items():
        g = jax.grad(lambda p, x, m=m: _loss(m, p, v["batch_stats"], x)[0], argnums=(0, 1))
        out[name] = jax.jit(jax.vmap(g, in_axes=(None, 0)))(v["params"], xs)
    _close(out["flax"], out["ours"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["ours"][1][0], out["ours"][1][1])  # really per slice


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

    def tangents(cls):  # forward mode through the pmean'd statistics
        m = cls(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name="d")
        def f(p, x):
            y, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                             mutable=["batch_stats"])
            return y, new
        dx = jnp.cos(x)
        jvp = lambda x, dx: jax.jvp(f, (v["params"], x), (v["params"], dx))
        return jax.pmap(jvp, axis_name="d")(x, dx)

    for a, b in zip(jax.tree.leaves(tangents(nn.BatchNorm)), jax.tree.leaves(tangents(BatchNorm))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_synced_batch_norm_on_two_devices():
    run_on_cpu_devices(SYNCED, 2)
