"""The reconstructive network (paper §3.1): encoder, mapping layer, decoder.

Shapes for an input (B, 3, H, W) and base width w:
    F_E1 (w, H)   F_E2 (2w, H/2)   F_E3 (4w, H/4)   F_E4 (8w, H/8)     encoder
    F_M  (8w, H/16)                                                     mapping layer
    F_D4 (8w, H/8) F_D3 (4w, H/4)  F_D2 (2w, H/2)   F_D1 (w, H)        decoder
    I_r  (3, H)                                                          reconstruction
F_Di has the shape of F_Ei, so FCM can compare them. There are no encoder -> decoder skip
connections: they would carry the anomaly straight into the reconstruction.
"""

from __future__ import annotations

import torch
from torch import nn

from pouta_core.model.blocks import conv_bn_relu, double_conv


class ReconstructiveNetwork(nn.Module):
    def __init__(self, width: int, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        enc_ch = [w, 2 * w, 4 * w, 8 * w]
        self.encoder = nn.ModuleList(
            [double_conv(c_in, c_out)
             for c_in, c_out in zip([in_channels, *enc_ch[:-1]], enc_ch, strict=True)]
        )
        self.pool = nn.MaxPool2d(2)
        # Mapping layer: F_E4 -> normal feature space F_M at stride 16.
        self.mapping = double_conv(8 * w, 8 * w)
        # Decoder stage i: upsample x2 then two conv blocks, 8w -> F_D4 (8w) -> ... -> F_D1 (w).
        dec_in = [8 * w, 8 * w, 4 * w, 2 * w]
        dec_out = [8 * w, 4 * w, 2 * w, w]
        self.decoder = nn.ModuleList(
            [
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                              conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out))
                for c_in, c_out in zip(dec_in, dec_out, strict=True)
            ]
        )
        self.to_image = nn.Conv2d(w, in_channels, kernel_size=3, padding=1)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """x: (B, C, H, W) in [0, 1] -> (I_r, [F_E1..F_E4], [F_D1..F_D4])."""
        enc = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h if i == 0 else self.pool(h))
            enc.append(h)
        h = self.mapping(self.pool(h))
        dec = []
        for block in self.decoder:
            h = block(h)
            dec.append(h)
        # The reconstruction is unbounded like DRAEM's; the loss pulls it into [0, 1].
        return self.to_image(h), enc, dec[::-1]
