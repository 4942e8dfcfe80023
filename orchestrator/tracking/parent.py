"""The command's parent MLflow run (one per launch / sweep / retrain, found again by its key on
a rerun) and the Tune callback that mirrors each trial into a child run under it."""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator import tracking
from orchestrator.plan import Plan
from orchestrator.spec import TrialSpec
from orchestrator.tracking.callback import MlflowTrialCallback


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
