#!/usr/bin/env bash
# Reproduce the CPU-scale reference set (checkpoints/sportballs32-v1) on a 2-core CPU with the
# project's own commands. Every stage resumes: run it again after an interruption.
#
#   scripts/sportballs32.sh data         # the seed-0 32x32 data set (datasets/sportballs32)
#   scripts/sportballs32.sh ddpm [MIN]   # train or continue the DDPM for MIN more minutes (55)
#   scripts/sportballs32.sh classifiers  # nonrobust, judge, robust, adversarial (needs the DDPM)
#   scripts/sportballs32.sh eval [N]     # eval-ddpm on N samples (1000) x 1,000 steps, judge
#   scripts/sportballs32.sh cards        # model cards from what the commands recorded
#
# Long stages belong in the background: nohup scripts/sportballs32.sh ddpm > ddpm.log 2>&1 &
set -euo pipefail
export PYTHONUNBUFFERED=1
G="python3 -m gradcheck"
NAME=sportballs32-v1
CK=checkpoints/$NAME
DATA=${GRADCHECK_DATA:-datasets/sportballs32}
stage=${1:?usage: scripts/sportballs32.sh data|ddpm [MIN]|classifiers|eval [N]|cards}

[ -f "$DATA/dataset.json" ] || $G make-dataset --root "$DATA" --image-size 32 --overwrite | tail -6

case "$stage" in
data) ;;
ddpm)
  # The probe's recipe (issue "sportballs32"): batch 64, AdamW 5e-4, Min-SNR-gamma 5, EMA 0.9995
  # with warm-up, multiscale weight 0.03 (white backgrounds early); bf16 where the CPU runs it.
  resume=()
  [ -f "$CK/train_state/ddpm/checkpoint/state.json" ] && resume=(--resume)
  $G train-ddpm --preset small32 --data-root "$DATA" --name $NAME --batch-size 64 --lr 5e-4 \
    --multiscale-weight 0.03 --max-minutes "${2:-55}" --sample-every 2000 \
    --checkpoint-every 1000 --no-progress "${resume[@]}"
  ;;
classifiers)
  # Epoch caps so each cosine schedule completes within its time cap on two cores; a lighter
  # evaluation attack (10 steps, radii up to 2) than the GPU set's, to keep it to minutes.
  common=(--data-root "$DATA" --name $NAME --fp16 --batch-size 128 --eval-samples 512
          --eval-pgd-steps 10 --eval-pgd-eps 0 --eval-pgd-eps 0.25 --eval-pgd-eps 0.5
          --eval-pgd-eps 1 --eval-pgd-eps 2 --no-progress --overwrite)
  $G train-classifier --kind nonrobust --ddpm $CK/ddpm --epochs 2 --max-minutes 6 "${common[@]}"
  $G train-classifier --kind judge --epochs 2 --max-minutes 5 "${common[@]}"
  $G train-classifier --kind robust --ddpm $CK/ddpm --epochs 3 --max-minutes 8 "${common[@]}"
  $G train-classifier --kind adversarial --time-conditioned --ddpm $CK/ddpm --epochs 1 \
    --max-minutes 9 "${common[@]}"
  ;;
eval)
  $G eval-ddpm $CK/ddpm --num-samples "${2:-1000}" --steps 1000 \
    --judge $CK/classifiers/judge --data-root "$DATA" --overwrite
  ;;
cards)
  python3 scripts/model_cards.py $CK --script scripts/sportballs32.sh
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
