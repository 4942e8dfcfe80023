"""launch / sweep / retrain / promote on an in-process Ray (one per module) with the embedded
sqlite MLflow, on tiny demo data."""

import shutil

import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import cli, tracking
from pouta_core.data.demo import generate

SMALL = ["--preset", "tiny", "--set", "image_size=32", "--set", "rec_width=4", "--set", "fcm_width=4",
         "--set", "disc_width=4", "--set", "epochs=2", "--set", "eval_every=1", "--set", "lr_milestones=[]",
         "--set", "batch_size=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("orch")
    generate(root / "data", categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ray.init(num_cpus=2)   # with the dashboard: Ray Train cleans up placement groups through it
    yield {"root": root, "data": root / "data", "uri": uri, "client": MlflowClient(uri)}
    ray.shutdown()


def common(env, name):
    return ["--data-root", str(env["data"]), "--dataset", "mvtec", "--storage-path", str(env["root"] / "ray"),
            "--tracking-uri", env["uri"], "--name", name, *SMALL]


def runs(env, **tags):
    exp = env["client"].get_experiment_by_name("pouta")
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return env["client"].search_runs([exp.experiment_id], filter_string=flt)


def aliases(env, name):
    return {k: str(v) for k, v in env["client"].get_registered_model(name).aliases.items()}


PILLS_ON_OBJECT = ["--category-set", "pills:foreground_threshold=0.3"]


def test_launch_trains_every_category_and_registers_challengers(env, capsys):
    assert cli.main(["launch", "--categories", "all", *common(env, "launch-a"), *PILLS_ON_OBJECT]) == 0
    out = capsys.readouterr().out
    assert "pouta-mvtec-tiles v1 (challenger)" in out and "pouta-mvtec-pills v1 (challenger)" in out
    assert "mlflow ui --backend-store-uri" in out
    parent = runs(env, **{"pouta.kind": "launch"})
    children = runs(env, **{"pouta.kind": "trial"})
    assert len(parent) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    for name in ("pouta-mvtec-tiles", "pouta-mvtec-pills"):
        assert aliases(env, name) == {"challenger": "1"}
    # --category-set reaches the pills trial only
    threshold = {c.data.tags["category"]: c.data.params["foreground_threshold"] for c in children}
    assert threshold == {"pills": "0.3", "tiles": "None"}


def test_rerunning_a_finished_launch_resumes_without_duplicates(env, capsys):
    assert cli.main(["launch", "--categories", "all", *common(env, "launch-a"), *PILLS_ON_OBJECT]) == 0
    assert len(runs(env, **{"pouta.kind": "trial"})) == 2
    assert len(env["client"].search_model_versions("name = 'pouta-mvtec-tiles'")) == 1


def test_ablation_grid_prints_every_variant(env, tmp_path, capsys):
    space = tmp_path / "ablation2.yaml"
    space.write_text("space:\n  variant: {distribution: grid, values: [vanilla, pouta]}\n")
    code = cli.main(["sweep", "--space", str(space), "--categories", "tiles", "--num-samples", "1",
                     "--scheduler", "none", *common(env, "ablation-a")])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("tiles")]
    assert {r[1] for r in rows if len(r) > 2} >= {"vanilla", "pouta"}
    variants = {r.data.tags["variant"] for r in runs(env, **{"pouta.kind": "trial", "category": "tiles"})}
    assert {"vanilla", "pouta"} <= variants


def test_sweep_resume_does_not_redo_finished_trials(env, tmp_path, capsys):
    import optuna

    args = ["sweep", "--space", "mss_lambdas", "--categories", "pills", "--num-samples", "2",
            *common(env, "sweep-r"), "--best-out", str(tmp_path / "best.yaml"), *PILLS_ON_OBJECT]
    assert cli.main(args) == 0
    storage = f"sqlite:///{env['root'] / 'ray' / 'optuna.db'}"
    study = optuna.load_study(study_name="sweep-r-pills", storage=storage)
    assert len(study.trials) == 2
    assert cli.main(args) == 2            # the experiment exists: refuse without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume"]) == 0
    assert len(optuna.load_study(study_name="sweep-r-pills", storage=storage).trials) == 2
    best = (tmp_path / "best.yaml").read_text()
    assert "pills:" in best and "lambda_1:" in best and "foreground_threshold: 0.3" in best
    pills_trials = runs(env, **{"pouta.kind": "trial", "category": "pills"})
    assert len(pills_trials) >= 3 and {r.data.params["foreground_threshold"] for r in pills_trials} == {"0.3"}


def test_retrain_skips_unchanged_data_and_promotes_a_first_champion(env, capsys):
    base = ["retrain", "--categories", "all", *common(env, "retrain")]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          unchanged" in out and "pills          unchanged" in out

    train = env["data"] / "tiles" / "train" / "good"
    Image.open(train / "000.png").transpose(Image.FLIP_LEFT_RIGHT).save(train / "999.png")
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "tiles          promoted" in out and "champion none" in out and "pills          unchanged" in out
    assert aliases(env, "pouta-mvtec-tiles")["champion"] == aliases(env, "pouta-mvtec-tiles")["challenger"]


def test_retrain_keeps_champion_unless_better_by_margin(env, capsys):
    assert cli.main(["retrain", "--categories", "tiles", "--force", "--promote-margin", "1.0",
                     *common(env, "retrain")]) == 0
    out = capsys.readouterr().out
    assert "tiles          kept champion" in out
    assert aliases(env, "pouta-mvtec-tiles")["champion"] != aliases(env, "pouta-mvtec-tiles")["challenger"]


def test_promote_moves_champion_and_rejects_unknown_versions(env, capsys):
    assert cli.main(["promote", "--model", "pouta-mvtec-pills", "--version", "1", "--tracking-uri", env["uri"]]) == 0
    assert aliases(env, "pouta-mvtec-pills")["champion"] == "1"
    assert cli.main(["promote", "--model", "pouta-mvtec-pills", "--version", "42", "--tracking-uri", env["uri"]]) == 2
    assert "cannot promote pouta-mvtec-pills version 42" in capsys.readouterr().err


def test_a_failing_category_does_not_stop_the_others(env, capsys):
    # pills loses its anomalous test images: its training cannot report metrics and fails.
    for defect in ("scratch", "stain", "missing"):
        shutil.rmtree(env["data"] / "pills" / "test" / defect)
        shutil.rmtree(env["data"] / "pills" / "ground_truth" / defect)
    code = cli.main(["retrain", "--categories", "all", "--force", *common(env, "retrain")])
    captured = capsys.readouterr()
    assert code == 1
    assert "pills          failed" in captured.out and "failed: pills" in captured.err
    assert "tiles          " in captured.out and "tiles          failed" not in captured.out


def test_tracking_uri_falls_back_to_the_embedded_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow-data' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri("http://x:1") == "http://x:1"
