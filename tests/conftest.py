import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cpu here; bench/gpu_check.sh sets POUTA_TEST_DEVICE=cuda on a GPU machine."""
    name = os.environ.get("POUTA_TEST_DEVICE", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("POUTA_TEST_DEVICE=cuda but CUDA is not available")
    return torch.device(name)
