#!/usr/bin/env bash
# One prepared GPU benchmark run (one H100/H200; python3 with jax, flax, optax, orbax installed;
# no network). Synthetic input. Writes one JSON file per run to ${1:-$OUT} and a summary table.
#   bash benchmarks/gpu.sh [OUTDIR]
# Budget: < 8 minutes; each run is capped by `timeout` so one slow compile cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# ml_collections is pure Python and may be missing there: carry its wheel in benchmarks/vendor
# (pip download --no-deps ml_collections -d benchmarks/vendor); a wheel is importable as a zip.
for whl in benchmarks/vendor/*.whl; do [ -e "$whl" ] && PYTHONPATH="$PYTHONPATH:$PWD/$whl"; done
python3 -c "import ml_collections" || { echo "ml_collections missing: see benchmarks/vendor"; exit 2; }
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/devices.txt" 2>&1

run() {  # name, timeout seconds, script args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" python3 "$@" --json > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$out/$name.log" > "$out/$name.json"
  grep -E "median|baseline|compile|memory" "$out/$name.log" | head -6
  [ $rc -eq 0 ] || echo "   (exit $rc; see $name.log)"
}

r50="--arch resnet50 --stride-in 3x3 --dtype bfloat16 --warmup 3 --steps 20"
r20="--arch resnet20 --warmup 5 --steps 50"
run r50_b256_jit   120 benchmarks/train_step.py $r50 --batch 256 --parallel jit --baseline plain
run r50_b128_jit    90 benchmarks/train_step.py $r50 --batch 128 --parallel jit --no-peak
run r50_b256_pmap   90 benchmarks/train_step.py $r50 --batch 256 --parallel pmap --no-peak
run r50_eval_b256   60 benchmarks/eval_step.py $r50 --batch 256 --no-peak
run r20_b1024_jit   60 benchmarks/train_step.py $r20 --batch 1024 --parallel jit --baseline plain --no-peak
run r20_b128_jit    45 benchmarks/train_step.py $r20 --batch 128 --parallel jit --no-peak
run r20_b1024_pmap  45 benchmarks/train_step.py $r20 --batch 1024 --parallel pmap --no-peak
run r20_b1024_bf16  45 benchmarks/train_step.py $r20 --batch 1024 --dtype bfloat16 --no-peak

python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        rows.append(f"| {f.stem} | failed: see {f.stem}.log |")
        continue
    plain = f" ({r['vs_plain']:.2f}x plain)" if "vs_plain" in r else ""
    rows.append(f"| {f.stem} | {r['devices']} | {r['images_per_second']:,.0f} img/s{plain} | "
                f"compile {r['compile_seconds']:.0f} s | {r['peak_memory_bytes'] / 2**30:.1f} GiB |")
print("\n".join(rows))
PY
