"""A Tune callback that mirrors every trial into MLflow from the driver: one child run per
category-trial under the command's parent run, every reported metric with its epoch as the
step, and at the end the trial's config, checkpoint, metrics and heat-map grid."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator import tracking
from orchestrator.spec import SAMPLED, TrialSpec

log = logging.getLogger(__name__)
ARTIFACTS = ("config.yaml", "checkpoint.pt", "metrics.json", "heatmaps.png", "val_files.json")


class MlflowTrialCallback(Callback):
    def __init__(self, tracking_uri: str, mlflow_experiment: str, spec: TrialSpec, parent_run_id: str,
                 parent_key: str, tags: dict[str, str], fingerprints: Mapping[str, str]) -> None:
        self.tracking_uri = tracking_uri
        self.mlflow_experiment = mlflow_experiment
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.parent_key = parent_key
        self.tags = tags
        self.fingerprints = fingerprints
        self.runs: dict[str, str] = {}        # trial id -> MLflow run id
        self.steps: dict[str, int] = {}       # run id -> last logged epoch
        self.checkpoints: dict[str, str] = {}  # trial id -> latest checkpoint path
        self._client = None

    # Tune pickles callbacks into its experiment state; the client is rebuilt on demand.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client, self._exp_id = tracking.setup(self.tracking_uri, self.mlflow_experiment)
        return self._client

    def run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        client = self.client
        category = trial.config["category"]
        dataset = self.spec.data.dataset
        config = self.spec.config_for(category, trial.config.get(SAMPLED))
        key = f"{self.parent_key}/{category}/{trial.trial_id}"
        run_id = tracking.get_or_create_run(
            client, self._exp_id, key, name=f"{category}-{trial.trial_id}", parent_id=self.parent_run_id,
            tags={**self.tags, tracking.TAG_KIND: "trial", "pouta.category": category, "dataset": dataset,
                  "category": category, "variant": config.variant,
                  tracking.TAG_SELECTION: tracking.selection_tag(config.val_split),
                  tracking.TAG_FINGERPRINT: self.fingerprints.get(category, "unknown")})
        tracking.log_params(client, run_id, {**config.to_dict(), "category": category, "dataset": dataset})
        self.runs[trial.trial_id] = run_id
        self.steps[run_id] = tracking.last_step(client, run_id)
        return run_id

    def run_id_for(self, category: str, trial_id: str) -> str:
        """The child run of a trial, also one this process did not see start (a restored sweep)."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        self.client  # noqa: B018 - sets the experiment id
        run_id = tracking.find_run(self.client, self._exp_id, f"{self.parent_key}/{category}/{trial_id}")
        if run_id is None:
            raise KeyError(f"no MLflow run for trial {trial_id} of {category}")
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.run_for(trial)
        epoch = int(result.get("epoch", -1))
        # Ray Train runs name their checkpoint in the result; one-worker trials are Tune's own.
        path = result.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else None)
        if path:
            self.checkpoints[trial.trial_id] = path
        if epoch <= self.steps.get(run_id, -1):
            return    # a restarted trial reports epochs MLflow already has
        tracking.log_metrics(self.client, run_id, {k: v for k, v in result.items()
                                                   if k.startswith(("loss_", "val_", "test_", "lr", "latency"))},
                             step=epoch)
        self.steps[run_id] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_for(trial)
        path = (trial.checkpoint.path if trial.checkpoint else None) or self.checkpoints.get(trial.trial_id)
        if path and Path(path).is_dir():
            for name in ARTIFACTS:
                f = Path(path) / name
                if f.is_file():
                    self.client.log_artifact(run_id, str(f), artifact_path="checkpoint" if name == "checkpoint.pt"
                                             else None)
        elif path:
            log.warning("checkpoint %s is not on a local or mounted filesystem; artifacts not logged", path)
        tracking.finish(self.client, run_id, ok=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        tracking.finish(self.client, self.run_for(trial), ok=False)
