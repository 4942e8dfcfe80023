#!/usr/bin/env bash
# The one script for a session lent a GPU (issue 29), about 10 minutes, one JSON line per figure:
#   1. the suite's device tests on CUDA (pytest -m device: model, synthesis, training steps with
#      the fused Adam's on-device skip of non-finite steps);
#   2. bench model on CUDA (paper Table 5: POUTA's latency ratio to vanilla, target <= 0.62);
#   3. bench train on CUDA: batched synthesis with bf16 / fp16 / channels_last / compile, and the
#      per-sample default with 15 loader workers; samples/s, the share waiting for input, and the
#      GPU's utilisation sampled by nvidia-smi while it runs;
#   4. a paper-preset training on generated data, bounded to about 2 minutes: epochs reached,
#      seconds, validation and test metrics, non-finite steps.
# Usage: bash bench/gpu_check.sh   (from the repository root; creates .venv if missing)
set -uo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
PY=.venv/bin/python
POUTA=.venv/bin/pouta
OUT=${GPU_CHECK_OUT:-bench-out/gpu}
mkdir -p "$OUT"
$PY -c "import json, torch; assert torch.cuda.is_available(), 'no CUDA device'; print(json.dumps({'check': 'device', 'name': torch.cuda.get_device_name(0), 'bf16': torch.cuda.is_bf16_supported(), 'torch': torch.__version__}))" || exit 1
status=0

# 1. The device tests.
POUTA_TEST_DEVICE=cuda timeout 240 $PY -m pytest -q -m device -p no:cacheprovider || status=$?

# 2. The model benchmark.
timeout 120 $POUTA bench model --preset paper --image-size 224 --device cuda --runs 50 --json || status=$?

# 3. Training throughput, with the GPU's utilisation while each runs.
with_utilisation() {   # run "$@"; then one JSON line: the mean utilisation nvidia-smi saw
  local log="$OUT/util.$$" sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 -i 0 >"$log" 2>/dev/null &
    sampler=$!
  fi
  "$@"; local rc=$?
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    awk -v what="$*" 'BEGIN{n=0;s=0} /^[0-9]+/{n++; s+=$1} END{printf "{\"check\": \"gpu_utilisation\", \"of\": \"%s\", \"mean_pct\": %.1f, \"samples\": %d}\n", what, (n ? s/n : -1), n}' "$log"
    rm -f "$log"
  fi
  return $rc
}
TRAIN=($POUTA bench train --preset paper --image-size 224 --device cuda --steps 20 --json --set synthesis=batched)
for extra in "amp_dtype=bfloat16" "amp_dtype=float16" "channels_last=true" "compile=true"; do
  with_utilisation timeout 150 "${TRAIN[@]}" --set "$extra" || status=$?
done
with_utilisation timeout 150 "${TRAIN[@]}" --set synthesis=per_sample --num-workers 15 || status=$?

# 4. About two minutes of paper-preset training on generated data (the bound stops it; the run
#    folder then holds its last checkpoint, which is what is reported).
$POUTA demo-data --out "$OUT/data" --categories 1 --image-size 256 --force >/dev/null || status=$?
rm -rf "$OUT/train"
start=$(date +%s)
timeout 150 $POUTA train --data-root "$OUT/data" --dataset mvtec --category tiles --device cuda --preset paper \
  --set epochs=100 --set eval_every=20 --set checkpoint_every=20 --set 'lr_milestones=[80,90]' \
  --out "$OUT/train" >"$OUT/train.log" 2>&1
rc=$?
$PY - "$OUT/train" "$rc" "$(( $(date +%s) - start ))" <<'PY' || status=$?
import json, sys
from pathlib import Path
folder, rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
found = folder / "metrics.json"
metrics = json.loads(found.read_text()) if found.is_file() else {}
shown = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_", "loss_total", "nonfinite"))}
print(json.dumps({"check": "paper_training", "exit": rc, "stopped_by_bound": rc == 124, "seconds": seconds,
                  "epoch": metrics.get("epoch"), **shown}))
sys.exit(0 if rc in (0, 124) and metrics else 1)
PY
exit $status
