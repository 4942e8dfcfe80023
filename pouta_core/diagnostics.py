"""Does a trained detector read the difference between input and reconstruction, or the input alone?

POUTA's premise (paper §3.2) is that its discriminator finds anomalies by contrasting the
encoder features F_Ei (the input) with the decoder features F_Di (the reconstruction).
``contrast_maps`` recomputes a model's anomaly map with the reconstruction side replaced, and,
for the POUTA variants with MSS, with each head alone and with the mean of the map and heads:

    pouta / pouta-*   map            the model's anomaly map (what `pouta evaluate` scores)
                      head_i         softmax of MSS head i (stride 2^(i-1)), logits upsampled
                      mean_heads     mean of the map and the heads
                      D_other        every F_Di taken from the next image of the batch
                      D_is_E         F_Di := F_Ei (no contrast left: the input side twice)
                      E_is_D         F_Ei := F_Di (no contrast left: the reconstruction side twice)
    vanilla           map
                      rec_other      the reconstruction of the next image of the batch
                      rec_is_input   reconstruction := input
                      input_is_rec   input := reconstruction

A detector that reads the contrast loses pixel AUROC with either swap of the last two rows (no
contrast is left in either); one that finds anomalies from the input alone barely moves with
the first (``D_is_E``) and falls with the second; one that reads the reconstruction alone the
other way round. ``bench/contrast_check.py`` prints the pixel AUROC of every map for trained
checkpoints (docs/experiments.md has the figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pouta_core import checkpoint as ckpt
from pouta_core.api import load_category
from pouta_core.config import ConfigError
from pouta_core.metrics import auroc
from pouta_core.model import AnomalyDetector, anomaly_map


def _prob(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The anomaly map (B, H, W) of 2-class logits, upsampled first as the MSS loss does."""
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return anomaly_map(logits)[:, 0]


@torch.inference_mode()
def contrast_maps(model: AnomalyDetector, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Anomaly maps (B, H, W) in [0, 1] of one batch, one per row of the module docstring.

    ``model`` in eval mode; x (B, 3, H, W) in [0, 1]. "The next image" wraps around the batch,
    so with B = 1 the ``*_other`` maps equal ``map``."""
    size = x.shape[-2:]
    rec, enc, dec = model.reconstructive(x)
    other = torch.roll(torch.arange(len(x)), 1)
    disc = model.discriminative
    if not model.spec.features:
        run = lambda inp, r: _prob(disc(torch.cat([inp, r], dim=1)), size)  # noqa: E731
        return {"map": run(x, rec), "rec_other": run(x, rec[other]), "rec_is_input": run(x, x),
                "input_is_rec": run(rec, rec)}
    logits, heads = disc(enc, dec)
    out = {"map": _prob(logits, size)}
    for i, h in enumerate(heads, start=1):
        out[f"head_{i}"] = _prob(h, size)
    if heads:
        out["mean_heads"] = torch.stack([out[k] for k in list(out)]).mean(dim=0)
    out["D_other"] = _prob(disc(enc, [d[other] for d in dec])[0], size)
    out["D_is_E"] = _prob(disc(enc, enc)[0], size)
    out["E_is_D"] = _prob(disc(dec, dec)[0], size)
    return out


def contrast_check(run: str | Path, data_root: str | Path, dataset: str | None = None,
                   batch_size: int = 16) -> dict[str, str | float]:
    """Pixel AUROC of every map of ``contrast_maps`` on the test split of the category the
    checkpoint in ``run`` was trained on. -> {"category", "variant", "map", ...}."""
    model, config, state = ckpt.load_model(run)
    category = state.get("category")
    if category is None:
        raise ConfigError(f"{run}: checkpoint does not name its category (not written by `pouta train`)")
    data = load_category(data_root, dataset or state.get("dataset", "mvtec"), category, config, progress=False,
                         bit_depth=ckpt.bit_depth(state))
    if data.test_set is None:
        raise ConfigError(f"{data_root}: category '{category}' has no labelled test images")
    images, masks = data.test_set.images, data.test_set.masks
    maps: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 255.0
        for k, v in contrast_maps(model, x).items():
            maps.setdefault(k, []).append(v.numpy().ravel())
    truth = masks.numpy().ravel() > 0
    return {"category": category, "variant": config.variant,
            **{k: auroc(np.concatenate(v), truth) for k, v in maps.items()}}
