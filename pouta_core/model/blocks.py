"""Building blocks shared by every network: DRAEM's Conv3x3-BN-ReLU."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """Conv3x3 (padding 1, no bias: BN follows) -> BatchNorm -> ReLU; keeps H x W."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two Conv3x3-BN-ReLU blocks, the unit of DRAEM's encoders and decoders."""
    return nn.Sequential(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


def init_weights(module: nn.Module, scheme: str) -> None:
    """``draem``: conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0 (DRAEM's
    ``weights_init``, so the baseline is the published one). ``torch``: PyTorch defaults."""
    if scheme == "torch":
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
