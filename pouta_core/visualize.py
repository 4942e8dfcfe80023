"""A PNG grid of test images, their anomaly heat maps and ground-truth masks."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """Blend a red-yellow heat map over the image, opaque in proportion to the score:
    image (H, W, 3) float in [0, 255], amap (H, W) in [0, 1] -> (H, W, 3) uint8."""
    heat = np.stack([np.ones_like(amap), amap, np.zeros_like(amap)], axis=-1) * 255
    alpha = (0.6 * amap)[..., None]
    return (image * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)


def heatmap_grid(images: np.ndarray, maps: np.ndarray, masks: np.ndarray, scores: np.ndarray | None = None,
                 max_rows: int = 8) -> Image.Image:
    """images (N, 3, H, W) uint8, maps (N, H, W) in [0, 1], masks (N, H, W) 0/1 ->
    an image with one row per sample: image | heat map over image | mask."""
    n = min(len(images), max_rows)
    h, w = images.shape[-2:]
    grid = Image.new("RGB", (3 * w, n * h), (0, 0, 0))
    for i in range(n):
        img = images[i].transpose(1, 2, 0).astype(float)
        mask = np.repeat((masks[i] > 0)[..., None] * 255.0, 3, axis=-1)
        for j, tile in enumerate((img, overlay(img, maps[i]), mask)):
            grid.paste(Image.fromarray(tile.clip(0, 255).astype(np.uint8)), (j * w, i * h))
        if scores is not None:
            ImageDraw.Draw(grid).text((w + 2, i * h + 2), f"{scores[i]:.3f}", fill=(255, 255, 255))
    return grid


def select_examples(labels: np.ndarray, scores: np.ndarray, k: int = 8) -> np.ndarray:
    """Indices of up to k samples: the highest-scoring anomalous ones and normal ones, mixed."""
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    a = anomalous[np.argsort(-scores[anomalous])][: (k + 1) // 2]
    b = normal[np.argsort(-scores[normal])][: k - len(a)]
    return np.concatenate([a, b]).astype(int)
