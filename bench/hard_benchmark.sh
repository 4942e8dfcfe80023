#!/usr/bin/env bash
# The hard benchmark (`pouta demo-data --difficulty hard`): train each model variant at the
# `tiny` preset on each category, once per seed, then score validation (what any choice reads)
# and test (reported) overall and per defect family (`pouta evaluate --by-defect`).
# Calibration target (issue 18): vanilla well below saturation, pixel AUROC < 0.95 and pixel
# AP < 0.6, checked on validation (a calibration is a choice; test is only reported). Runs
# JOBS trainings at once.
# Usage: [SEEDS="0 1 2"] [VARIANTS="vanilla pouta"] [CATEGORIES="wood concrete fabric board"]
#        [JOBS=2] [DATA=WORKDIR/data] bash bench/hard_benchmark.sh [WORKDIR] [extra --set overrides...]
# DATA: where the benchmark's data is, generated there if missing (a fixed seed: the same
# images wherever it is made), so that several work folders (bench/hard_ablation.sh) share it.
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
WORK=${1:-bench-out/hard}
shift || true
EXTRA=("$@")
SEEDS=${SEEDS:-0}
VARIANTS=${VARIANTS:-vanilla pouta}
CATEGORIES=${CATEGORIES:-wood concrete fabric board}
JOBS=${JOBS:-2}
POUTA=.venv/bin/pouta
DATA=${DATA:-$WORK/data}
mkdir -p "$WORK"
# 48 good test images and 16 per defect type: about 14 good and 24 defective validation images
# per category (val_ratio 0.3), so that image-level figures are not decided by 4 good images.
[ -d "$DATA/wood" ] || $POUTA demo-data --difficulty hard --categories 4 --test-good 48 --test-defect 16 \
  --out "$DATA"

one() {   # category variant seed
  local run="$WORK/runs/$1-$2-seed$3"
  rm -rf "$run"
  local start extra=()
  start=$(date +%s)
  for kv in $EXTRA_STR; do extra+=(--set "$kv"); done
  OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 )) $POUTA train --data-root "$DATA" \
    --dataset mvtec --category "$1" --preset tiny --set variant="$2" --set seed="$3" \
    ${extra[@]+"${extra[@]}"} --out "$run" --device cpu > "$run.log" 2>&1
  local seconds=$(( $(date +%s) - start ))
  for split in val test; do
    $POUTA evaluate --checkpoint "$run" --data-root "$DATA" --dataset mvtec --category "$1" \
      --device cpu --json --split $split --by-defect > "$run/eval-$split.json"
  done
  echo "{\"category\": \"$1\", \"variant\": \"$2\", \"seed\": $3, \"train_seconds\": $seconds}" > "$run/row.json"
}
export -f one
export WORK DATA POUTA JOBS
export EXTRA_STR="${EXTRA[*]-}"
mkdir -p "$WORK/runs"
for c in $CATEGORIES; do for v in $VARIANTS; do for s in $SEEDS; do echo "$c $v $s"; done; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1" "$2"'

.venv/bin/python - "$WORK/runs" <<'PY'
import json, sys
from pathlib import Path
from statistics import mean, pstdev
runs = sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "row.json").exists())
rows = []
for run in runs:
    row = json.loads((run / "row.json").read_text())
    for split in ("val", "test"):
        ev = json.loads((run / f"eval-{split}.json").read_text())
        row[split] = {"all": ev["all"], **ev["by_defect"]}
    rows.append(row)
keys = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")
print("mean (spread over seeds) per category, variant and defect family; val decides, test is reported")
print(f"{'category':9} {'variant':8} {'family':10} " + " ".join(f"{s + '_' + k:>22}" for s in ("val", "test") for k in keys))
groups = {}
for r in rows:
    groups.setdefault((r["category"], r["variant"]), []).append(r)
for (cat, var), rs in sorted(groups.items()):
    for family in rs[0]["test"]:
        cells = []
        for split in ("val", "test"):
            for k in keys:
                vals = [r[split][family][k] for r in rs if family in r[split]]
                cells.append(f"{mean(vals):.4f}+-{pstdev(vals):.4f}" if vals else "-")
        print(f"{cat:9} {var:8} {family:10} " + " ".join(f"{c:>22}" for c in cells))
van = [r for r in rows if r["variant"] == "vanilla"]
if van:
    auroc = mean(r["val"]["all"]["pixel_auroc"] for r in van)
    ap = mean(r["val"]["all"]["pixel_ap"] for r in van)
    print(f"vanilla over all categories (validation): pixel AUROC {auroc:.4f} (target < 0.95), pixel AP {ap:.4f} "
          f"(target < 0.6): {'below saturation' if auroc < 0.95 and ap < 0.6 else 'SATURATED'}")
PY
