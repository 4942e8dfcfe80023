"""What a trial's work is, as one typed, frozen description.

The command line is read once into a :class:`TrialSpec`: where the data is (:class:`DataSpec`),
what each trial may use (:class:`Resources`), the base config and each category's own values,
and where Tune keeps the trials. The same object travels, as is, to Tune (through
``tune.with_parameters``), to the MLflow callback, and, per trial, as a :class:`WorkerTask` to
the training function, in the trial's process or on each Ray Train worker. Nothing is copied
field by field and no string-keyed dict crosses a process boundary.

Names say which system they belong to: ``tune_name`` is the Tune experiment (the folder under
``storage_path``, also the MLflow parent run's name); the MLflow experiment is
``Plan.mlflow_experiment`` (orchestrator/plan.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pouta_core.config import Config

SAMPLED = "sampled"   # param_space key holding the searched config values
CHECKPOINT_EPOCH = "checkpoint_epoch"   # reported by every trial: the epoch of its latest checkpoint
DEFAULT_TRIAL = "default"   # in a trial's config: True for the sweep's reference trial, the base config
CONFIRM_OF = "confirm_of"   # in a trial's config: the id of the trial whose config it trains again on a fresh seed
DEFAULT_METRIC = "val_pixel_ap"   # what a command chooses on unless --metric/--objectives says otherwise


@dataclass(frozen=True)
class DataSpec:
    """Where a category's images come from. Paths are absolute: trials run in other processes,
    possibly on other nodes, from another working directory."""

    root: str
    dataset: str
    texture_dir: str | None = None
    cache_dir: str | None = None
    max_image_pixels: int | None = None   # --max-image-pixels; None: Pillow's default

    @classmethod
    def of(cls, root: str, dataset: str, texture_dir: str | None = None, cache_dir: str | None = None,
           max_image_pixels: int | None = None) -> DataSpec:
        return cls(_abs(root), dataset, _abs(texture_dir), _abs(cache_dir), max_image_pixels)


def _abs(p: str | None) -> str | None:
    return str(Path(p).resolve()) if p else None


@dataclass(frozen=True)
class Resources:
    """What each trial may use: ``workers`` Ray Train workers (DDP) of ``cpus_per_worker`` CPUs
    and ``gpus_per_worker`` GPUs each; ``max_failures`` reruns of an errored trial by Tune, and
    worker-group restarts of a multi-worker trial's run within each (Ray's default, -1, would
    retry forever)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    # --cpus-per-worker not given: sized from the cluster's GPU nodes once Ray is up
    # (orchestrator.execution.cluster.size_cpus); cpus_per_worker holds until then.
    size_cpus: bool = False

    def worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def trial(self) -> dict[str, float]:
        """What Tune reserves for the trial: the worker itself when it trains in the trial's
        process; else only 1 MiB of memory for the process that waits on Ray Train (Tune
        refuses an empty request, and any fraction of a CPU would keep N one-CPU workers from
        fitting on N CPUs)."""
        return self.worker() if self.workers == 1 else {"CPU": 0, "memory": 1024**2}

    @property
    def loader_workers(self) -> int:
        """DataLoader processes per worker: every CPU of the worker but the one that steps the model."""
        return max(0, int(self.cpus_per_worker) - 1)


@dataclass(frozen=True)
class WorkerTask:
    """What one training worker needs: one category, its final config, its data, its share."""

    category: str
    config: Config
    data: DataSpec
    resources: Resources
    # Reported to Tune as numbers besides the epochs; the rest travel packed
    # (:func:`orchestrator.execution.results.packed`).
    tune_metrics: tuple[str, ...] = ()
    # Scoring key -> values chosen among after training, on validation (none: the config's own).
    scoring_options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def scoring_metric(self) -> str:
        """What the scoring choice reads: the first validation objective, else the default metric."""
        return next((m for m in self.tune_metrics if m.startswith("val_")), DEFAULT_METRIC)


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides the values Tune samples; pickled once by Tune."""

    data: DataSpec
    resources: Resources
    base_config: Config
    tune_name: str
    storage_path: str
    # Config values of one category only (--category-set, retrain's best known values), over
    # base_config; the sampled values of a trial go over both.
    category_values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The metrics the sweep's schedulers, searches and choices read (its objectives): the only
    # ones Tune gets as numbers, besides the epochs.
    tune_metrics: tuple[str, ...] = (DEFAULT_METRIC,)
    # A space's ``scoring:`` (scoring key -> values): what each searched trial chooses among
    # after training (:mod:`pouta_core.scoring_choice`).
    scoring_options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def config_for(self, category: str, sampled: Mapping[str, Any] | None = None) -> Config:
        """A trial's config: the base, its category's own values, then the sampled ones, with
        ``checkpoint_every`` rounded up to a multiple of ``eval_every`` (:func:`checkpoint_cadence`).
        Set here, so MLflow logs the config the checkpoint holds."""
        config = self.base_config.replace(**{**self.category_values.get(category, {}), **decode_sampled(sampled or {})})
        return config.replace(checkpoint_every=checkpoint_cadence(config))

    def task(self, params: Mapping[str, Any]) -> WorkerTask:
        """The worker's task for Tune's ``params`` (``category`` and ``sampled``)."""
        category = params["category"]
        # *Decision* (issue 45): the default trial is what a user gets without the sweep (the
        # base config's reading); a confirmation trial keeps the reading its finalist chose (in
        # its sampled values), so that the round sees fresh seeds of one fixed config.
        chooses = not params.get(DEFAULT_TRIAL) and not params.get(CONFIRM_OF)
        return WorkerTask(category, self.config_for(category, params.get(SAMPLED)), self.data, self.resources,
                          self.tune_metrics, dict(self.scoring_options) if chooses else {})


def checkpoint_cadence(config: Config) -> int:
    """Epochs between a trial's checkpoints: ``checkpoint_every`` rounded up to a multiple of
    ``eval_every``.

    *Decision* (issue 28): a trial's checkpoint reaches Ray only attached to a report, and a
    report is an evaluation: so a checkpoint is always taken at an evaluated epoch, and the
    metrics it holds are the ones reported with it. ``checkpoint_every`` is its own key (a
    600-epoch trial evaluated every 10 epochs need not write 60 checkpoints of 180 MB to shared
    storage); a trial whose last report had no checkpoint (ASHA stopped it between two) is
    chosen and shown by the metrics of the epoch its checkpoint holds
    (:func:`orchestrator.execution.results.trial_rows`)."""
    return -(-config.checkpoint_every // config.eval_every) * config.eval_every


def decode_sampled(sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's categorical values are scalars: list choices travel as YAML strings."""
    import yaml

    return {k: (yaml.safe_load(v[5:]) if isinstance(v, str) and v.startswith("yaml:") else v)
            for k, v in sampled.items()}


def short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
