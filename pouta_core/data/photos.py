"""A benchmark of real photographs (``pouta demo-data --difficulty photo``), in the MVTec AD layout.

The demo and hard benchmarks are generated surfaces; a model tuned on them can still fail on a
camera's picture of an irregular natural surface (issue 33: the batched synthesis lost most of
its pixel AP on grass photographs and nothing generated had shown it). These categories are
cut from photographs that install offline with scikit-image (its bundled ``skimage/data``
files, so no download at run time):

- ``grass``: a lawn seen from above (irregular, fine, high contrast);
- ``gravel``: loose stones (irregular, coarse);
- ``brick``: a brick wall (regular: the control, where the batched path did well).

(scikit-image has no other photograph of a homogeneous surface: its ``ihc`` tissue section
mixes structures at this crop size, and the rest are scenes or objects.)

Each photograph (512 x 512) is split into two disjoint bands: training crops come from the
top 60%, test crops (good and defective) from the bottom 36%, with a gap between them, so no
test pixel was ever seen in training. A crop is ``crop`` photograph pixels square (default:
a quarter of the photograph's side), resized to the image size, and flipped left-right half
of the time. Defects are the hard benchmark's texture families (:mod:`pouta_core.data.hard`:
warp, blur, colour, stain, crack) drawn on a test crop, each with its mask. Everything comes
from a seeded generator; the photographs themselves are fixed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from pouta_core.data import hard
from pouta_core.data.errors import DataError

PHOTOS = {"grass": "grass.png", "gravel": "gravel.png", "brick": "brick.png"}
CATEGORIES = tuple(PHOTOS)
DEFECTS = hard.TEXTURE_DEFECTS
TRAIN_BAND = (0.0, 0.60)    # share of the photograph's height
TEST_BAND = (0.64, 1.0)


def photo_path(category: str) -> Path:
    """Where scikit-image keeps the category's photograph; a one-line error without it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("--difficulty photo cuts its images from scikit-image's bundled photographs: "
                        "pip install scikit-image (make install does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / PHOTOS[category]
    if not path.is_file():
        raise DataError(f"{path}: photograph missing from the installed scikit-image")
    return path


def load_photo(category: str) -> np.ndarray:
    """(H, W, 3) float 0-255."""
    with Image.open(photo_path(category)) as img:
        return np.asarray(img.convert("RGB"), dtype=float)


def crop(photo: np.ndarray, rng: np.random.Generator, size: int, split: str, side: int | None = None) -> np.ndarray:
    """A random ``side``-pixel crop from the split's band, resized to ``size``. (size, size, 3)."""
    h, w = photo.shape[:2]
    side = side or min(h, w) // 4
    lo, hi = TRAIN_BAND if split == "train" else TEST_BAND
    top_lo, top_hi = int(lo * h), int(hi * h) - side
    if top_hi < top_lo:
        raise DataError(f"crop of {side} px does not fit the {split} band of a {h} px photograph")
    y = int(rng.integers(top_lo, top_hi + 1))
    x = int(rng.integers(0, w - side + 1))
    patch = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if side != size:
        patch = np.asarray(Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                           dtype=float)
    return np.ascontiguousarray(patch)


def makers(category: str):
    """-> (good image maker (rng, size, split), defective maker (kind, rng, size), defect kinds),
    as :func:`pouta_core.data.demo._makers`."""
    photo = load_photo(category)

    def good(rng: np.random.Generator, size: int, split: str = "train") -> Image.Image:
        return hard.to_image(crop(photo, rng, size, split))

    def bad(kind: str, rng: np.random.Generator, size: int):
        img, mask = hard.TEXTURE_DEFECT_FNS[kind](crop(photo, rng, size, "test"), rng, size)
        return hard.to_image(img), mask

    return good, bad, DEFECTS
