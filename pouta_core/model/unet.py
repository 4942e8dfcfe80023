"""DRAEM's discriminative U-Net, the vanilla baseline's discriminator (paper Figure 2a).

Six encoder blocks of widths w, 2w, 4w, 8w, 8w, 8w with five 2x2 max-poolings, a decoder
with skip connections back to full size, and a 3x3 conv to 2-class logits, as in
Zavrtanik et al. (2021), ``DiscriminativeSubNetwork``. Input: concat(image, reconstruction).
"""

from __future__ import annotations

import torch
from torch import nn

from pouta_core.model.blocks import conv_bn_relu, double_conv


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         conv_bn_relu(in_ch, out_ch))


class UNetDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        w = width
        enc_ch = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(
            [double_conv(c_in, c_out)
             for c_in, c_out in zip([in_channels, *enc_ch[:-1]], enc_ch, strict=True)]
        )
        self.pool = nn.MaxPool2d(2)
        # Decoder from the deepest block (8w at stride 32) back to stride 1; each stage
        # upsamples, concatenates the encoder block of that stride, then two conv blocks.
        ups, dbs = [], []
        # (upsample in, upsample out, skip channels) per stage, as in DRAEM.
        spec = [(8 * w, 8 * w, 8 * w), (8 * w, 4 * w, 8 * w), (4 * w, 2 * w, 4 * w),
                (2 * w, w, 2 * w), (w, w, w)]
        for up_in, up_out, skip_ch in spec:
            ups.append(_up(up_in, up_out))
            dbs.append(double_conv(up_out + skip_ch, up_out))
        self.ups = nn.ModuleList(ups)
        self.dbs = nn.ModuleList(dbs)
        self.to_logits = nn.Conv2d(w, 2, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W), H and W multiples of 32 -> logits (B, 2, H, W)."""
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        for up, db, skip in zip(self.ups, self.dbs, reversed(skips[:-1]), strict=True):
            h = db(torch.cat([up(h), skip], dim=1))
        return self.to_logits(h)
