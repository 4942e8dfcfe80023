"""All categories in one Tune experiment: one search and one early-stopping scheduler per
category behind a single searcher and scheduler, so the studies of every category share the
cluster's trial slots (a slot freed by one category goes to whichever study has work left)
while no category's trials are ever compared with another's.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

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

    def __init__(self, searchers: dict[str, Searcher], budget: dict[str, int], metric: Any, mode: Any) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.budget = dict(budget)
        self.started = dict.fromkeys(budget, 0)
        self.category_of: dict[str, str] = {}   # Tune trial id -> category

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
        if trial_id in self.category_of:
            self.searchers[self.category_of[trial_id]].on_trial_complete(trial_id, result, error)


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
