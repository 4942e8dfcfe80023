"""Run categories as Ray Tune experiments of Ray Train trials, mirrored into MLflow.

``launch`` runs one trial per category (a grid over categories, as concurrent as the
cluster allows); ``sweep`` runs one Optuna study per category; ``retrain`` runs one trial
per changed category. All three share :func:`run_category_trials` and :func:`register_best`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator import cluster, interrupts, tracking
from orchestrator.errors import ClusterStalled
from orchestrator.mlflow_callback import MlflowTrialCallback
from orchestrator.progress import ProgressPrinter, short
from orchestrator.spec import SAMPLED, DataSpec, Resources, TrialSpec
from orchestrator.trial import run_trial
from orchestrator.watchdog import DEFAULT_PENDING_TIMEOUT_S, StallWatchdog, check_feasible
from pouta_core import api
from pouta_core.config import Config, ConfigError, parse_overrides
from pouta_core.data import categories as list_categories

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Plan:
    """What the user asked for, common to launch / sweep / retrain; built once from the
    command line. Its :meth:`trial_spec` is what the trials receive."""

    data: DataSpec
    categories: tuple[str, ...]
    base: Config
    # Names the Tune experiment (its folder under storage_path), the MLflow parent run and
    # the Optuna studies (<run_name>-<category>); rerunning with it resumes.
    run_name: str
    resources: Resources = Resources()
    storage_path: str = "ray-results"
    tracking_uri: str | None = None
    mlflow_experiment: str = "pouta"
    max_concurrent: int = 0
    ray_address: str | None = None
    pending_timeout: float = DEFAULT_PENDING_TIMEOUT_S
    metric: str = "pixel_ap"   # what the progress lines show; choices read Tune's own metric
    mode: str = "max"
    verbose: bool = False     # Tune's tables and Ray's worker logs on the console (pouta -v)
    # --category-set: config values for one category only, over ``base`` and any --set.
    per_category: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "storage_path", str(Path(self.storage_path).resolve()))

    def config_for(self, category: str, config: Config | None = None) -> Config:
        """``config`` (default ``base``) with the category's own values applied."""
        return (config or self.base).replace(**self.per_category.get(category, {}))

    def trial_spec(self, config: Config | None = None,
                   category_values: Mapping[str, Mapping[str, Any]] | None = None) -> TrialSpec:
        """What the trials receive: ``config`` (default ``base``) for every category, then
        ``category_values`` and the plan's --category-set values (those win) per category."""
        values = {c: {**(category_values or {}).get(c, {}), **self.per_category.get(c, {})} for c in self.categories}
        return TrialSpec(data=self.data, resources=self.resources, base_config=config or self.base,
                         tune_name=self.run_name, storage_path=self.storage_path,
                         category_values={c: v for c, v in values.items() if v})

    def fingerprints(self) -> dict[str, str]:
        """Each category's training-data fingerprint (tags on runs and model versions)."""
        return {c: api.fingerprint_category(self.data.root, self.data.dataset, c) for c in self.categories}


def parse_category_sets(items: list[str], categories: list[str], base: Config) -> dict[str, dict[str, Any]]:
    """``CATEGORY:KEY=VALUE`` strings (``--category-set``) -> {category: {key: value}}.

    Checked here, before anything starts: the category must be one of ``categories`` and the
    value must be valid for ``base``, so a typo fails in one line rather than in a trial."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        category, sep, assignment = item.partition(":")
        if not sep or not category or "=" not in assignment:
            raise ConfigError(f"--category-set '{item}': expected CATEGORY:KEY=VALUE")
        if category not in categories:
            raise ConfigError(f"--category-set '{item}': category '{category}' is not among those to run "
                              f"({', '.join(categories)})")
        out.setdefault(category, {}).update(parse_overrides([assignment]))
    for category, values in out.items():
        try:
            base.replace(**values)
        except ConfigError as exc:
            raise ConfigError(f"--category-set {category}: {exc}") from None
    return out


def init_ray(plan: Plan | None = None) -> str:
    """Connect to the cluster the plan names (``--ray-address``, else ``RAY_ADDRESS``), or
    start an in-process one: see :mod:`orchestrator.cluster`."""
    address = cluster.connect(plan.ray_address if plan else None, log_to_driver=bool(plan and plan.verbose))
    if plan is not None and cluster.started_here():
        # A fixed-size cluster (no autoscaler): a worker no node can hold fails now, not after
        # --pending-timeout.
        check_feasible(plan.resources.worker(), plan.resources.workers)
    return address


def resolve_categories(data_root: str, dataset: str, spec: str) -> list[str]:
    available = list_categories(data_root, dataset)
    if spec == "all":
        if not available:
            raise ConfigError(f"{data_root}: no categories found for dataset '{dataset}'")
        return available
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ConfigError(f"{data_root}: unknown category '{unknown[0]}'; available: {', '.join(available)}")
    return wanted


def warn_about_config(plan: Plan) -> None:
    """Say what the trials will do differently from the config as given."""
    if any(plan.config_for(c).val_split == "none" for c in plan.categories):
        log.warning("val_split=none: trials, thresholds and promotion are chosen on the test split, so the "
                    "test metrics reported are optimistic (runs tagged pouta.selection=test)")
    asked = {(c.checkpoint_every, c.eval_every) for c in map(plan.config_for, plan.categories)}
    if any(every != eval_every for every, eval_every in asked):
        log.warning("checkpoint_every is set to eval_every in trials: Ray resumes from, and MLflow keeps, the "
                    "checkpoint of each evaluation (the trial runs log the value used)")


def open_parent(plan: Plan, kind: str, extra_tags: dict[str, str] | None = None):
    client, exp_id = tracking.setup(plan.tracking_uri, plan.mlflow_experiment)
    key = f"{kind}:{plan.run_name}"
    tags = {tracking.TAG_KIND: kind, "dataset": plan.data.dataset, "git_commit": tracking.git_commit(),
            tracking.TAG_SELECTION: tracking.selection_tag(plan.base.val_split), **(extra_tags or {})}
    run_id = tracking.get_or_create_run(client, exp_id, key, name=plan.run_name, tags=tags)
    tracking.log_params(client, run_id, {"command": kind, "dataset": plan.data.dataset,
                                         "categories": ",".join(plan.categories), "name": plan.run_name})
    return client, exp_id, run_id, key


def callback(plan: Plan, spec: TrialSpec, parent_id: str, parent_key: str,
             fingerprints: Mapping[str, str]) -> MlflowTrialCallback:
    return MlflowTrialCallback(tracking.resolve_tracking_uri(plan.tracking_uri), plan.mlflow_experiment, spec,
                               parent_id, parent_key, {"git_commit": tracking.git_commit()}, fingerprints)


def experiment_path(plan: Plan) -> Path:
    """The Tune experiment's folder."""
    return Path(plan.storage_path) / plan.run_name


def check_new_or_resumed(plan: Plan, resume: bool) -> None:
    """An experiment that exists is only continued with ``resume``; checked before anything
    starts, so a refused command leaves no Ray, no MLflow run behind."""
    path = experiment_path(plan)
    if path.exists() and not resume:
        raise ConfigError(f"{path}: experiment '{plan.run_name}' already exists; pass --resume to continue it "
                          "or --name to start another")


def make_tuner(plan: Plan, spec: TrialSpec, param_space: dict[str, Any], tune_config: tune.TuneConfig,
               cb: MlflowTrialCallback, resume: bool) -> tune.Tuner:
    """A new Tuner, or the restored one when ``resume`` (finished trials are not rerun).

    The spec (paths, resources, base config) reaches trials through ``tune.with_parameters``,
    so ``param_space``, which Tune prints and stores per trial, holds only what varies."""
    path = experiment_path(plan)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), spec.resources.trial())
    check_new_or_resumed(plan, resume)
    if path.exists():
        if tune.Tuner.can_restore(str(path)):
            return tune.Tuner.restore(str(path), trainable=trainable, param_space=param_space,
                                      resume_unfinished=True, resume_errored=True)
    watchdog = StallWatchdog(plan.pending_timeout, spec.resources.worker(), spec.resources.workers)
    callbacks: list[Any] = [cb, watchdog]
    if not plan.verbose:
        callbacks.append(ProgressPrinter(selection_metric(plan.metric), plan.mode, plan.categories))
    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                                  callbacks=callbacks, failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  verbose=None if plan.verbose else 0),
    )


def fit(tuner: tune.Tuner):
    """``tuner.fit()`` that stops the command on Ctrl-C/SIGTERM (:mod:`orchestrator.interrupts`)
    and lets a stalled cluster's message through Tune's wrapping error."""
    try:
        return interrupts.fit(tuner)
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ClusterStalled):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


# Metrics computed on an image split; trials report each as val_<name> and test_<name>.
SPLIT_METRICS = ("image_auroc", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1max")
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")


def selection_metric(name: str) -> str:
    """The reported metric a choice reads: ``pixel_ap`` -> ``val_pixel_ap``; metrics of no
    split (``latency_ms``, ``loss_total``) as they are. Test metrics are refused."""
    if name.startswith("test_"):
        raise ConfigError(f"metric '{name}': choices are made on validation metrics only; use "
                          f"'{name.removeprefix('test_')}' (selects on val_{name.removeprefix('test_')})")
    return f"val_{name}" if name in SPLIT_METRICS else name


def both_splits(names) -> list[str]:
    """``pixel_ap`` -> ``val_pixel_ap``, ``test_pixel_ap``, for summaries; others unchanged."""
    out: list[str] = []
    for n in names:
        bare = n.removeprefix("val_")
        out.extend([f"val_{bare}", f"test_{bare}"] if bare in SPLIT_METRICS else [n])
    return list(dict.fromkeys(out))


def trial_rows(results, metric_keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.error is not None or not r.metrics:
            rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else None, "error": str(r.error)})
            continue
        # Ray Train runs name their checkpoint in the metrics; one-worker trials are Tune's own.
        checkpoint = r.metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None)
        rows.append({"trial_id": r.metrics.get("trial_id"), "config": r.config, "path": r.path,
                     "checkpoint": checkpoint,
                     **{k: r.metrics.get(k) for k in ["epoch", *metric_keys]}})
    return rows


def model_requirements() -> list[str]:
    """What loading a logged POUTA model needs: torch, numpy, cloudpickle (MLflow pickles the
    module with it) at this process's versions; the ``pouta`` package itself must be
    installed where the model is loaded (it is not on PyPI)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "cloudpickle")]


def describe_version(client, name: str, version: str, *, category: str, fingerprint: str,
                     metrics: dict[str, float], searched: dict[str, Any], source: str, parent_run_id: str,
                     selection: str) -> None:
    """Tags and a Markdown description on a model version, so its page in the MLflow UI says
    what it is and why it was chosen: category, data fingerprint, validation metrics (the
    choice) and test metrics (reported only), the searched values, and the source run."""
    shown = [k for k in SUMMARY_METRICS if f"val_{k}" in metrics]
    tags = {"category": category, tracking.TAG_FINGERPRINT: fingerprint, "source": source,
            "source_parent_run": parent_run_id, tracking.TAG_SELECTION: selection,
            **{f"{split}_{k}": f"{metrics[f'{split}_{k}']:.4f}" for split in ("val", "test") for k in shown
               if isinstance(metrics.get(f"{split}_{k}"), float) and math.isfinite(metrics[f"{split}_{k}"])},
            **{f"searched.{k}": short(v) for k, v in searched.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    def cell(v: float | None) -> str:
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "n/a"

    rows = "\n".join(f"| {k} | {cell(metrics.get(f'val_{k}'))} | {cell(metrics.get(f'test_{k}'))} |" for k in shown)
    values = ", ".join(f"`{k}={short(v)}`" for k, v in searched.items()) or "the base config (nothing searched)"
    description = (f"POUTA model for **{category}**, chosen by {source} on the **{selection}** split "
                   f"(parent run `{parent_run_id}`).\n\n| metric | validation (chosen on) | test (reported) |\n"
                   f"|---|---|---|\n{rows}\n\nSearched values: {values}.\n\n"
                   f"Training data fingerprint: `{fingerprint[:16]}`.\n\nThis model returns anomaly maps; "
                   f"`score_model` in the same run returns the image scores.")
    client.update_model_version(name, version, description=description)


def register_best(plan: Plan, cb: MlflowTrialCallback, category: str, trial_id: str, checkpoint: str,
                  searched: dict[str, Any] | None = None, kind: str = "launch") -> tuple[str, str]:
    """Log the checkpoint's model into its trial's MLflow run with ``mlflow.pytorch.log_model``
    (``model``: anomaly maps; ``score_model``: image scores), register ``model`` as
    ``pouta-<dataset>-<category>`` and point ``challenger`` at the new version."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pouta_core.checkpoint import load_model, require_calibrated
    from pouta_core.inference import MapModel, ScoreModel

    run_id = cb.run_id_for(category, trial_id)
    client = cb.client
    done = client.get_run(run_id).data.tags.get("pouta.registered_version")
    if done:   # a rerun of a finished experiment: registered already
        return tracking.registered_name(plan.data.dataset, category), done
    model, config, state = load_model(checkpoint, "cpu")
    require_calibrated(model, checkpoint)
    # Two images: MLflow's torch.export fixes a batch dimension of size 1 in the example.
    example = np.random.default_rng(0).random((2, 3, config.image_size, config.image_size), dtype=np.float32)
    name = tracking.registered_name(plan.data.dataset, category)
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(plan.tracking_uri))
    with mlflow.start_run(run_id=run_id):
        # "model" (registered) serves anomaly maps, "score_model" beside it image scores: MLflow's
        # default format (torch.export) has one tensor output and no parameters.
        # Requirements named, not inferred: MLflow's inference re-imports the model in a
        # subprocess (about 10 s per model here, serially after the sweep).
        for artifact, module in (("score_model", ScoreModel(model)), ("model", MapModel(model))):
            with torch.inference_mode():
                output = module.eval()(torch.from_numpy(example)).numpy()
            info = mlflow.pytorch.log_model(module, name=artifact, signature=infer_signature(example, output),
                                            input_example=example, pip_requirements=model_requirements(),
                                            registered_model_name=name if artifact == "model" else None)
    version = str(info.registered_model_version)
    client.set_tag(run_id, "pouta.registered_version", version)
    client.set_registered_model_alias(name, tracking.CHALLENGER, version)
    describe_version(client, name, version, category=category, fingerprint=cb.fingerprints.get(category, ""),
                     metrics=state.get("metrics", {}), searched=searched or {}, source=f"{kind} {plan.run_name}",
                     parent_run_id=cb.parent_run_id, selection=tracking.selection_tag(config.val_split))
    tracking.finish(client, run_id)
    return name, version


def best_checkpoint_of(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    ok = [r for r in rows if "error" not in r and r.get(metric) is not None and r.get("checkpoint")]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])


__all__ = ["SAMPLED", "Plan", "best_checkpoint_of", "callback", "experiment_path",
           "init_ray", "make_tuner", "open_parent", "register_best", "resolve_categories",
           "trial_rows"]
