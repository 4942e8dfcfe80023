#!/usr/bin/env bash
# Is the contrast used, and does an option that makes it necessary help? (issue 18)
# Trains POUTA once per option below on the hard benchmark (bench/hard_benchmark.sh, one work
# folder per option, the data shared), then prints the table of docs/experiments.md: every
# option next to the paper's POUTA and vanilla from BASELINE (a bench/hard_benchmark.sh work
# folder), and bench/contrast_check.py on every option's runs (test split, reported).
# Validation decides; test is reported.
# Usage: [OPTIONS="encoder-only contrast ..."] [SEEDS="0 1 2"] [CATEGORIES="board"] [JOBS=2]
#        [BASELINE=bench-out/hard] bash bench/hard_ablation.sh [WORKDIR] [extra --set overrides...]
# e.g.   SEEDS="0 1 2" bash bench/hard_ablation.sh bench-out/hard-abl epochs=100 'lr_milestones=[80,90]'
# About 4 minutes per run on 2 CPU cores at 100 epochs (two at a time): 8 options x 4
# categories x 3 seeds is some 3 hours; CATEGORIES=board (where the maps carry evidence) 50 min.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench-out/hard-abl}
shift || true
BASELINE=${BASELINE:-bench-out/hard}
export DATA=${DATA:-$BASELINE/data}
export SEEDS=${SEEDS:-0} CATEGORIES=${CATEGORIES:-wood concrete fabric board} VARIANTS=pouta

declare -A SETS=(
  [encoder-only]="fcm_input=encoder"
  [decoder-only]="fcm_input=decoder"
  [contrast]="fcm_input=contrast"
  [detach_encoder]="detach_encoder=true"
  [consistency]="lambda_consistency=1.0"
  [self_source]="self_source_ratio=0.5"
  [staged]="rec_warmup_epochs=30 detach_features=true"
  [all-four]="fcm_input=contrast detach_encoder=true lambda_consistency=1.0 self_source_ratio=0.5"
)
OPTIONS=${OPTIONS:-encoder-only decoder-only contrast detach_encoder consistency self_source staged all-four}
for option in $OPTIONS; do
  [ -n "${SETS[$option]+x}" ] || { echo "error: unknown option '$option': choose from ${!SETS[*]}" >&2; exit 2; }
done

mkdir -p "$WORK"
tables=("$BASELINE/runs")
for option in $OPTIONS; do
  echo "== $option: ${SETS[$option]}"
  # shellcheck disable=SC2086  # the option's overrides are words
  bash bench/hard_benchmark.sh "$WORK/$option" "$@" ${SETS[$option]} > "$WORK/$option.txt"
  tables+=("$option=$WORK/$option/runs")
done
.venv/bin/python bench/hard_table.py "${tables[@]}"
for option in $OPTIONS; do
  .venv/bin/python bench/contrast_check.py --data-root "$DATA" "$WORK/$option"/runs/*-pouta-seed*/
done
