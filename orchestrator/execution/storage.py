"""A storage path every node sees, checked before any trial starts (issue 46).

``--storage-path`` is resolved on the driver. Under ``ray job submit`` the default
(``ray-results``) is the job's temporary folder on the head: a worker node cannot see it, and
Ray's storage check raises "A local path on the head node is not accessible by worker nodes" at
the first checkpoint, so every trial dies, is retried, and Tune proposes new ones. Here the
driver writes a marker file into the storage path and asks one zero-CPU task on each other
alive node whether it sees the file: a node that does not stops the command at once, in one
line that names the node and says how to fix it (exit 2).

*Limits*: nodes that an autoscaler has not started yet cannot be asked (a one-node autoscaling
cluster passes; its first trial on a new node meets Ray's own check); a node that does not
answer within the bound is named in a warning, not refused. A cluster of one machine (or the
in-process Ray) needs no check.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from pouta_core.config import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0   # a worker process per node starts in seconds; a busy node may take longer


def check_storage_shared(storage_path: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Refuse ``storage_path`` when an alive node other than the driver's does not see it.
    -> how many other nodes were asked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeID") != here]
    if not others:
        return 0
    folder = Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".pouta-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver of a pouta command: every node must see this file\n")
    try:
        # os.path.exists travels by reference (genericpath): nothing of ours is imported there.
        probe = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        asked = {f"{n.get('NodeManagerAddress')} (node {n['NodeID'][:12]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in others}
        ready, late = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_s)
        blind = [name for name, ref in asked.items() if ref in ready and not ray.get(ref)]
        if blind:
            raise ConfigError(
                f"--storage-path {storage_path}: not shared: {blind[0]}"
                f"{f' and {len(blind) - 1} more node(s)' if len(blind) > 1 else ''} cannot see a file the driver "
                "wrote there; give a directory every node mounts at the same path (NFS, a ReadWriteMany volume), "
                "e.g. --storage-path /mnt/shared/ray-results")
        if late:
            for ref in late:
                ray.cancel(ref, force=True)
            log.warning("--storage-path %s: %d node(s) did not say within %.0f s whether they see it: %s",
                        storage_path, len(late), timeout_s,
                        ", ".join(name for name, ref in asked.items() if ref in late))
        return len(asked)
    finally:
        marker.unlink(missing_ok=True)
