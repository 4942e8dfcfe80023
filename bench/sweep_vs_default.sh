#!/usr/bin/env bash
# Issue 30's evidence: does a sweep's winner beat the default, and what should the confirmation
# round's defaults be? `mss_lambdas` and `focal` sweeps of SAMPLES trials per category at the
# `tiny` preset (EPOCHS epochs, no ASHA: every trial trains to its end), on the demo data
# (tiles, pills) and the hard benchmark (board, wood), each with the default confirmation
# round widened to 3 finalists x 2 fresh seeds, so that bench/sweep_vs_default.py can replay
# smaller rounds (finalists 0-3, seeds 0-2) on the same trials. Validation decides; test is
# reported. Usage: [SAMPLES=8] [EPOCHS=30] [SPACES="mss_lambdas focal"] [SETS="demo hard"]
#                  bash bench/sweep_vs_default.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_INSTALL:-}" ] || make install >/dev/null
WORK=${1:-bench-out/vs-default}
SAMPLES=${SAMPLES:-8}
EPOCHS=${EPOCHS:-30}
SPACES=${SPACES:-mss_lambdas focal}
SETS=${SETS:-demo hard}
POUTA=.venv/bin/pouta
mkdir -p "$WORK"
[ -d "$WORK/demo/tiles" ] || $POUTA demo-data --out "$WORK/demo" --categories 2
# The hard benchmark's data as bench/hard_benchmark.sh makes it (a fixed seed: the same images).
[ -d "$WORK/hard/board" ] || $POUTA demo-data --difficulty hard --categories 4 --test-good 48 --test-defect 16 \
  --out "$WORK/hard"
milestones="[$(( EPOCHS * 8 / 10 )),$(( EPOCHS * 9 / 10 ))]"
for set in $SETS; do
  case $set in demo) categories=tiles,pills; extra=(--category-set pills:foreground_threshold=0.3);;
               hard) categories=board,wood; extra=();; esac
  for space in $SPACES; do
    name="$set-$space"
    [ -f "$WORK/ray/$name-report/trials.csv" ] && continue
    $POUTA sweep --space "$space" --data-root "$WORK/$set" --dataset mvtec --categories "$categories" \
      --num-samples "$SAMPLES" --scheduler none --max-concurrent 2 --finalists 3 --confirm-seeds 2 \
      --preset tiny --set epochs="$EPOCHS" --set "lr_milestones=$milestones" --set eval_every="$EPOCHS" \
      "${extra[@]}" --storage-path "$WORK/ray" --tracking-uri "sqlite:///$(realpath "$WORK")/mlflow.db" \
      --experiment vs-default --name "$name" --resume > "$WORK/$name.log" 2>&1 || echo "$name: exit $?"
  done
done
.venv/bin/python bench/sweep_vs_default.py "$WORK/ray"
