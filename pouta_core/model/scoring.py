"""From 2-class logits to the anomaly map and the image score (paper §3.2, after eq. 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_POOL = 21


def anomaly_map(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the anomalous class. (B, 2, H, W) -> (B, 1, H, W) in [0, 1]."""
    return torch.softmax(logits, dim=1)[:, 1:2]


def image_score(amap: torch.Tensor, pool: int = SCORE_POOL) -> torch.Tensor:
    """Max of the ``pool`` x ``pool`` average pool (stride 1, same padding), as DRAEM and the
    paper score images; the padding counts as zeros (DRAEM's ``count_include_pad``).
    (B, 1, H, W) -> (B,)."""
    pooled = F.avg_pool2d(amap, kernel_size=pool, stride=1, padding=pool // 2)
    return pooled.flatten(1).amax(dim=1)
