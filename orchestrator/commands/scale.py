"""``pouta bench scale``: an MVTec-sized sweep rehearsed on this machine, the way a user runs it.

A real multi-node Ray on 127.0.0.1 (``ray start --head`` and ``nodes`` more ``ray start``
worker nodes, each declaring ``gpus_per_node`` GPUs: logical ones, what the scheduler sees), a
real ``mlflow server`` (proxied artifacts, as on a cluster), and ``categories`` categories (one
generated category's data under that many names) x ``trials`` Optuna trials of a tiny model,
submitted with ``ray job submit`` and asking one GPU per trial. Each epoch lasts at least
``epoch_floor_s`` (the simulated accelerator of ``bench orchestration``: a
``worker_process_setup_hook`` pads ``train_epoch``; the product code is unchanged).

Figures, from what the sweep leaves behind (MLflow's runs and store, the server's access log,
the experiment folder) and from sampling the driver process once a second:

- trials finished / errored (MLflow's trial runs: FINISHED / FAILED);
- the driver's CPU seconds per finished trial over the first and the last 10% of trials (a
  cost that grows with the experiment, such as a search across every run per trial start,
  shows as a ratio above 1) and its peak RSS;
- MLflow requests (the server's access log) per trial while trials ran, and per category
  after (registration, report); artifact bytes (its artifact store) per trial, and the
  registered versions' bytes;
- the Optuna storage's size;
- wall time, from the first trial's start to the last one's end (Tune's ``result.json``:
  :func:`trial_times`), against
  the ideal schedule: every slot busy with floor-length epochs, ``ceil(trials / slots) x
  epochs x floor``. *Decision*: the job's own start (the driver's imports, the cluster check,
  the studies) and end (registering a model per category, the report) are a fixed cost,
  reported apart as ``job_wall_s``: at this machine's reduced sizes they would hide the
  figure that grows with the sweep.

Every process is started here, on free ports, in process groups of its own, and stopped by
PID; nothing joins or touches another Ray or MLflow on the machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.commands.bench import EPOCH_FLOOR_ENV, TINY, simulate_accelerator
from orchestrator.commands.processes import answers, stop_groups
from orchestrator.execution.cluster import free_port

BIN = Path(sys.executable).parent
EXPERIMENT = "scale"
REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) /')


class Processes:
    """What the bench started: each in a process group of its own, stopped by that group's id."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.started = root, env, []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("w") as log:   # the child keeps its own descriptor
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**self.env, **(env or {})}, cwd=self.root)
        self.started.append(proc)
        return proc

    def wait_for(self, name: str, proc: subprocess.Popen, ready, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} did not start ({'exited' if proc.poll() is not None else 'timed out'}):"
                                   f"\n{tail}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        stop_groups(list(reversed(self.started)), timeout=10)


def start_cluster(procs: Processes, nodes: int, gpus_per_node: int) -> dict[str, str]:
    """A head (no GPUs: it runs the job's driver) and ``nodes`` worker nodes of ``gpus_per_node``
    GPUs and as many CPUs, all on 127.0.0.1 -> the GCS address and the dashboard URL."""
    port, dash = free_port(), free_port()
    head = procs.start("ray-head", [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port",
        str(free_port()), "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "1", "--num-gpus", "0",
        "--temp-dir", procs.env["POUTA_SCALE_RAY_TMP"], "--disable-usage-stats"])
    procs.wait_for("ray-head", head, lambda: answers(f"http://127.0.0.1:{dash}/api/version", any_status=True))
    for i in range(nodes):
        name = f"ray-node-{i}"
        node = procs.start(name, [
            str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--block", "--node-ip-address",
            "127.0.0.1", "--num-cpus", str(gpus_per_node), "--num-gpus", str(gpus_per_node), "--disable-usage-stats"])
        procs.wait_for(name, node, lambda n=name: "Ray runtime started" in (procs.root / f"{n}.log").read_text())
    return {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}


def start_mlflow(procs: Processes) -> str:
    port = free_port()
    server = procs.start("mlflow-server", [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{procs.root / 'mlflow.db'}",
        "--artifacts-destination", str(procs.root / "mlflow-artifacts")],
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    procs.wait_for("mlflow-server", server, lambda: answers(f"http://127.0.0.1:{port}/health", any_status=True))
    return f"http://127.0.0.1:{port}"


def make_data(root: Path, categories: int) -> list[str]:
    """One generated category's images under ``categories`` names (mvtec layout)."""
    from pouta_core.data.demo import generate

    source = root / "source"
    (first,) = generate(source, categories=1, image_size=48, n_train=8, n_test_good=3, n_test_defect=3)
    names = [f"part{i:02d}" for i in range(categories)]
    for name in names:
        shutil.copytree(source / first, root / "data" / name, dirs_exist_ok=True)
    return names


class DriverSampler(threading.Thread):
    """Samples the sweep's driver (the ``pouta sweep --name name`` process) once a second,
    from ``/proc`` (Linux, as Ray's raylet is): (time, CPU seconds, RSS bytes)."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name_arg, self.samples, self.done = name, [], threading.Event()
        self.pid: int | None = None

    def _find(self) -> int | None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                cmd = cmdline.read_bytes().split(b"\0")
                # python .../pouta sweep ... --name NAME, or python -m orchestrator.cli sweep ...
                # (not `ray job submit -- pouta sweep ...`, nor the shell that runs it)
                if (b"python" in cmd[0].rsplit(b"/", 1)[-1] and b"sweep" in cmd and self.name_arg.encode() in cmd
                        and not cmd[1].endswith(b"/ray")):
                    return int(cmdline.parent.name)
        return None

    def run(self) -> None:
        tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        while not self.done.wait(1.0):
            self.pid = self.pid or self._find()
            if self.pid is None:
                continue
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                rss = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue   # gone (the sweep ended)
            self.samples.append((time.time(), (int(fields[11]) + int(fields[12])) / tick, rss))


def run_job(procs: Processes, dashboard: str, runtime_env: dict[str, Any], entry: list[str],
            timeout_s: float) -> str:
    """``ray job submit`` of ``entry``, waiting for its end (its logs into ``job.log``) -> the
    final status, or TIMEOUT (the job is stopped). One blocking submit, not a status poll:
    each ``ray`` command imports Ray, seconds of CPU on this machine's two cores."""
    def ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        with (procs.root / "job.log").open("a") as log:
            return subprocess.run([str(BIN / "ray"), *args], stdout=log, stderr=subprocess.STDOUT, env=procs.env,
                                  cwd=procs.root, timeout=timeout)

    job_id = f"pouta-scale-{secrets.token_hex(4)}"
    submit = ["job", "submit", "--address", dashboard, "--submission-id", job_id, "--runtime-env-json",
              json.dumps(runtime_env), "--", *entry]
    deadline = time.monotonic() + timeout_s
    log = procs.root / "job.log"
    for _ in range(48):   # the dashboard answers before its job agent is up on a busy machine
        seen = log.stat().st_size if log.exists() else 0
        try:
            ray(*submit, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            ray("job", "stop", "--address", dashboard, job_id)
            return "TIMEOUT"
        if "No available agent" not in log.read_text()[seen:]:
            break
        time.sleep(5)
    ray("job", "status", "--address", dashboard, job_id)
    said = log.read_text()[-500:].upper()
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in said), "UNKNOWN")


def _cpu_at(samples: list[tuple[float, float, int]], t: float) -> float:
    """The driver's CPU seconds at time ``t`` (the last sample before it)."""
    before = [cpu for when, cpu, _ in samples if when <= t]
    return before[-1] if before else 0.0


def driver_cpu_per_trial(samples, ends: list[float]) -> tuple[float, float]:
    """Driver CPU seconds per finished trial while the first 10% of trials finished, and while
    the last 10% did (each window: from one finish to another, ``k`` trials apart)."""
    ends = sorted(ends)
    k = max(1, len(ends) // 10)
    if len(ends) < 2 * k + 1:
        return math.nan, math.nan
    first = (_cpu_at(samples, ends[k]) - _cpu_at(samples, ends[0])) / k
    last = (_cpu_at(samples, ends[-1]) - _cpu_at(samples, ends[-1 - k])) / k
    return first, last


def trial_times(experiment: Path) -> tuple[list[float], list[float]]:
    """Each trial's start and end (epoch seconds) from Tune's ``result.json``: its first
    report's time less its running time, and its last report's time. *Decision*: not MLflow's
    run times, which say when the driver's outbox delivered (and a registered run is finished
    again when registered, after every trial)."""
    starts, ends = [], []
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            starts.append(rows[0]["timestamp"] - rows[0].get("time_total_s", 0.0))
            ends.append(float(rows[-1]["timestamp"]))
    return starts, ends


def mlflow_requests(log: Path, until: float) -> tuple[int, int]:
    """Requests in an ``mlflow server`` access log up to ``until`` (while trials ran) and after
    (registering a version per category, the report)."""
    during = after = 0
    for line in log.read_text().splitlines():
        if REQUEST.search(line):
            stamp = time.mktime(time.strptime(line[:19], "%Y/%m/%d %H:%M:%S"))
            during, after = (during + 1, after) if stamp <= until else (during, after + 1)
    return during, after


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def bench_scale(categories: int = 15, trials: int = 64, nodes: int = 3, gpus_per_node: int = 2,
                epochs: int = 3, epoch_floor_s: float = 3.0, work: str | None = None,
                timeout_s: float = 7200, code: str | None = None) -> dict[str, Any]:
    """See the module docstring. ``code``: the sweep (driver and trials) runs from that checkout
    of the project instead of this one (``PYTHONPATH`` in the job's runtime env): the figures
    of an older version, measured the same way, for a before/after comparison."""
    from mlflow.tracking import MlflowClient

    root = Path(work or tempfile.mkdtemp(prefix="pouta-bench-scale-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    make_data(root, categories)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # unix socket paths must stay < 108 bytes
    token = Path(ray_tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "POUTA_SCALE_RAY_TMP": ray_tmp}
    procs = Processes(root, env)
    slots = nodes * gpus_per_node
    run_name = f"scale-{secrets.token_hex(3)}"
    sampler = DriverSampler(run_name)
    try:
        cluster = start_cluster(procs, nodes, gpus_per_node)
        mlflow_url = start_mlflow(procs)
        hook = f"{simulate_accelerator.__module__}.{simulate_accelerator.__name__}"
        env_vars = {EPOCH_FLOOR_ENV: str(epoch_floor_s), **({"PYTHONPATH": str(Path(code).resolve())} if code else {})}
        runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": hook}
        config = [a for kv in [*TINY, f"epochs={epochs}"] for a in ("--set", kv)]
        command = [sys.executable, "-m", "orchestrator.cli"] if code else [str(BIN / "pouta")]
        entry = [*command, "sweep", "--space", "mss_lambdas", "--data-root", str(root / "data"),
                 "--dataset", "mvtec", "--categories", "all", "--num-samples", str(trials), "--scheduler", "none",
                 "--gpus-per-worker", "1", "--max-concurrent", str(slots), "--storage-path", str(root / "ray-results"),
                 "--tracking-uri", mlflow_url, "--experiment", EXPERIMENT, "--name", run_name, "--preset", "tiny",
                 # N searched trials per category, as before default trials existed (issue 30) and
                 # as the older checkouts --code runs have them: the figures stay comparable.
                 *config, *([] if code else ["--no-default-trial"])]
        sampler.start()
        start = time.time()
        status = run_job(procs, cluster["dashboard"], runtime_env, entry, timeout_s)
        wall = time.time() - start
    finally:
        sampler.done.set()
        procs.stop_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    sampler.join(5)
    (root / "driver.csv").write_text("time,cpu_s,rss_bytes\n" + "".join(f"{t:.3f},{c:.3f},{m}\n"
                                                                         for t, c, m in sampler.samples))
    if status != "SUCCEEDED":
        tail = (root / "job.log").read_text()[-3000:]
        raise RuntimeError(f"the sweep job ended {status}; {root}/job.log:\n{tail}")

    # The server is stopped: its store is read directly (sqlite, and the artifact folder).
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pouta.kind` = 'trial'", max_results=50_000)
    registered = {v.run_id for m in client.search_registered_models() for v in client.search_model_versions(
        f"name = '{m.name}'")}
    artifacts = root / "mlflow-artifacts" / exp.experiment_id
    plain = [_folder_bytes(artifacts / r.info.run_id) for r in runs if r.info.run_id not in registered]
    chosen = [_folder_bytes(artifacts / r.info.run_id) for r in runs if r.info.run_id in registered]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    errored = [r for r in runs if r.info.status != "FINISHED"]
    experiment = root / "ray-results" / run_name
    starts, ends = trial_times(experiment)
    first, last = driver_cpu_per_trial(sampler.samples, ends)
    during, after = mlflow_requests(root / "mlflow-server.log", max(ends, default=0))
    ideal = math.ceil(categories * trials / slots) * epochs * epoch_floor_s
    span = max(ends, default=0) - min(starts, default=0)
    rss_at = lambda t: max((m for when, _, m in sampler.samples if when <= t), default=0) / 2**20  # noqa: E731
    result = {
        "categories": categories, "trials_per_category": trials, "nodes": nodes + 1, "slots": slots,
        "epochs": epochs, "epoch_floor_s": epoch_floor_s, "work": str(root),
        "trials_finished": len(finished), "trials_errored": len(errored) + categories * trials - len(runs),
        "driver_cpu_s_per_trial_first_10pct": round(first, 3), "driver_cpu_s_per_trial_last_10pct": round(last, 3),
        "driver_overhead_ratio_last_to_first": round(last / first, 2) if first > 0 else None,
        "driver_rss_mb_first_10pct": round(rss_at(ends[len(ends) // 10]) if ends else 0, 1),
        "driver_rss_mb_last_trial": round(rss_at(max(ends, default=0)), 1),
        "driver_peak_rss_mb": round(max((s[2] for s in sampler.samples), default=0) / 2**20, 1),
        "mlflow_requests_per_trial": round(during / max(len(runs), 1), 1),
        "mlflow_requests_after_trials_per_category": round(after / categories, 1),
        "mlflow_artifact_mb_per_trial_mean": round(sum(plain) / max(len(plain), 1) / 2**20, 3),
        "mlflow_artifact_mb_per_trial_max": round(max(plain, default=0) / 2**20, 3),
        "mlflow_artifact_mb_per_registered_max": round(max(chosen, default=0) / 2**20, 3),
        # MLflow 3 keeps log_model's files apart from the run's, under <experiment>/models/
        "mlflow_logged_models_mb_per_category": round(_folder_bytes(artifacts / "models") / categories / 2**20, 3),
        "mlflow_artifact_mb_total": round(_folder_bytes(artifacts) / 2**20, 1),
        "optuna_storage_kb": round(sum(_folder_bytes(p) if p.is_dir() else p.stat().st_size
                                       for p in experiment.glob("optuna.*")) / 1024, 1),
        # What Tune rewrites at each snapshot of the experiment (every 10 s, or longer beyond 200
        # trials: orchestrator.execution.tuner.snapshot_period); it grows with the trials.
        "tune_state_kb_per_trial": round(sum(p.stat().st_size for p in experiment.glob("experiment_state-*.json"))
                                         / max(len(runs), 1) / 1024, 1),
        "tune_searcher_state_kb": round(sum(p.stat().st_size for p in experiment.glob("searcher-state-*"))
                                        / 1024, 1),
        "job_wall_s": round(wall, 1), "wall_s": round(span, 1), "ideal_s": round(ideal, 1),
        "wall_to_ideal": round(span / ideal, 3),
    }
    result["targets"] = {
        "errored==0": result["trials_errored"] == 0,
        "overhead_last<=1.2x_first": bool(first > 0 and last <= 1.2 * first),
        "artifacts<=2MB_per_trial": max(plain, default=0) <= 2 * 2**20,
        "wall<=1.3x_ideal": span <= 1.3 * ideal,
    }
    return result
