"""Operating points a factory can use (issue 47, part 2): the stored image threshold is set on
the validation images by ``threshold_policy`` (``fpr:<rate>``, the default ``fpr:0.01``: at
most that share of good images flagged; or ``f1``, the F1-max), and whoever decides with it
(``pouta predict``, the served model, the registry's description) says which policy set it."""

import json

import numpy as np
import pytest
from conftest import small_config

from pouta_core import api
from pouta_core import checkpoint as ckpt
from pouta_core.config import Config, ConfigError
from pouta_core.data.demo import generate
from pouta_core.metrics import fpr_threshold, operating_point
from pouta_core.serving import ImageScorer, decision_line, threshold_policy


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.25, 0.5, 0.99])
def test_the_fpr_threshold_is_the_lowest_that_keeps_the_false_alarms_within_the_rate(rate):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 40), rng.normal(0.5, 1, 25)])   # weak: the classes overlap
    labels = np.r_[np.zeros(40), np.ones(25)]
    t = fpr_threshold(scores, labels, rate)
    good = scores[labels == 0]
    assert np.mean(good >= t) <= rate
    assert np.mean(good >= np.nextafter(t, -np.inf)) > rate     # any lower one flags more than the budget
    point = operating_point(scores, labels, t)
    assert point["false_alarm_rate"] == pytest.approx(np.mean(good >= t))
    assert point["miss_rate"] == pytest.approx(np.mean(scores[labels == 1] < t))


def test_no_good_image_sets_no_fpr_threshold_and_ties_are_never_split():
    assert np.isnan(fpr_threshold(np.array([0.3, 0.4]), np.array([1, 1]), 0.1))
    tied = np.array([0.2, 0.2, 0.2, 0.2, 0.9])
    assert np.mean(tied[:4] >= fpr_threshold(tied, np.array([0, 0, 0, 0, 1]), 0.5)) == 0.0


@pytest.mark.parametrize("bad", ["fpr:0", "fpr:1", "fpr:x", "fpr", "roc", "F1"])
def test_a_bad_threshold_policy_is_refused_in_one_line_naming_the_key(bad):
    with pytest.raises(ConfigError, match="config key 'threshold_policy'") as err:
        Config(threshold_policy=bad)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """One category with many good validation images and a model trained for two epochs (it
    has learnt little: its good and defective scores overlap), once per policy."""
    root = tmp_path_factory.mktemp("operating")
    generate(root / "data", categories=1, image_size=48, n_train=6, n_test_good=30, n_test_defect=4)
    runs = {}
    for policy in ("fpr:0.1", "f1"):
        runs[policy] = root / policy.replace(":", "-")
        api.train(small_config(threshold_policy=policy), data_root=root / "data", dataset="mvtec",
                  category="tiles", out=runs[policy], device="cpu", progress=False)
    return root, runs


def _validation_files(root, run, kind):
    record = json.loads((run / ckpt.VAL_FILES).read_text())
    return [root / "data" / f for f in record["val_files"] if (f.split("/")[2] == "good") == (kind == "good")]


def test_a_weak_models_served_decisions_flag_at_most_the_target_rate_of_good_validation_images(weak):
    root, runs = weak
    good = _validation_files(root, runs["fpr:0.1"], "good")
    assert len(good) >= 8
    scorer = ImageScorer(runs["fpr:0.1"] / ckpt.CHECKPOINT, device="cpu")
    answers = scorer.score([p.read_bytes() for p in good], map_size=0)
    assert all(a["error"] is None and a["threshold_policy"] == "fpr:0.1" for a in answers)
    assert sum(a["anomalous"] for a in answers) / len(answers) <= 0.1
    # What the checkpoint says it does on validation is what it does there.
    state = ckpt.load_state(runs["fpr:0.1"] / ckpt.CHECKPOINT)
    assert state["metrics"]["val_false_alarm_rate"] == pytest.approx(np.mean([a["anomalous"] for a in answers]))
    assert "set by fpr:0.1 on the validation images" in scorer.decision
    assert f"{state['metrics']['val_miss_rate']:.1%} of the defective ones" in scorer.decision
    # A request's own threshold still decides, and says so.
    low = min(a["score"] for a in answers) - 1.0
    asked = scorer.score([good[0].read_bytes()], threshold=low, map_size=0)
    assert asked[0]["anomalous"] and asked[0]["threshold_policy"] == "request"


def test_f1_stays_an_option_and_predict_names_the_policy_that_set_its_threshold(weak, tmp_path):
    root, runs = weak
    state = ckpt.load_state(runs["f1"] / ckpt.CHECKPOINT)
    val = api.evaluate_checkpoint(runs["f1"], data_root=root / "data", dataset="mvtec", category="tiles",
                                  device="cpu", split="val", progress=False)
    assert state["threshold"] == pytest.approx(val["f1_threshold"]) == pytest.approx(val["policy_threshold"])
    assert val["false_alarm_rate"] == pytest.approx(state["metrics"]["val_false_alarm_rate"])
    files = _validation_files(root, runs["f1"], "good")[:2]
    result = api.predict_paths(runs["f1"], files, tmp_path / "out", device="cpu")
    assert result.decision.startswith(f"threshold {state['threshold']:.6g} set by f1")
    assert {r["threshold_policy"] for r in result.scored} == {"f1"}
    # The fpr model's stored threshold is the one evaluate sets again on the same images.
    fpr = api.evaluate_checkpoint(runs["fpr:0.1"], data_root=root / "data", dataset="mvtec", category="tiles",
                                  device="cpu", split="val", progress=False)
    assert ckpt.load_state(runs["fpr:0.1"] / ckpt.CHECKPOINT)["threshold"] == pytest.approx(fpr["policy_threshold"])


def test_a_checkpoint_from_before_the_policy_says_it_stored_the_f1_max():
    old = {"threshold": 0.2, "config": {k: v for k, v in Config().to_dict().items() if k != "threshold_policy"},
           "metrics": {}}
    assert threshold_policy(old) == "f1"
    assert decision_line(old) == "threshold 0.2 set by f1 on the validation images"
    assert threshold_policy({"threshold": None, "config": {}}) is None
