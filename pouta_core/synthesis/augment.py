"""Building blocks of the batched synthesis (:mod:`pouta_core.synthesis.batched`): Perlin noise
on lattices of any size per row, sampling grids for rotations and shifts, and DRAEM's ten
augmentations with per-sample parameters.

Each function issues a fixed number of torch ops whatever the batch size (no Python loop over
samples, no read of a device tensor on the host), so on a GPU a batch costs the same few
launches at 8 images as at 64. The per-augmentation functions (``_gamma`` ... ``_equalize``)
are the reference for one augmentation on a whole batch and are tested against torchvision
per image; the synthesis applies the seven per-channel intensity maps among them as one lookup
table (:func:`intensity_tables`, :func:`apply_tables`), tested against these.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

LEVELS = 256
TO_UINT8 = 256 - 1e-3   # as torchvision.transforms.v2.functional.to_dtype(..., torch.uint8, scale=True)


def _fade(t: torch.Tensor) -> torch.Tensor:
    """6 t^5 - 15 t^4 + 10 t^3, as (10 + t (-15 + 6 t)) t^3."""
    six, minus_fifteen, ten = _constants(t.device)
    return torch.addcmul(ten, t, torch.addcmul(minus_fifteen, t, six)).mul_(t.pow(3))


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, device=device) for v in (6.0, -15.0, 10.0))


# --- Perlin noise, one lattice (or several octaves of lattices) per row ---------------------

def axis_weights(n: int, res: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, side: int) -> torch.Tensor:
    """For each of ``n`` pixels along one axis and each of ``side`` lattice lines: the lerp
    weight times the offset from the line, and the lerp weight alone: (2, R, n, side).

    ``res`` (R, 1, O): cells of each of a row's O lattices (octaves) along the axis;
    ``offsets`` (R, 1, O): the line of the shared axis where each lattice starts (whole
    numbers: a position's fraction is the same with it); ``scales`` (R, 1, 2 O): each
    lattice's weight, twice. Rows and octaves are batched: a fixed number of ops."""
    pos = torch.addcmul(offsets, _positions(n, res.device), res)        # (R, n, O)
    frac = pos.frac()
    t = _fade(frac)
    index = torch.cat([pos, pos + 1], 2).floor_().long()
    weight = torch.cat([1 - t, t], 2).mul_(scales)
    values = torch.stack([weight * torch.cat([frac, frac - 1], 2), weight])
    return torch.zeros((2, len(res), n, side), device=res.device).scatter_add_(3, index.expand(2, -1, -1, -1), values)


@functools.lru_cache(maxsize=16)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """(1, n, 1): pixel i at i / n of the axis."""
    return (torch.arange(n, device=device, dtype=torch.float32) / n)[None, :, None]


def lattice_noise(y: torch.Tensor, x: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Gradient noise from the axis weights of :func:`axis_weights` (``y`` over h, ``x`` over
    w) and the lattice's gradient directions (2, R, side, side): the cosines and the sines of
    their angles. (R, h, w).

    A pixel's value is a sum over its cell's four corners of a row weight, a column weight and
    the corner's gradient, and the row and column weights do not depend on each other, so
    ``noise = P cos(A) U^T + Q sin(A) V^T`` with P, Q (h x side) holding each pixel's weights
    for the corners' rows and V, U (w x side) for the columns: two batched matrix products and
    no per-pixel gather. Octaves are blocks of the shared lattice axis; the gradients are zero
    outside the diagonal blocks, so octaves do not mix. The noise's factor sqrt(2) is the
    caller's, in ``gradients``."""
    p_cos, q_sin = (y @ gradients).unbind(0)
    v, u = x.transpose(-1, -2).unbind(0)
    return torch.bmm(p_cos, u).baddbmm_(q_sin, v)


def perlin_noise_batch(h: int, w: int, res_y: torch.Tensor, res_x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """One lattice per row: ``res_y[b]`` x ``res_x[b]`` cells over (h, w), gradient angles
    ``angles[b, :res_y[b] + 1, :res_x[b] + 1]`` (the rest unused). (B, h, w): the same function
    as :func:`~pouta_core.synthesis.perlin.perlin_noise`."""
    side = max(angles.shape[-2:])
    angles = F.pad(angles, (0, side - angles.shape[-1], 0, side - angles.shape[-2]))
    zero, one = torch.zeros(len(res_y), 1, 1), torch.ones(len(res_y), 1, 2)
    y = axis_weights(h, res_y.float().view(-1, 1, 1), zero, one, side)
    x = axis_weights(w, res_x.float().view(-1, 1, 1), zero, one, side)
    return lattice_noise(y, x, math.sqrt(2) * torch.stack([torch.cos(angles), torch.sin(angles)]))


# --- Sampling grids: rotations and shifts ---------------------------------------------------

def sampling_grid(theta_t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``theta_t`` (R, 3, 2): per row, the transposed affine map ``[[cos, -sin, tx], [sin,
    cos, ty]]`` in ``grid_sample``'s normalised coordinates: output pixel p samples ``theta
    (p, 1)``. (R, h, w, 2): ``F.affine_grid``'s grid, as one broadcast matrix product with the
    pixel centres (about four times faster on a CPU)."""
    return (_pixel_centres(h, w, theta_t.device) @ theta_t).view(len(theta_t), h, w, 2)


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(1, h w, 3): (x, y, 1) of each pixel's centre, row by row."""
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=device)
    centres = F.affine_grid(identity, [1, 1, h, w], align_corners=False).view(1, h * w, 2)
    return torch.cat([centres, torch.ones(1, h * w, 1, device=device)], 2)


def rotation(degrees: torch.Tensor, tx: torch.Tensor | float = 0.0, ty: torch.Tensor | float = 0.0) -> torch.Tensor:
    """(R,) counter-clockwise angles (and shifts) as :func:`sampling_grid`'s (R, 3, 2)."""
    a = torch.deg2rad(degrees.float())
    cos, sin = torch.cos(a), torch.sin(a)
    tx, ty = torch.as_tensor(tx).expand_as(a), torch.as_tensor(ty).expand_as(a)
    return torch.stack([cos, sin, -sin, cos, tx, ty], 1).view(-1, 3, 2)


def _rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) counter-clockwise about its centre; zeros outside."""
    grid = sampling_grid(rotation(degrees).to(x.device), x.shape[-2], x.shape[-1])
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


# --- DRAEM's augmentations, on a batch with per-sample parameters ---------------------------
# ``u`` is (n, 2) uniforms in [0, 1) per sample; ranges are those of sources.AUGMENTATIONS.

def _per(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _gamma(x, u):
    return x.clamp_min(0) ** _per(0.5 + 1.5 * u[:, 0])


def _brightness(x, u):
    return x * _per(0.8 + 0.4 * u[:, 0]) + _per(-0.1 + 0.2 * u[:, 1])


@functools.lru_cache(maxsize=16)
def _interior(h: int, w: int, device: torch.device) -> torch.Tensor:
    inside = torch.zeros(1, 1, h, w, device=device)
    inside[..., 1:-1, 1:-1] = 1
    return inside


def sharpen(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness, factor * x + (1 - factor) * blurred with border pixels
    kept, for ``weight`` = (1 - factor) / 13 (n, 1, 1, 1): the kernel [[1, 1, 1], [1, 5, 1],
    [1, 1, 1]] / 13 is a 3x3 box sum plus 4 times the pixel, over 13, so blurred - x is
    (box - 9 x) / 13. The box sum is two sums of unfolded windows (``avg_pool2d`` and a 3x3
    ``conv2d`` are several times slower on a CPU)."""
    box = F.pad(x, (1, 1, 1, 1)).unfold(2, 3, 1).sum(-1).unfold(3, 3, 1).sum(-1)
    inside = _interior(x.shape[-2], x.shape[-1], x.device)
    return torch.addcmul(x, box.add_(x, alpha=-9), inside * weight)


def _sharpness(x, u):
    return sharpen(x, _per((1 - 3.0 * u[:, 0]) / 13))


@functools.lru_cache(maxsize=16)
def _colour_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([0.2989, 0.587, 0.114], device=device).view(1, 3, 1, 1),
            torch.tensor([0.0, 2.0, 4.0], device=device).view(1, 3, 1, 1))


def saturate_and_shift_hue(x: torch.Tensor, saturation: torch.Tensor, hue_sixths: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation then adjust_hue (an HSV hue shift), per sample, for
    ``saturation`` (n, 1, 1, 1) and a hue shift in sixths of a turn plus the sectors of the
    conversion back, (5, 3, 1) per channel ((n, 3, 1, 1)), in a fixed number of full-size
    steps: the hue is kept in sixths, and the shift is added before the one ``% 6`` of the
    conversion back."""
    grey_weights, sectors = _colour_constants(x.device)
    x = torch.lerp(F.conv2d(x, grey_weights), x, saturation).clamp_(0, 1)
    value, top = x.max(1, keepdim=True)     # (argmax and aminmax over channels are ten times slower on a CPU)
    delta = value - x.amin(1, keepdim=True)
    # The hue in sixths: 2 i + (next - previous) / delta for the channel i holding the maximum
    # (``top``: red first, then green, as torchvision); grey pixels (delta 0) get any hue:
    # their saturation is 0.
    hue6 = torch.addcmul(x.roll(-1, 1) - x.roll(1, 1), sectors, delta).gather(1, top).div_(delta.clamp_min(1e-12))
    k = (hue6 + hue_sixths).remainder_(6)
    return torch.addcmul(value, torch.minimum(k, 4 - k).clamp_(0, 1), delta, value=-1)


SECTORS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def _saturation_hue(x, u):
    return saturate_and_shift_hue(x, _per(0.5 + u[:, 0]), _per(6 * (-0.2 + 0.4 * u[:, 1])) + SECTORS)


def _solarize(x, u):
    t = _per(0.1 + 0.8 * u[:, 0])
    return torch.where(x >= t, 1 - x, x)


def _to_uint8(x):
    return (x.clamp(0, 1) * TO_UINT8).to(torch.uint8)


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
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(_to_uint8(x)).float() / 255


def _affine_rotate(x, u):
    return _rotate(x, -45 + 90 * u[:, 0], "nearest")


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _saturation_hue, _solarize, _posterize, _invert,
                 _autocontrast, _equalize, _affine_rotate)
GAMMA, BRIGHTNESS, SHARPNESS, SATURATION_HUE, SOLARIZE, POSTERIZE, INVERT, AUTOCONTRAST, EQUALIZE, ROTATE = range(10)


# --- The seven per-channel intensity maps as one lookup table -------------------------------

def intensity_tables(drawn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The fixed maps among the seven (gamma, brightness, invert, solarize, posterize, in this
    order, each where ``drawn``), evaluated on the 256 levels of an 8-bit channel: (n, 256)
    on the CPU, from the CPU draws (``drawn`` (n, 10) bool, ``u`` (n, 10, 2) uniforms)."""
    y = torch.linspace(0, 1, LEVELS).expand(len(u), LEVELS)
    gamma = torch.where(drawn[:, GAMMA], 0.5 + 1.5 * u[:, GAMMA, 0], 1.0)
    y = y ** gamma[:, None]
    # brightness then invert is one affine map: 1 - clamp(a y + b) = clamp(-a y + 1 - b)
    a = torch.where(drawn[:, BRIGHTNESS], 0.8 + 0.4 * u[:, BRIGHTNESS, 0], 1.0)
    b = torch.where(drawn[:, BRIGHTNESS], -0.1 + 0.2 * u[:, BRIGHTNESS, 1], 0.0)
    a, b = torch.where(drawn[:, INVERT], -a, a), torch.where(drawn[:, INVERT], 1 - b, b)
    y = torch.addcmul(b[:, None], y, a[:, None]).clamp_(0, 1)
    threshold = torch.where(drawn[:, SOLARIZE], 0.1 + 0.8 * u[:, SOLARIZE, 0], 2.0)
    y = torch.where(y >= threshold[:, None], 1 - y, y)
    step = 2.0 ** (6 - (4 * u[:, POSTERIZE, 0]).floor())[:, None]     # 2 ** (8 - bits), bits 2..5
    posterized = (y * TO_UINT8).floor_().div_(step).floor_().mul_(step / 255)
    return torch.where(drawn[:, POSTERIZE, None], posterized, y)


@functools.lru_cache(maxsize=8)
def _ones(columns: int, device: torch.device) -> torch.Tensor:
    return torch.ones(columns, device=device)


def apply_tables(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Each channel of ``x`` (n, 3, h, w) in [0, 1], as 8 bits, through its table ((n * 3,
    258): 256 values from :func:`intensity_tables`, a row per channel), then autocontrast where
    the table's column 256 is 1, and equalize where its column 257 is 1. The two data-dependent maps are
    computed on the tables from each channel's histogram, not on the image: one pass over the
    pixels to bin them and one to look them up, whatever was drawn."""
    n, c, h, w = x.shape
    levels = (x * TO_UINT8).long().view(n * c, h * w)
    hist = torch.zeros(n * c, LEVELS, device=x.device).scatter_add_(1, levels, _ones(h * w, x.device).expand(n * c, -1))
    table, contrast, equalize = tables.split([LEVELS, 1, 1], 1)
    # autocontrast: the lowest and highest value present, mapped to 0 and 1
    present = hist > 0
    lo = torch.where(present, table, 2.0).amin(1, keepdim=True)
    span = torch.where(present, table, -1.0).amax(1, keepdim=True) - lo
    table = torch.where(span * contrast > 0, (table - lo) / span, table).clamp_(0, 1)
    # equalize, as torchvision (PIL's scheme) on the 8-bit values the table gives: a level's
    # value is (the pixels below it + step // 2) // step, step the pixels below the highest
    # level present / 255 (an image with step 0 is left as it is)
    out = (table * TO_UINT8).floor_()
    index = out.long()
    hist = torch.zeros_like(hist).scatter_add_(1, index, hist)
    cum = hist.cumsum(1)
    step = (h * w - hist.gather(1, cum.argmax(1, keepdim=True))).div_(255, rounding_mode="floor")
    below = (cum - hist).gather(1, index)
    eq = below.add_(step.div(2, rounding_mode="floor")).div_(step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    table = torch.lerp(table, torch.where(step > 0, eq, out).div_(255), equalize)
    return table.gather(1, levels).view(n, c, h, w)
