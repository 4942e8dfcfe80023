"""A sweep stopped at any instant is finished by ``--resume``: Ctrl-C stops the whole command
(exit 130, MLflow runs KILLED, nothing registered), a SIGKILL of the driver (here right after a
trial's final checkpoint) loses nothing, and the resumed sweep holds every trial once in Tune,
Optuna and MLflow. The test_training resume tests cover the exact restore of a trial."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import small_args
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from orchestrator.execution import interrupts
from pouta_core.data.demo import generate

EPOCHS = 3
SMALL = small_args(epochs=EPOCHS)
CATEGORIES = ("tiles", "pills")
SAMPLES = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts") / "data"
    generate(root, categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    return root


def sweep_args(data: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", "--space", "mss_lambdas", "--data-root", str(data),
            "--dataset", "mvtec", "--categories", ",".join(CATEGORIES), "--num-samples", str(SAMPLES),
            "--max-concurrent", "2", "--scheduler", "none", "--storage-path", str(root / "ray"),
            "--finalists", "1", "--confirm-seeds", "1",   # a confirmation round: 2 more trials per category
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--name", "stop", *SMALL]


def start(args: list[str], root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (root / "driver.log").open("a")
    # Its own session: the in-process Ray it starts can be cleaned up by process group id.
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def checkpoints(root: Path) -> list[dict]:
    """Metrics of every checkpoint Ray Train has persisted so far."""
    out = []
    for f in (root / "ray").rglob("checkpoint_*/metrics.json"):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(f.read_text()))
    return out


def wait_for(predicate, proc: subprocess.Popen, root: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited {proc.returncode} early:\n{(root / 'driver.log').read_text()[-4000:]}")
        time.sleep(0.1)
    stop_group(proc)
    raise AssertionError(f"timed out:\n{(root / 'driver.log').read_text()[-4000:]}")


def resume_and_check(data: Path, root: Path) -> None:
    proc = start([*sweep_args(data, root), "--resume"], root)
    try:
        code = proc.wait(600)
    finally:
        stop_group(proc)
    assert code == 0, (root / "driver.log").read_text()[-5000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pouta")
    every = client.search_runs([exp.experiment_id])
    trials = [r for r in every if r.data.tags.get("pouta.kind") == "trial"]
    # every trial once (the default, the searched ones, the finalist and default again), no duplicate
    assert len(trials) == len(CATEGORIES) * (1 + SAMPLES + 2)
    confirming = [r for r in trials if "pouta.confirm_of" in r.data.tags]
    assert len(confirming) == 2 * len(CATEGORIES) and len({r.data.tags["pouta.confirm_of"] for r in confirming}) == 4
    assert sum(r.data.tags.get("pouta.default") == "true" for r in trials) == 2 * len(CATEGORIES)
    assert all(r.info.status == "FINISHED" for r in every)
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_pixel_ap")]
        assert steps == list(range(1, EPOCHS + 1)), steps      # no duplicate, no missing last epoch
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'ray' / 'stop' / 'optuna.db'}")
    for category in CATEGORIES:
        study = optuna.load_study(study_name=f"stop-{category}", storage=storage)
        assert not study.get_trials(states=(TrialState.RUNNING,))
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == SAMPLES
    for category in CATEGORIES:
        assert client.get_model_version_by_alias(f"pouta-mvtec-{category}", "challenger")


def final_checkpoints(root: Path) -> int:
    return sum(m.get("epoch") == EPOCHS for m in checkpoints(root))


def test_a_sweep_stopped_by_ctrl_c_then_killed_is_finished_by_resume(data, tmp_path):
    # 1. Ctrl-C after a first checkpoint: the whole command stops, nothing is chosen.
    proc = start(sweep_args(data, tmp_path), tmp_path)
    try:
        wait_for(lambda: len(checkpoints(tmp_path)) >= 1, proc, tmp_path)
        os.kill(proc.pid, signal.SIGINT)
        started = time.monotonic()
        code = proc.wait(120)
        assert time.monotonic() - started < 60
    finally:
        stop_group(proc)
    log = (tmp_path / "driver.log").read_text()
    assert code == 130, log[-4000:]
    assert "pouta: interrupted; rerun the same command with --resume" in log
    assert "Tuner.restore" not in log
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pouta").experiment_id])
    assert runs and all(r.info.status in ("KILLED", "FINISHED") for r in runs)
    assert [r for r in runs if r.data.tags.get("pouta.kind") == "sweep"][0].info.status == "KILLED"
    assert not client.search_registered_models()               # nothing chosen from a partial sweep

    # 2. The resumed sweep is SIGKILLed as soon as a final checkpoint is on disk: for that
    #    trial, (usually) before Tune has recorded its last result.
    seen = final_checkpoints(tmp_path)
    proc = start([*sweep_args(data, tmp_path), "--resume"], tmp_path)
    try:
        wait_for(lambda: final_checkpoints(tmp_path) > seen, proc, tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_group(proc)

    # 3. Resumed again: it finishes, with every trial once everywhere.
    resume_and_check(data, tmp_path)


def test_sigterm_outside_tune_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)   # Python's, or Ray's where an earlier module started one
    with interrupts.stop_on_signals(), pytest.raises(interrupts.Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before
