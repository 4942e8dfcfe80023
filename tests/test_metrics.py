import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pouta_core import metrics


@pytest.fixture(params=[0, 1, 2])
def tied_scores(request):
    rng = np.random.default_rng(request.param)
    labels = rng.random(20_000) < 0.05
    scores = np.round(rng.random(20_000) * 0.8 + 0.3 * labels, 2).astype(np.float32)  # many ties
    return scores, labels


def test_auroc_equals_sklearn_with_ties(tied_scores):
    s, y = tied_scores
    assert metrics.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_average_precision_equals_sklearn_with_ties(tied_scores):
    s, y = tied_scores
    assert metrics.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_f1max_equals_best_point_of_sklearn_pr_curve(tied_scores):
    s, y = tied_scores
    p, r, thresholds = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-300)
    best, threshold = metrics.f1_max(s, y)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold == pytest.approx(thresholds[np.argmax(f1[:-1])])


def test_undefined_metrics_are_nan():
    assert np.isnan(metrics.auroc(np.array([0.1, 0.2]), np.array([0, 0])))
    assert np.isnan(metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))


def direct_aupro(maps, masks, limit=0.3):
    """Per threshold, per region, no tricks: the MVTec definition, integrated the same way."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m > 0, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = (maps[normal] >= t).mean()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        points.append((fpr, pro))
    points.append((1.0, points[-1][1]))
    x, y = np.array(points).T
    area = 0.0
    for k in range(1, len(x)):
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_of_a_perfect_map_is_one():
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[1, 8:14, 1:3] = 1
    assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


def test_aupro_weights_regions_not_pixels():
    masks = np.zeros((1, 20, 20), np.uint8)
    masks[0, 1:11, 1:11] = 1          # large region, found
    masks[0, 15:17, 15:17] = 1        # small region, missed
    maps = masks.astype(np.float32).copy()
    maps[0, 15:17, 15:17] = 0.0
    # curve (0, 0) -> (0, 0.5) -> (1, 1): area to 0.3 is 0.3 * (0.5 + 0.65) / 2, normalised
    assert metrics.aupro(maps, masks) == pytest.approx(0.575)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_direct_per_region_computation(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 24, 24), np.uint8)
    for i in range(3):
        for _ in range(2):
            y, x = rng.integers(0, 18, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y:y + h, x:x + w] = 1
    maps = np.round(rng.random(masks.shape) * 0.7 + 0.3 * masks, 1).astype(np.float32)  # ties
    assert metrics.aupro(maps, masks) == pytest.approx(direct_aupro(maps, masks), abs=1e-9)


def test_compute_returns_every_key_and_accepts_channel_dim():
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 1, 16, 16)) > 0.9).astype(np.uint8)
    masks[0] = 0
    maps = rng.random((4, 1, 16, 16)).astype(np.float32)
    out = metrics.compute(rng.random(4), [0, 1, 1, 1], maps, masks)
    assert set(out) == {"image_auroc", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1max"}
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_compute_sorts_each_split_once_and_equals_the_metrics_one_by_one(monkeypatch):
    # An evaluation used to sort every pixel four times (auroc, AP, AUPRO, F1 each sorted the
    # negatives): seconds per split at MVTec's size while the other ranks wait (issue 50 item 5).
    rng = np.random.default_rng(1)
    masks = (ndimage.uniform_filter(rng.random((6, 32, 32)), 5) > 0.55).astype(np.uint8)
    maps = np.round(rng.random((6, 32, 32)) * 0.7 + 0.3 * masks, 2).astype(np.float32)   # ties
    scores, labels = np.round(rng.random(6), 1), np.array([0, 0, 1, 1, 1, 1])
    one_by_one = {"image_auroc": metrics.auroc(scores, labels), "image_f1max": metrics.f1_max(scores, labels)[0],
                  "pixel_auroc": metrics.auroc(maps, masks), "pixel_ap": metrics.average_precision(maps, masks),
                  "pixel_aupro": metrics.aupro(maps, masks), "pixel_f1max": metrics.f1_max(maps, masks)[0]}
    sorts = []
    real_sort = np.sort
    monkeypatch.setattr(np, "sort", lambda a, *args, **kw: sorts.append(np.size(a)) or real_sort(a, *args, **kw))
    together = metrics.compute(scores, labels, maps, masks)
    assert together == pytest.approx(one_by_one, abs=1e-12)
    assert sorted(sorts) == [2, int((masks == 0).sum())]   # the good images' scores, the normal pixels'
