"""Per-layer batch norm + ReLU throughput: the fused FFI kernels vs XLA's fusions vs PyTorch.

    python benchmarks/bn_ops.py [--batch 128] [--only 7x7] [--no-torch] [--json]

Rows: the BN layers of ResNet-56 (32x32x16, 16x16x32, 8x8x64 at --batch) and ResNet-50 (112x112x64
... 7x7x2048 at a quarter of --batch), forward (batch statistics, then normalise + ReLU) and
backward (the two per-channel reductions, then the input gradient through the ReLU mask).
Engines: "fused" (``resnet_jax.ops.fused_bn``: stats + apply, bwd_stats + bwd_apply, each one
pass on XLA's thread pool), "xla" (the same math in plain ``jnp`` under ``jit``: XLA's fusions)
and "torch" (``torch.nn.functional.batch_norm`` + ``relu`` in training mode, channels_last;
forward under ``no_grad``, backward ``autograd.grad`` of a kept graph), timed interleaved
(``harness.time_interleaved``; torch in a worker process of its own, as in conv_ops.py).

GB/s counts the same bytes for every engine, a two-pass kernel's minimum traffic: forward 12
bytes per element (read x twice, write y), backward 28 (read g, y, x for the statistics, then
again for dx, written); so it is effective bandwidth, higher = faster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from collections.abc import Callable

import harness
import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-5
OPS = ("forward", "backward")
BYTES_PER_ELEMENT = {"forward": 12, "backward": 28}

# (side, channels, imagenet): ResNet-56's three stages, ResNet-50's BN widths per stage
SHAPES = [(32, 16, False), (16, 32, False), (8, 64, False), (112, 64, True), (56, 256, True),
          (28, 512, True), (14, 1024, True), (7, 2048, True)]


def batch_of(imagenet: bool, batch: int) -> int:
    return max(1, batch // 4) if imagenet else batch


def label(shape: tuple[int, int, bool], batch: int) -> str:
    side, c, imagenet = shape
    return f"{batch_of(imagenet, batch)}x{side}x{side}x{c}"


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, inv_std) over all axes but the last, from E[x] and E[x^2] (flax's fast variance)."""
    axes = tuple(range(x.ndim - 1))
    mean, mean2 = x.mean(axes), (x * x).mean(axes)
    return mean, jax.lax.rsqrt(jnp.maximum(mean2 - mean * mean, 0.0) + EPS)


def xla_ops(x: jax.Array, g: jax.Array, scale: jax.Array, bias: jax.Array
            ) -> dict[str, Callable[[], object]]:
    """Plain-jnp BN + ReLU forward and backward, each jitted (XLA's own fusions)."""
    axes = tuple(range(x.ndim - 1))

    @jax.jit
    def forward(x, scale, bias):
        mean, inv = _moments(x)
        return jnp.maximum((x - mean) * (inv * scale) + bias, 0.0), mean, inv

    @jax.jit
    def backward(g, y, x, mean, inv, scale):
        gm = jnp.where(y > 0, g, 0.0)
        xhat = (x - mean) * inv
        m_g, m_gx = gm.mean(axes), (gm * xhat).mean(axes)
        return scale * inv * (gm - m_g - xhat * m_gx), m_gx, m_g

    y, mean, inv = forward(x, scale, bias)
    return {
        "forward": lambda: jax.block_until_ready(forward(x, scale, bias)),
        "backward": lambda: jax.block_until_ready(backward(g, y, x, mean, inv, scale)),
    }


def fused_ops(x: jax.Array, g: jax.Array, scale: jax.Array, bias: jax.Array
              ) -> dict[str, Callable[[], object]]:
    """The same two steps on the fused kernels (stats + apply; bwd_stats + bwd_apply)."""
    from resnet_jax.ops import fused_bn

    @jax.jit
    def forward(x, scale, bias):
        s = fused_bn.stats(x)
        inv = jax.lax.rsqrt(jnp.maximum(s[1] - s[0] * s[0], 0.0) + EPS)
        y = fused_bn.apply(x, jnp.stack([s[0], inv * scale, bias]), None, True)
        return y, s[0], inv

    @jax.jit
    def backward(g, y, x, mean, inv, scale):
        t = fused_bn.bwd_stats(g, y, x, jnp.stack([mean, inv]), True)
        coef = jnp.stack([mean, inv, scale * inv, t[0], t[1]])
        return fused_bn.bwd_apply(g, y, x, coef, True), t[1], t[0]

    y, mean, inv = forward(x, scale, bias)
    return {
        "forward": lambda: jax.block_until_ready(forward(x, scale, bias)),
        "backward": lambda: jax.block_until_ready(backward(g, y, x, mean, inv, scale)),
    }


def torch_bn(arrays: dict[str, np.ndarray], *, op: str) -> Callable[[], object]:
    """PyTorch's training-mode BN + ReLU on ``arrays`` (NHWC ``x``, ``g``; ``scale``,
    ``bias``), channels_last: a :class:`harness.Worker` factory for ``op``."""
    import torch
    import torch.nn.functional as F

    def nchw(a: np.ndarray, grad: bool = False) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    x, g = nchw(arrays["x"], grad=op == "backward"), nchw(arrays["g"])
    w = torch.from_numpy(arrays["scale"]).requires_grad_(op == "backward")
    b = torch.from_numpy(arrays["bias"]).requires_grad_(op == "backward")

    def forward() -> torch.Tensor:
        return F.relu(F.batch_norm(x, None, None, w, b, training=True, eps=EPS))

    if op == "forward":
        return torch.no_grad()(forward)
    y = forward()
    return lambda: torch.autograd.grad(y, (x, w, b), g, retain_graph=True)


def time_shape(shape: tuple[int, int, bool], args: argparse.Namespace,
               rng: np.random.Generator, worker: harness.Worker | None,
               pairs: list[tuple[str, str]]) -> list[dict]:
    """Time forward and backward of one layer on every engine, interleaved; print rows."""
    side, c, imagenet = shape
    n = batch_of(imagenet, args.batch)
    x = rng.standard_normal((n, side, side, c), dtype=np.float32)
    g = rng.standard_normal((n, side, side, c), dtype=np.float32)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
    device = [jnp.asarray(a) for a in (x, g, scale, bias)]
    engines = {"fused": fused_ops(*device), "xla": xla_ops(*device)}
    arrays = worker.put({"x": x, "g": g, "scale": scale, "bias": bias}) if worker else None
    name, rows = label(shape, args.batch), []
    for op in OPS:
        programs = [harness.Program(e, fns[op]) for e, fns in engines.items()]
        if worker:
            programs.append(worker.program("torch", "bn_ops:torch_bn", arrays, op=op,
                                           note="channels_last"))
        result = harness.time_interleaved(programs, blocks=args.blocks,
                                          steps_per_block=args.reps, warmup=1)
        nbytes = BYTES_PER_ELEMENT[op] * x.size
        row = {"shape": name, "op": op, "batch": n, "side": side, "channels": c,
               "bytes": nbytes, "blocks": args.blocks, "reps": args.reps, "torch_gbps": None}
        for p in programs:
            row[f"{p.name}_gbps"] = nbytes / result.timing(p.name).median / 1e9
            row[f"{p.name}_ms"] = result.timing(p.name).median * 1e3
        cells = harness.op_row_cells(row, result, programs, "gbps", pairs, 13)
        rows.append(row)
        print(f"{name:<16} {op:<9}{cells}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128,
                        help="ResNet-56 rows' batch; ResNet-50 rows use a quarter of it")
    parser.add_argument("--blocks", type=int, default=5,
                        help="interleaved blocks: each times --reps calls of every engine in turn")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per engine per block")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="keep the rows whose shape contains TEXT (e.g. 'x7x7x'); repeatable")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from resnet_jax.ops import onednn

    if not onednn.available():
        raise SystemExit("bn_ops.py needs the fused kernels (the oneDNN extension's library): "
                         'pip install -e ".[onednn]"')
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        raise SystemExit("bn_ops.py compares with PyTorch: pip install torch, or --no-torch")
    engines = ["fused", "xla", *([] if args.no_torch else ["torch"])]
    pairs = [(a, b) for a, b in (("fused", "xla"), ("fused", "torch"), ("xla", "torch"))
             if a in engines and b in engines]
    shapes = [s for s in SHAPES
              if not args.only or any(t in label(s, args.batch) for t in args.only)]
    m = harness.machine()
    print(f"{harness.machine_line(m)}; {onednn.describe()}; split "
          f"{onednn.threads_per_call()}; GB/s (forward 12, backward 28 bytes per element), "
          f"{args.blocks} blocks x {args.reps} reps interleaved"
          + ("" if args.no_torch else "; torch channels_last in its own process"))
    head = "".join(f"{e:>9}" for e in engines) + "".join(f"{a + '/' + b:>13}" for a, b in pairs)
    print(f"{'shape':<16} {'op':<9}{head}")
    rows, rng = [], np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        worker = None if args.no_torch else stack.enter_context(harness.Worker())
        for shape in shapes:
            rows += time_shape(shape, args, rng, worker, pairs)
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
