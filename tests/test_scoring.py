"""The anomaly map and image score options (pouta_core/model/scoring.py): what each computes,
the per-category normalisation from validation good images (stored, exported, honest on
validation), and re-scoring a trained checkpoint without retraining."""

import json

import numpy as np
import pytest
import torch
from conftest import small_config

from pouta_core import api
from pouta_core.checkpoint import load_model, load_weights, require_calibrated
from pouta_core.config import ConfigError
from pouta_core.data.demo import generate
from pouta_core.model import build_model
from pouta_core.model.scoring import Scorer, image_score


def maps_with(spots, size=32):
    """(N, size, size) maps, 0.1 everywhere, with each image's (row, col, value, side) squares."""
    maps = np.full((len(spots), size, size), 0.1, np.float32)
    for i, squares in enumerate(spots):
        for r, c, v, s in squares:
            maps[i, r:r + s, c:c + s] = v
    return maps


def test_topk_mean_averages_the_largest_share_of_pixels():
    amap = torch.zeros(1, 1, 10, 10)
    amap[0, 0, 0, :5] = 1.0                     # 5 of 100 pixels
    scorer = Scorer(image_size=10, image_score="topk_mean", topk=0.1)
    assert scorer(amap).item() == pytest.approx(0.5)          # mean of the top 10
    assert Scorer(image_size=10, image_score="topk_mean", topk=0.05)(amap).item() == pytest.approx(1.0)
    assert Scorer(image_size=10)(amap).item() == pytest.approx(image_score(amap).item())


def test_heads_weight_mixes_the_mss_heads_into_the_map_and_vanilla_ignores_it():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    # PyTorch's init and batch statistics (train mode), so that the untrained maps are not flat.
    paper = build_model(small_config(init="torch"))
    heads = build_model(small_config(init="torch", map_heads_weight=1.0))
    heads.load_state_dict(paper.state_dict())
    with torch.no_grad():
        out, mixed = paper(x), heads(x)
    expected = torch.stack([torch.nn.functional.interpolate(torch.softmax(s, 1)[:, 1:], size=(32, 32),
                                                            mode="bilinear", align_corners=False)
                            for s in out.scale_logits]).mean(0)
    assert torch.allclose(mixed.anomaly_map, expected, atol=1e-6)
    assert not torch.allclose(mixed.anomaly_map, out.anomaly_map, atol=1e-3)
    assert build_model(small_config(variant="vanilla", map_heads_weight=1.0)).scorer.heads_weight == 0.0


def test_pixel_normalisation_stops_a_spot_bright_on_every_good_image_deciding_the_score():
    spot = (10, 10, 1.0, 10)                    # bright on every image, good or not
    good = [[spot, (30 + 4 * i, 8, 0.3, 4)] for i in range(6)]     # and some noise of their own
    bad = [[spot, (40, 40, 0.7, 10)]]           # a real defect, dimmer than the spot
    maps, labels = maps_with(good + bad, size=64), np.array([0] * 6 + [1])
    plain = Scorer(image_size=64).calibrate(maps, labels)
    assert plain[6] <= plain[:6].min()          # the spot decides: the defect does not stand out
    scorer = Scorer(image_size=64, norm="pixel")
    scores = scorer.calibrate(maps, labels)
    assert scores[6] > scores[:6].max()
    assert int(scorer.norm_images) == 6
    # Inference with the stored statistics gives the anomalous image the same score.
    assert scorer(torch.from_numpy(maps[6:])[:, None]).item() == pytest.approx(scores[6], rel=1e-4)


def test_validation_good_images_are_scored_with_the_other_good_images_statistics():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 32, 32)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 1])
    scores = Scorer(image_size=32, norm="pixel").calibrate(maps, labels)
    for i in range(4):
        others = Scorer(image_size=32, norm="pixel")
        others.calibrate(np.delete(maps, i, axis=0)[:3], np.zeros(3))
        assert others(torch.from_numpy(maps[i:i + 1])[:, None]).item() == pytest.approx(scores[i], rel=1e-4)


def test_normalisation_needs_two_good_images():
    with pytest.raises(ValueError, match="at least 2 good validation images, got 1"):
        Scorer(image_size=32, norm="pixel").calibrate(np.zeros((3, 32, 32)), np.array([0, 1, 1]))


def test_checkpoints_from_before_the_scorer_load_with_no_normalisation(tmp_path):
    model = build_model(small_config())
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("scorer.")}
    fresh = build_model(small_config())
    load_weights(fresh, old, tmp_path / "checkpoint.pt")
    assert int(fresh.scorer.norm_images) == 0 and fresh.scorer.calibrated
    with pytest.raises(ConfigError, match="weights do not fit"):
        load_weights(fresh, {k: v for k, v in old.items() if not k.startswith("reconstructive.")}, "x")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    generate(root / "data", categories=1, image_size=48, n_train=6, n_test_good=6, n_test_defect=3)
    return root


def train(data, out, **changes):
    api.train(small_config(**changes), data_root=data / "data", dataset="mvtec", category="tiles", out=out,
              device="cpu", progress=False)
    return out


def evaluate(data, run, split, scoring=()):
    return api.evaluate_checkpoint(run, data_root=data / "data", dataset="mvtec", category="tiles", device="cpu",
                                   split=split, progress=False, scoring=list(scoring))


def test_training_stores_the_normalisation_and_rescoring_gives_what_training_with_it_gives(data, tmp_path):
    options = {"score_norm": "pixel", "image_score": "topk_mean", "image_score_topk": 0.05}
    normed = train(data, tmp_path / "normed", **options)
    model, config, state = load_model(normed)
    good_val = sum(1 for f in json.loads((normed / "val_files.json").read_text())["val_files"] if "/good/" in f)
    assert config.score_norm == "pixel" and int(model.scorer.norm_images) == good_val >= 2
    # What it reported on validation (and chose its threshold on) is what evaluate recomputes.
    val = evaluate(data, normed, "val")
    assert val["image_auroc"] == pytest.approx(state["metrics"]["val_image_auroc"], abs=1e-6)
    # The same weights trained with the paper's scoring, re-scored: the same figures.
    plain = train(data, tmp_path / "plain")
    weights = {k: v for k, v in load_model(plain)[0].state_dict().items() if not k.startswith("scorer.")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())   # scoring does not train
    rescored = [f"{k}={v}" for k, v in options.items()]
    for split in ("val", "test"):
        assert evaluate(data, plain, split, rescored) == pytest.approx(evaluate(data, normed, split), abs=1e-5)
    assert evaluate(data, plain, "test") != pytest.approx(evaluate(data, normed, "test"), abs=1e-5)
    # Exports compute the same scores, normalisation included.
    for fmt in ("torchscript", "onnx"):
        diffs = api.export(normed, fmt, tmp_path / f"m.{fmt}")
        assert diffs["max_abs_diff"] <= 1e-4 and diffs["score_max_abs_diff"] <= 1e-4, fmt


def test_only_scoring_keys_can_change_on_a_trained_model(data, tmp_path):
    run = train(data, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--set variant: a trained model's config cannot change; only its "
                                          r"scoring keys can \(map_heads_weight, image_score"):
        evaluate(data, run, "test", ["variant=vanilla"])
    with pytest.raises(ConfigError, match="image_score"):
        evaluate(data, run, "test", ["image_score=mean"])
    model, config, _ = load_model(run, scoring=["score_norm=pixel"])
    assert config.score_norm == "pixel" and not model.scorer.calibrated
    with pytest.raises(ConfigError, match="score_norm=pixel but the checkpoint holds no statistics"):
        require_calibrated(model, run)


def test_rescore_keeps_another_scoring_in_a_new_run_folder_without_retraining(data, tmp_path):
    run = train(data, tmp_path / "run")
    out = tmp_path / "rescored"
    scoring = ["score_norm=pixel", "image_score=topk_mean"]
    metrics = api.rescore(run, out, scoring=scoring, data_root=data / "data", dataset="mvtec", category="tiles",
                          device="cpu", progress=False)
    model, config, state = load_model(out)
    assert (config.score_norm, config.image_score) == ("pixel", "topk_mean") and model.scorer.calibrated
    assert config.replace(score_norm="none", image_score="pooled_max") == load_model(run)[1]
    # Its stored figures and threshold are what evaluate computes on it, and what evaluate
    # --set computed on the original.
    val = evaluate(data, out, "val")
    assert val["image_auroc"] == pytest.approx(metrics["val_image_auroc"], abs=1e-9)
    assert evaluate(data, run, "test", scoring) == pytest.approx(evaluate(data, out, "test"), abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["threshold"] == pytest.approx(state["threshold"])
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "config.yaml", "metrics.json", "val_files.json"}
    assert load_model(run)[1].score_norm == "none"          # the original is untouched
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        api.rescore(run, out, scoring=scoring, data_root=data / "data", dataset="mvtec", category="tiles",
                    device="cpu", progress=False)
    with pytest.raises(ConfigError, match="was trained on category 'tiles', not 'pills'"):
        api.rescore(run, tmp_path / "x", scoring=scoring, data_root=data / "data", dataset="mvtec",
                    category="pills", device="cpu", progress=False)
    assert not (tmp_path / "x").exists()


def test_scoring_options_are_chosen_after_training_on_validation_and_kept_with_the_weights(data, tmp_path):
    # The weights are those of a run trained without options (same seed): scoring trains nothing.
    from pouta_core.scoring_choice import CHOICE_FILE

    options = {"image_score": ["pooled_max", "topk_mean"], "image_score_pool": [21, 11],
               "score_norm": ["none", "pixel"]}
    chosen_run = tmp_path / "chosen"
    api.train(small_config(), data_root=data / "data", dataset="mvtec", category="tiles", out=chosen_run,
              device="cpu", progress=False, scoring_options=options)
    plain = train(data, tmp_path / "plain")
    model, config, state = load_model(chosen_run)
    weights = {k: v for k, v in load_model(plain)[0].state_dict().items() if not k.startswith("scorer.")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    record = json.loads((chosen_run / CHOICE_FILE).read_text())
    tried = record["candidates"]
    assert len(tried) == 8 and tried[0]["values"] == {"image_score": "pooled_max", "image_score_pool": 21,
                                                        "score_norm": "none"}   # the config's own first
    # The rule: the best validation pixel AP, then image AUROC; the first of equals.
    best = max(tried, key=lambda c: (c["val_pixel_ap"], c["val_image_auroc"]))
    assert record["chosen"] == best["values"] == {k: getattr(config, k) for k in options}
    # What the run reports on validation is what the chosen reading gives, and a re-evaluation agrees.
    assert state["metrics"]["val_image_auroc"] == pytest.approx(best["val_image_auroc"], abs=1e-6)
    assert evaluate(data, chosen_run, "val")["image_auroc"] == pytest.approx(best["val_image_auroc"], abs=1e-6)
    # The pixel maps do not depend on these keys: every candidate has the same pixel AP.
    assert len({round(c["val_pixel_ap"], 9) for c in tried}) == 1
