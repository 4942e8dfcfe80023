"""Multi-scale Semantic Supervision heads (paper §3.2, eq. 5-6)."""

from __future__ import annotations

import torch
from torch import nn


class MSSHead(nn.Module):
    """Predict the 2-class anomaly logits M_p(i) from F'_Ci at its own resolution.

    The paper does not describe the head. A 1x1 convolution keeps the supervision on the
    features themselves: the only way to lower L_SS(i) is to make F'_Ci linearly separate
    normal from anomalous pixels, which is the assumption MSS is meant to enforce. The loss
    upsamples the logits to the mask's size. (B, c, h, w) -> (B, 2, h, w).
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(ch, 2, kernel_size=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)
