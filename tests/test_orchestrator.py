"""launch / sweep / retrain / promote on an in-process Ray (one per module) with the embedded
sqlite MLflow, on tiny demo data, while a decoy `ray start --head` (another user's cluster)
runs on the same machine."""

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from conftest import small_args
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import ray_head

from orchestrator import cli, tracking
from orchestrator.execution import cluster
from orchestrator.tracking import models
from orchestrator.tracking.models import download_checkpoint
from pouta_core.checkpoint import bit_depth, load_model, load_state
from pouta_core.data import read_split
from pouta_core.data.demo import generate
from pouta_core.data.images import model_input, read_rgb
from pouta_core.data.validation import split_for_selection
from pouta_core.inference import predict

SMALL = small_args()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("orch")
    generate(root / "data", categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Another Ray on the machine: anything that finds its cluster by "auto" now fails or
    # hangs ("Found multiple active Ray instances"); the commands must name theirs.
    with ray_head(root, num_cpus=1):
        address = cluster.connect(num_cpus=2)   # what every command does without --ray-address
        yield {"root": root, "data": root / "data", "uri": uri, "client": MlflowClient(uri), "address": address}
        cluster.disconnect()


def common(env, name):
    return ["--data-root", str(env["data"]), "--dataset", "mvtec", "--storage-path", str(env["root"] / "ray"),
            "--tracking-uri", env["uri"], "--name", name, *SMALL]


def runs(env, **tags):
    exp = env["client"].get_experiment_by_name("pouta")
    if exp is None:
        return []
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return env["client"].search_runs([exp.experiment_id], filter_string=flt)


def aliases(env, name):
    return {k: str(v) for k, v in env["client"].get_registered_model(name).aliases.items()}


PILLS_ON_OBJECT = ["--category-set", "pills:foreground_threshold=0.3"]


def test_launch_trains_every_category_and_registers_challengers(env, capsys):
    assert cli.main(["launch", "--categories", "all", *common(env, "launch-a"), *PILLS_ON_OBJECT]) == 0
    out = capsys.readouterr().out
    assert "pouta-mvtec-tiles v1 (challenger)" in out and "pouta-mvtec-pills v1 (challenger)" in out
    assert f"ui --tracking-uri {env['uri']}" in out
    parent = runs(env, **{"pouta.kind": "launch"})
    children = runs(env, **{"pouta.kind": "trial"})
    assert len(parent) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    for name in ("pouta-mvtec-tiles", "pouta-mvtec-pills"):
        assert aliases(env, name) == {"challenger": "1"}
    # --category-set reaches the pills trial only
    threshold = {c.data.tags["category"]: c.data.params["foreground_threshold"] for c in children}
    assert threshold == {"pills": "0.3", "tiles": "None"}


def test_a_second_launch_is_refused_unless_resumed_as_the_same_experiment(env, capsys):
    args = ["launch", "--categories", "all", *common(env, "launch-a"), *PILLS_ON_OBJECT]
    assert cli.main(args) == 2                         # it used to restore the old one and exit 0
    assert "experiment 'launch-a' already exists; pass --resume" in capsys.readouterr().err
    # --resume of another experiment under the same name: refused in one line naming what differs
    assert cli.main(["launch", "--categories", "all", *common(env, "launch-a"), "--resume", "--set", "lr=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the same experiment" in err, err
    assert "config.lr (0.001 -> 0.002)" in err and "per_category.pills (removed)" in err
    # The same experiment (a setting that only runs it may change): nothing trained again, reprinted.
    assert cli.main([*args, "--resume", "--max-concurrent", "1"]) == 0
    assert "pouta-mvtec-tiles v1 (challenger)" in capsys.readouterr().out
    assert len(runs(env, **{"pouta.kind": "trial"})) == 2
    assert len(env["client"].search_model_versions("name = 'pouta-mvtec-tiles'")) == 1


def test_weights_are_used_by_name_from_the_registry_a_run_or_a_ray_trial(env, tmp_path, capsys):
    images = env["data"] / "tiles" / "test" / "scratch"
    by_alias = ["predict", "--model", "models:/pouta-mvtec-tiles@challenger", str(images), "--out",
                str(tmp_path / "a"), "--tracking-uri", env["uri"], "--json"]
    assert cli.main(by_alias) == 0
    scored = json.loads(capsys.readouterr().out)["scored"]
    assert len(scored) == 2
    # The same weights by version, by run, and from the Ray trial folder they came from.
    version = env["client"].get_model_version_by_alias("pouta-mvtec-tiles", "challenger")
    trial_dir = next((env["root"] / "ray" / "launch-a").glob("*category=tiles*/checkpoint_*")).parent
    for ref in ("models:/pouta-mvtec-tiles/1", f"runs:/{version.run_id}", str(trial_dir)):
        assert cli.main(["predict", "--model", ref, str(images), "--out", str(tmp_path / "b"),
                         "--tracking-uri", env["uri"], "--json"]) == 0
        assert [r["score"] for r in json.loads(capsys.readouterr().out)["scored"]] == \
            pytest.approx([r["score"] for r in scored], abs=1e-6), ref
    # Served through MLflow's pyfunc, the registered version takes encoded images and answers
    # as predict does (tests/test_serving.py serves it over HTTP).
    mlflow.set_tracking_uri(env["uri"])
    files = sorted(images.glob("*.png"))
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    answers = mlflow.pyfunc.load_model("models:/pouta-mvtec-tiles/1").predict(pd.DataFrame({"image": encoded}))
    by_file = {Path(r["image"]).name: r for r in scored}
    assert [a["score"] for a in answers] == pytest.approx([by_file[f.name]["score"] for f in files], abs=1e-5)
    assert [a["anomalous"] for a in answers] == [by_file[f.name]["anomalous"] for f in files]
    # "Not found" names the store searched; a missing store is not created.
    assert cli.main(["predict", "--model", "models:/pouta-mvtec-tiles@nope", str(images), "--out",
                     str(tmp_path / "c"), "--tracking-uri", env["uri"]]) == 2
    err = capsys.readouterr().err
    assert f"models:/pouta-mvtec-tiles@nope: not found in {env['uri']}" in err
    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert cli.main(["promote", "--model", "pouta-mvtec-tiles", "--version", "1", "--tracking-uri", missing]) == 2
    assert f"{missing}: no such MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() and not (tmp_path / "c").exists()


def scramble_test_part(src, dst):
    """A copy of the data whose test part (not the validation part) is replaced by noise."""
    shutil.copytree(src, dst)
    parts = split_for_selection(read_split(dst, "mvtec", "tiles"), dst, "from_test", 0.3)
    rng = np.random.default_rng(0)
    for sample in parts.test:
        size = Image.open(sample.path).size
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(sample.path)
    return parts


def test_a_sweep_chooses_on_validation_whatever_the_test_images(env, tmp_path, capsys):
    """Every trial reports val_ and test_ metrics; the challenger is the best by validation;
    replacing every test image (not the validation ones) changes no choice."""
    parts = scramble_test_part(env["data"], tmp_path / "scrambled")
    assert parts.test and parts.val
    chosen = {}
    for name, data in (("leak-a", env["data"]), ("leak-b", tmp_path / "scrambled")):
        best_out = tmp_path / f"{name}.yaml"
        # The choice among trials alone (the default and the comparison: tests below).
        args = ["sweep", "--space", "mss_lambdas", "--categories", "tiles", "--num-samples", "3", "--scheduler",
                "none", *common(env, name), "--data-root", str(data), "--best-out", str(best_out),
                "--experiment", name, "--no-default-trial"]
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        assert "val_pixel_ap" in out and "test_pixel_ap" in out
        client = env["client"]
        exp = client.get_experiment_by_name(name)
        trials = client.search_runs([exp.experiment_id], filter_string="tags.`pouta.kind` = 'trial'")
        assert len(trials) == 3
        for child in trials:
            for metric in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro"):
                assert {f"val_{metric}", f"test_{metric}"} <= set(child.data.metrics), metric
            assert metric not in child.data.metrics and child.data.tags[tracking.TAG_SELECTION] == "validation"
            assert child.data.metrics["nonfinite_steps"] == 0        # counted every epoch (issue 29)
            assert "val_files.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"loss_total", "lr", "latency_ms"} <= set(child.data.metrics)   # from the packed figures
        # Tune keeps running statistics of what it is given, per trial, in every snapshot of its
        # state: the numbers it schedules on, not the epoch's other 30 (issue 28).
        state = json.loads(next((env["root"] / "ray" / name).glob("experiment_state-*.json")).read_text())
        for _, metadata in state["trial_data"]:
            analysed = set(json.loads(metadata)["metric_analysis"])
            assert {"val_pixel_ap", "epoch", "checkpoint_epoch"} <= analysed, analysed
            assert not analysed & {"val_pixel_auroc", "test_pixel_ap", "loss_total", "lr", "latency_ms"}, analysed
        best = max(trials, key=lambda c: c.data.metrics["val_pixel_ap"])
        assert client.get_model_version_by_alias("pouta-mvtec-tiles", "challenger").run_id == best.info.run_id
        state = load_state(download_checkpoint(f"runs:/{best.info.run_id}", env["uri"], tmp_path / name))
        chosen[name] = (best_out.read_text(), state["threshold"], best.data.metrics["val_pixel_ap"],
                        best.data.metrics["test_pixel_ap"])
    a, b = chosen["leak-a"], chosen["leak-b"]
    assert a[:3] == b[:3]             # same best config, same stored threshold, same validation metric
    assert a[3] != b[3]               # while the test metric did see the other images


def test_a_grid_trains_each_point_once_per_seed_to_full_length_and_prints_mean_and_spread(env, tmp_path, capsys):
    # 2 points x 2 seeds (--num-samples is the seed count for a grid), no early stopping: with
    # ASHA (rungs at epochs 1, 2) half of 4 trials would stop before epoch 4.
    space = tmp_path / "ablation2.yaml"
    space.write_text("space:\n  variant: {distribution: grid, values: [vanilla, pouta]}\n")
    code = cli.main(["sweep", "--space", str(space), "--categories", "tiles", "--num-samples", "2",
                     "--max-concurrent", "2", *common(env, "ablation-a"), "--set", "epochs=4"])
    out = capsys.readouterr().out
    assert code == 0
    trials = [r for r in runs(env, **{"pouta.kind": "trial", "category": "tiles"})
              if r.data.tags[tracking.TAG_KEY].startswith("sweep:ablation-a/")]
    assert sorted((r.data.tags["variant"], r.data.params["seed"]) for r in trials) == [
        ("pouta", "0"), ("pouta", "1"), ("vanilla", "0"), ("vanilla", "1")]
    for r in trials:
        assert [m.step for m in env["client"].get_metric_history(r.info.run_id, "val_pixel_ap")] == [1, 2, 3, 4]
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["tiles"] and len(line.split()) > 3]
    table = {r[1]: r for r in rows if r[1] in ("vanilla", "pouta")}
    assert list(table) == ["vanilla", "pouta"]            # the grid's order
    by_seed = {}
    for r in trials:
        by_seed.setdefault(r.data.tags["variant"], []).append(r.data.metrics["val_pixel_ap"])
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["category", "variant"])
    column = header.index("val_pixel_ap")
    for variant, row in table.items():
        assert row[2] == "2"                                # seeds
        mean, spread = (float(x) for x in row[column].split("±"))
        assert mean == pytest.approx(np.mean(by_seed[variant]), abs=1e-4)
        assert spread == pytest.approx(np.std(by_seed[variant], ddof=1), abs=1e-4)
    # The chosen model: the best seed of the variant with the best mean, not the luckiest seed.
    best_mean = max(by_seed, key=lambda v: np.mean(by_seed[v]))
    assert f"best tiles: variant={best_mean}" in out
    chosen = env["client"].get_model_version_by_alias("pouta-mvtec-tiles", "challenger")
    assert env["client"].get_run(chosen.run_id).data.tags["variant"] == best_mean


def test_sweep_runs_all_categories_at_once_and_resume_redoes_nothing(env, tmp_path, capsys, monkeypatch):
    import optuna

    searched = []   # run keys looked up by a tag search: never a trial's (issue 28)
    find_run = tracking.find_run

    def counted(client, exp_id, key):
        return searched.append(key) or find_run(client, exp_id, key)

    for where in (tracking, tracking.client):   # called through the package face and inside its client module
        monkeypatch.setattr(where, "find_run", counted)
    args = ["sweep", "--space", "mss_lambdas", "--categories", "tiles,pills", "--num-samples", "2",
            "--max-concurrent", "2", *common(env, "sweep-r"), "--best-out", str(tmp_path / "best.yaml"),
            *PILLS_ON_OBJECT, "--confirm-seeds", "0"]   # the confirmation round: tests below
    assert cli.main(args) == 0
    assert searched == ["sweep:sweep-r"]     # the parent run; each trial's run is created, then known
    storage = f"sqlite:///{env['root'] / 'ray' / 'sweep-r' / 'optuna.db'}"
    for category in ("tiles", "pills"):
        study = optuna.load_study(study_name=f"sweep-r-{category}", storage=storage)
        assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    trials = [r for r in runs(env, **{"pouta.kind": "trial"})
              if r.data.tags[tracking.TAG_KEY].startswith("sweep:sweep-r/")]
    # Each category's default trial ran too, outside its study, labelled.
    defaults = [r for r in trials if r.data.tags.get("pouta.default") == "true"]
    assert sorted(r.data.tags["category"] for r in defaults) == ["pills", "tiles"] and len(trials) == 6
    assert all(r.info.run_name.endswith("-default") for r in defaults)
    span = {c: (min(r.info.start_time for r in trials if r.data.tags["category"] == c),
                max(r.info.end_time for r in trials if r.data.tags["category"] == c)) for c in ("tiles", "pills")}
    # one study does not wait for the other: the categories' trials overlap in time
    assert span["pills"][0] < span["tiles"][1] and span["tiles"][0] < span["pills"][1]
    assert cli.main(args) == 2            # the experiment exists: refuse without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "--set", "focal_gamma=1.5"]) == 2   # not the experiment it started
    assert "config.focal_gamma (2.0 -> 1.5)" in capsys.readouterr().err
    # Extended: one more trial per category in the same studies and Tune experiment. Settings
    # that only run it are taken, and said: Tune restores its own (tuner.pkl, the saved
    # limiter), so the new trials running one at a time shows --max-concurrent 1 took effect.
    extend = [*args, "--resume", "--num-samples", "3", "--max-concurrent", "1", "--pending-timeout", "300"]
    searched.clear()
    assert cli.main(extend) == 0
    out = capsys.readouterr().out
    assert searched == ["sweep:sweep-r"]     # restored trials' run ids come back with Tune's state
    assert "resume: --num-samples 2 -> 3: 1 more trial(s) for each of 2 categories" in out
    assert "resume: --max-concurrent 2 -> 1" in out and "resume: --pending-timeout 600 -> 300" in out
    for category in ("tiles", "pills"):
        study = optuna.load_study(study_name=f"sweep-r-{category}", storage=storage)
        assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    old_ids = {r.info.run_id for r in trials}
    added = [r for r in runs(env, **{"pouta.kind": "trial"})
             if r.data.tags[tracking.TAG_KEY].startswith("sweep:sweep-r/") and r.info.run_id not in old_ids]
    assert sorted(r.data.tags["category"] for r in added) == ["pills", "tiles"]
    first, second = sorted(added, key=lambda r: r.info.start_time)
    assert first.info.end_time <= second.info.start_time        # one slot: not at once
    assert cli.main([*args, "--resume"]) == 2                    # 2 < 3: never shrunk
    assert "has 3 trials per category; it can be extended (--num-samples 3 or more), not shrunk" in \
        capsys.readouterr().err
    assert cli.main(extend) == 0                                 # the extended sweep resumed: nothing to do
    assert "more trial(s)" not in capsys.readouterr().out
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert set(best) == {"tiles", "pills"} and "lambda_1" in best["pills"]
    assert best["pills"]["foreground_threshold"] == 0.3 and best["tiles"]["foreground_threshold"] is None
    pills_trials = [r for r in trials if r.data.tags["category"] == "pills"]
    assert len(pills_trials) == 3 and {r.data.params["foreground_threshold"] for r in pills_trials} == {"0.3"}
    assert len([r for r in runs(env, **{"pouta.kind": "trial"})
                if r.data.tags[tracking.TAG_KEY].startswith("sweep:sweep-r/")]) == 8
    # The report covers every trial of the extended sweep: on the parent run and beside best.yaml.
    report = tmp_path / "sweep-r-report"
    assert {"trials.csv", "trials.md", "tiles-history.png", "tiles-parallel.png"} <= {p.name for p in report.iterdir()}
    table = list(csv.DictReader(io.StringIO((report / "trials.csv").read_text())))
    assert len(table) == 8 and {"lambda_1", "val_pixel_ap", "test_pixel_ap"} <= set(table[0])
    assert sum(row["chosen"] == "yes" for row in table) == 2    # one chosen trial per category
    assert sorted(row["category"] for row in table if row["default"] == "yes") == ["pills", "tiles"]
    parent = next(r for r in runs(env, **{"pouta.kind": "sweep"}) if r.info.run_name == "sweep-r")
    assert {"best_val_pixel_ap.tiles", "best_test_pixel_ap.pills"} <= set(parent.data.metrics)
    assert parent.data.params["num_samples"] == "2" and parent.data.tags["num_samples"] == "3"   # started 2, now 3
    logged = {f.path for f in env["client"].list_artifacts(parent.info.run_id, "report")}
    assert {"report/trials.md", "report/tiles-history.png"} <= logged
    # Weights by need (issue 28): only the registered version has them, in its model (issue 32),
    # without the optimizer state; every other trial's run names its checkpoint in Ray's storage,
    # which keeps the registered and default trials' only, as inference weights (issue 46).
    version = env["client"].get_model_version_by_alias("pouta-mvtec-pills", "challenger")
    registered = {env["client"].get_model_version_by_alias(f"pouta-mvtec-{c}", "challenger").run_id
                  for c in ("tiles", "pills")}
    kept = {r.info.run_id for r in trials if r.info.run_id in registered or r.data.tags.get("pouta.default")}
    for run in trials:
        logged = {a.path for a in env["client"].list_artifacts(run.info.run_id)}
        assert "checkpoint" not in logged
        assert {"config.yaml", "metrics.json", "val_files.json"} <= logged
        on_disk = Path(env["client"].get_run(run.info.run_id).data.tags["pouta.checkpoint"], "checkpoint.pt")
        assert on_disk.is_file() == (run.info.run_id in kept), run.info.run_name
        if on_disk.is_file():
            assert not {"optimizer", "scheduler", "scaler"} & set(load_state(on_disk))
    assert len(kept) < len(trials)
    weights = download_checkpoint(f"models:/{version.name}/{version.version}", env["uri"], tmp_path / "w")
    assert not {"optimizer", "scheduler", "scaler"} & set(load_state(weights))
    for other, hint in ((next((r for r in trials if r.info.run_id in kept - registered), None),
                         "this trial's are in Ray's storage: --model "),
                        (next(r for r in trials if r.info.run_id not in kept), "was removed when its sweep ended")):
        if other is None:   # both defaults registered: no kept, unregistered trial to ask for
            continue
        assert cli.main(["predict", "--model", f"runs:/{other.info.run_id}", str(env["data"] / "tiles" / "test"),
                         "--out", str(tmp_path / "p"), "--tracking-uri", env["uri"]]) == 2
        assert hint in capsys.readouterr().err
    # The registered version says what it is and why it was chosen.
    assert version.tags["category"] == "pills" and version.tags["source"] == "sweep sweep-r"
    assert "val_pixel_ap" in version.tags and "test_pixel_ap" in version.tags
    assert "validation (chosen on)" in version.description and parent.info.run_id in version.description
    # ... and how it fared against the default: a searched config beat it, or the default is registered.
    assert "Against the sweep's default:" in version.description
    # ... and what its decision does: the policy that set the threshold, its false alarms and misses.
    assert re.search(r"Decision \(`anomalous`\): threshold \S+ set by fpr:0\.01 on the validation images: "
                     r"on validation it flagged \d+\.\d% of the good images", version.description)
    assert ("searched.lambda_1" in version.tags) == ("it is registered" in version.description
                                                    and "the default is registered" not in version.description)


def test_a_first_retrain_is_compared_with_the_version_the_sweep_registered(env, capsys):
    # The launches and sweeps above registered both categories (challenger), none has a champion.
    # The first retrain trains each with that registered config and must beat that version (it
    # was promoted unopposed: the winner's curse, issue 46); on the same data with the same
    # config it does not, so the registered versions become champion. Then nothing to do.
    registered = {c: aliases(env, f"pouta-mvtec-{c}")["challenger"] for c in ("tiles", "pills")}
    assert all("champion" not in aliases(env, f"pouta-mvtec-{c}") for c in registered)
    base = ["retrain", "--categories", "all", "--bootstrap-resamples", "200", *common(env, "retrain")]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          kept registered" in out and "pills          kept registered" in out, out
    assert "registered " in out and f"(v{registered['tiles']})" in out
    for category, version in registered.items():
        assert aliases(env, f"pouta-mvtec-{category}")["champion"] == version
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          unchanged" in out and "pills          unchanged" in out


def test_a_second_retrain_of_the_same_name_refuses_to_start_while_one_runs(env, capsys):
    import fcntl

    lock = env["root"] / "ray" / "retrain.retrain.lock"
    with lock.open("w") as held:   # a retrain of that name running (its lock held)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on node-7 since last night\n")
        held.flush()
        code = cli.main(["retrain", "--categories", "all", "--force", *common(env, "retrain")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "another retrain of retrain is running (pid 4242 on node-7 since last night)" in err


def test_a_champion_moved_by_another_process_during_the_gate_is_left_where_it_is(env, capsys, monkeypatch):
    from orchestrator.commands import retrain
    from orchestrator.tracking import registry

    name = "pouta-mvtec-pills"
    # No champion yet: the retrain is compared with the registered challenger, and keeping it
    # would move the champion alias to it.
    env["client"].delete_registered_model_alias(name, "champion")
    challenger = aliases(env, name)["challenger"]
    other = next(str(v.version) for v in env["client"].search_model_versions(f"name = '{name}'")
                 if str(v.version) != challenger)
    real = retrain.reference_checkpoint

    def meanwhile(store, reference, dest):   # another retrain promotes while this one scores
        registry.promote(env["client"], name, other)
        return real(store, reference, dest)

    monkeypatch.setattr(retrain, "reference_checkpoint", meanwhile)
    assert cli.main(["retrain", "--categories", "pills", "--force", "--bootstrap-resamples", "200",
                     *common(env, "retrain")]) == 0
    out = capsys.readouterr().out
    assert "pills          champion moved meanwhile" in out, out
    assert aliases(env, name)["champion"] == other


def test_retrain_gate_keeps_the_champion_against_an_equal_model(env, capsys):
    # Same data, same parameters, --force: a bit-identical challenger. Zero margin, yet the
    # bootstrap gives it no chance of being better, so the champion stays.
    assert cli.main(["retrain", "--categories", "tiles", "--force", "--promote-margin", "0",
                     "--bootstrap-resamples", "200", *common(env, "retrain")]) == 0
    out = capsys.readouterr().out
    assert "tiles          kept champion" in out and "P(challenger better) 0.000" in out
    champion, challenger = (aliases(env, "pouta-mvtec-tiles")[k] for k in ("champion", "challenger"))
    assert champion != challenger
    run = env["client"].get_run(env["client"].get_model_version("pouta-mvtec-tiles", challenger).run_id)
    assert run.data.metrics["gate_p_better"] == 0.0 and run.data.metrics["gate_delta"] == 0.0
    assert run.data.metrics["gate_delta_low"] == run.data.metrics["gate_delta_high"] == 0.0


def test_retrain_after_a_launch_on_new_data_retrains_that_category(env, capsys):
    # New tiles images, trained on at once by a launch: its trial run holds the new fingerprint,
    # the champion the old one. Retrain compares with the champion: tiles is trained again
    # (the rule was "the newest trial saw it": unchanged, and champion never moved).
    train = env["data"] / "tiles" / "train" / "good"
    Image.open(train / "000.png").transpose(Image.FLIP_LEFT_RIGHT).save(train / "999.png")
    assert cli.main(["launch", "--categories", "tiles", *common(env, "launch-new-data")]) == 0
    capsys.readouterr()
    versions = len(env["client"].search_model_versions("name = 'pouta-mvtec-tiles'"))
    base = ["retrain", "--categories", "all", *common(env, "retrain")]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          promoted" in out or "tiles          kept champion" in out
    assert "pills          unchanged" in out
    assert len(env["client"].search_model_versions("name = 'pouta-mvtec-tiles'")) == versions + 1
    # Decided either way: the next night does not train tiles again on the same data.
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          unchanged" in out


def test_promote_moves_champion_and_rejects_unknown_versions(env, capsys):
    assert cli.main(["promote", "--model", "pouta-mvtec-pills", "--version", "1", "--tracking-uri", env["uri"]]) == 0
    assert aliases(env, "pouta-mvtec-pills")["champion"] == "1"
    assert cli.main(["promote", "--model", "pouta-mvtec-pills", "--version", "42", "--tracking-uri", env["uri"]]) == 2
    assert "cannot promote pouta-mvtec-pills version 42" in capsys.readouterr().err


def test_a_failing_category_does_not_stop_the_others(env, capsys):
    # pills loses its anomalous test images: a validation split from the test set is impossible.
    for defect in ("scratch", "stain", "missing"):
        shutil.rmtree(env["data"] / "pills" / "test" / defect)
        shutil.rmtree(env["data"] / "pills" / "ground_truth" / defect)
    code = cli.main(["retrain", "--categories", "all", "--force", "--val-split", "from_test", *common(env, "retrain")])
    captured = capsys.readouterr()
    assert code == 5                      # some work failed, the rest is done: not a crash (1)
    assert "pills          failed" in captured.out and "failed: pills" in captured.err
    assert "val_split=from_test needs good and anomalous test images" in captured.out
    assert "tiles          " in captured.out and "tiles          failed" not in captured.out


def predict_images(checkpoint, scoring, files):
    """Image scores of ``files`` by the model at ``checkpoint`` read with ``scoring``
    (``key=value``), the images read and resized as predict reads them."""
    model, config, state = load_model(checkpoint, scoring=scoring)
    batch = torch.stack([model_input(read_rgb(f, bit_depth(state)), config.image_size) for f in files])
    return [float(s) for s in predict(model, batch)[0]]


def sweep_trials(env, name):
    return [r for r in runs(env, **{"pouta.kind": "trial"})
            if r.data.tags[tracking.TAG_KEY].startswith(f"sweep:{name}/")]


def sweep_against_default(env, tmp_path, name, space_text, *extra, scheduler="none"):
    space = tmp_path / f"{name}.yaml"
    space.write_text(space_text)
    best_out = tmp_path / f"{name}-best.yaml"
    code = cli.main(["sweep", "--space", str(space), "--categories", "tiles", "--scheduler", scheduler,
                     *common(env, name), "--best-out", str(best_out), *extra])
    version = env["client"].get_model_version_by_alias("pouta-mvtec-tiles", "challenger")
    parent = next(r for r in runs(env, **{"pouta.kind": "sweep"}) if r.info.run_name == name)
    return code, version, env["client"].get_run(version.run_id), parent, best_out.read_text()


def test_a_sweep_that_finds_nothing_better_keeps_the_default_and_says_so(env, tmp_path, capsys):
    # amp is ignored on CPU: each searched trial trains the default's model again (same seed,
    # same data), so on val_pixel_ap nothing searched is better. Without
    # a confirmation round (--finalists 0 --confirm-seeds 0) the choice rests on the first seeds.
    code, version, run, parent, best = sweep_against_default(
        env, tmp_path, "nothing-better", "space:\n  amp: {distribution: choice, values: [false]}\n",
        "--num-samples", "2", "--finalists", "0", "--confirm-seeds", "0")
    out = capsys.readouterr().out
    assert code == 0
    assert "no confirmation round (--finalists/--confirm-seeds 0)" in out
    trials = sweep_trials(env, "nothing-better")
    assert len(trials) == 3 and not [r for r in trials if "pouta.confirm_of" in r.data.tags]   # default + 2
    line = next(x for x in out.splitlines() if x.startswith("tiles: "))
    assert "tiles: no searched config beat the default" in line and "the default is registered" in line, line
    assert run.data.tags["pouta.default"] == "true" and run.data.params["image_score"] == "pooled_max"
    assert "no searched config beat the default" in version.description
    assert best.startswith(f"# {line}\n") and yaml.safe_load(best)["tiles"]["image_score"] == "pooled_max"
    assert parent.data.metrics.get("vs_default_p_better.tiles", 0.0) < 0.95


def test_a_sweep_over_a_key_that_matters_and_one_that_does_not_registers_the_one_that_matters(
        env, tmp_path, capsys):
    # Issue 45's "done when". The base config's lr cannot learn (1e-9); the space offers one that
    # can, in 30 epochs at widths of 8, validated on half of 12 test images (measured beside,
    # validation pixel AP of lr 0.003 against 1e-9 on seeds 0, 1000, 2000, 3000: 0.30/0.009,
    # 0.42/0.012, 0.09/0.010, 0.28/0.012), and a key that changes nothing here (amp, ignored on
    # CPU). Under ASHA with 4 searched trials and 2 finalists: one rung (epoch 15), the 2 best
    # searched trials there go on to the end, and the round trains them and the default again.
    # The scoring options are chosen after training, inside each trial: no trial of their own.
    generate(tmp_path / "data", categories=1, image_size=48, n_train=24, n_test_good=6, n_test_defect=6)
    space = ("space:\n  lr: {distribution: choice, values: [1.0e-9, 0.003]}\n"
             "  amp: {distribution: choice, values: [true, false]}\n"
             "scoring:\n  image_score: [pooled_max, topk_mean]\n  image_score_pool: [21, 11]\n")
    code, version, run, parent, best = sweep_against_default(
        env, tmp_path, "lr-matters", space, "--num-samples", "4", "--finalists", "2", "--confirm-seeds", "1",
        "--data-root", str(tmp_path / "data"), "--set", "lr=1e-9", "--set", "epochs=30", "--set", "eval_every=5",
        "--set", "val_split=from_test", "--set", "val_ratio=0.5",
        *(x for w in ("rec", "disc", "fcm") for x in ("--set", f"{w}_width=8")), scheduler="asha")
    out = capsys.readouterr().out
    assert code == 0
    assert "asha: tiles: rungs at epoch(s) 15; the 2 best searched trial(s) at each rung always go on to the end" in out
    line = next(x for x in out.splitlines() if x.startswith("tiles: "))
    found = re.search(r"Δ val_pixel_ap = ([-+]\d\.\d+) \(means over 1 fresh seed\(s\) each\), 95% interval "
                      r"([-+]\d\.\d+)\.\.([-+]\d\.\d+), P\(better\) = (\d\.\d+)\); it is registered", line)
    assert "the chosen config beat the default" in line and found, line
    delta, low, high, p = map(float, found.groups())
    assert low <= delta <= high and delta > 0 and p >= 0.95
    assert run.data.tags.get("pouta.default") is None and run.data.params["lr"] == "0.003"
    # 1 default + 4 searched + the round (2 finalists and the default, 1 fresh seed each):
    # the 4 scoring candidates add none.
    assert "confirmation round: after each category's search, its 2 best searched config(s) and its default" in out
    trials = sweep_trials(env, "lr-matters")
    confirming = {r.data.tags["pouta.confirm_of"]: r for r in trials if "pouta.confirm_of" in r.data.tags}
    assert len(trials) == 8 and len(confirming) == 3
    searched = [r for r in trials if "pouta.default" not in r.data.tags and "pouta.confirm_of" not in r.data.tags]
    finalists = [r for r in searched if r.data.tags["pouta.key"].rsplit("/", 1)[1] in confirming]
    last_epoch = {r.info.run_id: max(m.step for m in env["client"].get_metric_history(r.info.run_id, "val_pixel_ap"))
                  for r in searched}
    assert len(finalists) == 2 and all(last_epoch[r.info.run_id] == 30 for r in finalists)
    assert set(last_epoch.values()) <= {15, 30}      # to the end, or stopped at the rung
    assert {r.data.params["lr"] for r in finalists} >= {"0.003"}
    for r in finalists:
        again = confirming[r.data.tags["pouta.key"].rsplit("/", 1)[1]]
        assert again.data.params["lr"] == r.data.params["lr"] and again.data.params["seed"] != r.data.params["seed"]
        assert again.info.run_name.endswith(f"-confirm-seed{again.data.params['seed']}")
    # registered: the better config's run with the best validation value among its seeds
    winner = next(r for r in finalists if r.info.run_id == run.info.run_id
                  or confirming[r.data.tags["pouta.key"].rsplit("/", 1)[1]].info.run_id == run.info.run_id)
    again = confirming[winner.data.tags["pouta.key"].rsplit("/", 1)[1]]
    assert run.info.run_id == max((winner, again), key=lambda r: r.data.metrics["val_pixel_ap"]).info.run_id
    assert "the chosen config beat the default" in version.description and "searched.lr" in version.tags
    assert parent.data.metrics["vs_default_delta.tiles"] == pytest.approx(delta, abs=1e-4)
    assert parent.data.metrics["vs_default_p_better.tiles"] >= 0.95
    chosen = yaml.safe_load(best)["tiles"]
    assert chosen["lr"] == 0.003
    # The reading chosen on the registered run's own validation images: tagged on its run, kept
    # as an artifact, in the registered checkpoint's config, and what predict scores with.
    record = json.loads(Path(env["client"].download_artifacts(run.info.run_id, "scoring_choice.json",
                                                              str(tmp_path))).read_text())
    assert len(record["candidates"]) == 4
    picked = {k: run.data.tags[f"pouta.scoring.{k}"] for k in ("image_score", "image_score_pool")}
    assert picked == {k: str(v) for k, v in record["chosen"].items()}
    ref = "models:/pouta-mvtec-tiles@challenger"
    images = tmp_path / "data" / "tiles" / "test"
    files = sorted((f.resolve() for f in images.rglob("*.png")), key=str)
    with models.resolved(ref, env["uri"]) as checkpoint:
        config = load_model(checkpoint)[1]
        assert {k: getattr(config, k) for k in record["chosen"]} == record["chosen"]
        expected = predict_images(checkpoint, [f"{k}={v}" for k, v in record["chosen"].items()], files)
    assert cli.main(["predict", "--model", ref, str(images), "--out", str(tmp_path / "predicted"),
                     "--tracking-uri", env["uri"], "--json"]) == 0
    scored = {r["image"]: r["score"] for r in json.loads(capsys.readouterr().out)["scored"]}
    assert [scored[str(f)] for f in files] == pytest.approx(expected, abs=1e-5)


def test_a_sweep_over_seeds_alone_keeps_the_default_once_its_finalists_train_on_fresh_seeds(env, tmp_path, capsys):
    # Pure noise: the searched key is the seed. A lucky seed can beat the default on the
    # validation images with P(better) = 1.00 (measured, docs/experiments.md); the finalist and
    # the default trained again on the same fresh seeds are the same config, so the same models:
    # on their means the finalist is no better, and the default is registered.
    code, version, run, parent, best = sweep_against_default(
        env, tmp_path, "seed-only", "space:\n  seed: {distribution: choice, values: [11, 12, 13]}\n",
        "--num-samples", "2", "--finalists", "1", "--confirm-seeds", "2")
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("tiles: "))
    found = re.search(r"no searched config beat the default \(Δ val_pixel_ap = ([-+]\d\.\d+) \(means over 2 fresh "
                      r"seed\(s\) each\), 95% interval .*P\(better\) = (\d\.\d+) < 0\.95\); "
                      r"the default is registered", line)
    assert found, line
    assert float(found.group(1)) == 0.0 and float(found.group(2)) == 0.0
    assert "Finalists by their mean val_pixel_ap over fresh seeds: " in line
    trials = sweep_trials(env, "seed-only")
    confirming = [r for r in trials if "pouta.confirm_of" in r.data.tags]
    assert len(trials) == 1 + 2 + 2 * 2 and len(confirming) == 4
    default = next(r for r in trials if r.data.tags.get("pouta.default") == "true" and r not in confirming)
    base_seed = int(default.data.params["seed"])
    assert {int(r.data.params["seed"]) for r in confirming} == {base_seed + 1000, base_seed + 2000}
    # the same config on the same seed: the same model, whichever trial it was confirming
    by_seed = {}
    for r in confirming:
        by_seed.setdefault(r.data.params["seed"], set()).add(r.data.metrics["val_pixel_ap"])
    assert all(len(values) == 1 for values in by_seed.values()), by_seed
    assert run.data.tags["pouta.default"] == "true"             # the default (first or fresh seed) is registered
    assert "no searched config beat the default" in version.description
    assert best.startswith(f"# {line}\n")
    assert parent.data.metrics["vs_default_p_better.tiles"] == 0.0


def test_a_sweep_with_an_errored_trial_exits_5_and_names_it(env, tmp_path, capsys):
    # A training image that cannot be decoded: the tiles trial raises (--max-failures 0: no
    # rerun); pills trains. The sweep finishes, registers pills, and says what failed.
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    (data / "tiles" / "train" / "good" / "000.png").write_bytes(b"\x89PNG truncated")
    args = ["sweep", "--space", "mss_lambdas", "--categories", "tiles,pills", "--num-samples", "1",
            "--max-failures", "0", "--confirm-seeds", "0", *common(env, "sweep-errored"), "--data-root", str(data),
            "--best-out", str(tmp_path / "best.yaml")]
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 5, captured.err
    assert "tiles: 2 of 2 trial(s) errored" in captured.err and "pills:" not in captured.err   # default + 1
    # One line per errored trial: its id and the exception's message (Tune logs the traceback).
    named = captured.err.split("tiles: 2 of 2 trial(s) errored\n", 1)[1].splitlines()[0]
    assert named.startswith("  ") and "DataError" in named and "000.png: cannot decode image" in named, named
    assert "tiles           FAILED: no trial finished with a checkpoint" in captured.out
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())) == {"pills"}


def test_a_category_without_defect_images_validates_on_synthetic_anomalies(env, capsys):
    # the previous test left pills with good test images only: auto -> synthetic validation
    assert cli.main(["launch", "--categories", "pills", *common(env, "launch-synthetic")]) == 0
    out = capsys.readouterr().out
    assert "no test metrics for pills" in out
    (child,) = [r for r in runs(env, **{"pouta.kind": "trial", "category": "pills"})
                if r.data.tags[tracking.TAG_KEY].startswith("launch:launch-synthetic/")]
    assert child.data.metrics["val_pixel_ap"] >= 0 and not any(k.startswith("test_") for k in child.data.metrics)


def test_a_trial_with_two_workers_trains_with_ddp_on_ray_train(env, capsys, tmp_path):
    # One-worker trials train in Tune's trial process; several workers make a Ray Train run.
    # Staged training's first epoch leaves the discriminator without gradients: DDP must allow it.
    # No restart allowed: one from the last checkpoint (a fresh DDP) would hide such an error;
    # with none, it fails the attempt, and an attempt Tune retried leaves its error.txt.
    assert cli.main(["launch", "--categories", "tiles", "--workers-per-category", "2", "--max-failures", "0",
                     *common(env, "launch-ddp"), "--set", "rec_warmup_epochs=1"]) == 0
    (child,) = [r for r in runs(env, **{"pouta.kind": "trial", "category": "tiles"})
                if r.data.tags[tracking.TAG_KEY].startswith("launch:launch-ddp/")]
    assert child.info.status == "FINISHED" and "val_pixel_ap" in child.data.metrics
    assert [m.step for m in env["client"].get_metric_history(child.info.run_id, "val_pixel_ap")] == [1, 2]
    assert "model" in load_state(download_checkpoint(f"runs:/{child.info.run_id}", env["uri"], tmp_path))  # registered
    assert list((env["root"] / "ray").glob("launch-ddp-tiles-*/checkpoint_*"))   # Ray Train's run folder
    assert not list((env["root"] / "ray").glob("launch-ddp/*/error.txt"))


def test_a_worker_no_node_can_hold_fails_at_once(env, capsys):
    code = cli.main(["launch", "--categories", "tiles", "--gpus-per-worker", "1", *common(env, "launch-gpu")])
    err = capsys.readouterr().err
    assert code == 3
    assert ("infeasible: a trial needs {'CPU': 1.0, 'GPU': 1.0} x 1 worker(s); cluster has CPU 2 free of 2, "
            "GPU 0 free of 0: add GPU nodes or lower --gpus-per-worker") in err
    assert not runs(env, **{tracking.TAG_KEY: "launch:launch-gpu"})     # refused before any MLflow run


def test_a_demand_the_cluster_never_frees_stops_after_the_pending_timeout(env, capsys):
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    hog = placement_group([{"CPU": 2}])     # another job holds every CPU
    ray.get(hog.ready(), timeout=60)
    try:
        started = time.monotonic()
        code = cli.main(["launch", "--categories", "tiles", "--pending-timeout", "10", *common(env, "launch-stall")])
        took = time.monotonic() - started
    finally:
        remove_placement_group(hog)
    err = capsys.readouterr().err
    assert code == 3 and took < 120, err
    assert "waited 10 s for resources (--pending-timeout): a trial needs {'CPU': 1.0} x 1 worker(s)" in err
    (parent,) = runs(env, **{tracking.TAG_KEY: "launch:launch-stall"})
    assert parent.info.status == "KILLED"


def test_a_trial_waiting_its_turn_while_another_trains_is_not_a_stall(env, capsys):
    # Each trial needs both CPUs: pills waits while tiles trains, longer than --pending-timeout,
    # and tiles reports nothing meanwhile (one evaluation, at its last epoch). Before, the
    # watchdog stopped the command (exit 3); a saturated cluster is not a stuck one. (The
    # timeout is above a trial's start-up here, when no trial is RUNNING yet.)
    # pills (the grid's first trial) trains long; tiles, which waits for it, briefly.
    code = cli.main(["launch", "--categories", "all", "--cpus-per-worker", "2", "--pending-timeout", "12",
                     *common(env, "launch-turns"), "--category-set", "pills:epochs=500",
                     "--category-set", "pills:eval_every=500"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "pouta-mvtec-pills" in out and "pouta-mvtec-tiles" in out
    trials = [r for r in runs(env, **{"pouta.kind": "trial"})
              if r.data.tags[tracking.TAG_KEY].startswith("launch:launch-turns/")]
    first, second = sorted(trials, key=lambda r: r.info.start_time)
    assert (second.info.start_time - first.info.start_time) / 1000 > 12   # it waited longer than the timeout


def test_tracking_uri_falls_back_to_the_embedded_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow-data' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri("http://x:1") == "http://x:1"
