"""Does a trained detector read the difference between input and reconstruction, or the input alone?

POUTA's premise (paper §3.2) is that its discriminator finds anomalies by contrasting the
encoder features F_Ei (the input) with the decoder features F_Di (the reconstruction). This
script measures how much a trained checkpoint relies on that: it recomputes the pixel AUROC
on the test split with the reconstruction side replaced, and, for the POUTA variants, with
each MSS head alone and with the mean of the fused map and the heads.

    pouta / pouta-*   map            the model's anomaly map (what `pouta evaluate` scores)
                      head_i         softmax of MSS head i (stride 2^(i-1)), upsampled
                      mean_heads     mean of the map and the four heads
                      D_other        every F_Di taken from the next image of the batch
                      D_is_E         F_Di := F_Ei (no contrast left at all)
    vanilla           map
                      rec_other      the reconstruction of the next image of the batch
                      rec_is_input   reconstruction := input

A detector that reads the contrast drops when its reconstruction side is swapped; one that
finds anomalies from the input alone barely moves. Rows are pixel AUROC.

Usage: .venv/bin/python bench/contrast_check.py --data-root D [--dataset mvtec] RUN_DIR...
(each RUN_DIR written by `pouta train`; its category is read from the checkpoint).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from pouta_core import checkpoint as ckpt
from pouta_core.api import load_category
from pouta_core.metrics import auroc


def _prob(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1)[:, 1]


@torch.inference_mode()
def variants(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Anomaly maps (B, H, W) of one batch, one per row of the module docstring."""
    size = x.shape[-2:]
    rec, enc, dec = model.reconstructive(x)
    other = torch.roll(torch.arange(len(x)), 1)
    disc = model.discriminative
    if model.variant == "vanilla":
        run = lambda r: _prob(disc(torch.cat([x, r], dim=1)), size)  # noqa: E731
        return {"map": run(rec), "rec_other": run(rec[other]), "rec_is_input": run(x)}
    logits, heads = disc(enc, dec)
    out = {"map": _prob(logits, size)}
    for i, h in enumerate(heads, start=1):
        out[f"head_{i}"] = _prob(h, size)
    if heads:
        out["mean_heads"] = torch.stack([out["map"], *(out[f"head_{i}"] for i in range(1, len(heads) + 1))]).mean(0)
    out["D_other"] = _prob(disc(enc, [d[other] for d in dec])[0], size)
    out["D_is_E"] = _prob(disc(enc, enc)[0], size)
    return out


def check(run: str, data_root: str, dataset: str | None, batch_size: int = 16) -> dict[str, float]:
    model, config, state = ckpt.load_model(run)
    category = state.get("category")
    if category is None:
        raise SystemExit(f"{run}: checkpoint does not name its category (not written by `pouta train`)")
    data = load_category(data_root, dataset or state.get("dataset", "mvtec"), category, config.image_size,
                         progress=False)
    images, masks = data.test_set.images, data.test_set.masks
    maps: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 255.0
        for k, v in variants(model, x).items():
            maps.setdefault(k, []).append(v.numpy().ravel())
    truth = masks.numpy().ravel() > 0
    return {"category": category, "variant": config.variant,
            **{k: auroc(np.concatenate(v), truth) for k, v in maps.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    for run in args.runs:
        r = check(run, args.data_root, args.dataset)
        cols = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
        print(f"{run}: {r['category']} {r['variant']}  {cols}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
