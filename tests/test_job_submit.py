"""The user's main job, for real: `ray job submit` of a sweep to a running `ray start --head`
cluster (token authentication on), logging to a real `mlflow server` on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_args
from mlflow.tracking import MlflowClient
from servers import mlflow_server, ray_head

from pouta_core.data.demo import generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = small_args()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    # The job's entrypoint runs with the head's environment: `pouta` must be on its PATH.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    with mlflow_server(root) as mlflow_url, ray_head(root) as ray:
        yield {"root": root, "mlflow": mlflow_url, **ray}


def ray_cli(cluster, *args, check=True, timeout=120):
    env = {**os.environ, **cluster["env"]}   # the cluster's token
    out = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def test_sweep_submitted_with_ray_job_submit_lands_in_mlflow(cluster, tmp_path):
    data = tmp_path / "data"
    generate(data, categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    storage = tmp_path / "ray-results"
    entry = ["pouta", "sweep", "--space", "search_spaces/mss_lambdas.yaml", "--data-root", str(data),
             "--dataset", "mvtec", "--categories", "tiles,pills", "--num-samples", "2", "--max-concurrent", "2",
             "--storage-path", str(storage), "--tracking-uri", cluster["mlflow"], "--name", "job-test", *SMALL]
    submit = ["job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
              # Uploaded without .git, the job names its commit the documented way; Ray refused
              # to merge that env var with the driver's own (issue 26), so the job failed at ray.init.
              "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "demo", "bench-out", "*.db"],
                                                "env_vars": {"POUTA_GIT_COMMIT": "job-commit-abc"}}),
              "--no-wait", "--", *entry]
    # The dashboard answers before its job agent is up on a busy machine: retry that case only.
    for _ in range(48):
        submitted = ray_cli(cluster, *submit, check=False)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr + submitted.stdout:
            break
        time.sleep(5)
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}"
    job_id = next(line.split("'")[1] for line in submitted.stdout.splitlines() if "submitted successfully" in line)
    deadline = time.monotonic() + 900
    status = ""
    while time.monotonic() < deadline:
        status = ray_cli(cluster, "job", "status", "--address", cluster["dashboard"], job_id).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = ray_cli(cluster, "job", "logs", "--address", cluster["dashboard"], job_id, check=False).stdout
    assert "succeeded" in status, f"job did not succeed:\n{status}\n{logs[-5000:]}"
    assert "best configs written to" in logs

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("pouta")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pouta.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pouta.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0].info.run_id
    assert parents[0].data.tags["git_commit"] == "job-commit-abc"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["dataset"] == "mvtec" and child.data.tags["variant"] == "pouta"
        assert len(child.data.tags["pouta.data_fingerprint"]) == 64
        assert child.data.tags["git_commit"] == "job-commit-abc"
        assert child.data.params["category"] in ("tiles", "pills") and "lambda_1" in child.data.params
        assert {"loss_total", "loss_rec", "val_pixel_ap", "test_pixel_ap", "val_image_auroc"} <= set(child.data.metrics)
        assert child.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "metrics.json", "checkpoint"} <= artifacts
    for category in ("tiles", "pills"):
        model = client.get_registered_model(f"pouta-mvtec-{category}")
        assert str(model.aliases.get("challenger")) == "1"
        version = client.get_model_version_by_alias(f"pouta-mvtec-{category}", "challenger")
        assert version.run_id in {c.info.run_id for c in children}
        assert "heatmaps.png" in {a.path for a in client.list_artifacts(version.run_id)}
        steps = [m.step for m in client.get_metric_history(version.run_id, "val_pixel_ap")]
        assert steps == list(range(1, len(steps) + 1))   # epochs as steps, no duplicates (ASHA may stop at 1)
