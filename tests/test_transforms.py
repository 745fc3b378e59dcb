"""Every JAX transform composes on every path and equals the plain lax/flax path.

jvp, linearize, jacfwd, hessian, a forward-over-reverse HVP, grad-of-grad and vmap of grad
(per-example gradients) of the conv primitives (resnet_jax.ops.conv), the max pool
(resnet_jax.ops.pool) and whole nets (resnet20: scanned CIFAR stages; resnet18: the ImageNet
stem's max pool), for conv_impl "xla" and "onednn", train and eval mode. The reference is the
same parameters through flax's nn.Conv, nn.max_pool and nn.BatchNorm (scan_blocks=False,
conv_impl="xla": nothing of resnet_jax.ops). oneDNN cases skip where the extension is
unavailable, unless ``RESNET_JAX_REQUIRE_ONEDNN=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import onednn_status
from jax import lax

from resnet_jax import models
from resnet_jax.ops import conv as conv_ops
from resnet_jax.ops import norm as norm_ops
from resnet_jax.ops.pool import flax_max_pool

ROOT = Path(__file__).resolve().parents[1]
DN = ("NHWC", "HWIO", "NHWC")


AVAILABLE, WHY = onednn_status()
needs_onednn = pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}")
IMPLS = ["xla", pytest.param("onednn", marks=needs_onednn)]

TRANSFORMS = ("jvp", "linearize", "jacfwd", "hessian", "hvp", "grad_of_grad", "per_example")
# Relative L2 error allowed against the reference, float32. XLA's kernels: observed <= 2e-6
# first order, <= 2e-5 second order. oneDNN's convolutions round differently from XLA's
# (~1e-6 per conv) and train-mode BN over few values (a 2x2 map, batch 1 or 2) amplifies that:
# observed <= 3e-5, per-example (batch 1) 1.1e-4, so ONEDNN_FACTOR times more.
TOL = {"jvp": 1e-5, "linearize": 1e-5, "jacfwd": 1e-5, "hessian": 1e-4, "hvp": 1e-4,
       "grad_of_grad": 1e-4, "per_example": 1e-5}
ONEDNN_FACTOR = 20


def _rel(a, b) -> float:
    """Relative L2 error of pytree ``a`` against ``b`` (all leaves together)."""
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _like(tree, seed: int):
    """A random pytree shaped as ``tree`` (a tangent; numpy's RNG: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x)), tree)


def _sqnorm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def transform(name: str, out: Callable, loss: Callable, p, x, labels, t):
    """``name`` applied to ``out(p, x) -> array`` / ``loss(p, x, labels) -> scalar``, jitted.

    jacfwd and hessian are of small functions: the input moved along 3 fixed directions.
    """
    basis = _like(jnp.zeros((3, *x.shape)), 7)
    moved = lambda u: x + jnp.tensordot(u, basis, 1)
    u0 = jnp.zeros(3)
    fns = {
        "jvp": lambda: jax.jvp(lambda p: out(p, x), (p,), (t,)),
        "linearize": lambda: (lambda y, lin: (y, lin(t)))(*jax.linearize(lambda p: out(p, x), p)),
        "jacfwd": lambda: jax.jacfwd(lambda u: out(p, moved(u)))(u0),
        "hessian": lambda: jax.hessian(lambda u: loss(p, moved(u), labels))(u0),
        "hvp": lambda: jax.jvp(jax.grad(lambda p: loss(p, x, labels)), (p,), (t,))[1],
        "grad_of_grad": lambda: jax.grad(
            lambda p, x: _sqnorm(jax.grad(loss)(p, x, labels)), argnums=(0, 1))(p, x),
        "per_example": lambda: jax.vmap(
            jax.grad(lambda p, xi, yi: loss(p, xi[None], yi[None])), in_axes=(None, 0, 0))(
            p, x, labels),
    }
    return jax.jit(fns[name])()


# ---- the convolution primitives alone ---------------------------------------------------------

# Every transform on the hardest geometry (stride 2, asymmetric padding). The other two add
# only where the strides and padding enter a rule: D, W, their jvps and transposes (grad of
# grad), D batched (hessian), W batched (per-example). jvp, linearize and jacfwd reach B alone
# (its jvp is B), hvp a subset of grad of grad's rules: one geometry pins them.
REVERSE = ("hessian", "grad_of_grad", "per_example")
CONV_GEOMETRIES = {"3x3/1": ((1, 1), ((1, 1), (1, 1))), "3x3/2asym": ((2, 2), ((0, 2), (1, 0))),
                   "3x3/2x1": ((2, 1), ((1, 1), (0, 0)))}
CONV_CASES = [(g, n) for g in CONV_GEOMETRIES
              for n in (TRANSFORMS if g == "3x3/2asym" else REVERSE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("geometry", "name"), CONV_CASES, ids=[f"{n}-{g}" for g, n in CONV_CASES])
def test_conv_primitive_transforms_equal_lax(impl: str, geometry: str, name: str) -> None:
    """Every transform of B(x, w) reaches B, D and W (and their transposes) on ``impl``."""
    if impl == "onednn":
        from resnet_jax.ops import onednn  # registers the CPU kernels

        assert onednn.available()
    strides, padding = CONV_GEOMETRIES[geometry]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 9, 5), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 5, 7), dtype=np.float32)) * 0.3
    labels = jnp.arange(3)

    def make(conv):
        def out(w, x):
            return jnp.tanh(conv(x, w)).mean((1, 2))[:, :4]

        def loss(w, x, labels):
            return -jnp.mean(jax.nn.log_softmax(out(w, x))[jnp.arange(x.shape[0]), labels])

        return out, loss

    ours = make(lambda x, w: conv_ops.conv(x, w, strides, padding, impl=impl))
    ref = make(lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                     dimension_numbers=DN))
    t = _like(w, 3)
    got = transform(name, *ours, w, x, labels, t)
    want = transform(name, *ref, w, x, labels, t)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert _rel(got, want) <= TOL[name], (name, _rel(got, want))


@pytest.mark.parametrize("impl", IMPLS)
def test_third_order_and_bfloat16(impl: str) -> None:
    """grad of grad of grad closes over B, D, W too; bfloat16 jvp keeps bfloat16."""
    if impl == "onednn":
        from resnet_jax.ops import onednn

        assert onednn.available()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4), dtype=np.float32))

    def third(conv):
        f = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
        g2 = lambda x, w: jnp.sum(jax.grad(f, 1)(x, w) ** 2)
        g3 = lambda x, w: jnp.sum(jnp.cos(jax.grad(g2, 0)(x, w)))
        return jax.jit(jax.grad(g3, (0, 1)))(x, w)

    ours = lambda x, w: conv_ops.conv(x, w, (1, 1), ((1, 1), (1, 1)), impl=impl)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=DN)
    assert _rel(third(ours), third(ref)) <= 1e-4
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y, dy = jax.jit(lambda: jax.jvp(ours, (xb, wb), (xb, wb)))()
    y_ref, dy_ref = jax.jvp(ref, (xb, wb), (xb, wb))
    assert y.dtype == dy.dtype == jnp.bfloat16
    assert _rel(y, y_ref) <= 2e-2 and _rel(dy, dy_ref) <= 2e-2


def test_xla_impl_lowers_canonical_on_cpu_and_standard_elsewhere() -> None:
    """impl="xla": canonical gradients (behind optimization_barrier) for XLA:CPU only; for
    cuda/rocm/tpu XLA's own convolution and transposes. Chosen by lowering, not by the model."""
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(conv_ops.conv(x, w, (1, 1), ((1, 1), (1, 1))) ** 2),
                         (0, 1)))
    cpu = f.trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
    assert "optimization_barrier" in cpu and cpu.count("stablehlo.convolution") == 3
    for platform in ("cuda", "rocm", "tpu"):
        text = f.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert "optimization_barrier" not in text and text.count("stablehlo.convolution") == 3


def test_no_platform_check_in_models() -> None:
    """Which kernels run is chosen at the config edge (conv_impl), never by the platform."""
    pattern = re.compile(r"default_backend|platform_dependent|\.platform\b|jax\.devices\(")
    hits = [f"{p.name}:{i}" for p in (ROOT / "resnet_jax" / "models").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# ---- the max pool -----------------------------------------------------------------------------

POOLS = {"stem": ((3, 3), (2, 2), ((1, 1), (1, 1))),  # the ImageNet stem's (Table 1)
         "3x3/1same": ((3, 3), (1, 1), "SAME")}
POOL_CASES = [(p, n) for p in POOLS for n in (TRANSFORMS if p == "stem" else REVERSE)]


@pytest.mark.parametrize(("pool", "name"), POOL_CASES, ids=[f"{n}-{p}" for p, n in POOL_CASES])
def test_max_pool_transforms_equal_flax_with_ties(pool: str, name: str) -> None:
    """As the convolutions: every transform on the stem's pool, the reverse ones on another."""
    window, stride, padding = POOLS[pool]
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 9, 9, 4)))
    x = jnp.round(x * 4) / 4  # post-ReLU and rounded: many tied maxima
    scale = jnp.linspace(0.5, 1.5, 4)
    labels = jnp.arange(3)

    def make(pool):
        def out(scale, x):
            y = pool(x * scale, window, stride, padding)
            return (jnp.sin(y) * y).mean((1, 2))

        def loss(scale, x, labels):
            return -jnp.mean(jax.nn.log_softmax(out(scale, x))[jnp.arange(x.shape[0]), labels])

        return out, loss

    t = _like(scale, 3)
    got = transform(name, *make(flax_max_pool), scale, x, labels, t)
    want = transform(name, *make(nn.max_pool), scale, x, labels, t)
    assert _rel(got, want) <= 1e-6, (name, _rel(got, want))


# ---- whole nets -------------------------------------------------------------------------------

NETS = {  # arch: (model overrides, input shape)
    "resnet20": (dict(width=4), (2, 8, 8, 3)),
    "resnet18": (dict(width=4, num_classes=5, scan_blocks=True), (2, 64, 64, 3)),
}


def _unrolled(tree):
    """The scanned layout (stageK/blocks, stacked) as the unrolled one (stageK/blockI)."""
    out = {}
    for name, sub in tree.items():
        if name.startswith("stage") and "blocks" in sub:
            sub = dict(sub)
            stacked = sub.pop("blocks")
            for i in range(jax.tree.leaves(stacked)[0].shape[0]):
                sub[f"block{i + 1}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
        out[name] = sub
    return out


@functools.cache
def _init(arch: str):
    overrides, shape = NETS[arch]
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    return x, jax.jit(models.create(arch, **overrides).init)(jax.random.key(0), x)


def _net(arch: str, impl: str | None, train: bool):
    """(out, loss, params, x, labels) for ``arch`` on ``impl``; None: the flax reference,
    fed the same (scanned-layout) parameters."""
    overrides, shape = NETS[arch]
    model = models.create(arch, **overrides, conv_impl=impl or "xla")
    x, variables = _init(arch)
    layout = lambda v: v
    if impl is None:
        model = models.create(arch, **{**overrides, "scan_blocks": False})
        layout = _unrolled
    stats = variables["batch_stats"]

    def out(params, x):
        v = {"params": layout(params), "batch_stats": layout(stats)}
        if train:
            return model.apply(v, x, train=True, mutable=["batch_stats"])[0]
        return model.apply(v, x, train=False)

    def loss(params, x, labels):
        return -jnp.mean(jax.nn.log_softmax(out(params, x))[jnp.arange(x.shape[0]), labels])

    labels = jnp.arange(shape[0]) % model.num_classes
    return out, loss, variables["params"], x, labels


class _FlaxBatchNorm(nn.BatchNorm):
    """flax's BatchNorm taking the model's ``batch_groups`` field (1 here: no ghost groups)."""

    batch_groups: int = 1
    impl: str = "xla"  # the model passes its conv_impl; flax's BatchNorm has one path


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


@functools.cache
def _reference(arch: str, train: bool, name: str):
    """The transform of the plain path: flax's nn.Conv (lax), nn.max_pool, nn.BatchNorm."""
    def unreachable(*args, **kwargs):
        raise AssertionError("the reference reached resnet_jax.ops.norm")

    with (mock.patch.object(norm_ops, "BatchNorm", _FlaxBatchNorm),
          mock.patch.object(norm_ops, "batch_norm_train", unreachable)):
        out, loss, params, x, labels = _net(arch, None, train)
        used = _primitives(jax.make_jaxpr(out)(params, x).jaxpr)
        assert not {p for p in used if "resnet_jax" in p or "custom_vjp" in p}, used
        return transform(name, out, loss, params, x, labels, _like(params, 3))


# Whole nets, on both kernel paths: one transform of each kind of rule (forward mode, forward
# over reverse, reverse over reverse, vmap of reverse) in train mode (batch-statistics BN: the
# custom_jvp with its stats tangents) on the scanned CIFAR net; forward mode and grad of grad
# on the ImageNet net (stem max pool); forward mode in eval mode. linearize, jacfwd and hessian
# reuse the same rules; every transform runs on every primitive above. Each case compiles a
# whole net twice (~11 s on 2 cores), so the matrix is kept to these.
NET_CASES = [("resnet20", True, n) for n in ("jvp", "hvp", "grad_of_grad", "per_example")] + [
    ("resnet18", True, "jvp"), ("resnet18", True, "grad_of_grad"), ("resnet20", False, "jvp")]


@pytest.mark.parametrize(("arch", "train", "name"), NET_CASES,
                         ids=[f"{a}-{'train' if t else 'eval'}-{n}" for a, t, n in NET_CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_net_transforms_equal_the_plain_flax_path(arch: str, impl: str, train: bool,
                                                  name: str) -> None:
    out, loss, params, x, labels = _net(arch, impl, train)
    got = transform(name, out, loss, params, x, labels, _like(params, 3))
    want = _reference(arch, train, name)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    tol = TOL[name] * (ONEDNN_FACTOR if impl == "onednn" else 1)
    assert _rel(got, want) <= tol, (name, _rel(got, want))
