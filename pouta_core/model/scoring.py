"""From 2-class logits to the anomaly map and the image score.

The paper (§3.2, after eq. 6) scores an image by the max of a 21x21 average pool of the fused
map. That is the default; the options below (config keys, docs/model.md "Anomaly map and
image score") are ours, and are chosen on validation (docs/experiments.md):

- ``map_heads_weight`` w: the anomaly map is ``(1 - w) * fused + w * mean(MSS heads)``, each
  head's probability map upsampled bilinearly to the input size. The MSS heads are trained
  on the same masks as the fused map (eq. 7) and hold coarse evidence the fusion may not use.
- ``image_score``: ``pooled_max`` (the paper's) or ``topk_mean``, the mean of the
  ``image_score_topk`` largest share of the map's pixels (a defect must cover that share to
  score high; one bright spot does not).
- ``image_score_pool``: the side of the average pool ``pooled_max`` reads (the paper's 21).
- ``score_norm``: ``pixel`` standardises the map the score reads, per pixel, by statistics of
  the category's validation good images, ``(s - mean(x, y)) / (std(x, y) + std_all)``, where
  ``std_all`` is the standard deviation over all their pixels (it keeps the scale finite where
  a handful of images agree by chance), plus 0.001. A spot that is bright on every good image then no
  longer decides the score. The statistics are buffers of :class:`Scorer`, so they are saved
  with the weights and every export computes the same score. The anomaly map itself (pixel
  metrics, overlays) is never normalised: it stays a probability.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCORE_POOL = 21
SCALE_FLOOR = 1e-3


def anomaly_map(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the anomalous class. (B, 2, H, W) -> (B, 1, H, W) in [0, 1]."""
    return torch.softmax(logits, dim=1)[:, 1:2]


def pooled(amap: torch.Tensor, pool: int = SCORE_POOL) -> torch.Tensor:
    """The ``pool`` x ``pool`` average pool (stride 1, same padding; the padding counts as
    zeros, DRAEM's ``count_include_pad``). (B, 1, H, W) -> (B, 1, H, W)."""
    return F.avg_pool2d(amap, kernel_size=pool, stride=1, padding=pool // 2)


def image_score(amap: torch.Tensor, pool: int = SCORE_POOL) -> torch.Tensor:
    """Max of the ``pool`` x ``pool`` average pool, as DRAEM and the paper score images.
    (B, 1, H, W) -> (B,)."""
    return pooled(amap, pool).flatten(1).amax(dim=1)


def topk_mean(smap: torch.Tensor, share: float) -> torch.Tensor:
    """Mean of the largest ``share`` of each map's pixels (at least one). (B, 1, H, W) -> (B,)."""
    flat = smap.flatten(1)
    k = max(1, round(share * int(flat.shape[1])))   # int(): a constant when traced (fixed size)
    return flat.topk(k, dim=1).values.mean(dim=1)


def heads_map(scale_logits: tuple[torch.Tensor, ...], size: tuple[int, int]) -> torch.Tensor:
    """Mean of the MSS heads' anomalous-class probabilities, each upsampled (bilinear) to
    ``size``. -> (B, 1, H, W) in [0, 1]."""
    maps = [F.interpolate(anomaly_map(s), size=size, mode="bilinear", align_corners=False)
            if s.shape[-2:] != size else anomaly_map(s) for s in scale_logits]
    return torch.stack(maps).mean(dim=0)


class Scorer(nn.Module):
    """Logits -> anomaly map -> image score, as the config's scoring keys say.

    Buffers (saved with the weights): ``norm_mean`` and ``norm_scale`` (1, 1, S, S), the
    per-pixel statistics of ``score_norm=pixel``, and ``norm_images``, how many validation
    good images they were computed from (0: none yet; the score is then not normalised).
    """

    def __init__(self, *, image_size: int, heads_weight: float = 0.0, image_score: str = "pooled_max",
                 topk: float = 0.01, norm: str = "none", pool: int = SCORE_POOL) -> None:
        super().__init__()
        self.heads_weight, self.image_score, self.topk, self.norm = heads_weight, image_score, topk, norm
        self.pool = pool
        self.register_buffer("norm_mean", torch.zeros(1, 1, image_size, image_size))
        self.register_buffer("norm_scale", torch.ones(1, 1, image_size, image_size))
        self.register_buffer("norm_images", torch.zeros((), dtype=torch.long))

    @classmethod
    def for_config(cls, config, *, mss: bool) -> Scorer:
        """The reading ``config``'s scoring keys say (``Config.SCORING_KEYS``); the heads'
        weight only where the model has MSS heads (``mss``)."""
        scorer = cls(image_size=config.image_size)
        scorer.read_as(config, mss=mss)
        return scorer

    def read_as(self, config, *, mss: bool) -> None:
        """Read as ``config``'s scoring keys say, in place (the buffers are kept)."""
        self.heads_weight = config.map_heads_weight if mss else 0.0
        self.image_score, self.topk, self.norm = config.image_score, config.image_score_topk, config.score_norm
        self.pool = config.image_score_pool

    def anomaly_map(self, logits: torch.Tensor, scale_logits: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        amap = anomaly_map(logits)
        if self.heads_weight and scale_logits:
            amap = (1 - self.heads_weight) * amap + self.heads_weight * heads_map(scale_logits, amap.shape[-2:])
        return amap

    def score_map(self, amap: torch.Tensor) -> torch.Tensor:
        """What the image score reduces: the pooled map (pooled_max) or the map itself."""
        return pooled(amap, self.pool) if self.image_score == "pooled_max" else amap

    def reduce(self, smap: torch.Tensor) -> torch.Tensor:
        return smap.flatten(1).amax(dim=1) if self.image_score == "pooled_max" else topk_mean(smap, self.topk)

    def normalise(self, smap: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if mean.shape[-2:] != smap.shape[-2:]:   # an input of another size than trained on
            mean = F.interpolate(mean, size=smap.shape[-2:], mode="bilinear", align_corners=False)
            scale = F.interpolate(scale, size=smap.shape[-2:], mode="bilinear", align_corners=False)
        return (smap - mean) / scale

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        """Anomaly map (B, 1, H, W) -> image score (B,)."""
        smap = self.score_map(amap)
        if self.norm == "pixel":
            smap = self.normalise(smap, self.norm_mean.to(smap.dtype), self.norm_scale.to(smap.dtype))
        return self.reduce(smap)

    @property
    def calibrated(self) -> bool:
        return self.norm == "none" or int(self.norm_images) > 0

    @torch.no_grad()
    def calibrate(self, maps: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Set the normalisation from the good images among ``maps`` (N, H, W) anomaly maps
        with ``labels`` (N,) 0/1, and return every image's score (N,), as inference computes
        it. A good image is scored with the statistics of the *other* good images (leave one
        out), so that scores of validation good images are not fitted to themselves and the
        choices made on them stay honest. Without ``score_norm`` nothing is stored."""
        amaps = torch.as_tensor(np.asarray(maps), dtype=torch.float64)[:, None]
        smaps = self.score_map(amaps)
        if self.norm == "none":
            return self.reduce(smaps).float().numpy()
        good = torch.as_tensor(np.asarray(labels)).flatten() == 0
        n = int(good.sum())
        if n < 2:
            raise ValueError(f"score_norm={self.norm} needs at least 2 good validation images, got {n}")
        g = smaps[good]
        s1, s2 = g.sum(0, keepdim=True), (g * g).sum(0, keepdim=True)
        mean, scale = _stats(s1, s2, n)
        self.norm_mean.copy_(mean[0:1].to(self.norm_mean))
        self.norm_scale.copy_(scale[0:1].to(self.norm_scale))
        self.norm_images.fill_(n)
        scores = self.reduce(self.normalise(smaps, mean, scale))
        # Leave one out: the statistics of the other n - 1 good images, from the sums.
        loo_mean, loo_scale = _stats(s1 - g, s2 - g * g, n - 1)
        scores[good] = self.reduce(self.normalise(g, loo_mean, loo_scale))
        return scores.float().numpy()


def _stats(s1: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and ``std(x, y) + std_all`` of n maps given their sums and sums of
    squares (each (M, 1, H, W); M sets of n maps)."""
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    pixels = n * s1.shape[-1] * s1.shape[-2]
    all_mean = s1.sum((-2, -1), keepdim=True) / pixels
    all_var = (s2.sum((-2, -1), keepdim=True) / pixels - all_mean * all_mean).clamp_min(0)
    # The floor (a thousandth of probability) keeps near-constant maps from amplifying float
    # noise: the score of an exported model then matches PyTorch's as closely as its map does.
    return mean, var.sqrt() + all_var.sqrt() + SCALE_FLOOR
