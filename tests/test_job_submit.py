"""The user's main job, for real: `ray job submit` of a sweep to a running `ray start --head`
cluster (token authentication on), logging to a real `mlflow server` reached by this
machine's host name (as on a cluster: not localhost), started the way cluster/SECURITY.md
says; and what a server that refuses the name, and `ray job stop`, leave behind."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_args
from mlflow.tracking import MlflowClient
from servers import MlflowServer, ray_head

from orchestrator.tracking.models import download_checkpoint
from pouta_core.checkpoint import load_state
from pouta_core.data.demo import generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = small_args()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    # The job's entrypoint runs with the head's environment: `pouta` must be on its PATH.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    server = MlflowServer(root, by_name=True)
    server.start(wait=False)   # it starts while Ray does
    try:
        # Two simulated GPUs: the cluster configs' entrypoints ask for them. The head starts
        # outside the repository: a job submitted without a working dir runs where it started.
        with ray_head(root, num_gpus=2, cwd=root) as ray:
            server.wait()
            yield {"root": root, "mlflow": server.url, **ray}
    finally:
        server.stop()


def ray_cli(cluster, *args, check=True, timeout=120, cwd=None):
    env = {**os.environ, **cluster["env"]}   # the cluster's token
    out = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=cwd)
    if check and out.returncode:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def submit(cluster, entry: list[str], runtime_env: dict) -> str:
    """``ray job submit --no-wait`` of ``entry`` with the repo as working dir -> the job id."""
    # Uploaded without .git, a job names its commit the documented way (POUTA_GIT_COMMIT); Ray
    # refused to merge that env var with the driver's own (issue 26): the job failed at ray.init.
    env = {"excludes": [".git", ".venv", "demo", "bench-out", "*.db"], **runtime_env}
    return submit_argv(cluster, ["job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
                                 "--runtime-env-json", json.dumps(env), "--no-wait", "--", *entry])


def submit_argv(cluster, argv: list[str], cwd: Path | None = None) -> str:
    """``ray <argv>`` (a ``job submit --no-wait``) run in ``cwd`` -> the job id."""
    # The dashboard answers before its job agent is up on a busy machine: retry that case only.
    for _ in range(48):
        submitted = ray_cli(cluster, *argv, check=False, cwd=cwd)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr + submitted.stdout:
            break
        time.sleep(5)
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}"
    return next(line.split("'")[1] for line in submitted.stdout.splitlines() if "submitted successfully" in line)


def wait_for_job(cluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = ray_cli(cluster, "job", "status", "--address", cluster["dashboard"], job_id).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    return status


def test_sweep_submitted_with_ray_job_submit_lands_in_mlflow(cluster, tmp_path):
    assert socket.gethostname() in cluster["mlflow"]   # reached by name, allowed by --allowed-hosts
    data = tmp_path / "data"
    generate(data, categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    storage = tmp_path / "ray-results"
    entry = ["pouta", "sweep", "--space", "search_spaces/mss_lambdas.yaml", "--data-root", str(data),
             "--dataset", "mvtec", "--categories", "tiles,pills", "--num-samples", "2", "--max-concurrent", "2",
             "--no-default-trial",
             "--storage-path", str(storage), "--tracking-uri", cluster["mlflow"],
             "--experiment", "job-test", "--name", "job-test", *SMALL]
    job_id = submit(cluster, entry, {"env_vars": {"POUTA_GIT_COMMIT": "job-commit-abc"}})
    status = wait_for_job(cluster, job_id, 900)
    logs = ray_cli(cluster, "job", "logs", "--address", cluster["dashboard"], job_id, check=False).stdout
    assert "succeeded" in status, f"job did not succeed:\n{status}\n{logs[-5000:]}"
    assert "best configs written to" in logs

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("job-test")
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
        assert {"config.yaml", "metrics.json"} <= artifacts and child.data.tags["pouta.checkpoint"]
    for category in ("tiles", "pills"):
        model = client.get_registered_model(f"pouta-mvtec-{category}")
        assert str(model.aliases.get("challenger")) == "1"
        version = client.get_model_version_by_alias(f"pouta-mvtec-{category}", "challenger")
        assert version.run_id in {c.info.run_id for c in children}
        assert "heatmaps.png" in {a.path for a in client.list_artifacts(version.run_id)}
        # The version's weights, through the server (mlflow-artifacts:), as --model models:/ reads them.
        local = download_checkpoint(f"models:/{version.name}/{version.version}", cluster["mlflow"],
                                    tmp_path / "weights" / category)
        assert "model" in load_state(local) and "optimizer" not in load_state(local)
        steps = [m.step for m in client.get_metric_history(version.run_id, "val_pixel_ap")]
        assert steps == list(range(1, len(steps) + 1))   # epochs as steps, no duplicates (ASHA may stop at 1)


def test_a_server_that_refuses_the_host_name_stops_the_sweep_at_once(tmp_path):
    """MLflow's default --allowed-hosts (localhost, private IPs) answers 403 to a name: the
    command stops in one line naming the flag, before any Optuna study or Ray exists, so the
    same command runs once the server is fixed."""
    data = tmp_path / "data"
    generate(data, categories=1, image_size=48, n_train=4, n_test_good=2, n_test_defect=2)
    server = MlflowServer(tmp_path)          # started without --allowed-hosts
    server.start()
    try:
        by_name = f"http://{socket.gethostname()}:{server.port}"
        started = time.monotonic()
        out = subprocess.run(
            [str(BIN / "pouta"), "sweep", "--space", "mss_lambdas", "--data-root", str(data), "--dataset", "mvtec",
             "--categories", "tiles", "--num-samples", "1", "--no-default-trial",
             "--storage-path", str(tmp_path / "ray-results"),
             "--tracking-uri", by_name, "--name", "refused", *SMALL],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert elapsed < 30, f"took {elapsed:.0f}s"
    assert lines[-1].startswith("pouta: error: ") and "Traceback" not in out.stderr
    assert f"--allowed-hosts {socket.gethostname()}:{server.port}" in lines[-1] and "403" in lines[-1]
    assert not (tmp_path / "ray-results" / "optuna.db").exists()
    assert not (tmp_path / "ray-results" / "refused").exists()


def test_ray_job_stop_leaves_no_mlflow_run_running(cluster, tmp_path):
    """``ray job stop``: SIGTERM, SIGKILL 3 s later (Ray's default). The command marks its runs
    KILLED first, so none stays RUNNING, and the experiment resumes (not asserted here)."""
    data = tmp_path / "data"
    generate(data, categories=1, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    experiment = "stopped"
    entry = ["pouta", "sweep", "--space", "mss_lambdas", "--data-root", str(data), "--dataset", "mvtec",
             "--categories", "tiles", "--num-samples", "2", "--max-concurrent", "2",
             "--no-default-trial",
             "--storage-path", str(tmp_path / "ray-results"), "--tracking-uri", cluster["mlflow"],
             "--experiment", experiment, "--name", "stop-test", *small_args(epochs=400)]
    job_id = submit(cluster, entry, {})
    client = MlflowClient(cluster["mlflow"])
    deadline = time.monotonic() + 300
    trials = []
    while time.monotonic() < deadline and not trials:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        trials = [r for r in runs if r.data.tags.get("pouta.kind") == "trial" and "loss_total" in r.data.metrics]
        time.sleep(2)
    assert trials, "no trial reported within 300 s:\n" + ray_cli(cluster, "job", "logs", "--address",
                                                               cluster["dashboard"], job_id, check=False).stdout[-3000:]
    ray_cli(cluster, "job", "stop", "--address", cluster["dashboard"], job_id)
    status = wait_for_job(cluster, job_id, 120)
    assert "stopped" in status
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert {r.info.status for r in runs} <= {"KILLED", "FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert [r.info.status for r in runs if r.data.tags.get("pouta.kind") == "sweep"] == ["KILLED"]


CLUSTER = REPO / "cluster"
# What a test may substitute in a documented entrypoint: addresses and paths, nothing else.
SUBSTITUTED = ("/mnt/shared/mvtec", "/mnt/shared/ray-results", "http://mlflow.mlops.svc:5000",
               "http://mlflow.internal:5000", "http://127.0.0.1:8265")


def submit_command(text: str) -> tuple[str, str]:
    """The first ``ray job submit ... -- pouta ...`` in ``text`` (continued lines joined, comment
    marks removed) -> (``ray ...`` up to ``--``, the entrypoint)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith("ray job submit"))
    command = ""
    for line in lines[start:]:
        command += line.lstrip("#").strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    options, entry = command.split(" -- ", 1)
    return " ".join(options.split()), " ".join(entry.split())


def documented_submissions() -> list[tuple[str, list[str] | None, str, dict]]:
    """Every way cluster/ submits a job: (where, the arguments of `ray` the launcher
    documents or None for a RayJob, entrypoint, the RayJob's runtime env)."""
    out = []
    sweep = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-sweep.yaml").read_text())
    cron_docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "retrain-cronjob.yaml").read_text()))
    retrain = next(yaml.safe_load(d["data"]["rayjob.yaml"]) for d in cron_docs if d and d["kind"] == "ConfigMap")
    for where, job in (("rayjob-sweep.yaml", sweep), ("retrain-cronjob.yaml", retrain)):
        out.append((where, None, job["spec"]["entrypoint"], yaml.safe_load(job["spec"]["runtimeEnvYAML"])))
    # The launcher's comment (`#   ray job submit ... -- \` and its continuation lines), which
    # README.md shows as well, word for word.
    options, entry = submit_command((CLUSTER / "ray-cluster.yaml").read_text())
    assert (options, entry) == submit_command((REPO / "README.md").read_text()), "README and launcher differ"
    out.append(("ray-cluster.yaml", shlex.split(options)[1:], entry, {}))   # after `ray`
    return out


def gpus_in_use(cluster, timeout: float = 30) -> float:
    """The GPUs ``ray status`` shows reserved (it reports every few seconds: polled)."""
    deadline = time.monotonic() + timeout
    used = 0.0
    while time.monotonic() < deadline and not used:
        status = ray_cli(cluster, "status", "--address", cluster["address"], check=False).stdout
        found = re.search(r"([\d.]+)/[\d.]+ GPU", status)
        used = float(found.group(1)) if found else 0.0
        time.sleep(1)
    return used


def test_every_documented_entrypoint_runs_verbatim_under_ray_job_submit(cluster, tmp_path):
    """Each RayJob's entrypoint and the launcher's documented `ray job submit`, word for word
    but for addresses and paths, submitted from outside the repository to a cluster with
    (simulated) GPUs: each reaches MLflow by name and starts a trial with the GPU it asks for;
    then `ray job stop` (training at the paper's size on 2 CPU cores is not the point)."""
    data = tmp_path / "mvtec"
    generate(data, categories=1, image_size=32, n_train=6, n_test_good=3, n_test_defect=2)
    values = {"/mnt/shared/mvtec": str(data), "/mnt/shared/ray-results": str(tmp_path / "ray-results"),
              "http://mlflow.mlops.svc:5000": cluster["mlflow"], "http://mlflow.internal:5000": cluster["mlflow"],
              "http://127.0.0.1:8265": cluster["dashboard"]}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    client = MlflowClient(cluster["mlflow"])
    submissions = documented_submissions()
    assert [w for w, *_ in submissions] == ["rayjob-sweep.yaml", "retrain-cronjob.yaml", "ray-cluster.yaml"]
    for where, options, entry, runtime_env in submissions:
        for key in SUBSTITUTED:
            entry = entry.replace(key, values[key])
        assert "/mnt/" not in entry and "mlflow." not in entry, f"{where}: an address or path not substituted"
        if options is None:
            # A RayJob: its env vars as written (addresses substituted); its `pip:` installs the
            # package, as this machine's environment already has it (editable, resolved from any cwd).
            env = {k: values.get(v, v) for k, v in runtime_env.get("env_vars", {}).items()}
            argv = ["job", "submit", "--address", cluster["dashboard"], "--runtime-env-json",
                    json.dumps({"env_vars": env}), "--no-wait", "--", *shlex.split(entry)]
            cwd = outside
        else:
            # The launcher's instructions are run from a checkout: `--working-dir .` uploads it.
            options = [values.get(o, o) for o in options]
            argv = [*options, "--no-wait", "--", *shlex.split(entry)]
            cwd = REPO
        before = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
        job_id = submit_argv(cluster, argv, cwd=cwd)
        deadline = time.monotonic() + 240
        started = []
        while time.monotonic() < deadline and not started:
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                    if r.info.run_id not in before]
            started = [r for r in runs if r.data.tags.get("pouta.kind") == "trial"]
            status = ray_cli(cluster, "job", "status", "--address", cluster["dashboard"], job_id).stdout.lower()
            if "failed" in status or "succeeded" in status:
                break
            time.sleep(2)
        logs = ray_cli(cluster, "job", "logs", "--address", cluster["dashboard"], job_id, check=False).stdout
        assert started, f"{where}: no trial started within 240 s:\n{logs[-4000:]}"
        # The run opens when Tune starts the trial; the reservation shows in Ray's state a moment later.
        deadline = time.monotonic() + 60
        while gpus_in_use(cluster) == 0 and time.monotonic() < deadline:
            time.sleep(2)
        assert gpus_in_use(cluster) > 0, f"{where}: a trial runs but no GPU is reserved:\n{logs[-3000:]}"
        ray_cli(cluster, "job", "stop", "--address", cluster["dashboard"], job_id)
        assert "stopped" in wait_for_job(cluster, job_id, 120), where
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.info.run_id not in before]
        assert "RUNNING" not in {r.info.status for r in runs}, (where, [(r.info.run_name, r.info.status) for r in runs])
