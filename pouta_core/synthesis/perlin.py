"""Perlin noise and the binary anomaly mask M of paper §3.1, vectorised in torch."""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(h: int, w: int, res_y: int, res_x: int, generator: torch.Generator) -> torch.Tensor:
    """Gradient noise with ``res_y`` x ``res_x`` lattice cells over an (h, w) grid; values in
    about [-1, 1]. Any h, w (no divisibility needed)."""
    ys = torch.arange(h, dtype=torch.float32) * (res_y / h)
    xs = torch.arange(w, dtype=torch.float32) * (res_x / w)
    yi, xi = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    gy, gx = torch.cos(angles), torch.sin(angles)

    def corner(dy: int, dx: int) -> torch.Tensor:
        iy, ix = (yi + dy)[:, None], (xi + dx)[None, :]
        return gy[iy, ix] * (fy - dy) + gx[iy, ix] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    n0 = torch.lerp(corner(0, 0), corner(1, 0), ty)
    n1 = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2) * torch.lerp(n0, n1, tx)


def perlin_mask(
    h: int,
    w: int,
    generator: torch.Generator,
    *,
    threshold: float = 0.5,
    max_scale_exp: int = 6,
) -> torch.Tensor:
    """Binary mask (1, h, w) of float 0/1: Perlin noise with scale 2^k per axis (k drawn
    independently in [0, max_scale_exp)), rotated by an angle in [-90, 90), thresholded."""
    ky, kx = torch.randint(0, max_scale_exp, (2,), generator=generator).tolist()
    noise = perlin_noise(h, w, 2**ky, 2**kx, generator)
    angle = float(torch.empty(()).uniform_(-90.0, 90.0, generator=generator))
    noise = TF.rotate(noise[None], angle, interpolation=TF.InterpolationMode.BILINEAR)
    return (noise > threshold).float()


def fractal_noise(h: int, w: int, generator: torch.Generator, octaves: int = 4) -> torch.Tensor:
    """Sum of Perlin octaves (1/f amplitude), normalised to [0, 1]. (h, w)."""
    base = int(torch.randint(1, 4, (), generator=generator))
    out = torch.zeros(h, w)
    for o in range(octaves):
        out += perlin_noise(h, w, base * 2**o, base * 2**o, generator) / 2**o
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo).clamp_min(1e-6)
