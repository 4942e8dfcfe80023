"""Image- and pixel-level metrics of the MVTec AD protocol, exact and fast.

Every curve is computed exactly, ties included, from sorted scores: the negatives are
sorted once and each distinct positive score is located in them with ``searchsorted``.
Only the (few) positive scores are ever arg-sorted, so MVTec AD's whole test set
(~87M pixels) takes seconds and memory proportional to the float32 scores.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AUPRO_FPR_LIMIT = 0.3


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    scores = scores.astype(np.float64 if scores.dtype == np.float64 else np.float32, copy=False).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    return np.sort(scores[~labels]), scores[labels]


class Ranking:
    """Scores split by label, the negatives sorted once, and the curve at each distinct
    positive score u (descending): TP(u) = #pos >= u, FP(u) = #neg >= u, FP_gt(u) = #neg > u.
    Every metric of a set of scores reads one Ranking (:func:`compute` sorts each split's
    pixels once, not once per metric)."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.neg, self.pos = _split(scores, labels)
        if self.pos.size:
            u, counts = np.unique(self.pos, return_counts=True)
            self.u, self.counts = u[::-1], counts[::-1]
            self.tp = np.cumsum(self.counts)
            n = self.neg.size
            self.fp = n - np.searchsorted(self.neg, self.u, side="left")
            self.fp_gt = n - np.searchsorted(self.neg, self.u, side="right")

    def auroc(self) -> float:
        if self.neg.size == 0 or self.pos.size == 0:
            return float("nan")
        below = self.neg.size - self.fp          # negatives strictly below u
        ties = self.fp - self.fp_gt
        return float(np.sum(self.counts * (below + 0.5 * ties)) / (self.pos.size * self.neg.size))

    def average_precision(self) -> float:
        if self.pos.size == 0:
            return float("nan")
        return float(np.sum(self.counts / self.pos.size * (self.tp / (self.tp + self.fp))))

    def f1_max(self) -> tuple[float, float]:
        if self.pos.size == 0:
            return float("nan"), float("nan")
        f1 = 2 * self.tp / (2 * self.tp + self.fp + (self.pos.size - self.tp))
        k = int(np.argmax(f1))
        return float(f1[k]), float(self.u[k])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(s_pos > s_neg) + P(s_pos = s_neg) / 2: equal to sklearn's roc_auc_score."""
    return Ranking(scores, labels).auroc()


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """sum over thresholds of (R_k - R_(k-1)) P_k: equal to sklearn's average_precision_score."""
    return Ranking(scores, labels).average_precision()


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it (score >= t is anomalous).
    The best threshold is always one of the positive scores."""
    return Ranking(scores, labels).f1_max()


def fpr_threshold(scores: np.ndarray, labels: np.ndarray, rate: float) -> float:
    """The lowest image threshold at which at most ``rate`` of the good images (label 0) score
    ``>= threshold``: just above the good score ranked ``floor(rate * n_good) + 1`` from the
    top (with ``rate * n_good < 1``, just above the highest good score). NaN without good
    images. On n good images the false-alarm rate a new good image meets is about
    ``(floor(rate * n) + 1) / (n + 1)``: a rate below ``1 / n`` cannot be shown on n images."""
    neg, _ = _split(scores, labels)
    if neg.size == 0:
        return float("nan")
    allowed = int(np.floor(rate * neg.size + 1e-9))
    if allowed >= neg.size:
        return float(neg[0])
    return float(np.nextafter(neg[neg.size - 1 - allowed], np.inf))


def decision_threshold(scores: np.ndarray, labels: np.ndarray, false_alarms: float | None) -> float:
    """The image threshold ``Config.threshold_policy`` sets on these images: :func:`fpr_threshold`
    at the budget ``false_alarms`` (``Config.false_alarm_budget``), the F1-max when None."""
    return f1_max(scores, labels)[1] if false_alarms is None else fpr_threshold(scores, labels, false_alarms)


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """What deciding ``score >= threshold`` does on these images: ``false_alarm_rate`` (share
    of good images flagged) and ``miss_rate`` (share of defective images passed); NaN where a
    class is absent or the threshold is not a number."""
    neg, pos = _split(scores, labels)
    ok = np.isfinite(threshold)
    return {"false_alarm_rate": float(np.mean(neg >= threshold)) if neg.size and ok else float("nan"),
            "miss_rate": float(np.mean(pos < threshold)) if pos.size and ok else float("nan")}


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label connected anomalous regions (8-connectivity) with ids unique across images."""
    out = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    structure = np.ones((3, 3), dtype=bool)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m > 0, structure=structure)
        out[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    return out, offset


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT, *,
          neg_sorted: np.ndarray | None = None) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` false positive rate,
    divided by ``fpr_limit`` (MVTec AD's definition, normalised to [0, 1]).

    PRO(t) is the mean over ground-truth regions (8-connected components) of the share of
    the region's pixels scoring >= t; FPR(t) the share of normal pixels scoring >= t. The
    curve is integrated with the trapezoid rule over every distinct threshold, as MVTec's
    reference code does, and cut at ``fpr_limit`` by linear interpolation. ``neg_sorted``: the
    normal pixels' scores already sorted (a :class:`Ranking`'s ``neg``), not sorted again."""
    maps = np.asarray(anomaly_maps, dtype=np.float32).reshape(np.shape(masks))
    regions, n_regions = _regions(np.asarray(masks))
    labels = regions.ravel() > 0
    if n_regions == 0 or labels.all():
        return float("nan")
    scores = maps.ravel()
    neg = np.sort(scores[~labels]) if neg_sorted is None else neg_sorted
    pos = scores[labels]
    ids = regions.ravel()[labels]
    sizes = np.bincount(ids, minlength=n_regions + 1)
    weights = 1.0 / (sizes[ids] * n_regions)     # each region contributes 1 / n_regions in total
    order = np.argsort(-pos, kind="stable")
    pos, weights = pos[order], weights[order]
    # Distinct positive thresholds, descending, with PRO at each.
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    u = pos[starts]
    pro = np.cumsum(weights)[np.r_[starts[1:] - 1, pos.size - 1]]
    n = neg.size
    fpr_ge = (n - np.searchsorted(neg, u, side="left")) / n
    fpr_gt = (n - np.searchsorted(neg, u, side="right")) / n
    # Curve points: before each threshold PRO holds its previous value while FPR rises to
    # FPR_>(u); at u both jump to (FPR_>=(u), PRO(u)). Then (1, 1) at the lowest threshold.
    pro_prev = np.r_[0.0, pro[:-1]]
    x = np.concatenate([[0.0], np.column_stack([fpr_gt, fpr_ge]).ravel(), [1.0]])
    y = np.concatenate([[0.0], np.column_stack([pro_prev, pro]).ravel(), [pro[-1]]])
    return _partial_trapezoid(x, y, fpr_limit) / fpr_limit


def _partial_trapezoid(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit:
        j = int(np.argmax(x > limit))
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def compute(image_scores, image_labels, anomaly_maps, masks) -> dict[str, float]:
    """image_scores (N,), image_labels (N,) 0/1, anomaly_maps (N, H, W) or (N, 1, H, W),
    masks of the same shape as the maps, 0/1. Metrics that a split cannot define (no
    anomalous image, no annotated pixel) are NaN. The pixels' scores are sorted once for the
    four pixel metrics (one :class:`Ranking`), the images' once for the two image metrics.

    -> image_auroc, image_f1max, pixel_auroc, pixel_ap, pixel_aupro, pixel_f1max."""
    image_scores = np.asarray(image_scores, dtype=np.float64).ravel()
    image_labels = np.asarray(image_labels).ravel()
    maps = np.asarray(anomaly_maps, dtype=np.float32)
    masks = np.asarray(masks)
    if maps.ndim == 4:
        maps, masks = maps[:, 0], masks.reshape(maps.shape)[:, 0]
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {masks.shape} differ in shape")
    images, pixels = Ranking(image_scores, image_labels), Ranking(maps.ravel(), masks.ravel() > 0)
    return {
        "image_auroc": images.auroc(),
        "image_f1max": images.f1_max()[0],
        "pixel_auroc": pixels.auroc(),
        "pixel_ap": pixels.average_precision(),
        "pixel_aupro": aupro(maps, masks, neg_sorted=pixels.neg),
        "pixel_f1max": pixels.f1_max()[0],
    }
