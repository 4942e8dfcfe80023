import os

import pytest
import torch


def pytest_collection_modifyitems(items):
    """Tests that take ``device`` are marked ``device``: ``pytest -m device`` is the suite's part
    that runs on CUDA (bench/gpu_check.sh, with POUTA_TEST_DEVICE=cuda)."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cpu here; bench/gpu_check.sh sets POUTA_TEST_DEVICE=cuda on a GPU machine."""
    name = os.environ.get("POUTA_TEST_DEVICE", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("POUTA_TEST_DEVICE=cuda but CUDA is not available")
    return torch.device(name)


# The smallest POUTA that trains, shared by every test that trains one: 32 px, widths of 4,
# two epochs, each evaluated and checkpointed, no LR steps, batches of 4.
SMALL_VALUES = {"image_size": 32, "rec_width": 4, "fcm_width": 4, "disc_width": 4, "epochs": 2, "eval_every": 1,
                "checkpoint_every": 1, "lr_milestones": "[]", "batch_size": 4}


@pytest.fixture(scope="module")
def local_ray():
    """An in-process Ray of one CPU for the tests of a module that drive Tune or Ray directly."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_overrides(**changes) -> list[str]:
    """``SMALL_VALUES`` with ``changes`` as ``key=value`` strings (a value of None drops the key)."""
    values = {**SMALL_VALUES, **changes}
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def small_args(**changes) -> list[str]:
    """The tiny preset and :func:`small_overrides` as ``pouta`` arguments."""
    return ["--preset", "tiny", *(arg for kv in small_overrides(**changes) for arg in ("--set", kv))]


def small_config(**changes):
    """The same model as a :class:`~pouta_core.config.Config`, for tests that call pouta_core."""
    from pouta_core.config import Config

    return Config.from_preset("tiny", small_overrides(**changes))
