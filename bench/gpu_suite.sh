#!/usr/bin/env bash
# Every GPU figure of the project, in stages that each fit one ~9-minute call on a GPU node.
#
#   source .gpu/env.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash bench/gpu_suite.sh STAGE [ARGS]
#
# Stages (each starts with `env` and makes sure the data is converted):
#   env                 versions, nvidia-smi, `import ffcv`                     -> env.json
#   kernels             GPU tests (pytest; output in the log) + bench/bench_bn_relu.py -> bench_bn_relu.json
#   loaders             bench/bench_loaders.py                                   -> bench_loaders.json
#   train [MODEL...]    bench/bench_train.py (all zoo models by default)         -> bench_train.json
#   calibrate           airbench94 alone, $CAL_RUNS runs on the JPEG copy        -> calibrate_airbench.json
#   speedrun [MODEL...] `fastcifar speedrun` per model (default: speedrun_net with the baseline,
#                       then every zoo model without it)                        -> speedrun_results.tar.gz
#   tune                speedrun_net over EPOCHS_SWEEP, $TUNE_RUNS runs each     -> tune_speedrun_net.tar.gz
#   all                 everything above in order (needs far more than one call)
# Every stage also writes suite_<stage>.log. Files land flat in $OUT (at most 8 per call).
# A failing step does not stop the others; the exit status is non-zero if any step failed.
#
# Data: .gpu/data/cifar10-jpeg-q75.tar.gz (the lossy JPEG copy: its figures are not comparable
# with published ones; the calibrate stage measures the gap) and
# .gpu/data/cifar10-test-original-first1017.npz (1,017 original test images, lossless).
set -uo pipefail
cd "$(dirname "$0")/.."

stage=${1:-all}
shift || true
case "$stage" in
  env|kernels|loaders|train|calibrate|speedrun|tune|all) ;;
  *) echo "unknown stage '$stage'; choose env, kernels, loaders, train, calibrate, speedrun, tune or all" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/results/gpu_suite}
GPU_DATA=${GPU_DATA:-.gpu/data}
JPEG_TAR=${JPEG_TAR:-$GPU_DATA/cifar10-jpeg-q75.tar.gz}
ORIG_NPZ=${ORIG_NPZ:-$GPU_DATA/cifar10-test-original-first1017.npz}
DATA=${DATA:-beton_data/cifar10}                 # converted .beton files (the default --data of every tool)
RESULTS=${RESULTS:-bench/results}                # where result files are kept on this machine
BUDGET_S=${BUDGET_S:-540}                        # stop starting new work after this many seconds
SPEEDRUN_RUNS=${SPEEDRUN_RUNS:-5}                # timed runs for speedrun_net (and its baseline)
ZOO_RUNS=${ZOO_RUNS:-2}                          # timed runs per zoo model
CAL_RUNS=${CAL_RUNS:-5}
TUNE_RUNS=${TUNE_RUNS:-3}
EPOCHS_SWEEP=${EPOCHS_SWEEP:-"8 10 12 14"}
EXTRA_SET=${EXTRA_SET:-}                         # "FIELD=VALUE ..." recipe overrides for speedrun and tune
GPU_TESTS=${GPU_TESTS:-"tests/test_kernels.py tests/test_models.py tests/test_data_loaders.py"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

mkdir -p "$OUT" "$RESULTS"
log="$OUT/suite_${stage}.log"
exec > >(tee -a "$log") 2>&1
t_start=$SECONDS
failed=0
say() { echo "== [$(date -u +%H:%M:%S) +$((SECONDS - t_start))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - t_start))); }
# run CMD... under the remaining budget; a step that fails or runs out is reported, not fatal
step() {
  local rem; rem=$(left)
  if [ "$rem" -le 10 ]; then say "SKIPPED (budget spent): $*"; failed=$((failed + 1)); return 1; fi
  say "$* (limit ${rem}s)"
  timeout --signal=TERM --kill-after=20 "$rem" "$@"
  local rc=$?
  [ $rc -eq 0 ] || { say "FAILED rc=$rc: $*"; failed=$((failed + 1)); }
  return $rc
}
FC="$PY -m fastcifar.cli"
SETS=()
for kv in $EXTRA_SET; do SETS+=(--set "$kv"); done
zoo_models() { $PY -c "import fastcifar.models as m; print(' '.join(n for n in m.model_names() if n != 'speedrun_net'))"; }

stage_env() {
  say "environment"
  nvidia-smi || say "nvidia-smi failed"
  # Triton (and inductor's CPU code in the tests) build C helpers at run time: a compiler is needed
  say "C compilers: $(command -v cc gcc clang | tr '\n' ' ')"
  $PY - "$OUT/env.json" <<'EOF'
import json, subprocess, sys
from fastcifar.machine import machine_info, package_version
info = machine_info()
for pkg in ("torchvision", "opencv-python-headless"):   # the baseline's extra dependencies
    info["versions"][pkg] = package_version(pkg)
try:
    import ffcv, ffcv.loader  # noqa: F401  (the compiled helper and its shared libraries)
    info["ffcv_import"] = "ok"
except Exception as e:
    info["ffcv_import"] = f"{type(e).__name__}: {e}"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
except OSError as e:
    info["nvidia_smi"] = str(e)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print({k: v for k, v in info.items() if k != "nvidia_smi"})
EOF
}

ensure_data() {
  if [ ! -f "$DATA/train.beton" ]; then
    step $FC convert --source "$JPEG_TAR" --out "$DATA" || { say "no data, stopping"; exit 1; }
  fi
}

stage_kernels() {
  step $PY -m pytest -q -rs -p no:cacheprovider $GPU_TESTS
  # bench_bn_relu writes its JSON only at the end: stop starting shapes early enough that the
  # two compiled resnet_2111 train steps after them (~4 minutes with compilation) still fit
  local shape_s=$(( $(left) - 240 )); [ "$shape_s" -ge 30 ] || shape_s=30
  if [ -f bench/bench_bn_relu.py ]; then
    step $PY bench/bench_bn_relu.py --shape-time-limit "$shape_s" --out "$OUT/bench_bn_relu.json"
  else say "bench/bench_bn_relu.py not found: skipped"; fi
}

stage_loaders() {
  if [ -f bench/bench_loaders.py ]; then
    step $PY bench/bench_loaders.py --device cuda --beton "$DATA/train.beton" --out "$OUT/bench_loaders.json"
  else say "bench/bench_loaders.py not found: skipped"; fi
}

stage_train() {
  local sel=()
  [ $# -gt 0 ] && sel=(--models "$@")
  # bench_train stops starting new (model, backend) pairs a minute before the budget ends
  step $PY bench/bench_train.py --data "$DATA" "${sel[@]}" --budget-s $(( $(left) - 60 )) \
    --out "$OUT/bench_train.json"
}

stage_calibrate() {
  step $PY -m fastcifar.baseline --data "$DATA" --runs "$CAL_RUNS" --original-npz "$ORIG_NPZ" \
    --out "$OUT/calibrate_airbench.json"
}

stage_speedrun() {
  local models=("$@")
  [ ${#models[@]} -gt 0 ] || models=(speedrun_net $(zoo_models))
  local files=()
  for m in "${models[@]}"; do
    local f="$RESULTS/speedrun_${m}_gpu.json" extra=(--no-baseline --runs "$ZOO_RUNS")
    [ "$m" = speedrun_net ] && extra=(--baseline --runs "$SPEEDRUN_RUNS")
    step $FC speedrun --model "$m" "${extra[@]}" "${SETS[@]}" --data "$DATA" --original-npz "$ORIG_NPZ" --out "$f" \
      && files+=("$(basename "$f")")
  done
  [ ${#files[@]} -gt 0 ] && tar czf "$OUT/speedrun_results.tar.gz" -C "$RESULTS" "${files[@]}" leaderboard
}

stage_tune() {
  local files=()
  mkdir -p "$RESULTS/tune"
  for e in $EPOCHS_SWEEP; do
    local f="$RESULTS/tune/speedrun_net_e${e}.json"
    step $FC speedrun --model speedrun_net --no-baseline --runs "$TUNE_RUNS" "${SETS[@]}" --set "epochs=$e" \
      --data "$DATA" --out "$f" && files+=("$(basename "$f")")
  done
  [ ${#files[@]} -gt 0 ] && tar czf "$OUT/tune_speedrun_net.tar.gz" -C "$RESULTS/tune" "${files[@]}"
}

say "gpu_suite stage '$stage' (budget ${BUDGET_S}s), results to $OUT"
stage_env
case "$stage" in
  env) ;;
  kernels) stage_kernels ;;
  loaders) ensure_data; stage_loaders ;;
  train) ensure_data; stage_train "$@" ;;
  calibrate) ensure_data; stage_calibrate ;;
  speedrun) ensure_data; stage_speedrun "$@" ;;
  tune) ensure_data; stage_tune ;;
  all) ensure_data; stage_kernels; stage_loaders; stage_train; stage_calibrate; stage_speedrun; stage_tune ;;
esac
say "done ($failed step(s) failed or skipped); files in $OUT:"
ls -la "$OUT"
[ "$failed" -eq 0 ]
