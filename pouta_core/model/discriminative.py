"""POUTA's coarse-to-fine discriminative network (paper §3.2): no encoder of its own.

It reads the reconstructive network's encoder and decoder features, F_E1..4 and F_D1..4,
contrasts each symmetric pair (FCM), refines the finer scales with the coarser one (HSG),
supervises every scale (MSS) and fuses the four scales into a 2-class map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pouta_core.model.blocks import conv_bn_relu
from pouta_core.model.fcm import FCM
from pouta_core.model.hsg import HSG
from pouta_core.model.mss import MSSHead


class CoarseToFineDiscriminator(nn.Module):
    """``feat_ch[i]`` are the channels of F_E(i+1) / F_D(i+1); every F_Ci has ``width``."""

    def __init__(self, feat_ch: list[int], width: int, *, hsg: bool, mss: bool, fcm_depth: int = 1,
                 fcm_input: str = "concat") -> None:
        super().__init__()
        self.fcm = nn.ModuleList([FCM(c, width, fcm_depth, fcm_input) for c in feat_ch])
        # HSG for i = 1, 2, 3 (index 0..2), each fed by scale i + 1.
        self.hsg = nn.ModuleList([HSG(width, width) for _ in feat_ch[:-1]]) if hsg else None
        self.mss = nn.ModuleList([MSSHead(width) for _ in feat_ch]) if mss else None
        # Feature fusion layer: two 3x3 convolutions on the concatenated full-size F'_C1..4.
        self.fusion = nn.Sequential(
            conv_bn_relu(len(feat_ch) * width, width),
            nn.Conv2d(width, 2, kernel_size=3, padding=1),
        )

    def forward(
        self, enc: list[torch.Tensor], dec: list[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """-> (logits (B, 2, H, W), per-scale logits M_p(1..4) at strides 1, 2, 4, 8 or ())."""
        f_c = [fcm(e, d) for fcm, e, d in zip(self.fcm, enc, dec, strict=True)]
        if self.hsg is not None:
            # F'_C4 = F_C4; then i = 3, 2, 1, each guided by the already refined F'_C(i+1).
            for i in range(len(f_c) - 2, -1, -1):
                f_c[i] = self.hsg[i](f_c[i], f_c[i + 1])
        scale_logits = tuple(head(f) for head, f in zip(self.mss, f_c, strict=True)) if self.mss else ()
        size = f_c[0].shape[-2:]
        fused = torch.cat(
            [f_c[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in f_c[1:]],
            dim=1,
        )
        return self.fusion(fused), scale_logits
