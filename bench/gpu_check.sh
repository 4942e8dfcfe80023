#!/usr/bin/env bash
# For sessions lent a GPU: the test suite on CUDA, then the model benchmark on CUDA.
# Usage: bash bench/gpu_check.sh   (from the repository root; creates .venv if missing)
set -uo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
status=0
POUTA_TEST_DEVICE=cuda .venv/bin/python -m pytest -q -x || status=$?
.venv/bin/pouta bench model --preset paper --image-size 224 --device cuda --runs 50 || status=$?
.venv/bin/pouta bench model --preset paper --image-size 224 --device cuda --runs 50 --json || status=$?
exit $status
