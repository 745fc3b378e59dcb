"""benchmarks/gpu.sh's Python half: the import check, the benchmark table, the run's summary line
and the check of what a call leaves in $OUT.

    python3 benchmarks/gpu_report.py imports [--device-file F]   # exit 2: one line, what's missing
    python3 benchmarks/gpu_report.py bench-table bench.jsonl      # markdown table
    python3 benchmarks/gpu_report.py summary --metrics metrics.jsonl --steps 64000 ...
    python3 benchmarks/gpu_report.py out-check OUTDIR             # the device tool's $OUT limits

Only ``imports`` imports anything beyond the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import json
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
                f"{args.batch}{speed}{wall}{device}")
    last = (f"; last test error {100 * tests[-1]['test_error']:.2f}% at step {tests[-1]['step']}"
            if tests else "")
    why = f" ({args.reason})" if args.reason else ""
    resume = "; rerun `bash benchmarks/gpu.sh train` to resume" \
        if not args.reason or args.reason.startswith("time limit") else ""
    return f"{head}: INCOMPLETE at step {done}/{args.steps}{why}{last}{speed}{wall}{device}{resume}"


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
    p = sub.add_parser("out-check")
    p.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "imports":
        return check_imports(args.device_file)
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
