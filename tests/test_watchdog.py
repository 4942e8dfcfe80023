"""The stall watchdog tells waiting from stuck (issue 28): a placement group waiting while the
autoscaler adds nodes is not a stall. No autoscaler adds nodes here: a report with pending nodes
is written where Ray's v1 monitor writes its own (the GCS key-value store), and the watchdog
reads it as ``ray status`` does."""

import json
import time

import pytest

from orchestrator.errors import ClusterStalled
from orchestrator.execution import watchdog


def test_waiting_while_the_autoscaler_adds_nodes_is_not_a_stall(local_ray, monkeypatch):
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put
    from ray.util.placement_group import placement_group, remove_placement_group

    monkeypatch.setattr(watchdog, "CHECK_EVERY_S", 0.0)
    waiting = placement_group([{"CPU": 4}])            # more than this node has: it waits
    report = {"autoscaler_report": {"pending_nodes": [["10.0.0.5", "gpu-worker", "setting-up"]],
                                    "pending_launches": {"gpu-worker": 2}}}
    # Ray's own monitor rewrites its report every few seconds (no nodes pending here): ours is
    # written again before each check, as a monitor with nodes on their way would.
    try:
        assert watchdog.pending_nodes() == 0
        _internal_kv_put(ray_constants.DEBUG_AUTOSCALING_STATUS, json.dumps(report), overwrite=True)
        assert watchdog.pending_nodes() == 3
        dog = watchdog.StallWatchdog(0.2, {"CPU": 4.0}, 1)
        for _ in range(3):                              # nodes on their way: never a stall
            _internal_kv_put(ray_constants.DEBUG_AUTOSCALING_STATUS, json.dumps(report), overwrite=True)
            dog.on_step_end(0, [])
            time.sleep(0.3)
        _internal_kv_del(ray_constants.DEBUG_AUTOSCALING_STATUS)
        assert watchdog.pending_nodes() == 0
        dog.on_step_end(0, [])                          # nothing on its way: the wait starts
        time.sleep(0.3)
        with pytest.raises(ClusterStalled, match=r"waited 0.2 s for resources"):
            dog.on_step_end(0, [])
    finally:
        _internal_kv_del(ray_constants.DEBUG_AUTOSCALING_STATUS)
        remove_placement_group(waiting)
