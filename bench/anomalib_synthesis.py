"""anomalib's PerlinAnomalyGenerator, timed the way `pouta bench synthesis` times POUTA's
synthesis: one intra-op thread, random images, half of them left clean (its default
``probability=0.5``, POUTA's ``clean_ratio=0.5``), one untimed warm-up batch. Prints one
JSON line. Runs in the bench-only environment that `make bench-anomalib-env` creates
(.venv-anomalib): anomalib is never a dependency of POUTA."""

import argparse
import json
import time

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--texture-dir", help="anomaly source images (anomalib reads one from disk per anomaly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probability", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    generator = PerlinAnomalyGenerator(anomaly_source_path=args.texture_dir, probability=args.probability)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    generator(images)   # warm-up
    batches = max(1, args.samples // args.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        generator(images)
    seconds = time.perf_counter() - start
    import anomalib

    print(json.dumps({"anomalib": anomalib.__version__, "images_per_s": batches * args.batch_size / seconds}))


if __name__ == "__main__":
    main()
