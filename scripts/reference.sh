#!/usr/bin/env bash
# Reproduce the shipped reference checkpoints (checkpoints/sportballs-v1) on one GPU, with the
# project's own commands only. Each stage fits in one ~10-minute sitting; the DDPM is trained in
# two sittings, the second continuing from the first's fp16 export (--init-from).
#
#   scripts/reference.sh stage1   # data set; DDPM sitting 1 || nonrobust + judge classifiers
#   scripts/reference.sh stage2   # DDPM sitting 2 || robust + adversarial
#   scripts/reference.sh stage3   # DDPM sitting 3 (GPU to itself); eval-ddpm with the judge
set -euo pipefail
export PYTHONUNBUFFERED=1
G="python3 -m gradcheck"
CK=checkpoints/sportballs-v1
stage=${1:?usage: scripts/reference.sh stage1|stage2|stage3}
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
*)
  echo "unknown stage $stage; use stage1, stage2 or stage3" >&2
  exit 2
  ;;
esac
