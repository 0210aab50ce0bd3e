#!/usr/bin/env bash
# Reproduce the shipped reference checkpoints (checkpoints/sportballs-v1) on one GPU, with the
# project's own commands only. Each stage fits in one ~10-minute sitting; the DDPM is trained in
# two sittings, the second continuing from the first's fp16 export (--init-from).
#
#   scripts/reference.sh stage1   # data set; DDPM sitting 1 || nonrobust + judge classifiers
#   scripts/reference.sh stage2   # DDPM sitting 2 || robust + adversarial
#   scripts/reference.sh stage3   # DDPM sitting 3 (GPU to itself); eval-ddpm with the judge
#   scripts/reference.sh stage4   # DDPM sitting 4 with the multiscale loss; eval on 1,000 samples
#   scripts/reference.sh precision # real TF32/bf16 vs float32 gradients (checks the emulation)
#   scripts/reference.sh bench P  # gradcheck bench at precision P (fp32, tf32, bf16 or auto)
#   scripts/reference.sh table1 P # the bench plus the full Table 1 protocol at precision P
set -euo pipefail
export PYTHONUNBUFFERED=1
G="python3 -m gradcheck"
CK=checkpoints/sportballs-v1
stage=${1:?usage: scripts/reference.sh stage1|stage2|stage3|stage4|precision|bench P|table1 P}
LOG=${LOG_DIR:-/tmp/reference-logs}
mkdir -p "$LOG"

[ -f datasets/sportballs/dataset.json ] || $G make-dataset --overwrite 2>&1 | tail -8

case "$stage" in
stage1)
  (
    $G train-classifier --kind nonrobust --fp16 --max-minutes 3 --no-progress
    $G train-classifier --kind judge --fp16 --max-minutes 3 --no-progress
  ) >"$LOG/classifiers1.log" 2>&1 &
  $G train-ddpm --preset paper --max-minutes "${DDPM_MINUTES:-8}" --batch-size 256 \
    --sample-every 0 --checkpoint-every 0 --no-progress --overwrite 2>&1 | tee "$LOG/ddpm1.log"
  wait
  ;;
stage2)
  # The noisy classifiers read the sitting-1 DDPM (schedule; x0-estimate evaluation) while
  # sitting 2 trains into a separate name that replaces it at the end.
  (
    $G train-classifier --kind robust --ddpm $CK/ddpm --fp16 --max-minutes 3 --no-progress
    $G train-classifier --kind adversarial --time-conditioned --ddpm $CK/ddpm --fp16 \
      --max-minutes 3.5 --no-progress
  ) >"$LOG/classifiers2.log" 2>&1 &
  $G train-ddpm --preset paper --init-from $CK/ddpm --name sportballs-v1-sitting2 \
    --max-minutes "${DDPM_MINUTES:-6}" --batch-size 256 --sample-every 0 --checkpoint-every 0 \
    --no-progress --overwrite 2>&1 | tee "$LOG/ddpm2.log"
  wait
  rm -rf $CK/ddpm && mv checkpoints/sportballs-v1-sitting2/ddpm $CK/ddpm
  rm -rf checkpoints/sportballs-v1-sitting2
  ;;
stage3)
  $G train-ddpm --preset paper --init-from $CK/ddpm --name sportballs-v1-sitting3 \
    --max-minutes "${DDPM_MINUTES:-6.2}" --batch-size 256 --sample-every 0 --checkpoint-every 0 \
    --no-progress --overwrite 2>&1 | tee "$LOG/ddpm3.log"
  rm -rf $CK/ddpm && mv checkpoints/sportballs-v1-sitting3/ddpm $CK/ddpm
  rm -rf checkpoints/sportballs-v1-sitting3
  $G eval-ddpm $CK/ddpm --num-samples "${EVAL_SAMPLES:-256}" --batch-size 256 \
    --judge $CK/classifiers/judge --no-progress 2>&1 | tee "$LOG/eval_ddpm.log"
  ;;
stage4)
  # Not run yet: the shipped DDPM misses the white-border bar (30%); the multiscale loss targets
  # exactly its tinted backgrounds (train_ddpm.py's docstring).
  $G train-ddpm --preset paper --init-from $CK/ddpm --name sportballs-v1-sitting4 \
    --multiscale-weight 0.02 --max-minutes "${DDPM_MINUTES:-8}" --batch-size 256 \
    --sample-every 0 --checkpoint-every 0 --no-progress --overwrite 2>&1 | tee "$LOG/ddpm4.log"
  $G eval-ddpm checkpoints/sportballs-v1-sitting4/ddpm --num-samples 1000 --batch-size 250 \
    --judge $CK/classifiers/judge --no-progress 2>&1 | tee "$LOG/eval_ddpm4.log"
  ;;
precision)
  # About a minute: the same table as on a CPU, with real TF32 instead of the emulation.
  mkdir -p reports/bench
  $G precision --device cuda --timesteps 999,900,800,700,500,300,100 \
    --out reports/bench/precision-gpu.parquet --overwrite 2>&1 | tee "$LOG/precision.log"
  ;;
bench)
  # One precision per sitting (about 8 minutes each in fp32): bench fp32 | tf32 | bf16 | auto.
  p=${2:-fp32}
  mkdir -p reports/bench
  $G bench --full --precision "$p" --json "reports/bench/bench-$p.json" --overwrite 2>&1 \
    | tee "$LOG/bench-$p.log"
  ;;
table1)
  # The Table 1 protocol, one seed, metrics included: >= 230 s in fp32 on an H100 (peak-bound),
  # >= 73 s with auto (x0-estimate steps at t >= 700 in fp32, the rest TF32).
  p=${2:-fp32}
  mkdir -p reports/bench
  $G bench --full --table1 --precision "$p" --json "reports/bench/table1-$p.json" --overwrite 2>&1 \
    | tee "$LOG/table1-$p.log"
  ;;
*)
  echo "unknown stage $stage; use stage1, stage2, stage3, stage4, precision, bench or table1" >&2
  exit 2
  ;;
esac
