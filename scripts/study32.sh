#!/usr/bin/env bash
# The reference study at CPU scale (issue "The reference study at CPU scale"): the papers'
# protocol (N = 64 samples, the full 1,000-step sampler) on the sportballs32-v1 set, rendered
# into reports/sportballs32/. Every sweep writes a compact record of each finished run into
# reports/sportballs32/records/ and skips runs recorded there, so a stage resumes on any machine
# from the committed records: run it again after an interruption (an unfinished group of runs
# sampled together is lost, never half-written).
#
#   scripts/study32.sh table1 K        # Table 1 at SCALE, seed K of 5: 8 runs together (~75 min)
#   scripts/study32.sh classifiers K   # + adversarial and oracle plain guidance at SCALE (~25 min)
#   scripts/study32.sh scales K        # plain guidance, 6 scales x 3 classifiers, seed K (~70 min)
#   scripts/study32.sh scales-x0 K     # x0-estimate + ADAM, 6 scales x 2 classifiers (~2 h)
#   scripts/study32.sh d5-norm K       # D5 to eps vs to the score, 6 scales, non-robust (~45 min)
#   scripts/study32.sh pag             # gradient maps, targeted PGD, PAG scores (~30 s)
#   scripts/study32.sh report          # reports/sportballs32/ from the records (seconds)
#   scripts/study32.sh all             # every stage, in the planned order, then the report
#
# Times are on 2 idle cores, for a stage with none of its runs recorded yet (reports/sportballs32/
# stages.csv has each measured one). Long stages belong in the background:
#   nohup scripts/study32.sh all > study.log 2>&1 &
# Each stage that ran something appends its command, wall time and CPU to
# reports/sportballs32/stages.csv, which the report lists. Run folders (megabytes each) go to
# GRADCHECK_STUDY_RUNS (default runs/sportballs32, not committed).
set -euo pipefail
export PYTHONUNBUFFERED=1
export GRADCHECK_CHECKPOINTS=sportballs32-v1
G="python3 -m gradcheck"
# Table 1's (and the classifiers grid's) guidance scale at this scale. The paper's s = 1 is too
# strong here (seed 0: judge accuracy 0-14% for plain guidance, 31-97% at s = 0.25), so the study
# takes the scale with the highest mean judge accuracy over the configurations of its scale grids
# (docs/scales.md, "The guidance scale"; report.md, "Guidance scale sweep"). The report marks it
# as a protocol difference.
SCALE=${GRADCHECK_STUDY_SCALE:-0.25}
REPORT=reports/sportballs32
RECORDS=$REPORT/records
RUNS=${GRADCHECK_STUDY_RUNS:-runs/sportballs32}
DATA=${GRADCHECK_DATA:-datasets/sportballs32}
stage=${1:?usage: scripts/study32.sh table1|classifiers|scales|scales-x0|d5-norm K | pag | report | all}
mkdir -p "$REPORT"

[ -f "$DATA/dataset.json" ] || $G make-dataset --root "$DATA" --image-size 32 --overwrite | tail -6

cpu() { lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1; }

log_stage() {  # stage, command, start (s), summary
  local csv=$REPORT/stages.csv
  [ -f "$csv" ] || echo "stage,command,started_utc,wall_s,cpu,cores,result" > "$csv"
  printf '%s,"%s",%s,%s,"%s",%s,"%s"\n' "$1" "$2" "$(date -u -d "@$3" +%FT%TZ)" \
    "$(( $(date +%s) - $3 ))" "$(cpu)" "$(nproc)" "$4" >> "$csv"
}

sweep() {  # grid, seed
  local grid=$1 k=${2:?seed K missing} n cmd start out scale=()
  [ "$grid" = table1 ] && n=5 || n=$(( k + 1 ))
  case "$grid" in table1 | classifiers) scale=(--scale "$SCALE") ;; esac
  cmd="gradcheck sweep --grid $grid ${scale[*]:+${scale[*]} }--seeds $n --shard $k/$n"
  cmd+=" --records $RECORDS --no-progress"
  start=$(date +%s)
  out=$($G sweep --grid "$grid" "${scale[@]}" --seeds "$n" --shard "$k/$n" --records "$RECORDS" \
        --out "$RUNS" --no-progress | tee /dev/stderr | grep '^sweep ')
  out=${out%, in *}  # the run folder is this machine's, not the record's
  case "$out" in *" 0 run now"*) ;; *) log_stage "$grid seed $k" "$cmd" "$start" "$out" ;; esac
}

pag() {
  [ -f "$REPORT/pag/pag.parquet" ] && return 0
  local start cmd="gradcheck pag --out $REPORT/pag --no-progress"
  start=$(date +%s)
  $G pag --out "$REPORT/pag" --no-progress
  log_stage pag "$cmd" "$start" "$REPORT/pag"
}

report() {
  local inputs=("$RECORDS")
  for f in "$REPORT/pag" "$REPORT/stages.csv"; do [ -e "$f" ] && inputs+=("$f"); done
  $G report "${inputs[@]}" --scale "$SCALE" --out "$REPORT" --overwrite --no-progress
}

case "$stage" in
table1 | classifiers | scales | scales-x0 | d5-norm) sweep "$stage" "${2:-}" ;;
pag) pag ;;
report) report ;;
all)
  # Planned order: the scale grids of seed 0 first (they justify SCALE), then one seed of
  # every other grid (every section of the report has numbers), then Table 1's other seeds.
  sweep scales 0; sweep scales-x0 0; sweep table1 0; sweep classifiers 0; sweep d5-norm 0; pag
  for k in 1 2 3 4; do sweep table1 $k; done
  for k in 1 2 3 4; do sweep classifiers $k; done
  sweep scales 1; sweep scales 2
  report
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
