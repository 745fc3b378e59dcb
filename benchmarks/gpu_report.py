"""benchmarks/gpu.sh's Python half: the import check, the benchmark table, the run's summary line
and the check of what a call leaves in $OUT.

    python3 benchmarks/gpu_report.py imports [--device-file F]   # exit 2: one line, what's missing
    python3 benchmarks/gpu_report.py bench-table bench.jsonl      # markdown table
    python3 benchmarks/gpu_report.py summary --metrics metrics.jsonl --steps 64000 ...
    python3 benchmarks/gpu_report.py out-check OUTDIR             # the device tool's $OUT limits
    python3 benchmarks/gpu_report.py profile WORKDIR [--json F]   # host ms a step, device idle
    python3 benchmarks/gpu_report.py profile-check F [F ...]      # the dry run's check of those

Only ``imports`` imports anything beyond the standard library (``profile`` reads the
``*.trace.json.gz`` that ``jax.profiler`` writes next to its ``*.xplane.pb``: gzipped JSON in
the Chrome trace event format, no profiler plugin needed).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import itertools
import json
import math
import os
import re
import statistics
import sys

# (module, distribution): what train.py and the benchmarks import on the CIFAR archive path
# (tensorflow_datasets is imported only for TFDS datasets, never for data.archive).
MODULES = [
    ("numpy", "numpy"), ("jax", "jax"), ("flax", "flax"), ("optax", "optax"),
    ("orbax.checkpoint", "orbax-checkpoint"), ("absl", "absl-py"), ("PIL", "pillow"),
    ("matplotlib", "matplotlib"), ("etils.epath", "etils"), ("cloudpickle", "cloudpickle"),
    ("ml_collections", "ml_collections"), ("tensorboardX", "tensorboardX"),
    ("grain", "grain"),
]
# The project's own modules that a run imports, after the packages (a version mismatch of an
# installed package shows up here).
PROJECT = ["resnet_jax.train.loop", "resnet_jax.checkpoint", "resnet_jax.data.loader",
           "resnet_jax.train.metrics"]
WHEELS_FILE = "benchmarks/gpu-wheels.txt"

# The device tool's limits on what comes back from $OUT (device README).
OUT_MAX_FILES = 8
OUT_MAX_BYTES = 16 << 20
OUT_MAX_DEPTH = 2  # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _pinned() -> set[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = set()
    with open(os.path.join(root, WHEELS_FILE)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def check_imports(device_file: str | None) -> int:
    missing, versions = [], []
    for module, dist in MODULES:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # any failure to import is "missing" here
            missing.append((dist, f"{type(e).__name__}: {e}"))
            continue
        top = sys.modules[module.split(".")[0]]
        versions.append(f"{dist} {getattr(mod, '__version__', getattr(top, '__version__', '?'))}")
    if missing:
        pinned = _pinned()
        others = [d for d, _ in missing if d.lower().replace("_", "-") not in pinned]
        how = [f"carry the wheels of {WHEELS_FILE} in .gpu/whl (`bash benchmarks/gpu.sh "
               "prepare` downloads them)"]
        if others:
            how.append(f"{', '.join(others)} not pinned there: add them")
        what = "; ".join(f"{d} ({why})" for d, why in missing)
        print(f"gpu.sh: missing Python packages: {what}; {'; '.join(how)}", file=sys.stderr)
        return 2
    for module in PROJECT:
        try:
            importlib.import_module(module)
        except Exception as e:
            print(f"gpu.sh: {module} does not import with these packages "
                  f"({type(e).__name__}: {e}); versions: {', '.join(versions)}", file=sys.stderr)
            return 2
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    device = f"{len(devices)} x {'/'.join(kinds)} ({devices[0].platform})"
    print(f"python {sys.version.split()[0]}; {', '.join(versions)}")
    print(f"devices: {device}")
    if device_file:
        with open(device_file, "w") as f:
            f.write(device + "\n")
    return 0


def bench_table(path: str) -> str:
    rows = ["| run | devices | images/s | compile | peak memory |", "|---|---|---|---|---|"]
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        if "images_per_second" not in r:
            rows.append(f"| {r['name']} | {r.get('status', 'failed')} | | | |")
            continue
        plain = f" ({r['vs_plain']:.2f}x plain)" if "vs_plain" in r else ""
        mem = r.get("peak_memory_bytes")
        rows.append(f"| {r['name']} | {r['devices']} | {r['images_per_second']:,.0f}{plain} | "
                    f"{r['compile_seconds']:.0f} s | "
                    f"{'' if mem is None else f'{mem / 2**30:.1f} GiB'} |")
    return "\n".join(rows)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s ({seconds:.0f} s)" if m else f"{s} s"


def summary(args: argparse.Namespace) -> str:
    """One line: test error against the paper, images/s, wall time, the device; or why not."""
    records = []
    if os.path.isfile(args.metrics):
        with open(args.metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
    head = f"{args.model} on {args.dataset}"
    device = ""
    if args.device_file and os.path.isfile(args.device_file):
        with open(args.device_file) as f:
            device = f"; {f.read().strip()}"
    wall = f"; wall {_duration(args.wall)} in train.py" if args.wall else ""
    prof = ""
    if args.profile and os.path.isfile(args.profile):
        with open(args.profile) as f:
            prof = f"; {profile_line(json.load(f))}"
    done = max((int(r["step"]) for r in records), default=0)
    tests = [r for r in records if "test_error" in r]
    speeds = [r["images_per_second"] for r in records if "images_per_second" in r]
    # The first interval of each train.py process includes its compile: the median ignores it.
    speed = f"; {statistics.median(speeds):,.0f} images/s (median of {len(speeds)} logged " \
        "intervals)" if speeds else ""
    if done >= args.steps and tests and int(tests[-1]["step"]) >= args.steps:
        err = 100 * tests[-1]["test_error"]
        paper = f" (paper {args.paper:.2f}%)" if args.paper else ""
        return (f"{head}: test error {err:.2f}%{paper} after {done}/{args.steps} steps of batch "
                f"{args.batch}{speed}{prof}{wall}{device}")
    last = (f"; last test error {100 * tests[-1]['test_error']:.2f}% at step {tests[-1]['step']}"
            if tests else "")
    why = f" ({args.reason})" if args.reason else ""
    resume = "; rerun `bash benchmarks/gpu.sh train` to resume" \
        if not args.reason or args.reason.startswith("time limit") else ""
    return (f"{head}: INCOMPLETE at step {done}/{args.steps}{why}{last}{speed}{prof}{wall}{device}"
            f"{resume}")


def out_check(folder: str) -> list[str]:
    """What the device tool would not bring back from ``folder`` (its $OUT limits)."""
    problems, files = [], []
    for root, dirs, names in os.walk(folder):
        depth = os.path.relpath(root, folder).count(os.sep) + (root != folder)
        for name in dirs + names:
            if not OUT_NAME.match(name):
                problems.append(f"{os.path.join(root, name)}: name not in [A-Za-z0-9._-]")
        for name in names:
            path = os.path.join(root, name)
            files.append(path)
            if depth > OUT_MAX_DEPTH:
                problems.append(f"{path}: more than {OUT_MAX_DEPTH} folders down")
            if os.path.getsize(path) > OUT_MAX_BYTES:
                problems.append(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB > 16 MiB")
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files in {folder}, more than {OUT_MAX_FILES} come back")
    return problems


class ProfileError(Exception):
    """A trace that cannot give the figures; the message is the one line to print."""


def _union_ms(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` (µs) clipped to ``[lo, hi]``, in ms."""
    total, end = 0.0, lo
    for s, e in sorted(intervals):
        s, e = max(s, end), min(e, hi)
        if e > s:
            total += e - s
            end = e
    return total / 1000


def profile_figures(workdir: str) -> dict:
    """Host time per step and device idle fraction of the trace named by
    ``workdir/profile.json`` (train.metrics.ProfileWindow writes both).

    Steps: the loop's ``train_step`` annotations (batch fetch + dispatch). Device activity:
    GPU, the kernel and copy events of the ``Stream #...`` lines of each ``/device:GPU:N``
    process (CUPTI's record of what ran on the device; derived lines such as "XLA Ops" or
    "Steps" are not counted); CPU, the XLA thunk events (an ``hlo_op`` arg) on the host's
    threads, per ``device_ordinal``. The window runs from the first step's start to the end
    of the last device event (the trace stops once the last step finished); idle = 1 - the
    union of a device's busy intervals in it / its length, averaged over the devices.
    """
    manifest_path = os.path.join(workdir, "profile.json")
    if not os.path.isfile(manifest_path):
        raise ProfileError(f"no {manifest_path}: the run wrote no trace (set "
                           "--config.profile_steps=START,STOP; a run resumed past START "
                           "writes none)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    trace_path = os.path.join(workdir, manifest["trace"])
    try:
        with gzip.open(trace_path, "rt") as f:
            trace = json.load(f)
    except (OSError, ValueError) as e:
        raise ProfileError(f"{trace_path}: not a readable gzipped JSON trace ({e})") from e
    events = trace.get("traceEvents", [])
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e for e in spans if e["name"] == manifest["annotation"]
                    and process.get(e["pid"], "").startswith("/host:")), key=lambda e: e["ts"])
    start, stop = manifest["steps"]
    if len(steps) < 2:
        raise ProfileError(f"{trace_path}: {len(steps)} '{manifest['annotation']}' step "
                           f"annotations, need 2 or more (profile_steps={start},{stop}: did the "
                           "run stop inside the window?)")
    platform = manifest["platform"]
    busy: dict[int, list[tuple[float, float]]] = {}
    if platform == "gpu":
        source = "kernel and copy events on the 'Stream #' lines of /device:GPU:N"
        for e in spans:
            name = process.get(e["pid"], "")
            if name.startswith("/device:GPU:") and \
                    thread.get((e["pid"], e.get("tid")), "").startswith("Stream #"):
                ordinal = int(re.match(r"/device:GPU:(\d+)", name).group(1))
                busy.setdefault(ordinal, []).append((e["ts"], e["ts"] + e["dur"]))
    elif platform == "cpu":
        source = "XLA thunk events (hlo_op) on the /host:CPU threads"
        for e in spans:
            args = e.get("args") or {}
            if "hlo_op" in args and process.get(e["pid"], "").startswith("/host:"):
                ordinal = int(args.get("device_ordinal", 0))
                busy.setdefault(ordinal, []).append((e["ts"], e["ts"] + e["dur"]))
    else:
        raise ProfileError(f"{trace_path}: platform {platform!r}: device activity is read for "
                           "gpu and cpu traces only")
    if not busy:
        what = "no /device:GPU:N process with 'Stream #' lines (was CUPTI found?)" \
            if platform == "gpu" else "no XLA thunk events (hlo_op args)"
        raise ProfileError(f"{trace_path}: {what}: no device activity to measure")
    lo = steps[0]["ts"]
    hi = max([e for intervals in busy.values() for _, e in intervals]
             + [steps[-1]["ts"] + steps[-1]["dur"]])
    devices = sorted(set(range(int(manifest["devices"]))) | set(busy))
    busy_ms = [_union_ms(busy.get(d, []), lo, hi) for d in devices]
    window_ms = (hi - lo) / 1000
    idle = [1 - b / window_ms for b in busy_ms]
    host = [e["dur"] / 1000 for e in steps]
    wall = [(b["ts"] - a["ts"]) / 1000 for a, b in itertools.pairwise(steps)]
    return {
        "steps": [start, stop], "steps_seen": len(steps), "platform": platform,
        "first_step": int(steps[0].get("args", {}).get("step_num", start)),
        "last_step": int(steps[-1].get("args", {}).get("step_num", start + len(steps) - 1)),
        "trace": manifest["trace"],
        "host_ms": statistics.median(host), "host_ms_mean": statistics.fmean(host),
        "step_ms": statistics.median(wall), "step_ms_mean": statistics.fmean(wall),
        "window_ms": window_ms, "idle": statistics.fmean(idle),
        "idle_per_device": {str(d): v for d, v in zip(devices, idle, strict=True)},
        "device_busy_ms": {str(d): v for d, v in zip(devices, busy_ms, strict=True)},
        "device_events": sum(map(len, busy.values())), "device_source": source,
        "host_ms_steps": [round(v, 4) for v in host],
        "step_ms_steps": [round(v, 4) for v in wall],
    }


FIGURES = "profile_figures.json"  # in the workdir: what profile_report read from its trace


def profile_report(workdir: str) -> tuple[dict, str]:
    """The figures of ``workdir``'s trace, and a note on where they came from.

    The figures are saved as ``workdir/profile_figures.json``; a workdir that travelled
    without its trace (gpu.sh's run.tar.gz carries no ``plugins/``) gets those back, noted.
    """
    saved = os.path.join(workdir, FIGURES)
    manifest = os.path.join(workdir, "profile.json")
    if os.path.isfile(manifest) and os.path.isfile(saved):
        with open(manifest) as f:
            trace = json.load(f)["trace"]
        if not os.path.isfile(os.path.join(workdir, trace)):
            with open(saved) as f:
                fig = json.load(f)
            if fig.get("trace") == trace:
                return fig, f" (read from {trace} before the workdir travelled without it)"
    fig = profile_figures(workdir)
    with open(saved + ".tmp", "w") as f:
        json.dump(fig, f, indent=1)
    os.replace(saved + ".tmp", saved)
    return fig, ""


def profile_line(fig: dict) -> str:
    """``host 0.52 ms of a 3.10 ms step, device idle 12.3% (steps 1050-1149, gpu)``."""
    return (f"host {fig['host_ms']:.2f} ms of a {fig['step_ms']:.2f} ms step, device idle "
            f"{100 * fig['idle']:.1f}% (steps {fig['first_step']}-{fig['last_step']}, "
            f"{fig['platform']})")


def profile_check(path: str) -> str:
    """Empty if ``path`` holds the profile figures within range, else what is wrong."""
    if not os.path.isfile(path):
        return f"{path}: missing (gpu_report.py profile did not write it)"
    with open(path) as f:
        fig = json.load(f)
    bad = [k for k in ("host_ms", "step_ms", "window_ms", "idle")
           if not isinstance(fig.get(k), (int, float)) or not math.isfinite(fig[k])]
    if bad:
        return f"{path}: {', '.join(bad)} missing or not a finite number"
    if not 0 <= fig["idle"] <= 1 or not all(0 <= v <= 1 for v in fig["idle_per_device"].values()):
        return f"{path}: idle {fig['idle']} outside [0, 1]"
    if not (fig["host_ms"] > 0 and fig["step_ms"] > 0 and fig["window_ms"] > 0):
        return f"{path}: host_ms {fig['host_ms']}, step_ms {fig['step_ms']}: not > 0"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("imports")
    p.add_argument("--device-file", default=None, help="write the device line here")
    p = sub.add_parser("bench-table")
    p.add_argument("jsonl")
    p = sub.add_parser("summary")
    p.add_argument("--metrics", required=True)
    p.add_argument("--steps", type=int, required=True, help="the run's num_train_steps")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--paper", type=float, default=None, help="the paper's test error (%%)")
    p.add_argument("--wall", type=float, default=0.0, help="seconds spent in train.py")
    p.add_argument("--device-file", default=None)
    p.add_argument("--reason", default="", help="why it stopped early, if it did")
    p.add_argument("--profile", default=None, help="gpu_report.py profile's json, if written")
    p = sub.add_parser("out-check")
    p.add_argument("folder")
    p = sub.add_parser("profile", help="host ms a step and device idle from profile_steps' trace")
    p.add_argument("workdir", help="the run's workdir (its profile.json names the trace); the "
                   f"figures are saved there as {FIGURES}")
    p.add_argument("--json", default=None, help="also write the figures here")
    p = sub.add_parser("profile-check", help="exit 1 unless the figures are there and in range")
    p.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "imports":
        return check_imports(args.device_file)
    if args.command == "profile":
        try:
            fig, note = profile_report(args.workdir)
        except ProfileError as e:
            print(f"gpu_report.py profile: {e}", file=sys.stderr)
            return 1
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=1)
        print(f"profile: {profile_line(fig)}{note}")
        return 0
    if args.command == "profile-check":
        problems = [p for p in map(profile_check, args.files) if p]
        for p in problems:
            print(f"gpu.sh: profile figures: {p}", file=sys.stderr)
        return 1 if problems else 0
    if args.command == "bench-table":
        print(bench_table(args.jsonl))
    elif args.command == "summary":
        print(summary(args))
    else:
        problems = out_check(args.folder)
        if problems:
            print(f"gpu.sh: $OUT would not come back whole: {'; '.join(problems)}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
