"""The two synthesis paths' distributions side by side (issue 33): not one image against its
twin, but what a training run sees over thousands of samples.

For the same good images (a dataset's ``train/good`` or a folder), each path makes N samples;
printed per path: the share of anomalous samples, mask area (mean and quantiles), the change
inside the mask (mean |I_in - I|), how far the anomalous region's mean is from the image's mean
outside it, the high-frequency energy inside the mask (mean |Laplacian|, against the good
image's own), how often each of DRAEM's ten augmentations was drawn; and a two-sample
Kolmogorov-Smirnov p-value per per-sample figure (small: the paths differ in distribution).

Usage: python bench/synthesis_stats.py IMAGES_DIR [--texture-dir DIR] [--image-size 128] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp

from pouta_core.config import Config
from pouta_core.data.datasets import sample_seed
from pouta_core.data.images import list_images, load_image
from pouta_core.synthesis import AnomalySynthesizer, TextureFolder, sources
from pouta_core.synthesis import batched as bmod
from pouta_core.synthesis.batched import BatchSynthesizer, batch_seed

NAMES = ("gamma", "brightness", "sharpness", "saturation_hue", "solarize", "posterize", "invert",
         "autocontrast", "equalize", "rotate")
LAPLACE = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)


def hf(x: torch.Tensor) -> torch.Tensor:
    """|Laplacian| of the grey image, (B, 1, H, W)."""
    return F.conv2d(x.mean(1, keepdim=True), LAPLACE, padding=1).abs()


def summarise(images: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor, counts: Counter) -> dict:
    """The path's figures; ``_per_sample`` holds each anomalous sample's values for the tests."""
    area = masks.flatten(1).mean(1)
    anomalous = area > 0
    m, x, c = masks[anomalous], images[anomalous], clean[anomalous]
    inside = m.sum((1, 2, 3)).clamp_min(1)
    outside = (1 - m).sum((1, 2, 3)).clamp_min(1)
    change = ((x - c).abs().mean(1, keepdim=True) * m).sum((1, 2, 3)) / inside
    mean_in = (x * m).sum((2, 3)) / inside[:, None]
    mean_out = (x * (1 - m)).sum((2, 3)) / outside[:, None]
    hf_in = (hf(x) * m).sum((1, 2, 3)) / inside
    hf_good = (hf(c) * m).sum((1, 2, 3)) / inside
    total = sum(counts.values()) or 1
    q = torch.tensor([0.1, 0.5, 0.9])
    return {
        "samples": len(images),
        "anomalous_share": round(float(anomalous.float().mean()), 4),
        "mask_area_mean": round(float(area[anomalous].mean()), 4),
        "mask_area_q10_q50_q90": [round(float(v), 4) for v in area[anomalous].quantile(q)],
        "change_in_mask_mean": round(float(change.mean()), 4),
        "change_in_mask_q10_q50_q90": [round(float(v), 4) for v in change.quantile(q)],
        "mean_in_vs_out": round(float((mean_in - mean_out).abs().mean()), 4),
        "hf_in_mask": round(float(hf_in.mean()), 4),
        "hf_good_same_pixels": round(float(hf_good.mean()), 4),
        "augmentation_share": {NAMES[i]: round(counts[i] / total, 4) for i in range(len(NAMES))},
        "_per_sample": {"mask_area": area[anomalous], "change_in_mask": change,
                        "mean_in_vs_out": (mean_in - mean_out).abs().mean(1), "hf_in_mask": hf_in},
    }


def per_sample(config: Config, images: torch.Tensor, textures, n: int) -> dict:
    counts: Counter = Counter()
    originals = sources.AUGMENTATIONS

    def counted(i, f):
        def call(x, g):
            counts[i] += 1
            return f(x, g)
        return call

    sources.AUGMENTATIONS = tuple(counted(i, f) for i, f in enumerate(originals))
    try:
        synth = AnomalySynthesizer(config, textures)
        out, clean, masks = [], [], []
        for k in range(n):
            img = images[k % len(images)].float() / 255
            s = synth(img, torch.Generator().manual_seed(sample_seed(config.seed, 1, k)))
            out.append(s.image), clean.append(img), masks.append(s.mask)
    finally:
        sources.AUGMENTATIONS = originals
    return summarise(torch.stack(out), torch.stack(clean), torch.stack(masks), counts)


def batched(config: Config, images: torch.Tensor, textures, n: int, batch_size: int = 8) -> dict:
    counts: Counter = Counter()
    original = bmod.drawn_augmentations

    def counted(keys):
        drawn = original(keys)
        counts.update(dict(enumerate(drawn.sum(0).tolist())))
        return drawn

    bmod.drawn_augmentations = counted
    try:
        synth = BatchSynthesizer(config, textures.bank() if textures is not None else None)
        out, clean, masks = [], [], []
        for step in range(n // batch_size):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(images)
            c = images[rows].float() / 255
            b = synth(c, torch.Generator().manual_seed(batch_seed(config.seed, 1, 0, step)))
            out.append(b.image), clean.append(c), masks.append(b.mask)
    finally:
        bmod.drawn_augmentations = original
    return summarise(torch.cat(out), torch.cat(clean), torch.cat(masks), counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", type=Path)
    p.add_argument("--texture-dir", type=Path)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    config = Config.from_preset("tiny", [f"image_size={args.image_size}", *args.set])
    paths = list_images(args.images, recursive=True)
    images = torch.stack([load_image(q, args.image_size) for q in paths])
    textures = TextureFolder(args.texture_dir, args.image_size) if args.texture_dir else None
    torch.set_num_threads(1)
    result = {"per_sample": per_sample(config, images, textures, args.n),
              "batched": batched(config, images, textures, args.n)}
    a, b = (result[k].pop("_per_sample") for k in ("per_sample", "batched"))
    # Two-sample Kolmogorov-Smirnov: could both paths' values come from one distribution?
    result["ks_test_p_value"] = {k: round(float(ks_2samp(a[k].numpy(), b[k].numpy()).pvalue), 4) for k in a}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
