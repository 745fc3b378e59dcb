"""Per-op convolution throughput: forward, input gradient and weight gradient, JAX vs PyTorch.

    python benchmarks/conv_ops.py [--batch 128] [--conv onednn] [--only /2] [--json]
    python benchmarks/conv_ops.py --net resnet50 --stride-in 3x3 --batch 32 --conv onednn

Rows: the 3x3 stride-1 convolutions of the CIFAR nets (32x32x16, 16x16x32, 8x8x64) and the
ImageNet nets (56x56x64, 14x14x256), then the strided ones: 3x3 stride 2 (CIFAR's 32x32 16->32
transition, ResNet-50 v1.5's 56x56 128->128), the 1x1 stride-2 projection (56x56 256->512) and
ImageNet's 7x7/2 stem at 224; the label gives kernel/stride, padding and output channels. ImageNet
rows use a quarter of --batch. Columns: GFLOP/s = 2 x mult-adds (of the true output size) /
median time, for XLA (``jax.lax.conv_general_dilated``), with ``--conv onednn``
``resnet_jax.ops.onednn.conv_general_dilated``, and PyTorch; the engines of an op are timed
interleaved (--blocks blocks of --reps calls each, the first engine rotating) and each ratio is
the median of the per-block ratios. PyTorch runs in a worker process of its own
(``harness.Worker``: OpenMP's settings are per process). Documents where the CPU gap to PyTorch
comes from (benchmarks/RESULTS.md). ``--net ARCH`` times that network's distinct convolutions
instead (``resnet_jax.summary.convolutions``, at exactly ``--batch``) and ends with each engine's
convolution time per training step, each row weighted by how many layers have it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
from collections.abc import Callable

import harness
import jax
import jax.numpy as jnp
import numpy as np

DN = ("NHWC", "HWIO", "NHWC")
OPS = ("forward", "input_grad", "weight_grad")


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution: NHWC input ``side`` x ``side`` x ``cin``, ``kernel`` x ``kernel`` to
    ``cout`` at ``stride`` with symmetric ``padding``; ImageNet rows use a quarter batch."""

    side: int
    cin: int
    cout: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    imagenet: bool = False
    count: int = 1  # layers of the --net that have this convolution

    @property
    def out_side(self) -> int:
        return (self.side + 2 * self.padding - self.kernel) // self.stride + 1

    def batch(self, batch: int) -> int:
        return max(1, batch // 4) if self.imagenet else batch

    def label(self, batch: int) -> tuple[str, str]:
        """(input shape NHWC, 'KxK/S pP ->COUT')."""
        k = self.kernel
        return (f"{self.batch(batch)}x{self.side}x{self.side}x{self.cin}",
                f"{k}x{k}/{self.stride} p{self.padding} ->{self.cout}")

    def flops(self, batch: int) -> float:
        """2 x mult-adds of one forward (each gradient has the same count)."""
        return (2.0 * self.batch(batch) * self.out_side**2 * self.kernel**2 * self.cin
                * self.cout)


SHAPES = [
    ConvShape(32, 16, 16), ConvShape(16, 32, 32), ConvShape(8, 64, 64),
    ConvShape(56, 64, 64, imagenet=True), ConvShape(14, 256, 256, imagenet=True),
    ConvShape(32, 16, 32, stride=2),  # CIFAR stage transition
    ConvShape(56, 128, 128, stride=2, imagenet=True),  # ResNet-50 v1.5 3x3/2
    ConvShape(56, 256, 512, kernel=1, stride=2, padding=0, imagenet=True),  # projection
    ConvShape(224, 3, 64, kernel=7, stride=2, padding=3, imagenet=True),  # ImageNet stem
]


def jax_ops(conv_fn: Callable, shape: ConvShape, x: np.ndarray, w: np.ndarray
            ) -> dict[str, Callable[[], object]]:
    """Blocking callables of forward, input grad (vjp wrt x) and weight grad (vjp wrt w) for
    ``conv_fn`` with ``jax.lax.conv_general_dilated``'s signature, each jitted."""
    s, p = shape.stride, shape.padding
    conv = lambda x, w: conv_fn(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)
    x, w = jnp.asarray(x), jnp.asarray(w)
    g = jnp.ones(jax.eval_shape(conv, x, w).shape, x.dtype)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {
        "forward": lambda: fwd(x, w).block_until_ready(),
        "input_grad": lambda: dx(x, w, g).block_until_ready(),
        "weight_grad": lambda: dw(x, w, g).block_until_ready(),
    }


def torch_ops(shape: ConvShape, x: np.ndarray, w: np.ndarray, channels_last: bool
              ) -> dict[str, Callable[[], object]]:
    """PyTorch's forward, input grad and weight grad of the same convolution (synchronous)."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(
        memory_format=fmt)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).contiguous(
        memory_format=fmt)
    kw = {"stride": shape.stride, "padding": shape.padding}
    y = torch.nn.functional.conv2d(xt, wt, **kw)
    g = torch.ones_like(y)
    grad = torch.nn.grad

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        return torch.no_grad()(fn)

    return {
        "forward": no_grad(lambda: torch.nn.functional.conv2d(xt, wt, **kw)),
        "input_grad": no_grad(lambda: grad.conv2d_input(xt.shape, wt, g, **kw)),
        "weight_grad": no_grad(lambda: grad.conv2d_weight(xt, wt.shape, g, **kw)),
    }


def torch_conv(arrays: dict[str, np.ndarray], *, shape: dict, op: str, channels_last: bool
               ) -> Callable[[], object]:
    """:func:`torch_ops`' ``op`` on ``arrays`` ``x`` and ``w``: a :class:`harness.Worker`
    factory (torch runs in a process of its own, with its own OpenMP settings)."""
    return torch_ops(ConvShape(**shape), arrays["x"], arrays["w"], channels_last)[op]


def onednn_conv() -> Callable:
    """``resnet_jax.ops.onednn.conv_general_dilated``, imported only for ``--conv onednn``."""
    try:
        from resnet_jax.ops import onednn
    except ModuleNotFoundError as e:
        raise SystemExit(f"--conv onednn needs resnet_jax.ops.onednn ({e})") from e
    if not onednn.available():
        raise SystemExit("--conv onednn: resnet_jax.ops.onednn.available() is False on this "
                         "machine")
    return onednn.conv_general_dilated


def time_shape(shape: ConvShape, args: argparse.Namespace, rng: np.random.Generator,
               convs: dict[str, Callable], pairs: list[tuple[str, str]],
               worker: harness.Worker | None) -> list[dict]:
    """Time the three ops of ``shape`` on every engine, interleaved; print and return rows."""
    b = shape.batch(args.batch)
    x = rng.standard_normal((b, shape.side, shape.side, shape.cin), dtype=np.float32)
    w = rng.standard_normal((shape.kernel, shape.kernel, shape.cin, shape.cout),
                            dtype=np.float32)
    fns = {e: jax_ops(fn, shape, x, w) for e, fn in convs.items()}
    arrays = worker.put({"x": x, "w": w}) if worker else None
    flops = shape.flops(args.batch)
    name, conv = shape.label(args.batch)
    rows = []
    for op in OPS:
        programs = [harness.Program(e, fns[e][op]) for e in convs]
        if worker:
            programs.append(worker.program("torch", "conv_ops:torch_conv", arrays,
                                           shape=dataclasses.asdict(shape), op=op,
                                           channels_last=args.torch_channels_last))
        result = harness.time_interleaved(programs, blocks=args.blocks,
                                          steps_per_block=args.reps, warmup=1)
        row = {"shape": name, "conv": conv, "op": op, "batch": b, "side": shape.side,
               "cin": shape.cin, "cout": shape.cout, "kernel": shape.kernel,
               "stride": shape.stride, "padding": shape.padding, "out_side": shape.out_side,
               "flops": flops, "blocks": args.blocks, "reps": args.reps, "torch_gflops": None,
               "count": shape.count}
        for p in programs:
            row[f"{p.name}_seconds"] = result.timing(p.name).median
            row[f"{p.name}_gflops"] = flops / row[f"{p.name}_seconds"] / 1e9
        row["jax_gflops"] = row["xla_gflops"]
        cells = harness.op_row_cells(row, result, programs, "gflops", pairs, 14)
        rows.append(row)
        print(f"{name:<14} {conv:<16} {op:<12}{cells}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=3,
                        help="interleaved blocks: each times --reps calls of every engine in turn")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per engine per block")
    parser.add_argument("--conv", default="xla", choices=harness.CONV_IMPLS,
                        help="onednn: add a column for resnet_jax.ops.onednn")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="keep the rows whose label contains TEXT (e.g. '/2', '7x7'); "
                             "repeatable")
    parser.add_argument("--net", default=None, metavar="ARCH",
                        help="rows: the distinct convolutions of this registry net (e.g. "
                             "resnet50) at its image size and exactly --batch, then the "
                             "per-step total weighted by how many layers have each")
    parser.add_argument("--stride-in", default=None, choices=["1x1", "3x3"],
                        help="with --net: the bottleneck's stride placement (3x3 = v1.5)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-channels-last", action="store_true",
                        help="torch tensors in channels_last (NHWC): PyTorch's fastest CPU "
                             "layout (oneDNN's native one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    convs: dict[str, Callable] = {"xla": jax.lax.conv_general_dilated}
    if args.conv == "onednn":
        convs["onednn"] = onednn_conv()
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        raise SystemExit("conv_ops.py compares with PyTorch: pip install torch, or --no-torch")
    engines = [*convs, *([] if args.no_torch else ["torch"])]
    pairs = [(a, b) for a, b in (("xla", "torch"), ("onednn", "torch"), ("onednn", "xla"))
             if a in engines and b in engines]
    shapes = net_shapes(args) if args.net else SHAPES
    shapes = [s for s in shapes
              if not args.only or any(t in " ".join(s.label(args.batch)) for t in args.only)]

    m = harness.machine()
    print(f"{harness.machine_line(m)}; batch {args.batch} (ImageNet rows "
          f"{max(1, args.batch // 4)}), GFLOP/s, {args.blocks} blocks x {args.reps} reps "
          "interleaved" + ("" if args.no_torch else "; torch in its own process, OpenMP "
                           f"{(harness.OMP_WAIT_POLICY_AT_START or 'default').lower()}"))
    head = "".join(f"{e:>9}" for e in engines) + "".join(f"{a + '/' + b:>14}" for a, b in pairs)
    print(f"{'shape':<14} {'conv':<16} {'op':<12}{head}")
    rows = []
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        # torch in a process of its own: OpenMP's wait policy is per process (harness.Worker)
        worker = None if args.no_torch else stack.enter_context(harness.Worker())
        for shape in shapes:
            rows += time_shape(shape, args, rng, convs, pairs, worker)
    if args.net:
        print(step_total(rows, engines, pairs))
    if args.json:
        print(json.dumps(rows))
    return rows


def net_shapes(args: argparse.Namespace) -> list[ConvShape]:
    """``--net``'s distinct convolutions (``resnet_jax.summary.convolutions``), each with the
    number of layers that have it, at exactly ``--batch``."""
    from resnet_jax import summary
    from resnet_jax.errors import ConfigError

    overrides = {"stride_in": args.stride_in} if args.stride_in else {}
    try:
        convs = summary.convolutions(args.net, **overrides)
    except (ConfigError, KeyError, TypeError) as e:
        raise SystemExit(f"--net {args.net}: {e}") from e
    return [ConvShape(c.side, c.cin, c.cout, c.kernel, c.stride, c.padding, count=c.count)
            for c in convs]


def step_total(rows: list[dict], engines: list[str], pairs: list[tuple[str, str]]) -> str:
    """One line: each engine's convolution time per training step, the sum over rows of layers
    x median time (the image layer's input gradient left out: a step never computes it)."""
    kept = [r for r in rows if not (r["cin"] == 3 and r["op"] == "input_grad")]
    total = {e: sum(r["count"] * r[f"{e}_seconds"] for r in kept) for e in engines}
    layers = sum(r["count"] for r in kept if r["op"] == "forward")
    return (f"per step ({layers} layers, fwd + input grad + weight grad): "
            + ", ".join(f"{e} {1e3 * t:,.1f} ms" for e, t in total.items())
            + "".join(f"; {a}/{b} {total[b] / total[a]:.2f}x" for a, b in pairs))


if __name__ == "__main__":
    main()
