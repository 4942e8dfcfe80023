import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_args

from pouta_core.data.demo import generate

SMALL = small_args()


def pouta(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"pouta {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    generate(root / "data", categories=1, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    run = root / "run"
    pouta("train", "--data-root", root / "data", "--dataset", "mvtec", "--category", "tiles", "--out", run,
          "--device", "cpu", *SMALL)
    return root, run


def test_train_writes_the_run_folder(trained):
    _, run = trained
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "config.yaml", "metrics.json", "val_files.json",
                                              ".pouta.lock"}
    record = json.loads((run / "val_files.json").read_text())
    assert record["val_split"] == "from_test" and record["val_files"]
    assert all(f.startswith("tiles/test/") for f in record["val_files"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_pixel_ap", "test_pixel_ap"} <= set(metrics)


def test_evaluate_split_val_scores_exactly_the_validation_files(trained):
    root, run = trained
    common = ["--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec", "--category", "tiles",
              "--json", "--device", "cpu"]
    val = json.loads(pouta("evaluate", *common, "--split", "val").stdout)
    stored = json.loads((run / "metrics.json").read_text())
    assert val["pixel_ap"] == pytest.approx(stored["val_pixel_ap"], abs=1e-6)
    assert val["policy_threshold"] == pytest.approx(stored["threshold"], abs=1e-6)   # threshold_policy, again


def test_evaluate_prints_the_metric_dict_as_json(trained):
    root, run = trained
    out = pouta("evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec",
                "--category", "tiles", "--json", "--device", "cpu")
    metrics = json.loads(out.stdout)
    assert {"image_auroc", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1max"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pixel_ap"))


def test_evaluate_by_defect_scores_each_type_with_the_good_images(trained):
    from pouta_core import api
    from pouta_core.training import evaluate

    root, run = trained
    out = json.loads(pouta("evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec",
                           "--category", "tiles", "--json", "--device", "cpu", "--by-defect").stdout)
    assert set(out["by_defect"]) == {"scratch", "stain", "missing"}
    plain = json.loads(pouta("evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec",
                             "--category", "tiles", "--json", "--device", "cpu").stdout)
    assert out["all"] == plain
    # each type's figures are those of the checkpoint on that type's images and the good ones
    data = api.load_category(root / "data", "mvtec", "tiles", api.ckpt.load_model(run, "cpu")[1], progress=False)
    kinds = [s.defect for s in data.selection.test]
    rows = torch.tensor([i for i, k in enumerate(kinds) if k in ("good", "stain")])
    subset = api.EvalDataset(data.test_set.images[rows], data.test_set.masks[rows], data.test_set.labels[rows])
    expected, _ = evaluate(api.ckpt.load_model(run, "cpu")[0], subset, torch.device("cpu"))
    assert out["by_defect"]["stain"]["pixel_ap"] == pytest.approx(expected["pixel_ap"], abs=1e-6)
    table = pouta("evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec",
                  "--category", "tiles", "--device", "cpu", "--by-defect").stdout.splitlines()
    assert [line.split()[0] for line in table] == ["defect", "all", "missing", "scratch", "stain"]


def test_evaluate_rescores_with_scoring_keys_and_refuses_other_keys(trained, tmp_path):
    root, run = trained
    common = ["evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset", "mvtec", "--category",
              "tiles", "--json", "--device", "cpu", "--split", "val"]
    plain = json.loads(pouta(*common).stdout)
    topk = json.loads(pouta(*common, "--set", "image_score=topk_mean", "--set", "image_score_topk=1.0").stdout)
    assert topk["pixel_auroc"] == plain["pixel_auroc"]        # the same map, another image score
    from pouta_core.checkpoint import load_model
    from pouta_core.inference import predict
    from pouta_core.metrics import auroc

    data = api_load(root, run)
    model, config, _ = load_model(run, scoring=["image_score=topk_mean", "image_score_topk=1.0"])
    scores, maps = predict(model, data.val_set.images)
    assert scores == pytest.approx(maps.mean(axis=(1, 2)), abs=1e-6)   # top 100 % of pixels: the mean
    assert topk["image_auroc"] == pytest.approx(auroc(scores, data.val_set.labels.numpy()), abs=1e-9)
    assert load_model(run)[1].image_score == "pooled_max"     # the checkpoint is not changed
    # rescore keeps it: a new run folder whose validation figures are those evaluate printed
    kept = pouta("rescore", *common[1:-2], "--out", tmp_path / "topk", "--set", "image_score=topk_mean",
                 "--set", "image_score_topk=1.0")
    assert json.loads(kept.stdout)["val_image_auroc"] == pytest.approx(topk["image_auroc"], abs=1e-9)
    assert load_model(tmp_path / "topk")[1].image_score == "topk_mean"
    out = pouta(*common, "--set", "epochs=3", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().endswith("--set epochs: a trained model's config cannot change; only its scoring "
                                       "keys can (map_heads_weight, image_score, image_score_topk, "
                                       "image_score_pool, score_norm)")


def api_load(root, run):
    from pouta_core import api

    return api.load_category(root / "data", "mvtec", "tiles", api.ckpt.load_model(run, "cpu")[1], progress=False)


def test_predict_writes_overlays_maps_and_decisions(trained, tmp_path):
    root, run = trained
    images = root / "data" / "tiles" / "test" / "stain"
    out = pouta("predict", "--checkpoint", run, images, "--out", tmp_path, "--save-maps", "--json",
                "--threshold", "0.5", "--device", "cpu")
    results = json.loads(out.stdout)
    assert len(results["scored"]) == 2 and results["failed"] == []
    assert all(r["anomalous"] == (r["score"] >= 0.5) for r in results["scored"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000.png.map.npy", "000.png.overlay.png", "001.png.map.npy", "001.png.overlay.png"]
    assert np.load(tmp_path / "000.png.map.npy").shape == (32, 32)
    assert all(p.stat().st_mode & 0o040 for p in tmp_path.iterdir())     # readable by the group


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch(trained, tmp_path, fmt):
    _, run = trained
    target = tmp_path / f"model.{fmt}"
    out = pouta("export", "--checkpoint", run, "--format", fmt, "--out", target).stdout
    diffs = [float(d) for d in re.findall(r"within ([0-9.]+e[-+][0-9]+)", out)]
    assert target.is_file() and len(diffs) == 2 and max(diffs) <= 1e-4, out
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_bad_data_root_is_one_line_error_and_nothing_written(tmp_path):
    out = pouta("train", "--data-root", tmp_path / "missing", "--dataset", "mvtec", "--category", "x",
                "--out", tmp_path / "run", *SMALL, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"pouta: error: {tmp_path / 'missing'}: data root folder not found"
    assert not (tmp_path / "run").exists()


def test_bad_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    out = pouta("export", "--checkpoint", tmp_path, "--format", "onnx", "--out", tmp_path / "m.onnx", check=False)
    assert out.returncode == 2 and "not a readable POUTA checkpoint" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_predict_keeps_same_named_images_from_two_folders_apart(trained, tmp_path):
    from pouta_core.api import predict_paths

    root, run = trained
    test = root / "data" / "tiles" / "test"
    results = predict_paths(run, [test / "good", test / "scratch"], tmp_path, threshold=0.5, device="cpu")
    assert len(results.scored) == 5 and not results.failed
    overlays = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.overlay.png"))
    assert overlays == ["good/000.png.overlay.png", "good/001.png.overlay.png", "good/002.png.overlay.png",
                        "scratch/000.png.overlay.png", "scratch/001.png.overlay.png"]


def test_contrast_check_scores_the_map_like_evaluate(trained):
    root, run = trained
    metrics = json.loads(pouta("evaluate", "--checkpoint", run, "--data-root", root / "data", "--dataset",
                               "mvtec", "--category", "tiles", "--json").stdout)
    out = subprocess.run([sys.executable, "bench/contrast_check.py", "--data-root", root / "data", run],
                         capture_output=True, text=True, check=True)
    cols = out.stdout.split(":", 1)[1].split()
    assert cols[:2] == ["tiles", "pouta"]
    values = dict(zip(cols[2::2], map(float, cols[3::2]), strict=True))
    assert set(values) >= {"map", "head_1", "mean_heads", "D_other", "D_is_E"}
    assert values["map"] == pytest.approx(metrics["pixel_auroc"], abs=1e-4)


def test_contrast_check_bad_run_is_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "bench/contrast_check.py", "--data-root", tmp_path, tmp_path / "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "nope" in out.stderr


def test_ui_serves_the_store_on_loopback_and_refuses_a_missing_one(tmp_path):
    import os
    import signal
    import urllib.request

    from mlflow.tracking import MlflowClient
    from servers import free_port, wait_http

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("pouta")
    port = free_port()
    log = tmp_path / "ui.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", uri, "--port",
                             str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                                    "?experiment_name=pouta", timeout=10) as r:
            assert json.loads(r.read())["experiment"]["name"] == "pouta"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    missing = pouta("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", check=False)
    assert missing.returncode == 2 and "no such MLflow store" in missing.stderr
    assert not (tmp_path / "none.db").exists()


def test_pictures_show_the_map_at_full_size_with_labels(trained, tmp_path):
    from PIL import Image

    from pouta_core.visualize import COLUMNS, heatmap_grid, overlay, turbo

    root, run = trained
    # predict: the overlay has the input's resolution, not the model's 32 px
    big = tmp_path / "big.png"
    Image.open(root / "data" / "tiles" / "test" / "scratch" / "000.png").resize((96, 80)).save(big)
    pouta("predict", "--checkpoint", run, big, "--out", tmp_path / "out", "--threshold", "0.5")
    assert Image.open(tmp_path / "out" / "big.png.overlay.png").size == (96, 80)
    # the heat map stays visible on an orange surface: a high score turns it red-dominant
    orange = np.full((8, 8, 3), (230, 120, 30), np.uint8)
    hot = overlay(orange, np.ones((8, 8)))
    assert (hot.astype(int) - orange).any() and tuple(turbo(np.array([1.0]))[0]) != tuple(turbo(np.array([0.0]))[0])
    # the grid: one row per example, four labelled columns, tiles enlarged to >= 160 px
    images = np.zeros((2, 3, 32, 32), np.uint8)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, 8:16, 8:16] = 1
    grid = heatmap_grid(images, np.random.default_rng(0).random((2, 32, 32)), masks, np.array([0.9, 0.1]))
    assert grid.width >= len(COLUMNS) * 160 and grid.height >= 2 * 160


def test_the_procedural_source_is_said_once_and_silenced_by_choosing_it(tmp_path, capsys):
    """Without --texture-dir the anomaly source is procedural noise, not the paper's DTD: said in
    one line (issue 50: it was silent); --procedural-source chooses it and silences the line."""
    from orchestrator.cli import main

    data = tmp_path / "data"
    generate(data, categories=1, image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    textures = tmp_path / "dtd"
    textures.mkdir()
    base = ["launch", "--data-root", str(data), "--dataset", "mvtec", "--storage-path", str(tmp_path / "ray"),
            "--dry-run", *SMALL]
    notice = "pouta: anomaly sources: procedural fractal noise, not the paper's DTD textures"
    for extra, said in (([], True), (["--procedural-source"], False), (["--texture-dir", str(textures)], False),
                        (["--set", "self_source_ratio=1.0"], False)):   # every source the image's own: no noise
        assert main([*base, *extra]) == 0
        err = capsys.readouterr().err
        assert err.count(notice) == (1 if said else 0), (extra, err)
    assert main([*base, "--procedural-source", "--texture-dir", str(textures)]) == 2
    assert "--texture-dir and --procedural-source: choose one anomaly source" in capsys.readouterr().err
