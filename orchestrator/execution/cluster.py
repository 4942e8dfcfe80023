"""Which Ray cluster a command uses, named explicitly for every process it starts.

Ray finds a cluster by ``address="auto"`` in several places a user never sees (Ray Train's
placement-group cleaner, the state API inside workers). With a second Ray on the machine (a
colleague's ``ray start``, a test run) those lookups fail with "Found multiple active Ray
instances", and with a stopped one (``ray_current_cluster`` left behind) they retry a dead
GCS forever. So a command either joins the cluster the user names (``--ray-address`` or
``RAY_ADDRESS``) or starts its own in-process one on a port chosen here, and in both cases
the address reaches every actor and task through ``RAY_ADDRESS`` in the driver's environment
and in the job's ``runtime_env``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray

from orchestrator.execution.interrupts import reclaim_sigterm
from orchestrator.execution.storage import check_storage_shared
from orchestrator.execution.watchdog import check_feasible

if TYPE_CHECKING:
    from orchestrator.plan import Plan

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # the runtime env of `ray job submit`, set in the driver
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"   # read by Ray when it starts a head node in-process
_saved_env: dict[str, str | None] | None = None
_started_here = False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(values: dict[str, str]) -> None:
    global _saved_env
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in (ADDRESS_ENV, _GCS_PORT_ENV)}
    os.environ.update(values)


def job_runtime_env() -> dict[str, Any]:
    """The runtime env the job was submitted with (``ray job submit --runtime-env-json`` or a
    RayJob's ``runtimeEnvYAML``); empty outside a job."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return {}
    return dict(json.loads(raw).get("runtime_env") or {})


def merge_runtime_env(ours: dict[str, Any]) -> dict[str, Any]:
    """``ours`` without what the job's runtime env sets already: Ray refuses to merge a driver's
    runtime env that repeats a key or an env var of the job's (a ValueError from ``ray.init``),
    and the user's value is the one to keep."""
    theirs = job_runtime_env()
    their_vars = theirs.get("env_vars") or {}
    out = {k: v for k, v in ours.items() if k != "env_vars" and k not in theirs}
    env_vars = {k: v for k, v in (ours.get("env_vars") or {}).items() if k not in their_vars}
    kept = (set(ours) & set(theirs)) | (set(ours.get("env_vars") or {}) & set(their_vars))
    for key in sorted(kept - {"env_vars"}):
        log.info("runtime env: the job's own %s is kept", key)
    if env_vars:
        out["env_vars"] = env_vars
    return out


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Messages of logger ``name`` below ERROR are dropped inside the ``with`` block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def connect(address: str | None = None, *, num_cpus: int | None = None,
            runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True) -> str:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``), or start an in-process one
    when neither is given; never follow the cluster ``ray start`` last recorded.
    ``runtime_env`` adds to the job's runtime environment (its ``env_vars`` are merged; what the
    submitted job's runtime env sets already is kept as the user gave it);
    ``log_to_driver`` prints the workers' output here too (it is always in Ray's logs).

    -> the GCS address (``host:port``) every process of this command uses. A second call
    while connected returns the current address."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get(ADDRESS_ENV) or None
    extra = dict(runtime_env or {})
    env_vars = dict(extra.pop("env_vars", {}))
    if address is None:
        # Our own head on a port we chose, so its address is known before any Ray process
        # starts: the raylet and every worker inherit RAY_ADDRESS from this environment.
        port = free_port()
        gcs = f"127.0.0.1:{port}"
        _set_env({_GCS_PORT_ENV: str(port), ADDRESS_ENV: gcs})
        # Ray 2.60 turns token authentication on for a new local cluster (what we want: README,
        # cluster/SECURITY.md) and, with RAY_AUTH_MODE unset, says so as a WARNING on every
        # command, inviting the user to opt out: noise on the demo's console (issue 45).
        # Behaviour unchanged; only that one message is left out.
        with _quiet_logger("ray._private.authentication.authentication_token_setup"):
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
                     include_dashboard=True,
                     runtime_env=merge_runtime_env({**extra, "env_vars": {**env_vars, ADDRESS_ENV: gcs}}))
        reclaim_sigterm()
        global _started_here
        _started_here = True
        log.info("started an in-process Ray at %s", gcs)
        return gcs
    if num_cpus is not None:
        raise ValueError("num_cpus applies to an in-process Ray only, not to a cluster being joined")
    from ray._private.services import canonicalize_bootstrap_address_or_die

    gcs = canonicalize_bootstrap_address_or_die(address)   # "auto" -> the one host:port, or a clear error
    _set_env({ADDRESS_ENV: gcs})
    ray.init(address=gcs, log_to_driver=log_to_driver,
             runtime_env=merge_runtime_env({**extra, "env_vars": {**env_vars, ADDRESS_ENV: gcs}}))
    reclaim_sigterm()
    log.info("joined the Ray cluster at %s", gcs)
    return gcs


def disconnect() -> None:
    """Shut Ray down (an in-process cluster stops) and restore the environment."""
    global _saved_env, _started_here
    ray.shutdown()
    _started_here = False
    if _saved_env is not None:
        for key, value in _saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_env = None


# Ray Train's bound on a worker group's start (its default: 60 s); raised on a cluster that
# autoscales, where a DDP trial's workers wait for nodes that take minutes to boot.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
UNBOUNDED_SLOTS = 64   # trials at once when the autoscaler names no maximum (and --max-concurrent is not given)


def capacity() -> tuple[dict[str, float], bool]:
    """What the cluster can hold -> (resources, whether it grows): its resources now, or, where
    an autoscaler published its node groups' maxima (KubeRay, the cluster launcher), those
    (a maximum without bound counts as :data:`UNBOUNDED_SLOTS` nodes' worth)."""
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:   # what Ray Train v2 reads for the same question (worker_group.py); private, so guarded
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception as exc:  # noqa: BLE001 - an older GCS, no autoscaler: the cluster as it is
        log.debug("no autoscaler maximum: %s", exc)
        most = None
    if not most:
        return now, False
    grown = dict(now)
    for key, value in most.items():
        bounded = float(value) if value < sys.maxsize else now.get(key, 0.0) * UNBOUNDED_SLOTS
        grown[key] = max(now.get(key, 0.0), bounded)
    return grown, any(grown[k] > now.get(k, 0.0) for k in grown)


RAY_CPUS_PER_NODE = 1   # left on a GPU node for the raylet, Ray's own processes and the node's share of I/O


def cpus_per_gpu_worker(nodes: list[dict[str, Any]], gpus_per_worker: float) -> int | None:
    """The CPUs a worker of ``gpus_per_worker`` GPUs gets on the tightest alive GPU node of
    ``nodes`` (``ray.nodes()``): the node's CPUs, less :data:`RAY_CPUS_PER_NODE`, shared by its
    GPUs; at least 1. None when no GPU node is up (an autoscaler has not started one yet)."""
    shares = [max(1, int((n["Resources"].get("CPU", 0) - RAY_CPUS_PER_NODE) / n["Resources"]["GPU"] * gpus_per_worker))
              for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    return min(shares) if shares else None


def size_cpus(plan: Plan, nodes: list[dict[str, Any]]) -> Plan:
    """``--cpus-per-worker`` not given and GPUs asked for: the CPUs per worker from the cluster's
    GPU nodes (:func:`cpus_per_gpu_worker`), so that the worker's loader processes (all its
    CPUs but one) feed its GPU; 1 (with a warning) when no GPU node is up yet."""
    resources = plan.resources
    if not resources.size_cpus or not resources.gpus_per_worker:
        return plan
    cpus = cpus_per_gpu_worker(nodes, resources.gpus_per_worker)
    if cpus is None:
        log.warning("no GPU node is up to size the CPUs per worker from: 1 CPU (no loader workers); give "
                    "--cpus-per-worker (a node's CPUs per GPU, less one) to feed the GPUs")
        return plan
    print(f"pouta: {cpus} CPUs per worker of {resources.gpus_per_worker:g} GPU ({cpus - 1} loader workers), "
          "from the cluster's GPU nodes; --cpus-per-worker sets it", flush=True)
    return dataclasses.replace(plan, resources=dataclasses.replace(resources, cpus_per_worker=float(cpus),
                                                                   size_cpus=False))


def init_ray(plan: Plan) -> Plan:
    """Connect to the cluster the plan names (``--ray-address``, else ``RAY_ADDRESS``), or
    start an in-process one (see :func:`connect`) -> the plan fitted to it: its CPUs per GPU
    worker sized from the nodes (:func:`size_cpus`). On a cluster that autoscales, a worker
    group may wait ``plan.pending_timeout`` to start (not Train's 60 s). On a cluster, the
    storage path is checked on every node first (:mod:`.storage`)."""
    connect(plan.ray_address, log_to_driver=plan.verbose)
    plan = size_cpus(plan, ray.nodes())
    if capacity()[1] and WORKER_GROUP_START_TIMEOUT_ENV not in os.environ:
        # Ray Train's controller and workers read it from the driver's environment.
        os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(plan.pending_timeout)
    if not _started_here:   # a cluster: every node must see the storage path (one line, exit 2)
        check_storage_shared(plan.storage_path)
    else:
        # Started here, so a fixed-size cluster (no autoscaler): a worker no node can hold fails
        # now, not after --pending-timeout.
        check_feasible(plan.resources.worker(), plan.resources.workers)
    return plan
