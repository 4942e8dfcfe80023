"""The command's parent MLflow run (one per launch / sweep / retrain, found again by its key on
a rerun) and the Tune callback that mirrors each trial into a child run under it. Before any
trial starts, whatever an earlier driver of the same experiment left in its journal is
delivered, and the runs it left RUNNING are ended (:mod:`.journal`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.errors import TrackingIncomplete
from orchestrator.plan import Plan
from orchestrator.spec import TrialSpec
from orchestrator.tracking import journal, outbox
from orchestrator.tracking.callback import MlflowTrialCallback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parent:
    """A command's parent run and the callback that puts its trials under it."""

    client: MlflowClient
    run_id: str
    callback: MlflowTrialCallback


def open_parent(plan: Plan, kind: str, spec: TrialSpec, fingerprints: Mapping[str, str], *,
                tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Parent:
    """The parent run of ``kind:<run name>`` (created, or found again on a rerun) with the
    command's tags and params, and the callback that logs ``spec``'s trials as its children."""
    hint = replay_command(plan)
    client, exp_id = tracking.setup(plan.tracking_uri, plan.mlflow_experiment)
    key = f"{kind}:{plan.run_name}"
    commit = tracking.git_commit()
    run_id = tracking.get_or_create_run(client, exp_id, key, name=plan.run_name, tags={
        tracking.TAG_KIND: kind, "dataset": plan.data.dataset, "git_commit": commit, tracking.TAG_PRESET: plan.preset,
        tracking.TAG_SELECTION: tracking.selection_tag(plan.base.val_split), **(tags or {}),
        # what each trial held (CPUs per GPU worker may be sized from the cluster: cluster.size_cpus)
        "pouta.resources": f"{plan.resources.workers} worker(s) x {plan.resources.cpus_per_worker:g} CPU, "
                           f"{plan.resources.gpus_per_worker:g} GPU"})
    tracking.log_params(client, run_id, {"command": kind, "dataset": plan.data.dataset,
                                         "categories": ",".join(plan.categories), "name": plan.run_name,
                                         **(params or {})})
    cb = MlflowTrialCallback(tracking.resolve_tracking_uri(plan.tracking_uri), plan.mlflow_experiment, spec,
                             run_id, key, {"git_commit": commit, tracking.TAG_PRESET: plan.preset}, fingerprints,
                             experiment_path=str(plan.experiment_path), replay_hint=hint)
    # This driver's journal at once, not at the first record (its lock says the driver runs; a
    # driver killed before any trial reported leaves the parent run for the next command to end),
    # then what earlier drivers left: delivered before any trial of this command reports.
    header = cb.journal_header()
    journal.begin(plan.experiment_path, header, client, exp_id, by=f"pouta {kind} {plan.run_name}")
    return Parent(client, run_id, cb)


def replay_command(plan: Plan) -> str:
    """What delivers an experiment's journal by hand."""
    uri = f" --tracking-uri {plan.tracking_uri}" if plan.tracking_uri else ""
    return f"pouta tracking replay --storage-path {plan.storage_path} --name {plan.run_name}{uri}"


def finish(parent: Parent, ok: bool) -> None:
    """End the command's parent run; the command is done with MLflow, so its journal, every
    record delivered, is removed."""
    tracking.finish(parent.client, parent.run_id, ok=ok)
    journal.close_journals(done=True)


def drain(parent: Parent, plan: Plan) -> None:
    """After the trials: deliver the waiting records (of every trial callback in this process:
    a resumed Tuner logs through the one it restored), waiting up to
    ``plan.mlflow_wait`` seconds for an unreachable MLflow. Still unreachable: raise
    :class:`TrackingIncomplete` (nothing is registered; Ray's results stay for a rerun)."""
    left = outbox.close_all(plan.mlflow_wait)
    if left.undelivered or left.lost:
        why = f"refused our credentials ({left.credentials})" if left.credentials else "stayed unreachable"
        kept = f"{left.undelivered} records kept in its journal ({replay_command(plan)} sends them)" \
            if left.undelivered else ""
        lost = f"{left.lost} records not logged" if left.lost else ""
        raise TrackingIncomplete(
            f"MLflow at {parent.callback.tracking_uri} {why}: {', '.join(x for x in (kept, lost) if x)}, nothing "
            f"registered; Ray's results are intact in {plan.experiment_path}")
    if left.refused:
        log.warning("%d MLflow records were refused (see the warnings above)", left.refused)
