"""``pouta retrain``: retrain the categories whose training data changed, with their best
known hyperparameters, and move ``champion`` only when the new model is better.

Per category: fingerprint the training files; skip it when the champion was trained on the
same fingerprint, or a retraining on it already lost to the champion (unless ``--force``;
no champion: train); otherwise train (one Ray Train
run), register the result as ``challenger``, score challenger and champion on the same
*validation* images, and promote the challenger when there is no champion yet, or when it
beats the champion by ``--promote-margin`` and a paired bootstrap over images says it is
better with probability >= ``--confidence``. A failing category does not stop the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import tracking
from orchestrator.commands.launch import run_launch
from orchestrator.execution.cluster import init_ray
from orchestrator.plan import Plan, selection_metric
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


def unchanged(client, exp_id: str, dataset: str, category: str, fingerprint: str) -> str | None:
    """Why ``category`` needs no retraining on ``fingerprint``, or None when it does.

    *Decision* (issue 27): the data is compared with the *champion's*, not with the newest
    finished trial: a sweep on new data trains trials on it, yet the champion still serves the
    old model, and the nightly retrain said "unchanged" forever. A challenger retrained on this
    very data that lost the gate is not trained again every night: that needs ``--force``."""
    version = champion_version(client, dataset, category)
    if version is not None and client.get_run(version.run_id).data.tags.get(tracking.TAG_FINGERPRINT) == fingerprint:
        return "unchanged"
    if version is not None:
        lost = client.search_runs([exp_id], filter_string=(
            f"tags.`pouta.retrain_decision` = 'kept champion' and tags.`{tracking.TAG_FINGERPRINT}` = '{fingerprint}' "
            f"and tags.dataset = '{dataset}' and tags.category = '{category}'"), max_results=1)
        if lost:
            return "unchanged (a challenger on this data lost to the champion; --force trains again)"
    return None


def _config_from_params(params: dict[str, str], base: Config) -> dict[str, Any]:
    """The hyperparameters an MLflow run logged, parsed back from their string form. The
    validation split is the command's own (--val-split), never an earlier run's."""
    return {key: (None if params[key] == "None" else yaml.safe_load(params[key]))
            for key in Config.keys() if key in params and key not in SELECTION_KEYS}


def params_for(source: str, client, exp_id: str, dataset: str, category: str, metric: str, mode: str,
               base: Config, preset: str = "paper") -> dict[str, Any]:
    """Config values for ``category`` from ``best`` (its best finished trial by ``metric``),
    ``champion`` (the run behind the champion version) or a YAML FILE (``{category: {...}}``, as
    ``pouta sweep`` writes). Nothing known -> the base config.

    ``best`` ranks only trials comparable with the command: the same ``preset`` (the
    ``pouta.preset`` tag), the same selection split and the same validation split and ratio
    as ``base``. Validation values on different images, or of a tiny model against the
    paper's, do not rank one another, and a run that chose on test never wins."""
    if source == "best":
        order = f"metrics.{selection_metric(metric)} {'DESC' if mode == 'max' else 'ASC'}"
        runs = client.search_runs([exp_id], filter_string=(
            f"tags.`pouta.kind` = 'trial' and tags.dataset = '{dataset}' and tags.category = '{category}' "
            f"and tags.`{tracking.TAG_PRESET}` = '{preset}' "
            f"and tags.`{tracking.TAG_SELECTION}` = '{tracking.selection_tag(base.val_split)}' "
            f"and params.val_split = '{base.val_split}' and params.val_ratio = '{base.val_ratio}' "
            "and attributes.status = 'FINISHED'"), order_by=[order], max_results=1)
        return _config_from_params(runs[0].data.params, base) if runs else {}
    if source == "champion":
        version = champion_version(client, dataset, category)
        return _config_from_params(client.get_run(version.run_id).data.params, base) if version else {}
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


def champion_checkpoint(client, store: str, dataset: str, category: str, dest: Path) -> tuple[str, Path] | None:
    """Download the champion's checkpoint from ``store`` -> (version, local path), or None."""
    version = champion_version(client, dataset, category)
    if version is None:
        return None
    from orchestrator.tracking.models import download_checkpoint

    return version.version, download_checkpoint(f"models:/{version.name}/{version.version}", store, dest)


def run_retrain(plan: Plan, *, params_from: str, gate: Gate, force: bool,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``overrides`` (the command's ``--set``) win over the values from ``params_from``, and
    ``plan.per_category`` (``--category-set``) over both."""
    metric, mode = gate.metric, "max"

    client, exp_id = tracking.setup(plan.tracking_uri, plan.mlflow_experiment)   # MLflow first: see sweep.py
    plan = init_ray(plan)
    dataset = plan.data.dataset
    fingerprints: dict[str, str] = {}
    summary: dict[str, Any] = {}
    todo: list[str] = []
    per_category: dict[str, dict[str, Any]] = {}
    for category in plan.categories:
        try:
            fp = fingerprints[category] = api.fingerprint_category(plan.data.root, dataset, category)
            reason = None if force else unchanged(client, exp_id, dataset, category, fp)
            if reason:
                summary[category] = {"status": reason}
                continue
            values = {**params_for(params_from, client, exp_id, dataset, category, metric, mode, plan.base,
                                   plan.preset),
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
                summary[category] = _decide(plan, client, category, result, gate,
                                            per_category[category])
            except Exception as exc:
                summary[category] = {"status": "failed", "error": str(exc).splitlines()[0]}
    return summary


def _decide(plan: Plan, client, category: str, result: dict[str, Any], gate: Gate,
            values: dict[str, Any]) -> dict[str, Any]:
    """Score challenger and champion on the same validation images; promote the challenger
    when there is no champion, or when it is better by ``gate.margin`` and the paired
    bootstrap says it is better with probability >= ``gate.confidence``."""
    from pouta_core import metrics
    from pouta_core.api import validation_evidence
    from pouta_core.bootstrap import paired_bootstrap

    name, version = result["registered_model"], result["version"]
    kwargs = {"data_root": plan.data.root, "dataset": plan.data.dataset, "category": category, "device": "auto",
              "cache_dir": plan.data.cache_dir}
    split_like = plan.base.replace(**values)
    challenger, labels = validation_evidence(Path(result["checkpoint"]), split_like=split_like, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        champ = champion_checkpoint(client, tracking.resolve_tracking_uri(plan.tracking_uri), plan.data.dataset,
                                    category, Path(tmp))
        champion = validation_evidence(champ[1], split_like=split_like, **kwargs)[0] if champ else None
    run_id = client.get_model_version(name, version).run_id
    key = f"val_{gate.metric}"
    if champion is None:   # a first champion: nothing to compare with
        value = metrics.compute(challenger.scores, labels, challenger.maps, challenger.masks)[gate.metric]
        promote, logged, out = True, {f"gate_challenger_{key}": value}, {"challenger": value, "champion": None}
    else:
        test = paired_bootstrap(gate.metric, challenger, champion, labels, resamples=gate.resamples, seed=gate.seed)
        promote = gate.promotes(test)
        logged = {f"gate_challenger_{key}": test.a, f"gate_champion_{key}": test.b, "gate_delta": test.delta,
                  "gate_delta_low": test.low, "gate_delta_high": test.high, "gate_p_better": test.p_better}
        out = {"challenger": test.a, "champion": test.b, "low": test.low, "high": test.high,
               "p_better": test.p_better}
    if promote:
        registry.promote(client, name, version, tracking.CHAMPION)
    tracking.log_metrics(client, run_id, logged, step=0)
    decision = "promoted" if promote else "kept champion"
    client.set_tag(run_id, "pouta.retrain_decision", decision)
    return {"status": decision, **out, "metric": key, "champion_version": champ[0] if champ else None,
            "version": version, "model": name}
