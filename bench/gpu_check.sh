#!/usr/bin/env bash
# For sessions lent a GPU: the test suite on CUDA, the model benchmark on CUDA, and the
# training step on CUDA with each synthesis path (batched on the GPU, per-sample in 15 loader
# workers) and the speed options (channels_last, bf16 autocast, torch.compile).
# Usage: bash bench/gpu_check.sh   (from the repository root; creates .venv if missing)
set -uo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
status=0
POUTA_TEST_DEVICE=cuda .venv/bin/python -m pytest -q -x || status=$?
.venv/bin/pouta bench model --preset paper --image-size 224 --device cuda --runs 50 || status=$?
.venv/bin/pouta bench model --preset paper --image-size 224 --device cuda --runs 50 --json || status=$?
TRAIN=(.venv/bin/pouta bench train --preset paper --image-size 224 --device cuda --steps 20 --json)
# batched first (the speed options are measured with it), then the default per-sample path.
TRAIN+=(--set synthesis=batched)
"${TRAIN[@]}" || status=$?
"${TRAIN[@]}" --set synthesis=per_sample --num-workers 15 || status=$?
"${TRAIN[@]}" --set channels_last=true || status=$?
"${TRAIN[@]}" --set amp_dtype=bfloat16 || status=$?
"${TRAIN[@]}" --set compile=true || status=$?
exit $status
