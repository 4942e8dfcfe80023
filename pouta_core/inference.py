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


class MapModel(nn.Module):
    """A single-output module for serving (MLflow pyfunc): image (B, 3, H, W) in [0, 1] ->
    anomaly map (B, 1, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).anomaly_map


class ScoreModel(MapModel):
    """The same for the image score: image (B, 3, H, W) in [0, 1] -> score (B,), computed as
    the checkpoint's scoring keys say, with its stored normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).score
