"""Decode, validate and resize images and masks; cache the results so later epochs (and
later runs) do not decode PNGs again."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pouta_core.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
STRAY_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its subfolders with ``recursive``), sorted; any other
    file is skipped with a log line."""
    out = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._"):
            out.append(p)
        elif p.is_file():
            log.info("skipping non-image file %s", p)
    return out


def _open(path: Path) -> Image.Image:
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__})") from None


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__})") from None


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB uint8 (3, size, size); greyscale images are replicated to three channels."""
    img = _open(Path(path)).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def load_mask(path: Path, size: int, image_path: Path | None = None) -> torch.Tensor:
    """Binary uint8 (1, size, size): any nonzero pixel is anomalous. When ``image_path`` is
    given, the mask must have that image's size."""
    img = _open(Path(path))
    if image_path is not None and img.size != image_size_of(image_path):
        raise DataError(
            f"{path}: mask is {img.size[0]}x{img.size[1]} but its image {image_path} is "
            "{}x{}".format(*image_size_of(image_path))
        )
    arr = np.asarray(img.convert("L").resize((size, size), Image.NEAREST)) > 0
    return torch.from_numpy(arr.astype(np.uint8))[None]


class ImageCache:
    """Decoded, resized uint8 tensors in memory, and optionally on disk (``.npy`` files keyed
    by path, modification time, file size and target size, so an edited file is re-read)."""

    def __init__(self, size: int, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.size = size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[tuple[str, str], torch.Tensor] = {}

    def _key(self, path: Path, kind: str) -> str:
        st = path.stat()
        raw = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.size}|{kind}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def get(self, path: Path, kind: str = "image", image_path: Path | None = None) -> torch.Tensor:
        mkey = (str(path), kind)
        if mkey in self._mem:
            return self._mem[mkey]
        disk = None
        if self.cache_dir is not None and path.exists():
            disk = self.cache_dir / f"{self._key(path, kind)}.npy"
            if disk.exists():
                t = torch.from_numpy(np.load(disk))
                self._mem[mkey] = t
                return t
        t = load_image(path, self.size) if kind == "image" else load_mask(path, self.size, image_path)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=disk.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, t.numpy())
            os.replace(tmp, disk)
        self._mem[mkey] = t
        return t

    def images(self, paths: Iterable[Path]) -> list[torch.Tensor]:
        return [self.get(p) for p in paths]
