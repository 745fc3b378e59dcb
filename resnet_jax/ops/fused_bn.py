"""Fused batch-norm kernels for XLA:CPU: the raw FFI calls of ``bn_kernels.cc``.

XLA:CPU runs batch norm's per-channel reductions single-threaded per fusion and splits BN + ReLU
into several passes; these kernels do each step in one pass over the rows, split over XLA's own
thread pool as the oneDNN convolutions are (``split`` = :func:`onednn.threads_per_call`). They
are built into the oneDNN extension's library (:func:`onednn.load`; where it cannot be built,
every function here raises :class:`~resnet_jax.errors.ExtensionUnavailable`).

Arrays are float32, channels last, any rank >= 2 (every axis but the last is a row); per-channel
vectors are float32 (k, C)::

    stats(x)                          -> [mean(x), mean(x * x)]                         (2, C)
    apply(x, coef, residual, relu)    -> (x - coef[0]) * coef[1] + coef[2] [+ residual] [relu]
    bwd_stats(g, y, x, mi, relu)      -> [mean(g'), mean(g' * xhat)]                    (2, C)
    bwd_apply(g, y, x, coef, relu, emit_masked) -> dx [, g']
        g' = g * (y > 0) if relu else g;  xhat = (x - mi[0]) * mi[1]
        coef = [mean, inv_std, a, m_g, m_gx];  dx = a * (g' - m_g - xhat * m_gx)

Means are over all rows (double accumulation; the same bits for any ``split``). No autodiff
rules (``resnet_jax.ops.norm`` owns those); ``vmap`` runs the calls one example at a time. Under
``jit`` over a mesh each call runs on its shard of the batch (axis 0): the per-channel inputs
are replicated, :func:`stats` and :func:`bwd_stats` average the shards' means over the batch
axes (shards are equal), :func:`apply` and :func:`bwd_apply` are rowwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.ops import onednn

Array = jax.Array

# target -> (operand roles, result roles): "x" rowwise (batch-sharded), "v" per-channel (k, C)
_SIGNATURES = {
    "bn_stats": ("x", "v"),
    "bn_apply": ("xv", "x"),
    "bn_apply_add": ("xvx", "x"),
    "bn_bwd_stats": ("xxxv", "v"),
    "bn_bwd_apply": ("xxxv", "x"),
    "bn_bwd_apply_masked": ("xxxv", "xx"),
}
_REDUCES = {"bn_stats", "bn_bwd_stats"}


def _ffi(target: str, arrays: tuple[Array, ...], relu: bool, split: int) -> Any:
    """One FFI call of ``resnet_jax_<target>`` on (local) ``arrays``."""
    ins, outs = _SIGNATURES[target]
    x = arrays[ins.index("x")]
    shapes = [jax.ShapeDtypeStruct(x.shape if r == "x" else (2, x.shape[-1]), jnp.float32)
              for r in outs]
    attrs = {"split": np.int64(split)}
    if target != "bn_stats":
        attrs["relu"] = np.int64(relu)
    return jax.ffi.ffi_call(
        f"resnet_jax_{target}", shapes[0] if len(shapes) == 1 else shapes,
        vmap_method="sequential",
    )(*arrays, **attrs)


def _rule(target: str, rank: int) -> tuple[str, tuple[str, ...]]:
    """The einsum-like sharding rule of ``target`` on rank-``rank`` arrays, and its reduction
    factors: "n d1 .. c" for rowwise operands, "k<i> c" for per-channel ones."""
    ins, outs = _SIGNATURES[target]
    rows = ["n", *(f"d{i}" for i in range(1, rank - 1))]
    x = " ".join([*rows, "c"])
    operands = [x if r == "x" else f"k{i} c" for i, r in enumerate(ins)]
    results = [x if r == "x" else f"r{i} c" for i, r in enumerate(outs)]
    reduction = tuple(rows) if target in _REDUCES else ()
    return f"{', '.join(operands)} -> {', '.join(results)}", reduction


@functools.cache
def _partitioned(target: str, rank: int) -> Any:
    """``target``'s FFI call under ``custom_partitioning`` (static args: relu, split)."""
    ins, outs = _SIGNATURES[target]
    n = len(ins)

    def call(*args):
        return _ffi(target, args[:n], *args[n:])

    fn = custom_partitioning(call, static_argnums=(n, n + 1))
    reduces = target in _REDUCES

    def shardings(mesh, arg_shapes):
        axes = onednn.batch_axes(arg_shapes[ins.index("x")].sharding)
        batch, replicated = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
        args = tuple(batch if r == "x" else replicated for r in ins)
        results = tuple(batch if r == "x" else replicated for r in outs)
        return axes, args, results[0] if len(results) == 1 else list(results)  # as _ffi's

    def infer(relu, split, mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    def partition(relu, split, mesh, arg_shapes, result_shape):
        axes, args, result = shardings(mesh, arg_shapes)

        def lower(*arrays):
            out = _ffi(target, arrays, relu, split)
            # each shard's means over its rows; the shards are equal, so their mean is the mean
            return jax.lax.pmean(out, axes) if reduces and axes is not None else out

        return mesh, lower, result, args

    rule, reduction = _rule(target, rank)
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     reduction_factors=reduction)
    return fn


def _run(target: str, arrays: tuple[Array, ...], relu: bool, split: int | None) -> Any:
    onednn.load()  # register the targets before anything is lowered
    split = onednn.threads_per_call() if split is None else int(split)
    return _partitioned(target, arrays[0].ndim)(*arrays, bool(relu), split)


def _rowwise(op: str, name: str, a: Any, like: Any = None) -> None:
    """``a``: float32, rank >= 2 (and ``like``'s shape where given), else a TypeError."""
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"fused_bn.{op}: {name} must be an array, not {type(a).__name__}")
    if dtype != jnp.float32:
        raise TypeError(f"fused_bn.{op}: {name} is {dtype}; the kernels take float32 only "
                        f"(cast with .astype(jnp.float32), or use ops.norm's XLA path)")
    if like is not None and tuple(shape) != tuple(like.shape):
        raise TypeError(f"fused_bn.{op}: {name} has shape {tuple(shape)}; it must have x's "
                        f"shape {tuple(like.shape)}")
    if like is None and len(shape) < 2:
        raise TypeError(f"fused_bn.{op}: {name} has shape {tuple(shape)}; it must have rank "
                        ">= 2, channels last (reshape a vector to (rows, C))")


def _per_channel(op: str, name: str, v: Any, k: int, x: Array) -> None:
    shape, dtype = getattr(v, "shape", None), getattr(v, "dtype", None)
    want = (k, x.shape[-1])
    if shape is None or tuple(shape) != want or dtype != jnp.float32:
        raise TypeError(f"fused_bn.{op}: {name} must be float32 {want} (k = {k}, C = x's last "
                        f"dimension), not {dtype} {None if shape is None else tuple(shape)}")


def _has_rows(op: str, x: Array) -> None:
    if x.size == 0 and x.shape[-1] != 0:
        raise TypeError(f"fused_bn.{op}: x of shape {tuple(x.shape)} has no rows to average")


def stats(x: Array, *, split: int | None = None) -> Array:
    """(2, C): ``[mean(x), mean(x * x)]`` over every axis of ``x`` but the last.

    ``split``: row chunks on XLA's thread pool (default :func:`onednn.threads_per_call`).
    """
    _rowwise("stats", "x", x)
    _has_rows("stats", x)
    return _run("bn_stats", (x,), False, split)


def apply(x: Array, coef: Array, residual: Array | None = None, relu: bool = False, *,
          split: int | None = None) -> Array:
    """``(x - coef[0]) * coef[1] + coef[2]`` (+ ``residual``), then ``max(., 0)`` if ``relu``;
    ``coef`` is float32 (3, C)."""
    _rowwise("apply", "x", x)
    _per_channel("apply", "coef", coef, 3, x)
    if residual is None:
        return _run("bn_apply", (x, coef), relu, split)
    _rowwise("apply", "residual", residual, like=x)
    return _run("bn_apply_add", (x, coef, residual), relu, split)


def _gradients(op: str, g: Array, y: Array | None, x: Array, relu: bool) -> Array:
    """Checks g, y, x; returns the y to pass (``g`` stands in, unread, where relu is off)."""
    _rowwise(op, "x", x)
    _rowwise(op, "g", g, like=x)
    if y is None:
        if relu:
            raise TypeError(f"fused_bn.{op}: relu=True needs y (the forward output) for "
                            "its mask")
        return g
    _rowwise(op, "y", y, like=x)
    return y


def bwd_stats(g: Array, y: Array | None, x: Array, mi: Array, relu: bool = False, *,
              split: int | None = None) -> Array:
    """(2, C): ``[mean(g'), mean(g' * xhat)]``, ``g' = g * (y > 0)`` if ``relu`` else ``g``,
    ``xhat = (x - mi[0]) * mi[1]``; ``mi`` is float32 (2, C) = [mean, inv_std]. ``y`` is read
    only with ``relu`` (``None`` is fine without)."""
    y = _gradients("bwd_stats", g, y, x, relu)
    _per_channel("bwd_stats", "mi", mi, 2, x)
    _has_rows("bwd_stats", x)
    return _run("bn_bwd_stats", (g, y, x, mi), relu, split)


def bwd_apply(g: Array, y: Array | None, x: Array, coef: Array, relu: bool = False,
              emit_masked: bool = False, *, split: int | None = None
              ) -> Array | tuple[Array, Array]:
    """``dx = a * (g' - m_g - xhat * m_gx)`` with ``coef`` float32 (5, C) = [mean, inv_std, a,
    m_g, m_gx], ``xhat = (x - mean) * inv_std``, ``g'`` as in :func:`bwd_stats`; ``(dx, g')``
    with ``emit_masked``."""
    y = _gradients("bwd_apply", g, y, x, relu)
    _per_channel("bwd_apply", "coef", coef, 5, x)
    target = "bn_bwd_apply_masked" if emit_masked else "bn_bwd_apply"
    out = _run(target, (g, y, x, coef), relu, split)
    return tuple(out) if emit_masked else out
