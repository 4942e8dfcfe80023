"""Anomaly sources I_aug (paper §3.1): an unrelated image fused with a transformed copy of
the original. The unrelated image comes from a texture folder (DTD's ``images/<class>/*.jpg``
or any folder of images) or, offline, from procedural coloured fractal noise."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from pouta_core.synthesis.perlin import fractal_noise

log = logging.getLogger(__name__)


def procedural_notice(texture_dir: str | Path | None, self_source_ratio: float) -> str | None:
    """The one line a command prints when procedural noise stands in for the paper's anomaly
    source (DTD, Cimpoi et al. 2014), or None: a texture folder is given, or every source is the
    image's own copy (``self_source_ratio=1``). Issue 50: the substitution was silent."""
    if texture_dir or self_source_ratio >= 1.0:
        return None
    return ("anomaly sources: procedural fractal noise, not the paper's DTD textures (no --texture-dir); give "
            "--texture-dir /path/to/dtd/images (docs/training.md), or --procedural-source to choose it and "
            "silence this")


def _u(generator: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi, generator=generator))


def procedural_texture(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Coloured fractal noise: two random colours mixed by per-channel fractal noise. (3, h, w)."""
    colours = torch.rand(2, 3, 1, 1, generator=generator)
    mix = torch.stack([fractal_noise(h, w, generator) for _ in range(3)])
    return torch.lerp(colours[0], colours[1], mix).clamp(0, 1)


class TextureFolder:
    """Every image under ``root`` (recursively), decoded and resized on first use, then kept.

    After :meth:`bank` every texture is in one uint8 tensor that :meth:`sample` reads. A
    DataLoader's workers are forked after :func:`pouta_core.training.make_loader` calls it, so
    they share that tensor's pages with their parent instead of each decoding (and holding)
    its own copy: DTD's 5,640 images at 224 are about 850 MB, once per process before."""

    def __init__(self, root: str | Path, size: int) -> None:
        from pouta_core.data.images import list_images  # local: pouta_core.data imports synthesis

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: texture folder does not exist")
        self.paths = list_images(self.root, recursive=True)
        if not self.paths:
            raise FileNotFoundError(f"{self.root}: no images in texture folder")
        self.size = size
        self._cache: dict[int, torch.Tensor] = {}   # decoded on first use, before bank()
        self._bank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def bank(self, progress: bool = False) -> torch.Tensor:
        """Every texture decoded once, as one (N, 3, size, size) uint8 tensor: the batched
        synthesis's source bank (move it to the training device once), and from then on what
        :meth:`sample` reads. Decoded once per folder object; do not write into it."""
        if self._bank is None:
            from tqdm.auto import tqdm

            from pouta_core.data.images import load_image

            bank = torch.empty((len(self.paths), 3, self.size, self.size), dtype=torch.uint8)
            for i in tqdm(range(len(self.paths)), desc="textures", disable=not progress, leave=False):
                cached = self._cache.pop(i, None)
                bank[i] = cached if cached is not None else load_image(self.paths[i], self.size)
            self._bank = bank
        return self._bank

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        from pouta_core.data.images import load_image  # local, as in __init__

        i = int(torch.randint(len(self.paths), (), generator=generator))
        if self._bank is not None:
            return self._bank[i].float() / 255.0
        if i not in self._cache:
            self._cache[i] = load_image(self.paths[i], self.size)
        return self._cache[i].float() / 255.0


def _posterize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    bits = int(torch.randint(2, 6, (), generator=g))
    return TF.posterize(TF.to_dtype(x, torch.uint8, scale=True), bits).float() / 255.0


def _equalize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return TF.equalize(TF.to_dtype(x, torch.uint8, scale=True)).float() / 255.0


# DRAEM's list of source augmentations, as torchvision.transforms.v2 functions with
# parameters drawn from the caller's generator, so a seed reproduces them exactly.
AUGMENTATIONS = (
    lambda x, g: TF.adjust_gamma(x, _u(g, 0.5, 2.0)),
    lambda x, g: TF.adjust_brightness(x, _u(g, 0.8, 1.2)) + _u(g, -0.1, 0.1),
    lambda x, g: TF.adjust_sharpness(x, _u(g, 0.0, 3.0)),
    lambda x, g: TF.adjust_hue(TF.adjust_saturation(x, _u(g, 0.5, 1.5)), _u(g, -0.2, 0.2)),
    lambda x, g: TF.solarize(x, _u(g, 0.1, 0.9)),
    _posterize,
    lambda x, g: TF.invert(x),
    lambda x, g: TF.autocontrast(x),
    _equalize,
    lambda x, g: TF.affine(x, angle=_u(g, -45, 45), translate=[0, 0], scale=1.0, shear=[0.0, 0.0]),
)


def augment(x: torch.Tensor, generator: torch.Generator, n: int = 3) -> torch.Tensor:
    """Apply ``n`` distinct augmentations from AUGMENTATIONS in random order. (3, h, w) in [0, 1]."""
    for i in torch.randperm(len(AUGMENTATIONS), generator=generator)[:n].tolist():
        x = AUGMENTATIONS[i](x, generator).clamp(0, 1)
    return x


def self_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The transformed copy of the original: a translation, a rotation or the identity."""
    choice = int(torch.randint(3, (), generator=generator))
    h, w = x.shape[-2:]
    if choice == 0:
        dy, dx = torch.randint(-h // 2, h // 2 + 1, (2,), generator=generator).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if choice == 1:
        return TF.rotate(x, _u(generator, -180, 180), interpolation=TF.InterpolationMode.BILINEAR,
                         fill=[float(c) for c in x.mean(dim=(1, 2))])
    return x


def anomaly_source(
    image: torch.Tensor, generator: torch.Generator, textures: TextureFolder | None = None, *,
    self_only: bool = False
) -> torch.Tensor:
    """I_aug: an augmented unrelated image fused with a transformed copy of ``image``.

    The fusion weight of the unrelated image is drawn in [0.5, 1): the source must look
    foreign, while the self part borrows the product's own colours and structures. With
    ``self_only`` (config ``self_source_ratio``) the weight is 0: the source is the image's
    own transformed copy, locally normal content only the contrast can reveal."""
    h, w = image.shape[-2:]
    foreign = textures.sample(generator) if textures is not None else procedural_texture(h, w, generator)
    foreign = augment(foreign, generator)
    weight = _u(generator, 0.5, 1.0)   # drawn either way, as before self_only existed
    if self_only:
        weight = 0.0
    return (weight * foreign + (1 - weight) * self_transform(image, generator)).clamp(0, 1)
