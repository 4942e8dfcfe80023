"""The synthetic abnormal image I_in (paper §3.1):

    I_in = I_ori * (1 - M) + (beta * I_ori + (1 - beta) * I_aug) * M

Everything is float in [0, 1], the range the model sees at test time; nothing here
normalises, so the synthetic anomalies and the real images can never disagree on range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pouta_core.config import Config
from pouta_core.synthesis.perlin import perlin_mask
from pouta_core.synthesis.sources import TextureFolder, anomaly_source


@dataclass(frozen=True)
class Synthesized:
    image: torch.Tensor  # (3, H, W) float in [0, 1]
    mask: torch.Tensor   # (1, H, W) float 0/1
    label: int           # 1 when the mask is not empty


def foreground_mask(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose grey level differs from the median of the 4-pixel border by more than
    ``threshold``: the object, for products photographed on a plain background. (1, H, W)."""
    grey = image.mean(dim=0)
    border = torch.cat([grey[:4].flatten(), grey[-4:].flatten(), grey[:, :4].flatten(), grey[:, -4:].flatten()])
    return ((grey - border.median()).abs() > threshold).float()[None]


class AnomalySynthesizer:
    def __init__(self, config: Config, textures: TextureFolder | None = None) -> None:
        self.config = config
        self.textures = textures

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> Synthesized:
        """image: (3, H, W) float in [0, 1]. Deterministic for a given generator state."""
        cfg = self.config
        if float(torch.rand((), generator=generator)) < cfg.clean_ratio:
            return Synthesized(image, torch.zeros_like(image[:1]), 0)
        h, w = image.shape[-2:]
        mask = perlin_mask(h, w, generator, threshold=cfg.perlin_threshold,
                           max_scale_exp=cfg.perlin_max_scale_exp)
        if cfg.foreground_threshold is not None:
            mask = mask * foreground_mask(image, cfg.foreground_threshold)
        # Drawn only when asked for, so runs without it keep their random stream.
        self_only = cfg.self_source_ratio > 0 and float(torch.rand((), generator=generator)) < cfg.self_source_ratio
        source = anomaly_source(image, generator, self.textures, self_only=self_only)
        beta = float(torch.empty(()).uniform_(cfg.beta_min, cfg.beta_max, generator=generator))
        blended = image * (1 - mask) + (beta * image + (1 - beta) * source) * mask
        label = int(mask.sum() > 0)
        return Synthesized(blended.clamp(0, 1), mask, label)
