"""Batched inference: anomaly maps and image scores for uint8 or float images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
            batch_size: int = 16, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """images (N, 3, H, W), uint8 or float in [0, 1] -> (scores (N,), maps (N, H, W)) float32."""
    model.eval()
    scores, maps = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="inference", disable=not progress, leave=False):
        x = images[start:start + batch_size]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        out = model(x.to(device))
        scores.append(out.score.float().cpu())
        maps.append(out.anomaly_map[:, 0].float().cpu())
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, *images.shape[-2:]), np.float32)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


class ExportWrapper(nn.Module):
    """What an exported model computes: image (B, 3, H, W) in [0, 1] -> (anomaly_map
    (B, 1, H, W), score (B,))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.anomaly_map, out.score


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An anomaly map (h, w) resized to ``shape`` (bilinear), float32."""
    if tuple(amap.shape) == tuple(shape):
        return np.asarray(amap, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()
