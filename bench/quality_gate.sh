#!/usr/bin/env bash
# The quality gate for defaults (issue 33): a proposed change to synthesis, losses, model or
# training defaults against the current defaults, side by side, on the real-photograph
# benchmark (`pouta demo-data --difficulty photo`: grass, gravel, brick) and the hard benchmark
# (`--difficulty hard`: wood, concrete, fabric, board), each arm once per seed at the `tiny`
# preset shortened to EPOCHS epochs; then a verdict by the rule written in bench/quality_gate.py
# (validation decides; test is only reported). Any change to a default states its verdict in
# docs/experiments.md. With the defaults below, 42 trainings of about 2 minutes, two at a time: about
# 50 minutes on a 2-core machine (at EPOCHS=50, as on 2026-12-01: 4 minutes each, 85 minutes).
#
# Usage: [SEEDS="0 1 2"] [EPOCHS=30] [JOBS=2] [CATEGORIES="grass gravel brick wood concrete fabric board"]
#        [BASE="key=value ..."] [TEXTURES=DIR] [DATA=bench-out/gate-data] bash bench/quality_gate.sh WORKDIR key=value [key=value ...]
# The proposal is the key=value overrides after WORKDIR (e.g. synthesis=batched); BASE, if set,
# pins the baseline arm's values (e.g. to gate a change that is already the default). The data is
# generated once into DATA with fixed seeds and shared by every gate run. TEXTURES: a texture
# folder as the anomaly source (--texture-dir) for every run; without it, the default source.
# SKIP_INSTALL=1 uses .venv as it is: to gate another commit, run this script from a git worktree
# of it with .venv linked to this one and PYTHONPATH set to the worktree.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || make install >/dev/null
if [ $# -lt 2 ]; then
  echo "usage: bash bench/quality_gate.sh WORKDIR key=value [key=value ...]" >&2
  exit 2
fi
WORK=$1
shift
PROPOSED="$*"
SEEDS=${SEEDS:-0 1 2}
EPOCHS=${EPOCHS:-30}
JOBS=${JOBS:-2}
CATEGORIES=${CATEGORIES:-grass gravel brick wood concrete fabric board}
BASE=${BASE:-}
DATA=${DATA:-bench-out/gate-data}
TEXTURES=${TEXTURES:-}
POUTA=.venv/bin/pouta
mkdir -p "$WORK/runs"
# 48 good test images and 16 per defect type: about 38 validation images per category.
[ -d "$DATA/photo/grass" ] || $POUTA demo-data --difficulty photo --categories 3 --test-good 48 --test-defect 16 \
  --out "$DATA/photo"
[ -d "$DATA/hard/wood" ] || $POUTA demo-data --difficulty hard --categories 4 --test-good 48 --test-defect 16 \
  --out "$DATA/hard"
printf '{"proposed": "%s", "base": "%s", "epochs": %s, "seeds": "%s", "textures": "%s"}\n' "$PROPOSED" "$BASE" \
  "$EPOCHS" "$SEEDS" "$TEXTURES" \
  > "$WORK/gate.json"

one() {   # category arm seed
  local root="$DATA/hard"
  case $1 in grass|gravel|brick) root="$DATA/photo" ;; esac
  local run="$WORK/runs/$1-$2-seed$3"
  [ -f "$run/row.json" ] && return 0   # a rerun finishes an interrupted gate
  rm -rf "$run"
  local sets=(--set epochs="$EPOCHS" --set eval_every="$EPOCHS" --set "lr_milestones=[$(( EPOCHS * 8 / 10 )),$(( EPOCHS * 9 / 10 ))]" --set seed="$3")
  for kv in $BASE; do sets+=(--set "$kv"); done
  [ -z "$TEXTURES" ] || sets+=(--texture-dir "$TEXTURES")
  if [ "$2" = proposed ]; then for kv in $PROPOSED; do sets+=(--set "$kv"); done; fi
  local start
  start=$(date +%s)
  OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 )) $POUTA train --data-root "$root" \
    --dataset mvtec --category "$1" --preset tiny "${sets[@]}" --out "$run" --device cpu > "$run.log" 2>&1
  local seconds=$(( $(date +%s) - start ))
  for split in val test; do
    OMP_NUM_THREADS=1 $POUTA evaluate --checkpoint "$run" --data-root "$root" --dataset mvtec --category "$1" \
      --device cpu --json --split $split --by-defect > "$run/eval-$split.json"
  done
  echo "{\"category\": \"$1\", \"arm\": \"$2\", \"seed\": $3, \"train_seconds\": $seconds}" > "$run/row.json"
  echo "done $1 $2 seed $3 (${seconds} s)"
}
export -f one
export WORK DATA POUTA JOBS EPOCHS BASE PROPOSED TEXTURES
for s in $SEEDS; do for c in $CATEGORIES; do for a in default proposed; do echo "$c $a $s"; done; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1" "$2"'

.venv/bin/python bench/hard_table.py "$WORK/runs" > "$WORK/families.txt"   # labelled by arm (the run names)
.venv/bin/python bench/quality_gate.py "$WORK"
