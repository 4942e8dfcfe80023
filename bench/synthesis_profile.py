"""One measurement of the batched synthesis of whichever checkout is first on ``sys.path``
(``PYTHONPATH=<checkout>``): top-level aten ops per batch (``torch.profiler``; an op called
by another op is its caller's), ops that read a tensor back on the host, and images per second
on one core. ``bench/synthesis_profile.sh`` runs it for an older checkout and this one in
turns. Prints one JSON line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from pouta_core.config import Config
from pouta_core.synthesis.batched import BatchSynthesizer

# The op counter of this checkout (the measured one may be older and lack it), by path.
_spec = importlib.util.spec_from_file_location(
    "_pouta_benchmark", Path(__file__).resolve().parents[1] / "pouta_core" / "benchmark.py")
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clean-ratio", type=float, default=0.0)
    p.add_argument("--batches", type=int, default=8, help="timed batches")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_preset("paper", [f"image_size={a.image_size}", f"clean_ratio={a.clean_ratio}"])
    synth = BatchSynthesizer(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(a.batch_size, 3, a.image_size, a.image_size, generator=g)
    for _ in range(3):
        synth(images, g)
    counts = _benchmark.top_level_ops(lambda: synth(images, g))
    start = time.perf_counter()
    for _ in range(a.batches):
        synth(images, g)
    rate = a.batches * a.batch_size / (time.perf_counter() - start)
    syncs = _benchmark.SYNC_OPS
    out = {"image_size": a.image_size, "batch_size": a.batch_size, "clean_ratio": a.clean_ratio,
           "ops_per_batch": sum(counts.values()), "syncs_per_batch": sum(v for k, v in counts.items() if k in syncs),
           "images_per_s_per_core": round(rate, 2)}
    if hasattr(synth, "draw"):   # since issue 29: the host's draws apart from the device's work
        split = _benchmark.synthesis_ops(cfg, batch_sizes=(a.batch_size,))[f"batch_{a.batch_size}"]
        out["device_ops"], out["device_syncs"] = split["device_ops"], split["device_syncs"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
