"""Per-op convolution throughput: forward, input gradient and weight gradient, JAX vs PyTorch.

    python benchmarks/conv_ops.py [--batch 128] [--json]

Each row is one 3x3 stride-1 convolution shape from the CIFAR nets (32x32x16, 16x16x32,
8x8x64) and the ImageNet nets (56x56x64, 14x14x256); GFLOP/s = 2 x mult-adds / median time.
Documents where the CPU gap to PyTorch comes from (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import harness
import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(32, 16), (16, 32), (8, 64), (56, 64), (14, 256)]  # (side, channels)


def median_time(fn: Callable[[], object], reps: int) -> float:
    return harness.time_steps(fn, fn, 0, reps).median


def jax_ops(x: np.ndarray, w: np.ndarray, reps: int) -> dict[str, float]:
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=dn)
    x, w = jnp.asarray(x), jnp.asarray(w)
    g = jnp.ones_like(conv(x, w))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {
        "forward": median_time(lambda: fwd(x, w).block_until_ready(), reps),
        "input_grad": median_time(lambda: dx(x, w, g).block_until_ready(), reps),
        "weight_grad": median_time(lambda: dw(x, w, g).block_until_ready(), reps),
    }


def torch_ops(x: np.ndarray, w: np.ndarray, reps: int) -> dict[str, float]:
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    y = torch.nn.functional.conv2d(xt, wt, padding=1)
    g = torch.ones_like(y)
    grad = torch.nn.grad
    with torch.no_grad():
        return {
            "forward": median_time(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), reps),
            "input_grad": median_time(
                lambda: grad.conv2d_input(xt.shape, wt, g, padding=1), reps),
            "weight_grad": median_time(
                lambda: grad.conv2d_weight(xt, wt.shape, g, padding=1), reps),
        }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    m = harness.machine()
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}, "
          f"{m['backend']}: {m['devices']}; batch {args.batch}, 3x3 stride-1 convs, GFLOP/s")
    print(f"{'shape':<12} {'op':<12} {'jax':>8} {'torch':>8} {'jax/torch':>10}")
    rows = []
    rng = np.random.default_rng(0)
    for side, c in SHAPES:
        batch = args.batch if side <= 32 else max(1, args.batch // 4)
        x = rng.standard_normal((batch, side, side, c), dtype=np.float32)
        w = rng.standard_normal((3, 3, c, c), dtype=np.float32)
        flops = 2 * batch * side * side * 9 * c * c
        j = jax_ops(x, w, args.reps)
        t = None if args.no_torch else torch_ops(x, w, args.reps)
        for op in ("forward", "input_grad", "weight_grad"):
            row = {"shape": f"{batch}x{side}x{side}x{c}", "op": op,
                   "jax_gflops": flops / j[op] / 1e9,
                   "torch_gflops": flops / t[op] / 1e9 if t else None}
            rows.append(row)
            ratio = f"{row['jax_gflops'] / row['torch_gflops']:.2f}" if t else "-"
            tg = f"{row['torch_gflops']:8.1f}" if t else f"{'-':>8}"
            print(f"{row['shape']:<12} {op:<12} {row['jax_gflops']:8.1f} {tg} {ratio:>10}")
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
