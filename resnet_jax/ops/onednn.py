"""oneDNN convolutions for XLA:CPU through the XLA FFI (``conv_impl="onednn"``, ``--config.conv``).

jaxlib runs CPU convolutions through its own kernels, at 0.1-0.9x of oneDNN (PyTorch's CPU
library) per op (benchmarks/RESULTS.md). This module compiles ``onednn.cc`` (three FFI handlers:
forward, input gradient, weight gradient) against the oneDNN wheel (a dependency on x86-64
Linux) and the FFI headers of the running jaxlib, registers them for the CPU platform as the
CPU lowering of :mod:`resnet_jax.ops.conv`'s primitives with ``impl="onednn"`` (so jvp, grad,
vmap and their compositions all run these kernels), and exposes :func:`conv_general_dilated`,
a drop-in for ``lax.conv_general_dilated`` that ``flax.linen.Conv(conv_general_dilated=...)``
takes. The same library holds ``bn_kernels.cc``'s fused batch-norm kernels
(:mod:`resnet_jax.ops.fused_bn`)::

    pip install -e . && python -m resnet_jax.ops.onednn build   # build: optional, ahead of time

The library is built once per (source, jaxlib, oneDNN, compiler) into a cache directory
(``$RESNET_JAX_CACHE`` or ``~/.cache/resnet_jax``), ~13 s with g++ on 2 cores; the first use
(train.py's default ``conv="auto"``) does it, ``build`` does it ahead of time. On GPU/TPU the
same primitives lower to XLA's convolution and its transposes, so a config that says "onednn"
still runs there.

Threads (``RESNET_JAX_ONEDNN_THREADING``): "pool" (default) splits each call's batch into
single-threaded oneDNN slices run on XLA's own intra-op thread pool (the FFI thread-pool
context) and the calling thread, as many slices as the host's cores divided by its CPU devices,
so oneDNN never starts threads of its own beside XLA's; "openmp" runs one call on a GNU OpenMP
team of that many threads (``OMP_NUM_THREADS``, where set, rules; ``OMP_WAIT_POLICY`` defaults
to PASSIVE so idle OpenMP threads sleep rather than spin against XLA's). Measured in
benchmarks/RESULTS.md: "pool" is as fast or faster. Under ``jit`` over several devices each
call runs on its shard of the batch (``custom_partitioning``).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import ConfigError, ExtensionUnavailable
from resnet_jax.ops import conv as conv_ops

SOURCE = Path(__file__).with_name("onednn.cc")
BN_SOURCE = Path(__file__).with_name("bn_kernels.cc")  # fused batch norm (ops/fused_bn.py)
POOL_SOURCE = Path(__file__).with_name("pool_kernels.cc")  # the max pool's backward (ops/pool.py)
SOURCES = (SOURCE, BN_SOURCE, POOL_SOURCE)  # one library
HEADERS = (Path(__file__).with_name("parallel_for.h"),)  # included by all; in the cache key
EXTRA = "pip install -e ."  # oneDNN is a dependency of resnet_jax on x86-64 Linux
_DN = ("NHWC", "HWIO", "NHWC")
_TARGETS = ("conv_fwd", "conv_bwd_data", "conv_bwd_weights")
# bn_kernels.cc's and pool_kernels.cc's handlers, registered as resnet_jax_<name> (see
# resnet_jax.ops.fused_bn and resnet_jax.ops.pool)
KERNEL_TARGETS = ("bn_stats", "bn_apply", "bn_apply_add", "bn_bwd_stats", "bn_bwd_apply",
                  "bn_bwd_apply_masked", "pool_scatter")
DTYPES = (jnp.float32, jnp.bfloat16)


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ExtensionUnavailable(
            f"conv='onednn' needs oneDNN ({dist} is not installed; resnet_jax installs it on "
            f"x86-64 Linux): run {EXTRA}"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise ExtensionUnavailable(f"{dist} is installed but has no {suffix}; reinstall it: {EXTRA}")


def _toolchain() -> tuple[Path, Path, Path, str]:
    """(oneDNN include dir, oneDNN lib dir, jaxlib FFI include dir, C++ compiler)."""
    header = _dist_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    lib = _dist_file("onednn-cpu-gomp", "libdnnl.so.3")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(
            f"no C++ compiler {cxx!r} to build the oneDNN extension; install g++ "
            "(Debian/Ubuntu: apt install g++) or point CXX at one"
        )
    return header.parents[2], lib.parent, Path(jax.ffi.include_dir()), cxx


def cache_dir() -> Path:
    root = os.environ.get("RESNET_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnet_jax")
    return Path(root) / "onednn"


def build(verbose: bool = False) -> Path:
    """Compile ``onednn.cc`` and ``bn_kernels.cc`` into one library (once per
    sources/jaxlib/oneDNN/compiler) and return it."""
    include, libdir, ffi_include, cxx = _toolchain()
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           "-isystem", str(ffi_include), "-isystem", str(include), *map(str, SOURCES),
           "-L", str(libdir), "-l:libdnnl.so.3", f"-Wl,-rpath,{libdir}"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([
        *(source.read_text() for source in (*SOURCES, *HEADERS)), jax.__version__,
        importlib.metadata.version("jaxlib"),
        importlib.metadata.version("onednn-cpu-gomp"), str(libdir), version, *cmd,
    ]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"resnet_jax_onednn-{key}.so"
    if target.exists():
        return target
    with open(out_dir / f"{key}.lock", "w") as lock:  # one build among concurrent processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
        cmd = [*cmd, "-o", str(tmp)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log = out_dir / f"build-{key}.log"
            log.write_text(done.stdout + done.stderr)
            tmp.unlink(missing_ok=True)
            raise ExtensionUnavailable(
                f"building the oneDNN extension failed ({cxx} exit {done.returncode}); "
                f"compiler output in {log}"
            )
        os.replace(tmp, target)
    return target


@functools.cache
def load() -> ctypes.CDLL:
    """Build if needed, load, and register the FFI targets for the CPU platform (once)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before libgomp starts
    path = build()
    lib = ctypes.CDLL(str(path))
    symbols = [f"resnet_jax_onednn_{name}" for name in _TARGETS]
    for symbol in [*symbols, *(f"resnet_jax_{name}" for name in KERNEL_TARGETS)]:
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    lib.resnet_jax_onednn_describe.restype = ctypes.c_char_p
    lib.resnet_jax_bn_isa.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    """Whether the extension builds and loads here (False for :class:`ExtensionUnavailable`)."""
    try:
        load()
    except ExtensionUnavailable:
        return False
    return True


def describe() -> str:
    """'oneDNN 3.2.0 (OpenMP), avx512_core_bf16; bn kernels avx512': the library version and
    the ISA its convolutions and its batch-norm kernels run."""
    lib = load()
    return (f"{lib.resnet_jax_onednn_describe().decode()}; "
            f"bn kernels {lib.resnet_jax_bn_isa().decode()}")


THREADING = ("pool", "openmp")


def threading_mode() -> str:
    """``RESNET_JAX_ONEDNN_THREADING``: "pool" (default) or "openmp" (read when tracing)."""
    mode = os.environ.get("RESNET_JAX_ONEDNN_THREADING", "pool")
    if mode not in THREADING:
        raise ConfigError(f"RESNET_JAX_ONEDNN_THREADING={mode!r} is not one of {THREADING}.")
    return mode


def threads_per_call() -> int:
    """The host's cores divided among its CPU devices (one device per core: 1 thread each)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // max(1, len(jax.local_devices(backend="cpu"))))


def _threading_attrs() -> dict[str, int]:
    """"pool": the batch in ``threads_per_call()`` single-threaded slices on XLA's own thread
    pool (one device per core: one slice, on the device's thread); "openmp": one call on an
    OpenMP team of that many threads (0, OpenMP's own choice, where ``OMP_NUM_THREADS`` is
    set, so that setting rules)."""
    if threading_mode() == "openmp":
        return {"threads": 0 if os.environ.get("OMP_NUM_THREADS") else threads_per_call(),
                "split": 0}
    return {"threads": 1, "split": threads_per_call()}


def _ffi(name: str, a: jax.Array, b: jax.Array, out_shape: tuple[int, ...],
         strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
    (pt, pb), (pl, pr) = padding
    attrs = dict(stride_h=strides[0], stride_w=strides[1], pad_top=pt, pad_bottom=pb,
                 pad_left=pl, pad_right=pr, **_threading_attrs())
    return jax.ffi.ffi_call(
        f"resnet_jax_onednn_{name}", jax.ShapeDtypeStruct(out_shape, a.dtype),
        vmap_method="sequential",  # not reached: the primitives' vmap rule comes first
    )(a, b, **{k: np.int64(v) for k, v in attrs.items()})


# Under jit over a device mesh (parallel="jit" with several CPU devices) each call runs on its
# shard of the batch, as XLA's convolution does: the batch dimension ("n") of the activations
# is split like the input's, the kernel is replicated, and the weight gradient (a sum over the
# batch) is summed over the devices. Without these rules XLA would gather the whole batch onto
# every device and repeat the work there.
_RULES = {
    "conv_fwd": "n h w c, i j c o -> n p q o",  # (x, w) -> y
    "conv_bwd_data": "n p q o, i j c o -> n h w c",  # (dy, w) -> dx
    "conv_bwd_weights": "n h w c, n p q o -> i j c o",  # (x, dy) -> dw
}


def batch_axes(sharding: Any) -> Any:
    """The mesh axes an array's batch dimension (axis 0) is sharded over (None: replicated);
    the custom_partitioning rules of this library's kernels (here, fused_bn, pool) read it."""
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _partitioned(name: str) -> Any:
    def call(a, b, out_shape, strides, padding):
        return _ffi(name, a, b, out_shape, strides, padding)

    fn = custom_partitioning(call, static_argnums=(2, 3, 4))
    reduces = name == "conv_bwd_weights"

    def shardings(mesh, arg_shapes):
        axes = batch_axes(arg_shapes[0].sharding)
        batch = NamedSharding(mesh, P(axes))
        args = (batch, batch if reduces else NamedSharding(mesh, P()))
        return axes, args, NamedSharding(mesh, P() if reduces else P(axes))

    def infer(out_shape, strides, padding, mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    def partition(out_shape, strides, padding, mesh, arg_shapes, result_shape):
        axes, args, result = shardings(mesh, arg_shapes)

        def lower(a, b):
            local = out_shape if reduces else (a.shape[0], *out_shape[1:])
            y = _ffi(name, a, b, local, strides, padding)
            return jax.lax.psum(y, axes) if reduces and axes is not None else y

        return mesh, lower, result, args

    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=_RULES[name],
                     reduction_factors=("n",) if reduces else ())
    return fn


_CALLS = {name: _partitioned(name) for name in _TARGETS}


_KINDS = {"fwd": "conv_fwd", "input_grad": "conv_bwd_data", "weight_grad": "conv_bwd_weights"}


def _kernel(kind: str, a: jax.Array, b: jax.Array, out_shape: tuple[int, ...],
            strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """The CPU lowering of :mod:`resnet_jax.ops.conv`'s ``kind`` for ``impl="onednn"``: one FFI
    call, partitioned over a mesh (its vmap rule is the primitive's, in ops/conv.py)."""
    load()  # register the targets before anything is lowered
    return _CALLS[_KINDS[kind]](a, b, tuple(out_shape), strides, padding)


conv_ops.register_cpu_kernels("onednn", _kernel, needs_devices=True)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` on oneDNN (``nn.Conv(conv_general_dilated=...)``).

    Takes 2-D NHWC x HWIO convolutions, float32 or bfloat16, any stride and padding, no dilation
    or groups; anything else raises (never a silent fallback to XLA's kernels on CPU).
    """
    problems = []
    if lhs.ndim != 4 or rhs.ndim != 4:
        problems.append(f"{lhs.ndim - 2}-D (only 2-D)")
    elif lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != \
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN):
        problems.append(f"dimension_numbers={dimension_numbers} (only NHWC/HWIO/NHWC)")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        problems.append("dilation")
    if feature_group_count != 1 or batch_group_count != 1:
        problems.append("grouped convolution")
    if lhs.dtype != rhs.dtype or lhs.dtype not in DTYPES:
        problems.append(f"dtypes {lhs.dtype}/{rhs.dtype} (float32 or bfloat16, both the same)")
    if preferred_element_type is not None and preferred_element_type != lhs.dtype:
        problems.append(f"preferred_element_type={preferred_element_type}")
    if problems:
        raise ConfigError(
            f"the oneDNN convolution does not take {', '.join(problems)}; "
            "use conv_impl='xla' (--config.conv=xla) for this model"
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in pads for p in pair):
        raise ConfigError(f"the oneDNN convolution takes no negative padding ({pads}); "
                          "use conv_impl='xla' for this model")
    return conv_ops.conv(lhs, rhs, strides, pads, impl="onednn")


def main(argv: list[str] | None = None) -> int:
    """``python -m resnet_jax.ops.onednn [build]``: build (if needed) and describe the library."""
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["build"]):
        print("usage: python -m resnet_jax.ops.onednn [build]", file=sys.stderr)
        return 2
    try:
        path = build(verbose=True)
        print(f"{path}\n{describe()}")
    except ExtensionUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
