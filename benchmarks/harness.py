"""Shared benchmark machinery: machine facts, a matmul peak, timing, FLOP and memory accounting.

Every number is measured in the same process run as its baseline, and ratios are printed
against that baseline, never against a number from another day or machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet20", help="registry name, e.g. resnet20, resnet50")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--image", type=int, default=None, help="image side (default 32 / 224)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="split the host CPU into N JAX devices for resnet_jax's step "
                             "(config.cpu_devices; baselines stay on one device)")
    parser.add_argument("--width", type=int, default=None, help="override the model width")
    parser.add_argument("--stride-in", default=None, choices=["1x1", "3x3"],
                        help="bottleneck stride placement (3x3 = v1.5, torchvision)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="model override for resnet_jax (e.g. scan_blocks=False), repeatable")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--baseline", action="append", default=[], choices=["torch", "plain"],
                        help="also time this baseline in the same run (repeatable)")
    parser.add_argument("--torch-channels-last", action="store_true",
                        help="run the torch baseline in channels_last memory format")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def machine() -> dict[str, Any]:
    devs = jax.devices()
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devs)} x {devs[0].device_kind}",
    }


def matmul_peak_flops(dtype: Any = jnp.float32) -> float:
    """FLOP/s of a large square matmul on device 0: the reference for 'flop_utilization'."""
    n = 4096 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


@dataclasses.dataclass
class Timing:
    first_call_seconds: float  # compile + one step
    step_seconds: list[float]

    @property
    def compile_seconds(self) -> float:
        """The first call less a typical step: tracing and compiling."""
        return max(self.first_call_seconds - self.median, 0.0)

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.step_seconds), max(self.step_seconds)


def time_steps(
    first: Callable[[], Any], step: Callable[[], Any], warmup: int, steps: int
) -> Timing:
    """``first()`` compiles and runs once; then ``warmup`` untimed and ``steps`` timed calls.

    Each callable must block until its result is ready (``jax.block_until_ready``).
    """
    t = time.perf_counter()
    first()
    first_call = time.perf_counter() - t
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return Timing(first_call, times)


def peak_memory_bytes() -> int:
    """Device peak where the backend reports it (GPU/TPU), else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(
    title: str,
    args: argparse.Namespace,
    timing: Timing,
    flops_per_image: float,
    peak: float | None,
    baselines: dict[str, Timing],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the human-readable lines and return the JSON record."""
    ips = args.batch / timing.median
    achieved = flops_per_image * ips
    out: dict[str, Any] = {
        "benchmark": title,
        "arch": args.arch,
        "batch": args.batch,
        "image": args.image,
        "dtype": args.dtype,
        "parallel": args.parallel,
        "cpu_devices": args.cpu_devices,
        **machine(),
        "compile_seconds": round(timing.compile_seconds, 3),
        "first_call_seconds": round(timing.first_call_seconds, 3),
        "step_seconds_median": timing.median,
        "step_seconds_min": timing.spread[0],
        "step_seconds_max": timing.spread[1],
        "timed_steps": len(timing.step_seconds),
        "warmup_steps": args.warmup,
        "images_per_second": ips,
        "flops_per_image": flops_per_image,
        "achieved_flops": achieved,
        "matmul_peak_flops": peak,
        "flop_utilization": achieved / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        **(extra or {}),
    }
    m = machine()
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}, "
          f"{m['backend']}: {m['devices']}")
    print(f"{title}: {args.arch} batch {args.batch} image {args.image} {args.dtype} "
          f"{args.parallel}; compile {timing.compile_seconds:.1f} s (first call "
          f"{timing.first_call_seconds:.1f} s less the median step); "
          f"{args.warmup} warm-up + {len(timing.step_seconds)} timed steps")
    lo, hi = timing.spread
    print(f"  step median {timing.median * 1e3:.1f} ms (min {lo * 1e3:.1f}, max {hi * 1e3:.1f}); "
          f"{ips:,.0f} images/s; {achieved / 1e9:,.1f} GFLOP/s"
          + (f" = {achieved / peak:.1%} of a {peak / 1e9:,.0f} GFLOP/s matmul" if peak else ""))
    print(f"  peak memory {out['peak_memory_bytes'] / 2**20:,.0f} MiB")
    for name, t in baselines.items():
        b_ips = args.batch / t.median
        ratio = ips / b_ips
        out[f"{name}_images_per_second"] = b_ips
        out[f"{name}_compile_seconds"] = round(t.compile_seconds, 3)
        out[f"vs_{name}"] = ratio
        print(f"  baseline {name}: median {t.median * 1e3:.1f} ms, {b_ips:,.0f} images/s "
              f"-> resnet_jax is {ratio:.2f}x")
    if args.json:
        print(json.dumps(out, default=float))
    return out


def random_batch(args: argparse.Namespace, num_classes: int, image: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((args.batch, image, image, 3), dtype=np.float32),
        "label": rng.integers(0, num_classes, (args.batch,), dtype=np.int32),
    }
