"""What a sweep tries and what it stops: the search space turned into Optuna distributions (or
a Tune grid), one seeded Optuna study per category in RDB storage, and ASHA per category.

All categories run in one Tune experiment: one search and one early-stopping scheduler per
category behind a single searcher and scheduler, so the studies of every category share the
cluster's trial slots (a slot freed by one category goes to whichever study has work left)
while no category's trials are ever compared with another's.
"""

from __future__ import annotations

import logging
import pickle
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.spec import SAMPLED, Resources
from pouta_core.config import Config, ConfigError
from search_spaces import SearchSpace

log = logging.getLogger(__name__)


class _PickledState:
    """Tune saves searchers and schedulers with its experiment state: the whole object, pickled."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class CategorySearch(_PickledState, Searcher):
    """``searchers[category]`` proposes that category's trials; ``budget[category]`` trials
    each. The next trial goes to the category with the fewest trials started so far, so the
    studies advance together and none waits for another to finish."""

    def __init__(self, searchers: dict[str, Searcher], budget: dict[str, int], metric: Any, mode: Any,
                 epochs: Mapping[str, int] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.budget = dict(budget)
        self.started = dict.fromkeys(budget, 0)
        self.category_of: dict[str, str] = {}   # Tune trial id -> category
        self.epochs = dict(epochs or {})        # category -> its config's epochs (unless sampled)
        self.epochs_of: dict[str, int] = {}     # Tune trial id -> the epochs it was to train

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True   # every per-category searcher was built with its metric, mode and space

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.category_of:   # asked again for a trial it already placed
            category = self.category_of[trial_id]
            return {"category": category, **(self.searchers[category].suggest(trial_id) or {})}
        open_categories = [c for c in self.budget if self.started[c] < self.budget[c]]
        if not open_categories:
            return Searcher.FINISHED
        for category in sorted(open_categories, key=lambda c: self.started[c]):
            params = self.searchers[category].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                continue
            self.started[category] += 1
            self.category_of[trial_id] = category
            if category in self.epochs:
                self.epochs_of[trial_id] = int(params.get(SAMPLED, {}).get("epochs", self.epochs[category]))
            return {"category": category, **params}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.category_of:
            return
        try:
            self.searchers[self.category_of[trial_id]].on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # A driver killed after the study recorded the trial's end but before Tune saved its
            # state: the restored trial reports again; the study already has its final value.
            log.info("trial %s: its Optuna trial is already finished; result not reported again", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.category_of:
            return
        searcher = self.searchers[self.category_of[trial_id]]
        if not error and result and self._stopped_early(trial_id, result) and _prune(searcher, trial_id):
            return
        searcher.on_trial_complete(trial_id, result, error)

    def _stopped_early(self, trial_id: str, result: dict) -> bool:
        """Ended before its own ``epochs`` without an error: ASHA stopped it."""
        target = self.epochs_of.get(trial_id)
        return target is not None and result.get("epoch") is not None and result["epoch"] < target


def _prune(searcher: Searcher, trial_id: str) -> bool:
    """Tell a single-objective Optuna study that ``trial_id`` was pruned (its intermediate values,
    one per report, are already in the study) -> done. Ray's ``OptunaSearch`` tells every trial
    that ends with a value COMPLETE, so an ASHA-stopped trial's early value counted as a final
    one: TPE learned that short training scores low. *Decision*: the study and its trials are
    ``OptunaSearch``'s own attributes (``_ot_study``, ``_ot_trials``, ``_completed_trials``) in
    Ray 2.60; a searcher without them is told as before."""
    from optuna.trial import TrialState

    study, trials = getattr(searcher, "_ot_study", None), getattr(searcher, "_ot_trials", None)
    if study is None or not isinstance(trials, dict) or trial_id not in trials or isinstance(searcher.metric, list):
        return False
    try:
        study.tell(trials[trial_id], state=TrialState.PRUNED)
    except UpdateFinishedTrialError:
        pass   # told before a driver restart: the study has it already
    searcher._completed_trials.add(trial_id)
    return True


class PerCategoryScheduler(_PickledState, FIFOScheduler):
    """A scheduler per category (``make(category)``, e.g. ASHA), fed only that category's
    trials: a weak trial is stopped against its own category's rungs. Trials start in FIFO
    order, as the per-category searchers proposed them."""

    def __init__(self, make: Callable[[str], TrialScheduler], categories: list[str]) -> None:
        super().__init__()
        self.schedulers = {c: make(c) for c in categories}

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[trial.config["category"]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        return all(ok)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{c}: {s.debug_string()}" for c, s in self.schedulers.items())


@dataclass(frozen=True)
class SweepSearch:
    """What a sweep hands Tune: the param space, how many trials, the searcher and scheduler,
    and the Optuna study of each category (none for a grid)."""

    param_space: dict[str, Any]
    num_samples: int
    search_alg: Searcher | None
    scheduler: TrialScheduler | None
    storage_url: str | None
    studies: dict[str, str]


def sweep_search(space: SearchSpace, configs: Mapping[str, Config], objectives: list[tuple[str, str]], *,
                 run_name: str, seed: int, num_samples: int, scheduler: str, storage_url: str,
                 resume: bool) -> SweepSearch:
    """One Optuna study per category (``<run_name>-<category>``, seeded per category), or every
    grid point of every category for a grid space, once per seed; ASHA per category on
    ``configs``' epochs when ``scheduler`` is ``asha``.

    *Decision*: for a grid, ``num_samples`` is the number of seeds (``seed``, ``seed + 1``,
    ...): a grid point trained twice with one seed is the same trial twice, while the spread
    over seeds is what tells two variants apart (the paper's Table 4)."""
    categories = list(configs)
    stopper = asha(configs, space) if scheduler == "asha" else None
    if space.has_grid:
        points = grid_space(space)
        if "seed" not in points:   # a space that searches the seed itself keeps its values
            points["seed"] = tune.grid_search([seed + i for i in range(num_samples)])
        return SweepSearch({"category": tune.grid_search(categories), SAMPLED: points}, 1, None, stopper, None, {})
    studies = {c: f"{run_name}-{c}" for c in categories}
    searchers = {c: optuna_search(space, objectives, storage_url, studies[c],
                                  # One seeded sampler per category: categories do not all try the same points.
                                  zlib.crc32(f"{seed}:{c}".encode()), resume) for c in categories}
    search = CategorySearch(searchers, dict.fromkeys(categories, num_samples), **metric_and_mode(objectives),
                            epochs={c: configs[c].epochs for c in categories} if scheduler == "asha" else None)
    return SweepSearch({}, num_samples * len(categories), search, stopper, storage_url, studies)


def metric_and_mode(objectives: list[tuple[str, str]]) -> dict[str, Any]:
    """A searcher's ``metric`` and ``mode``: names for one objective, lists for several."""
    metrics, modes = [k for k, _ in objectives], [m for _, m in objectives]
    one = len(objectives) == 1
    return {"metric": metrics[0] if one else metrics, "mode": modes[0] if one else modes}


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
            # Optuna's categorical values are scalars: lists travel as "yaml:" strings
            # (decoded by :func:`orchestrator.spec.decode_sampled`).
            out[key] = od.CategoricalDistribution(
                [f"yaml:{yaml.safe_dump(v, default_flow_style=True).strip()}" if isinstance(v, list) else v
                 for v in d.values])
    return out


def grid_point(space: SearchSpace) -> Callable[[dict[str, Any]], str]:
    """A trial's row -> its grid point (the grid's values, not the seed), as a string."""
    import json

    keys = [d.key for d in space.dimensions if d.distribution == "grid" and d.key != "seed"]
    return lambda row: json.dumps([row["config"].get(SAMPLED, {}).get(k) for k in keys], default=str)


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


RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def check_study_storage(url: str) -> str:
    """``--study-storage`` is a database URL Optuna's RDB storage opens (SQLAlchemy's form)."""
    scheme = url.partition("://")[0].partition("+")[0]
    if "://" not in url or scheme not in RDB_SCHEMES:
        raise ConfigError(f"--study-storage {url}: expected a database URL (sqlite:///path.db, "
                          "postgresql://user@host/db, mysql://...)")
    return url


def default_study_storage(storage_path: str) -> str:
    path = Path(storage_path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def epoch_range(space: SearchSpace, config: Config) -> tuple[int, int]:
    """The fewest and the most epochs a trial of ``config`` can train: ``config.epochs``, or the
    range of ``epochs`` when the space searches it."""
    searched = next((d for d in space.dimensions if d.key == "epochs"), None)
    if searched is None:
        return config.epochs, config.epochs
    values = [int(v) for v in searched.extremes()]
    return min(values), max(values)


def asha(configs: Mapping[str, Config], space: SearchSpace) -> PerCategoryScheduler:
    """ASHA per category (a pills trial is never stopped for being worse than a tiles trial),
    its rungs on each category's own epochs. When the space searches ``epochs``, ``max_t`` is
    the most it can sample, so no trial is cut at the base config's length (a 800-epoch trial
    of ``full.yaml`` was stopped at the paper preset's 600 while ``-best.yaml`` said 800), and
    the grace period is a quarter of the fewest."""
    from ray.tune.schedulers import ASHAScheduler

    def make(category: str) -> ASHAScheduler:
        fewest, most = epoch_range(space, configs[category])
        eval_every = configs[category].eval_every
        return ASHAScheduler(time_attr="epoch", max_t=most, grace_period=min(fewest, max(eval_every, fewest // 4)),
                             reduction_factor=2)

    return PerCategoryScheduler(make, list(configs))


def optuna_search(space: SearchSpace, objectives, storage_url: str, study_name: str, seed: int, resume: bool):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(storage_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if study_name in existing and not resume:
        raise ConfigError(f"optuna study '{study_name}' already exists in {storage_url}; pass --resume to "
                          "continue it or --name to start another")
    return OptunaSearch(space=optuna_space(space), **metric_and_mode(objectives),
                        # constant_liar (Optuna 5's default, said here): trials running at once
                        # count as bad guesses at their points, so TPE does not propose them again.
                        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True), storage=storage,
                        study_name=study_name)


def fail_dangling_optuna_trials(search: SweepSearch) -> None:
    """After a finished sweep no Optuna trial may stay RUNNING: one asked for by a driver that
    died before Tune saved the trial it belonged to is marked FAIL (it never ran to the end)."""
    if search.storage_url is None:
        return
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(search.storage_url)
    for name in search.studies.values():
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("optuna study %s: trial %d was left RUNNING by an interrupted driver; marked FAIL",
                        name, trial.number)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def trials_at_once(resources: Resources, cluster: Mapping[str, float]) -> int:
    """How many trials of ``resources.workers`` workers the ``cluster`` resources hold at once
    (at least one: a trial that fits nowhere is the watchdog's to report)."""
    per_worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    need = {k: v * resources.workers for k, v in per_worker.items() if v > 0}
    return max(1, min(int(cluster.get(k, 0.0) // v) for k, v in need.items()))


def trial_slots(resources: Resources, max_concurrent: int) -> int | None:
    """Tune's ``max_concurrent_trials``: ``--max-concurrent``; else, for trials of several
    workers, what the cluster holds now; else None (as the trials' resources allow).

    *Decision* (issue 27): a trial of several workers reserves nothing for itself (its
    workers do, once started), so Tune started every trial at once: Optuna proposed all of
    them before any result and queued Train runs failed on worker-group start timeouts. The
    bound counts GPUs, else CPUs, over workers x per-worker need; on an autoscaling cluster
    that will grow, pass --max-concurrent."""
    if max_concurrent:
        return max_concurrent
    if resources.workers == 1:
        return None
    n = trials_at_once(resources, ray.cluster_resources())
    log.warning("--max-concurrent not set for trials of %d workers: %d trial(s) at once, what the cluster "
                "holds now", resources.workers, n)
    return n
