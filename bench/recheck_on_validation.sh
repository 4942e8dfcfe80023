#!/usr/bin/env bash
# Re-check, on the validation split, two defaults that were chosen by looking at the demo's
# test split: the tiny preset's schedule (200 epochs, LR decays at 160/180, vs the earlier
# 100 epochs at 80/90) and pills' foreground_threshold=0.3 (vs none). POUTA, `pouta train`
# per setting and seed; prints validation metrics (what decides) beside test (reported only).
# Usage: [SEEDS="0"] [JOBS=2] bash bench/recheck_on_validation.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
WORK=${1:-bench-out/recheck}
SEEDS=${SEEDS:-0}
JOBS=${JOBS:-2}
POUTA=.venv/bin/pouta
mkdir -p "$WORK/runs"
[ -d "$WORK/data/tiles" ] || $POUTA demo-data --out "$WORK/data" --categories 2
# name|category|overrides
SETTINGS=(
  "tiles-200|tiles|"
  "tiles-100|tiles|--set=epochs=100 --set=lr_milestones=[80,90]"
  "pills-200-fg0.3|pills|--set=foreground_threshold=0.3"
  "pills-100-fg0.3|pills|--set=foreground_threshold=0.3 --set=epochs=100 --set=lr_milestones=[80,90]"
  "pills-200-nofg|pills|"
)
for seed in $SEEDS; do
  for s in "${SETTINGS[@]}"; do
    IFS='|' read -r name category overrides <<< "$s"
    echo "$POUTA train --data-root $WORK/data --dataset mvtec --category $category --preset tiny --set seed=$seed $overrides --out $WORK/runs/$name-seed$seed --device cpu --set variant=pouta"
  done
done | xargs -P "$JOBS" -I{} bash -c "OMP_NUM_THREADS=1 {} > /dev/null 2>&1 || echo 'failed: {}'"
.venv/bin/python - "$WORK/runs" <<'PY'
import json, sys
from pathlib import Path
keys = ["val_image_auroc", "val_pixel_auroc", "val_pixel_ap", "test_image_auroc", "test_pixel_auroc", "test_pixel_ap"]
print(f"{'run':26}" + "".join(f"{k:>17}" for k in keys))
for run in sorted(Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "metrics.json").read_text())
    print(f"{run.name:26}" + "".join(f"{m[k]:>17.4f}" for k in keys))
PY
