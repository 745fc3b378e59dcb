"""NHWC max pooling with a cheap backward pass: a drop-in for ``flax.linen.max_pool``.

XLA:CPU differentiates ``reduce_window`` max into a select-and-scatter that is the slowest op
of a ResNet-50 CPU step after the convolutions (~10 % of it). Here the max pool is a
``jax.custom_jvp``: the forward pass also records which of the k*k window positions won (an
int8 code; the first maximum in row-major window order wins, as XLA's), and the tangent is the
input tangent gathered at the winners: ``select_n(code, *k*k strided views of the zero-padded
tangent)``. That tangent is linear in plain ``lax`` ops, so every transform composes (jvp,
linearize, jacfwd, hessian, grad-of-grad, vmap), and its transpose, what ``grad`` runs, places
the cotangent with k*k strided pads from the int8 code: 0.43x the time of XLA's forward +
backward on the ImageNet stem's 112x112x64 maps, same values and gradients (ties included;
tests/test_pool.py). Used by ``conv_impl="onednn"`` (the CPU fast path).

The tangent map and its transpose are two primitives, ``gather_p`` (the tangent at the
winners) and ``scatter_p`` (a cotangent placed at the winners), each the other's transpose,
each linear (its JVP is itself), batched by folding vmap's axis into the images. Both lower to
the lax formulation above; with ``impl="onednn"`` on CPU ``scatter_p`` runs one kernel of the
FFI library (``pool_kernels.cc``) that writes the input gradient once: in a ResNet-50 train
step XLA:CPU wrote the k*k transposed pads out one by one, 9 full-size buffers (~140 ms of a
2.6 s step at batch 32; benchmarks/RESULTS.md). Under ``jit`` over a mesh the kernel runs on
each shard of the batch (``custom_partitioning``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch as _dispatch  # no public registry of device-needing primitives
from jax.core import ShapedArray
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import ConfigError
from resnet_jax.ops import onednn

Pads = tuple[tuple[int, int], tuple[int, int]]


def _windows(x: jax.Array, k: int, s: int, pads: Pads, fill: float = -jnp.inf) -> list[jax.Array]:
    """The k*k strided views of the (``fill``) padded input, in row-major window order."""
    (pt, pb), (pl, pr) = pads
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    h, w = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    return [lax.slice(xp, (0, di, dj, 0),
                      (xp.shape[0], di + (h - 1) * s + 1, dj + (w - 1) * s + 1, xp.shape[3]),
                      (1, s, s, 1))
            for di in range(k) for dj in range(k)]


def _winners(views: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(max, int8 code of the first position attaining it) over the window views."""
    y, code = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for n, v in enumerate(views[1:], 1):
        code = jnp.where(v > y, jnp.int8(n), code)  # strictly greater: the first maximum wins
        y = jnp.maximum(y, v)
    return y, code


IMPLS = ("xla", "onednn")

# ---- the tangent at the winners and its transpose, as primitives ---------------------------

gather_p = Primitive("resnet_jax_pool_gather")  # (code, t) -> t at each window's winner
scatter_p = Primitive("resnet_jax_pool_scatter")  # (code, g) -> g at the winners, summed
_dispatch.prim_requires_devices_during_lowering.add(scatter_p)  # its kernel partitions itself


def _gather_ref(code, t, *, k, s, pads, impl):
    # zero padding: a padded position never wins over a real one (every window holds one)
    return lax.select_n(code, *_windows(t, k, s, pads, fill=0))


def _scatter_ref(code, g, *, k, s, pads, size, impl):
    like = jax.ShapeDtypeStruct((g.shape[0], *size, g.shape[3]), g.dtype)
    gather = functools.partial(_gather_ref, code, k=k, s=s, pads=pads, impl=impl)
    return jax.linear_transpose(gather, like)(g)[0]  # k*k strided pads of g, summed


gather_p.def_abstract_eval(lambda code, t, **_: ShapedArray(code.shape, t.dtype))
scatter_p.def_abstract_eval(
    lambda code, g, *, size, **_: ShapedArray((g.shape[0], *size, g.shape[3]), g.dtype))


def _linear_jvp(prim):
    def rule(primals, tangents, **params):
        code, a = primals
        return (prim.bind(code, a, **params),
                prim.bind(code, ad.instantiate_zeros(tangents[1]), **params))

    return rule


def _gather_transpose(ct, code, t, *, k, s, pads, impl):
    if ad.is_undefined_primal(code) or not ad.is_undefined_primal(t):
        raise NotImplementedError("resnet_jax pool gather is linear in its tangent only")
    if type(ct) is ad.Zero:
        return None, ad.Zero(t.aval)
    return None, scatter_p.bind(code, ct, k=k, s=s, pads=pads, size=tuple(t.aval.shape[1:3]),
                                impl=impl)


def _scatter_transpose(ct, code, g, *, k, s, pads, size, impl):
    if ad.is_undefined_primal(code) or not ad.is_undefined_primal(g):
        raise NotImplementedError("resnet_jax pool scatter is linear in its cotangent only")
    if type(ct) is ad.Zero:
        return None, ad.Zero(g.aval)
    return None, gather_p.bind(code, ct, k=k, s=s, pads=pads, impl=impl)


def _batcher(prim):
    """vmap: the mapped axis moved to the front and folded into the images (both ops act on
    each image alone), an unmapped operand broadcast."""

    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        code, a = (jnp.broadcast_to(x, (size, *x.shape)) if d is None
                   else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims, strict=True))
        out = prim.bind(code.reshape(-1, *code.shape[2:]), a.reshape(-1, *a.shape[2:]),
                        **params)
        return out.reshape(size, -1, *out.shape[1:]), 0

    return rule


for _p, _ref in ((gather_p, _gather_ref), (scatter_p, _scatter_ref)):
    ad.primitive_jvps[_p] = _linear_jvp(_p)
    batching.primitive_batchers[_p] = _batcher(_p)
    _p.def_impl(functools.partial(_dispatch.apply_primitive, _p))  # eager: jit of the bind
    mlir.register_lowering(_p, mlir.lower_fun(_ref, multiple_results=False))
ad.primitive_transposes[gather_p] = _gather_transpose
ad.primitive_transposes[scatter_p] = _scatter_transpose


# ---- the CPU kernel ---------------------------------------------------------------------------

def _scatter_ffi(code, g, size, k, s, pt, pl, split):
    return jax.ffi.ffi_call(
        "resnet_jax_pool_scatter",
        jax.ShapeDtypeStruct((g.shape[0], *size, g.shape[3]), g.dtype),
        vmap_method="sequential",  # not reached: scatter_p's vmap rule comes first
    )(code, g, k=np.int64(k), s=np.int64(s), pad_top=np.int64(pt), pad_left=np.int64(pl),
      split=np.int64(split))


@functools.cache
def _partitioned_scatter() -> Any:
    """The kernel under ``custom_partitioning``: each device scatters its shard of the batch
    (the images are independent), never gathering the whole batch."""
    fn = custom_partitioning(_scatter_ffi, static_argnums=(2, 3, 4, 5, 6, 7))

    def infer(size, k, s, pt, pl, split, mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P(onednn.batch_axes(arg_shapes[1].sharding)))

    def partition(size, k, s, pt, pl, split, mesh, arg_shapes, result_shape):
        batch = NamedSharding(mesh, P(onednn.batch_axes(arg_shapes[1].sharding)))

        def lower(code, g):
            return _scatter_ffi(code, g, size, k, s, pt, pl, split)

        return mesh, lower, batch, (batch, batch)

    fn.def_partition(partition, infer_sharding_from_operands=infer,
                     sharding_rule="n p q c, n p q c -> n h w c")
    return fn


def _cpu_scatter(code, g, *, k, s, pads, size, impl):
    if impl != "onednn" or g.dtype != jnp.float32:  # the kernel is float32
        return _scatter_ref(code, g, k=k, s=s, pads=pads, size=size, impl=impl)
    onednn.load()  # the extension: built and loaded on first use
    return _partitioned_scatter()(code, g, tuple(size), k, s, pads[0][0], pads[1][0],
                                  onednn.threads_per_call())


mlir.register_lowering(scatter_p, mlir.lower_fun(_cpu_scatter, multiple_results=False),
                       platform="cpu")


# ---- the op -----------------------------------------------------------------------------------

@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def max_pool(x: jax.Array, k: int, s: int, pads: Pads, impl: str = "xla") -> jax.Array:
    """k x k max pool with stride s and explicit padding over the H, W axes of NHWC ``x``;
    ``impl="onednn"``: its backward on the CPU kernel (see the module docstring)."""
    return functools.reduce(jnp.maximum, _windows(x, k, s, pads))


@max_pool.defjvp
def _jvp(k, s, pads, impl, primals, tangents):
    (x,), (t,) = primals, tangents
    code = _winners(_windows(x, k, s, pads))[1]  # its max is y's: XLA computes the chain once
    # y through max_pool itself, so a transform of this rule (forward-over-reverse, jvp of
    # jvp) differentiates y by this rule too, not by jnp.maximum's tie-splitting one.
    y = max_pool(x, k, s, pads, impl)
    # The tangent at each window's winner. Transposed (grad): scatter_p, the cotangent placed
    # at the winners.
    return y, gather_p.bind(code, t, k=k, s=s, pads=pads, impl=impl)


def flax_max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
                  padding: Sequence[tuple[int, int]] | str = "VALID", *,
                  impl: str = "xla") -> jax.Array:
    """``flax.linen.max_pool``'s signature for square 2-D windows and strides on NHWC input;
    ``impl`` as :func:`max_pool`'s."""
    if impl not in IMPLS:
        raise ConfigError(f"max pool impl={impl!r} is not one of {IMPLS}")
    strides = tuple(strides or (1, 1))
    if (x.ndim != 4 or len(window_shape) != 2 or window_shape[0] != window_shape[1]
            or strides[0] != strides[1] or window_shape[0] ** 2 > 127):
        raise ConfigError(f"resnet_jax.ops.pool.max_pool takes NHWC input with a square window "
                          f"and stride (got {x.shape}, {tuple(window_shape)}, {strides}); use "
                          "flax.linen.max_pool")
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return max_pool(x, int(window_shape[0]), int(strides[0]), pads, impl)
