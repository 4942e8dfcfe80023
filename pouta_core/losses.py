"""POUTA's losses (paper eq. 1, 5-8). Every term is returned separately for logging.

    L_rec   = MSE(I_r, I_ori) + (1 - SSIM(I_r, I_ori))          eq. 1
    L_SS(i) = focal(M_p(i), M) + L1(softmax(M_p(i))[1], M)       eq. 5
    L_MSS   = sum_i lambda_i L_SS(i)                             eq. 6
    L_pre   = focal(M_p, M) + L1(softmax(M_p)[1], M)             eq. 7
    L_total = L_rec + L_pre + L_MSS                              eq. 8
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pouta_core.config import Config


@functools.lru_cache(maxsize=16)
def _window_on(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The window where the images are, made once per device and dtype: a window built on the
    CPU every step was a host-to-device copy per step on a GPU (issue 29)."""
    return gaussian_window(size, sigma).to(device=device, dtype=dtype)[None, None]


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) with a Gaussian window, per channel, 'same' padding
    by reflection. a, b: (B, C, H, W) in [0, data_range] -> scalar."""
    c = a.shape[1]
    w = _window_on(window, sigma, a.device, a.dtype).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) on 2-class logits (B, 2, H, W) against a 0/1 mask
    (B, 1, H, W): mean over pixels of -alpha_t (1 - p_t)^gamma log p_t.

    alpha_t = alpha on anomalous pixels and 1 - alpha on normal ones, Lin's class balance;
    ``alpha=None`` is the paper's setting, alpha_t = 1 on every pixel (as DRAEM's FocalLoss)."""
    target = mask[:, 0].long()
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target[:, None])[:, 0]
    p_t = logp_t.exp()
    loss = -(1 - p_t).pow(gamma) * logp_t
    if alpha is not None:
        loss = loss * torch.where(target == 1, alpha, 1 - alpha)
    return loss.mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """Focal + L1 on the anomaly probability (eq. 5 / 7). Logits at a coarser scale are
    bilinearly upsampled to the mask's size first."""
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
    return focal_loss(logits, mask, alpha, gamma) + (prob - mask).abs().mean()


def pouta_loss(out, clean: torch.Tensor, mask: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """-> {"total", "rec", "mse", "ssim", "pre", "mss", "ss_1".."ss_4"} (MSS terms only for
    variants with MSS). ``out`` is a PoutaOutput; clean (B, 3, H, W) in [0, 1]; mask 0/1."""
    rec = out.reconstruction.float()
    mse = F.mse_loss(rec, clean)
    ssim_loss = 1 - ssim(rec, clean)
    terms = {"mse": mse, "ssim": ssim_loss, "rec": mse + ssim_loss}
    terms["pre"] = segmentation_loss(out.logits, mask, config.focal_alpha, config.focal_gamma)
    total = terms["rec"] + terms["pre"]
    if out.scale_logits:
        lambdas = (config.lambda_1, config.lambda_2, config.lambda_3, config.lambda_4)
        mss = torch.zeros((), device=rec.device)
        for i, (lam, logits) in enumerate(zip(lambdas, out.scale_logits, strict=True), start=1):
            terms[f"ss_{i}"] = segmentation_loss(logits, mask, config.focal_alpha, config.focal_gamma)
            mss = mss + lam * terms[f"ss_{i}"]
        terms["mss"] = mss
        total = total + mss
    if config.lambda_consistency and out.features:
        terms["consistency"] = consistency_loss(*out.features, mask)
        total = total + config.lambda_consistency * terms["consistency"]
    terms["total"] = total
    return terms


def consistency_loss(enc, dec, mask: torch.Tensor) -> torch.Tensor:
    """Mean over scales of 1 - cos(F_Ei, F_Di) on the pixels without synthetic anomaly (the
    mask max-pooled to each scale): the two sides of normal content should agree, so that
    their difference marks only anomalies (config ``lambda_consistency``; not in the paper)."""
    losses = []
    for e, d in zip(enc, dec, strict=True):
        normal = 1 - F.adaptive_max_pool2d(mask, e.shape[-2:])
        cos = F.cosine_similarity(e.float(), d.float(), dim=1, eps=1e-6)[:, None]
        losses.append(((1 - cos) * normal).sum() / normal.sum().clamp_min(1))
    return torch.stack(losses).mean()
