"""Metric sinks: console line, TensorBoard events, ``metrics.jsonl``, and the Fig. 6-style plot.

Only process 0 writes (``enabled=False`` elsewhere); every line of ``metrics.jsonl`` is one JSON
object with "step" and the scalars measured at that step (errors are fractions in [0, 1]).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.summary import scalar as scalar_summary


class MetricWriter:
    """Scalars to ``workdir/metrics.jsonl`` (appended to when resuming) and TensorBoard events.

    Both are written synchronously and flushed by :meth:`write` (tensorboardX's
    ``SummaryWriter`` queues events to a thread, which a kill -9 loses), and the loop writes a
    step's scalars before it starts that step's checkpoint: a run resumed from checkpoint N
    never lacks a point at or before N.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, append: bool = False,
                 purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first new step; TensorBoard then drops the events of
        the interrupted run logged at or after it (as ``metrics.jsonl`` drops its records)."""
        self.workdir = workdir
        self.enabled = enabled
        self._tb: Any = None
        self._jsonl: Any = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            # a unique name: a restart within the same second must not overwrite the file
            suffix = f".{os.getpid()}.{time.time_ns() % 10**9}"
            self._tb = EventsWriter(os.path.join(workdir, "events"), suffix)
            if purge_step is not None:
                self._tb.write_event(event_pb2.Event(
                    wall_time=time.time(), step=int(purge_step),
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            self._tb.flush()
            path = os.path.join(workdir, "metrics.jsonl")
            if not append:  # a new empty file by rename (tmp + os.replace), never a truncation
                open(path + ".tmp", "w").close()  # under another writer's offset: no torn lines
                os.replace(path + ".tmp", path)
            self._jsonl = open(path, "a")  # noqa: SIM115  (O_APPEND: each line lands whole)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One JSON line ``{"step": step, **scalars}`` and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        now = time.time()
        for key, value in scalars.items():
            self._tb.write_event(event_pb2.Event(
                wall_time=now, step=int(step), summary=scalar_summary(key, float(value))))
        self._tb.flush()

    def close(self) -> None:
        """Close both files."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl``, in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_line(
    step: int, total: int, scalars: Mapping[str, float], elapsed_per_step: float
) -> str:
    """``step 1000/64000 | loss 0.532 | error 18.20% | lr 0.1 | 2345 img/s | ETA 1:02:03``."""
    parts = [f"step {step}/{total}"]
    if "train_loss" in scalars:
        parts.append(f"loss {scalars['train_loss']:.4f}")
    if "train_error" in scalars:
        parts.append(f"error {100 * scalars['train_error']:.2f}%")
    if "learning_rate" in scalars:
        parts.append(f"lr {scalars['learning_rate']:.4g}")
    if "images_per_second" in scalars:
        parts.append(f"{scalars['images_per_second']:.0f} img/s")
    if math.isfinite(elapsed_per_step):
        eta = datetime.timedelta(seconds=round(elapsed_per_step * (total - step)))
        parts.append(f"ETA {eta}")
    return " | ".join(parts)


def plot_curves(records: Sequence[Mapping[str, float]], path: str, title: str = "") -> None:
    """Training error (thin) and test error (bold) in % against iterations, as in Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], 100 * r[key]) for r in records if key in r]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, err = series("train_error")
    ax.plot(steps, err, linewidth=0.8, color="C0", label="training error")
    steps, err = series("test_error")
    ax.plot(steps, err, linewidth=2.5, color="C0", label="test error", marker="o" if
            len(steps) < 3 else None)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ProfileWindow:
    """A ``jax.profiler`` trace of the training steps ``start .. stop-1`` written into
    ``workdir`` (``workdir/plugins/profile/<run>/*.xplane.pb`` and ``*.trace.json.gz``:
    TensorBoard's profile plugin reads it with ``tensorboard --logdir WORKDIR``). ``window``
    None: does nothing.

    Each step of the window is a ``jax.profiler.StepTraceAnnotation`` named
    :attr:`ANNOTATION` (``step_num`` = the step) on the loop's thread, from :meth:`before` to
    :meth:`after`: batch fetch + dispatch, the host's part of the step. Python function
    tracing is off (it slows the loop several times, so the host times and the device's idle
    time would be the profiler's). Once the trace is written, ``workdir/profile.json`` names
    it: ``{"trace": <path of the .trace.json.gz, relative to workdir>, "steps": [start, stop],
    "platform": "gpu" | "cpu" | ..., "devices": <local device count>, "annotation": ...}``
    (``benchmarks/gpu_report.py profile WORKDIR`` turns it into host ms per step and the
    device idle fraction).
    """

    ANNOTATION = "train_step"
    MANIFEST = "profile.json"

    def __init__(self, window: tuple[int, int] | None, workdir: str, *, enabled: bool) -> None:
        self._window = window if enabled else None
        self._workdir = workdir
        self._on = False
        self._step: Any = None  # the open StepTraceAnnotation
        self._runs_before: set[str] = set()

    def _runs(self) -> set[str]:
        folder = os.path.join(self._workdir, "plugins", "profile")
        return set(os.listdir(folder)) if os.path.isdir(folder) else set()

    def before(self, step: int) -> None:
        """Called before step ``step`` fetches its batch."""
        if self._window is not None and step == self._window[0]:
            self._runs_before = self._runs()
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(self._workdir, profiler_options=options)
            self._on = True
        if self._on:
            self._step = jax.profiler.StepTraceAnnotation(self.ANNOTATION, step_num=step)
            self._step.__enter__()

    def after(self, done: int, outputs: Any) -> None:
        """Called after ``done`` steps were dispatched; ends the trace once the window's last
        step finished on the devices."""
        self._end_step()
        if self._on and done >= self._window[1]:  # type: ignore[index]
            jax.block_until_ready(outputs)
            self.close()

    def _end_step(self) -> None:
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None

    def close(self) -> None:
        """Stop the trace (if running) and write ``workdir/profile.json``."""
        if not self._on:
            return
        self._end_step()
        jax.profiler.stop_trace()
        self._on = False
        new = sorted(self._runs() - self._runs_before)
        folder = os.path.join(self._workdir, "plugins", "profile", new[-1]) if new else ""
        traces = sorted(f for f in os.listdir(folder) if f.endswith(".trace.json.gz")) \
            if folder else []
        if len(traces) != 1:
            raise RuntimeError(f"jax.profiler.stop_trace wrote {len(traces)} *.trace.json.gz in "
                               f"{folder or self._workdir + '/plugins/profile'} (expected 1): "
                               "the trace of profile_steps cannot be analysed")
        manifest = {
            "trace": os.path.relpath(os.path.join(folder, traces[0]), self._workdir),
            "steps": list(self._window),  # type: ignore[arg-type]
            "platform": jax.local_devices()[0].platform,
            "devices": jax.local_device_count(),
            "annotation": self.ANNOTATION,
        }
        path = os.path.join(self._workdir, self.MANIFEST)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f)
        os.replace(path + ".tmp", path)
