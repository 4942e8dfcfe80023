import math

import pytest
import torch
from conftest import small_config

from pouta_core.losses import focal_loss, pouta_loss, segmentation_loss, ssim
from pouta_core.model import build_model

TINY = small_config()


def test_ssim_of_identical_images_is_one():
    a = torch.rand(2, 3, 32, 32)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_of_constant_images_follows_the_luminance_formula():
    x, y = 0.2, 0.6
    a, b = torch.full((1, 1, 16, 16), x), torch.full((1, 1, 16, 16), y)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-4)


def test_focal_loss_on_uniform_logits():
    logits = torch.zeros(1, 2, 4, 4)        # p_t = 0.5 everywhere
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    assert focal_loss(logits, mask, alpha=None, gamma=2.0).item() == pytest.approx(0.25 * math.log(2))
    assert focal_loss(logits, mask, alpha=None, gamma=0.0).item() == pytest.approx(math.log(2))


def test_focal_alpha_balances_anomalous_against_normal_pixels():
    logits = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1, :] = 1                    # a quarter of the pixels are anomalous
    log2 = math.log(2)
    # Lin et al.: alpha on anomalous pixels, 1 - alpha on normal ones
    assert focal_loss(logits, mask, alpha=0.75, gamma=0.0).item() == pytest.approx((0.25 * 0.75 + 0.75 * 0.25) * log2)
    assert focal_loss(logits, mask, alpha=1.0, gamma=0.0).item() == pytest.approx(0.25 * log2)
    assert focal_loss(logits, mask, alpha=0.0, gamma=0.0).item() == pytest.approx(0.75 * log2)


def test_segmentation_loss_is_focal_plus_l1_on_probability():
    logits = torch.randn(2, 2, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.7).float()
    prob = torch.softmax(logits, 1)[:, 1:]
    expected = focal_loss(logits, mask, None, 2.0) + (prob - mask).abs().mean()
    assert segmentation_loss(logits, mask, None, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_coarse_logits_are_upsampled_to_the_mask():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1] = 10.0                     # anomaly everywhere
    mask = torch.ones(1, 1, 16, 16)
    assert segmentation_loss(logits, mask, None, 2.0).item() < 1e-3


@pytest.mark.parametrize("variant", ["pouta", "pouta-base", "vanilla"])
def test_total_is_rec_plus_pre_plus_weighted_mss(variant):
    cfg = TINY.replace(variant=variant, lambda_1=0.4, lambda_2=0.3, lambda_3=0.2, lambda_4=0.1)
    out = build_model(cfg)(torch.rand(2, 3, 32, 32))
    mask = (torch.rand(2, 1, 32, 32) > 0.8).float()
    t = pouta_loss(out, torch.rand(2, 3, 32, 32), mask, cfg)
    assert t["rec"].item() == pytest.approx((t["mse"] + t["ssim"]).item(), rel=1e-6)
    if variant == "pouta":
        mss = sum(lam * t[f"ss_{i}"] for i, lam in enumerate([0.4, 0.3, 0.2, 0.1], start=1))
        assert t["mss"].item() == pytest.approx(mss.item(), rel=1e-5)
        assert t["total"].item() == pytest.approx((t["rec"] + t["pre"] + t["mss"]).item(), rel=1e-5)
    else:
        assert "mss" not in t and "ss_1" not in t
        assert t["total"].item() == pytest.approx((t["rec"] + t["pre"]).item(), rel=1e-6)


def test_consistency_loss_reads_only_normal_pixels():
    from pouta_core.losses import consistency_loss

    enc = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)]
    assert consistency_loss(enc, [e.clone() for e in enc], torch.zeros(2, 1, 32, 32)) < 1e-6
    other = [e.clone() for e in enc]
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16, :16] = 1                      # the top-left quarter is "anomalous"
    for o in other:
        h, w = o.shape[-2:]
        o[..., : h // 2, : w // 2] = torch.randn_like(o[..., : h // 2, : w // 2])
    assert consistency_loss(enc, other, mask) < 1e-6          # differences under the mask only
    assert consistency_loss(enc, other, torch.zeros_like(mask)) > 0.1
    cfg = TINY.replace(lambda_consistency=0.5)
    out = build_model(cfg)(torch.rand(2, 3, 32, 32))
    terms = pouta_loss(out, torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32), cfg)
    assert "consistency" in terms and "consistency" not in pouta_loss(out, torch.rand(2, 3, 32, 32),
                                                                      torch.zeros(2, 1, 32, 32), TINY)
