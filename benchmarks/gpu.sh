#!/usr/bin/env bash
# The one prepared run for a session lent an accelerator: the GPU benchmarks, and Table 6's first
# row, ResNet-20 on real CIFAR-10 at the paper's full recipe (configs/cifar10.py:resnet20: all
# 50k training images, no 45k/5k split, so the test set is the 10k official test images; 64k
# iterations of batch 128; data.on_device=True; tested every 2k steps and at the end).
# Device: one H100/H200, the image's python3 with jax/flax/optax/orbax, no network, 15 min of
# device time in all (machine start included), 10 min a call, 64 MiB carried a call (code
# included), 8 files of 16 MiB back from $OUT, warm only 30 s after a call.
#
# Here, once (CPU, network for pip):
#   bash benchmarks/gpu.sh prepare /path/to/cifar-10-python.tar.gz
#     the wheels of benchmarks/gpu-wheels.txt -> .gpu/whl (4.4 MiB), the archive -> .gpu/cifar as
#     3 checksummed parts of ~54 MiB + NAME.parts.json (benchmarks/pack_cifar.py); prints the
#     carry list and size of each call. .gpu/ is git-ignored.
# There: three `run` calls, each issued as soon as the last returns (a machine left idle 30 s
# goes back, and what earlier calls staged in $GPU_STATE=/tmp/resnet_jax_gpu goes with it):
#   call 1 (timeout_s 330) carry .gpu/whl .gpu/cifar/NAME.parts.json .gpu/cifar/NAME.part1of3
#          bash benchmarks/gpu.sh call1   wheels, import check, part 1, a 100-step smoke run of
#                                         train.py (<= 60 s), benchmarks (<= 150 s, by priority)
#   call 2 (timeout_s 60)  carry .gpu/cifar/NAME.parts.json .gpu/cifar/NAME.part2of3
#          bash benchmarks/gpu.sh call2   part 2
#   call 3 (timeout_s 540) carry .gpu/cifar/NAME.parts.json .gpu/cifar/NAME.part3of3
#          TRAIN_LIMIT_S=420 bash benchmarks/gpu.sh call3   part 3, join + verify (sha256), train,
#          summary. Set TRAIN_LIMIT_S to call 2's budget_left_s less 100 s, at most 480: a call
#          still running when the device time runs out loses its $OUT.
#   call 4, only if call 3 stopped at its limit and time is left: bash benchmarks/gpu.sh train
#          (resumes from the last checkpoint, every 2k steps; TRAIN_LIMIT_S=... to fit what is left)
# Written to $OUT: call 1 setup.log smoke.log bench.log bench.jsonl bench.md profile_smoke.json;
# call 2 setup.log; call 3 setup.log train.log metrics.jsonl curves.png profile.json summary.txt
# run.tar.gz (the run's workdir less its traces: checkpoints, for resuming on a fresh machine by
# carrying it as .gpu/run.tar.gz, and analyses).
# summary.txt is one line: test error vs the paper's 8.75 %, images/s, the profile figures below,
# wall time, device.
#
# Profile figures (issue 22): train.py traces steps 1050-1149 of the training run (one 100-step
# logging sync, at 1100, no eval or checkpoint) and steps 60-89 of the smoke run
# (config.profile_steps; jax.profiler, Python tracing off) into its workdir, and
# `gpu_report.py profile WORKDIR` reads the trace's plugins/profile/*/*.trace.json.gz (gzipped
# Chrome trace JSON, no profiler plugin needed; the workdir's profile.json names it):
#   host_ms   median over the steps of the wall time the loop spends from fetching the batch to
#             having dispatched the step (its "train_step" annotation: batch fetch, key, device
#             put, dispatch; no wait on the device unless dispatch itself blocks)
#   step_ms   median wall time from one step's start to the next (host syncs, logging included)
#   idle      the device's idle fraction over the window, first step's start to the end of the
#             last device event: 1 - (union of its busy intervals) / window. GPU: the kernel and
#             copy events on the "Stream #..." lines of /device:GPU:N (CUPTI); CPU: the XLA thunk
#             events (an hlo_op arg) on the host's threads, per device_ordinal. Mean over devices.
# -> the summary's "host 0.52 ms of a 3.10 ms step, device idle 12.3% (steps 1050-1149, gpu)",
# profile.json / profile_smoke.json (also per-step lists, per-device idle and busy ms). The
# profiler's own cost (CUPTI's callback on each launch) makes host_ms an upper bound; starting and
# writing the two traces costs a few seconds. The dry run checks both files are written and in
# range (0 <= idle <= 1, host_ms > 0).
#
# Time plan (assumed, not measured: no device has run this): machine start 1-2 min; call 1 ~4 min;
# calls 2-3 transfers and gaps ~1 min; training ~4-5 min: ResNet-20 at batch 128 is ~16 GFLOP a
# step, so an H200 step is bound by kernel launches and dispatch, ~2.5-4 ms (~200 kernels of a
# few µs; the host's jit dispatch, fold_in and index batch ~0.5 ms overlap it) -> 64k steps in
# 2.7-4.3 min, + ~1 min of compile, archive read, 32 evaluations of 10k images, 32 checkpoints and
# 640 metric fetches (log_every_steps=100: one host sync each, ~10 ms). Total ~11-13 min of 15.
# The limits (SMOKE_LIMIT_S, BENCH_BUDGET_S, TRAIN_LIMIT_S) are env variables.
#
# CPU dry run of all of it at tiny sizes (tiny models, batches and steps, profiles of steps 1-2,
# XLA's CPU backend at -O0 to compile faster; the archive named by $CIFAR_ARCHIVE packed into 3
# parts, staged one per call, joined and verified):
#   CIFAR_ARCHIVE=/path/cifar-10-python.tar.gz bash benchmarks/gpu.sh --dry-run OUTDIR
# Stages: prepare ARCHIVE | call1 | call2 | call3 | train | bench | check [OUTDIR ($OUT)].
# Exit: 0 done; 1 usage or a failed step; 2 missing packages; 3 missing/corrupt parts; else the
# failing train.py's status (124: time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
self=$root/benchmarks/gpu.sh
PY=${PYTHON:-python3}
CARRY=${GPU_CARRY:-$root/.gpu}
STATE=${GPU_STATE:-/tmp/resnet_jax_gpu}
DRY=${GPU_DRY:-0}
SMOKE_LIMIT_S=${SMOKE_LIMIT_S:-60}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-150}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-420}
ARCHIVE_NAME=cifar-10-python.tar.gz
archive=$STATE/cifar/$ARCHIVE_NAME
export PYTHONUNBUFFERED=1

die() { echo "gpu.sh: $*" >&2; exit "${rc:-1}"; }

# name, own timeout (s), script in benchmarks/, args; most important first (BENCH_BUDGET_S cuts
# the tail). r20_b128_jit is the training run's step; r50_b256_jit the headline vs plain linen.
r50="--arch resnet50 --stride-in 3x3 --dtype bfloat16 --warmup 3 --blocks 4 --steps 5"
r20="--arch resnet20 --warmup 5 --blocks 5 --steps 10"
BENCH=(
  "r20_b128_jit    45 train_step.py $r20 --batch 128 --parallel jit --no-peak"
  "r50_b256_jit   120 train_step.py $r50 --batch 256 --parallel jit --baseline plain"
  "r20_b1024_jit   60 train_step.py $r20 --batch 1024 --parallel jit --baseline plain --no-peak"
  "r50_eval_b256   60 eval_step.py $r50 --batch 256 --no-peak"
  "r20_b1024_bf16  45 train_step.py $r20 --batch 1024 --dtype bfloat16 --no-peak"
  "r50_b256_pmap   90 train_step.py $r50 --batch 256 --parallel pmap --no-peak"
  "r20_b1024_pmap  45 train_step.py $r20 --batch 1024 --parallel pmap --no-peak"
  "r50_b128_jit    90 train_step.py $r50 --batch 128 --parallel jit --no-peak"
)
# Dry run: the same command lines, shrunk (argparse keeps the last value of a repeated option).
BENCH_TINY="--width 4 --batch 8 --image 32 --warmup 1 --steps 1 --no-peak"

TRAIN_ARGS=(--config configs/cifar10.py:resnet20 --config.data.validation_split=0
            --config.data.on_device=True)
STEPS=64000 BATCH=128
SMOKE_ARGS=(--config configs/cifar10.py:resnet20 --config.dataset=synthetic
            --config.data.num_train=1024 --config.data.num_eval=512 --config.num_train_steps=100
            --config.log_every_steps=50 --config.eval_every_steps=100
            --config.checkpoint_every_steps=50 --config.data.on_device=True)
# The profiled steps (config.profile_steps START,STOP: steps START..STOP-1). Training: 100 steady
# steps holding one of the 100-step logging syncs (at step 1100) and no eval or checkpoint;
# smoke: 30 steps between its syncs.
TRAIN_PROFILE=1050,1150 SMOKE_PROFILE=60,90
if [ "$DRY" = 1 ]; then
  TINY=(--config.model_kwargs.width=4 --config.batch_size=8 --config.eval_batch_size=16
        --config.log_every_steps=2 --config.checkpoint_every_steps=2)
  TRAIN_ARGS+=("${TINY[@]}" --config.num_train_steps=4 --config.eval_every_steps=4)
  STEPS=4 BATCH=8
  SMOKE_ARGS+=("${TINY[@]}" --config.data.num_train=64 --config.data.num_eval=32
               --config.num_train_steps=3 --config.eval_every_steps=2)
  TRAIN_PROFILE=1,3 SMOKE_PROFILE=1,3
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  # XLA's CPU backend unoptimised: compiles ~3x faster, and the tiny steps do not mind.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
fi
TRAIN_ARGS+=(--config.profile_steps=$TRAIN_PROFILE)
SMOKE_ARGS+=(--config.profile_steps=$SMOKE_PROFILE)

setup() {  # out: wheels, PYTHONPATH, parts carried in this call -> $STATE
  out=$1
  mkdir -p "$out" "$STATE"
  local log=$out/setup.log
  if compgen -G "$CARRY/whl/*.whl" > /dev/null; then
    local stamp
    stamp=$(cd "$CARRY/whl" && stat -c '%n %s' -- *.whl | cksum)
    if [ "$(cat "$STATE/site/.stamp" 2>/dev/null)" != "$stamp" ]; then
      echo "== wheels: $(cd "$CARRY/whl" && echo *.whl)" | tee -a "$log"
      rm -rf "$STATE/site"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$STATE/site" "$CARRY"/whl/*.whl >> "$log" 2>&1 \
        || { tail -n 3 "$log" >&2; die "pip could not install the wheels in $CARRY/whl"; }
      echo "$stamp" > "$STATE/site/.stamp"
    fi
  fi
  [ -d "$STATE/site" ] && export PYTHONPATH="$STATE/site:$root${PYTHONPATH:+:$PYTHONPATH}" \
    || export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d "$CARRY/cifar" ]; then
    local line
    line=$("$PY" benchmarks/pack_cifar.py stash "$CARRY/cifar" "$STATE/parts" 2>&1) \
      || { echo "$line" >> "$log"; rc=3 die "$line"; }
    echo "$line" | tee -a "$log"
  fi
}

check() {  # packages and devices, once per machine
  [ -f "$STATE/imports.ok" ] && [ "$STATE/imports.ok" -nt "$STATE/site" ] && return
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      || echo "nvidia-smi: none"; } >> "$out/setup.log"
  "$PY" benchmarks/gpu_report.py imports --device-file "$STATE/device.txt" \
    2> "$STATE/imports.err" | tee -a "$out/setup.log"
  if [ "${PIPESTATUS[0]}" != 0 ]; then  # its one line, last
    tee -a "$out/setup.log" < "$STATE/imports.err" >&2
    exit 2
  fi
  touch "$STATE/imports.ok"
}

smoke() {  # train.py end to end on synthetic data: loop, on-device data, checkpoints, metrics
  [ "$SMOKE_LIMIT_S" = 0 ] && return
  echo "== smoke: train.py on synthetic data (limit ${SMOKE_LIMIT_S} s)"
  rm -rf "$STATE/smoke"
  timeout --kill-after=15 "$SMOKE_LIMIT_S" "$PY" train.py "${SMOKE_ARGS[@]}" \
    --workdir "$STATE/smoke" > "$out/smoke.log" 2>&1
  local rc=$?
  tail -n 2 "$out/smoke.log"
  [ $rc = 0 ] || echo "   smoke run FAILED (exit $rc; smoke.log): call 3 would fail the same way"
  [ $rc = 0 ] && profile "$STATE/smoke" "$out/profile_smoke.json" "$out/smoke.log"
  return $rc
}

profile() {  # workdir json log: host ms a step and device idle of the run's profile_steps
  rm -f "$2"
  [ -f "$1/profile.json" ] || { echo "   no profile: $1 has no trace of profile_steps" \
                                  | tee -a "$3"; return 1; }
  "$PY" benchmarks/gpu_report.py profile "$1" --json "$2" 2>&1 | tee -a "$3"
  [ "${PIPESTATUS[0]}" = 0 ] || echo "   profile figures FAILED (the line above)"
}

bench() {  # GPU_BENCH="name ...": only those; returns 1 when one failed
  local start=$SECONDS jsonl=$out/bench.jsonl only=" ${GPU_BENCH:-} " entry failed=0
  : > "$jsonl"
  echo "== benchmarks (budget ${BENCH_BUDGET_S} s)"
  for entry in "${BENCH[@]}"; do
    read -r name limit script args <<< "$entry"
    [ -n "${GPU_BENCH:-}" ] && [[ $only != *" $name "* ]] && continue
    [ "$DRY" = 1 ] && args="$args $BENCH_TINY"
    local left=$((BENCH_BUDGET_S - (SECONDS - start)))
    if [ $left -lt 20 ]; then
      echo "{\"name\": \"$name\", \"status\": \"skipped: budget\"}" >> "$jsonl"
      continue
    fi
    [ $left -lt "$limit" ] && limit=$left
    { echo "== $name: benchmarks/$script $args (limit $limit s)"; } >> "$out/bench.log"
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$limit" "$PY" "benchmarks/$script" $args --json \
      > "$STATE/bench.out" 2> "$STATE/bench.err"
    local rc=$?
    cat "$STATE/bench.err" "$STATE/bench.out" >> "$out/bench.log"
    local last
    last=$(tail -n 1 "$STATE/bench.out")
    if [ $rc = 0 ] && [[ $last == \{* ]]; then
      echo "{\"name\": \"$name\", ${last#\{}" >> "$jsonl"
    else
      echo "{\"name\": \"$name\", \"status\": \"failed: exit $rc\"}" >> "$jsonl"
      failed=1
    fi
  done
  "$PY" benchmarks/gpu_report.py bench-table "$jsonl" | tee "$out/bench.md"
  return $failed
}

join() {  # the staged parts -> the verified archive
  local line
  echo "== join + verify"
  line=$("$PY" benchmarks/pack_cifar.py unpack "$STATE/parts" "$archive" 2>&1) \
    || { echo "$line" >> "$out/setup.log"; rc=3 die "$line (part i travels in call i; a" \
         "machine that went back lost what earlier calls staged: start again from call 1)"; }
  echo "$line" | tee -a "$out/setup.log"
}

train() {
  local run=$STATE/run
  if [ ! -d "$run/checkpoints" ] && [ -f "$CARRY/run.tar.gz" ]; then
    mkdir -p "$run" && tar -xzf "$CARRY/run.tar.gz" -C "$run" \
      && echo "== resuming from the carried run.tar.gz"
  fi
  mkdir -p "$run"
  echo "== train: ${TRAIN_ARGS[*]} (limit ${TRAIN_LIMIT_S} s)"
  local t0=$SECONDS
  # The compilation cache lets a resumed call (train) skip the compiles; not in the dry run.
  [ "$DRY" = 1 ] || export JAX_COMPILATION_CACHE_DIR=$STATE/jax_cache
  timeout --kill-after=30 "$TRAIN_LIMIT_S" "$PY" train.py "${TRAIN_ARGS[@]}" --workdir "$run" \
    --config.data.archive="$archive" 2>&1 | tee -a "$out/train.log" \
    | awk '/^step [0-9]+\/[0-9]+ \|/ { split($2, s, "/"); if (s[1] % 8000 && s[1] != s[2]) next }
           { print; fflush() }'  # every line but most progress lines (train.log has them all)
  local rc=${PIPESTATUS[0]}
  echo $(( $(cat "$run/wall_seconds" 2>/dev/null || echo 0) + SECONDS - t0 )) \
    > "$run/wall_seconds"
  local reason=""
  [ "$rc" = 124 ] && reason="time limit ${TRAIN_LIMIT_S} s"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && reason="train.py exit $rc, see train.log"
  for f in metrics.jsonl curves.png; do [ -f "$run/$f" ] && cp "$run/$f" "$out/"; done
  profile "$run" "$out/profile.json" "$out/train.log"  # before the tar: profile_figures.json
  tar -czf "$out/run.tar.gz" --exclude=./plugins -C "$run" .  # no traces: it must fit 16 MiB
  "$PY" benchmarks/gpu_report.py summary --metrics "$run/metrics.jsonl" --steps "$STEPS" \
    --batch "$BATCH" --model resnet20 --dataset cifar10 --paper 8.75 \
    --wall "$(cat "$run/wall_seconds")" --device-file "$STATE/device.txt" --reason "$reason" \
    --profile "$out/profile.json" | tee "$out/summary.txt"
  return "$rc"
}

prepare() {  # here: wheels and parts into .gpu, the carry lists
  local archive=${1:-}
  [ -f "$archive" ] || die "usage: bash benchmarks/gpu.sh prepare /path/to/$ARCHIVE_NAME"
  mkdir -p "$CARRY/whl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$CARRY/whl" -r benchmarks/gpu-wheels.txt \
    || die "pip download failed (network? see benchmarks/gpu-wheels.txt)"
  "$PY" benchmarks/pack_cifar.py pack "$archive" "$CARRY/cifar" ${PACK_ARGS:-} || exit 1
  # What travels: the tree (tracked and untracked-not-ignored files) + the carried paths.
  local tree i n m=.gpu/cifar/$ARCHIVE_NAME.parts.json
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 \
         | cut -f1)
  n=$(find "$CARRY/cifar" -name "$ARCHIVE_NAME.part*of*" | wc -l)
  for i in $(seq 1 "$n"); do
    local carry=("$m" ".gpu/cifar/$ARCHIVE_NAME.part${i}of$n") size
    [ "$i" = 1 ] && carry=(.gpu/whl "${carry[@]}")
    size=$(( $(du -cb "${carry[@]}" | tail -n 1 | cut -f1) + tree ))
    echo "call $i: carry [$(printf '"%s", ' "${carry[@]}" | sed 's/, $//')]; with the tree" \
      "$(awk "BEGIN {printf \"%.1f\", $size / 1048576}") MiB of 64"
    [ $size -lt $((64 << 20)) ] || echo "   over 64 MiB: pack with PACK_ARGS=--max-mib=50"
  done
}

dry_run() {  # every call on this CPU, tiny, each seeing only what its call carries
  local top=${1:-}
  [ -n "$top" ] || die "usage: CIFAR_ARCHIVE=/path/$ARCHIVE_NAME bash benchmarks/gpu.sh --dry-run OUTDIR"
  [ -f "${CIFAR_ARCHIVE:-}" ] || die "--dry-run packs the archive named by CIFAR_ARCHIVE" \
    "(the official python $ARCHIVE_NAME); got '${CIFAR_ARCHIVE:-}'"
  top=$(mkdir -p "$top" && cd "$top" && pwd)
  rm -rf "$top"/{state,pack,carry1,carry2,carry3,call1,call2,call3}
  "$PY" benchmarks/pack_cifar.py pack "$CIFAR_ARCHIVE" "$top/pack" --min-parts 3 || exit 1
  local i m=$ARCHIVE_NAME.parts.json
  for i in 1 2 3; do
    mkdir -p "$top/carry$i/cifar"
    cp "$top/pack/$m" "$top/pack/$ARCHIVE_NAME.part${i}of3" "$top/carry$i/cifar/"
    echo "==== call $i"
    GPU_DRY=1 GPU_CARRY=$top/carry$i GPU_STATE=$top/state bash "$self" "call$i" "$top/call$i" \
      || { local s=$?; rc=$s die "dry run: call $i failed (exit $s)"; }
    "$PY" benchmarks/gpu_report.py out-check "$top/call$i" || exit 1
  done
  local figures=("$top/call3/profile.json")
  [ "$SMOKE_LIMIT_S" = 0 ] || figures+=("$top/call1/profile_smoke.json")
  "$PY" benchmarks/gpu_report.py profile-check "${figures[@]}" || exit 1
  echo "==== dry run done: $(cat "$top/call3/summary.txt")"
}

stage=${1:-}
case $stage in
  --dry-run) dry_run "${2:-}"; exit ;;
  prepare) prepare "${2:-}"; exit ;;
  --list-bench) printf '%s\n' "${BENCH[@]}"; exit ;;
  call1 | call2 | call3 | train | bench | check) ;;
  *) die "usage: bash benchmarks/gpu.sh call1|call2|call3|train|bench|check [OUTDIR] |" \
       "prepare ARCHIVE | --dry-run OUTDIR (see the header)" ;;
esac
outdir=${2:-${OUT:-}}
[ -n "$outdir" ] || die "no OUTDIR and no \$OUT"
setup "$outdir"
case $stage in
  call1) check; smoke; s=$?; bench || [ "$s" != 0 ] || s=1; exit "$s" ;;
  call2) line=$("$PY" benchmarks/pack_cifar.py status "$STATE/parts" 2>&1) || rc=3 die "$line"
         if [[ $line == *"missing: 1"* ]]; then
           rc=3 die "part 1 is not here: the machine of call 1 went back (idle > 30 s) with" \
             "what it staged; start again from call 1"
         fi ;;
  call3 | train) join; check; train ;;
  bench) check; bench ;;
  check) check ;;
esac
