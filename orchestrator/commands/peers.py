"""Peers timed side by side with POUTA, each in its own environment, never a dependency.

anomalib's ``PerlinAnomalyGenerator`` runs in ``.venv-anomalib`` (``make bench-anomalib-env``)
through ``bench/anomalib_synthesis.py``, which prints one JSON line; the figures are taken
in turns with POUTA's own (:func:`pouta_core.benchmark.bench_synthesis`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from pouta_core.config import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "anomalib_synthesis.py"
TIMEOUT_S = 600


def anomalib_rate(python: str, *, image_size: int, samples: int, batch_size: int, texture_dir: str | None,
                  clean_ratio: float) -> Callable[[], float]:
    """A function that times anomalib's generator once (images/s on one thread) with the same
    settings as POUTA's run: its ``probability`` of an anomaly is ``1 - clean_ratio``.
    Checked now, so a missing environment fails before anything is timed."""
    if not Path(python).is_file():
        raise ConfigError(f"{python}: no anomalib environment; create it with `make bench-anomalib-env`")
    if not SCRIPT.is_file():
        raise ConfigError(f"{SCRIPT}: missing (run from a checkout of the repository)")
    argv = [python, str(SCRIPT), "--image-size", str(image_size), "--samples", str(samples),
            "--batch-size", str(batch_size), "--probability", str(1 - clean_ratio)]
    if texture_dir:
        argv += ["--texture-dir", str(Path(texture_dir).resolve())]
    # One intra-op thread there too: figures per core on both sides.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run() -> float:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"anomalib's bench did not finish in {TIMEOUT_S} s") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"anomalib's bench failed ({python}): {tail}")
        return float(json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"])

    return run
