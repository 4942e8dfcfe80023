"""What a command hands Tune as ``search_alg``: the trial generator with the bound on trials
at once, keeping what a ``--resume`` needs that Tune forgets (the command's trial budget and
bound; Tune restores its own from the experiment folder). The schedulers:
:mod:`orchestrator.execution.schedulers`.

Each rule is stated where it is applied, with the Ray 2.60 attributes it reads or sets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher, SearchGenerator

from orchestrator.spec import Resources

log = logging.getLogger(__name__)


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
    """The sweep's trials for Tune: the sweep's ``CategorySearch`` (behind a :class:`SlotLimiter`
    when ``max_concurrent``), whose restore keeps what *this* command asks for.

    Tune restores a searcher's wrappers and counters from the experiment's folder, so on
    ``--resume`` a new ``--max-concurrent`` was overwritten by the saved limiter's and a
    larger ``--num-samples`` by the saved trial count (the generator then said "finished").
    *Decision*: the command's budget per category and slot count are re-applied after the
    restore: a larger budget extends the same studies in the same Tune experiment (the
    summary covers every trial); a smaller one is refused by the command before this. So are
    ``--finalists`` and ``--confirm-seeds`` (more seeds or finalists start more confirmation
    trials; fewer start no more)."""

    def __init__(self, search: Searcher, max_concurrent: int | None) -> None:
        super().__init__(SlotLimiter(search, max_concurrent) if max_concurrent else search)
        self.search, self.max_concurrent = search, max_concurrent or 0

    def restore_from_dir(self, dirpath: str) -> None:
        budget, slots = dict(self.search.budget), self.max_concurrent
        confirmation, seeds = self.search.confirmation, dict(self.search.seeds)
        super().restore_from_dir(dirpath)     # the saved counters, studies, budget and slots
        self.max_concurrent = slots
        if isinstance(self.searcher, ConcurrencyLimiter):
            self.searcher.max_concurrent = slots
        added = self.search.extend(budget)
        before = self.search.confirmation
        self.search.reconfigure(confirmation, seeds)
        self._total_samples = self.search.total()
        if added or self.search.confirmation != before:
            # More trials, or a confirmation round with more to do: the generator is not done.
            self._finished = False
        if added:
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
    return StudyTrials(search, max_concurrent)


def trials_at_once(resources: Resources, cluster: Mapping[str, float]) -> int:
    """How many trials of ``resources.workers`` workers the ``cluster`` resources hold at once
    (at least one: a trial that fits nowhere is the watchdog's to report)."""
    per_worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    need = {k: v * resources.workers for k, v in per_worker.items() if v > 0}
    return max(1, min(int(cluster.get(k, 0.0) // v) for k, v in need.items()))


def trial_slots(resources: Resources, max_concurrent: int) -> int:
    """Tune's bound on trials at once: ``--max-concurrent``; else what the cluster holds, at its
    autoscaler's maximum where it has one (:func:`orchestrator.execution.cluster.capacity`).

    *Decisions*: a trial of several workers reserves nothing for itself (its workers do, once
    started), so without a bound Tune started every trial at once: Optuna proposed all of them
    before any result and queued Train runs failed on worker-group start timeouts (issue 27).
    And without a limiter Tune keeps *one* trial pending for a custom searcher
    (``tune_controller._get_max_pending_trials``), so an autoscaler saw demand for one GPU at a
    time and nodes came up one after another (issue 46). So every search has a limiter, sized
    to what the cluster can hold: the bound counts GPUs, else CPUs, over workers x per-worker
    need."""
    if max_concurrent:
        return max_concurrent
    from orchestrator.execution.cluster import capacity

    room, grows = capacity()
    n = trials_at_once(resources, room)
    if grows:
        log.warning("--max-concurrent not set: %d trial(s) at once, what the cluster holds at its autoscaler's "
                    "maximum (nodes start as the trials ask for them)", n)
    elif resources.workers > 1:
        log.warning("--max-concurrent not set for trials of %d workers: %d trial(s) at once, what the cluster "
                    "holds now", resources.workers, n)
    return n
