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
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher, SearchGenerator

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

    def extend(self, budget: Mapping[str, int]) -> int:
        """Raise each category's budget to ``budget`` (never lower it) -> trials added."""
        added = 0
        for category, n in budget.items():
            more = max(0, n - self.budget.get(category, 0))
            if more:
                self.budget[category] = n
                self.started.setdefault(category, 0)
                added += more
        return added

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


class SlotLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` that also forwards the results of trials it did not start:
    those of an experiment restored from a state saved without a limiter (or by an older
    version), which Tune requeues as they were. Ray's drops them, and the study never learns."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live_trials or not self._limit_concurrency:
            super().on_trial_result(trial_id, result)
        else:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials or not self._limit_concurrency:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


class StudyTrials(SearchGenerator):
    """The sweep's trials for Tune: :class:`CategorySearch` (behind a :class:`SlotLimiter` when
    ``max_concurrent``), whose restore keeps what *this* command asks for.

    Tune restores a searcher's wrappers and counters from the experiment's folder, so on
    ``--resume`` a new ``--max-concurrent`` was overwritten by the saved limiter's and a
    larger ``--num-samples`` by the saved trial count (the generator then said "finished").
    *Decision*: the command's budget per category and slot count are re-applied after the
    restore: a larger budget extends the same studies in the same Tune experiment (the
    summary covers every trial); a smaller one is refused by the command before this."""

    def __init__(self, search: CategorySearch, max_concurrent: int | None) -> None:
        super().__init__(SlotLimiter(search, max_concurrent) if max_concurrent else search)
        self.search, self.max_concurrent = search, max_concurrent or 0

    def restore_from_dir(self, dirpath: str) -> None:
        budget, slots = dict(self.search.budget), self.max_concurrent
        super().restore_from_dir(dirpath)     # the saved counters, studies, budget and slots
        self.max_concurrent = slots
        if isinstance(self.searcher, ConcurrencyLimiter):
            self.searcher.max_concurrent = slots
        added = self.search.extend(budget)
        self._total_samples = sum(self.search.budget.values())
        if added:
            self._finished = False
            log.info("resume: %d more trial(s) added to the studies", added)


class GridTrials(BasicVariantGenerator):
    """Tune's generator of grid (and launch) trials, whose restore keeps this command's
    ``--max-concurrent`` (Tune's restores the saved one)."""

    def restore_from_dir(self, dirpath: str) -> None:
        slots = self.max_concurrent
        super().restore_from_dir(dirpath)
        self.max_concurrent = slots


def trial_generator(search: Searcher | None, max_concurrent: int | None) -> SearchAlgorithm:
    """What a command hands Tune as ``search_alg`` (with ``max_concurrent_trials`` unset: the
    bound lives here, where a resume can change it)."""
    if search is None:
        return GridTrials(max_concurrent=max_concurrent or 0)
    assert isinstance(search, CategorySearch), search
    return StudyTrials(search, max_concurrent)


def slots_of(search_alg: Any) -> int:
    """The trial bound a (restored) Tune search algorithm holds; 0 for none."""
    return int(getattr(search_alg, "max_concurrent", 0) or 0)


def restored(trial) -> bool:
    """A trial of a restored experiment that had reported before (a new one has not)."""
    return "training_iteration" in trial.run_metadata.last_result


def repair_checkpoint(trial) -> str | None:
    """Point a restored ``trial`` at a checkpoint that exists -> what was done, or None.

    Tune removes a trial's checkpoints beyond ``num_to_keep`` as new ones are registered, and
    saves the experiment state naming the latest only every few seconds: a driver killed in
    between restored a trial whose recorded checkpoint was gone, Tune refused to restore it,
    and every retry failed the same way (the trial ended ERROR). *Decision*: the trial
    continues from the newest checkpoint in its folder (Ray numbers them), or, when there is
    none, starts over; either way the driver says so. The checkpoint manager's
    ``_latest_checkpoint_result`` and ``_checkpoint_results`` are Ray 2.60's attributes."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    if latest is None:
        return None
    fs, recorded = latest.checkpoint.filesystem, latest.checkpoint.path.rstrip("/")
    if fs.get_file_info(recorded).type == pafs.FileType.Directory:
        return None
    folder, name = posixpath.split(recorded)
    on_disk = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    manager._checkpoint_results = [_TrainingResult(checkpoint=Checkpoint(p, filesystem=fs), metrics=latest.metrics)
                                   for p in on_disk]
    manager._latest_checkpoint_result = manager._checkpoint_results[-1] if on_disk else None
    if on_disk:
        return f"its recorded checkpoint {name} is gone; continuing from {posixpath.basename(on_disk[-1])}"
    return f"its recorded checkpoint {name} is gone and none is left; starting over"


class ResumingScheduler(FIFOScheduler):
    """Tune's FIFO scheduler that repairs a restored trial's checkpoint as Tune adds it
    (:func:`repair_checkpoint`). Every command's Tune experiment has one."""

    def on_trial_add(self, tune_controller, trial) -> None:
        if restored(trial):
            note = repair_checkpoint(trial)
            if note:
                log.warning("trial %s: %s", trial.trial_id, note)
                print(f"resume: trial {trial.trial_id}: {note}", flush=True)
        super().on_trial_add(tune_controller, trial)


class PerCategoryScheduler(_PickledState, ResumingScheduler):
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
        super().on_trial_add(tune_controller, trial)
        scheduler = self._of(trial)
        scheduler.on_trial_add(tune_controller, trial)
        if restored(trial):
            replay_rungs(scheduler, trial, trial_history(trial))

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


def trial_history(trial) -> list[dict]:
    """Every result ``trial`` reported, in order, from its ``result.json`` in the experiment's
    storage (local or remote, through the trial's storage filesystem); [] when unreadable."""
    import json
    import posixpath

    try:
        with trial.storage.storage_filesystem.open_input_stream(posixpath.join(trial.path, "result.json")) as fh:
            text = fh.readall().decode()
    except (OSError, RuntimeError, AttributeError, TypeError):   # RuntimeError: a trial without a folder
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue   # a line cut by a driver killed while writing it
    return rows


def replay_rungs(scheduler: TrialScheduler, trial, history: list[dict]) -> None:
    """Record a restored trial's past results in its ASHA bracket, as they were when reported.

    *Decision*: Tune 2.60 saves the searcher, never the scheduler; a resumed sweep's ASHA
    started with empty rungs, so every trial reaching a rung first after the resume continued,
    however weak. Rebuilt here from each restored trial's results: ASHA's bracket
    (``_trial_info``, ``_metric``, ``_metric_op``, ``_time_attr``, Ray 2.60's attributes) records
    the first value at or past each milestone; its decisions are not replayed (the trial's
    status is what the saved experiment says)."""
    info = getattr(scheduler, "_trial_info", None)
    if not isinstance(info, dict) or trial.trial_id not in info:
        return
    bracket, time_attr, metric, op = info[trial.trial_id], scheduler._time_attr, scheduler._metric, scheduler._metric_op
    for row in history:
        if row.get(time_attr) is not None and row.get(metric) is not None:
            bracket.on_result(trial, row[time_attr], op * row[metric])


@dataclass(frozen=True)
class SweepSearch:
    """What a sweep hands Tune: the param space, how many trials, the searcher and scheduler,
    and the Optuna study of each category (none for a grid)."""

    param_space: dict[str, Any]
    num_samples: int
    search_alg: Searcher | None
    scheduler: TrialScheduler
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
    stopper = asha(configs, space) if scheduler == "asha" else ResumingScheduler()
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
