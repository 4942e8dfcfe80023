"""High-level Semantic Guidance (paper §3.2, eq. 2-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HSG(nn.Module):
    """Calibrate F_Ci with the adjacent coarser feature F'_C(i+1) (half the resolution).

    W_sp = sigmoid(conv3x3(upsample(F'_C(i+1))))           eq. 2, (B, 1, h, w)
    W_cn = sigmoid(conv1x1(GAP(upsample(F'_C(i+1)))))      eq. 3, (B, c, 1, 1)
    F'_Ci = W_sp * F_Ci * W_cn                              eq. 4

    The paper orders f_cn as upsample -> conv -> GAP. With nearest upsampling (which keeps
    the mean) and a 1x1 convolution (linear), GAP commutes with both, so applying the conv
    after GAP computes the same W_cn exactly, without a full-resolution convolution.
    """

    def __init__(self, high_ch: int, ch: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(high_ch, 1, kernel_size=3, padding=1)
        self.channel = nn.Conv2d(high_ch, ch, kernel_size=1)

    def forward(self, f_c: torch.Tensor, f_high: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(f_high, size=f_c.shape[-2:], mode="bilinear", align_corners=False)
        w_sp = torch.sigmoid(self.spatial(up))
        w_cn = torch.sigmoid(self.channel(f_high.mean(dim=(2, 3), keepdim=True)))
        return w_sp * f_c * w_cn
