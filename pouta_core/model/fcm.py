"""Feature Contrast Module (paper §3.2, Figure 3)."""

from __future__ import annotations

import torch
from torch import nn

from pouta_core.model.blocks import conv_bn_relu


class FCM(nn.Module):
    """F_Ci = conv_block(concat(F_Ei, F_Di)): the coarse anomaly evidence at scale i.

    ``depth`` Conv3x3-BN-ReLU blocks (config ``fcm_depth``; the paper does not give the depth,
    and one keeps POUTA's discriminator light, which is its point). (B, 2c, h, w) -> (B, out_ch, h, w).
    """

    def __init__(self, feat_ch: int, out_ch: int, depth: int = 1, mode: str = "concat") -> None:
        super().__init__()
        self.mode = mode
        contrast = mode == "contrast"
        # ``contrast`` (config fcm_input: contrast, not the paper's): one 1x1 projection phi
        # shared by both sides, then [phi(E), phi(D), |phi(E) - phi(D)|]: the difference is an
        # explicit input, and both sides live in one space where it means something.
        # ``encoder`` / ``decoder`` (ablations: is the contrast used?): one side only, given
        # twice, so that the parameter count is exactly the paper's FCM's.
        self.project = nn.Conv2d(feat_ch, feat_ch, kernel_size=1) if contrast else None
        # One flat Sequential, so depth 1 keeps the parameter names of checkpoints written
        # before ``fcm_depth`` existed (block.0 conv, block.1 BN).
        layers = list(conv_bn_relu((3 if contrast else 2) * feat_ch, out_ch))
        for _ in range(depth - 1):
            layers += list(conv_bn_relu(out_ch, out_ch))
        self.block = nn.Sequential(*layers)

    def forward(self, f_e: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        if self.mode == "encoder":
            f_d = f_e
        elif self.mode == "decoder":
            f_e = f_d
        if self.project is None:
            return self.block(torch.cat([f_e, f_d], dim=1))
        p_e, p_d = self.project(f_e), self.project(f_d)
        return self.block(torch.cat([p_e, p_d, (p_e - p_d).abs()], dim=1))
