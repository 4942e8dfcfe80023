"""Never wait without a bound for resources the cluster does not have.

Two checks: before anything runs, a worker that no node of an in-process cluster could ever
hold (a GPU on a CPU machine) fails at once; while Tune runs, a Tune callback watches Ray's
placement groups and stops the command when a trial or Train worker group has waited for
resources for ``--pending-timeout`` seconds while nothing moved: no trial reported, none was
training, and the autoscaler was adding no node. Waiting is normal on a saturated or
autoscaling cluster; only waiting with nothing else happening is a stall.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.tune import Callback

from orchestrator.errors import ClusterStalled

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
DEFAULT_PENDING_TIMEOUT_S = 600.0


def describe(per_worker: dict[str, float], workers: int) -> str:
    """"trial needs {'CPU': 1.0, 'GPU': 1.0} x 1 worker(s); cluster has CPU 2.0 free of 2.0, GPU 0/0"."""
    total, free = ray.cluster_resources(), ray.available_resources()
    have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in sorted(per_worker))
    if per_worker.get("GPU") and total.get("GPU", 0) < per_worker["GPU"]:
        hint = "add GPU nodes or lower --gpus-per-worker"
    else:
        hint = "add nodes, or lower --cpus-per-worker / --gpus-per-worker / --workers-per-category"
    return f"a trial needs {per_worker} x {workers} worker(s); cluster has {have}: {hint}"


def check_feasible(per_worker: dict[str, float], workers: int) -> None:
    """Fail at once when no node of this (in-process, fixed-size) cluster can hold one worker."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0) >= v for k, v in per_worker.items()) for node in nodes):
        raise ClusterStalled(f"infeasible: {describe(per_worker, workers)}")


def _waiting_worker_groups() -> int:
    """Placement groups asking for CPUs or GPUs that are not placed yet (Train worker groups;
    Tune's trial drivers ask for memory only)."""
    pending = 0
    for pg in ray.util.placement_group_table().values():
        if pg.get("state") not in ("PENDING", "RESCHEDULING"):
            continue
        if any(b.get("CPU", 0) or b.get("GPU", 0) for b in pg.get("bundles", {}).values()):
            pending += 1
    return pending


def pending_nodes() -> int:
    """Nodes the autoscaler is launching or that are starting (0 without an autoscaler, or when
    its status cannot be read). Read as ``ray status`` reads it: the v2 autoscaler's status
    from the GCS, else the v1 monitor's report in the GCS key-value store."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        n = len(status.pending_launches) + len(status.pending_nodes)
        if n:
            return n
    except Exception:   # noqa: BLE001 - no v2 autoscaler, or an older GCS: try the v1 report
        pass
    try:
        import json

        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw).get("autoscaler_report", {}) if raw else {}
        return len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())
    except Exception:   # noqa: BLE001 - no autoscaler: nothing is on its way
        return 0


def training_trials(trials, waiting_groups: int, workers: int) -> int:
    """Trials that are training now. A RUNNING one-worker trial trains (its resources are its
    own placement group's); a RUNNING trial of several workers may itself be waiting for its
    worker group, so the groups waiting are taken off."""
    running = sum(1 for t in trials if t.status == "RUNNING")
    return max(0, running - (waiting_groups if workers > 1 else 0))


class StallWatchdog(Callback):
    """Raises :class:`ClusterStalled` from Tune's loop when a placement group has been waiting
    for ``timeout_s`` while no trial reported, none trained and no node was on its way (checked
    every few seconds).

    *Decision* (issue 28): before, a trial waiting while others trained between two reports
    (a paper-preset epoch block on a big category), or while the autoscaler brought up a cold
    node pulling a 10 GB image, stopped a saturated sweep after ``--pending-timeout``. Now each
    of these resets the wait."""

    def __init__(self, timeout_s: float, per_worker: dict[str, float], workers: int) -> None:
        self.timeout_s = timeout_s
        self.per_worker = per_worker
        self.workers = workers
        self._waiting_since: float | None = None
        self._last_check = 0.0
        self._clear_checks = 0

    def __getstate__(self) -> dict[str, Any]:   # Tune pickles callbacks with its state
        return {**self.__dict__, "_waiting_since": None, "_last_check": 0.0, "_clear_checks": 0}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._waiting_since = None   # progress

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        waiting = _waiting_worker_groups()
        if waiting and (training_trials(trials, waiting, self.workers) or pending_nodes()):
            self._waiting_since, self._clear_checks = None, 0   # waiting for a turn, not stuck
        elif waiting:
            self._clear_checks = 0
            self._waiting_since = self._waiting_since or now
        else:
            # Ray Train recreates a group that failed to start: a short gap is not progress.
            self._clear_checks += 1
            if self._clear_checks >= 2:
                self._waiting_since = None
        if self._waiting_since is not None and now - self._waiting_since > self.timeout_s:
            raise ClusterStalled(f"waited {self.timeout_s:g} s for resources (--pending-timeout): "
                                 f"{describe(self.per_worker, self.workers)}")
