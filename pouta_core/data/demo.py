"""An offline demo data set in the MVTec AD layout.

Categories of distinct appearance (textures and objects), ``train/good``, ``test/good`` and
three defect types with masks: scratches, stains and missing pieces. The defects are drawn
by code that shares nothing with the training synthesis (no Perlin noise, no texture
blending), so a good score on them is not the model recognising its own synthesis.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pouta_core.data import hard, photos
from pouta_core.data.errors import DataError

CATEGORIES = ("tiles", "pills", "weave", "screws")
DEFECTS = ("scratch", "stain", "missing")


def _tiles(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    base = np.array([180, 120, 90]) + rng.normal(0, 6, 3)
    img = np.empty((s, s, 3))
    img[:] = base
    n = 4
    cell = s / n
    for i in range(n):
        for j in range(n):
            img[int(i * cell):int((i + 1) * cell), int(j * cell):int((j + 1) * cell)] += rng.normal(0, 6, 3)
    grout = max(2, s // 40)
    for k in range(n + 1):
        p = int(k * cell)
        img[max(0, p - grout // 2):p + grout // 2 + 1] = 70
        img[:, max(0, p - grout // 2):p + grout // 2 + 1] = 70
    img += rng.normal(0, 5, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), np.ones((s, s), bool)


def _weave(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    y, x = np.mgrid[0:s, 0:s] / s
    f = 10 + rng.uniform(-0.3, 0.3)
    ph = rng.uniform(0, 2 * np.pi, 2)
    pattern = 0.5 + 0.25 * np.sin(2 * np.pi * f * x + ph[0]) * np.sign(np.sin(2 * np.pi * f * y + ph[1]))
    colour = np.array([70, 110, 160]) + rng.normal(0, 4, 3)
    img = pattern[..., None] * colour[None, None] * 1.6 + rng.normal(0, 4, (s, s, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), np.ones((s, s), bool)


def _pills(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    img = Image.new("RGB", (s, s), (25, 25, 30))
    draw = ImageDraw.Draw(img)
    cx, cy = s / 2 + rng.normal(0, s / 64, 2)
    rx, ry = s * 0.36, s * 0.22
    colour = tuple(int(c) for c in np.array([235, 225, 200]) + rng.normal(0, 4, 3))
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    draw.line([cx, cy - ry * 0.8, cx, cy + ry * 0.8], fill=(190, 180, 160), width=max(1, s // 64))
    for _ in range(12):  # the pill's normal speckles
        px, py = cx + rng.uniform(-rx * 0.7, rx * 0.7), cy + rng.uniform(-ry * 0.6, ry * 0.6)
        draw.point((px, py), fill=(200, 80, 60))
    arr = np.asarray(img).astype(float) + rng.normal(0, 3, (s, s, 3))
    yy, xx = np.mgrid[0:s, 0:s]
    fg = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), fg


def _screws(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    img = Image.new("RGB", (s, s), (210, 210, 205))
    draw = ImageDraw.Draw(img)
    angle = rng.uniform(0, np.pi)
    c = np.array([s / 2, s / 2]) + rng.normal(0, s / 40, 2)
    d = np.array([math.cos(angle), math.sin(angle)])
    length, width = s * 0.32, s * 0.06
    a, b = c - d * length, c + d * length
    draw.line([*a, *b], fill=(90, 90, 95), width=int(width * 2))
    head = c - d * length
    draw.ellipse([head[0] - width * 1.8, head[1] - width * 1.8, head[0] + width * 1.8, head[1] + width * 1.8],
                 fill=(70, 70, 75))
    for t in np.linspace(-0.7, 0.95, 12):  # threads
        p = c + d * length * t
        n = np.array([-d[1], d[0]]) * width
        draw.line([*(p - n), *(p + n)], fill=(140, 140, 145), width=max(1, s // 100))
    arr = np.asarray(img).astype(float) + rng.normal(0, 3, (s, s, 3))
    fg = np.asarray(img.convert("L")) < 180
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), fg


RENDER = {"tiles": _tiles, "pills": _pills, "weave": _weave, "screws": _screws}


def _point_in(fg: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    ys, xs = np.nonzero(fg[margin:-margin, margin:-margin])
    k = rng.integers(len(ys))
    return int(xs[k]) + margin, int(ys[k]) + margin


def _scratch_stroke(fg: np.ndarray, rng: np.random.Generator, s: int) -> np.ndarray:
    """A bent line of five points starting on the object, (s, s) bool."""
    x, y = _point_in(fg, rng, s // 8)
    pts = [(x, y)]
    ang = rng.uniform(0, 2 * np.pi)
    for _ in range(4):
        ang += rng.normal(0, 0.3)
        step = s * rng.uniform(0.05, 0.09)
        x, y = x + step * math.cos(ang), y + step * math.sin(ang)
        pts.append((x, y))
    layer = Image.new("L", (s, s), 0)
    ImageDraw.Draw(layer).line(pts, fill=255, width=max(2, s // 32))
    return np.asarray(layer) > 0


def _defect(kind: str, img: Image.Image, fg: np.ndarray, rng: np.random.Generator
            ) -> tuple[Image.Image, np.ndarray]:
    s = img.size[0]
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    out = img.copy()
    if kind == "scratch":
        # A scratch is on the object: strokes that mostly leave it are drawn again (a few
        # tries), and the part of the stroke off the object is neither drawn nor masked, or
        # the mask would mark background pixels no model can tell apart.
        for _ in range(20):
            stroke = _scratch_stroke(fg, rng, s)
            if (stroke & fg).sum() >= 0.8 * stroke.sum():
                break
        layer = Image.fromarray((stroke & fg).astype(np.uint8) * 255)
        # A scratch exposes material that contrasts with the surface around it.
        local = np.asarray(img)[np.asarray(layer) > 0].mean()
        colour = (25, 25, 25) if local > 110 else (240, 240, 240)
        out.paste(Image.new("RGB", (s, s), colour), mask=layer)
    elif kind == "stain":
        x, y = _point_in(fg, rng, s // 6)
        r = s * rng.uniform(0.06, 0.1)
        draw.ellipse([x - r, y - r * rng.uniform(0.6, 1.0), x + r, y + r * rng.uniform(0.6, 1.0)], fill=255)
        layer = layer.filter(ImageFilter.GaussianBlur(r / 4))
        colour = tuple(int(c) for c in rng.choice([[110, 70, 20], [40, 90, 40], [150, 30, 30]]))
        alpha = (np.asarray(layer) / 255.0 * 0.85 * 255 * fg).astype(np.uint8)  # stains stay on the object
        out.paste(Image.new("RGB", (s, s), colour), mask=Image.fromarray(alpha))
        layer = Image.fromarray((((np.asarray(layer) > 76) & fg) * 255).astype(np.uint8))
    else:  # missing piece: cut out and filled with the background (or a dark hole for textures)
        x, y = _point_in(fg, rng, s // 6)
        r = s * rng.uniform(0.07, 0.11)
        corners = [(x + r * math.cos(t), y + r * math.sin(t))
                   for t in np.sort(rng.uniform(0, 2 * np.pi, 6))]
        draw.polygon(corners, fill=255)
        bg = np.asarray(img)[~fg].mean(0) if (~fg).any() else np.array([15, 15, 15])
        # only the part of the cut that was on the object is changed, and is the defect
        layer = Image.fromarray(((np.asarray(layer) > 0) & fg).astype(np.uint8) * 255)
        out.paste(Image.new("RGB", (s, s), tuple(int(c) for c in bg)), mask=layer)
    return out, np.asarray(layer) > 0


def _makers(name: str, difficulty: str):
    """-> (good image maker (rng, size, split), defective image maker, defect kinds) of a
    category; only the photographs (:mod:`pouta_core.data.photos`) cut train and test images
    from different places."""
    if difficulty == "photo":
        return photos.makers(name)
    if difficulty == "hard":
        def hard_bad(kind: str, rng: np.random.Generator, s: int):
            img, mask = hard.defective(name, kind, rng, s)
            return hard.to_image(img), mask

        return (lambda rng, s, split=None: hard.to_image(hard.render(name, rng, s))), hard_bad, hard.DEFECTS[name]

    def bad(kind: str, rng: np.random.Generator, s: int):
        img, fg = RENDER[name](rng, s)
        return _defect(kind, img, fg, rng)

    return (lambda rng, s, split=None: RENDER[name](rng, s)[0]), bad, DEFECTS


def generate(out: str | Path, *, categories: int = 2, image_size: int = 128, n_train: int = 60,
             n_test_good: int = 12, n_test_defect: int = 8, seed: int = 0, force: bool = False,
             difficulty: str = "easy") -> list[str]:
    """Write ``categories`` categories under ``out``; each is built in a temporary folder and
    renamed into place, so an interrupted run leaves nothing half-written. ``difficulty``:
    ``easy`` (this module's data), ``hard`` (:mod:`pouta_core.data.hard`) or ``photo``
    (:mod:`pouta_core.data.photos`: real photographs). -> category names."""
    available = {"easy": CATEGORIES, "hard": hard.CATEGORIES, "photo": photos.CATEGORIES}.get(difficulty)
    if available is None:
        raise DataError(f"--difficulty must be easy, hard or photo, got {difficulty!r}")
    if not 1 <= categories <= len(available):
        raise DataError(f"--categories must be in [1, {len(available)}], got {categories}")
    if image_size < 32:
        raise DataError(f"--image-size must be >= 32, got {image_size}")
    for flag, n in (("--test-good", n_test_good), ("--test-defect", n_test_defect)):
        if n < 1:
            raise DataError(f"{flag} must be >= 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(available[:categories])
    for ci, name in enumerate(names):
        final = out / name
        if final.exists():
            if not force:
                raise DataError(f"{final}: already exists (use --force to regenerate)")
            shutil.rmtree(final)
        rng = np.random.default_rng([seed, ci])
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            good, bad_one, kinds = _makers(name, difficulty)
            for split, n in (("train", n_train), ("test", n_test_good)):
                (tmp / split / "good").mkdir(parents=True)
                for i in range(n):
                    good(rng, image_size, split).save(tmp / split / "good" / f"{i:03d}.png")
            for kind in kinds:
                (tmp / "test" / kind).mkdir(parents=True)
                (tmp / "ground_truth" / kind).mkdir(parents=True)
                for i in range(n_test_defect):
                    bad, mask = bad_one(kind, rng, image_size)
                    bad.save(tmp / "test" / kind / f"{i:03d}.png")
                    Image.fromarray((mask * 255).astype(np.uint8)).save(
                        tmp / "ground_truth" / kind / f"{i:03d}_mask.png")
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return names
