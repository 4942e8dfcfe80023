"""Never wait without a bound for resources the cluster does not have.

Two checks: before anything runs, a worker that no node of an in-process cluster could ever
hold (a GPU on a CPU machine) fails at once; while Tune runs, a Tune callback watches Ray's
placement groups and stops the command when a Train worker group has waited for resources
for ``--pending-timeout`` seconds without any trial reporting meanwhile. (A joined cluster may
autoscale, so there only the timeout decides.)
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


class StallWatchdog(Callback):
    """Raises :class:`ClusterStalled` from Tune's loop when a worker group has been waiting for
    ``timeout_s`` while no trial reported (checked every few seconds)."""

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
        if _waiting_worker_groups():
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
