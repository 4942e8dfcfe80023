"""``pouta sweep``: one Optuna study per category (Ray Tune + OptunaSearch, seeded sampler,
RDB storage), every trial a Ray Train run, ASHA stopping weak trials on the reported
validation metric. All categories run in one Tune experiment and share its trial slots
(orchestrator/execution/scheduling.py). Grid spaces (``ablation.yaml``) run every grid point of every
category instead of a study."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from orchestrator import tracking
from orchestrator.execution.cluster import init_ray
from orchestrator.execution.results import best_checkpoint_of, trial_rows
from orchestrator.execution.scheduling import CategorySearch, PerCategoryScheduler
from orchestrator.execution.tuner import check_new_or_resumed, fit, make_tuner
from orchestrator.plan import SUMMARY_METRICS, Plan, both_splits, selection_metric, warn_about_config
from orchestrator.spec import SAMPLED, decode_sampled
from orchestrator.tracking import report
from orchestrator.tracking.parent import callback, open_parent
from orchestrator.tracking.registry import register_best
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


def optuna_space(space: SearchSpace) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for d in space.dimensions:
        key = f"{SAMPLED}/{d.key}"   # Tune unflattens "/" into {"sampled": {...}}
        if d.distribution in ("uniform", "loguniform"):
            out[key] = od.FloatDistribution(float(d.low), float(d.high), log=d.distribution == "loguniform")
        elif d.distribution == "int":
            out[key] = od.IntDistribution(int(d.low), int(d.high), step=d.step or 1)
        else:
            # Optuna's categorical values are scalars: lists travel as "yaml:" strings.
            out[key] = od.CategoricalDistribution(
                [f"yaml:{yaml.safe_dump(v, default_flow_style=True).strip()}" if isinstance(v, list) else v
                 for v in d.values])
    return out


def grid_space(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in space.dimensions:
        if d.distribution == "grid":
            out[d.key] = tune.grid_search(list(d.values))
        elif d.distribution == "choice":
            out[d.key] = tune.choice(list(d.values))
        elif d.distribution == "uniform":
            out[d.key] = tune.uniform(d.low, d.high)
        elif d.distribution == "loguniform":
            out[d.key] = tune.loguniform(d.low, d.high)
        else:
            out[d.key] = tune.qrandint(d.low, d.high, d.step or 1)
    return out


def default_study_storage(storage_path: str) -> str:
    path = Path(storage_path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def pareto_front(rows: list[dict[str, Any]], objectives: list[tuple[str, str]]) -> list[dict[str, Any]]:
    ok = [r for r in rows if "error" not in r and all(r.get(k) is not None for k, _ in objectives)]

    def better_or_equal(a, b):
        return all((a[k] >= b[k]) if m == "max" else (a[k] <= b[k]) for k, m in objectives)

    return [r for r in ok if not any(better_or_equal(o, r) and o is not r and
                                     any(o[k] != r[k] for k, _ in objectives) for o in ok)]


def check_category_sets(plan: Plan, space: SearchSpace) -> None:
    """A --category-set value for a key the space searches would be overwritten in every trial."""
    for category, values in plan.per_category.items():
        searched = sorted(set(values) & set(space.keys))
        if searched:
            raise ConfigError(f"--category-set {category}:{searched[0]}: {space.path.name} searches this key")


def run_sweep(plan: Plan, space: SearchSpace, *, num_samples: int, scheduler: str | None,
              study_storage: str | None, resume: bool, objectives: list[tuple[str, str]],
              best_out: str | None = None) -> dict[str, Any]:
    """Search every category at once in one Tune experiment: one Optuna study (or grid) and one
    ASHA per category, all sharing ``plan.max_concurrent`` trial slots. -> summary per category."""
    multi = len(objectives) > 1
    scheduler = scheduler or ("none" if multi else "asha")
    if multi and scheduler == "asha":
        raise ConfigError("--scheduler asha stops trials on one metric; use --scheduler none with --objectives")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    check_category_sets(plan, space)
    check_new_or_resumed(plan, resume)
    base = plan.base.replace(**space.fixed)
    storage_url = study_storage or default_study_storage(plan.storage_path)
    search_alg = None if space.has_grid else _category_search(plan, space, objectives, storage_url, num_samples,
                                                              resume)
    init_ray(plan)
    fingerprints = plan.fingerprints()
    client, _, parent_id, parent_key = open_parent(plan, "sweep", {"search_space": space.path.name})
    warn_about_config(plan)
    tracking.log_params(client, parent_id, {"search_space": space.path.name, "num_samples": num_samples,
                                            "scheduler": scheduler,
                                            "objectives": ",".join(f"{k}:{m}" for k, m in objectives)})
    spec = plan.trial_spec(base)
    cb = callback(plan, spec, parent_id, parent_key, fingerprints)
    metric, mode = objectives[0]
    if space.has_grid:
        param_space: dict[str, Any] = {"category": tune.grid_search(plan.categories), SAMPLED: grid_space(space)}
        samples = num_samples
    else:
        param_space, samples = {}, num_samples * len(plan.categories)
    tune_config = tune.TuneConfig(
        metric=None if multi else metric, mode=None if multi else mode, search_alg=search_alg,
        scheduler=_asha(plan, base) if scheduler == "asha" else None, num_samples=samples,
        max_concurrent_trials=plan.max_concurrent or None,
        # A finished trial's process takes the next trial: no new process, no second import
        # of torch (measured: a 19 s gap between waves of 8 trials on this 2-core machine).
        reuse_actors=True)
    results = fit(make_tuner(plan, spec, param_space, tune_config, cb, resume))
    studies = {c: f"{plan.run_name}-{c}" for c in plan.categories}
    if not space.has_grid:
        _fail_dangling_optuna_trials(storage_url, list(studies.values()))
    keys = both_splits([k for k, _ in objectives] + list(SUMMARY_METRICS))
    summary = {c: _category_summary(plan, cb, c, trial_rows([r for r in results if _category(r) == c], keys),
                                    objectives, keys) for c in plan.categories}
    folder = report.folder(Path(best_out).parent if best_out else plan.storage_path, plan.run_name)
    report.publish(client, parent_id, folder, f"sweep {plan.run_name} ({space.path.name})", summary, keys,
                   storage_url=None if space.has_grid else storage_url, study_names=studies, objectives=objectives)
    tracking.finish(client, parent_id, ok=not any("error" in e for e in summary.values()))
    if best_out:
        best_configs = {c: e["config"] for c, e in summary.items() if "config" in e}
        atomic_write(Path(best_out), lambda fh: fh.write(yaml.safe_dump(best_configs, sort_keys=False).encode()))
    return summary


def _category(result) -> str | None:
    return result.config.get("category") if result.config else None


def _asha(plan: Plan, base) -> PerCategoryScheduler:
    """ASHA per category (a pills trial is never stopped for being worse than a tiles trial)."""
    from ray.tune.schedulers import ASHAScheduler

    def make(category: str) -> ASHAScheduler:
        config = plan.config_for(category, base)
        epochs, eval_every = config.epochs, config.eval_every
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(epochs, max(eval_every, epochs // 4)),
                             reduction_factor=2)

    return PerCategoryScheduler(make, plan.categories)


def _category_summary(plan: Plan, cb, category: str, rows: list[dict[str, Any]],
                      objectives: list[tuple[str, str]], keys: list[str]) -> dict[str, Any]:
    """The category's trials, its best by the first objective (registered as challenger), and
    the Pareto front for several objectives."""
    metric, mode = objectives[0]
    entry: dict[str, Any] = {"trials": rows}
    if len(objectives) > 1:
        entry["pareto"] = pareto_front(rows, objectives)
    best = best_checkpoint_of(rows, metric, mode)
    if best is None:
        return {**entry, "error": "no trial finished with a checkpoint"}
    sampled = best["config"].get(SAMPLED, {})
    config = cb.spec.config_for(category, sampled)   # exactly what the trial trained with
    model_name, version = register_best(plan, cb, category, best["trial_id"], best["checkpoint"],
                                           searched=decode_sampled(sampled), kind="sweep")
    return {**entry, "best": {k: best.get(k) for k in ["trial_id", "epoch", *keys]}, "config": config.to_dict(),
            "registered_model": model_name, "version": version}


def _category_search(plan: Plan, space: SearchSpace, objectives, storage_url: str, num_samples: int,
                     resume: bool) -> CategorySearch:
    searchers = {}
    for category in plan.categories:
        # One seeded sampler per category, so categories do not all try the same points.
        seed = zlib.crc32(f"{plan.base.seed}:{category}".encode())
        searchers[category] = _optuna_search(space, objectives, storage_url, f"{plan.run_name}-{category}", seed,
                                             resume)
    metrics, modes = [k for k, _ in objectives], [m for _, m in objectives]
    one = len(objectives) == 1
    return CategorySearch(searchers, dict.fromkeys(plan.categories, num_samples),
                          metric=metrics[0] if one else metrics, mode=modes[0] if one else modes)


def _fail_dangling_optuna_trials(storage_url: str, study_names: list[str]) -> None:
    """After a finished sweep no Optuna trial may stay RUNNING: one asked for by a driver that
    died before Tune saved the trial it belonged to is marked FAIL (it never ran to the end)."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(storage_url)
    for name in study_names:
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("optuna study %s: trial %d was left RUNNING by an interrupted driver; marked FAIL",
                        name, trial.number)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _optuna_search(space: SearchSpace, objectives, storage_url: str, study_name: str, seed: int, resume: bool):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(storage_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if study_name in existing and not resume:
        raise ConfigError(f"optuna study '{study_name}' already exists in {storage_url}; pass --resume to "
                          "continue it or --name to start another")
    metrics = [k for k, _ in objectives]
    modes = [m for _, m in objectives]
    return OptunaSearch(space=optuna_space(space), metric=metrics if len(metrics) > 1 else metrics[0],
                        mode=modes if len(modes) > 1 else modes[0],
                        sampler=optuna.samplers.TPESampler(seed=seed), storage=storage, study_name=study_name)
