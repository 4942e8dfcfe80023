"""A hard benchmark in the MVTec AD layout (``pouta demo-data --difficulty hard``).

The demo data (:mod:`pouta_core.data.demo`) saturates: its defects are foreign content on
clean surfaces, visible from the input alone. Here the surfaces are irregular and
photograph-like (1/f noise, growth rings, fibres, aggregate), and the defects are the kinds a
factory meets where the input alone is ambiguous, so a model has to know what normal looks
like (docs/experiments.md has what each model scores on it):

- ``warp``: the surface locally swirled by a few pixels (a dent, a bent fibre); no new colour.
- ``blur``: a patch out of focus or smeared; no new colour.
- ``colour``: a soft patch 10 to 18% brighter or darker, or tinted.
- ``stain``: a low-contrast blot of a colour close to the surface's, 25 to 40% opaque.
- ``crack``: a thin branching line, 1 to 2 pixels at 128 px, 25 to 45 grey levels darker.
- ``misplaced`` (boards): a component shifted by 3 to 6 pixels or turned.
- ``missing`` (boards): a component absent, its pads showing.

Every image and mask comes from a seeded generator (numpy ``default_rng([seed, category])``);
nothing here shares code with the training synthesis.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("wood", "concrete", "fabric", "board")
TEXTURE_DEFECTS = ("warp", "blur", "colour", "stain", "crack")
DEFECTS = {"wood": TEXTURE_DEFECTS, "concrete": TEXTURE_DEFECTS, "fabric": TEXTURE_DEFECTS,
           "board": ("misplaced", "missing", "colour", "blur", "crack")}


# --- surfaces ---------------------------------------------------------------------------

def power_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = 2.0) -> np.ndarray:
    """Noise with a 1/f^beta power spectrum (beta 2: natural images), scaled to [0, 1]."""
    h, w = shape
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.normal(size=shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    noise = np.fft.irfft2(spectrum, s=shape)
    return (noise - noise.min()) / (np.ptp(noise) + 1e-12)


def _shade(rng: np.random.Generator, s: int) -> np.ndarray:
    """Uneven lighting: a gentle gradient in a random direction, x0.9 to x1.1."""
    y, x = np.mgrid[0:s, 0:s] / s - 0.5
    a = rng.uniform(0, 2 * np.pi)
    return 1 + 0.2 * (x * math.cos(a) + y * math.sin(a))


def _wood(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:s, 0:s] / s
    warp = power_noise(rng, (s, s), 3.0) - 0.5
    a = rng.uniform(-0.3, 0.3)
    along = x * math.cos(a) + y * math.sin(a)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(5, 7) * along + 1.2 * warp))
    # grain: fine noise stretched along the rings
    grain = np.asarray(Image.fromarray((power_noise(rng, (s, max(2, s // 8)), 1.0) * 255).astype(np.uint8))
                       .resize((s, s), Image.BICUBIC), dtype=float).T / 255
    light, dark = np.array([196, 150, 104]) + rng.normal(0, 5, 3), np.array([120, 78, 46]) + rng.normal(0, 5, 3)
    t = (0.65 * rings ** 1.5 + 0.35 * grain)[..., None]
    img = (light * (1 - t) + dark * t) * _shade(rng, s)[..., None]
    return img + rng.normal(0, 2.5, img.shape), np.ones((s, s), bool)


def _concrete(rng: np.random.Generator, s: int) -> np.ndarray:
    base = 0.6 * power_noise(rng, (s, s), 2.6) + 0.4 * power_noise(rng, (s, s), 1.2)
    img = (95 + 80 * base)[..., None] * np.array([1.0, 0.99, 0.96])
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(s * s / 300)):   # aggregate: small stones, lighter or darker
        cx, cy, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.6, 2.2) * s / 128
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r], fill=int(rng.integers(60, 200)))
    stones = np.asarray(layer, dtype=float)[..., None]
    img = np.where(stones > 0, 0.75 * img + 0.25 * stones, img)
    for _ in range(int(s * s / 900)):   # pores
        cx, cy = rng.integers(0, s, 2)
        img[max(0, cy - 1):cy + 1, max(0, cx - 1):cx + 1] *= 0.6
    return img * _shade(rng, s)[..., None] + rng.normal(0, 3, img.shape), np.ones((s, s), bool)


def _fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s].astype(float)
    period = s / rng.uniform(26, 30)
    wobble = 2.0 * (power_noise(rng, (s, s), 3.0) - 0.5)   # threads are not quite straight
    warp_threads = np.sin(2 * np.pi * (x + wobble) / period)
    weft_threads = np.sin(2 * np.pi * (y - wobble) / period)
    over = np.sign(np.sin(np.pi * (x + wobble) / period) * np.sin(np.pi * (y - wobble) / period))
    weave = np.where(over > 0, np.abs(warp_threads), np.abs(weft_threads))
    fibres = power_noise(rng, (s, s), 0.8)
    colour = np.array([60, 90, 140]) + rng.normal(0, 6, 3)
    t = (0.55 + 0.3 * weave + 0.15 * fibres)[..., None]
    return colour * t * 1.4 * _shade(rng, s)[..., None] + rng.normal(0, 3, (s, s, 3)), np.ones((s, s), bool)


# A board's components: (x, y, w, h) as fractions of the image, and colour.
PARTS = (((0.18, 0.22, 0.22, 0.16), (30, 30, 34)), ((0.58, 0.20, 0.10, 0.05), (205, 180, 130)),
         ((0.60, 0.34, 0.10, 0.05), (205, 180, 130)), ((0.22, 0.60, 0.12, 0.12), (160, 165, 170)),
         ((0.55, 0.58, 0.26, 0.20), (25, 25, 28)), ((0.40, 0.82, 0.08, 0.06), (120, 60, 40)))


def _board(rng: np.random.Generator, s: int, skip: int | None = None, move: tuple[int, float, float] | None = None,
           turn: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A circuit board; ``skip`` leaves a component off (its pads show), ``move`` = (part, dx,
    dy) shifts one by pixels, ``turn`` rotates one by 90 degrees."""
    board = np.array([40, 100, 60]) + rng.normal(0, 3, 3)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in board))
    draw = ImageDraw.Draw(img)
    for k in range(5):   # traces
        yk = s * (0.12 + 0.19 * k)
        draw.line([(s * 0.05, yk), (s * 0.95, yk + s * 0.04 * (k % 2))], fill=(170, 140, 60), width=max(1, s // 64))
    for i, ((fx, fy, fw, fh), colour) in enumerate(PARTS):
        x, y, w, h = fx * s, fy * s, fw * s, fh * s
        x, y = x + rng.normal(0, 0.3), y + rng.normal(0, 0.3)   # placement tolerance
        shade = tuple(int(c + rng.normal(0, 3)) for c in colour)   # drawn even when skipped: same stream
        pad = max(1, s // 64)
        draw.rectangle([x - pad, y - pad, x + w + pad, y + h + pad], fill=(190, 190, 185))   # pads
        if i == skip:
            continue
        if move is not None and move[0] == i:
            x, y = x + move[1], y + move[2]
        if i == turn:
            cx, cy = x + w / 2, y + h / 2
            x, y, w, h = cx - h / 2, cy - w / 2, h, w
        draw.rectangle([x, y, x + w, y + h], fill=shade)
        mark = tuple(min(255, c + 25) for c in shade)   # a pin-1 mark: shows a turned part
        draw.rectangle([x + w * 0.1, y + h * 0.1, x + w * 0.3, y + h * 0.3], fill=mark)
    arr = np.asarray(img, dtype=float)
    arr = arr * (0.94 + 0.12 * power_noise(rng, (s, s), 2.0))[..., None]
    return arr + rng.normal(0, 3, arr.shape), np.ones((s, s), bool)


RENDER = {"wood": _wood, "concrete": _concrete, "fabric": _fabric, "board": _board}


# --- defects ----------------------------------------------------------------------------

def _blob(rng: np.random.Generator, s: int, r_lo: float, r_hi: float) -> tuple[np.ndarray, float, float, float]:
    """A soft irregular blob, (s, s) in [0, 1], its centre and radius in pixels."""
    cx, cy = rng.uniform(0.2, 0.8, 2) * s
    r = rng.uniform(r_lo, r_hi) * s
    y, x = np.mgrid[0:s, 0:s]
    d = np.sqrt(((x - cx) / rng.uniform(0.7, 1.0)) ** 2 + ((y - cy) / rng.uniform(0.7, 1.0)) ** 2) / r
    edge = d + 0.5 * (power_noise(rng, (s, s), 2.5) - 0.5)
    return np.clip((1.15 - edge) / 0.3, 0, 1), cx, cy, r


def _bilinear(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    s = img.shape[0]
    yy, xx = np.clip(yy, 0, s - 1.001), np.clip(xx, 0, s - 1.001)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    return ((img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx) * (1 - fy)
            + (img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx) * fy)


def _warp(img, rng, s):
    cx, cy = rng.uniform(0.25, 0.75, 2) * s
    sigma = rng.uniform(0.045, 0.07) * s
    y, x = np.mgrid[0:s, 0:s].astype(float)
    angle = rng.choice([-1, 1]) * rng.uniform(0.6, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    dx, dy = x - cx, y - cy
    sx = cx + dx * np.cos(angle) - dy * np.sin(angle)
    sy = cy + dx * np.sin(angle) + dy * np.cos(angle)
    # The defect: every pixel moved by more than half a pixel, and the swirled disk's centre
    # (turned by more than about 8 degrees), which moves less.
    return _bilinear(img, sy, sx), (np.hypot(sx - x, sy - y) > 0.5) | (np.abs(angle) > 0.15)


def _blur(img, rng, s):
    soft, *_ = _blob(rng, s, 0.08, 0.13)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    blurred = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5) * s / 128)), dtype=float)
    return img * (1 - soft[..., None]) + blurred * soft[..., None], soft > 0.5


def _colour(img, rng, s):
    soft, *_ = _blob(rng, s, 0.07, 0.12)
    if rng.random() < 0.5:
        factor = np.full(3, 1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.18))   # brighter or darker
    else:
        factor = 1 + rng.uniform(-0.15, 0.15, 3)                                  # a tint
    return img * (1 + (factor - 1) * soft[..., None]), soft > 0.5


def _stain(img, rng, s):
    soft, *_ = _blob(rng, s, 0.06, 0.11)
    local = img[soft > 0.5].mean(0) if (soft > 0.5).any() else img.mean((0, 1))
    colour = local + np.array([12, 2, -10]) * rng.choice([-1, 1]) + rng.normal(0, 4, 3)
    alpha = rng.uniform(0.25, 0.4) * soft[..., None]
    return img * (1 - alpha) + colour * alpha, soft > 0.5


def _crack(img, rng, s):
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    width = max(1, round(rng.uniform(1, 2) * s / 128))
    x, y = rng.uniform(0.25, 0.75, 2) * s
    angle = rng.uniform(0, 2 * np.pi)
    tips = [(x, y, angle, 7)]
    while tips:
        x, y, angle, left = tips.pop()
        for _ in range(left):
            angle += rng.normal(0, 0.35)
            step = s * rng.uniform(0.025, 0.045)
            nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
            draw.line([(x, y), (nx, ny)], fill=255, width=width)
            x, y, left = nx, ny, left - 1
            if left > 2 and rng.random() < 0.15:   # a branch
                tips.append((x, y, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0), left // 2))
    line = np.asarray(layer, dtype=float) / 255
    darker = rng.uniform(25, 45)
    return img - darker * line[..., None], line > 0


TEXTURE_DEFECT_FNS = {"warp": _warp, "blur": _blur, "colour": _colour, "stain": _stain, "crack": _crack}


def render(category: str, rng: np.random.Generator, s: int) -> np.ndarray:
    return RENDER[category](rng, s)[0]


def defective(category: str, kind: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (image (s, s, 3) float 0-255, mask (s, s) bool) of one defect of ``kind``."""
    if kind in ("misplaced", "missing"):
        return _board_part_defect(kind, rng, s)
    img = render(category, rng, s)
    return TEXTURE_DEFECT_FNS[kind](img, rng, s)


def _board_part_defect(kind: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Render the same board twice from one generator state, good and defective: the mask is
    where they differ (the part's old and new place)."""
    part = int(rng.integers(len(PARTS)))
    state = rng.bit_generator.state
    good, _ = _board(rng, s)
    rng.bit_generator.state = state
    if kind == "missing":
        bad, _ = _board(rng, s, skip=part)
    elif rng.random() < 0.5 and PARTS[part][0][2] != PARTS[part][0][3]:
        rng.bit_generator.state = state
        bad, _ = _board(rng, s, turn=part)
    else:
        dx, dy = rng.choice([-1, 1], 2) * rng.uniform(3, 6, 2) * s / 128
        rng.bit_generator.state = state
        bad, _ = _board(rng, s, move=(part, dx, dy))
    mask = np.abs(bad - good).max(-1) > 20
    return bad, mask


def to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
