"""``pouta retrain``: retrain the categories whose training data changed, with their best
known hyperparameters, and move ``champion`` only when the new model is better.

Per category: fingerprint the training files; skip it when the champion was trained on the
same fingerprint, or a retraining on it already lost (unless ``--force``; no champion: train);
otherwise train (one Ray Train run) with the sweep's confirmed choice (``--params-from
registered``: the config of the version the registry names, never the raw best trial),
register the result as ``challenger``, score it and its *reference* on the same validation
images, and promote it when it beats the reference by ``--promote-margin`` and a paired
bootstrap over images says it is better with probability >= ``--confidence``. The reference is
the champion; with no champion yet, the version a sweep registered (``challenger`` before this
retrain), which becomes champion if the retrain does not beat it; only with no version at all is
a first model promoted unopposed. Promotion is compare-and-set: the champion alias is read
again just before it moves, and left alone if another process moved it meanwhile. One retrain
of a ``--name`` at a time: a second one exits at once (a lock file on the storage path). A
failing category does not stop the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import tracking
from orchestrator.commands.launch import run_launch
from orchestrator.execution.cluster import init_ray
from orchestrator.plan import Plan
from orchestrator.tracking import registry
from pouta_core import api
from pouta_core.bootstrap import BOOTSTRAP_METRICS, BootstrapResult
from pouta_core.config import Config, ConfigError
from search_spaces.loader import SELECTION_KEYS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """When a retrained challenger replaces the champion (``--metric``, ``--promote-margin``,
    ``--confidence``, ``--bootstrap-resamples``)."""

    metric: str = "pixel_ap"
    margin: float = 0.005
    confidence: float = 0.95
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in BOOTSTRAP_METRICS:
            raise ConfigError(f"--metric {self.metric}: the retrain gate compares {', '.join(BOOTSTRAP_METRICS)}")
        if self.margin < 0:
            raise ConfigError(f"--promote-margin must be >= 0, got {self.margin}")
        if not 0 <= self.confidence <= 1:
            raise ConfigError(f"--confidence must be in [0, 1], got {self.confidence}")
        if self.resamples < 1:
            raise ConfigError(f"--bootstrap-resamples must be >= 1, got {self.resamples}")

    def promotes(self, result: BootstrapResult) -> bool:
        """Better by more than the margin, and better in at least ``confidence`` of the resamples."""
        return result.delta > self.margin and result.p_better >= self.confidence


def champion_version(client, dataset: str, category: str):
    """The model version ``champion`` names for ``category``, or None (no model or no alias yet)."""
    try:
        return client.get_model_version_by_alias(registry.registered_name(dataset, category), tracking.CHAMPION)
    except Exception:   # MlflowException: no such model or alias
        return None


KEPT_CHAMPION, KEPT_REGISTERED, PROMOTED = "kept champion", "kept registered", "promoted"
LOST = (KEPT_CHAMPION, KEPT_REGISTERED)   # a retrain's decisions that left its challenger unpromoted
MOVED = "champion moved meanwhile"        # compare-and-set: another process promoted first


def unchanged(client, exp_id: str, dataset: str, category: str, fingerprint: str, version) -> str | None:
    """Why ``category`` needs no retraining on ``fingerprint``, or None when it does.

    *Decision* (issue 27): the data is compared with the *champion's*, not with the newest
    finished trial: a sweep on new data trains trials on it, yet the champion still serves the
    old model, and the nightly retrain said "unchanged" forever. A challenger retrained on this
    very data that lost the gate is not trained again every night: that needs ``--force``.
    ``version``: the category's champion (None: none yet)."""
    if version is not None and client.get_run(version.run_id).data.tags.get(tracking.TAG_FINGERPRINT) == fingerprint:
        return "unchanged"
    if version is not None:
        lost = [r for decision in LOST for r in client.search_runs([exp_id], filter_string=(
            f"tags.`pouta.retrain_decision` = '{decision}' and tags.`{tracking.TAG_FINGERPRINT}` = '{fingerprint}' "
            f"and tags.dataset = '{dataset}' and tags.category = '{category}'"), max_results=1)]
        if lost:
            return "unchanged (a challenger on this data lost to the champion; --force trains again)"
    return None


def _config_from_params(params: dict[str, str], base: Config) -> dict[str, Any]:
    """The hyperparameters an MLflow run logged, parsed back from their string form. The
    validation split is the command's own (--val-split), never an earlier run's."""
    return {key: (None if params[key] == "None" else yaml.safe_load(params[key]))
            for key in Config.keys() if key in params and key not in SELECTION_KEYS}


PARAMS_SOURCES = ("registered", "champion")


def reference_version(client, dataset: str, category: str, champion):
    """What a retrain of ``category`` must beat, read before it registers anything: ``champion``
    (its champion version), else the version a sweep (or launch) registered as ``challenger``;
    None when there is none."""
    if champion is not None:
        return champion
    try:
        return client.get_model_version_by_alias(registry.registered_name(dataset, category), tracking.CHALLENGER)
    except Exception:   # MlflowException: no such model or alias
        return None


def params_for(source: str, client, category: str, base: Config, *, reference, champion,
               preset: str = "paper") -> dict[str, Any]:
    """Config values for ``category`` from ``registered`` (the run behind the version the
    registry names: the champion, else the sweep's registered ``challenger``: its confirmed
    choice), ``champion`` (the champion's run only) or a YAML FILE (``{category: {...}}``, as
    ``pouta sweep`` writes to ``-best.yaml``). Nothing known -> the base config. ``reference``
    and ``champion``: the category's versions (:func:`reference_version`, :func:`champion_version`).

    *Decision* (issue 46): the raw best trial (the single highest validation value over every
    finished trial, ASHA-stopped ones included) is not a source: it is the winner's curse the
    sweep's confirmation round exists to avoid. ``best`` is read as ``registered``. As ``best``
    ranked only runs of the command's ``preset``, ``registered`` takes a version's config only
    when its run started from that preset (the ``pouta.preset`` tag): a tiny demo's registered
    model does not turn a paper-preset retrain into a tiny one; the gate still compares with it."""
    if source in PARAMS_SOURCES:
        version = champion if source == "champion" else reference
        if version is None:
            return {}
        run = client.get_run(version.run_id)
        if source == "registered" and run.data.tags.get(tracking.TAG_PRESET) != preset:
            log.warning("%s: registered version %s was trained from preset %s, not %s: its config is not used",
                        category, version.version, run.data.tags.get(tracking.TAG_PRESET), preset)
            return {}
        return _config_from_params(run.data.params, base)
    path = Path(source)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read --params-from file ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of category -> config keys")
    values = data.get(category, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: key '{category}': expected a mapping of config keys")
    Config.from_dict({**base.to_dict(), **values}, source=f"{path} [{category}]")
    return {k: v for k, v in values.items() if k not in SELECTION_KEYS}


def _latest_version(client, dataset: str, category: str) -> int:
    name = registry.registered_name(dataset, category)
    versions = client.search_model_versions(f"name = '{name}'")
    return max((int(v.version) for v in versions), default=0)


def reference_checkpoint(store: str, reference, dest: Path) -> Path | None:
    """Download the reference version's checkpoint from ``store`` (None: no reference)."""
    if reference is None:
        return None
    from orchestrator.tracking.models import download_checkpoint

    return download_checkpoint(f"models:/{reference.name}/{reference.version}", store, dest)


class RetrainRunning(ConfigError):
    """Another retrain of the same ``--name`` holds its lock (exit 2, one line)."""


@contextlib.contextmanager
def one_at_a_time(plan: Plan) -> Iterator[None]:
    """Hold ``<storage-path>/<name>.retrain.lock`` (``flock``, on the storage every driver of
    this retrain mounts) for the command; a second retrain of the name refuses to start, naming
    the holder. Released by the kernel however the holder ends."""
    path = Path(plan.storage_path) / f"{plan.run_name}.retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process that wrote nothing yet"
            raise RetrainRunning(f"{path}: another retrain of {plan.run_name} is running ({holder}); not starting a "
                                 "second one (they would race on the champion alias)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
                 .encode())
        yield
    finally:
        os.close(fd)


def run_retrain(plan: Plan, *, params_from: str, gate: Gate, force: bool,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``overrides`` (the command's ``--set``) win over the values from ``params_from``, and
    ``plan.per_category`` (``--category-set``) over both. One at a time per ``--name``."""
    if params_from == "best":
        print("pouta: --params-from best reads the sweep's confirmed choice (registered), not the single best "
              "trial", flush=True)
        params_from = "registered"
    with one_at_a_time(plan):
        return _retrain(plan, params_from=params_from, gate=gate, force=force, overrides=overrides)


def _retrain(plan: Plan, *, params_from: str, gate: Gate, force: bool,
             overrides: dict[str, Any] | None) -> dict[str, Any]:
    client, exp_id = tracking.setup(plan.tracking_uri, plan.mlflow_experiment)   # MLflow first: see sweep.py
    plan = init_ray(plan)
    dataset = plan.data.dataset
    fingerprints: dict[str, str] = {}
    summary: dict[str, Any] = {}
    todo: list[str] = []
    per_category: dict[str, dict[str, Any]] = {}
    references: dict[str, Any] = {}   # read before this retrain registers (and moves challenger)
    for category in plan.categories:
        try:
            fp = fingerprints[category] = api.fingerprint_category(plan.data.root, dataset, category)
            champion = champion_version(client, dataset, category)
            reason = None if force else unchanged(client, exp_id, dataset, category, fp, champion)
            if reason:
                summary[category] = {"status": reason}
                continue
            reference = reference_version(client, dataset, category, champion)
            references[category] = (reference, champion)
            values = {**params_for(params_from, client, category, plan.base, reference=reference, champion=champion,
                                   preset=plan.preset),
                      **(overrides or {}), **plan.per_category.get(category, {})}
            Config.from_dict({**plan.base.to_dict(), **values}, source=f"retrain [{category}]")
            per_category[category] = values
            todo.append(category)
        except Exception as exc:  # one bad category must not stop the others
            summary[category] = {"status": "failed", "error": str(exc).splitlines()[0]}
    if todo:
        # Named after what it trains on and the registry's state: rerunning after a crash resumes
        # it, while new data or a finished retraining (a new version exists) starts anew.
        key = json.dumps([[c, fingerprints[c], per_category[c], _latest_version(client, dataset, c)]
                          for c in todo], sort_keys=True, default=str)
        name = f"{plan.run_name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        sub = dataclasses.replace(plan, categories=tuple(todo), run_name=name)
        trained: dict[str, Any] = {}
        try:
            trained = run_launch(sub, resume=True, per_category=per_category, kind="retrain",
                                 fingerprints={c: fingerprints[c] for c in todo})
        except Exception as exc:
            for c in todo:
                trained[c] = {"error": str(exc).splitlines()[0]}
        for category in todo:
            result = trained.get(category, {"error": "no result"})
            if "error" in result:
                summary[category] = {"status": "failed", "error": result["error"]}
                continue
            try:
                summary[category] = _decide(plan, client, category, result, gate, per_category[category],
                                            *references[category])
            except Exception as exc:
                summary[category] = {"status": "failed", "error": str(exc).splitlines()[0]}
    return summary


def _decide(plan: Plan, client, category: str, result: dict[str, Any], gate: Gate,
            values: dict[str, Any], reference, champion) -> dict[str, Any]:
    """Score the retrained challenger and its ``reference`` (the champion, else the version a
    sweep registered: :func:`reference_version`, read before this retrain registered) on the
    same validation images; promote the challenger when it is better by ``gate.margin`` and the
    paired bootstrap says it is better with probability >= ``gate.confidence``. A reference
    that is not champion yet becomes champion when it holds. With no reference, the first model
    is promoted. ``champion``: the champion when the retrain started; the alias moves only if
    it is still that one."""
    from pouta_core import metrics
    from pouta_core.api import validation_evidence
    from pouta_core.bootstrap import paired_bootstrap

    name, version = result["registered_model"], result["version"]
    kwargs = {"data_root": plan.data.root, "dataset": plan.data.dataset, "category": category, "device": "auto",
              "cache_dir": plan.data.cache_dir}
    split_like = plan.base.replace(**values)
    challenger, labels = validation_evidence(Path(result["checkpoint"]), split_like=split_like, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = reference_checkpoint(tracking.resolve_tracking_uri(plan.tracking_uri), reference, Path(tmp))
        against = validation_evidence(ref_path, split_like=split_like, **kwargs)[0] if ref_path else None
    compared_champion = champion.version if champion is not None else None
    run_id = client.get_model_version(name, version).run_id
    key = f"val_{gate.metric}"
    if against is None:   # a first model: nothing to compare with
        value = metrics.compute(challenger.scores, labels, challenger.maps, challenger.masks)[gate.metric]
        promote, logged, out = True, {f"gate_challenger_{key}": value}, {"challenger": value, "champion": None}
    else:
        test = paired_bootstrap(gate.metric, challenger, against, labels, resamples=gate.resamples, seed=gate.seed)
        promote = gate.promotes(test)
        logged = {f"gate_challenger_{key}": test.a, f"gate_champion_{key}": test.b, "gate_delta": test.delta,
                  "gate_delta_low": test.low, "gate_delta_high": test.high, "gate_p_better": test.p_better}
        out = {"challenger": test.a, "champion": test.b, "low": test.low, "high": test.high,
               "p_better": test.p_better}
    first = reference is not None and compared_champion is None   # the sweep's version, not champion yet
    winner = version if promote else (reference.version if first else None)
    decision = PROMOTED if promote else (KEPT_REGISTERED if first else KEPT_CHAMPION)
    if winner is not None:
        # Compare-and-set: the champion must still be the one this decision compared with.
        now = champion_version(client, plan.data.dataset, category)
        if (now.version if now is not None else None) != compared_champion:
            decision, winner = MOVED, None
            log.warning("%s: the champion moved to version %s while this retrain compared with %s; left as it is",
                        name, now.version if now else None, compared_champion)
        else:
            registry.promote(client, name, winner, tracking.CHAMPION)
    tracking.log_metrics(client, run_id, logged, step=0)
    client.set_tag(run_id, "pouta.retrain_decision", decision)
    return {"status": decision, **out, "metric": key, "champion_version": reference.version if reference else None,
            "reference": ("registered" if first else "champion") if reference is not None else None,
            "version": version, "model": name}
