"""Training-mode BN(+add)(+ReLU) on four primitives whose CPU kernels XLA cannot misfuse.

XLA:CPU fuses the normalised input ``xhat`` into the forward output and into the backward
reductions, so it materialises ``xhat`` (one more activation-sized buffer per BN) and runs each
reduction to f32[C] as a fusion of its own (benchmarks/op_profile.py). Here the op is written on
four primitives; with ``impl="onednn"`` on CPU the two reductions and the forward's
normalise(+add)(+ReLU) are the fused kernels of :mod:`resnet_jax.ops.fused_bn` (rows split
over XLA's thread pool, per-thread partial sums), which read ``x``, ``y`` and the cotangent
directly; the backward's elementwise part stays XLA's, one pass. Everywhere else
(``impl="xla"``, GPU, TPU) each primitive lowers to its plain ``lax`` reference, the same
function.

* ``stats(x) -> (2, C)``: ``[mean(x), mean(x^2)]`` over all axes but the last.
* ``apply(x, coef[, r]) -> y``: ``(x - coef0) * coef1 + coef2 (+ r)``, then ReLU under
  ``relu``: the forward output, opaque so XLA cannot recompute it inside later fusions.
* ``grad_stats(g, y, x, mean, inv_std) -> (2, C)``: ``[mean(g'), mean(g' xhat)]`` with
  ``g' = g * (y > 0)`` under ``relu`` (the ReLU mask read from the output, as PyTorch's in-place
  ReLU), ``xhat = (x - mean) * inv_std``. Linear in ``g``.
* ``tangent(dx, dscale, dbias, dm[, dr]; x, y, mean, inv_std, scale) -> dy``: the JVP of
  ``y = relu(bn(x) + r)`` given ``dm = [mean(dx), mean(xhat dx)]`` (averaged over devices by
  the caller): ``mask * (a dx + xhat (dscale - a dm1) + (dbias - a dm0) + dr)``, ``a = inv_std *
  scale``. Linear in its first four (five) operands; its transpose is one ``grad_stats`` call
  and elementwise work, which is how ``grad`` reaches the fused backward.

Every primitive has a JVP (its reference's, in ``lax``), a transpose where it is linear, and a
vmap rule (its reference, vmapped), so ``jvp``, ``grad``, grad-of-grad, ``hessian`` and
``vmap`` of any of them compose (tests/test_norm.py); only first-order ``grad`` of the
training step runs the kernels everywhere, higher orders run ``lax`` for the derivative parts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch as _dispatch  # no public registry of device-needing primitives
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from resnet_jax.errors import ConfigError

Array = Any

stats_p = Primitive("resnet_jax_bn_stats")
grad_stats_p = Primitive("resnet_jax_bn_grad_stats")
tangent_p = Primitive("resnet_jax_bn_tangent")
apply_p = Primitive("resnet_jax_bn_apply")

# The reductions' CPU kernels (``impl="onednn"``) partition themselves over a mesh
# (custom_partitioning), as the conv kernels do: lowered with their devices known.
_dispatch.prim_requires_devices_during_lowering.update((stats_p, grad_stats_p, apply_p))


def _axes(x: Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _rows(x: Array) -> int:
    return x.size // x.shape[-1]


# ---- the lax references (the function, and every non-CPU lowering) ------------------------------

def _stats_ref(x, *, impl):
    xf = x.astype(jnp.float32)
    return jnp.stack([xf.mean(_axes(x)), lax.square(xf).mean(_axes(x))])


def _masked(g, y, relu):
    return jnp.where(y > 0, g, jnp.zeros_like(g)) if relu else g


def _grad_stats_ref(g, y, x, mean, inv_std, *, relu, impl):
    gm = _masked(g, y, relu).astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * inv_std
    return jnp.stack([gm.mean(_axes(g)), (gm * xhat).mean(_axes(g))])


def _tangent_ref(*args, relu, has_residual, impl):
    n = 5 if has_residual else 4
    dx, dscale, dbias, dm = args[:4]
    dr = args[4] if has_residual else None
    x, y, mean, inv_std, scale = args[n:]
    a = inv_std * scale
    xhat = (x.astype(jnp.float32) - mean) * inv_std
    dz = a * dx + xhat * (dscale - a * dm[1]) + (dbias - a * dm[0])
    dz = dz.astype(y.dtype)
    if dr is not None:
        dz = dz + dr.astype(y.dtype)
    return _masked(dz, y, relu)


def _apply_ref(x, coef, *residual, relu, impl):
    y = (x - coef[0]) * coef[1] + coef[2]
    if residual:
        y = y + residual[0].astype(y.dtype)
    return jnp.maximum(y, 0) if relu else y


_REFS = {stats_p: _stats_ref, grad_stats_p: _grad_stats_ref, tangent_p: _tangent_ref,
         apply_p: _apply_ref}


# ---- shapes -------------------------------------------------------------------------------------

def _per_channel_shape(x, *rest, **params):
    return ShapedArray((2, x.shape[-1]), jnp.float32)


def _tangent_shape(*args, relu, has_residual, impl):
    n = 5 if has_residual else 4
    x, y = args[n], args[n + 1]
    return ShapedArray(x.shape, y.dtype)


stats_p.def_abstract_eval(_per_channel_shape)
grad_stats_p.def_abstract_eval(_per_channel_shape)
tangent_p.def_abstract_eval(_tangent_shape)
apply_p.def_abstract_eval(lambda x, *rest, **params: ShapedArray(x.shape, x.dtype))


# ---- JVPs: the references' (lax), primal outputs from the primitive itself -----------------------

def _jvp(prim):
    ref = _REFS[prim]

    def rule(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        out = prim.bind(*primals, **params)
        _, dout = jax.jvp(functools.partial(ref, **params), tuple(primals), tuple(tangents))
        return out, dout

    return rule


for _p in _REFS:
    ad.primitive_jvps[_p] = _jvp(_p)


# ---- transposes ---------------------------------------------------------------------------------

def _grad_stats_transpose(ct, g, y, x, mean, inv_std, *, relu, impl):
    if any(ad.is_undefined_primal(v) for v in (y, x, mean, inv_std)):
        raise NotImplementedError("resnet_jax BN grad_stats is linear in its cotangent only")
    if type(ct) is ad.Zero:
        return None, None, None, None, None
    xhat = (x.astype(jnp.float32) - mean) * inv_std
    g_bar = ((ct[0] + xhat * ct[1]) / _rows(x)).astype(g.aval.dtype)
    return _masked(g_bar, y, relu), None, None, None, None


def _tangent_transpose(ct, *args, relu, has_residual, impl):
    n = 5 if has_residual else 4
    lin, (x, y, mean, inv_std, scale) = args[:n], args[n:]
    if any(ad.is_undefined_primal(v) for v in (x, y, mean, inv_std, scale)):
        raise NotImplementedError("resnet_jax BN tangent is linear in its tangents only")
    if type(ct) is ad.Zero:
        return [None] * len(args)
    # sum(g') and sum(g' xhat) in one kernel: dbias, dscale, and the dm terms share them.
    sums = grad_stats_p.bind(ct, y, x, mean, inv_std, relu=relu, impl=impl) * _rows(x)
    gm = _masked(ct, y, relu)
    a = inv_std * scale
    out = [
        (a * gm).astype(lin[0].aval.dtype),  # dx, the direct term (the dm terms come back
        sums[1].astype(lin[1].aval.dtype),   # through grad_stats' transpose, fused by XLA)
        sums[0].astype(lin[2].aval.dtype),
        -a * sums,
    ]
    if has_residual:
        out.append(gm.astype(lin[4].aval.dtype))
    out = [o if ad.is_undefined_primal(v) else None for o, v in zip(out, lin, strict=True)]
    return out + [None] * 5


ad.primitive_transposes[grad_stats_p] = _grad_stats_transpose
ad.primitive_transposes[tangent_p] = _tangent_transpose


# ---- vmap: the reference, vmapped --------------------------------------------------------------

def _batcher(prim):
    ref = _REFS[prim]

    def rule(args, dims, **params):
        return jax.vmap(functools.partial(ref, **params), in_axes=tuple(dims))(*args), 0

    return rule


for _p in _REFS:
    batching.primitive_batchers[_p] = _batcher(_p)


# ---- lowering and eager ----------------------------------------------------------------------

def _kernels(impl: str) -> Any:
    if impl != "onednn":
        raise ConfigError(f"BN impl={impl!r} has no CPU kernels; use 'onednn' or 'xla'")
    from resnet_jax.ops import fused_bn  # the extension: built and loaded on first use

    return fused_bn


def _cpu_stats(x, *, impl):
    return _kernels(impl).stats(x)


def _cpu_grad_stats(g, y, x, mean, inv_std, *, relu, impl):
    return _kernels(impl).bwd_stats(g, y if relu else None, x, jnp.stack([mean, inv_std]),
                                    relu)


def _cpu_apply(x, coef, *residual, relu, impl):
    return _kernels(impl).apply(x, coef, residual[0] if residual else None, relu)


@functools.cache
def _eager(prim, items: tuple) -> Callable:
    return jax.jit(functools.partial(prim.bind, **dict(items)))


for _p in _REFS:
    _p.def_impl(functools.partial(
        lambda prim, *args, **params: _eager(prim, tuple(sorted(params.items())))(*args), _p))
    mlir.register_lowering(_p, mlir.lower_fun(_REFS[_p], multiple_results=False))
mlir.register_lowering(stats_p, mlir.lower_fun(_cpu_stats, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(apply_p, mlir.lower_fun(_cpu_apply, multiple_results=False),
                       platform="cpu")
mlir.register_lowering(grad_stats_p, mlir.lower_fun(_cpu_grad_stats, multiple_results=False),
                       platform="cpu")


# ---- the op -----------------------------------------------------------------------------------

def _pmean(s, axis_name, axis_index_groups):
    if axis_name is None:
        return s
    return lax.pmean(s, axis_name, axis_index_groups=axis_index_groups)


def variance(mean: Array, mean2: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """(var, raw_var, inv_std) from E[x] and E[x^2]: flax's fast variance, clipped at 0, and
    1/sqrt(var + epsilon). Shared by this module's primitives and ops/norm.py's lax path."""
    raw_var = mean2 - lax.square(mean)
    var = jnp.maximum(0.0, raw_var)
    return var, raw_var, lax.rsqrt(var + epsilon)


def _primal(x, scale, bias, residual, epsilon, axis_name, axis_index_groups, relu, impl):
    s = _pmean(stats_p.bind(x, impl=impl), axis_name, axis_index_groups)
    mean = s[0]
    var, raw_var, inv_std = variance(mean, s[1], epsilon)
    # One opaque pass: as XLA's fusion, y was recomputed from x inside later fusions (the
    # backward's ReLU masks re-derived a whole residual chain of outputs in one loop).
    coef = jnp.stack([mean, inv_std * scale, bias])
    y = apply_p.bind(x, coef, *(() if residual is None else (residual,)), relu=relu, impl=impl)
    return y, mean, var, raw_var, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8))
def bn_act(x: Array, scale: Array, bias: Array, residual: Array | None, epsilon: float,
           axis_name: str | None, axis_index_groups: Any, relu: bool,
           impl: str) -> tuple[Array, Array, Array]:
    """(``relu(bn(x) + residual)``, batch mean, batch var) for float32 ``x`` (N..., C), the
    statistics over all axes but the last (and over ``axis_name``'s devices)."""
    y, mean, var, _, _ = _primal(x, scale, bias, residual, epsilon, axis_name,
                                 axis_index_groups, relu, impl)
    return y, mean, var


@bn_act.defjvp
def _bn_act_jvp(epsilon, axis_name, axis_index_groups, relu, impl, primals, tangents):
    x, scale, bias, residual = primals
    dx, dscale, dbias, dresidual = tangents
    y, mean, var, raw_var, inv_std = _primal(x, scale, bias, residual, epsilon, axis_name,
                                             axis_index_groups, relu, impl)
    # dm = [mean(dx), mean(xhat dx)]: grad_stats without the mask; its transpose is elementwise.
    dm = _pmean(grad_stats_p.bind(dx, x, x, mean, inv_std, relu=False, impl=impl), axis_name,
                axis_index_groups)
    lin = (dx, dscale, dbias, dm) + (() if residual is None else (dresidual,))
    dy = tangent_p.bind(*lin, x, y, mean, inv_std, scale, relu=relu,
                        has_residual=residual is not None, impl=impl)
    d_var = jnp.where(raw_var > 0, 2.0 * dm[1] / inv_std, 0.0)  # 2 mean((x - mean) dx)
    return (y, mean, var), (dy, dm[0], d_var)
