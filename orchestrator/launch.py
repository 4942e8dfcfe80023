"""``pouta launch``: train every category with one config, as many at once as the cluster
(and ``--max-concurrent``) allows: a Tune grid over categories, each trial a Ray Train run."""

from __future__ import annotations

from typing import Any

from ray import tune

from orchestrator import experiment as ex
from orchestrator import report, tracking


def run_launch(plan: ex.Plan, *, resume: bool, per_category: dict[str, dict[str, Any]] | None = None,
               kind: str = "launch", fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Train each category once. ``per_category`` optionally gives each category its own config
    values (retrain uses it for the best known hyperparameters); ``plan.per_category`` (the
    command's --category-set) wins over them. ``fingerprints``: the categories' data
    fingerprints when the caller has them already."""
    ex.init_ray(plan)
    fingerprints = fingerprints or plan.fingerprints()
    client, _, parent_id, parent_key = ex.open_parent(plan, kind)
    ex.warn_about_config(plan)
    spec = plan.trial_spec(category_values=per_category)
    cb = ex.callback(plan, spec, parent_id, parent_key, fingerprints)
    param_space = {"category": tune.grid_search(plan.categories)}
    tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=plan.max_concurrent or None,
                                  reuse_actors=True)   # see sweep.py
    tuner = ex.make_tuner(plan, spec, param_space, tune_config, cb, resume)
    results = ex.fit(tuner)
    keys = ex.both_splits(ex.SUMMARY_METRICS)
    summary: dict[str, Any] = {}
    for r in results:
        category = r.config["category"] if r.config else None
        row = ex.trial_rows([r], keys)[0]
        if category is None:
            continue
        if "error" in row or not row.get("checkpoint"):
            summary[category] = {"error": row.get("error", "no checkpoint")}
            continue
        name, version = ex.register_best(plan, cb, category, row["trial_id"], row["checkpoint"], kind=kind)
        summary[category] = {**{k: row.get(k) for k in ["trial_id", "epoch", *keys]}, "checkpoint": row["checkpoint"],
                             "registered_model": name, "version": version}
    report.publish(client, parent_id, report.folder(plan.storage_path, plan.run_name), f"{kind} {plan.run_name}",
                   {c: {"trials": [e], "best": e} if "error" not in e else {"trials": [e]}
                    for c, e in summary.items()}, keys)
    tracking.finish(client, parent_id, ok=all("error" not in e for e in summary.values()))
    return summary
