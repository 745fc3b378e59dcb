"""The depth study of Fig. 6 / Table 6: plain and residual nets of several depths, one recipe.

Each net trains in ``workdir/<arch>`` through :func:`resnet_jax.train.loop.train_and_evaluate`
(which resumes a partial run from its checkpoints); a net whose ``metrics.jsonl`` already has
the final step with a test error is skipped. ``workdir/<arch>/study_config.json`` records the
config the net was trained with, so a rerun with another recipe fails instead of mixing runs.
Then ``fig6.png`` (training error dashed, test error bold, plain | residual side by side, as
Fig. 6) and ``depth.md`` / ``depth.csv`` (final errors beside Table 6).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

import ml_collections

from resnet_jax import cli
from resnet_jax.errors import ConfigError
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import train_and_evaluate

# Table 6: CIFAR-10 test error (%), best of the paper's runs; plain nets appear only in Fig. 6.
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                    "resnet110": 6.43, "resnet1202": 7.93}
FIG6_ARCHS = ("plain20", "plain32", "plain44", "plain56",
              "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
STUDY_CONFIG = "study_config.json"


def scale_schedule(config: ml_collections.ConfigDict, steps: int) -> str:
    """Shorten (or stretch) the step schedule to ``steps``, in place; returns what changed.

    The lr boundaries scale with the run (§4.2's 32k/48k of 64k become 0.5N/0.75N), and so do
    the eval, log and checkpoint intervals (the same number of points on the curves). The
    warm-up of ResNet-110/1202 (0.01 "until the training error is below 80%", ~400 iterations)
    is a number of iterations, not a fraction of the run, and is kept.
    """
    if steps < 1:
        raise ConfigError(f"--steps={steps} must be >= 1.")
    if config.num_epochs > 0 or config.lr_boundaries_unit != "steps":
        raise ConfigError("--steps scales a schedule given in steps; this config counts epochs "
                          "(num_epochs / lr_boundaries_unit); set --config.num_train_steps and "
                          "--config.lr_boundaries instead.")
    old = int(config.num_train_steps)
    f = steps / old
    old_bounds = tuple(int(b) for b in config.lr_boundaries)
    config.num_train_steps = steps
    config.lr_boundaries = tuple(max(1, round(b * f)) for b in old_bounds)
    for field in ("eval_every_steps", "log_every_steps", "checkpoint_every_steps"):
        config[field] = max(1, min(steps, round(config[field] * f)))
    return (f"schedule scaled from {old} to {steps} steps (x{f:.4g}): lr boundaries "
            f"{old_bounds} -> {tuple(config.lr_boundaries)}; eval every "
            f"{config.eval_every_steps}, log every {config.log_every_steps} steps"
            + (f"; warm-up kept at {config.warmup_steps} steps" if config.warmup_steps else ""))


def check_study_config(config: ml_collections.ConfigDict, netdir: str) -> None:
    """Record ``config`` in ``netdir``, or raise if the recorded one differs in what is computed
    (fields other than ``train.config.RESUME_SAFE_FIELDS``)."""
    path = os.path.join(netdir, STUDY_CONFIG)
    now = config_lib.to_json(config)
    if os.path.exists(path):
        with open(path) as f:
            diff = config_lib.changed_fields(json.load(f), now)
        if diff:
            raise ConfigError(
                f"{netdir} was trained with another config (fields {diff}); use another "
                "--workdir or the same overrides."
            )
    os.makedirs(netdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=1, sort_keys=True)


def load_study_config(netdir: str) -> ml_collections.ConfigDict:
    """The config a net of the study was trained with (``netdir/study_config.json``)."""
    path = os.path.join(netdir, STUDY_CONFIG)
    if not os.path.exists(path):
        raise ConfigError(f"{path} is missing; train the net with the depth command first.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _records(netdir: str) -> list[dict[str, float]]:
    path = os.path.join(netdir, "metrics.jsonl")
    return metrics_lib.read_jsonl(path) if os.path.exists(path) else []


def is_complete(netdir: str, total_steps: int) -> bool:
    """The run logged its final test error (the loop evaluates at the last step)."""
    return any(r["step"] == total_steps and "test_error" in r for r in _records(netdir))


def run_study(configs: Mapping[str, ml_collections.ConfigDict], workdir: str) -> list[str]:
    """Train every net (in order) in ``workdir/<arch>``; returns the archs that were skipped."""
    skipped = []
    for arch, config in configs.items():
        netdir = os.path.join(workdir, arch)
        check_study_config(config, netdir)
        if is_complete(netdir, int(config.num_train_steps)):
            print(f"{arch}: complete ({config.num_train_steps} steps), skipped", flush=True)
            skipped.append(arch)
            continue
        print(f"{arch}: training in {netdir}", flush=True)
        train_and_evaluate(config, netdir)
    return skipped


def split_lanes(archs: Sequence[str], jobs: int) -> list[list[str]]:
    """Split ``archs`` into at most ``jobs`` lanes of near-equal cost, the deepest net first
    (longest-processing-time greedy; cost = the depth in the name, e.g. 56 for plain56, or 1).
    Each lane keeps the order in which its nets were assigned."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1; got {jobs}.")
    lanes: list[list[str]] = [[] for _ in range(min(jobs, len(archs)))]
    load = [0] * len(lanes)
    for arch in sorted(archs, key=lambda a: -(_depth(a) or 1)):  # stable: ties keep --archs order
        i = load.index(min(load))
        lanes[i].append(arch)
        load[i] += _depth(arch) or 1
    return lanes


def cpu_shares(jobs: int) -> list[list[int]]:
    """The CPU cores this process may use, split into ``jobs`` disjoint contiguous shares."""
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--jobs > 1 pins each lane to its own CPU cores, which needs Linux "
                          "(os.sched_setaffinity); run with --jobs 1 here.")
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        raise ConfigError(f"--jobs {jobs} exceeds the {len(cpus)} CPU cores this process may "
                          f"use; pass --jobs {len(cpus)} or fewer.")
    return [cpus[i * len(cpus) // jobs:(i + 1) * len(cpus) // jobs] for i in range(jobs)]


def lane_argv(argv: Sequence[str], lane: Sequence[str]) -> list[str]:
    """``argv`` (a depth command line, without the program) for one lane: its own ``--archs``,
    ``--jobs=1`` and ``--train_only``; every other flag (config, overrides, steps) unchanged."""
    drop = ("archs", "jobs", "train_only", "notrain_only")
    out: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name = token.lstrip("-").split("=", 1)[0] if token.startswith("-") else None
        if name in drop:
            skip_value = "=" not in token and name in ("archs", "jobs")
            continue
        out.append(token)
    return [*out, f"--archs={','.join(lane)}", "--jobs=1", "--train_only"]


def run_lanes(argv: Sequence[str], lanes: Sequence[Sequence[str]], workdir: str) -> None:
    """Train the lanes at once, each a ``python -m resnet_jax.experiments`` process pinned to its
    share of the CPU cores (XLA sizes its thread pool to that share), logging to
    ``workdir/lane<i>.log``. On CPU, one core per net beats two cores per net one after another
    (convolutions on 32x32 images scale poorly across threads; ``benchmarks/RESULTS.md``).
    SIGINT/SIGTERM are passed on to the lanes, which save a checkpoint and stop; a failed lane
    raises :class:`LaneError` (a ``cli.CommandFailed`` with the lane's exit status)."""
    shares = cpu_shares(len(lanes))
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the shares are CPU cores: lanes run on the CPU
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    try:
        for i, (lane, cpus) in enumerate(zip(lanes, shares, strict=True)):
            log = os.path.join(workdir, f"lane{i}.log")
            cmd = [sys.executable, "-m", "resnet_jax.experiments", *lane_argv(argv, lane)]
            mine = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpus)  # the child inherits this thread's CPU mask
            try:
                with open(log, "w") as f:  # own session: signals reach the lane only through us
                    procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                  env=env, start_new_session=True))
            finally:
                os.sched_setaffinity(0, mine)
            print(f"lane {i}: {','.join(lane)} on CPU cores {cpus}, log {log}", flush=True)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        i, code = failed[0]
        log = os.path.join(workdir, f"lane{i}.log")
        with open(log) as f:
            said = [line.strip() for line in f if line.startswith("error: ")]
        reason = said[-1].removeprefix("error: ") if said else f"exit status {code}"
        raise LaneError(code, f"lane {i} ({','.join(lanes[i])}): {reason} (log: {log}); fix "
                        "it and rerun the same command: finished nets are kept.")


class LaneError(cli.CommandFailed):
    """A lane of ``run_lanes`` failed; ``exit_code`` is its exit status."""


@dataclasses.dataclass(frozen=True)
class NetResult:
    arch: str
    steps: int
    train_error: float  # %, the mean over the last logging interval
    test_error: float  # %, at the last step
    paper_test_error: float | None


def results(archs: Sequence[str], workdir: str, *, cifar10: bool) -> list[NetResult]:
    """Final training and test errors of each net's ``metrics.jsonl``; the paper's Table 6
    test error beside them only for a CIFAR-10 study."""
    out = []
    for arch in archs:
        records = _records(os.path.join(workdir, arch))
        train = [r for r in records if "train_error" in r]
        test = [r for r in records if "test_error" in r]
        if not train or not test:
            raise ConfigError(f"{workdir}/{arch}/metrics.jsonl has no train and test errors yet.")
        out.append(NetResult(arch, int(test[-1]["step"]), 100 * train[-1]["train_error"],
                             100 * test[-1]["test_error"],
                             PAPER_TEST_ERROR.get(arch) if cifar10 else None))
    return out


def _depth(arch: str) -> int:
    m = re.search(r"(\d+)", arch)
    return int(m.group(1)) if m else 0


def plot_fig6(archs: Sequence[str], workdir: str, path: str, title: str = "") -> None:
    """Fig. 6: error (%) against iterations; dashed training error, bold test error; plain nets
    on the left, residual nets on the right, one colour per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"plain": [a for a in archs if a.startswith("plain")],
                "ResNet": [a for a in archs if not a.startswith("plain")]}
    panels = {k: v for k, v in families.items() if v}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True,
                             squeeze=False)
    depths = sorted({_depth(a) for a in archs})
    colour = {d: f"C{i}" for i, d in enumerate(depths)}
    for ax, (family, nets) in zip(axes[0], panels.items(), strict=True):
        for arch in nets:
            records = _records(os.path.join(workdir, arch))
            c = colour[_depth(arch)]
            for key, style in (("train_error", dict(linestyle="--", linewidth=0.9)),
                               ("test_error", dict(linestyle="-", linewidth=2.2))):
                pts = [(r["step"], 100 * r[key]) for r in records if key in r]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    label = arch if key == "test_error" else None
                    ax.plot(xs, ys, color=c, label=label, **style)
        ax.set_title(f"{family} (dashed: training error, bold: test error)", fontsize=10)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)")
    axes[0][0].set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(rows: Sequence[NetResult], workdir: str, header: str) -> str:
    """``depth.csv`` and ``depth.md`` (with ``header``: the recipe and any scaling note)."""
    with open(os.path.join(workdir, "depth.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["net", "steps", "train_error", "test_error", "paper_test_error"])
        for r in rows:
            paper = "" if r.paper_test_error is None else r.paper_test_error
            w.writerow([r.arch, r.steps, f"{r.train_error:.2f}", f"{r.test_error:.2f}", paper])
    lines = [header, "",
             "| net | steps | final training error (%) | test error (%) | paper test error (%) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        paper = "—" if r.paper_test_error is None else f"{r.paper_test_error:.2f}"
        lines.append(f"| {r.arch} | {r.steps} | {r.train_error:.2f} | {r.test_error:.2f} "
                     f"| {paper} |")
    lines += ["", "Training error: mean over the last logging interval (augmented batches, BN in "
              "training mode). Paper: Table 6 (CIFAR-10, 64k iterations); plain nets appear "
              "only in Fig. 6."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "depth.md"), "w") as f:
        f.write(text)
    return text


def recipe_header(config: ml_collections.ConfigDict, archs: Sequence[str], note: str) -> str:
    """The markdown header of ``depth.md``: what was trained, with the schedule note."""
    lines = [
        f"# Depth study (Fig. 6 / Table 6): {', '.join(archs)}",
        "",
        f"Dataset {config.dataset}, batch {config.batch_size}, {config.num_train_steps} steps, "
        f"lr {config.learning_rate} x{config.lr_decay_factor} at {tuple(config.lr_boundaries)}, "
        f"momentum {config.momentum}, weight decay {config.weight_decay}.",
    ]
    if note:
        lines += ["", f"**{note[0].upper()}{note[1:]}.** The paper trains 64k iterations; "
                  "numbers from a shortened schedule are not the paper's."]
    return "\n".join(lines)
