"""MLflow is never in Tune's critical path (issue 26), and nothing a sweep measured is lost from
it (issue 48): a real ``mlflow server`` stopped by its PID while a sweep runs. The trials go on,
the records wait in the outbox and the driver's journal, and when the server is back every
trial's metrics are in MLflow once. What the driver could not send before it stopped (an outage
longer than --mlflow-wait, Ctrl-C, SIGKILL, a password changed on the server) is sent by
``pouta tracking replay`` or the next command; ``--resume`` then registers without training
again. Ground truth: Tune's own result.json files; 0 records lost, 0 duplicated, no run left
RUNNING."""

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import small_args
from mlflow.tracking import MlflowClient
from servers import BIN, MlflowServer

from pouta_core.data.demo import generate


def sweep_argv(tmp_path: Path, url: str, name: str, *, samples: int, epochs: int, extra=()) -> list[str]:
    data = tmp_path / "data"
    if not data.is_dir():
        generate(data, categories=1, image_size=32, n_train=6, n_test_good=2, n_test_defect=2)
    return [str(BIN / "pouta"), "sweep", "--space", "mss_lambdas", "--data-root", str(data), "--dataset", "mvtec",
            "--categories", "tiles", "--num-samples", str(samples), "--max-concurrent", "1", "--scheduler", "none",
            "--no-default-trial",
            "--storage-path", str(tmp_path / "ray-results"), "--tracking-uri", url, "--name", name, *extra,
            *small_args(epochs=epochs)]


def start_sweep(tmp_path: Path, url: str, name: str, *, samples: int, epochs: int, extra=()) -> subprocess.Popen:
    argv = sweep_argv(tmp_path, url, name, samples=samples, epochs=epochs, extra=extra)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Its own session: a SIGKILLed driver's in-process Ray is cleaned up by its group id.
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=(tmp_path / "out.log").open("a"),
                            stderr=(tmp_path / "err.log").open("a"), start_new_session=True)


def pouta(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(BIN / "pouta"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


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


def tune_epochs(storage: Path) -> dict[str, set[int]]:
    """Tune's ground truth: the epochs each trial reported (a restored trial may report one twice)."""
    out: dict[str, set[int]] = defaultdict(set)
    for path in storage.rglob("result.json"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                out[row["trial_id"]].add(int(row["epoch"]))
    return out


def assert_all_logged_once(client: MlflowClient, storage: Path) -> None:
    """Every epoch of every trial that Tune recorded is in MLflow, once, and no run is RUNNING."""
    truth = tune_epochs(storage)
    assert truth, "Tune recorded nothing"
    exp = client.get_experiment_by_name("pouta")
    every = client.search_runs([exp.experiment_id])
    runs = {r.data.tags["pouta.key"].rpartition("/")[2]: r for r in every if r.data.tags.get("pouta.kind") == "trial"}
    assert set(truth) <= set(runs), (sorted(runs), sorted(truth))
    for trial_id in set(runs) - set(truth):   # started, stopped before its first report
        assert not client.get_run(runs[trial_id].info.run_id).data.metrics, trial_id
    for trial_id, epochs in truth.items():
        for key in ("loss_total", "val_pixel_ap"):
            steps = [m.step for m in client.get_metric_history(runs[trial_id].info.run_id, key)]
            assert sorted(steps) == sorted(epochs), (trial_id, key, sorted(steps), sorted(epochs))
    running = [(r.info.run_name, r.data.tags.get("pouta.kind")) for r in every if r.info.status == "RUNNING"]
    assert not running, running


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


def test_an_outage_longer_than_the_wait_is_replayed_once_the_server_is_back(tmp_path):
    server = MlflowServer(tmp_path)
    url = server.start()
    proc = start_sweep(tmp_path, url, "gone", samples=2, epochs=6, extra=["--mlflow-wait", "3"])
    try:
        wait_for_first_metric(MlflowClient(url), proc, tmp_path)
        server.stop()
        rc = proc.wait(timeout=900)
    finally:
        stop_group(proc)
    err = (tmp_path / "err.log").read_text()
    last = err.strip().splitlines()[-1]
    assert rc == 4, err[-3000:]
    assert "stayed unreachable" in last and "records kept in its journal" in last, last
    assert "pouta tracking replay" in last and "Traceback" not in err, err[-3000:]
    # Ray's results are whole: both trials ran every epoch.
    storage = tmp_path / "ray-results"
    results = [[json.loads(line) for line in p.read_text().splitlines()]
               for p in (storage / "gone").rglob("result.json")]
    assert len(results) == 2 and all(r[-1]["epoch"] == 6 for r in results)
    assert list((storage / "gone" / "mlflow-journal").glob("*.jsonl"))

    # While the server is still down, replay says so and keeps the journal.
    down = pouta(tmp_path, "tracking", "replay", "--storage-path", str(storage), "--name", "gone")
    assert down.returncode == 4 and "still in its journal" in down.stderr, down.stderr[-2000:]
    server.start()
    done = pouta(tmp_path, "tracking", "replay", "--storage-path", str(storage), "--name", "gone")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "records delivered" in done.stdout, done.stdout
    client = MlflowClient(url)
    assert_all_logged_once(client, storage)
    assert not list((storage / "gone" / "mlflow-journal").glob("*.jsonl"))

    server.stop()   # the registration it cost is made by --resume: the password test below shows it


def test_records_queued_at_ctrl_c_and_at_sigkill_reach_mlflow_once(tmp_path):
    server = MlflowServer(tmp_path)
    url = server.start()
    storage = tmp_path / "ray-results"
    client = MlflowClient(url)
    samples, epochs = 2, 12
    try:
        for stop in (signal.SIGINT, signal.SIGKILL):
            # 1. Ctrl-C, then (resumed) SIGKILL, each while MLflow is down and records wait.
            extra = ["--resume"] if stop == signal.SIGKILL else []
            proc = start_sweep(tmp_path, url, "kill", samples=samples, epochs=epochs, extra=extra)
            try:
                seen = reported(storage)
                wait_for_first_metric(client, proc, tmp_path)
                deadline = time.monotonic() + 120
                while reported(storage) < seen + 1 and time.monotonic() < deadline:
                    time.sleep(0.5)
                server.stop()
                deadline = time.monotonic() + 120
                while reported(storage) < seen + 4 and time.monotonic() < deadline:
                    assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
                    time.sleep(0.5)
                assert reported(storage) >= seen + 4, "the trials stalled while MLflow was down"
                os.kill(proc.pid, stop)
                rc = proc.wait(120)
            finally:
                stop_group(proc)
            err = (tmp_path / "err.log").read_text()
            assert rc == (130 if stop == signal.SIGINT else -signal.SIGKILL), err[-3000:]
            journals = list((storage / "kill" / "mlflow-journal").glob("*.jsonl"))
            assert journals, err[-3000:]
            server.start()
        # 2. What both drivers left: sent by the replay, once; the runs they left RUNNING ended.
        done = pouta(tmp_path, "tracking", "replay", "--storage-path", str(storage), "--name", "kill")
        assert done.returncode == 0, done.stderr[-3000:]
        assert_all_logged_once(client, storage)
        sweep = [r for r in client.search_runs([client.get_experiment_by_name("pouta").experiment_id])
                 if r.data.tags.get("pouta.kind") == "sweep"]
        assert sweep[0].info.status == "KILLED" and "pouta.end_reason" in sweep[0].data.tags
    finally:
        server.stop()


def test_a_password_changed_mid_sweep_keeps_the_records_and_replay_sends_them(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (make install adds it)")
    from mlflow.server.auth.client import AuthServiceClient

    admin = ("admin", "the-admin-password-1234")
    old, new = "first-password-1234", "second-password-5678"
    server = MlflowServer(tmp_path, admin=admin)
    url = server.start()

    def login(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    login(*admin)
    AuthServiceClient(url).create_user("pouta", old)   # the account the drivers use (cluster/SECURITY.md)
    login("pouta", old)
    storage = tmp_path / "ray-results"
    samples, epochs = 2, 6
    proc = start_sweep(tmp_path, url, "password", samples=samples, epochs=epochs, extra=["--mlflow-wait", "3"])
    try:
        client = MlflowClient(url)
        wait_for_first_metric(client, proc, tmp_path)
        login(*admin)
        AuthServiceClient(url).update_user_password("pouta", new)   # rotated on the server, not in the sweep
        login("pouta", new)
        rc = proc.wait(timeout=900)
    finally:
        stop_group(proc)
        server.stop()
    err = (tmp_path / "err.log").read_text()
    assert rc == 4, err[-3000:]
    assert err.count("MLflow refused our credentials") == 1, err[-3000:]
    assert "refused our credentials" in err.strip().splitlines()[-1]
    # The sweep went on training: every trial ran every epoch.
    truth = tune_epochs(storage)
    assert len(truth) == samples and all(e == set(range(1, epochs + 1)) for e in truth.values()), truth
    server.start()   # the user database is on disk: the new password holds after a restart
    try:
        done = pouta(tmp_path, "tracking", "replay", "--storage-path", str(storage), "--name", "password")
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(url)
        assert_all_logged_once(client, storage)
        before = reported(storage)
        resumed = pouta(tmp_path, *sweep_argv(tmp_path, url, "password", samples=samples, epochs=epochs)[1:],
                        "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert reported(storage) == before
        assert client.get_model_version_by_alias("pouta-mvtec-tiles", "challenger")
    finally:
        server.stop()
