"""The paired bootstrap gate: exact on the full sample, paired, and it never calls a model
better than itself."""

import numpy as np
import pytest

from pouta_core import metrics
from pouta_core.bootstrap import BootstrapResult, Evidence, paired_bootstrap


def evidence(rng, labels, quality):
    n = len(labels)
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[labels == 1, 2:5, 2:5] = 1
    maps = rng.random((n, 8, 8)).astype(np.float32) + quality * masks
    return Evidence(scores=maps.reshape(n, -1).max(1), maps=maps, masks=masks)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 8)
    return labels, evidence(rng, labels, 0.9), evidence(rng, labels, 0.2)


@pytest.mark.parametrize("metric", ["image_auroc", "pixel_auroc", "pixel_ap"])
def test_full_sample_values_equal_the_exact_metrics(case, metric):
    labels, good, _ = case
    result = paired_bootstrap(metric, good, good, labels, resamples=5)
    reference = metrics.compute(good.scores, labels, good.maps, good.masks)[metric]
    assert result.a == pytest.approx(reference, abs=1e-9) and result.b == result.a


@pytest.mark.parametrize("metric", ["image_auroc", "pixel_auroc", "pixel_ap"])
def test_a_model_is_never_better_than_itself(case, metric):
    labels, good, _ = case
    result = paired_bootstrap(metric, good, good, labels, resamples=200)
    assert result.p_better == 0.0 and result.low == result.high == 0.0


def test_a_clearly_better_model_wins_with_high_probability(case):
    labels, good, weak = case
    result = paired_bootstrap("pixel_ap", good, weak, labels, resamples=300, seed=1)
    assert result.delta > 0 and result.p_better > 0.95 and result.low > 0
    reverse = paired_bootstrap("pixel_ap", weak, good, labels, resamples=300, seed=1)
    assert reverse.p_better < 0.05


def test_a_side_of_several_seeds_counts_by_its_mean(case):
    # Issue 30: a config trained on several seeds is one side; its value is the mean of its
    # models' metrics, on the images and on every resample of them.
    labels, good, weak = case
    rng = np.random.default_rng(5)
    middling = evidence(rng, labels, 0.5)
    pair = paired_bootstrap("pixel_ap", [good, weak], [middling], labels, resamples=100, seed=2)
    alone = [paired_bootstrap("pixel_ap", m, middling, labels, resamples=5).a for m in (good, weak)]
    assert pair.a == pytest.approx(np.mean(alone), abs=1e-12)
    # a lucky seed does not make a config better than its own seeds on average
    same = paired_bootstrap("pixel_ap", [good, weak], [weak, good], labels, resamples=100)
    assert same.delta == 0.0 and same.p_better == 0.0
    with pytest.raises(ValueError, match="no model"):
        paired_bootstrap("pixel_ap", [], [good], labels)


def test_resamples_are_seeded(case):
    labels, good, weak = case
    a = paired_bootstrap("image_auroc", good, weak, labels, resamples=50, seed=3)
    assert a == paired_bootstrap("image_auroc", good, weak, labels, resamples=50, seed=3)


def test_unsupported_metric_is_named():
    with pytest.raises(ValueError, match="supports image_auroc, pixel_auroc, pixel_ap; got 'pixel_aupro'"):
        paired_bootstrap("pixel_aupro", None, None, np.zeros(2))


@pytest.mark.parametrize(("delta", "p_better", "promoted"), [
    (0.02, 0.99, True),      # better by the margin, and confidently
    (0.004, 0.99, False),    # confidently better, but by less than the margin
    (0.02, 0.90, False),     # better by the margin on these images, but not confidently
    (0.0, 0.0, False),       # the same model
])
def test_retrain_gate_needs_both_the_margin_and_the_confidence(delta, p_better, promoted):
    from orchestrator.commands.retrain import Gate

    result = BootstrapResult("pixel_ap", 0.5 + delta, 0.5, -0.01, 0.03, p_better, 1000)
    assert Gate(margin=0.005, confidence=0.95).promotes(result) is promoted


def test_retrain_gate_rejects_bad_settings_by_flag_name():
    from orchestrator.commands.retrain import Gate
    from pouta_core.config import ConfigError

    with pytest.raises(ConfigError, match="--confidence must be in"):
        Gate(confidence=1.5)
    with pytest.raises(ConfigError, match="--metric pixel_aupro: the retrain gate compares"):
        Gate(metric="pixel_aupro")
