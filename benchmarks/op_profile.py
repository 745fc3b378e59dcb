"""Where a CPU train step's time and memory go, by op class, resnet_jax against PyTorch.

    python benchmarks/op_profile.py --arch resnet56 --batch 128 --conv onednn \\
        --baseline torch --torch-channels-last --steps 5 --memory --json

resnet_jax: its ``train_step`` (``baselines.resnet_jax_program``) runs ``--warmup`` steps, then
``--steps`` steps under ``jax.profiler``. On CPU every XLA thunk is one trace event named after
its HLO instruction (``ffi_call.57``, ``ynn_fusion.87``, ``copy.149``); each is classified by
the optimized HLO of the same step (``jax.jit(...).lower(...).compile().as_text()``: opcode,
fused body, custom-call target and the ``op_name`` metadata, e.g.
``jit(train_step)/jvp(ResNet)/stage1/block0/bn1/reduce_sum``). A fusion counts where its root
instruction's ``op_name`` puts it. PyTorch (``--baseline torch``, the model and optimizer of
``train_step.py``'s torch baseline, in a ``harness.Worker`` process of its own): the same steps
under ``torch.profiler``, each op's self CPU time mapped into the same classes.

Printed: one markdown table ``class | resnet_jax ms/step (%) | torch ms/step (%)``; then the
per-step summed op time (resnet_jax's thunks run on several threads at once, so it can exceed
the wall), the busy time (the union of the thunk intervals) and the wall (the step call to
``block_until_ready``). ``--memory`` adds the compiled step's ``memory_analysis()`` with XLA's
default CPU scheduler and with ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (each
compiled in a subprocess of its own, as XLA_FLAGS are read when the backend starts) and the
peak RSS after ``--warmup + --steps`` steps of each process (resnet_jax's children and torch's
worker). The profilers slow the steps a little; the figures are for shares, not speed (use
``train_step.py`` for that). ``--blocks`` and ``--no-peak`` do not apply here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import baselines
import harness
import jax
import numpy as np
import train_step as train_bench

from resnet_jax import parallel

# The rows of the table, in order. "BN total" is the sum of the BN rows: PyTorch's CPU batch
# norm is one op (native_batch_norm and its backward), so it has no stats / elementwise split.
CONV = "conv"
BN_STATS = "BN statistics (reductions)"
BN_ELEMENTWISE = "BN elementwise"
BN_BOTH = "BN (stats+elementwise, one op)"
BN_TOTAL = "BN total"
ELEMENTWISE = "ReLU / residual add / other elementwise"
OPTIMIZER = "optimizer"
LOSS = "loss / metrics"
COPIES = "copies / transposes / pads"
OTHER = "other (pool, fc, reductions, overhead)"
CLASSES = (CONV, BN_STATS, BN_ELEMENTWISE, BN_BOTH, ELEMENTWISE, OPTIMIZER, LOSS, COPIES, OTHER)
BN_CLASSES = (BN_STATS, BN_ELEMENTWISE, BN_BOTH)

NO_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

# ---- resnet_jax: the optimized HLO ------------------------------------------------------------

# Opcodes that only move data; a fusion of these alone is a copy as well.
_MOVES = frozenset({
    "copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad", "dynamic-slice",
    "dynamic-update-slice", "broadcast", "reverse", "iota", "parameter", "constant", "tuple",
    "get-tuple-element", "bitcast-convert",
})
# Thunks that run other thunks: their events enclose those of their bodies, already counted.
_CONTAINERS = frozenset({"while", "conditional", "call"})
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_BN_SCOPE = re.compile(r"^(bn\d*|.*norm.*)$", re.IGNORECASE)
_LOSS_SCOPE = re.compile(r"log_softmax|one_hot|top_k|softmax_cross_entropy", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What classifying one HLO instruction needs."""

    opcode: str
    op_name: str  # the metadata's op_name, "" if none
    target: str  # a custom call's target, else ""
    called: tuple[str, ...]  # computations it calls (fusion body, reduce region, loop body)


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """Instructions by name (module-wide unique in HLO) and each computation's instruction
    names, from HLO text (``Compiled.as_text()``)."""
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            header = _HEADER.match(line)
            current = computations.setdefault(header.group(1), []) if header else None
            continue
        match = _INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, opcode = match.groups()
        called = _CALLED.findall(line)
        for group in _CALLED_LIST.findall(line):
            called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        op_name = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        instructions[name] = Instruction(opcode, op_name.group(1) if op_name else "",
                                         target.group(1) if target else "", tuple(called))
        current.append(name)
    return instructions, computations


class HloClassifier:
    """Maps an HLO instruction name of one module to a class of :data:`CLASSES` (None for a
    loop or call, whose body's thunks are counted instead).

    ``model_scopes``: the model's module names (``stage1``, ``block0``, ``bn1``, ...) and its
    class name (``ResNet``): an ``op_name`` holding one of them is the model's forward or
    backward; any other is the loss, metrics or optimizer."""

    def __init__(self, hlo_text: str, model_scopes: Iterable[str]) -> None:
        self.instructions, self.computations = parse_hlo(hlo_text)
        if not self.instructions:
            raise ValueError("no HLO instructions found: pass the text of Compiled.as_text()")
        self.model_scopes = frozenset(model_scopes)
        self._bodies: dict[str, frozenset[str]] = {}

    def body_opcodes(self, name: str) -> frozenset[str]:
        """The opcodes of every computation ``name`` calls, transitively (a fusion's body)."""
        if name not in self._bodies:
            seen, todo, ops = set(), list(self.instructions[name].called), set()
            while todo:
                comp = todo.pop()
                if comp in seen:
                    continue
                seen.add(comp)
                for inner in self.computations.get(comp, ()):
                    ops.add(self.instructions[inner].opcode)
                    todo.extend(self.instructions[inner].called)
            self._bodies[name] = frozenset(ops)
        return self._bodies[name]

    def op_name(self, name: str) -> str:
        """``name``'s op_name; for a fusion without one, its body's last (the root's, else
        the nearest before it)."""
        inst = self.instructions[name]
        if inst.op_name or inst.opcode != "fusion" or not inst.called:
            return inst.op_name
        body = self.computations.get(inst.called[0], [])
        return next((self.instructions[i].op_name for i in reversed(body)
                     if self.instructions[i].op_name), "")

    def in_model(self, op_name: str) -> bool:
        """Whether an op_name path names one of the model's scopes."""
        return any(re.sub(r"^.*\(|\)+$", "", s) in self.model_scopes for s in op_name.split("/"))

    def classify(self, name: str) -> str | None:
        """Instruction ``name``'s class (KeyError if it is not in the module)."""
        if name not in self.instructions:
            raise KeyError(name)
        inst = self.instructions[name]
        if inst.opcode in _CONTAINERS:
            return None
        body = self.body_opcodes(name)
        ops = body if inst.opcode == "fusion" and body else body | {inst.opcode}
        if "convolution" in ops or (inst.opcode == "custom-call" and "conv" in inst.target):
            return CONV
        if ops <= _MOVES:
            return COPIES
        reduces = bool(ops & {"reduce", "reduce-window", "sort"}) or inst.opcode == "custom-call"
        op_name = self.op_name(name)
        if not op_name:
            return OTHER
        if not self.in_model(op_name):
            if _LOSS_SCOPE.search(op_name) or reduces or \
                    re.search(r"(^|/)(transpose\()?jvp\(\)", op_name):
                return LOSS  # the loss's mean, grad_norm and the error rates
            return OPTIMIZER
        if any(_BN_SCOPE.match(s) for s in op_name.split("/")):
            if inst.opcode == "custom-call" and "stats" not in inst.target:
                return BN_BOTH  # a fused BN kernel (statistics and normalization in one)
            return BN_STATS if reduces else BN_ELEMENTWISE
        if reduces or "dot" in ops:
            return OTHER
        return ELEMENTWISE


def model_scopes(model: Any, params: Any) -> set[str]:
    """The module names in ``params`` (every key above a leaf) and the model's class name."""
    scopes = {type(model).__name__}

    def walk(tree: Any) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                scopes.add(str(key))
                walk(value)

    walk(params)
    return scopes


def new_train_state(model: Any, image_shape: Sequence[int]) -> Any:
    """The TrainState ``baselines.resnet_jax_program`` starts from (default config, key 0)."""
    from resnet_jax.train import config as config_lib
    from resnet_jax.train.state import create_train_state

    return create_train_state(config_lib.default_config(), model, jax.random.key(0),
                              image_shape=tuple(image_shape))


def compiled_train_step(model: Any, batch: dict[str, np.ndarray],
                        state: Any = None) -> tuple[Any, Any, Any]:
    """``train_step`` compiled as ``baselines.resnet_jax_program`` runs it (``parallel.compile``
    in jit mode: replicated state and outputs, the state donated, the batch sharded), for
    ``state``'s shapes (default: :func:`new_train_state`'s, none built; pass the state the
    executable will run on, its static fields must be the same objects). Returns the
    ``jax.stages.Compiled``, the abstract params and the ``parallel.Placement`` its arguments
    need."""
    from resnet_jax.train.step import train_step

    placement = parallel.Placement(parallel.make_mesh())
    if state is None:
        state = jax.eval_shape(lambda: new_train_state(model, batch["image"].shape[1:]))
    as_spec = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    state = jax.tree.map(lambda x: as_spec(x, placement.replicated), state)
    device_batch = {k: as_spec(v, placement.batch) for k, v in batch.items()}
    rng = as_spec(jax.eval_shape(lambda: jax.random.PRNGKey(1)), placement.replicated)
    step = jax.jit(train_step, out_shardings=placement.replicated, donate_argnums=(0,))
    return step.lower(state, device_batch, rng).compile(), state.params, placement


# ---- resnet_jax: the trace --------------------------------------------------------------------

@dataclasses.dataclass
class Profile:
    """One program's profiled steps: summed op time per class and the step times (seconds)."""

    class_seconds: dict[str, float]  # over all profiled steps
    steps: int
    wall_seconds: list[float]  # per step, the call to its result being ready
    busy_seconds: list[float] | None = None  # per step, the union of the op intervals
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # ops, all steps
    examples: dict[str, str] = dataclasses.field(default_factory=dict)  # class -> an op name

    def per_step_ms(self) -> dict[str, float]:
        return {k: v / self.steps * 1e3 for k, v in self.class_seconds.items()}

    @property
    def total_seconds(self) -> float:
        return sum(self.class_seconds.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ms_per_step": self.per_step_ms(),
            "ops_per_step": {k: v / self.steps for k, v in self.counts.items()},
            "examples": self.examples,
            "summed_ms_per_step": self.total_seconds / self.steps * 1e3,
            "wall_ms_per_step": float(np.mean(self.wall_seconds)) * 1e3,
        }
        if self.busy_seconds is not None:
            out["busy_ms_per_step"] = float(np.mean(self.busy_seconds)) * 1e3
        return out


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals."""
    total, start, end = 0.0, 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += 0.0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (0.0 if end is None else end - start)


def read_trace(log_dir: str) -> list[dict[str, Any]]:
    """The events of the one ``*.trace.json.gz`` that ``jax.profiler`` wrote under
    ``log_dir``."""
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if len(paths) != 1:
        raise RuntimeError(f"{log_dir}: expected one *.trace.json.gz from jax.profiler, found "
                           f"{len(paths)}; pass a fresh trace directory")
    with gzip.open(paths[0], "rt") as f:
        return json.load(f).get("traceEvents", [])


def thunk_profile(events: Sequence[dict[str, Any]], module: str, classifier: HloClassifier,
                  wall_seconds: list[float]) -> Profile:
    """Sum the XLA:CPU thunk events of HLO module ``module`` (one ``run_id`` per step) by
    class. Raises if a thunk is not in the classifier's HLO (the trace is of another
    program) or the trace holds another number of steps than ``wall_seconds``."""
    runs: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    seconds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    missing: set[str] = set()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or args.get("hlo_module") != module or "hlo_op" not in args:
            continue
        op = args["hlo_op"]
        try:
            cls = classifier.classify(op)
        except KeyError:
            missing.add(op)
            continue
        if cls is None:
            continue
        seconds[cls] += e["dur"] * 1e-6
        counts[cls] += 1
        examples.setdefault(cls, f"{op} ({classifier.op_name(op)})")
        runs[args.get("run_id", "")].append((e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6))
    if missing:
        raise RuntimeError(f"{len(missing)} traced thunks of {module} are not in the compiled "
                           f"HLO (e.g. {sorted(missing)[:3]}): the profiled step and the "
                           "lowered one differ; check compiled_train_step against "
                           "baselines.resnet_jax_program")
    steps = len(wall_seconds)
    if len(runs) != steps:
        raise RuntimeError(f"the trace holds {len(runs)} executions of {module}, expected "
                           f"{steps} (one per profiled step)")
    return Profile(dict(seconds), steps, wall_seconds,
                   [union_length(iv) for iv in runs.values()],
                   dict(counts), examples)


def profile_resnet_jax(model: Any, batch: dict[str, np.ndarray], warmup: int,
                       steps: int) -> tuple[Profile, dict[str, Any]]:
    """resnet_jax's train step: ``warmup`` steps, then ``steps`` traced ones, classified by
    the compiled HLO. Returns the profile and the compiled step's memory analysis."""
    program = baselines.resnet_jax_program("resnet_jax", model, batch, "jit", train=True)
    for _ in range(1 + warmup):
        program.step()
    walls = []
    with tempfile.TemporaryDirectory(prefix="op_profile_") as log_dir:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        try:
            for _ in range(steps):
                t = time.perf_counter()
                program.step()
                walls.append(time.perf_counter() - t)
        finally:
            jax.profiler.stop_trace()
        events = read_trace(log_dir)
    compiled, params, _ = compiled_train_step(model, batch)
    text = compiled.as_text()
    module = re.match(r"HloModule\s+([\w.\-]+)", text)
    if not module:
        raise RuntimeError("the compiled step's HLO text has no 'HloModule' header")
    classifier = HloClassifier(text, model_scopes(model, params))
    return (thunk_profile(events, module.group(1), classifier, walls),
            memory_stats(compiled))


def memory_stats(compiled: Any) -> dict[str, int]:
    """A compiled program's ``memory_analysis()`` byte counts."""
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
            ("argument", "output", "alias", "temp", "generated_code")}


# ---- PyTorch ----------------------------------------------------------------------------------

_TORCH_ELEMENTWISE = re.compile(
    r"^(relu_?|threshold_backward|add_?|mul_?|sub_?|div_?|where|clamp_min_?|maximum)$")
_TORCH_COPIES = re.compile(
    r"^(copy_|clone|contiguous|_to_copy|to|constant_pad_nd|pad|cat|permute|transpose)$")
_TORCH_LOSS = re.compile(r"nll_loss|log_softmax|cross_entropy|_local_scalar_dense|^item$")
_BACKWARD_NODE = re.compile(r"(\w+?)Backward\d+")
_NODE_CLASSES = {
    "Convolution": CONV, "NativeBatchNorm": BN_BOTH, "CudnnBatchNorm": BN_BOTH,
    "Relu": ELEMENTWISE, "Threshold": ELEMENTWISE, "Add": ELEMENTWISE, "Mul": ELEMENTWISE,
    "NllLoss": LOSS, "LogSoftmax": LOSS, "ConstantPadNd": COPIES, "Slice": COPIES,
    "Cat": COPIES, "Clone": COPIES, "ToCopy": COPIES,
}


def torch_op_class(name: str) -> str | None:
    """The class of a torch profiler event named ``name`` (``aten::mkldnn_convolution``,
    ``autograd::engine::evaluate_function: ReluBackward0``), None if its name says nothing
    (its self time then goes to the nearest ancestor that does)."""
    if name.startswith("Optimizer."):
        return OPTIMIZER
    node = _BACKWARD_NODE.search(name)
    if node:
        return _NODE_CLASSES.get(node.group(1), OTHER)
    core = name.removeprefix("aten::").lower()
    if "convolution" in core or "conv2d" in core:
        return CONV
    if "batch_norm" in core:
        return BN_BOTH
    if _TORCH_LOSS.search(core):
        return LOSS
    if _TORCH_COPIES.match(core):
        return COPIES
    if _TORCH_ELEMENTWISE.match(core):
        return ELEMENTWISE
    return None


def torch_event_class(event: Any) -> str:
    """A torch FunctionEvent's class: optimizer under ``Optimizer.step``/``zero_grad``, else
    its own name's, else its nearest ancestor's, else other."""
    chain, e = [], event
    while e is not None:
        chain.append(e)
        e = e.cpu_parent
    if any(a.name.startswith("Optimizer.") for a in chain):
        return OPTIMIZER
    for a in chain:
        cls = torch_op_class(a.name)
        if cls is not None:
            return cls
    return OTHER


def torch_profile(arrays: dict[str, np.ndarray], *, spec: dict[str, Any], channels_last: bool,
                  warmup: int, steps: int, out: str) -> Any:
    """A :class:`harness.Worker` factory that does its work when built: the torch baseline's
    train step (``baselines.torch_step``), ``warmup`` plain steps (then the peak RSS), then
    ``steps`` steps under ``torch.profiler``; writes their per-class self CPU time, walls and
    the RSS to ``out`` (JSON). Returns the plain step."""
    import torch

    step = baselines.torch_step(arrays, spec=spec, channels_last=channels_last, train=True)
    for _ in range(1 + warmup):
        step()
    rss, rss_now = peak_rss_bytes(), rss_bytes()
    walls = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    seconds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for event in prof.events():
        cls = torch_event_class(event)
        seconds[cls] += event.self_cpu_time_total * 1e-6
        if event.self_cpu_time_total > 0:
            counts[cls] += 1
            examples.setdefault(cls, event.name)
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "counts": counts,
                   "examples": examples, "walls": walls, "peak_rss_bytes": rss,
                   "rss_after_steps_bytes": rss_now,
                   "threads": torch.get_num_threads()}, f)
    return step


def profile_torch(worker: harness.Worker, model: Any, batch: dict[str, np.ndarray],
                  channels_last: bool, warmup: int, steps: int) -> tuple[Profile, dict]:
    """The torch baseline profiled in ``worker``: its :class:`Profile` and extras (peak RSS,
    threads)."""
    arrays = worker.put({"image": batch["image"], "label": batch["label"]})
    with tempfile.TemporaryDirectory(prefix="op_profile_torch_") as tmp:
        out = os.path.join(tmp, "torch.json")
        worker.program("torch", "op_profile:torch_profile", arrays,
                       spec=baselines.torch_spec(model), channels_last=channels_last,
                       warmup=warmup, steps=steps, out=out)
        with open(out) as f:
            got = json.load(f)
    profile = Profile(got["seconds"], steps, got["walls"], None, got["counts"], got["examples"])
    return profile, {"peak_rss_bytes": got["peak_rss_bytes"],
                     "rss_after_steps_bytes": got["rss_after_steps_bytes"],
                     "threads": got["threads"]}


# ---- memory -----------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int | None:
    """This process's resident set size now (``/proc/self/statm``); None without /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return None


def memory_child(model: Any, batch: dict[str, np.ndarray], warmup: int, steps: int) -> dict:
    """In a process of its own: the compiled step's memory analysis, and the peak RSS after
    ``1 + warmup + steps`` steps of that same executable (one compile, not two)."""
    state = new_train_state(model, batch["image"].shape[1:])
    compiled, _, placement = compiled_train_step(model, batch, state)
    state = placement.replicate(state)
    device_batch, rng = placement.shard(batch), placement.place(jax.random.PRNGKey(1))
    for _ in range(1 + warmup + steps):
        state, metrics = compiled(state, device_batch, rng)
        jax.block_until_ready(metrics)
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_steps_bytes": rss_bytes(), **memory_stats(compiled)}


def run_memory_children(argv: Sequence[str]) -> dict[str, dict]:
    """``memory_child`` in two subprocesses of this script: XLA_FLAGS as given, and with
    :data:`NO_SCHEDULER_FLAG` added."""
    child_argv = [a for a in argv if a not in ("--memory", "--json")]
    base = os.environ.get("XLA_FLAGS", "")
    results = {}
    for label, flags in (("default", base), ("no_concurrency_scheduler",
                                              f"{base} {NO_SCHEDULER_FLAG}".strip())):
        env = {**os.environ, "XLA_FLAGS": flags}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv,
                               "--memory-child"], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory subprocess ({label}, XLA_FLAGS={flags!r}) failed "
                               f"with status {proc.returncode}: {proc.stderr[-2000:]}")
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ---- report -----------------------------------------------------------------------------------

def table(profiles: dict[str, Profile]) -> list[str]:
    """The markdown table: one row per class any program has, the BN total, the summed time."""
    per_step = {name: p.per_step_ms() for name, p in profiles.items()}
    totals = {name: sum(ms.values()) for name, ms in per_step.items()}
    for ms in per_step.values():
        ms[BN_TOTAL] = sum(ms.get(k, 0.0) for k in BN_CLASSES)
    rows = [c for c in (*CLASSES[:3], BN_BOTH, BN_TOTAL, *CLASSES[4:])
            if any(ms.get(c, 0.0) > 0 for ms in per_step.values())]
    if BN_TOTAL in rows and sum(any(ms.get(c, 0.0) > 0 for ms in per_step.values())
                                for c in BN_CLASSES) < 2:
        rows.remove(BN_TOTAL)
    lines = ["| class | " + " | ".join(f"{n} ms/step (%)" for n in profiles) + " |",
             "|---|" + "---:|" * len(profiles)]
    for row in rows:
        cells = []
        for name in profiles:
            ms = per_step[name].get(row)
            cells.append("—" if not ms else f"{ms:.1f} ({100 * ms / totals[name]:.1f}%)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **summed op time** | "
                 + " | ".join(f"**{totals[n]:.1f}**" for n in profiles) + " |")
    return lines


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def rss_text(figures: dict[str, Any], note: str = "") -> str:
    now = figures["rss_after_steps_bytes"]
    return (f"peak RSS {mib(figures['peak_rss_bytes'])}{note}, RSS "
            f"{'n/a (no /proc)' if now is None else mib(now)}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.set_defaults(steps=5)
    parser.add_argument("--memory", action="store_true",
                        help="add memory_analysis() with and without the concurrency-optimized "
                             "scheduler (a subprocess each) and the peak RSS of each process")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallel != "jit":
        raise SystemExit("op_profile reads the jit program's HLO; use --parallel jit")
    if args.cpu_devices > 1:
        raise SystemExit("op_profile profiles one device's thunks; drop --cpu-devices")
    others = sorted(set(args.baseline) - {"torch"})
    if others:
        raise SystemExit(f"op_profile compares against torch only; drop --baseline "
                         f"{' '.join(others)}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    parallel.set_cpu_devices(args.cpu_devices)  # before anything touches a device
    model = train_bench.build(args)
    parallel.check_batch_size(args.batch, "batch")
    batch = harness.random_batch(args, model.num_classes, args.image)
    if args.memory_child:
        result = memory_child(model, batch, args.warmup, args.steps)
        print(json.dumps(result))
        return result

    profiles: dict[str, Profile] = {}
    out: dict[str, Any] = {"benchmark": "op_profile", "arch": args.arch, "batch": args.batch,
                           "image": args.image, "dtype": args.dtype, "conv": args.conv,
                           "warmup_steps": args.warmup, "profiled_steps": args.steps,
                           **harness.machine()}
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(harness.Worker()) if "torch" in args.baseline else None
        profiles["resnet_jax"], analysis = profile_resnet_jax(model, batch, args.warmup,
                                                              args.steps)
        if worker is not None:
            profiles["torch"], torch_extra = profile_torch(
                worker, model, batch, args.torch_channels_last, args.warmup, args.steps)
            out["torch"] = {"channels_last": args.torch_channels_last,
                            "omp_wait_policy": worker.omp_wait_policy, **torch_extra}
    out["resnet_jax"] = {"memory_analysis": analysis, **profiles["resnet_jax"].summary()}
    if "torch" in profiles:
        out["torch"].update(profiles["torch"].summary())

    torch_note = ""
    if "torch" in out:
        layout = "channels_last" if out["torch"]["channels_last"] else "NCHW"
        torch_note = f"; torch {layout}, {out['torch']['threads']} threads"
    print(f"op_profile: {args.arch} batch {args.batch} image {args.image} {args.dtype} conv "
          f"{args.conv}{torch_note}; {args.warmup} warm-up + {args.steps} profiled steps "
          f"(profiler on: shares, not speed)")
    print("\n".join(table(profiles)))
    for name, p in profiles.items():
        s = p.summary()
        busy = f", busy (union of op intervals) {s['busy_ms_per_step']:.1f} ms" \
            if "busy_ms_per_step" in s else ""
        print(f"{name}: summed op time {s['summed_ms_per_step']:.1f} ms/step{busy}, wall "
              f"{s['wall_ms_per_step']:.1f} ms/step")
    a = analysis
    print(f"resnet_jax memory_analysis (this process's XLA_FLAGS): argument "
          f"{mib(a['argument'])}, output {mib(a['output'])}, alias {mib(a['alias'])}, temp "
          f"{mib(a['temp'])}")
    if args.memory:
        children = run_memory_children(argv)
        out["memory"] = children
        for label, c in children.items():
            print(f"memory {label} (XLA_FLAGS={c['xla_flags']!r}): temp {mib(c['temp'])}, "
                  f"argument {mib(c['argument'])}, output {mib(c['output'])}, alias "
                  f"{mib(c['alias'])}; after {1 + args.warmup + args.steps} steps: "
                  f"{rss_text(c, ' (XLA compile included)')}")
        if "torch" in out:
            print(f"memory torch: after {1 + args.warmup} steps: {rss_text(out['torch'])}")
    if args.json:
        print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
