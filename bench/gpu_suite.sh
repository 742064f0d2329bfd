#!/usr/bin/env bash
# Every GPU figure of the project, in calls that each fit one ~9-minute call on a GPU node.
#
#   source .gpu/env.sh && export PYTHONPATH=$PWD:$PYTHONPATH && bash bench/gpu_suite.sh STAGE [ARGS]
#
# The three calls, most valuable figures first; each starts with `preflight` (which converts
# the data on the fresh machine) and writes its results into $OUT as it goes:
#   call1   GPU tests (kernels incl. production shapes, compile, models), bench_bn_relu for the
#           shapes of speedrun_net and resnet_2111 (per shape; the train step per backend is the
#           overhead stage's), then the loaders
#                                     -> preflight.json, pytest_gpu.xml, kernel_errors_gpu.json,
#                                        bench_bn_relu.json, bench_loaders.json
#   call2   fastcifar speedrun --model speedrun_net with airbench94 ($SPEEDRUN_RUNS: 3 on a first
#           visit, 5 once call 2 is known to fit)   -> preflight.json, speedrun_speedrun_net.json,
#                                                       leaderboard/ (2 entries)
#   call3   training throughput of speedrun_net and resnet_2111 (compiled vs triton backend, GPU
#           vs FFCV loader), then one resnet_2111 fast-recipe run to its report's accuracy
#                                     -> preflight.json, bench_train.json, train_resnet_2111_*.json[l]
# Finer stages (one job each, for later calls):
#   preflight           imports, CUDA, C compiler, a tiny Triton kernel, data (converted if needed),
#                       in <= 60 s; exits 1 naming what is missing       -> preflight.json
#   env                 versions, nvidia-smi                             -> env.json
#   tests               the GPU tests alone, in TEST_SHARDS (8) pytest processes at once
#                                                                        -> pytest_gpu.xml, kernel_errors_gpu.json
#   kernels             GPU tests + bench/bench_bn_relu.py (all shapes)  -> pytest_gpu.xml, kernel_errors_gpu.json,
#                                                                           bench_bn_relu.json
#                       (BN_ACT=gelu: GELU wherever the zoo has ReLU     -> bench_bn_relu_gelu.json)
#   loaders             bench/bench_loaders.py                           -> bench_loaders.json
#   train [MODEL...]    bench/bench_train.py (all zoo models by default) -> bench_train.json
#   calibrate           `fastcifar calibrate`: airbench94 alone, $CAL_RUNS runs -> calibrate_airbench.json
#   speedrun [MODEL...] `fastcifar speedrun` per model (default: speedrun_net with the baseline,
#                       then every zoo model without it)                 -> speedrun_results.tar.gz
#   zoo [MODEL[:FIELD=VALUE,...]...]
#                       the zoo against its reports: each zoo model's fast recipe (with the given
#                       recipe overrides), $ZOO_TARGET_RUNS (5) runs, each stopping at its report's
#                       accuracy less the JPEG penalty of $CALIBRATION (fastcifar speedrun --target
#                       report); without epochs=N, the epochs that fit $ZOO_BUDGET_S (80) s of
#                       training at the warm-up's speed (--train-budget-s) -> zoo_results.tar.gz
#   tune                speedrun_net for each setting of TUNE_GRID (default: the epochs of
#                       EPOCHS_SWEEP; the word airbench_like: airbench94's network and recipe),
#                       $TUNE_RUNS runs each                        -> tune_speedrun_net.tar.gz
#   race [SETTING]      speedrun_net as airbench94 (the TUNE_GRID word airbench_like, or SETTING)
#                       against airbench94, $SPEEDRUN_RUNS pairs: one recipe, two engines; then
#                       the setting with each change of $RACE_SWEEP (fewer epochs, Muon) while
#                       the budget lasts  -> speedrun_airbench_like[_$COMPILE_MODE].json, race_sweep*.tar.gz
#   profile [MODEL...]  bench/profile_step.py: a train step's device time by kernel group, launches,
#                       idle share, compiled vs triton (default resnet_2111 speedrun_net)
#                                                                        -> profile_step.json, profile_traces.tar.gz
#   overhead [MODEL...] the host overhead: profile_step without torch.compile (cuDNN BN), in
#                       torch.compile's default mode and in reduce-overhead (CUDA graphs), then
#                       speedrun_net vs airbench94 with CUDA graphs
#                                          -> profile_step_eager.json, profile_step.json, profile_step_reduce-overhead.json,
#                                             profile_traces*.tar.gz, speedrun_speedrun_net_reduce-overhead.json
#   all                 everything above in order (needs far more than one call)
# COMPILE_MODE=reduce-overhead runs speedrun, tune, race, zoo, train and profile with CUDA graphs;
# COMPILE_MODE=none runs them without torch.compile (--no-compile).
# Every stage also writes suite_<stage>.log. Files land in $OUT (at most 8 per call). Every tool
# rewrites its results file after each unit (a shape, a model, a loader, a seed), so a step cut
# short by its time limit keeps what it finished. A failing step does not stop the others; the
# exit status is non-zero if any step failed.
#
# Time budgets (BUDGET_S, default 540 s, is the whole call; no step starts after it and a running
# one gets only what is left). Measured on the H100 node on 2026-11-24 (bench/results/gpu/
# suite_*.log; a fresh machine costs ~30 s more of device time than the call's wall time):
#   preflight            16-29 s (29 s converting the JPEG copy, 6 s of it the conversion)
#   call1 GPU tests      <= 240 s  in 6 shards with an empty compile cache: 3 finished in 128-152 s,
#                                  3 were cut at the then 180 s limit (torch.compile tests take
#                                  15-38 s each); now TEST_SHARDS=8 and 240 s
#   call1 bench_bn_relu  16 shapes in 88 s, then two resnet_2111 train steps with compilation in
#                                  ~2.5 min (compile 24-33 s each); call 1 took 407 s in all
#                                  (call 1 now skips those train steps and measures the loaders,
#                                  whose time on the node is not known yet)
#   call2 speedrun       124 s for 3 seeds (warm-up 43 s wall, compile 25 s; runs 4.2-4.4 s;
#                                  airbench94 runs 2.6-3.0 s); 109 s for 5 seeds with a warm cache
#   call3                230 s: bench_train's 8 units 117 s, resnet_2111 fast recipe 55 s wall
#   zoo speedrun         ~100 s warm-up (24 epochs, 27-30 s compile) + ~55 s a run for
#                                  resnet_353_dropout / se_resnet_443: ~3 zoo runs per call
# Data: .gpu/data/cifar10-jpeg-q75.tar.gz (the lossy JPEG copy: its figures are not comparable
# with published ones; the calibrate stage measures the gap) and
# .gpu/data/cifar10-test-original-first1017.npz (1,017 original test images, lossless).
set -uo pipefail
cd "$(dirname "$0")/.."

stage=${1:-all}
shift || true
case "$stage" in
  call1|call2|call3|preflight|env|tests|kernels|loaders|train|calibrate|speedrun|zoo|tune|race|profile|overhead|all) ;;
  *) echo "unknown stage '$stage'; choose call1, call2, call3, preflight, env, tests, kernels, loaders, train," \
          "calibrate, speedrun, zoo, tune, race, profile, overhead or all" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/results/gpu_suite}
GPU_DATA=${GPU_DATA:-.gpu/data}
JPEG_TAR=${JPEG_TAR:-$GPU_DATA/cifar10-jpeg-q75.tar.gz}
ORIG_NPZ=${ORIG_NPZ:-$GPU_DATA/cifar10-test-original-first1017.npz}
DATA=${DATA:-beton_data/cifar10}                 # converted .beton files (the default --data of every tool)
RESULTS=${RESULTS:-bench/results}                # where result files are kept on this machine
BUDGET_S=${BUDGET_S:-540}                        # stop starting new work after this many seconds
SPEEDRUN_RUNS=${SPEEDRUN_RUNS:-3}                # timed runs for speedrun_net (and its baseline); 5 for a record
ZOO_RUNS=${ZOO_RUNS:-2}                          # timed runs per zoo model (speedrun stage)
ZOO_TARGET_RUNS=${ZOO_TARGET_RUNS:-5}            # runs per zoo model to its target (zoo stage): >= 4 of 5 must reach it
# zoo stage: the epochs that fit this much training ("" = the recipe's). The allowance is 120 s a
# run; 80 s lets 5 runs (plus an evaluation after every epoch, set-up and the warm-up) finish in
# one call: 5 x ~95 s + ~45 s
ZOO_BUDGET_S=${ZOO_BUDGET_S-80}
CALIBRATION=${CALIBRATION:-bench/results/gpu/calibrate_airbench.json}   # airbench94 on this data: the JPEG penalty
CAL_RUNS=${CAL_RUNS:-5}
TUNE_RUNS=${TUNE_RUNS:-3}
EPOCHS_SWEEP=${EPOCHS_SWEEP:-"8 10 12 14"}
# tune settings, space-separated; each a comma-joined list of recipe FIELD=VALUE and model
# options model:KEY=VALUE, e.g. "epochs=10 epochs=10,weight_decay=1e-3 epochs=10,model:stem=conv";
# name:LABEL names the setting's result file (speedrun_net_LABEL.json) instead of its fields
TUNE_GRID=${TUNE_GRID:-$(for e in $EPOCHS_SWEEP; do printf 'epochs=%s ' "$e"; done)}
# airbench94's network and recipe in fastcifar: the TUNE_GRID word airbench_like (e.g.
# TUNE_GRID="epochs=10 epochs=12 airbench_like") stands for this setting:
# no skips, identity-started convs, GELU, a biased whitening conv without BatchNorm, logits x 1/9,
# BatchNorm momentum 0.4 and eps 1e-12; its optimizer for a mean loss, its ramped Lookahead, and
# its test-time views shifted 1 pixel (tta_shift=1; fastcifar's recipes shift 2).
# On the CPU (seeds 0 and 1) it scored 90.48% and 90.73% against airbench94's own 90.59%
# (bench/results/train_cpu_speedrun_net_airbench_clone_10*.json)
AIRBENCH_LIKE="name:airbench_like,epochs=10,lr=1.5,momentum=0.85,weight_decay=1.33e-3,pct_start=0.23,\
final_lr_frac=0.07,ema=0,lookahead_k=5,lookahead_alpha=0.2262,lookahead_ramp=true,tta_shift=1,model:act=gelu,\
model:residual=false,model:dirac_init=true,model:stem_norm=false,model:logit_scale=0.1111111,\
model:bn_momentum=0.4,model:bn_eps=1e-12"
# race: the setting again with each of these changes (same syntax as TUNE_GRID; no baseline), in
# this order. Muon at 8 epochs first: on the CPU (airbench_like, seed 0) it scored 90.44% against
# SGD's 89.72% at 8 epochs; seed 1: 90.42% against 90.02%; 10 epochs of SGD: 90.48 / 90.73%
# (1-pixel TTA; bench/results/train_cpu_speedrun_net_airbench_like_*8*.json, ..._airbench_clone_10*.json);
# Muon at 7 epochs, seed 0: 90.59% (..._airbench_like_muon_7.json)
RACE_SWEEP=${RACE_SWEEP-"epochs=8,optimizer=muon epochs=7,optimizer=muon epochs=8 epochs=9"}
RACE_SWEEP_MIN_S=${RACE_SWEEP_MIN_S:-120}        # ... each started only with this much of the call left
TARGET_2111=${TARGET_2111:-93.81}                # resnet_2111's report accuracy (%)
EXTRA_SET=${EXTRA_SET:-}                         # "FIELD=VALUE ..." recipe overrides for speedrun and tune
NET_OPT=${NET_OPT:-}                             # "KEY=VALUE ..." speedrun_net model options (speedrun, tune)
GPU_TESTS=${GPU_TESTS:-"tests/test_kernels_gpu.py tests/test_kernels.py tests/test_kernels_compile.py tests/test_models.py"}
HEADLINE=${HEADLINE:-"speedrun_net resnet_2111"}
BN_ACT=${BN_ACT:-relu}                           # bench_bn_relu's activation: relu, or gelu (-> bench_bn_relu_gelu.json)
COMPILE_MODE=${COMPILE_MODE:-}                   # torch.compile mode for speedrun, tune, race, zoo, train, profile (e.g. reduce-overhead; none: no compile)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Compile caches carried from call to call. A GPU node starts with empty caches, so every call
# would compile the same Triton kernels and inductor graphs again. TorchInductor's and Triton's
# caches live in $CACHE_ROOT; a call unpacks $CACHE_IN (the compile_cache.tar.xz, or .tar.gz
# where the node has no xz, that an earlier call left in $OUT, copied into the carried bundle)
# before its first step and packs the cache into $OUT after its last. FASTCIFAR_COMPILE_CACHE
# ("cold" or "warm: ...") is recorded in every results file (machine_info): a compile time
# measured warm is not a cold-start figure.
CACHE_IN=${COMPILE_CACHE_IN:-$(ls .gpu/compile_cache.tar.xz .gpu/compile_cache.tar.gz 2>/dev/null | head -n 1)}
CACHE_ROOT=${COMPILE_CACHE_DIR:-/tmp/fastcifar-compile-cache}
# the next call carries the bundle, the cache and the tree (~1 MiB): 64 MiB in all; a file that
# comes back from $OUT is at most 16 MiB
bundle_mb=$(du -sm --exclude='compile_cache.tar.*' .gpu 2>/dev/null | cut -f1)
cache_room=$(( 64 - 3 - ${bundle_mb:-47} )); [ "$cache_room" -gt 15 ] && cache_room=15
CACHE_MAX_MB=${CACHE_MAX_MB:-$cache_room}

mkdir -p "$OUT" "$RESULTS"
log="$OUT/suite_${stage}.log"
exec > >(tee -a "$log") 2>&1
t_start=$SECONDS
failed=0
say() { echo "== [$(date -u +%H:%M:%S) +$((SECONDS - t_start))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - t_start))); }
# step [--max S] CMD...: run CMD under the remaining budget (or S seconds, if less); a step that
# fails or runs out is reported, not fatal
step() {
  local rem; rem=$(left)
  if [ "$1" = --max ]; then [ "$2" -lt "$rem" ] && rem=$2; shift 2; fi
  if [ "$rem" -le 10 ]; then say "SKIPPED (budget spent): $*"; failed=$((failed + 1)); return 1; fi
  say "$* (limit ${rem}s)"
  timeout --signal=TERM --kill-after=20 "$rem" "$@"
  local rc=$?
  [ $rc -eq 0 ] || { say "FAILED rc=$rc: $*"; failed=$((failed + 1)); }
  return $rc
}
setup_cache() {
  mkdir -p "$CACHE_ROOT"
  if [ -n "$CACHE_IN" ] && [ -f "$CACHE_IN" ] && tar -xf "$CACHE_IN" -C "$CACHE_ROOT"; then
    FASTCIFAR_COMPILE_CACHE="warm: $(find "$CACHE_ROOT" -type f | wc -l) files from $CACHE_IN"
  else
    FASTCIFAR_COMPILE_CACHE="cold"
  fi
  export FASTCIFAR_COMPILE_CACHE TORCHINDUCTOR_CACHE_DIR="$CACHE_ROOT/inductor" TRITON_CACHE_DIR="$CACHE_ROOT/triton"
  say "compile cache: $FASTCIFAR_COMPILE_CACHE (in $CACHE_ROOT)"
}
pack_cache() {
  # xz where the node has it (Triton's cached kernels compress ~2.7x better than with gzip: many
  # near-identical files). Over CACHE_MAX_MB, packed again without Triton's intermediate files
  # (.ttir .ttgir .llir .ptx .source, ~75% of its cache): a cache hit loads only the files of a
  # kernel's group that exist, and launching needs just the binary (.cubin) and its .json.
  local ext=gz z=z; command -v xz >/dev/null 2>&1 && { ext=xz; z=J; }
  local tmp; tmp=$(mktemp /tmp/compile_cache.XXXXXX)
  local limit=$((CACHE_MAX_MB * 1048576)) bytes what="packed"
  pack() { XZ_OPT="${XZ_OPT:--6 -T0}" tar -c${z}f "$tmp" -C "$CACHE_ROOT" "$@" . 2>/dev/null; }
  if ! pack; then
    rm -f "$tmp"; say "compile cache not packed (tar failed)"; return
  fi
  bytes=$(stat -c %s "$tmp")
  if [ "$bytes" -gt "$limit" ]; then
    say "compile cache: $((bytes / 1048576)) MiB is over CACHE_MAX_MB=$CACHE_MAX_MB; packing it without Triton's intermediate files"
    pack --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' --exclude='*.ptx' --exclude='*.source' \
      || { rm -f "$tmp"; say "compile cache not packed (tar failed)"; return; }
    bytes=$(stat -c %s "$tmp"); what="packed without Triton's intermediate files"
  fi
  if [ "$bytes" -le "$limit" ]; then
    rm -f "$OUT"/compile_cache.tar.*
    chmod 644 "$tmp" && mv "$tmp" "$OUT/compile_cache.tar.$ext"
    say "compile cache $what: $OUT/compile_cache.tar.$ext ($((bytes / 1024)) KiB); copy it into .gpu/ for the next call"
  else
    rm -f "$tmp"; say "compile cache not packed: $((bytes / 1048576)) MiB is over CACHE_MAX_MB=$CACHE_MAX_MB" \
      "(room left beside the ${bundle_mb:-?} MiB bundle in the 64 MiB a call carries)"
  fi
}
FC="$PY -m fastcifar.cli"
# words NAME TEXT: TEXT split on blanks into the array NAME, with no filename expansion (to an
# unquoted expansion a value such as widths=[8,16,16,16] is a glob pattern)
words() { read -r -a "$1" <<< "$2"; }
SETS=() NET_OPTS=()
words _kvs "$EXTRA_SET"; for kv in "${_kvs[@]}"; do SETS+=(--set "$kv"); done
words _kvs "$NET_OPT"; for kv in "${_kvs[@]}"; do NET_OPTS+=(--model-opt "$kv"); done
NPZ=()
[ -f "$ORIG_NPZ" ] && NPZ=(--original-npz "$ORIG_NPZ")
MODE=()
case "$COMPILE_MODE" in
  "") ;;
  none) MODE=(--no-compile) ;;     # no torch.compile at all (as airbench94 runs)
  *) MODE=(--compile-mode "$COMPILE_MODE") ;;
esac
zoo_models() { $PY -c "import fastcifar.models as m; print(' '.join(n for n in m.model_names() if n != 'speedrun_net'))"; }

# --- preflight: every later step's needs, one line each; the data converted if missing --------
stage_preflight() {
  local gpu=()
  command -v nvidia-smi >/dev/null && { nvidia-smi -L; gpu=(--require-gpu); }
  step --max 60 $PY bench/preflight.py --data "$DATA" --source "$JPEG_TAR" "${NPZ[@]}" "${gpu[@]}" \
    --out "$OUT/preflight.json"
}
need_data() {  # nothing after this can run without the data
  [ -f "$DATA/train.beton" ] && [ -f "$DATA/test.beton" ] || { say "no data in $DATA: stopping"; exit 1; }
}

stage_env() {
  say "environment"
  nvidia-smi || say "nvidia-smi failed"
  $PY - "$OUT/env.json" <<'EOF'
import json, subprocess, sys
from fastcifar.machine import machine_info, package_version
info = machine_info()
for pkg in ("torchvision", "opencv-python-headless", "scipy"):   # the baseline's and the statistics' extras
    info["versions"][pkg] = package_version(pkg)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
except OSError as e:
    info["nvidia_smi"] = str(e)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print({k: v for k, v in info.items() if k != "nvidia_smi"})
EOF
}

gpu_tests() {  # $1: time limit
  # TEST_SHARDS pytest processes at once, each running every N-th test (tests/conftest.py
  # --shard; the production-shape cases all in shard 0, which writes kernel_errors_gpu.json).
  # Most of the GPU tests' time is Triton compiling ~330 kernel specialisations, one at a time
  # per process, and the node has 16 cores. -v: each test's outcome reaches the log as it ends,
  # prefixed with its shard (junit files are written only at the end, then merged into
  # pytest_gpu.xml, so a run stopped by its limit still logs what it did); a per-test limit where
  # the pytest-timeout plugin is installed, so one hanging test cannot take the whole step.
  local n=${TEST_SHARDS:-8} i tmp per_test=() pids=()
  $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_TIMEOUT_S:-120}")
  tmp=$(mktemp -d /tmp/gpu_tests.XXXXXX)
  say "GPU tests in $n shards: $GPU_TESTS"
  for ((i = 0; i < n; i++)); do
    ( FASTCIFAR_KERNEL_ERRORS="$OUT/kernel_errors_gpu.json" \
      step --max "$1" $PY -m pytest -v -rs -p no:cacheprovider --durations=10 "${per_test[@]}" \
        --shard "$i/$n" --junitxml="$tmp/shard_$i.xml" $GPU_TESTS 2>&1 | sed -u "s/^/[shard $i] /" ) &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { say "GPU tests: shard $i failed"; failed=$((failed + 1)); }
  done
  $PY - "$tmp" "$OUT/pytest_gpu.xml" <<'EOF'
import glob, os, sys, xml.etree.ElementTree as ET
shards = sorted(glob.glob(os.path.join(sys.argv[1], "shard_*.xml")))
root = ET.Element("testsuites")
for path in shards:
    top = ET.parse(path).getroot()
    for suite in ([top] if top.tag == "testsuite" else list(top)):
        suite.set("name", f"{suite.get('name')} ({os.path.basename(path)[:-4]})")
        root.append(suite)
if shards:
    tmp = sys.argv[2] + ".tmp"
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, sys.argv[2])
total = lambda key: sum(int(s.get(key, 0)) for s in root)
print(f"GPU tests: {len(shards)} shard reports merged into {sys.argv[2]}: {total('tests')} tests, "
      f"{total('failures')} failures, {total('errors')} errors, {total('skipped')} skipped")
EOF
  rm -rf "$tmp"
}

bn_relu() {  # RESERVE_S [--models a,b] [--skip-train-step]: kernel speed per shape, then one
  # train step per BN backend. Shapes stop starting RESERVE_S before the budget ends: 240 leaves
  # the two compiled resnet_2111 train steps after them (~4 minutes with compilation) room
  local shape_s=$(( $(left) - $1 )); shift; [ "$shape_s" -ge 30 ] || shape_s=30
  local name=bench_bn_relu; [ "$BN_ACT" = relu ] || name=bench_bn_relu_$BN_ACT
  step $PY bench/bench_bn_relu.py --act "$BN_ACT" --shape-time-limit "$shape_s" "$@" --out "$OUT/$name.json"
}

stage_tests() { gpu_tests "$(left)"; }

stage_kernels() { gpu_tests 240; bn_relu 240; }

stage_loaders() {
  step $PY bench/bench_loaders.py --device cuda --beton "$DATA/train.beton" --budget-s $(( $(left) - 60 )) \
    --out "$OUT/bench_loaders.json"
}

stage_train() {
  local sel=()
  [ $# -gt 0 ] && sel=(--models "$@")
  # bench_train stops starting new (model, backend) pairs a minute before the budget ends
  step $PY bench/bench_train.py --data "$DATA" "${sel[@]}" "${MODE[@]}" --budget-s $(( $(left) - 60 )) \
    --out "$OUT/bench_train.json"
}

stage_calibrate() {
  step $FC calibrate --data "$DATA" --runs "$CAL_RUNS" "${NPZ[@]}" --out "$OUT/calibrate_airbench.json"
}

speedrun_one() {  # MODEL OUT_FILE: with the baseline for speedrun_net, without for zoo models
  local m=$1 f=$2 extra=(--no-baseline --runs "$ZOO_RUNS")
  [ "$m" = speedrun_net ] && extra=(--baseline --runs "$SPEEDRUN_RUNS" "${NET_OPTS[@]}")
  step $FC speedrun --model "$m" "${extra[@]}" "${SETS[@]}" "${MODE[@]}" --data "$DATA" "${NPZ[@]}" --out "$f"
}

# pack_results TAR DIR FILE...: result files (names inside DIR) and DIR's leaderboard entries, if
# any, into $OUT/TAR (a call brings back at most 8 files). Stages re-pack after every unit, so a
# call cut short still brings back every finished one; no files, nothing packed
pack_results() {
  local tar=$1 dir=$2; shift 2
  [ $# -gt 0 ] || return 0
  local lb=(); [ -d "$dir/leaderboard" ] && lb=(leaderboard)
  tar czf "$OUT/$tar" -C "$dir" "$@" "${lb[@]}"
}

stage_speedrun() {
  local models=("$@")
  [ ${#models[@]} -gt 0 ] || models=(speedrun_net $(zoo_models))
  local files=()
  for m in "${models[@]}"; do
    local f="$RESULTS/speedrun_${m}_gpu.json"
    speedrun_one "$m" "$f"
    [ -f "$f" ] && files+=("$(basename "$f")")   # partial results count: the file holds every finished run
    pack_results speedrun_results.tar.gz "$RESULTS" "${files[@]}"
  done
}

stage_zoo() {
  # MODEL or MODEL:FIELD=VALUE,...: the fast recipe with those overrides (e.g. resnet_2111:epochs=40)
  local specs=("$@") files=() spec
  [ ${#specs[@]} -gt 0 ] || specs=($(zoo_models))
  for spec in "${specs[@]}"; do
    local m=${spec%%:*} sets=() parts kv tag="" budget=()
    if [ "$spec" != "$m" ]; then
      IFS=, read -r -a parts <<< "${spec#*:}"
      for kv in "${parts[@]}"; do sets+=(--set "$kv"); done
      tag="_$(printf "%s" "${spec#*:}" | tr -c "A-Za-z0-9.-" "_")"
    fi
    # epochs given: those; otherwise as many as fit $ZOO_BUDGET_S of training at the warm-up's speed
    case ",${spec#*:}," in *,epochs=*) ;; *) [ -n "$ZOO_BUDGET_S" ] && budget=(--train-budget-s "$ZOO_BUDGET_S") ;; esac
    local f="$RESULTS/zoo_${m}${tag}_gpu.json"
    # a one-epoch warm-up compiles all the runs need (a whole one would cost ~1-2 minutes)
    step $FC speedrun --model "$m" --no-baseline --runs "$ZOO_TARGET_RUNS" --target report \
      --calibration "$CALIBRATION" --warmup-epochs 1 "${budget[@]}" "${sets[@]}" "${MODE[@]}" --data "$DATA" \
      "${NPZ[@]}" --out "$f"
    [ -f "$f" ] && files+=("$(basename "$f")")
    pack_results zoo_results.tar.gz "$RESULTS" "${files[@]}"
  done
}

# SETTING (a TUNE_GRID word) -> SETTING_ARGS (--set / --model-opt arguments) and SETTING_LABEL
# (its name: or the setting itself, as a file-name part); the word airbench_like stands for $AIRBENCH_LIKE
setting_args() {
  local setting=$1 parts kv
  [ "$setting" = airbench_like ] && setting=$AIRBENCH_LIKE
  SETTING_ARGS=() SETTING_LABEL=$setting
  IFS=, read -r -a parts <<< "$setting"
  for kv in "${parts[@]}"; do
    case "$kv" in
      model:*) SETTING_ARGS+=(--model-opt "${kv#model:}") ;;
      name:*) SETTING_LABEL=${kv#name:} ;;
      *) SETTING_ARGS+=(--set "$kv") ;;
    esac
  done
  SETTING_LABEL=$(printf "%s" "$SETTING_LABEL" | tr -c "A-Za-z0-9.-" "_")
}

stage_tune() {
  local files=()
  mkdir -p "$RESULTS/tune"
  local settings setting
  words settings "$TUNE_GRID"
  for setting in "${settings[@]}"; do
    setting_args "$setting"
    # one file per setting, named after it (or its name:): epochs=10,model:stem=conv -> speedrun_net_epochs_10_model_stem_conv.json
    local f="$RESULTS/tune/speedrun_net_$SETTING_LABEL.json"
    step $FC speedrun --model speedrun_net --no-baseline --runs "$TUNE_RUNS" "${SETS[@]}" "${NET_OPTS[@]}" \
      "${SETTING_ARGS[@]}" "${MODE[@]}" --data "$DATA" --out "$f"
    [ -f "$f" ] && files+=("$(basename "$f")")
    [ ${#files[@]} -gt 0 ] && tar czf "$OUT/tune_speedrun_net.tar.gz" -C "$RESULTS/tune" "${files[@]}"
  done
}

stage_race() {
  # speedrun_net built and trained as airbench94 (airbench_like) against airbench94 itself, in
  # the same process, $SPEEDRUN_RUNS pairs: one recipe, two engines (fastcifar's compiled step,
  # with CUDA graphs under COMPILE_MODE=reduce-overhead, against airbench94's eager one). Then,
  # while at least RACE_SWEEP_MIN_S are left, the same setting with each change of $RACE_SWEEP
  # without the baseline ($TUNE_RUNS runs): how far the epochs can drop, in one packed file
  setting_args "${1:-airbench_like}"
  local args=("${SETTING_ARGS[@]}") label=$SETTING_LABEL mode=${COMPILE_MODE:+_$COMPILE_MODE}
  step $FC speedrun --model speedrun_net --baseline --runs "$SPEEDRUN_RUNS" "${args[@]}" "${MODE[@]}" \
    --data "$DATA" "${NPZ[@]}" --out "$OUT/speedrun_${label}${mode}.json"
  local change changes files=() dir="$RESULTS/race"
  mkdir -p "$dir"
  words changes "$RACE_SWEEP"
  for change in "${changes[@]}"; do
    if [ "$(left)" -lt "$RACE_SWEEP_MIN_S" ]; then say "race: $change not started ($(left) s left)"; continue; fi
    setting_args "$change"          # later --set/--model-opt values override the setting's
    local f="speedrun_${label}_${SETTING_LABEL}${mode}.json"
    step $FC speedrun --model speedrun_net --no-baseline --runs "$TUNE_RUNS" "${args[@]}" "${SETTING_ARGS[@]}" \
      "${MODE[@]}" --data "$DATA" --out "$dir/$f"
    [ -f "$dir/$f" ] && files+=("$f")
    pack_results "race_sweep${mode}.tar.gz" "$dir" "${files[@]}"   # one file for the whole sweep
  done
}

stage_profile() {
  local models=("$@")
  [ ${#models[@]} -gt 0 ] || models=(resnet_2111 speedrun_net)
  local traces; traces=$(mktemp -d /tmp/profile_traces.XXXXXX)
  step $PY bench/profile_step.py --models "${models[@]}" --backends compiled triton --trace-dir "$traces" \
    "${MODE[@]}" --out "$OUT/profile_step${COMPILE_MODE:+_$COMPILE_MODE}.json"
  ls "$traces"/*.json.gz >/dev/null 2>&1 && tar czf "$OUT/profile_traces${COMPILE_MODE:+_$COMPILE_MODE}.tar.gz" -C "$traces" .
}

stage_overhead() {
  # The first H100 profile: the compiled step sits idle 30-50% of its time (speedrun_net 51%:
  # 3.5 ms of kernels in a 7.2 ms step), waiting for the host to launch ~170-280 kernels. CUDA
  # graphs (torch.compile mode reduce-overhead) replay them without launch gaps. Here: the
  # step profiled in both modes, then speedrun_net against airbench94 in reduce-overhead.
  # The third reference, first because it costs seconds (nothing compiles): the step without
  # torch.compile, cuDNN's BatchNorm (one kernel forward, one backward, where inductor's
  # decomposition launches several). airbench94 runs eagerly in at most 5.5 ms a step on the H100
  # (2.65 s for 476 steps and its evaluation) against speedrun_net's compiled 7.2 ms, with
  # the same widths: a host-bound step may launch less uncompiled.
  local models=("$@")
  [ ${#models[@]} -gt 0 ] || models=(resnet_2111 speedrun_net)
  step $PY bench/profile_step.py --models "${models[@]}" --backends eager --no-compile \
    --out "$OUT/profile_step_eager.json"
  local COMPILE_MODE="" MODE=()
  stage_profile "$@"
  COMPILE_MODE=reduce-overhead MODE=(--compile-mode reduce-overhead)
  stage_profile "$@"
  speedrun_one speedrun_net "$OUT/speedrun_speedrun_net_reduce-overhead.json"
}

# --- the three calls --------------------------------------------------------------------------
stage_call1() {
  gpu_tests 240
  # the per-shape kernel table only: the overhead stage times the whole train step per backend
  # (profile_step, in both compile modes), so the rest of the call measures the loaders
  bn_relu 150 --models "$(echo $HEADLINE | tr ' ' ',')" --skip-train-step
  stage_loaders
}

stage_call2() {
  speedrun_one speedrun_net "$OUT/speedrun_speedrun_net.json"
}

stage_call3() {
  # throughput first (the most figures per second), then ~200 s for the run to the target:
  # bench_train starts no unit in its last minute and is stopped where the 200 s begin, even
  # inside a unit (its file keeps the finished ones)
  local bt=$(( $(left) - 200 ))
  step --max "$bt" $PY bench/bench_train.py --data "$DATA" --models $HEADLINE --backends compiled triton \
    --loaders gpu ffcv --budget-s $(( bt - 60 )) --out "$OUT/bench_train.json"
  local run="$RESULTS/runs/resnet_2111_target"
  rm -rf "$run"
  step $FC train --model resnet_2111 --target "$TARGET_2111" --data "$DATA" --out "$run" --no-progress
  # a run stopped by its limit (SIGTERM) still writes its summary: bring back what there is
  [ -f "$run/summary.json" ] && cp "$run/summary.json" "$OUT/train_resnet_2111_summary.json"
  [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/train_resnet_2111_metrics.jsonl"
}

say "gpu_suite stage '$stage' (budget ${BUDGET_S}s), results to $OUT"
setup_cache
stage_preflight   # a failure is counted; the stage goes on unless the data is missing
case "$stage" in
  preflight) ;;
  env) stage_env ;;
  tests) stage_tests ;;
  kernels) stage_kernels ;;
  loaders) need_data; stage_loaders ;;
  train) need_data; stage_train "$@" ;;
  calibrate) need_data; stage_calibrate ;;
  speedrun) need_data; stage_speedrun "$@" ;;
  zoo) need_data; stage_zoo "$@" ;;
  tune) need_data; stage_tune ;;
  race) need_data; stage_race "$@" ;;
  profile) stage_profile "$@" ;;
  overhead) need_data; stage_overhead "$@" ;;
  call1) stage_call1 ;;
  call2) need_data; stage_call2 ;;
  call3) need_data; stage_call3 ;;
  all) need_data; stage_env; stage_kernels; stage_loaders; stage_train; stage_calibrate; stage_speedrun; stage_tune ;;
esac
pack_cache
say "done ($failed step(s) failed or skipped); files in $OUT:"
ls -laR "$OUT"
[ "$failed" -eq 0 ]
