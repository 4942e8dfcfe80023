"""Paired bootstrap over images: is model A better than model B on the same images?

Images are resampled with replacement (within good and within anomalous images, so every
resample has both), each metric is recomputed on the resample for both models, and the
differences give an interval and the probability that A is better. Pixel metrics are
recomputed exactly: every pixel carries its image's resample count as a weight, and the
pixels are sorted once per model, so one resample costs two cumulative sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap")


@dataclass(frozen=True)
class Evidence:
    """One model's output on the validation images: scores (N,), maps (N, H, W), and the
    ground-truth masks (N, H, W) at the maps' size (two models may run at two sizes)."""

    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class BootstrapResult:
    metric: str
    a: float                 # metric of A on the images as they are
    b: float
    low: float               # 2.5% / 97.5% quantiles of the resampled A - B
    high: float
    p_better: float          # share of resamples where A is better than B (ties count as not better)
    resamples: int

    @property
    def delta(self) -> float:
        return self.a - self.b


class _Sorted:
    """Values sorted once (descending) with their 0/1 labels and owning image, and the ends
    of runs of equal values (ties share one threshold)."""

    def __init__(self, values: np.ndarray, labels: np.ndarray, owner: np.ndarray) -> None:
        order = np.argsort(-values, kind="stable")
        v = values[order]
        self.labels = labels[order].astype(np.float64)
        self.owner = owner[order]
        self.ends = np.r_[np.flatnonzero(v[1:] != v[:-1]), v.size - 1]

    def curve(self, image_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = image_weights[self.owner]
        tp = np.cumsum(w * self.labels)[self.ends]
        fp = np.cumsum(w * (1 - self.labels))[self.ends]
        return tp, fp

    def auroc(self, image_weights: np.ndarray) -> float:
        tp, fp = self.curve(image_weights)
        if tp[-1] <= 0 or fp[-1] <= 0:
            return float("nan")
        d_tp, d_fp = np.diff(tp, prepend=0.0), np.diff(fp, prepend=0.0)
        return float(np.sum(d_tp * (fp[-1] - fp + 0.5 * d_fp)) / (tp[-1] * fp[-1]))

    def average_precision(self, image_weights: np.ndarray) -> float:
        tp, fp = self.curve(image_weights)
        if tp[-1] <= 0:
            return float("nan")
        d_tp = np.diff(tp, prepend=0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return float(np.sum(d_tp / tp[-1] * precision))


def _prepare(metric: str, ev: Evidence, labels: np.ndarray) -> tuple[_Sorted, str]:
    n = len(labels)
    if metric == "image_auroc":
        return _Sorted(np.asarray(ev.scores, np.float64).ravel(), labels, np.arange(n)), "auroc"
    maps = np.asarray(ev.maps, np.float32).reshape(n, -1)
    truth = np.asarray(ev.masks).reshape(n, -1) > 0
    owner = np.repeat(np.arange(n), maps.shape[1])
    return _Sorted(maps.ravel(), truth.ravel(), owner), ("auroc" if metric == "pixel_auroc" else "average_precision")


def _side(metric: str, models: Evidence | Sequence[Evidence], labels: np.ndarray):
    """image weights -> the mean metric of one side's models."""
    models = [models] if isinstance(models, Evidence) else list(models)
    if not models:
        raise ValueError("a side of the bootstrap has no model")
    prepared = [_prepare(metric, ev, labels) for ev in models]
    return lambda weights: float(np.mean([getattr(s, f)(weights) for s, f in prepared]))


def paired_bootstrap(metric: str, a: Evidence | Sequence[Evidence], b: Evidence | Sequence[Evidence],
                     labels: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> BootstrapResult:
    """A vs B on the same N images (labels (N,) 0/1, in the same order for both). Higher is
    better for every metric here.

    A side may be several models (one config trained on several seeds): its value is the mean
    of their metrics, on the original images and on each resample of them, so the interval
    covers the images' sampling while the seeds' spread is averaged out."""
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"the bootstrap gate supports {', '.join(BOOTSTRAP_METRICS)}; got '{metric}'")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    labels = np.asarray(labels).ravel()
    side_a, side_b = _side(metric, a, labels), _side(metric, b, labels)
    ones = np.ones(len(labels))
    value_a, value_b = side_a(ones), side_b(ones)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == k) for k in (0, 1)]
    diffs = np.empty(resamples)
    for r in range(resamples):
        counts = np.zeros(len(labels))
        for g in groups:
            if g.size:
                np.add.at(counts, rng.choice(g, size=g.size, replace=True), 1.0)
        diffs[r] = side_a(counts) - side_b(counts)
    diffs = diffs[np.isfinite(diffs)]
    if not diffs.size:
        return BootstrapResult(metric, value_a, value_b, float("nan"), float("nan"), 0.0, 0)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return BootstrapResult(metric, value_a, value_b, float(low), float(high), float(np.mean(diffs > 0)),
                           int(diffs.size))
