"""2-D convolution as three bilinear primitives, so every JAX transform composes on every path.

The convolution ``B(x, w) = y`` (NHWC x HWIO -> NHWC), its input gradient ``D(g, w) = dx`` and
its weight gradient ``W(x, g) = dw`` are each a primitive, bilinear in its two operands. With
``T(x, w, g) = <g, B(x, w)>`` every transpose is again one of the three::

    B in x: D(ct, w)     B in w: W(x, ct)
    D in g: B(ct, w)     D in w: W(ct, g)
    W in x: D(g, ct)     W in g: B(x, ct)

so ``jvp`` (the bilinear rule: ``B(dx, w) + B(x, dw)``), ``grad``, ``linearize``, ``jacfwd``,
``hessian``, grad-of-grad and ``vmap`` of any of them all stay inside the set, and each
primitive keeps the kernel its ``impl`` chose. ``impl`` (a parameter, chosen once at the config
edge: ``conv_impl`` / ``--config.conv``) selects the kernels where they exist:

* ``"xla"`` on CPU: ``B`` is ``lax.conv_general_dilated``; for stride 1, ``D`` and ``W`` are
  written as canonical ``NHWC x HWIO`` convolutions (below) behind ``optimization_barrier``.
  Inside a ``while`` loop (``nn.scan`` over identical blocks) XLA:CPU does not rewrite the
  backward convolutions into that canonical form it runs through its fast library kernels; the
  weight gradient then runs through a naive loop, about 60x slower (measured: a 2-conv scan's
  gradient took 1.85 s against 55 ms unrolled; canonical, 32 ms). Other strides lower as XLA's
  own transposes.
* ``"onednn"`` on CPU: the oneDNN FFI kernels that :mod:`resnet_jax.ops.onednn` registers here
  (:func:`register_cpu_kernels`, done when that module is imported).
* any ``impl`` on every other platform (cuda, rocm, tpu): XLA's convolution and its standard
  transposes (what ``jax.linear_transpose`` of ``lax.conv_general_dilated`` lowers to).

``vmap``: a batched activation under an unbatched kernel folds into the primitive's own batch
(one call); anything else (per-example weight gradients, batched kernels) is one kernel call
per element (``lax.map``) for ``"onednn"``, and for ``"xla"`` XLA's batched convolution, except
per-example weight gradients on CPU: one canonical call per example (see the batching rule).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch as _dispatch  # no public registry of device-needing primitives
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from resnet_jax.errors import ConfigError, ExtensionUnavailable

DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("xla", "onednn")
KINDS = ("fwd", "input_grad", "weight_grad")
Pads = tuple[tuple[int, int], tuple[int, int]]
# kernel(kind, a, b, out_shape, strides, padding) -> array: a CPU implementation of one kind
CpuKernel = Callable[..., jax.Array]

conv_p = Primitive("resnet_jax_conv")  # B(x, w) -> y
conv_input_grad_p = Primitive("resnet_jax_conv_input_grad")  # D(g, w; in_hw) -> dx
conv_weight_grad_p = Primitive("resnet_jax_conv_weight_grad")  # W(x, g; kernel_hw) -> dw
_PRIMS = {"fwd": conv_p, "input_grad": conv_input_grad_p, "weight_grad": conv_weight_grad_p}

_CPU_KERNELS: dict[str, CpuKernel] = {}


def register_cpu_kernels(impl: str, kernel: CpuKernel, *, needs_devices: bool = False) -> None:
    """Make ``kernel`` the CPU lowering of all three primitives for ``impl`` (not "xla").

    ``needs_devices``: the kernel partitions itself over the mesh (``custom_partitioning``),
    so programs holding these primitives are lowered with their devices known, as JAX does for
    ``custom_partitioning`` itself.
    """
    if impl not in IMPLS or impl == "xla":
        raise ConfigError(f"CPU kernels register for one of {IMPLS[1:]}, not {impl!r}.")
    _CPU_KERNELS[impl] = kernel
    if needs_devices:
        _dispatch.prim_requires_devices_during_lowering.update(_PRIMS.values())


def out_hw(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int],
           padding: Pads) -> tuple[int, int]:
    """The output's (H, W) of a convolution with these sizes, strides and padding."""
    return tuple((n + lo + hi - k) // s + 1  # type: ignore[return-value]
                 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding, strict=True))


# ---- the standard (XLA) functions: forward and its linear transposes ---------------------------

def _xla_fwd(x: jax.Array, w: jax.Array, *, strides: tuple[int, int], padding: Pads) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _xla_input_grad(g, w, *, strides, padding, in_hw):
    x = jax.ShapeDtypeStruct((g.shape[0], *in_hw, w.shape[2]), g.dtype)
    fwd = functools.partial(_xla_fwd, w=w, strides=strides, padding=padding)
    return jax.linear_transpose(fwd, x)(g)[0]


def _xla_weight_grad(x, g, *, strides, padding, kernel_hw):
    w = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], g.shape[3]), x.dtype)
    fwd = functools.partial(_xla_fwd, x, strides=strides, padding=padding)
    return jax.linear_transpose(lambda w: fwd(w=w), w)(g)[0]


_XLA = {"fwd": _xla_fwd, "input_grad": _xla_input_grad, "weight_grad": _xla_weight_grad}


# ---- XLA:CPU's canonical gradients (stride 1) --------------------------------------------------

def _canonical_input_grad(g, w, *, padding, in_hw):
    kh, kw = w.shape[:2]
    # dx: the cotangent convolved with the flipped kernel, in/out channels swapped.
    w_t = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    back = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
            (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    return _xla_fwd(g, w_t, strides=(1, 1), padding=back).astype(g.dtype)


def _canonical_weight_grad(x, g, *, padding):
    # dw: batch and channels swapped, so the reduction over the batch is the conv's "features".
    x_t, g_t = lax.optimization_barrier((x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3)))
    return _xla_fwd(x_t, g_t, strides=(1, 1), padding=padding).transpose(1, 2, 0, 3).astype(
        x.dtype)


def _cpu(kind: str) -> Callable[..., jax.Array]:
    def lower(a, b, *, impl, strides, padding, **shape):
        if impl == "xla":
            if kind == "fwd" or strides != (1, 1):
                return _XLA[kind](a, b, strides=strides, padding=padding, **shape)
            if kind == "input_grad":
                return _canonical_input_grad(a, b, padding=padding, **shape)
            return _canonical_weight_grad(a, b, padding=padding)
        if impl not in _CPU_KERNELS:
            raise ExtensionUnavailable(
                f"no CPU kernels for conv impl {impl!r}: import resnet_jax.ops.{impl} (what "
                f"conv_impl={impl!r} does) before compiling")
        aval = _PRIMS[kind].abstract_eval(
            ShapedArray(a.shape, a.dtype), ShapedArray(b.shape, b.dtype), impl=impl,
            strides=strides, padding=padding, **shape)[0]
        return _CPU_KERNELS[impl](kind, a, b, aval.shape, strides, padding)

    return lower


# ---- shapes -----------------------------------------------------------------------------------

def _check(a, b, impl, strides, padding):
    if impl not in IMPLS:
        raise ConfigError(f"conv impl={impl!r} is not one of {IMPLS}.")
    if a.ndim != 4 or b.ndim != 4 or a.dtype != b.dtype:
        raise TypeError(f"resnet_jax conv primitives take two 4-D arrays of one dtype, got "
                        f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
    if len(strides) != 2 or len(padding) != 2:
        raise TypeError(f"strides {strides} and padding {padding} must be 2-D")


def _fwd_shape(x, w, *, impl, strides, padding):
    _check(x, w, impl, strides, padding)
    if x.shape[3] != w.shape[2]:
        raise TypeError(f"conv: input channels {x.shape[3]} != kernel's {w.shape[2]}")
    hw = out_hw(x.shape[1:3], w.shape[:2], strides, padding)
    return ShapedArray((x.shape[0], *hw, w.shape[3]), x.dtype)


def _input_grad_shape(g, w, *, impl, strides, padding, in_hw):
    _check(g, w, impl, strides, padding)
    want = (*out_hw(in_hw, w.shape[:2], strides, padding), w.shape[3])
    if g.shape[1:] != want:
        raise TypeError(f"conv input gradient: cotangent {g.shape} != (N, {want}) of a "
                        f"{in_hw} input and kernel {w.shape}")
    return ShapedArray((g.shape[0], *in_hw, w.shape[2]), g.dtype)


def _weight_grad_shape(x, g, *, impl, strides, padding, kernel_hw):
    _check(x, g, impl, strides, padding)
    want = out_hw(x.shape[1:3], kernel_hw, strides, padding)
    if g.shape[0] != x.shape[0] or g.shape[1:3] != want:
        raise TypeError(f"conv weight gradient: cotangent {g.shape} does not fit input "
                        f"{x.shape} and kernel {kernel_hw}")
    return ShapedArray((*kernel_hw, x.shape[3], g.shape[3]), x.dtype)


# ---- transposes (T(x, w, g) = <g, B(x, w)>) ----------------------------------------------------

def _hw(undefined, sl: slice) -> tuple[int, int]:
    return tuple(undefined.aval.shape[sl])


def _fwd_t_x(ct, x, w, *, impl, strides, padding):
    return conv_input_grad_p.bind(ct, w, impl=impl, strides=strides, padding=padding,
                                  in_hw=_hw(x, slice(1, 3)))


def _fwd_t_w(ct, x, w, *, impl, strides, padding):
    return conv_weight_grad_p.bind(x, ct, impl=impl, strides=strides, padding=padding,
                                   kernel_hw=_hw(w, slice(0, 2)))


def _input_grad_t_g(ct, g, w, *, impl, strides, padding, in_hw):
    return conv_p.bind(ct, w, impl=impl, strides=strides, padding=padding)


def _input_grad_t_w(ct, g, w, *, impl, strides, padding, in_hw):
    return conv_weight_grad_p.bind(ct, g, impl=impl, strides=strides, padding=padding,
                                   kernel_hw=_hw(w, slice(0, 2)))


def _weight_grad_t_x(ct, x, g, *, impl, strides, padding, kernel_hw):
    return conv_input_grad_p.bind(g, ct, impl=impl, strides=strides, padding=padding,
                                  in_hw=_hw(x, slice(1, 3)))


def _weight_grad_t_g(ct, x, g, *, impl, strides, padding, kernel_hw):
    return conv_p.bind(x, ct, impl=impl, strides=strides, padding=padding)


# ---- vmap ---------------------------------------------------------------------------------------

def _batcher(kind: str) -> Callable:
    prim = _PRIMS[kind]

    def rule(args, dims, **params):
        (a, b), (da, db) = args, dims
        if kind != "weight_grad" and da is not None and db is None:
            # a batch of activations under one kernel: the vmapped axis joins the batch axis
            a = jnp.moveaxis(a, da, 0)
            k, n = a.shape[:2]
            y = prim.bind(a.reshape(k * n, *a.shape[2:]), b, **params)
            return y.reshape(k, n, *y.shape[1:]), 0
        size = a.shape[da] if da is not None else b.shape[db]
        a = jnp.moveaxis(a, da, 0) if da is not None else jnp.broadcast_to(a, (size, *a.shape))
        b = jnp.moveaxis(b, db, 0) if db is not None else jnp.broadcast_to(b, (size, *b.shape))

        def per_element(a, b):  # one kernel call per element, each keeping ``impl``'s kernel
            return lax.map(lambda ab: prim.bind(*ab, **params), (a, b))

        if params["impl"] != "xla":
            return per_element(a, b), 0
        fn = functools.partial(_XLA[kind], **{k: v for k, v in params.items() if k != "impl"})
        if kind != "weight_grad":
            return jax.vmap(fn)(a, b), 0  # XLA's batched convolution (feature groups)
        # Per-example weight gradients: XLA's batched form (batch groups) runs in XLA:CPU's
        # naive loop inside scanned stages (ResNet-20 per-example grads 10x grad's time; one
        # canonical call per example: 1.75x); other platforms keep XLA's batched convolution.
        return lax.platform_dependent(a, b, cpu=per_element, default=jax.vmap(fn)), 0

    return rule


# ---- registration -------------------------------------------------------------------------------

@functools.cache
def _eager(kind: str, items: tuple) -> Callable:
    return jax.jit(functools.partial(_PRIMS[kind].bind, **dict(items)))


for _kind, _shape, (_t_a, _t_b) in (
    ("fwd", _fwd_shape, (_fwd_t_x, _fwd_t_w)),
    ("input_grad", _input_grad_shape, (_input_grad_t_g, _input_grad_t_w)),
    ("weight_grad", _weight_grad_shape, (_weight_grad_t_x, _weight_grad_t_g)),
):
    _prim = _PRIMS[_kind]
    _prim.def_abstract_eval(_shape)
    _prim.def_impl(functools.partial(
        lambda kind, a, b, **params: _eager(kind, tuple(sorted(params.items())))(a, b), _kind))
    ad.defbilinear(_prim, _t_a, _t_b)
    batching.primitive_batchers[_prim] = _batcher(_kind)
    mlir.register_lowering(_prim, mlir.lower_fun(
        functools.partial(lambda kind, a, b, *, impl, **p: _XLA[kind](a, b, **p), _kind),
        multiple_results=False))
    mlir.register_lowering(_prim, mlir.lower_fun(_cpu(_kind), multiple_results=False),
                           platform="cpu")


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads,
         impl: str = "xla") -> jax.Array:
    """``B(x, w)``: NHWC x HWIO -> NHWC with explicit (lo, hi) padding, on ``impl``'s kernels."""
    strides = (int(strides[0]), int(strides[1]))
    pads = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    return conv_p.bind(x, w, impl=impl, strides=strides, padding=pads)
