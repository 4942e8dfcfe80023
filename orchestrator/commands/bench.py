"""``pouta bench orchestration``: what the orchestration costs, measured on a simulated cluster.

One in-process Ray with ``slots`` logical CPUs (more than this machine has cores), K demo
categories x N trials of a tiny sweep, run twice side by side in one process:

- ``concurrent``: one ``pouta sweep`` over all categories (how the product runs them);
- ``serial``: the same sweeps one category after the other (how it ran them before).

From the MLflow runs of the concurrent sweep: per trial, the time from the trial's start to
its first reported epoch minus one epoch (start-up overhead), from its last epoch to its end
(tear-down overhead), and the share of slot-time spent inside epochs.

On a real cluster each slot is a GPU (or a node's cores) of its own; here all slots share
two cores, so tiny CPU-bound trials finish no sooner however they are scheduled and the
schedules could not be told apart. The bench therefore simulates an accelerator: every epoch
lasts at least ``epoch_floor_s`` of wall time, the rest of the floor spent waiting as a host
waits on its GPU (a ``worker_process_setup_hook`` wraps ``pouta_core.training.train_epoch``
in Ray's worker processes; the product code is unchanged). ``epoch_floor_s=0`` measures the
purely CPU-bound case. The trials' start-up and tear-down are never padded, so the overhead
figures are this machine's own.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TINY = ["image_size=32", "rec_width=4", "fcm_width=4", "disc_width=4", "epochs=3", "eval_every=1",
        "lr_milestones=[]", "batch_size=4"]


EPOCH_FLOOR_ENV = "POUTA_BENCH_EPOCH_FLOOR_S"


def simulate_accelerator() -> None:
    """Ray ``worker_process_setup_hook``: make every training epoch of this process last at
    least ``$POUTA_BENCH_EPOCH_FLOOR_S`` seconds (see the module docstring)."""
    floor = float(os.environ.get(EPOCH_FLOOR_ENV) or 0)
    if floor <= 0:
        return
    from pouta_core import training

    epoch = training.train_epoch

    @functools.wraps(epoch)
    def padded(*args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        out = epoch(*args, **kwargs)
        time.sleep(max(0.0, floor - (time.monotonic() - start)))
        return out

    training.train_epoch = padded


def _sweep(work: Path, data: Path, categories: list[str], name: str, trials: int, slots: int) -> float:
    import search_spaces
    from orchestrator.commands.sweep import parse_objectives, run_sweep
    from orchestrator.plan import Plan
    from orchestrator.spec import DataSpec
    from pouta_core.config import Config

    base = Config.from_preset("tiny", TINY)
    plan = Plan(data=DataSpec.of(str(data), "mvtec"), categories=categories, base=base, run_name=name,
                storage_path=str(work / "ray"), tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
                mlflow_experiment=name, max_concurrent=slots)
    start = time.monotonic()
    run_sweep(plan, search_spaces.load("mss_lambdas", base), num_samples=trials, scheduler="none",
              study_storage=None, resume=False, objectives=parse_objectives(None, "pixel_ap", "max"))
    return time.monotonic() - start


def _trial_timings(work: Path, experiment: str) -> list[dict[str, float]]:
    """Per trial (s): start-up (start -> first epoch, less one epoch), tear-down (last epoch ->
    end) and time inside epochs, from the child runs' times and metric timestamps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    out = []
    for run in client.search_runs([exp.experiment_id], filter_string="tags.`pouta.kind` = 'trial'"):
        stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss_total")) or [0]
        epochs = len(stamps)
        epoch_s = (stamps[-1] - stamps[0]) / 1000 / max(epochs - 1, 1)
        out.append({"startup_s": (stamps[0] - run.info.start_time) / 1000 - epoch_s,
                    "teardown_s": (run.info.end_time - stamps[-1]) / 1000,
                    "training_s": epoch_s * epochs})
    return out


def bench_orchestration(categories: int = 4, trials: int = 4, slots: int = 8, work: str | None = None,
                        epoch_floor_s: float = 3.0) -> dict[str, Any]:
    from orchestrator.execution import cluster
    from pouta_core.data.demo import CATEGORIES, generate

    root = Path(work or tempfile.mkdtemp(prefix="pouta-bench-orch-"))
    data = root / "data"
    if not data.is_dir():
        generate(data, categories=categories, image_size=48, n_train=8, n_test_good=3, n_test_defect=2)
    names = list(CATEGORIES[:categories])
    cluster.connect(num_cpus=slots, runtime_env={
        "env_vars": {EPOCH_FLOOR_ENV: str(epoch_floor_s)},
        "worker_process_setup_hook": f"{__name__}.{simulate_accelerator.__name__}"})
    try:
        concurrent = _sweep(root, data, names, "concurrent", trials, slots)
        serial = sum(_sweep(root, data, [c], f"serial-{c}", trials, slots) for c in names)
    finally:
        cluster.disconnect()
    timings = _trial_timings(root, "concurrent")
    median = {k: statistics.median(t[k] for t in timings) for k in ("startup_s", "teardown_s", "training_s")}
    return {
        "categories": categories, "trials_per_category": trials, "slots": slots,
        "epoch_floor_s": epoch_floor_s, "work": str(root),
        "concurrent_wall_s": round(concurrent, 1), "serial_wall_s": round(serial, 1),
        "wall_ratio": round(concurrent / serial, 3),
        "training_share_of_slot_time": round(sum(t["training_s"] for t in timings) / (concurrent * slots), 3),
        "trial_startup_overhead_s_median": round(median["startup_s"], 1),
        "trial_teardown_overhead_s_median": round(median["teardown_s"], 1),
        "trial_overhead_s_median": round(median["startup_s"] + median["teardown_s"], 1),
        "targets": {"wall_ratio<=0.6": concurrent / serial <= 0.6,
                    "overhead<=10s": median["startup_s"] + median["teardown_s"] <= 10},
    }
