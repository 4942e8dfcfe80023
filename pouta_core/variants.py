"""The model variants of the paper's ablation (Table 4) as data: one row per variant, the
parts it is built from. The model (``pouta_core/model/pouta.py``) and the diagnostics read
this table; a new variant is a new row (the way timm registers model variants).

    variant       discriminator input                FCM + fusion  HSG  MSS
    vanilla       concat(image, reconstruction)           -         -    -   (DRAEM U-Net)
    pouta-base    F_E1..4, F_D1..4                        x         -    -
    pouta-hsg     F_E1..4, F_D1..4                        x         x    -
    pouta-mss     F_E1..4, F_D1..4                        x         -    x
    pouta         F_E1..4, F_D1..4                        x         x    x
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    features: bool   # the discriminator reads F_E/F_D through FCMs and their fusion (else a U-Net on image + I_r)
    hsg: bool        # hierarchical semantic guidance
    mss: bool        # multi-scale supervision: a 2-class head per scale


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("vanilla", features=False, hsg=False, mss=False),
    Variant("pouta-base", features=True, hsg=False, mss=False),
    Variant("pouta-hsg", features=True, hsg=True, mss=False),
    Variant("pouta-mss", features=True, hsg=False, mss=True),
    Variant("pouta", features=True, hsg=True, mss=True),
)}
