"""What an experiment is: the :class:`Plan` a command line becomes (categories, base config,
per-category values, names, where Tune and MLflow keep things), built once and read by
everything after it; and the names of the metrics its choices read (validation only).

A sweep's data flows one way: command (:mod:`orchestrator.commands`) -> plan -> trial spec
(:mod:`orchestrator.spec`) -> tuner with callbacks (:mod:`orchestrator.execution`) -> results
-> choice -> registry and report (:mod:`orchestrator.tracking`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.execution.watchdog import DEFAULT_PENDING_TIMEOUT_S
from orchestrator.spec import DEFAULT_METRIC, DataSpec, Resources, TrialSpec
from pouta_core import api
from pouta_core.config import Config, ConfigError, parse_overrides
from pouta_core.data import categories as list_categories
from pouta_core.files import atomic_write

log = logging.getLogger(__name__)

DEFINITION_FILE = "pouta-definition.json"   # in the experiment's folder: what --resume must match


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The dotted paths at which two JSON values differ (``config.lr``, ``categories``), with
    the old and new value for a scalar: ``config.lr (0.001 -> 0.002)``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                out.append(f"{path} ({'added' if key not in old else 'removed'})")
            else:
                out.extend(differences(old[key], new[key], path))
        return out
    if old == new:
        return []
    if isinstance(old, dict | list) or isinstance(new, dict | list):
        return [where]
    def short(v: Any) -> str:   # data fingerprints are 64 hex digits
        return f"{v[:12]}..." if isinstance(v, str) and len(v) > 20 else str(v)

    return [f"{where} ({short(old)} -> {short(new)})"]


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
    # How long a command whose trials are done waits for an unreachable MLflow to take the
    # records its outbox still holds (--mlflow-wait).
    mlflow_wait: float = 600.0
    # The reported metric the progress lines show (validation: ``val_pixel_ap``); choices read
    # Tune's own metric.
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    verbose: bool = False     # Tune's tables and Ray's worker logs on the console (pouta -v)
    # The preset the base config starts from (a tag on every run: retrain's --params-from best
    # ranks only runs of the command's preset).
    preset: str = "paper"
    # --category-set: config values for one category only, over ``base`` and any --set.
    per_category: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" in self.storage_path:
            # Decided (issue 26): storage is a filesystem every node mounts. The driver reads
            # checkpoints back (registration, MLflow artifacts, the retrain gate) from local
            # paths; Tune would accept a bucket, and everything after it would not.
            # Not a bucket through a FUSE mount either: mountpoint-s3 and gcsfuse support neither the
            # rename of our atomic writes nor the appends of Optuna's journal (issue 46).
            raise ConfigError(f"--storage-path {self.storage_path}: a URI; give a directory every node mounts "
                              "(NFS, or a ReadWriteMany volume such as EFS, Filestore or Azure Files; not a bucket "
                              "FUSE mount: mountpoint-s3 and gcsfuse cannot rename or append)")
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "storage_path", str(Path(self.storage_path).resolve()))

    @property
    def experiment_path(self) -> Path:
        """The Tune experiment's folder."""
        return Path(self.storage_path) / self.run_name

    def definition(self, fingerprints: Mapping[str, str], **extra: Any) -> dict[str, Any]:
        """What defines this experiment's results: the base config (preset, --config, --set),
        the per-category values, the categories, the dataset and each one's data fingerprint,
        workers per trial (the DDP batch), and ``extra`` (a sweep's space, scheduler,
        objectives, a grid's seeds). Not in it: the config keys of how steps compute
        (``Config.RUNTIME_KEYS``: amp, amp_dtype, channels_last, compile); a study sweep's trial count, which a resume
        may raise (:meth:`check_new_or_resumed`); what only runs it (--max-concurrent,
        timeouts, --max-failures, -v, the tracking URI, GPUs per worker), which a resume may
        change (:func:`orchestrator.execution.tuner.make_tuner` applies them)."""
        config = {k: v for k, v in self.base.to_dict().items() if k not in Config.RUNTIME_KEYS}
        return {"config": config, "per_category": {c: dict(v) for c, v in self.per_category.items()},
                "categories": list(self.categories), "dataset": self.data.dataset,
                "data_fingerprints": dict(fingerprints), "workers_per_trial": self.resources.workers,
                **extra}

    @property
    def definition_path(self) -> Path:
        return self.experiment_path / DEFINITION_FILE

    def recorded(self) -> dict[str, Any] | None:
        """What the experiment's folder records of it (its definition, the code that started it,
        trials per category), or None for an experiment older than the file."""
        if not self.definition_path.is_file():
            return None
        try:
            recorded = json.loads(self.definition_path.read_text())
            if not isinstance(recorded.get("definition"), dict):
                raise ValueError
            return recorded
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{self.definition_path}: unreadable experiment definition; move it away to "
                              "resume without the check") from None

    def check_new_or_resumed(self, resume: bool, definition: Mapping[str, Any] | None = None,
                             num_samples: int | None = None) -> None:
        """An experiment that exists is only continued with ``resume``, and only as the same
        experiment: a ``definition`` that differs from the one recorded when it started is
        refused, naming the fields. A study sweep's ``num_samples`` may grow it (the same
        studies get the new trials, in the same Tune experiment), never shrink it. Checked
        before anything starts, so a refused command leaves no Ray, no MLflow run behind."""
        if not self.experiment_path.exists():
            return
        if not resume:
            raise ConfigError(f"{self.experiment_path}: experiment '{self.run_name}' already exists; pass --resume "
                              "to continue it or --name to start another")
        recorded = self.recorded()
        if definition is None or recorded is None:
            return   # an experiment older than its definition file: nothing to compare with
        old = dict(recorded["definition"])
        # How steps compute (amp, amp_dtype, channels_last, compile) may change on a resume;
        # definitions recorded before they were left out still hold them. A key added to
        # Config since the experiment started had its default then: an upgrade is no change.
        added = json.loads(json.dumps({k: v for k, v in Config().to_dict().items() if k not in old.get("config", {})}))
        old["config"] = {k: v for k, v in {**added, **old.get("config", {})}.items() if k not in Config.RUNTIME_KEYS}
        if "num_samples" not in definition:
            old.pop("num_samples", None)   # a study's trial count is not its definition (see sweep.py)
        changed = differences(old, json.loads(json.dumps(definition, default=str)))
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            hint = ("rerun the command it started with, or use another --name for a new one" +
                    ("; a grid's seeds are part of it" if any(c.startswith("num_samples ") for c in changed) else ""))
            raise ConfigError(f"--resume of '{self.run_name}': not the same experiment, it differs in {shown}; {hint}")
        before = recorded.get("num_samples", recorded["definition"].get("num_samples"))
        if num_samples is None or before is None or num_samples == int(before):
            return
        if num_samples < int(before):
            raise ConfigError(f"--num-samples {num_samples}: sweep '{self.run_name}' has {before} trials per "
                              f"category; it can be extended (--num-samples {before} or more), not shrunk")
        print(f"resume: --num-samples {before} -> {num_samples}: {num_samples - int(before)} more trial(s) for "
              f"each of {len(self.categories)} categories, in the same studies", flush=True)

    def record_definition(self, definition: Mapping[str, Any], code: str, num_samples: int | None = None) -> None:
        """Written once, when the experiment starts (``code``, the commit, for information only:
        a resume on newer code is allowed); ``num_samples``, a study sweep's trials per
        category, is rewritten when a resume extends it."""
        recorded = self.recorded() if self.definition_path.is_file() else None
        if recorded is not None and (num_samples is None or recorded.get("num_samples") == num_samples):
            return
        recorded = recorded or {"definition": definition, "code": code}
        if num_samples is not None:
            recorded["num_samples"] = num_samples
        text = json.dumps(recorded, indent=1, sort_keys=True, default=str)
        self.experiment_path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.definition_path, lambda fh: fh.write(text.encode()))

    def config_for(self, category: str, config: Config | None = None) -> Config:
        """``config`` (default ``base``) with the category's own values applied."""
        return (config or self.base).replace(**self.per_category.get(category, {}))

    def trial_spec(self, config: Config | None = None,
                   category_values: Mapping[str, Mapping[str, Any]] | None = None,
                   tune_metrics: Sequence[str] | None = None,
                   scoring_options: Mapping[str, Sequence[Any]] | None = None) -> TrialSpec:
        """What the trials receive: ``config`` (default ``base``) for every category, then
        ``category_values`` and the plan's --category-set values (those win) per category;
        ``tune_metrics`` (default the plan's metric): what Tune gets as numbers;
        ``scoring_options``: what each searched trial chooses among after training."""
        values = {c: {**(category_values or {}).get(c, {}), **self.per_category.get(c, {})} for c in self.categories}
        return TrialSpec(data=self.data, resources=self.resources, base_config=config or self.base,
                         tune_name=self.run_name, storage_path=self.storage_path,
                         category_values={c: v for c, v in values.items() if v},
                         tune_metrics=tuple(tune_metrics or (self.metric,)),
                         scoring_options={k: tuple(v) for k, v in (scoring_options or {}).items()})

    def fingerprints(self) -> dict[str, str]:
        """Each category's training-data fingerprint (tags on runs and model versions). Each
        category's selection split is made here too (file names only, no decoding): a
        ``val_ratio`` that leaves a part without a good and an anomalous image fails in one
        line before anything starts, not in every trial (it was each trial's error, exit 5)."""
        from pouta_core.data import read_split
        from pouta_core.data.validation import split_for_selection

        for c in self.categories:
            config = self.config_for(c)
            split_for_selection(read_split(self.data.root, self.data.dataset, c), self.data.root, config.val_split,
                                config.val_ratio, where=f"{self.data.root} [{c}]")
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
    for config in map(plan.config_for, plan.categories):
        if config.checkpoint_every % config.eval_every:   # spec.checkpoint_cadence rounds it up
            log.warning("checkpoint_every=%d is not a multiple of eval_every=%d: trials checkpoint at the next "
                        "evaluation after each (a checkpoint travels with an evaluation's report; the trial "
                        "runs log the value used)", config.checkpoint_every, config.eval_every)
            break


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
