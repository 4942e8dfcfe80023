"""Anomaly synthesis (paper §3.1) for a whole batch at once, with torch ops on the batch's
device: the same recipe as the per-sample path (:class:`~pouta_core.synthesis.AnomalySynthesizer`)
without a Python loop over samples, so on a GPU node the input pipeline keeps up with the model.

Per batch: a Perlin mask per sample (scale 2^k per axis, rotated, thresholded), an anomaly
source per sample (a texture from the bank or procedural fractal noise, three of DRAEM's ten
augmentations in random order, fused with a shifted, rotated or unchanged copy of the image),
the blend ``I_in = I_ori (1 - M) + (beta I_ori + (1 - beta) I_aug) M``, and a share
``clean_ratio`` of samples left untouched.

Reproducibility: every random number is drawn from the caller's CPU ``torch.Generator`` (a
few small tensors per batch) and only then moved to the device, so a batch depends on the
generator's seed alone: the same (seed, epoch, rank, step) gives the same batch on CPU,
bit for bit. On CUDA the random draws are the same; the pixel arithmetic (``grid_sample``,
``pow``, the colour conversions) may round differently in the last bits, so a CUDA batch
matches a CPU batch to about 1e-5 and a pixel at the exact threshold of a mask may flip.
The stream of draws is not the per-sample path's: the two paths make different (equally
distributed) anomalies from the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pouta_core.config import Config

N_AUGMENTATIONS = 10
AUGMENTATIONS_PER_SOURCE = 3


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The generator seed of one training batch."""
    return (((seed * 1_000_003 + epoch) * 10_007 + rank) * 1_000_033 + step) % 2**63


@dataclass(frozen=True)
class Batch:
    image: torch.Tensor   # (B, 3, H, W) float in [0, 1]: I_in
    mask: torch.Tensor    # (B, 1, H, W) float 0/1: M
    label: torch.Tensor   # (B,) int64: 1 when the mask is not empty


# --- Perlin noise with a lattice of its own per sample ----------------------------------

def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise_batch(h: int, w: int, res_y: torch.Tensor, res_x: torch.Tensor, angles: torch.Tensor, *,
                       scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient noise, one map per row: ``res_y[b]`` x ``res_x[b]`` lattice cells over (h, w),
    gradient angles ``angles[b, :res_y[b] + 1, :res_x[b] + 1]`` (the rest unused), times
    ``scale``; added to ``out`` when given (no new (B, h, w) tensor). (B, h, w).

    The same function as :func:`~pouta_core.synthesis.perlin.perlin_noise`, written as two
    batched matrix products: a pixel's value is a sum over its cell's four corners of a
    row weight, a column weight and the corner's gradient, and the row and column weights
    do not depend on each other, so ``noise = P cos(A) U^T + Q sin(A) V^T`` with P, Q (h x
    lattice) and U, V (w x lattice) holding each pixel's weights for the corners' rows and
    columns. No per-pixel gather: about ten times faster on a CPU than the gathers, and only
    the small products allocate (a fresh full-size tensor costs more than the products)."""
    p, q = _axis_weights(h, res_y, angles.shape[-2], angles.device)
    v, u = _axis_weights(w, res_x, angles.shape[-1], angles.device)
    k = math.sqrt(2) * scale
    rows_cos, rows_sin = (k * p) @ torch.cos(angles), (k * q) @ torch.sin(angles)   # (B, h, side)
    if out is None:
        out = torch.bmm(rows_cos, u.transpose(1, 2))
    else:
        out.baddbmm_(rows_cos, u.transpose(1, 2))
    return out.baddbmm_(rows_sin, v.transpose(1, 2))


def _axis_weights(n: int, res: torch.Tensor, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``n`` pixels along one axis and each lattice line: (the lerp weight times the
    offset from the line, the lerp weight alone), both (B, n, side)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[None] * (res.to(device, torch.float32)[:, None] / n)
    cell = pos.floor().long()
    frac = pos - cell
    t = _fade(frac)
    with_offset = torch.zeros(len(res), n, side, device=device)
    alone = torch.zeros(len(res), n, side, device=device)
    for d, weight in ((0, 1 - t), (1, t)):
        index = (cell + d)[:, :, None]
        with_offset.scatter_add_(2, index, (weight * (frac - d))[:, :, None])
        alone.scatter_add_(2, index, weight[:, :, None])
    return with_offset, alone


def _rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) counter-clockwise about its centre; zeros outside.
    The sampling grid is built by broadcasting (``F.affine_grid`` is a batched matrix product
    with an inner size of 3, several times slower on a CPU)."""
    n, _, h, w = x.shape
    a = torch.deg2rad(degrees.to(x.device, torch.float32))
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    xs = ((2 * torch.arange(w, device=x.device, dtype=torch.float32) + 1) / w - 1)[None, None, :]
    ys = ((2 * torch.arange(h, device=x.device, dtype=torch.float32) + 1) / h - 1)[None, :, None]
    grid = torch.empty(n, h, w, 2, device=x.device)
    torch.sub(cos * xs, sin * ys, out=grid[..., 0])
    torch.add(sin * xs, cos * ys, out=grid[..., 1])
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


# --- DRAEM's augmentations, each on a sub-batch with per-sample parameters ----------------
# ``u`` is (n, 2) uniforms in [0, 1) per sample; ranges are those of sources.AUGMENTATIONS.

def _per(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _gamma(x, u):
    return x.clamp_min(0) ** _per(0.5 + 1.5 * u[:, 0])


def _brightness(x, u):
    return x * _per(0.8 + 0.4 * u[:, 0]) + _per(-0.1 + 0.2 * u[:, 1])


def _sharpness(x, u):
    # torchvision's smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a separable 3x3
    # box sum plus 4 times the centre (a depthwise conv2d is several times slower on a CPU),
    # in place where it can be; then factor * x + (1 - factor) * blurred, as one lerp.
    pad = F.pad(x, (1, 1, 1, 1))
    rows = pad[..., :-2, :] + pad[..., 1:-1, :]
    rows += pad[..., 2:, :]
    blurred = rows[..., :-2] + rows[..., 1:-1]
    blurred += rows[..., 2:]
    blurred.add_(x, alpha=4).div_(13)
    blurred[..., 0, :], blurred[..., -1, :] = x[..., 0, :], x[..., -1, :]
    blurred[..., :, 0], blurred[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return blurred.lerp_(x, _per(3.0 * u[:, 0]))


def _grey(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _saturation_hue(x, u):
    """torchvision's adjust_saturation then adjust_hue (an HSV hue shift), per sample, in
    fewer full-size steps: the hue is kept in sixths, and the shift is added before the one
    ``% 6`` of the conversion back."""
    s = _per(0.5 + u[:, 0])
    x = torch.lerp(_grey(x), x, s).clamp_(0, 1)
    value = x.amax(1)
    delta = value - x.amin(1)
    r, g, b = x.unbind(1)
    # Hue in sixths (red's maximum first, as torchvision); grey pixels (delta 0) get any hue:
    # their saturation is 0.
    red, green = r == value, g == value
    hue6 = torch.where(red, g - b, torch.where(green, b - r, r - g)).div_(delta.clamp_min(1e-12))
    hue6 += torch.where(red, 0.0, torch.where(green, 2.0, 4.0))
    hue6 += 6 * (-0.2 + 0.4 * u[:, 1])[:, None, None]
    chroma = delta   # value * saturation
    k = (hue6[:, None] + torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None, None]) % 6
    return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(-chroma[:, None]).add_(value[:, None])


def _solarize(x, u):
    t = _per(0.1 + 0.8 * u[:, 0])
    return torch.where(x >= t, 1 - x, x)


def _to_uint8(x):
    return (x.clamp(0, 1) * (256 - 1e-3)).to(torch.uint8)   # as torchvision.transforms.v2.functional.to_dtype


def _posterize(x, u):
    bits = 2 + (4 * u[:, 0]).floor().long()                          # 2..5, as randint(2, 6)
    keep = (256 - 2 ** (8 - bits)).to(torch.uint8)
    return (_to_uint8(x) & keep[:, None, None, None]).float() / 255


def _invert(x, u):
    return 1 - x


def _autocontrast(x, u):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), x)


def _equalize(x, u):
    return TF.equalize(_to_uint8(x)).float() / 255


def _affine_rotate(x, u):
    return _rotate(x, -45 + 90 * u[:, 0], "nearest")


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _saturation_hue, _solarize, _posterize, _invert,
                 _autocontrast, _equalize, _affine_rotate)


class BatchSynthesizer:
    """The batched path. ``bank``: texture sources as a (N, 3, S, S) uint8 tensor (see
    :meth:`~pouta_core.synthesis.TextureFolder.bank`), kept on the device of the batches."""

    def __init__(self, config: Config, bank: torch.Tensor | None = None) -> None:
        self.config = config
        self.bank = bank

    def __call__(self, clean: torch.Tensor, generator: torch.Generator) -> Batch:
        """``clean``: (B, 3, H, W) float in [0, 1] on any device; ``generator``: a CPU
        generator, the only source of randomness."""
        cfg, g = self.config, generator
        n, _, h, w = clean.shape
        dev = clean.device
        # Which samples stay clean, then every draw for the others, in a fixed order, on the CPU.
        rows = (torch.rand(n, generator=g) >= cfg.clean_ratio).nonzero().flatten()
        k = len(rows)
        mask = torch.zeros(n, 1, h, w, device=dev)
        image = clean.clone()
        if k == 0:
            return Batch(image, mask, torch.zeros(n, dtype=torch.long, device=dev))
        noise = self._perlin_masks(k, h, w, g, dev)
        foreign = self._foreign(k, h, w, g, dev)
        order = torch.rand(k, N_AUGMENTATIONS, generator=g).argsort(1)[:, :AUGMENTATIONS_PER_SOURCE]
        aug_u = torch.rand(k, AUGMENTATIONS_PER_SOURCE, 2, generator=g)
        self_u = torch.rand(k, 4, generator=g)
        weight = 0.5 + 0.5 * torch.rand(k, generator=g)
        if cfg.self_source_ratio > 0:   # drawn only when asked for: runs without it keep their stream
            weight = torch.where(torch.rand(k, generator=g) < cfg.self_source_ratio, 0.0, weight)
        weight = _per(weight).to(dev)
        beta = _per(cfg.beta_min + (cfg.beta_max - cfg.beta_min) * torch.rand(k, generator=g)).to(dev)

        everyone = k == n
        rows = rows.to(dev)
        original = clean if everyone else clean[rows]
        foreign = self._augment(foreign, order, aug_u)
        # I_aug = w foreign + (1 - w) self copy; I_in = I + M (1 - beta) (I_aug - I): the
        # paper's blend, rearranged into in-place steps (full-size temporaries cost more
        # than the arithmetic on a CPU).
        source = self._self_copy(original, self_u).lerp_(foreign, weight).clamp_(0, 1)
        if cfg.foreground_threshold is not None:
            noise = noise * foreground_mask_batch(original, cfg.foreground_threshold)
        blended = source.sub_(original).mul_(noise * (1 - beta)).add_(original).clamp_(0, 1)
        if everyone:
            image, mask = blended, noise
        else:
            image[rows], mask[rows] = blended, noise
        return Batch(image, mask, (mask.flatten(1).sum(1) > 0).long())

    def _perlin_masks(self, n: int, h: int, w: int, g: torch.Generator, dev: torch.device) -> torch.Tensor:
        cfg = self.config
        res = 2 ** torch.randint(0, cfg.perlin_max_scale_exp, (n, 2), generator=g)
        rotation = -90 + 180 * torch.rand(n, generator=g)
        noise = torch.empty(n, 1, h, w, device=dev)
        # One sample at a time, each on its own lattice: the products' cost grows with the
        # lattice, and most samples draw a small one.
        for i, (ry, rx) in enumerate(res.tolist()):
            angles = 2 * math.pi * torch.rand(1, ry + 1, rx + 1, generator=g)
            perlin_noise_batch(h, w, res[i:i + 1, 0], res[i:i + 1, 1], angles.to(dev), out=noise[i].zero_())
        # Bilinear, as DRAEM (imgaug's Affine, order 1) and the per-sample path: interpolation
        # lowers the noise's peaks before the threshold, which shrinks the masks of fine lattices
        # (cells of a few pixels) and drops their smallest specks. Nearest-neighbour kept every
        # peak: masks a quarter larger on average and half again at the median, almost no small
        # ones, and the models trained on them lost most of their pixel AP on real photographs
        # (issue 33; docs/experiments.md, "the batched synthesis's masks").
        noise = _rotate(noise, rotation, "bilinear")
        return (noise > cfg.perlin_threshold).float()

    def _foreign(self, n: int, h: int, w: int, g: torch.Generator, dev: torch.device) -> torch.Tensor:
        """The unrelated image of each source: from the bank, else coloured fractal noise."""
        if self.bank is not None:
            index = torch.randint(len(self.bank), (n,), generator=g)
            return self.bank[index.to(self.bank.device)].to(dev).float().div_(255)
        return procedural_textures(n, h, w, g, dev)

    @staticmethod
    def _augment(x: torch.Tensor, order: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Each sample's three augmentations, in its order: per step, one call per augmentation
        drawn, on the samples that drew it (``order`` is on the CPU: no device sync)."""
        # Two buffers, used in turns: a fresh full-size tensor per step costs more than the
        # copies into it on a CPU (first-touch page faults).
        buffers = [torch.empty_like(x), torch.empty_like(x)] if order.shape[1] > 1 else [torch.empty_like(x)]
        for step in range(order.shape[1]):
            out = buffers[step % len(buffers)]
            for a in order[:, step].unique().tolist():
                rows = (order[:, step] == a).nonzero().flatten()
                params = u[rows, step].to(x.device)
                if len(rows) == 1:   # the usual case in small batches: a view, no gather
                    i = int(rows[0])
                    out[i:i + 1] = AUGMENTATIONS[a](x[i:i + 1], params).clamp_(0, 1)
                    continue
                index = rows.to(x.device)
                out.index_copy_(0, index, AUGMENTATIONS[a](x.index_select(0, index), params).clamp_(0, 1))
            x = out
        return x

    @staticmethod
    def _self_copy(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Each image shifted (a roll of up to half its size), rotated (its mean colour fills the
        corners) or unchanged, a third of the samples each. ``u`` stays on the CPU: the choices
        are read from it without waiting on the device (issue 29)."""
        _, _, h, w = x.shape
        choice = (3 * u[:, 0]).floor().long().clamp_max(2).tolist()
        dy = (((h + 1) * u[:, 1]).floor().long() - h // 2).tolist()
        dx = (((w + 1) * u[:, 2]).floor().long() - w // 2).tolist()
        out = x.clone()
        for i, c in enumerate(choice):   # a roll is a copy: one call per sample costs nothing
            if c == 0:
                out[i] = torch.roll(x[i], shifts=(dy[i], dx[i]), dims=(-2, -1))
        turn = [i for i, c in enumerate(choice) if c == 1]
        if turn:
            sub = x[turn]
            turned = _rotate(torch.cat([sub, torch.ones_like(sub[:, :1])], 1), -180 + 360 * u[turn, 3].to(x.device),
                             "bilinear")
            out[turn] = turned[:, :3] + (1 - turned[:, 3:]) * sub.mean((2, 3), keepdim=True)
        return out


def foreground_mask_batch(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`~pouta_core.synthesis.foreground_mask` for a batch. (B, 1, H, W)."""
    grey = images.mean(1)
    border = torch.cat([grey[:, :4].flatten(1), grey[:, -4:].flatten(1), grey[:, :, :4].flatten(1),
                        grey[:, :, -4:].flatten(1)], 1)
    return ((grey - border.median(1).values[:, None, None]).abs() > threshold).float()[:, None]


def procedural_textures(n: int, h: int, w: int, g: torch.Generator, dev: torch.device, octaves: int = 4
                        ) -> torch.Tensor:
    """Coloured fractal noise, as :func:`~pouta_core.synthesis.sources.procedural_texture`:
    two random colours per sample mixed by per-channel fractal noise. (n, 3, h, w)."""
    colours = torch.rand(n, 2, 3, 1, 1, generator=g).to(dev)
    base = torch.randint(1, 4, (n * 3,), generator=g)
    mix = torch.zeros(n * 3, h, w, device=dev)
    for o in range(octaves):
        side = 3 * 2**o + 1    # the largest lattice of this octave, base 3
        angles = 2 * math.pi * torch.rand(n * 3, side, side, generator=g)
        perlin_noise_batch(h, w, base * 2**o, base * 2**o, angles.to(dev), scale=0.5**o, out=mix)
    lo, hi = mix.amin((1, 2), keepdim=True), mix.amax((1, 2), keepdim=True)
    mix = ((mix - lo) / (hi - lo).clamp_min(1e-6)).view(n, 3, h, w)
    return torch.lerp(colours[:, 0], colours[:, 1], mix).clamp(0, 1)
