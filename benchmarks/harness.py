"""Shared benchmark machinery: machine facts, a matmul peak, interleaved timing, FLOP and memory
accounting.

Every number is measured in the same process run as its baseline, and ratios are printed
against that baseline, never against a number from another day or machine. The programs of a
run are timed interleaved (:func:`time_interleaved`): short blocks of steps of each program in
turn, so a machine whose speed drifts within minutes moves every program alike and the
per-block ratios hold still.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.parallel import keep_freed_memory

BASELINES = ("plain", "torch", "xla")
CONV_IMPLS = ("xla", "onednn")
CONV_CHOICES = ("auto", *CONV_IMPLS)  # auto: resnet_jax's default (oneDNN on CPU where it builds)
# OpenMP's wait policy as this process was started, before resnet_jax.ops.onednn defaults it to
# PASSIVE: the torch worker gets this one (see Worker).
OMP_WAIT_POLICY_AT_START = os.environ.get("OMP_WAIT_POLICY")

# As train.py does (config.keep_freed_memory): glibc keeps freed memory, so per-step buffers do
# not page-fault afresh. Here at import, before any program starts a JAX CPU client, in this
# process and in the torch worker alike (which imports this module too).
KEEP_FREED_MEMORY = keep_freed_memory()


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags shared by train_step.py and eval_step.py."""
    parser.add_argument("--arch", default="resnet20", help="registry name, e.g. resnet20, resnet50")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--image", type=int, default=None, help="image side (default 32 / 224)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="split the host CPU into N JAX devices for resnet_jax's step "
                             "(config.cpu_devices; the xla baseline too; plain and torch stay "
                             "on one device)")
    parser.add_argument("--width", type=int, default=None, help="override the model width")
    parser.add_argument("--stride-in", default=None, choices=["1x1", "3x3"],
                        help="bottleneck stride placement (3x3 = v1.5, torchvision)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="model override for resnet_jax (e.g. scan_blocks=False), repeatable")
    parser.add_argument("--conv", default="auto", choices=CONV_CHOICES,
                        help="resnet_jax's convolution: the model's conv_impl (xla = "
                             "jax.lax.conv_general_dilated; onednn = resnet_jax.ops.onednn; "
                             "auto, the default: train.py's, oneDNN on a CPU where it builds)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps of each program after its compiling first call")
    parser.add_argument("--blocks", type=int, default=5,
                        help="interleaved blocks: each block times --steps steps of every "
                             "program in turn, the first program rotating")
    parser.add_argument("--steps", "--steps-per-block", dest="steps", type=int, default=4,
                        help="timed steps of each program per block (total: blocks x steps)")
    parser.add_argument("--baseline", action="append", default=[], choices=BASELINES,
                        help="also time this baseline, interleaved in the same run (repeatable): "
                             "plain = a straightforward Flax linen ResNet, torch = PyTorch eager, "
                             "xla = resnet_jax with conv_impl='xla' (for --conv onednn)")
    parser.add_argument("--torch-channels-last", action="store_true",
                        help="run the torch baseline in channels_last (NHWC) memory format: "
                             "PyTorch's fastest CPU layout (oneDNN's native one), so the fair "
                             "comparison; without it torch runs NCHW")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def machine_line(m: dict[str, Any] | None = None) -> str:
    """``machine: <host> <cpu> (<n> cpus), jax <version>, <backend>: <devices>``."""
    m = m or machine()
    return (f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}, "
            f"{m['backend']}: {m['devices']}")


def op_row_cells(row: dict[str, Any], result: Interleaved, programs: Sequence[Program],
                 unit: str, pairs: Sequence[tuple[str, str]], ratio_width: int) -> str:
    """For the per-op benchmarks: adds each pair's ratio (median, min, max over blocks) to
    ``row`` and returns the printed cells: each program's ``row[f"{name}_{unit}"]``, then the
    ratios."""
    for a, b in pairs:
        r = result.ratio(a, b)
        row[f"{a}_vs_{b}"] = r.median
        row[f"{a}_vs_{b}_min"], row[f"{a}_vs_{b}_max"] = r.min, r.max
    cells = "".join(f"{row[f'{p.name}_{unit}']:9.1f}" for p in programs)
    return cells + "".join(f"{row[f'{a}_vs_{b}']:{ratio_width}.2f}" for a, b in pairs)


def machine() -> dict[str, Any]:
    """Host, CPU, Python, JAX version, backend and devices of this process."""
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
    """One program's first call and timed steps (all blocks together)."""

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


@dataclasses.dataclass
class Program:
    """A timed program: ``step()`` runs one step and blocks until its result is ready
    (``jax.block_until_ready``, ``.item()``); ``first()`` (default: ``step``) is the first,
    compiling call. ``timed(n)``, where given, runs ``n`` steps and returns their seconds as
    measured where they ran (a :class:`Worker`'s program). ``note`` is printed after the name
    (e.g. the torch memory format). ``peak_memory()``, where given, is the peak RSS of the
    process the program runs in (a :class:`Worker`'s), in bytes."""

    name: str
    step: Callable[[], Any]
    first: Callable[[], Any] | None = None
    note: str = ""
    timed: Callable[[int], list[float]] | None = None
    peak_memory: Callable[[], int] | None = None


@dataclasses.dataclass
class Ratio:
    """Median and min..max over blocks of one program's speed relative to another."""

    median: float
    min: float
    max: float


@dataclasses.dataclass
class Interleaved:
    """What :func:`time_interleaved` measured."""

    steps_per_block: int
    first_call_seconds: dict[str, float]
    block_seconds: list[dict[str, list[float]]]  # [block][program name] -> per-step seconds
    block_order: list[list[str]]  # [block] -> program names in the order they ran
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    peak_memory: dict[str, int] = dataclasses.field(default_factory=dict)  # worker programs'

    @property
    def blocks(self) -> int:
        return len(self.block_seconds)

    @property
    def names(self) -> list[str]:
        return list(self.first_call_seconds)

    def timing(self, name: str) -> Timing:
        """``name``'s first call and every timed step over all blocks."""
        steps = [t for block in self.block_seconds for t in block[name]]
        return Timing(self.first_call_seconds[name], steps)

    def block_medians(self, name: str) -> list[float]:
        return [statistics.median(block[name]) for block in self.block_seconds]

    def ratios(self, primary: str, other: str) -> list[float]:
        """Per block, ``other``'s median step time / ``primary``'s: primary's speed relative
        to ``other`` (above 1: primary is faster)."""
        return [o / p for p, o in zip(self.block_medians(primary), self.block_medians(other),
                                      strict=True)]

    def ratio(self, primary: str, other: str) -> Ratio:
        r = self.ratios(primary, other)
        return Ratio(statistics.median(r), min(r), max(r))


def block_order(names: Sequence[str], block: int) -> list[str]:
    """The order programs run in block ``block``: rotated so each program leads in turn."""
    k = block % len(names)
    return [*names[k:], *names[:k]]


def time_interleaved(
    programs: Sequence[Program],
    *,
    blocks: int,
    steps_per_block: int,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Interleaved:
    """Time ``programs`` interleaved: compile each (``first()``, timed), run ``warmup`` untimed
    steps of each, then ``blocks`` blocks; block ``b`` times ``steps_per_block`` steps of every
    program, one program after the other, starting from program ``b % len(programs)``."""
    names = [p.name for p in programs]
    if len(set(names)) != len(names):
        raise ValueError(f"program names must be unique: {names}")
    if not programs or blocks < 1 or steps_per_block < 1:
        raise ValueError("need at least one program, one block and one step per block.")
    by_name = {p.name: p for p in programs}
    first_call = {}
    for p in programs:
        t = clock()
        (p.first or p.step)()
        first_call[p.name] = clock() - t
        if p.timed:
            p.timed(warmup)
        else:
            for _ in range(warmup):
                p.step()
    block_seconds, orders = [], []
    for b in range(blocks):
        order = block_order(names, b)
        times: dict[str, list[float]] = {}
        for name in order:
            p = by_name[name]
            if p.timed:
                times[name] = list(p.timed(steps_per_block))
                continue
            times[name] = []
            for _ in range(steps_per_block):
                t = clock()
                p.step()
                times[name].append(clock() - t)
        block_seconds.append(times)
        orders.append(order)
    return Interleaved(steps_per_block, first_call, block_seconds, orders,
                       {p.name: p.note for p in programs if p.note},
                       {p.name: p.peak_memory() for p in programs if p.peak_memory})


class Worker:
    """A Python process (``python harness.py --worker``) that builds and runs programs for this
    one, for :func:`time_interleaved` to interleave with local ones.

    PyTorch's baseline runs here. One OpenMP runtime serves a whole process and reads its wait
    policy once, and with torch beside JAX no policy is neutral (2-core VM, ResNet-20 batch 32
    train step): PASSIVE, which resnet_jax.ops.onednn sets, made torch 1.4-1.6x slower (55-57
    vs 36-40 ms); ACTIVE left torch's threads spinning through JAX's steps (plain linen 82 ->
    116 ms); libgomp's default spun into 0.3-3 s torch steps while other jobs ran. In its own
    process torch runs as a PyTorch user's would, with the ``OMP_WAIT_POLICY`` this process
    started with (libgomp's default if none), idle on a pipe while the other programs run.
    Steps are timed in the worker.
    """

    def __init__(self) -> None:
        env = dict(os.environ)
        if OMP_WAIT_POLICY_AT_START is None:
            env.pop("OMP_WAIT_POLICY", None)
        else:
            env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY_AT_START
        env.setdefault("JAX_PLATFORMS", "cpu")  # the worker's programs need no accelerator
        self._tmp = tempfile.TemporaryDirectory(prefix="resnet_jax_bench_")
        self._ids = itertools.count()
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )

    @property
    def omp_wait_policy(self) -> str:
        """The worker's OpenMP wait policy, lower case ('default': libgomp's own)."""
        return (OMP_WAIT_POLICY_AT_START or "default").lower()

    def _call(self, **request: Any) -> Any:
        assert self._proc.stdin and self._proc.stdout
        with contextlib.suppress(BrokenPipeError):  # a dead worker is reported below
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self._proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark worker: {reply['error']}")
        return reply.get("result")

    def put(self, arrays: dict[str, np.ndarray]) -> str:
        """Save ``arrays`` for the worker's programs; returns the key to pass to program()."""
        path = os.path.join(self._tmp.name, f"arrays{next(self._ids)}.npz")
        np.savez(path, **arrays)
        return path

    def program(self, name: str, factory: str, arrays: str | None = None, note: str = "",
                **kwargs: Any) -> Program:
        """Build ``factory(arrays_dict, **kwargs)`` (``"module:function"``, importable from
        benchmarks/, returning a blocking zero-argument step) in the worker, as a Program."""
        pid = next(self._ids)
        self._call(op="build", id=pid, factory=factory, arrays=arrays, kwargs=kwargs)
        return Program(name, step=lambda: self._call(op="steps", id=pid, n=1), note=note,
                       timed=lambda n: self._call(op="steps", id=pid, n=n),
                       peak_memory=self.peak_memory_bytes)

    def peak_memory_bytes(self) -> int:
        """The worker process's peak RSS so far, in bytes."""
        return int(self._call(op="peak_memory"))

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self._proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self._call(op="stop")
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_worker() -> None:
    """The worker's loop: one JSON request a line on stdin, one JSON reply a line on stdout."""
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints must not break the protocol
    programs: dict[int, Callable[[], Any]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "stop":
            out.write(json.dumps({"result": None}) + "\n")
            out.flush()
            break
        try:
            if request["op"] == "peak_memory":
                reply: dict[str, Any] = {"result": peak_rss_bytes()}
            elif request["op"] == "build":
                module, function = request["factory"].split(":")
                arrays = dict(np.load(request["arrays"])) if request["arrays"] else {}
                factory = getattr(importlib.import_module(module), function)
                programs[request["id"]] = factory(arrays, **request["kwargs"])
                reply = {"result": None}
            else:
                step, times = programs[request["id"]], []
                for _ in range(request["n"]):
                    t = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t)
                reply = {"result": times}
        except Exception:
            reply = {"error": traceback.format_exc(limit=-3)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def time_steps(
    first: Callable[[], Any], step: Callable[[], Any], warmup: int, steps: int
) -> Timing:
    """One program alone: ``first()`` compiles and runs once; then ``warmup`` untimed and
    ``steps`` timed calls. Each callable must block until its result is ready."""
    result = time_interleaved([Program("program", step, first)], blocks=1,
                              steps_per_block=steps, warmup=warmup)
    return result.timing("program")


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM (kept per address space, so a worker
    does not inherit the peak of the process it was forked from, as ``ru_maxrss`` does across
    exec), else ``ru_maxrss``."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes() -> int:
    """Device peak where the backend reports it (GPU/TPU), else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return peak_rss_bytes()


def report(
    title: str,
    args: argparse.Namespace,
    result: Interleaved,
    flops_per_image: float,
    peak: float | None,
    primary: str = "resnet_jax",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the human-readable lines and return the JSON record: ``primary``'s timing, and
    for every other program in ``result`` its speed and the per-block ratios against it."""
    timing = result.timing(primary)
    ips = args.batch / timing.median
    achieved = flops_per_image * ips
    others = [name for name in result.names if name != primary]
    m = machine()
    out: dict[str, Any] = {
        "benchmark": title,
        "arch": args.arch,
        "batch": args.batch,
        "image": args.image,
        "dtype": args.dtype,
        "parallel": args.parallel,
        "cpu_devices": args.cpu_devices,
        "conv": getattr(args, "conv", "xla"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "keep_freed_memory": KEEP_FREED_MEMORY,
        "onednn_threading": os.environ.get("RESNET_JAX_ONEDNN_THREADING", "pool"),
        **m,
        "compile_seconds": round(timing.compile_seconds, 3),
        "first_call_seconds": round(timing.first_call_seconds, 3),
        "step_seconds_median": timing.median,
        "step_seconds_min": timing.spread[0],
        "step_seconds_max": timing.spread[1],
        "timed_steps": len(timing.step_seconds),
        "warmup_steps": args.warmup,
        "blocks": result.blocks,
        "steps_per_block": result.steps_per_block,
        "images_per_second": ips,
        "flops_per_image": flops_per_image,
        "achieved_flops": achieved,
        "matmul_peak_flops": peak,
        "flop_utilization": achieved / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        **(extra or {}),
    }
    print(machine_line(m))
    conv = f" conv {out['conv']}" if out["conv"] != "xla" else ""
    print(f"{title}: {args.arch} batch {args.batch} image {args.image} {args.dtype} "
          f"{args.parallel}{conv}; compile {timing.compile_seconds:.1f} s (first call "
          f"{timing.first_call_seconds:.1f} s less the median step); {args.warmup} warm-up + "
          f"{result.blocks} blocks x {result.steps_per_block} timed steps"
          + (f", interleaved with {len(others)} baseline(s)" if others else ""))
    lo, hi = timing.spread
    print(f"  step median {timing.median * 1e3:.1f} ms (min {lo * 1e3:.1f}, max {hi * 1e3:.1f}); "
          f"{ips:,.0f} images/s; {achieved / 1e9:,.1f} GFLOP/s"
          + (f" = {achieved / peak:.1%} of a {peak / 1e9:,.0f} GFLOP/s matmul" if peak else ""))
    print(f"  peak memory {out['peak_memory_bytes'] / 2**20:,.0f} MiB (this process: "
          f"{primary} and any baseline not in a worker)")
    for name in others:
        t = result.timing(name)
        b_ips = args.batch / t.median
        r = result.ratio(primary, name)
        out[f"{name}_images_per_second"] = b_ips
        out[f"{name}_step_seconds_median"] = t.median
        out[f"{name}_compile_seconds"] = round(t.compile_seconds, 3)
        out[f"vs_{name}"] = r.median
        out[f"vs_{name}_min"] = r.min
        out[f"vs_{name}_max"] = r.max
        note = result.notes.get(name)
        if note:
            out[f"{name}_note"] = note
        label = f"{name} ({note})" if note else name
        print(f"  baseline {label}: median {t.median * 1e3:.1f} ms, {b_ips:,.0f} images/s "
              f"-> {primary} is {r.median:.2f}x (blocks: {r.min:.2f}-{r.max:.2f}, "
              f"{result.blocks} blocks x {result.steps_per_block} steps, interleaved)")
        if name in result.peak_memory:  # ran in a process of its own: its peak is its own
            theirs = result.peak_memory[name]
            out[f"{name}_peak_memory_bytes"] = theirs
            out[f"peak_memory_vs_{name}"] = out["peak_memory_bytes"] / theirs
            print(f"    its process's peak memory {theirs / 2**20:,.0f} MiB -> {primary}'s is "
                  f"{out['peak_memory_bytes'] / theirs:.2f}x")
    if args.json:
        print(json.dumps(out, default=float))
    return out


def random_batch(args: argparse.Namespace, num_classes: int, image: int) -> dict[str, np.ndarray]:
    """A fixed synthetic batch: standard-normal NHWC images and uniform labels."""
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((args.batch, image, image, 3), dtype=np.float32),
        "label": rng.integers(0, num_classes, (args.batch,), dtype=np.int32),
    }


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve_worker()
