"""BN(+add)(+ReLU) as one op (ops/norm.py ``act``/``residual``, ops/norm_prims.py): equal to
flax's BatchNorm followed by the add and the ReLU, on XLA's path and on the fused CPU kernels
(``impl="onednn"``), under grad, jvp, grad-of-grad, HVPs, vmap of grad, synced over devices
(pmean) and partitioned over a jit mesh; ``conv="auto"`` resolves to the fast path."""

from __future__ import annotations

import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import onednn_status, run_on_cpu_devices

from resnet_jax.errors import ConfigError, ExtensionUnavailable
from resnet_jax.ops import norm_prims
from resnet_jax.ops.norm import BatchNorm, norm_act
from resnet_jax.train import config as config_lib

AVAILABLE, WHY = onednn_status()
IMPLS = ["xla", pytest.param("onednn", marks=pytest.mark.skipif(
    not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}"))]
KW = dict(momentum=0.9, epsilon=1e-5, use_running_average=False)
SHAPE = (6, 5, 4, 8)


def _data():
    x = jax.random.normal(jax.random.key(0), SHAPE) * 2 + 1
    r = jax.random.normal(jax.random.key(1), SHAPE)
    v = nn.BatchNorm(**KW).init(jax.random.key(2), x)
    v = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(3), a.shape), v)
    return x, r, v


def _reference(params, stats, x, r):
    """flax's BatchNorm, then the add and the ReLU, as a block wrote them before the fusion."""
    y, new = nn.BatchNorm(**KW).apply({"params": params, "batch_stats": stats}, x,
                                      mutable=["batch_stats"])
    return nn.relu(y + r), new["batch_stats"]


def _fused(impl, relu=True):
    def f(params, stats, x, r):
        y, new = BatchNorm(**KW, act=nn.relu if relu else None, impl=impl).apply(
            {"params": params, "batch_stats": stats}, x, residual=r, mutable=["batch_stats"])
        return y, new["batch_stats"]
    return f


def _loss(f):
    def loss(params, x, r, stats):
        y, new = f(params, stats, x, r)
        w = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
        return (jnp.sin(y) * w).sum() + (new["mean"] * new["var"]).sum()
    return loss


def _close(a, b, rtol=1e-5, atol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_grad_and_stats_equal_flax_bn_add_relu(impl):
    x, r, v = _data()
    p, s = v["params"], v["batch_stats"]
    _close(jax.jit(_fused(impl))(p, s, x, r), _reference(p, s, x, r))
    g = jax.jit(jax.grad(_loss(_fused(impl)), argnums=(0, 1, 2)))(p, x, r, s)
    g_ref = jax.grad(_loss(_reference), argnums=(0, 1, 2))(p, x, r, s)
    _close(g, g_ref)
    assert float(jnp.abs(g[2]).max()) > 1e-3 and float(jnp.abs(g[0]["scale"]).max()) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_transforms_compose_and_equal_flax(impl):
    x, r, v = _data()
    p, s = v["params"], v["batch_stats"]
    probe = jax.random.normal(jax.random.key(5), x.shape)
    out = {}
    for name, f in (("ref", _reference), ("fused", _fused(impl))):
        loss = _loss(f)
        tangents = (jax.tree.map(jnp.ones_like, p), probe, jnp.cos(r))
        jvp = jax.jvp(lambda p, x, r, f=f: f(p, s, x, r), (p, x, r), tangents)
        gg = jax.grad(lambda p, x, loss=loss: (jax.grad(loss, argnums=1)(p, x, r, s)
                                               * probe).sum(), argnums=(0, 1))(p, x)
        hvp = jax.jvp(lambda x, loss=loss: jax.grad(loss, argnums=1)(p, x, r, s), (x,),
                      (probe,))[1]
        xs = jnp.stack([x, x * 0.5 + 1])
        vg = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, None, None)))(
            p, xs, r, s)
        out[name] = jvp, gg, hvp, vg
    _close(out["ref"], out["fused"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_residual_and_other_activations(impl):
    x, _, v = _data()
    p, s = v["params"], v["batch_stats"]

    def ref(act):
        y, _ = nn.BatchNorm(**KW).apply({"params": p, "batch_stats": s}, x,
                                        mutable=["batch_stats"])
        return act(y)

    for act in (nn.relu, nn.tanh):
        y, _ = BatchNorm(**KW, act=act, impl=impl).apply({"params": p, "batch_stats": s}, x,
                                                           mutable=["batch_stats"])
        _close(y, ref(act))
    eval_y = BatchNorm(momentum=0.9, epsilon=1e-5, use_running_average=True, act=nn.relu,
                       impl=impl).apply({"params": p, "batch_stats": s}, x, residual=x)
    ref_y = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_running_average=True).apply(
        {"params": p, "batch_stats": s}, x)
    _close(eval_y, nn.relu(ref_y + x))


def test_norm_act_keeps_a_forks_norm_as_written():
    """A fork's norm (flax's BatchNorm) runs as norm, add, act; ours as one op; same variables."""
    x, r, _ = _data()

    class Block(nn.Module):
        norm: object

        @nn.compact
        def __call__(self, x, r):
            return norm_act(self.norm, nn.relu, x, name="bn", residual=r)

    outs = {}
    for name, norm in (("flax", nn.BatchNorm), ("ours", BatchNorm)):
        block = Block(functools.partial(norm, **KW))
        v = block.init(jax.random.key(0), x, r)
        outs[name] = v, block.apply(v, x, r, mutable=["batch_stats"])
    _close(outs["flax"], outs["ours"])
    with pytest.raises(ConfigError, match="residual of shape"):
        BatchNorm(**KW, act=nn.relu).init(jax.random.key(0), x, residual=r[:, :2])


def test_bfloat16_and_ghost_groups_take_the_lax_path():
    """The fused kernels are float32, one BN batch; other cases run ops/norm.py's lax op."""
    x, r, v = _data()
    f32 = str(jax.make_jaxpr(jax.grad(
        lambda p: _loss(_fused("onednn"))(p, x, r, v["batch_stats"])))(v["params"]))
    assert "resnet_jax_bn_stats" in f32 and "resnet_jax_bn_grad_stats" in f32
    bf16 = BatchNorm(**KW, act=nn.relu, impl="onednn", dtype=jnp.bfloat16)
    text = str(jax.make_jaxpr(lambda x: bf16.apply(v, x, residual=r, mutable=["batch_stats"]))(
        x.astype(jnp.bfloat16)))
    assert "resnet_jax_bn_stats" not in text
    ghost = BatchNorm(**KW, act=nn.relu, impl="onednn", batch_groups=2)
    text = str(jax.make_jaxpr(lambda x: ghost.apply(v, x, residual=r, mutable=["batch_stats"]))(x))
    assert "resnet_jax_bn_stats" not in text


def test_primitives_reject_transposing_their_nonlinear_operands():
    x, r, _ = _data()
    c = x.shape[-1]
    mean, inv = jnp.zeros(c), jnp.ones(c)
    with pytest.raises(NotImplementedError, match="linear in its cotangent only"):
        jax.linear_transpose(lambda x: norm_prims.grad_stats_p.bind(
            r, r, x, mean, inv, relu=True, impl="xla"), x)(jnp.ones((2, c)))


SYNCED = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_jax.ops.norm import BatchNorm
    assert jax.device_count() == 2
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 3, 8)) * 2 + 0.5  # per device: 4x3x3x8
    r = jax.random.normal(jax.random.key(1), x.shape)
    v = nn.BatchNorm(use_running_average=False, momentum=0.9).init(jax.random.key(1), x[0])
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)

    def loss(m, p, x, r):
        fused = isinstance(m, BatchNorm)
        y, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                         mutable=["batch_stats"], **({"residual": r} if fused else {}))
        if not fused:
            y = nn.relu(y + r)  # the reference: flax's BN, then what the block does after it
        return (jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size).sum(), (y, new)

    def synced(m):
        f = jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1, 2), has_aux=True)
        return jax.pmap(f, axis_name="d", in_axes=(None, 0, 0))(v["params"], x, r)

    kw = dict(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name="d")
    ref = synced(nn.BatchNorm(**kw))
    for impl in ("xla", "onednn"):
        got = synced(BatchNorm(**kw, act=nn.relu, impl=impl))
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    # jit over a 2-device mesh (global batch, kernels partitioned): equals one device
    mesh = jax.make_mesh((2,), ("data",))
    xs, rs = x.reshape(8, 3, 3, 8), r.reshape(8, 3, 3, 8)
    m = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, act=nn.relu,
                  impl="onednn")
    g = jax.jit(jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1, 2), has_aux=True))
    one = g(v["params"], xs, rs)
    shard = NamedSharding(mesh, P("data"))
    two = g(v["params"], jax.device_put(xs, shard), jax.device_put(rs, shard))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    args = (v["params"], jax.device_put(xs, shard), jax.device_put(rs, shard))
    hlo = g.lower(*args).compile().as_text()
    assert "all-gather" not in hlo, "the BN kernels gathered the batch"
    print("ok")
""")


@pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}")
def test_synced_and_partitioned_on_two_devices():
    run_on_cpu_devices(SYNCED, 2)


def test_conv_auto_resolves_to_the_cpu_fast_path(monkeypatch, capsys):
    config_lib._cpu_auto.cache_clear()
    assert config_lib.resolve_conv("xla") == "xla"
    assert config_lib.resolve_conv("auto") == ("onednn" if AVAILABLE else "xla")
    with pytest.raises(ConfigError, match="not one of"):
        config_lib.resolve_conv("mkl")
    from resnet_jax.ops import onednn

    def broken():
        raise ExtensionUnavailable("no C++ compiler 'g++'; install g++")

    config_lib._cpu_auto.cache_clear()
    monkeypatch.setattr(onednn, "load", broken)
    try:
        assert config_lib.resolve_conv("auto") == "xla"
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["resnet_jax: conv=auto runs XLA's CPU kernels: no C++ compiler 'g++'; "
                       "install g++"]
    finally:
        config_lib._cpu_auto.cache_clear()
