"""One Tune trial = one Ray Train run of one category with one config (Train V2 style: a
function trainable that builds and fits a TorchTrainer)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.execution.worker import TuneSession, train_worker
from orchestrator.spec import TrialSpec

CONTROLLER_FAILURE_LIMIT = 3


def run_trial(params: Mapping[str, Any], spec: TrialSpec) -> None:
    """The Tune function trainable. ``params`` (what Tune shows and searches): category and
    sampled (dict); ``spec`` arrives through ``tune.with_parameters``.

    *Decision*: a one-worker trial trains in this process, reporting to Tune directly; only a
    trial with several workers (DDP) builds a Ray Train ``TorchTrainer``. Ray Train's
    controller and helper actors cost about 25 s per trial here and add nothing for one worker;
    Tune's own checkpoints and retries (``FailureConfig``) resume it as well."""
    task = spec.task(params)
    resources = spec.resources
    if resources.workers == 1:
        train_worker(task, TuneSession(use_gpu=resources.gpus_per_worker > 0))
        return
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        # The task travels inside the function (no train_loop_config dict): Ray Train calls a
        # function with no required argument as it is.
        functools.partial(train_worker, task),
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
                                               resources_per_worker=resources.worker()),
        run_config=ray.train.RunConfig(
            # Stable name: rerunning the same trial resumes from its latest checkpoint.
            name=f"{spec.tune_name}-{task.category}-{trial_id}",
            storage_path=spec.storage_path,
            # Bounded: a worker group that cannot start (no resources, a dead node) fails the
            # trial after a few tries instead of retrying forever (Ray's default is -1).
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures,
                                                   controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
