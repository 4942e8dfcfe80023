"""Score encoded images, one answer per image: what a served model computes.

``orchestrator.tracking.serving`` wraps :class:`ImageScorer` as an MLflow pyfunc (this module
stays free of MLflow). Each image is decoded by the rules files are (:func:`decode_rgb`: EXIF
orientation, 16-bit, alpha, decompression bombs refused), resized to the model's input and
scored in batches; an image that cannot be read gets an ``error`` entry and the others are
still scored. The scores are those ``pouta predict`` gives for the same files.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pouta_core import checkpoint as ckpt
from pouta_core.config import ConfigError
from pouta_core.data.errors import DataError
from pouta_core.data.images import decode_rgb, model_input
from pouta_core.inference import predict, resize_map
from pouta_core.training import resolve_device

# What each answer holds, in this order; absent values are None.
FIELDS = ("score", "anomalous", "threshold", "threshold_policy", "map", "error")
# Map values are probabilities in [0, 1]: 6 decimals keep what float32 holds that matters and
# make the JSON about 2.5 times smaller than float32's full repr (17 digits).
MAP_DECIMALS = 6


def _bytes_of(item: str | bytes, name: str) -> bytes:
    """An image as sent: raw bytes, or a base64 string (a ``data:image/...;base64,`` URL too)."""
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if not isinstance(item, str):
        raise DataError(f"{name}: expected a base64 string, got {type(item).__name__}")
    text = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{name}: not valid base64") from None


def map_shape(height: int, width: int, map_size: int | None) -> tuple[int, int] | None:
    """The shape of the returned map: the input's own (None), no map (0), or a longer side
    of ``map_size`` pixels with the input's aspect ratio."""
    if map_size is None:
        return height, width
    if map_size < 0:
        raise ConfigError(f"map_size must be >= 0 (0: no map; absent: the input's size), got {map_size}")
    if map_size == 0:
        return None
    scale = map_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def threshold_policy(state: dict[str, Any]) -> str | None:
    """The policy that set a checkpoint's stored threshold (``Config.threshold_policy``); ``f1``
    for checkpoints written before the key existed (they stored the F1-max); None when none is
    stored."""
    if state.get("threshold") is None:
        return None
    return (state.get("config") or {}).get("threshold_policy", "f1")


def decision_line(state: dict[str, Any], threshold: float | None = None) -> str:
    """One line that says which threshold decides ``anomalous`` and what it was expected to do:
    the caller's ``threshold``, else the stored one with its policy and the false alarms and
    misses it made on the validation images it was set on."""
    if threshold is not None:
        return f"threshold {float(threshold):.6g} (given by the caller; the stored one is not used)"
    policy = threshold_policy(state)
    if policy is None:
        return "no threshold stored: pass one"
    metrics = state.get("metrics") or {}
    far, miss = metrics.get("val_false_alarm_rate"), metrics.get("val_miss_rate")
    said = (f": on validation it flagged {far:.1%} of the good images and passed {miss:.1%} of the defective ones"
            if isinstance(far, float) and isinstance(miss, float) and far == far and miss == miss else "")
    return f"threshold {float(state['threshold']):.6g} set by {policy} on the validation images{said}"


class ImageScorer:
    """A trained checkpoint, ready to score encoded images."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model, self.config, state = ckpt.load_model(checkpoint, self.device)
        ckpt.require_calibrated(self.model, checkpoint)
        stored = state.get("threshold")
        self.threshold = float(stored) if stored is not None else None
        self.policy = threshold_policy(state)
        self.decision = decision_line(state)
        self.bits = ckpt.bit_depth(state)

    def score(self, images: Sequence[str | bytes], *, threshold: float | None = None, map_size: int | None = None,
              batch_size: int = 16) -> list[dict[str, Any]]:
        """One answer per image, in order: ``score``; ``anomalous`` (``score >= threshold``,
        with ``threshold`` if given, else the one stored at training time; None when there is
        neither); ``threshold``; ``threshold_policy`` (what set it: ``request``, or the stored
        threshold's policy, e.g. ``fpr:0.01``); ``map`` (the anomaly map as nested lists of rows, see
        :func:`map_shape`, rounded to :data:`MAP_DECIMALS`); ``error`` (why the image could not be read, else None)."""
        limit = self.threshold if threshold is None else float(threshold)
        policy = self.policy if threshold is None else "request"
        map_shape(1, 1, map_size)                       # a bad map_size fails the request, not each image
        answers: list[dict[str, Any]] = [dict.fromkeys(FIELDS) for _ in images]
        decoded: list[tuple[int, np.ndarray]] = []
        for i, item in enumerate(images):
            try:
                decoded.append((i, decode_rgb(_bytes_of(item, f"image {i}"), f"image {i}", self.bits)))
            except DataError as exc:
                answers[i]["error"] = str(exc)
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start:start + batch_size]
            batch = torch.stack([model_input(rgb, self.config.image_size) for _, rgb in chunk])
            scores, maps = predict(self.model, batch, device=self.device, batch_size=batch_size)
            for (i, rgb), score, amap in zip(chunk, scores, maps, strict=True):
                shape = map_shape(*rgb.shape[:2], map_size)
                answers[i].update(score=float(score), threshold=limit, threshold_policy=policy,
                                  anomalous=None if limit is None else bool(score >= limit),
                                  map=None if shape is None else
                                  np.round(resize_map(amap, shape).astype(np.float64), MAP_DECIMALS).tolist())
        return answers
