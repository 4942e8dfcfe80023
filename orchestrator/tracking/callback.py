"""A Tune callback that mirrors every trial into MLflow from the driver: one child run per
category-trial under the command's parent run, every reported metric with its epoch as the
step, and at the end the trial's config, checkpoint, metrics and heat-map grid. The writes are
records (:mod:`.records`) written to the driver's journal (:mod:`.journal`) and sent by an
outbox (:mod:`.outbox`): an MLflow outage neither stops nor stalls the sweep, and what it could
not send before the driver stopped is sent by the next command on the experiment."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator import tracking
from orchestrator.execution.results import SCORING, scoring_of, unpacked
from orchestrator.spec import CHECKPOINT_EPOCH, CONFIRM_OF, DEFAULT_TRIAL, SAMPLED, TrialSpec
from orchestrator.tracking import journal, records
from orchestrator.tracking.outbox import Outbox
from pouta_core.scoring_choice import CHOICE_FILE

log = logging.getLogger(__name__)
# What every trial's run gets (a few hundred kB). Its checkpoint stays in Ray's storage, named by
# the run's pouta.checkpoint tag; only the registered version's run gets weights (registry.py).
ARTIFACTS = ("config.yaml", "metrics.json", "heatmaps.png", "val_files.json", CHOICE_FILE)
TAG_DEFAULT = "pouta.default"   # "true" on a sweep's default trial (the base config)
TAG_CONFIRM_OF = "pouta.confirm_of"   # on a confirmation trial: the trial whose config it trains on a fresh seed


def trial_artifacts(checkpoint_dir: Path) -> list[Path]:
    """The files of a trial's final checkpoint folder that its MLflow run gets."""
    return [checkpoint_dir / name for name in ARTIFACTS if (checkpoint_dir / name).is_file()]


# What a trial's reports put in its MLflow run, by prefix (the rest is Tune's bookkeeping).
LOGGED_METRICS = ("loss_", "val_", "test_", "lr", "latency", "nonfinite_steps")


class MlflowTrialCallback(Callback):
    """Tune's events as MLflow writes, put in an :class:`~orchestrator.tracking.outbox.Outbox`
    (never waiting on MLflow in Tune's loop); :func:`~orchestrator.tracking.outbox.close_all`
    delivers what is left."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, spec: TrialSpec, parent_run_id: str,
                 parent_key: str, tags: dict[str, str], fingerprints: Mapping[str, str], *,
                 experiment_path: str | None = None, replay_hint: str = "") -> None:
        self.tracking_uri = tracking_uri
        self.experiment_path = experiment_path   # where the journal goes (None: no journal)
        self.replay_hint = replay_hint
        self.mlflow_experiment = mlflow_experiment
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.parent_key = parent_key
        self.tags = tags
        self.fingerprints = fingerprints
        self.opened: set[str] = set()          # trial ids whose run is asked for
        self.last_epoch: dict[str, int] = {}   # trial id -> last epoch put in the outbox
        self.checkpoints: dict[str, str] = {}  # trial id -> latest checkpoint path
        self.run_ids: dict[str, str] = {}      # trial key -> its MLflow run id (saved with Tune's state)
        self._at_start: set[str] | None = None  # trials this driver restored, not started
        self._client = None
        self._outbox: Outbox | None = None

    # Tune pickles callbacks into tuner.pkl; the client and the outbox (a thread) are rebuilt
    # on demand.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_outbox": None, "_at_start": None}

    # What Tune saves with its experiment state and gives back on --resume: each trial's run id,
    # so a restored trial's run is found without a search.
    def get_state(self) -> dict[str, Any]:
        return {"run_ids": dict(self.run_ids)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.run_ids.update(state.get("run_ids", {}))

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self._at_start is None:   # the first step of this driver: no trial of its own yet
            self._at_start = {t.trial_id for t in trials}

    @property
    def client(self):
        """A client for the driver's own calls after the sweep (registration)."""
        if self._client is None:
            self._client, self._exp_id = tracking.setup(self.tracking_uri, self.mlflow_experiment)
        return self._client

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            book = None
            where = getattr(self, "experiment_path", None)   # None: restored from a sweep made before journals
            if where is not None:
                book = journal.open_journal(Path(where), self.journal_header())
            box = Outbox(lambda: self._connect(box), records.deliver, journal=book,
                         hint=getattr(self, "replay_hint", ""))
            box.state.update(records.new_state())
            box.state["run_ids"] = self.run_ids   # a created run's id goes into Tune's saved state
            self._outbox = box
        return self._outbox

    def journal_header(self) -> dict[str, Any]:
        """Where the journal's records go, and the command's parent run (ended by a replay
        when the command did not end it)."""
        return {"tracking_uri": self.tracking_uri, "experiment": self.mlflow_experiment,
                "parent_key": self.parent_key, "parent_run_id": self.parent_run_id}

    def _connect(self, box: Outbox):
        client, box.state["exp_id"] = tracking.setup(self.tracking_uri, self.mlflow_experiment)
        return client

    def key_of(self, category: str, trial_id: str) -> str:
        return f"{self.parent_key}/{category}/{trial_id}"

    def _open(self, trial) -> str:
        """Ask for the trial's run (created, or found again by its key) -> its key."""
        category = trial.config["category"]
        key = self.key_of(category, trial.trial_id)
        if trial.trial_id in self.opened:
            return key
        self.opened.add(trial.trial_id)
        dataset = self.spec.data.dataset
        config = self.spec.config_for(category, trial.config.get(SAMPLED))
        tags = {**self.tags, tracking.TAG_KIND: "trial", "pouta.category": category, "dataset": dataset,
                "category": category, "variant": config.variant,
                tracking.TAG_SELECTION: tracking.selection_tag(config.val_split),
                tracking.TAG_FINGERPRINT: self.fingerprints.get(category, "unknown"),
                **({TAG_DEFAULT: "true"} if trial.config.get(DEFAULT_TRIAL) else {}),
                **({TAG_CONFIRM_OF: trial.config[CONFIRM_OF]} if trial.config.get(CONFIRM_OF) else {})}
        # As MLflow keeps them (strings), so that a replayed record logs the same values.
        params = {k: str(v) for k, v in tracking.flatten("", {**config.to_dict(), "category": category,
                                                             "dataset": dataset}).items()}
        suffix = ("-default" if trial.config.get(DEFAULT_TRIAL) else "") + \
            (f"-confirm-seed{config.seed}" if trial.config.get(CONFIRM_OF) else "")
        name, parent = f"{category}-{trial.trial_id}{suffix}", self.parent_run_id
        known = self.run_ids.get(key)
        # Only a trial this driver did not start can have a run it does not know (a driver killed
        # between creating the run and Tune saving its state): only then is the run searched for.
        # A new trial's run is created at once: no search across an ever-growing experiment.
        restored = self._at_start is None or trial.trial_id in self._at_start
        record = {"op": records.OPEN, "key": key, "name": name, "tags": tags, "params": params, "parent": parent,
                  "known": known, "restored": restored}
        self.outbox.put(record, f"the run of trial {trial.trial_id}")
        return key

    def run_id_for(self, category: str, trial_id: str) -> str:
        """The child run of a trial, also one this process did not see start (a restored sweep)."""
        key = self.key_of(category, trial_id)
        known = self.outbox.state["runs"].get(key) or self.run_ids.get(key)
        if known:
            return known
        self.client  # noqa: B018 - sets the experiment id
        run_id = tracking.find_run(self.client, self._exp_id, key)
        if run_id is None:
            raise KeyError(f"no MLflow run for trial {trial_id} of {category}")
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        key = self._open(trial)
        epoch = int(result.get("epoch", -1))
        # Ray Train runs name their checkpoint in the result; one-worker trials are Tune's own.
        path = result.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else None)
        if path:
            self.checkpoints[trial.trial_id] = path
        if epoch <= self.last_epoch.get(trial.trial_id, -1):
            return
        self.last_epoch[trial.trial_id] = epoch
        metrics = {k: float(v) for k, v in unpacked(result).items()
                   if k.startswith(LOGGED_METRICS) and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        stamp = int(time.time() * 1000)   # when reported: a repeated delivery is an exact repeat
        self.outbox.put({"op": records.METRICS, "key": key, "epoch": epoch, "metrics": metrics, "stamp": stamp},
                        f"epoch {epoch} of trial {trial.trial_id}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        key = self._open(trial)
        path = (trial.checkpoint.path if trial.checkpoint else None) or self.checkpoints.get(trial.trial_id)
        held = (trial.last_result or {}).get(CHECKPOINT_EPOCH)
        chosen = scoring_of(trial.last_result).get(SCORING, {})
        files: list[Path] = []
        if path and Path(path).is_dir():
            files = trial_artifacts(Path(path))
        elif path:
            log.warning("checkpoint %s is not on a local or mounted filesystem; artifacts not logged", path)
        self.outbox.put({"op": records.COMPLETE, "key": key, "checkpoint": path, "checkpoint_epoch": held,
                         "scoring": chosen, "files": [str(f) for f in files]},
                        f"the artifacts of trial {trial.trial_id}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        key = self._open(trial)
        self.outbox.put({"op": records.ERROR, "key": key}, f"the end of trial {trial.trial_id}")
