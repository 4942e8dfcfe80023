"""A DTD-like texture folder for `make bench-synthesis`: 40 smooth random colour images of
640x480 (DTD's images are 300 to 640 px), JPEG, seeded. Usage: make_textures.py OUT"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        small = torch.rand(1, 3, 24, 32, generator=g)
        image = F.interpolate(small, size=(480, 640), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        pixels = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"texture-{i:02d}.jpg", quality=90)
    print(f"{folder}: 40 textures")


if __name__ == "__main__":
    main(sys.argv[1])
