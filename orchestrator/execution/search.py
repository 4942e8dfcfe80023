"""The sweep's one searcher: each category's Optuna study behind a single Tune ``Searcher``,
each study led by the category's default trial and followed by its confirmation round.

A category's trials come in three kinds, in this order:

1. its **default** (issue 30): the base config, the preset's values of the searched keys;
2. its **searched** trials, ``--num-samples`` of them, proposed by its Optuna study;
3. its **confirmation** trials (issue 30, part 2): once every searched trial has ended, the
   ``--finalists`` best searched trials that trained to their end (by the first objective, on
   validation) and the default are each trained again on ``--confirm-seeds`` fresh seeds, with
   nothing else changed. :mod:`orchestrator.execution.reference` ranks the finalists by their
   mean over the fresh seeds and compares the first with the default.

Only the searched trials are Optuna's: TPE neither proposed nor learns from the others.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search import Searcher

from orchestrator.execution.results import SCORING, scoring_of
from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL, SAMPLED

log = logging.getLogger(__name__)

# Confirmation seed k (1, 2, ...) of a category whose config has seed s is s + k * SEED_STEP:
# far from the seeds a space searches (``seed`` ranges are small), the same for every candidate.
SEED_STEP = 1000


@dataclass(frozen=True)
class Confirmation:
    """``finalists`` searched trials and the default, each trained again on ``seeds`` fresh
    seeds; 0 for either turns the round off."""

    finalists: int = 2   # measured: docs/experiments.md, "the confirmation round"
    seeds: int = 2

    @property
    def on(self) -> bool:
        return self.finalists > 0 and self.seeds > 0

    def most(self) -> int:
        """The most confirmation trials a category can get."""
        return (self.finalists + 1) * self.seeds if self.on else 0


def confirmation_seed(seed: int, k: int) -> int:
    return seed + k * SEED_STEP


class _PickledState:
    """Tune saves a searcher with its experiment state (never a scheduler): the whole object, pickled."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class CategorySearch(_PickledState, Searcher):
    """``searchers[category]`` proposes that category's trials; ``budget[category]`` trials
    each (the default and the searched ones). The next trial goes to the category with the
    fewest trials started so far, so the studies advance together and none waits for another to
    finish; a category whose search has ended starts its confirmation trials as slots free up.

    The default counts in the budget (``--num-samples`` searched trials + 1); confirmation trials
    do not (at most :meth:`Confirmation.most` more per category, :meth:`total`). A category's
    confirmation starts once all its default and searched trials have ended: the finalists are
    known only then. A budget extended on ``--resume`` searches on, and finalists that were not
    confirmed yet get their seeds then (no trial is confirmed twice)."""

    def __init__(self, searchers: dict[str, Searcher], budget: dict[str, int], metric: Any, mode: Any,
                 epochs: Mapping[str, int] | None = None, default_trials: bool = True,
                 confirmation: Confirmation | None = None, seeds: Mapping[str, int] | None = None,
                 reference: Mapping[str, Any] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.budget = dict(budget)
        self.started = dict.fromkeys(budget, 0)
        self.category_of: dict[str, str] = {}   # Tune trial id -> category (default and searched trials)
        self.epochs = dict(epochs or {})        # category -> its config's epochs (unless sampled)
        self.epochs_of: dict[str, int] = {}     # Tune trial id -> the epochs it was to train
        # Categories whose default trial has not started; an experiment restored from before
        # default trials keeps this (the restored state has no such key) and gets its defaults.
        self.defaults_pending = set(budget) if default_trials else set()
        self.defaults: dict[str, str] = {}      # Tune trial id -> category, of default trials
        self.reference = dict(reference or {})  # the space's own reference point, else {}: the base config
        # Confirmation (several objectives have no single ranking: no round).
        multi = isinstance(metric, list)
        self.confirmation = Confirmation(0, 0) if multi or not default_trials else (confirmation or Confirmation())
        self.seeds = dict(seeds or {})          # category -> its config's seed
        self.params: dict[str, dict[str, Any]] = {}          # Tune trial id -> its params (no category)
        self.ended: dict[str, float | None] = {}             # Tune trial id -> its value (None: not a finalist)
        self.confirming: dict[str, tuple[str, str, int]] = {}   # Tune trial id -> (category, of trial, k)
        self.confirmed: set[tuple[str, int]] = set()          # (of trial, k) started
        self.scoring: dict[str, dict[str, Any]] = {}          # Tune trial id -> scoring it chose after training

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True   # every per-category searcher was built with its metric, mode and space

    def restore(self, checkpoint_path: str) -> None:
        """The saved state, as Tune saved it. One saved before confirmation rounds existed does
        not know which of its trials ended: its experiment goes on without a round."""
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        if "ended" not in state:
            if self.confirmation.on:
                log.warning("resume: this experiment was started before confirmation rounds; it has none")
            state["confirmation"], state["roundless"] = Confirmation(0, 0), True
        self.__dict__.update(state)

    def reconfigure(self, confirmation: Confirmation, seeds: Mapping[str, int]) -> None:
        """After a restore: this command's ``--finalists``/``--confirm-seeds`` (more seeds add
        trials; fewer start no more), unless the restored state cannot have a round."""
        if not getattr(self, "roundless", False):
            self.confirmation = confirmation
        self.seeds = {**self.seeds, **seeds}

    def total(self) -> int:
        """Tune's trial count: every budget, and the most confirmation trials each category can
        still start (a category that needs fewer says FINISHED when it is done)."""
        return sum(self.budget.values()) + len(self.confirming) + self.confirmation.most() * len(self.budget)

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.confirming:      # asked again for a trial it already placed
            return self._confirmation_config(trial_id)
        if trial_id in self.defaults:
            return {"category": self.defaults[trial_id], **self._default_params()}
        if trial_id in self.category_of:
            category = self.category_of[trial_id]
            return {"category": category, **(self.searchers[category].suggest(trial_id) or {})}
        waiting = False
        for category in sorted(self.budget, key=lambda c: self.started[c]):
            if self.started[category] >= self.budget[category]:
                jobs = self.confirmation_jobs(category)
                if jobs:
                    return self._start_confirmation(trial_id, category, *jobs[0])
                waiting = waiting or self._searching(category)
                continue
            if category in self.defaults_pending:
                self.defaults_pending.discard(category)
                self.defaults[trial_id] = category
                params = self._default_params()
            else:
                params = self.searchers[category].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                waiting = waiting or params is None
                continue
            self.started[category] += 1
            self.category_of[trial_id] = category
            self.params[trial_id] = params
            if category in self.epochs:
                self.epochs_of[trial_id] = int(params.get(SAMPLED, {}).get("epochs", self.epochs[category]))
            return {"category": category, **params}
        return None if waiting else Searcher.FINISHED

    def _default_params(self) -> dict[str, Any]:
        return {SAMPLED: dict(getattr(self, "reference", {})), DEFAULT_TRIAL: True}

    def _searching(self, category: str) -> bool:
        """Trials of the category's default and search have not all ended: its finalists are not
        known yet (and a confirmation round will follow when on)."""
        mine = [t for t, c in self.category_of.items() if c == category]
        return self.confirmation.on and any(t not in self.ended for t in mine)

    def finalists(self, category: str) -> list[str]:
        """The category's best searched trials that trained to their end, best first."""
        values = [(v, t) for t, c in self.category_of.items() if c == category and t not in self.defaults
                  and (v := self.ended.get(t)) is not None]
        values.sort(key=lambda vt: vt[0], reverse=self.mode == "max")
        return [t for _, t in values[:self.confirmation.finalists]]

    def confirmation_jobs(self, category: str) -> list[tuple[str, int]]:
        """(trial to train again, seed number) not started yet; none while the search runs."""
        if not self.confirmation.on or self.started[category] < self.budget[category] or self._searching(category):
            return []
        default = next((t for t, c in self.defaults.items() if c == category), None)
        finalists = self.finalists(category)
        if default is None or self.ended.get(default) is None or not finalists:
            return []   # no default, or no searched trial, that trained to its end: nothing to compare
        return [(t, k) for t in [default, *finalists]
                for k in range(1, self.confirmation.seeds + 1) if (t, k) not in self.confirmed]

    def _start_confirmation(self, trial_id: str, category: str, of: str, k: int) -> dict[str, Any]:
        self.confirmed.add((of, k))
        self.confirming[trial_id] = (category, of, k)
        if of in self.defaults and k == 1:
            log.info("%s: search ended; confirming the default and finalists %s on %d fresh seed(s) each",
                     category, ", ".join(self.finalists(category)) or "(none)", self.confirmation.seeds)
        return self._confirmation_config(trial_id)

    def _confirmation_config(self, trial_id: str) -> dict[str, Any]:
        category, of, k = self.confirming[trial_id]
        params = self.params.get(of, self._default_params() if of in self.defaults else {SAMPLED: {}})
        # The finalist's config as it ended: its sampled values and the reading it chose after training.
        chosen = getattr(self, "scoring", {}).get(of, {})   # a state saved before issue 45 has none
        sampled = {**params.get(SAMPLED, {}), **chosen, "seed": confirmation_seed(self.seeds.get(category, 0), k)}
        return {"category": category, **params, SAMPLED: sampled, CONFIRM_OF: of}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.category_of or trial_id in self.defaults:
            return
        try:
            self.searchers[self.category_of[trial_id]].on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # A driver killed after the study recorded the trial's end but before Tune saved its
            # state: the restored trial reports again; the study already has its final value.
            log.info("trial %s: its Optuna trial is already finished; result not reported again", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.confirming or trial_id not in self.category_of:
            return
        early = not error and bool(result) and self._stopped_early(trial_id, result)
        value = (result or {}).get(self.metric) if not error and not early else None
        chosen = scoring_of(result).get(SCORING) if not error and not early else None
        if chosen:
            self.scoring = {**getattr(self, "scoring", {}), trial_id: chosen}
        self.ended[trial_id] = float(value) if isinstance(value, int | float) and value == value else None
        if trial_id in self.defaults:
            return
        searcher = self.searchers[self.category_of[trial_id]]
        if early and _prune(searcher, trial_id):
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
