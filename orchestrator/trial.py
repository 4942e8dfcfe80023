"""One Tune trial = one Ray Train run of one category with one config (Train V2 style: a
function trainable that builds and fits a TorchTrainer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.worker import TuneSession, train_worker
from pouta_core.config import Config

SAMPLED = "sampled"   # param_space key holding the searched config values
CONTROLLER_FAILURE_LIMIT = 3


@dataclass(frozen=True)
class Job:
    """Everything a trial needs besides the sampled values; plain data, so Tune can store it."""

    base_config: dict[str, Any]
    data_root: str
    dataset: str
    storage_path: str
    experiment: str
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    texture_dir: str | None = None
    cache_dir: str | None = None
    # Config values of one category only (--category-set, retrain's best known values),
    # over base_config; the sampled values of a trial go over both.
    category_values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def worker_resources(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for the trial: the worker itself when it trains in the trial's
        process; else only 1 MiB of memory for the process that waits on Ray Train (Tune
        refuses an empty request, and any fraction of a CPU would keep N one-CPU workers from
        fitting on N CPUs)."""
        return self.worker_resources() if self.workers == 1 else {"CPU": 0, "memory": 1024**2}

    def scaling(self) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(num_workers=self.workers, use_gpu=self.gpus_per_worker > 0,
                                       resources_per_worker=self.worker_resources())


def decode_sampled(sampled: dict[str, Any]) -> dict[str, Any]:
    """Optuna's categorical values are scalars: list choices travel as YAML strings."""
    import yaml

    return {k: (yaml.safe_load(v[5:]) if isinstance(v, str) and v.startswith("yaml:") else v)
            for k, v in sampled.items()}


def trial_config(job: Job, params: dict[str, Any]) -> Config:
    """A trial's config: the job's base, its category's own values, then the sampled ones."""
    return Config.from_dict({**job.base_config, **job.category_values.get(params["category"], {}),
                             **decode_sampled(params.get(SAMPLED, {}))})


def run_trial(params: dict[str, Any], job: Job) -> None:
    """The Tune function trainable. ``params`` (what Tune shows and searches): category and
    sampled (dict); ``job`` arrives through ``tune.with_parameters``.

    *Decision*: a one-worker trial trains in this process, reporting to Tune directly; only a
    trial with several workers (DDP) builds a Ray Train ``TorchTrainer``. Ray Train's
    controller and helper actors cost about 25 s per trial here and add nothing for one worker;
    Tune's own checkpoints and retries (``FailureConfig``) resume it as well."""
    category = params["category"]
    config = trial_config(job, params)
    worker_config = {"config": config.to_dict(), "data_root": job.data_root, "dataset": job.dataset,
                     "category": category, "texture_dir": job.texture_dir, "cache_dir": job.cache_dir,
                     "cpus_per_worker": job.cpus_per_worker}
    if job.workers == 1:
        train_worker(worker_config, TuneSession(use_gpu=job.gpus_per_worker > 0))
        return
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
        scaling_config=job.scaling(),
        run_config=ray.train.RunConfig(
            # Stable name: rerunning the same trial resumes from its latest checkpoint.
            name=f"{job.experiment}-{category}-{trial_id}",
            storage_path=job.storage_path,
            # Bounded: a worker group that cannot start (no resources, a dead node) fails the
            # trial after a few tries instead of retrying forever (Ray's default is -1).
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures,
                                                   controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()

