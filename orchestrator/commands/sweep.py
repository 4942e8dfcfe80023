"""``pouta sweep``: one Optuna study per category (Ray Tune + OptunaSearch, seeded sampler,
RDB storage), every trial a Ray Train run, ASHA stopping weak trials on the reported
validation metric. All categories run in one Tune experiment and share its trial slots
(orchestrator/execution/scheduling.py). Grid spaces (``ablation.yaml``) run every grid point of every
category once per seed (``--num-samples`` seeds), to full length, instead of a study.

:func:`run_sweep` reads top to bottom as the sweep's data flows: plan -> trial spec -> MLflow and Ray
checked -> parent run and callback -> search -> Tune -> choice -> registry -> report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from orchestrator import tracking
from orchestrator.execution import retention, tuner
from orchestrator.execution.cluster import init_ray
from orchestrator.execution.reference import DEFAULT, Reference, versus_default
from orchestrator.execution.results import choose
from orchestrator.execution.schedulers import scheduler_for
from orchestrator.execution.scheduling import (
    check_study_storage,
    default_study_storage,
    fail_dangling_optuna_trials,
    grid_point,
    open_study_storage,
    sweep_search,
)
from orchestrator.execution.tune_parts import trial_generator, trial_slots
from orchestrator.plan import SUMMARY_METRICS, Plan, both_splits, selection_metric, warn_about_config
from orchestrator.tracking import report
from orchestrator.tracking.parent import drain, finish, open_parent
from orchestrator.tracking.registry import register_choices
from pouta_core.checkpoint import atomic_write
from pouta_core.config import ConfigError
from search_spaces import SearchSpace

log = logging.getLogger(__name__)


def parse_objectives(text: str | None, metric: str, mode: str) -> list[tuple[str, str]]:
    """``--objectives`` (else ``--metric``/``--mode``) -> [(reported metric, mode)]; split
    metrics select on validation: ``pixel_ap`` -> ``val_pixel_ap``."""
    if not text:
        return [(selection_metric(metric), mode)]
    out = []
    for item in text.split(","):
        name, _, m = item.strip().partition(":")
        if m not in ("max", "min") or not name:
            raise ConfigError(f"--objectives: expected metric:max|min items, got '{item.strip()}'")
        out.append((selection_metric(name), m))
    return out


def check_category_sets(plan: Plan, space: SearchSpace) -> None:
    """A --category-set value for a key the space searches would be overwritten in every trial."""
    for category, values in plan.per_category.items():
        searched = sorted(set(values) & set(space.keys))
        if searched:
            raise ConfigError(f"--category-set {category}:{searched[0]}: {space.path.name} searches this key")


def run_sweep(plan: Plan, space: SearchSpace, *, num_samples: int, scheduler: str | None,
              study_storage: str | None, resume: bool, objectives: list[tuple[str, str]],
              best_out: str | None = None, reference: Reference = DEFAULT,
              keep_checkpoints: bool = False) -> dict[str, Any]:
    """Search every category at once in one Tune experiment: one Optuna study (or grid) and one
    ASHA per category, all sharing ``plan.max_concurrent`` trial slots; each study starts with
    the category's default, which the chosen trial must beat (``reference``) to be registered.
    -> summary per category."""
    multi = len(objectives) > 1
    # A grid is an experiment: every point trains to full length unless --scheduler asha asks.
    scheduler = scheduler or ("none" if multi or space.has_grid else "asha")
    if multi and scheduler == "asha":
        raise ConfigError("--scheduler asha stops trials on one metric; use --scheduler none with --objectives")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    check_category_sets(plan, space)
    # What every trial trains with, and what the summary shows; all checked before anything starts.
    fingerprints = plan.fingerprints()
    # A grid's seeds are part of what it is; a study's trial count is how far it has gone.
    definition = plan.definition(fingerprints, space=yaml.safe_load(space.path.read_text()), scheduler=scheduler,
                                 objectives=[list(o) for o in objectives],
                                 **({"num_samples": num_samples} if space.has_grid else {}))
    plan.check_new_or_resumed(resume, definition, num_samples=None if space.has_grid else num_samples)
    warn_about_config(plan)
    keys = both_splits([k for k, _ in objectives] + list(SUMMARY_METRICS))
    spec = plan.trial_spec(plan.base.replace(**space.fixed), tune_metrics=[k for k, _ in objectives],
                           scoring_options=space.scoring)
    configs = {c: spec.config_for(c) for c in plan.categories}
    storage_url = check_study_storage(study_storage) if study_storage else None
    # Checked before anything starts: MLflow answers us (a server that refuses the host name or
    # the user stops the command here, in one line), then Ray can hold a trial and every node
    # sees the storage; only then are the parent run and the Optuna studies created.
    tracking.setup(plan.tracking_uri, plan.mlflow_experiment)
    plan = init_ray(plan)   # fitted to the cluster: CPUs per GPU worker
    spec = dataclasses.replace(spec, resources=plan.resources)
    parent = open_parent(plan, "sweep", spec, fingerprints, tags={"search_space": space.path.name}, params={
        "search_space": space.path.name, "num_samples": num_samples, "scheduler": scheduler,
        "objectives": ",".join(f"{k}:{m}" for k, m in objectives)})
    # Also a tag, kept current: the param stays what the sweep started with; an extended one has more.
    parent.client.set_tag(parent.run_id, "num_samples", str(num_samples))
    if storage_url is None and not space.has_grid:
        storage_url = default_study_storage(plan.storage_path, plan.run_name)
    search = sweep_search(space, configs, objectives, run_name=plan.run_name, seed=plan.base.seed,
                          num_samples=num_samples, scheduler=scheduler, resume=resume, storage_url=storage_url,
                          default_trials=reference.default_trials, confirmation=reference.confirmation)
    metric, mode = objectives[0]
    tune_config = tune.TuneConfig(
        metric=None if multi else metric, mode=None if multi else mode,
        search_alg=trial_generator(search.search_alg, trial_slots(plan.resources, plan.max_concurrent)),
        scheduler=scheduler_for(scheduler, configs, space, num_samples, keep=max(1, reference.confirmation.finalists)),
        num_samples=search.num_samples,
        # A finished trial's process takes the next trial: no new process, no second import
        # of torch (measured: a 19 s gap between waves of 8 trials on this 2-core machine).
        reuse_actors=True)
    plan.record_definition(definition, tracking.git_commit(), num_samples=None if space.has_grid else num_samples)
    results = tuner.run(plan, spec, search.param_space, tune_config, parent.callback, resume)
    drain(parent, plan)
    fail_dangling_optuna_trials(search)
    chosen = choose(results, list(plan.categories), objectives, keys,
                    point_of=grid_point(space) if space.has_grid and not multi else None)
    if not space.has_grid:
        chosen = versus_default(plan, configs, chosen, objectives, reference)
    summary = register_choices(plan, parent.callback, chosen, keys, kind="sweep")
    folder = report.folder(Path(best_out).parent if best_out else plan.storage_path, plan.run_name)
    studies = open_study_storage(search.storage_url) if search.storage_url else None
    report.publish(parent.client, parent.run_id, folder, f"sweep {plan.run_name} ({space.path.name})", summary, keys,
                   study_storage=studies, study_names=search.studies, objectives=objectives)
    finish(parent, ok=not any("error" in e for e in summary.values()))
    if not keep_checkpoints:   # registered: what no one needs any more leaves the storage path
        pruned = retention.prune([r for e in summary.values() for r in e.get("trials", [])],
                                 retention.kept_trials(summary))
        print(f"pouta: {pruned.line}", flush=True)
    if best_out:
        best_configs = {c: e["config"] for c, e in summary.items() if "config" in e}
        # Which config each category got, and why, as comments: the file stays {category: config}.
        lines = "".join(f"# {e['versus_default']['line']}\n" for e in summary.values() if "versus_default" in e)
        text = lines + yaml.safe_dump(best_configs, sort_keys=False)
        atomic_write(Path(best_out), lambda fh: fh.write(text.encode()))
    return summary
