"""MLflow is never in Tune's critical path (issue 26): a real ``mlflow server`` stopped by its
PID while a sweep runs. The trials go on, the records wait in the outbox, and when the server
is back every trial's metrics are in MLflow once; a server that never comes back costs the
sweep its registration (exit 4, the count of records not logged), never Ray's results."""

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import small_args
from mlflow.tracking import MlflowClient
from servers import BIN, MlflowServer

from pouta_core.data.demo import generate


def start_sweep(tmp_path: Path, url: str, name: str, *, samples: int, epochs: int, extra=()) -> subprocess.Popen:
    data = tmp_path / "data"
    generate(data, categories=1, image_size=32, n_train=6, n_test_good=2, n_test_defect=2)
    argv = [str(BIN / "pouta"), "sweep", "--space", "mss_lambdas", "--data-root", str(data), "--dataset", "mvtec",
            "--categories", "tiles", "--num-samples", str(samples), "--max-concurrent", "1", "--scheduler", "none",
            "--no-default-trial",
            "--storage-path", str(tmp_path / "ray-results"), "--tracking-uri", url, "--name", name, *extra,
            *small_args(epochs=epochs)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=(tmp_path / "out.log").open("w"),
                            stderr=(tmp_path / "err.log").open("w"))


def trial_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("pouta")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if r.data.tags.get("pouta.kind") == "trial"]


def wait_for_first_metric(client: MlflowClient, proc: subprocess.Popen, tmp_path: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
        if any("loss_total" in r.data.metrics for r in trial_runs(client)):
            return
        time.sleep(1)
    raise AssertionError("no metric in MLflow after 300 s:\n" + (tmp_path / "err.log").read_text()[-3000:])


def reported(storage: Path) -> int:
    """Results Ray has recorded so far (one line of result.json per report), MLflow or not."""
    return sum(len(p.read_text().splitlines()) for p in storage.rglob("result.json"))


def test_an_outage_mid_sweep_loses_no_trial_and_duplicates_no_step(tmp_path):
    server = MlflowServer(tmp_path)
    url = server.start()
    samples, epochs = 3, 8
    proc = start_sweep(tmp_path, url, "outage", samples=samples, epochs=epochs)
    try:
        client = MlflowClient(url)
        wait_for_first_metric(client, proc, tmp_path)
        server.stop()
        # The trials go on without MLflow: every epoch of every trial reaches Ray meanwhile.
        deadline = time.monotonic() + 300
        while reported(tmp_path / "ray-results") < samples * epochs and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(1)
        assert reported(tmp_path / "ray-results") >= samples * epochs, "the trials stalled while MLflow was down"
        assert proc.poll() is None   # ... and the command waits for MLflow to take their records
        server.start()
        rc = proc.wait(timeout=900)
        err = (tmp_path / "err.log").read_text()
        assert rc == 0, err[-3000:]
        assert "MLflow unreachable" in err and "MLflow is back" in err
        runs = trial_runs(client)
        assert len(runs) == samples, [r.info.run_name for r in runs]
        for run in runs:
            assert run.info.status == "FINISHED"
            for key in ("loss_total", "val_pixel_ap"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert sorted(steps) == list(range(1, epochs + 1)), (run.info.run_name, key, steps)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_mlflow_that_never_comes_back_costs_the_registration_not_the_results(tmp_path):
    server = MlflowServer(tmp_path)
    url = server.start()
    proc = start_sweep(tmp_path, url, "gone", samples=2, epochs=6, extra=["--mlflow-wait", "3"])
    try:
        wait_for_first_metric(MlflowClient(url), proc, tmp_path)
        server.stop()
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    err = (tmp_path / "err.log").read_text()
    last = err.strip().splitlines()[-1]
    assert rc == 4, err[-3000:]
    assert "records not logged" in last and "Traceback" not in err, err[-3000:]
    # Ray's results are whole: both trials ran every epoch.
    results = [[json.loads(line) for line in p.read_text().splitlines()]
               for p in (tmp_path / "ray-results" / "gone").rglob("result.json")]
    assert len(results) == 2 and all(r[-1]["epoch"] == 6 for r in results)
