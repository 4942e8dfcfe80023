"""The MLflow store and run helpers every part of :mod:`orchestrator.tracking` uses: where runs
go (:func:`resolve_tracking_uri`, :func:`setup`), a server that refuses us
(:class:`TrackingAccessError`), runs found again by their ``pouta.key`` tag, opened, finished
and, when a command is interrupted, ended KILLED; params and metrics logged in batches.

All MLflow calls happen in the driver process (a Tune callback and the commands), never in
the training workers: so the embedded sqlite file has a single writer, and on a cluster the
driver is the one client that talks HTTP to ``mlflow server``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pouta_core.config import ConfigError

log = logging.getLogger(__name__)

# What orchestrator.tracking hands on.
__all__ = [
    "CHALLENGER", "CHAMPION", "DEFAULT_HOME", "TAG_END_REASON", "TAG_FINGERPRINT", "TAG_KEY", "TAG_KIND", "TAG_PRESET",
    "TAG_SELECTION", "TrackingAccessError", "access_error", "artifact_root", "create_run", "end_open_runs",
    "find_run", "finish", "flatten", "get_or_create_run", "git_commit", "last_step", "log_metrics", "log_params",
    "quick_requests", "reopen_run", "resolve_tracking_uri", "selection_tag", "setup",
]


DEFAULT_HOME = Path("mlflow-data")
TAG_KIND = "pouta.kind"            # parent | trial | retrain
TAG_KEY = "pouta.key"              # stable identity of a run, to find it again after a restart
TAG_FINGERPRINT = "pouta.data_fingerprint"
TAG_PRESET = "pouta.preset"        # the preset a run's config started from (paper, tiny)
TAG_SELECTION = "pouta.selection"  # validation | test (val_split=none): the split choices were made on
CHAMPION, CHALLENGER = "champion", "challenger"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an embedded sqlite file and an
    artifact folder under ``./mlflow-data`` (MLflow 3 refuses the old ``./mlruns`` file store).
    ``setup`` creates the folder of a sqlite store; resolving creates nothing."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{DEFAULT_HOME.resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where artifacts go for an embedded sqlite store (a server decides for itself)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


class TrackingAccessError(ConfigError):
    """The MLflow server refused this client: a host name it does not allow, or credentials
    missing or wrong. The message is one line that names what fixes it (exit 2)."""


_INVALID_HOST = "Invalid Host header"   # MLflow's answer to a Host outside --allowed-hosts


def access_error(uri: str, exc: BaseException) -> TrackingAccessError | None:
    """What ``exc`` (from a call to the server at ``uri``) means when the server refused us;
    None for any other error. MLflow does not retry these answers, so they arrive at once."""
    text = str(exc)
    found = re.search(r"error code (\d{3})", text)
    code = int(found.group(1)) if found else getattr(exc, "get_http_status_code", lambda: None)()
    host = urlparse(uri).netloc.rpartition("@")[2]
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == 403 and _INVALID_HOST in text:
        return TrackingAccessError(
            f"{uri}: the MLflow server refuses the host name '{host}' (403 Invalid Host header); start it with "
            f"--allowed-hosts {host} (and --cors-allowed-origins for the UI), see cluster/SECURITY.md")
    if code == 401:
        what = f"user '{user}' and its password were refused" if user else "it asks for a user"
        return TrackingAccessError(f"{uri}: {what} (401); set MLFLOW_TRACKING_USERNAME and "
                                   "MLFLOW_TRACKING_PASSWORD to the account cluster/SECURITY.md creates")
    if code == 403:
        return TrackingAccessError(f"{uri}: user '{user or '(none)'}' may not do this (403 Permission denied); "
                                   "grant it EDIT on the experiment (or MANAGE for the registry), see "
                                   "cluster/SECURITY.md")
    return None


def setup(uri: str | None, experiment: str) -> tuple[MlflowClient, str]:
    """-> (client, experiment id), creating the experiment if needed. A server that refuses
    this client (host name, credentials) raises :class:`TrackingAccessError` at once."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                         artifact_location=artifact_root(uri))
    except Exception as exc:
        refused = access_error(uri, exc)
        if refused is None:
            raise
        raise refused from None
    return client, exp_id


def find_run(client: MlflowClient, exp_id: str, key: str) -> str | None:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def get_or_create_run(client: MlflowClient, exp_id: str, key: str, *, name: str,
                      tags: dict[str, str], parent_id: str | None = None) -> str:
    """The run tagged ``key``, reopened if it exists (a restarted trial or a resumed sweep
    logs into the same run: no duplicates), else a new one."""
    run_id = find_run(client, exp_id, key)
    if run_id is not None:
        return reopen_run(client, run_id)
    return create_run(client, exp_id, key, name=name, tags=tags, parent_id=parent_id)


def create_run(client: MlflowClient, exp_id: str, key: str, *, name: str, tags: dict[str, str],
               parent_id: str | None = None) -> str:
    """A new run tagged ``key`` (the caller knows none exists), open."""
    all_tags = {TAG_KEY: key, **tags}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    _open_runs[run_id] = client
    _ended.discard(run_id)
    return run_id


def reopen_run(client: MlflowClient, run_id: str) -> str:
    """A known run set RUNNING again (a restarted trial or a resumed command) -> its id."""
    client.update_run(run_id, status="RUNNING")
    _open_runs[run_id] = client
    _ended.discard(run_id)
    return run_id


# Runs this process set RUNNING and has not finished: an interrupted command marks them KILLED.
_open_runs: dict[str, MlflowClient] = {}


def selection_tag(val_split: str) -> str:
    """The ``pouta.selection`` tag: which split a run's choices were made on."""
    return "test" if val_split == "none" else "validation"


def finish(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    """Mark a run FINISHED (or FAILED); a run this process has ended already (KILLED by a
    stop) keeps its status."""
    if run_id in _ended:
        return
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
    _open_runs.pop(run_id, None)


_ended: set[str] = set()


@contextlib.contextmanager
def quick_requests(timeout_s: int = 2) -> Iterator[None]:
    """Within: MLflow HTTP calls try once, for at most ``timeout_s`` (its default is minutes of
    retries): for a process that must end now (``ray job stop`` kills it 3 s after SIGTERM),
    and while the outbox, which retries itself, delivers."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({names[0]: "0", names[1]: str(timeout_s)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


TAG_END_REASON = "pouta.end_reason"   # why a run ended KILLED or FAILED


def end_open_runs(status: str = "KILLED", reason: str = "") -> list[str]:
    """Mark every run this process left RUNNING as ``status`` (KILLED: stopped, a rerun
    reopens them; FAILED: an unexpected error), with ``reason`` in ``pouta.end_reason``, one
    quick try each. -> their ids."""
    ended = []
    with quick_requests():
        for run_id, client in list(_open_runs.items()):
            try:
                client.set_terminated(run_id, status)
                if reason:
                    client.set_tag(run_id, TAG_END_REASON, reason)
                ended.append(run_id)
                _ended.add(run_id)
            except Exception as exc:  # the store may be gone; say so, keep going
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(exc).splitlines()[0])
            _open_runs.pop(run_id, None)
    return ended


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params that the run does not have yet (params are immutable in MLflow)."""
    have = client.get_run(run_id).data.params
    from mlflow.entities import Param

    new = [Param(k, str(v)) for k, v in flatten("", params).items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def last_step(client: MlflowClient, run_id: str, metric: str = "loss_total") -> int:
    history = client.get_metric_history(run_id, metric)
    return max((m.step for m in history), default=-1)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int,
                timestamp_ms: int | None = None) -> None:
    """Log the numeric ``metrics`` at ``step``, stamped ``timestamp_ms`` (default: now)."""
    import time

    from mlflow.entities import Metric

    now = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool) and v == v]
    if batch:
        client.log_batch(run_id, metrics=batch)


@functools.cache
def git_commit() -> str:
    """The commit of the code, from git or ``POUTA_GIT_COMMIT`` (jobs uploaded by ``ray job
    submit`` carry no .git folder), else ``unknown``. Asked once per process: the code a
    process runs does not change under it, and a sweep builds a callback per category."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("POUTA_GIT_COMMIT", "unknown")
