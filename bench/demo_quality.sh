#!/usr/bin/env bash
# Quality on the offline demo data: `pouta demo-data`, then `pouta train --preset tiny` and
# `pouta evaluate` per category, for pouta and vanilla side by side, on this machine's CPU.
# Target: image AUROC >= 0.90 and pixel AUROC >= 0.90 for POUTA, POUTA >= vanilla, and
# under 10 minutes per category and model.
# Usage: bash bench/demo_quality.sh [WORKDIR] [extra --set overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
WORK=${1:-bench-out/demo-quality}
shift || true
EXTRA=("$@")
POUTA=.venv/bin/pouta
mkdir -p "$WORK"
[ -d "$WORK/data/tiles" ] || $POUTA demo-data --out "$WORK/data" --categories 2
: > "$WORK/results.jsonl"
for category in tiles pills; do
  for variant in pouta vanilla; do
    run="$WORK/runs/$category-$variant"
    rm -rf "$run"
    start=$(date +%s)
    $POUTA train --data-root "$WORK/data" --dataset mvtec --category "$category" --preset tiny \
      --set variant=$variant ${EXTRA[@]+"${EXTRA[@]/#/--set=}"} --out "$run" --device cpu
    seconds=$(( $(date +%s) - start ))
    $POUTA evaluate --checkpoint "$run" --data-root "$WORK/data" --dataset mvtec --category "$category" \
      --device cpu --json \
      | .venv/bin/python -c "import json,sys; m=json.load(sys.stdin); m.update(category='$category', variant='$variant', train_seconds=$seconds); print(json.dumps(m))" \
      >> "$WORK/results.jsonl"
  done
done
.venv/bin/python - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro", "train_seconds"]  # noqa: E501
print(f"{'category':10}{'variant':9}" + "".join(f"{k:>15}" for k in keys))
for r in rows:
    print(f"{r['category']:10}{r['variant']:9}" + "".join(
        f"{r[k]:>15.0f}" if k == "train_seconds" else f"{r[k]:>15.4f}" for k in keys))
ok = True
for cat in sorted({r["category"] for r in rows}):
    p = next(r for r in rows if r["category"] == cat and r["variant"] == "pouta")
    v = next(r for r in rows if r["category"] == cat and r["variant"] == "vanilla")
    checks = {"image_auroc>=0.90": p["image_auroc"] >= 0.90, "pixel_auroc>=0.90": p["pixel_auroc"] >= 0.90,
              "pouta>=vanilla(image)": p["image_auroc"] >= v["image_auroc"],
              "pouta>=vanilla(pixel)": p["pixel_auroc"] >= v["pixel_auroc"],
              "time<=600s": max(p["train_seconds"], v["train_seconds"]) <= 600}
    ok &= all(checks.values())
    print(f"{cat}: " + ", ".join(f"{k} {'ok' if c else 'MISSED'}" for k, c in checks.items()))
print("targets met" if ok else "targets missed")
PY
