"""``pouta launch``: train every category with one config, as many at once as the cluster
(and ``--max-concurrent``) allows: a Tune grid over categories, each trial a Ray Train run."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import tune

from orchestrator import tracking
from orchestrator.execution import tuner
from orchestrator.execution.cluster import init_ray
from orchestrator.execution.results import trial_rows
from orchestrator.execution.schedulers import ResumingScheduler
from orchestrator.execution.tune_parts import trial_generator, trial_slots
from orchestrator.plan import SUMMARY_METRICS, Plan, both_splits, warn_about_config
from orchestrator.tracking import report
from orchestrator.tracking.parent import drain, finish, open_parent
from orchestrator.tracking.registry import register_best


def run_launch(plan: Plan, *, resume: bool, per_category: dict[str, dict[str, Any]] | None = None,
               kind: str = "launch", fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Train each category once. ``per_category`` optionally gives each category its own config
    values (retrain uses it for the best known hyperparameters); ``plan.per_category`` (the
    command's --category-set) wins over them. ``fingerprints``: the categories' data
    fingerprints when the caller has them already."""
    warn_about_config(plan)
    keys = both_splits(SUMMARY_METRICS)
    fingerprints = fingerprints or plan.fingerprints()
    definition = plan.definition(fingerprints, category_values=per_category or {})
    plan.check_new_or_resumed(resume, definition)
    spec = plan.trial_spec(category_values=per_category)
    tracking.setup(plan.tracking_uri, plan.mlflow_experiment)   # MLflow answers, Ray can hold a trial: see sweep.py
    plan = init_ray(plan)
    spec = dataclasses.replace(spec, resources=plan.resources)   # fitted to the cluster: CPUs per GPU worker
    parent = open_parent(plan, kind, spec, fingerprints)
    client, parent_id, cb = parent.client, parent.run_id, parent.callback
    param_space = {"category": tune.grid_search(plan.categories)}
    tune_config = tune.TuneConfig(num_samples=1, reuse_actors=True,   # see sweep.py
                                  search_alg=trial_generator(None, trial_slots(plan.resources, plan.max_concurrent)),
                                  scheduler=ResumingScheduler())
    plan.record_definition(definition, tracking.git_commit())
    results = tuner.run(plan, spec, param_space, tune_config, cb, resume)
    drain(parent, plan)
    summary: dict[str, Any] = {}
    for r in results:
        category = r.config["category"] if r.config else None
        row = trial_rows([r], keys)[0]
        if category is None:
            continue
        if "error" in row or not row.get("checkpoint"):
            summary[category] = {"error": row.get("error", "no checkpoint")}
            continue
        name, version = register_best(plan, cb, category, row["trial_id"], row["checkpoint"], kind=kind)
        summary[category] = {**{k: row.get(k) for k in ["trial_id", "epoch", *keys]}, "checkpoint": row["checkpoint"],
                             "registered_model": name, "version": version}
    report.publish(client, parent_id, report.folder(plan.storage_path, plan.run_name), f"{kind} {plan.run_name}",
                   {c: {"trials": [e], "best": e} if "error" not in e else {"trials": [e]}
                    for c, e in summary.items()}, keys)
    finish(parent, ok=all("error" not in e for e in summary.values()))
    return summary
