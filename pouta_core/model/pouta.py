"""The whole detector: reconstructive network + discriminator, built from the parts its
variant's row in ``pouta_core.variants.VARIANTS`` names (the table is there).

Training is joint (one loss, eq. 8, one optimiser), and by default the discriminative
gradients flow into the reconstructive features: MSS is meant to shape F_Ei / F_Di so that
their difference marks the anomaly (§3.2, "MSS forces our assumption to be held"), which it
can only do through them. ``detach_features=True`` stops them there instead (for vanilla:
at the reconstruction), so that L_rec alone trains the reconstructive network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pouta_core.config import Config
from pouta_core.model.blocks import init_weights
from pouta_core.model.discriminative import CoarseToFineDiscriminator
from pouta_core.model.reconstructive import ReconstructiveNetwork
from pouta_core.model.scoring import Scorer
from pouta_core.model.unet import UNetDiscriminator
from pouta_core.variants import VARIANTS


class PoutaOutput(NamedTuple):
    """The same fields for every variant.

    reconstruction  (B, 3, H, W)  I_r, trained towards the clean image in [0, 1]
    logits          (B, 2, H, W)  M_p, fused 2-class logits
    scale_logits    tuple of (B, 2, H/2^(i-1), W/2^(i-1)) for i = 1..4, M_p(i); () without MSS
    anomaly_map     (B, 1, H, W)  softmax channel 1 of M_p (by default; ``map_heads_weight``
                                  mixes in the MSS heads), in [0, 1]
    score           (B,)          image score: max of the 21x21 average pool of anomaly_map
                                  (by default; ``image_score``, ``score_norm``: model/scoring.py)
    features        (F_E1..4, F_D1..4) as the discriminator received them; () for vanilla
    """

    reconstruction: torch.Tensor
    logits: torch.Tensor
    scale_logits: tuple[torch.Tensor, ...]
    anomaly_map: torch.Tensor
    score: torch.Tensor
    features: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | tuple = ()


class AnomalyDetector(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.variant = config.variant
        self.spec = VARIANTS[config.variant]
        self.detach_features = config.detach_features
        self.detach_encoder = config.detach_encoder
        w = config.rec_width
        self.reconstructive = ReconstructiveNetwork(w)
        if self.spec.features:
            self.discriminative: nn.Module = CoarseToFineDiscriminator(
                [w, 2 * w, 4 * w, 8 * w], config.fcm_width, hsg=self.spec.hsg, mss=self.spec.mss,
                fcm_depth=config.fcm_depth, fcm_input=config.fcm_input)
        else:
            self.discriminative = UNetDiscriminator(6, config.disc_width)
        self.scorer = Scorer.for_config(config, mss=self.spec.mss)
        init_weights(self, config.init)

    def forward(self, x: torch.Tensor) -> PoutaOutput:
        """x: (B, 3, H, W) in [0, 1], H and W multiples of 32 (16 for the POUTA variants)."""
        rec, enc, dec = self.reconstructive(x)
        if not self.spec.features:
            r = rec.detach() if self.detach_features else rec
            logits = self.discriminative(torch.cat([x, r], dim=1))
            scale_logits: tuple[torch.Tensor, ...] = ()
        else:
            if self.detach_features or self.detach_encoder:
                enc = [f.detach() for f in enc]
            if self.detach_features:
                dec = [f.detach() for f in dec]
            logits, scale_logits = self.discriminative(enc, dec)
        amap = self.scorer.anomaly_map(logits, scale_logits)
        features = (tuple(enc), tuple(dec)) if self.spec.features else ()
        return PoutaOutput(rec, logits, scale_logits, amap, self.scorer(amap), features)


def build_model(config: Config | None = None, /, **overrides: object) -> AnomalyDetector:
    """Build any variant from a config plus keyword overrides (timm-style)::

        build_model(variant="vanilla")                       # paper widths
        build_model(Config.from_preset("tiny"), variant="pouta-hsg")
    """
    config = config or Config()
    if overrides:
        config = config.replace(**overrides)
    return AnomalyDetector(config)
