#!/usr/bin/env bash
# One command for a GPU machine (at most DEVICE_CHECK_MINUTES, default 8, on one GPU):
#   1. tests/test_cuda.py;
#   2. DDP with 2 processes on the one GPU (gloo), then on every GPU there is (nccl; skipped with one GPU);
#   3. one epoch of the paper recipe timed (s/epoch, peak GPU memory), in fp16 (+ GradScaler) and in bf16;
#   4. as many full paper-recipe epochs as the remaining time allows (--time_budget), then the test Dice of
#      the last snapshot (MyTest_LungInf.py, then EvaluationTool).
# Everything goes to one report, $OUT/device_check.md ($OUT: what the device tool collects) or
# bench/device_check.md; every step runs even if one before it failed, and says its exit status.
#
#   bash bench/device_check.sh              # on the GPU machine
#   bash bench/device_check.sh --cpu-smoke  # every step on the CPU at tiny sizes (proves the script, ~4 min)
#
# Data: ../shared/COVID-SemiSeg if present, else $INFNET_SHARED/COVID-SemiSeg, else Dataset/.
set -u
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python}
MINUTES=${DEVICE_CHECK_MINUTES:-8}
START=$(date +%s)
DEADLINE=$((START + MINUTES * 60))
REPORT_DIR=${OUT:-$ROOT/bench}
mkdir -p "$REPORT_DIR"
REPORT=$REPORT_DIR/device_check.md
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for d in "$ROOT/../shared/COVID-SemiSeg" "${INFNET_SHARED:-/nonexistent}/COVID-SemiSeg" "$ROOT/Dataset"; do
  if [ -d "$d/TrainingSet" ]; then DATA=$(cd "$d" && pwd); break; fi
done
if [ -z "${DATA:-}" ]; then echo "no COVID-SemiSeg data in ../shared, \$INFNET_SHARED or Dataset/" >&2; exit 2; fi
export INFNET_SHARED=${INFNET_SHARED:-$(dirname "$DATA")}
DOCTOR=$DATA/TrainingSet/LungInfection-Train/Doctor-label
TEST=$DATA/TestingSet/LungInfection-Test

if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  # tiny: 4 slices at 64 px, a small encoder, 4 samples per epoch, one thread per process
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  SMALL=("$WORK/four")
  mkdir -p "$WORK/four"
  for sub in Imgs GT Edge; do
    mkdir -p "$WORK/four/$sub"
    for f in $(ls "$DOCTOR/$sub" | sort | head -4); do cp "$DOCTOR/$sub/$f" "$WORK/four/$sub/"; done
  done
  mkdir -p "$WORK/test/Imgs" "$WORK/test/GT"
  for f in $(ls "$TEST/Imgs" | sort | head -4); do
    cp "$TEST/Imgs/$f" "$WORK/test/Imgs/"; cp "$TEST/GT/${f%.*}".* "$WORK/test/GT/"
  done
  TEST=$WORK/test
  RECIPE=(--train_path "${SMALL[@]}" --trainsize 64 --batchsize 4 --backbone timm:resnet18)
  EPOCH_SAMPLES=(--epoch_samples 4)
  TESTSIZE=64
  TEST_MODEL=(--backbone timm:resnet18)   # release-format snapshots do not say their encoder
  CAP_TESTS=120; CAP_DDP=120; CAP_EPOCH=90; RESERVE=60
else
  DEVICE=cuda
  RECIPE=(--train_path "$DOCTOR")   # the paper's: batch 24, 352 px, scales 0.75/1/1.25, Adam 1e-4, clip 0.5
  EPOCH_SAMPLES=()
  TESTSIZE=352
  TEST_MODEL=()
  CAP_TESTS=200; CAP_DDP=60; CAP_EPOCH=60; RESERVE=60
fi
COMMON=(--snapshot_root "$WORK/snap" --no-progress --device "$DEVICE")

now() { date +%s; }
say() { echo "$*" | tee -a "$REPORT"; }

# run NAME CAP CMD...: the command, killed after CAP seconds (or sooner, keeping RESERVE seconds for the test
# Dice at the end); its last lines go to the report.
run() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - $(now) - RESERVE))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then say "### $name: skipped (time left: $((DEADLINE - $(now))) s)"; return 99; fi
  local t0 rc
  t0=$(now)
  timeout --signal=INT --kill-after=15 "$cap" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  say "### $name: exit $rc in $(($(now) - t0)) s (limit $cap s)"
  say '```'
  grep -v "UserWarning: inf_net: the encoder starts from RANDOM\|warn_random_weights" "$WORK/$name.log" | tail -n 25 \
    | tee -a "$REPORT"
  say '```'
  return $rc
}

epoch_line() { grep -h "^\[train\] epoch" "$WORK/$1.log" | tail -n 1; }

: >"$REPORT"
say "# device check $(date -u '+%Y-%m-%d %H:%M UTC')$([ $SMOKE = 1 ] && echo ' (--cpu-smoke: CPU, tiny sizes)')"
say '```'
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPUs", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
if torch.cuda.is_available():
    print("native bf16:", torch.cuda.is_bf16_supported(including_emulation=False))
EOF
say "data: $DATA"
say '```'
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# 1. the CUDA tests (skipped, each with its reason, on the CPU)
run cuda_tests "$CAP_TESTS" $PY -m pytest -q -rs -s -p no:cacheprovider tests/test_cuda.py

# 2. DDP: two processes on one GPU over gloo, then every GPU over nccl (the CPU smoke: gloo on the CPU)
DDP=("${RECIPE[@]}" --epoch 1 --epoch_samples 8 --batchsize 4 "${COMMON[@]}" --save_every 1)
[ $SMOKE = 1 ] && DDP=("${RECIPE[@]}" --epoch 1 --epoch_samples 8 "${COMMON[@]}" --save_every 1)
INFNET_DDP_BACKEND=gloo CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0} run ddp_gloo_2_on_one "$CAP_DDP" \
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 MyTrain_LungInf.py "${DDP[@]}" --train_save ddp-gloo
if [ $SMOKE = 1 ] || [ "$GPUS" -ge 2 ]; then
  N=$([ $SMOKE = 1 ] && echo 2 || echo "$GPUS")
  run "ddp_all_${N}" "$CAP_DDP" $PY -m torch.distributed.run --standalone --nproc_per_node="$N" MyTrain_LungInf.py \
    "${DDP[@]}" --batchsize $((4 * N)) --train_save ddp-all
else
  say "### ddp_all (nccl): skipped: $GPUS GPU (nccl needs one process per GPU, two or more GPUs)"
fi

# 3. one paper-recipe epoch in each precision
for dtype in float16 bfloat16; do
  run "epoch_$dtype" "$CAP_EPOCH" $PY MyTrain_LungInf.py "${RECIPE[@]}" ${EPOCH_SAMPLES[@]+"${EPOCH_SAMPLES[@]}"} "${COMMON[@]}" \
    --epoch 1 --amp_dtype "$dtype" --train_save "epoch-$dtype"
done

# 4. full paper-recipe epochs in the time left (default precision), then the last snapshot's test Dice
left=$((DEADLINE - $(now) - RESERVE - 30))   # 30 s: start-up, data checks, the epoch that crosses the budget
if [ "$left" -ge 30 ]; then
  budget=$($PY -c "print(round($left / 60, 2))")
  run paper_epochs $((left + 120)) $PY MyTrain_LungInf.py "${RECIPE[@]}" ${EPOCH_SAMPLES[@]+"${EPOCH_SAMPLES[@]}"} "${COMMON[@]}" \
    --epoch 100 --save_every 100 --time_budget "$budget" --train_save paper
  last=$(ls "$WORK/snap/save_weights/paper/" 2>/dev/null | grep -E '^Inf-Net-[0-9]+\.pth$' | sort -t- -k3 -n | tail -n 1)
  if [ -n "$last" ]; then
    RESERVE=0
    run test_stage 90 $PY MyTest_LungInf.py --pth_path "$WORK/snap/save_weights/paper/$last" --data_path "$TEST" \
      --save_path "$WORK/pred/paper" --testsize "$TESTSIZE" --device "$DEVICE" --no-progress ${TEST_MODEL[@]+"${TEST_MODEL[@]}"}
    run evaluation 60 $PY -m EvaluationTool --gt_root "$TEST/GT" --pred_root "$WORK/pred" --models paper \
      --save_dir "$WORK/eval"
  else
    say "### test Dice: no snapshot was written by the paper-recipe run"
  fi
else
  say "### paper_epochs: skipped ($left s left)"
fi

say "## summary"
for dtype in float16 bfloat16; do
  say "- one paper-recipe epoch, $dtype: $(epoch_line "epoch_$dtype" | sed 's/.*| //' || true)"
done
[ -f "$WORK/paper_epochs.log" ] && say "- paper recipe in the time left: ${last:-no snapshot} (last epoch:" \
  "$(epoch_line paper_epochs | sed 's/ lr .*| / | /'))"
[ -f "$WORK/evaluation.log" ] && say "- test scores of that snapshot (EvaluationTool):" \
  "$(grep -m1 'meanDic' "$WORK/evaluation.log" || true)"
say "- total $(($(now) - START)) s of ${MINUTES} min; report: $REPORT"
