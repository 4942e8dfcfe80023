"""The schedulers a command hands Tune: FIFO for every command, and for a sweep ASHA per
category (a pills trial is never stopped for scoring below tiles trials), its rungs placed
from the budget with a floor of finalists that always go on (issue 45); each keeping what a
``--resume`` needs that Tune forgets (it never saves a scheduler): a checkpoint to restore
each trial from (Tune may have deleted the one its state names), and ASHA's rungs and floor,
rebuilt from the restored trials' results.

Each rule is stated where it is applied, with the Ray 2.60 attributes it reads or sets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL
from pouta_core.config import Config
from search_spaces import SearchSpace

log = logging.getLogger(__name__)


def restored(trial) -> bool:
    """A trial of a restored experiment that had reported before (a new one has not)."""
    return "training_iteration" in trial.run_metadata.last_result


def checkpoint_folders(fs, folder: str) -> list[str]:
    """The ``checkpoint_*`` folders of a trial's (or Ray Train run's) ``folder`` on its storage
    filesystem ``fs`` (pyarrow), oldest first (Ray numbers them ``checkpoint_000007``)."""
    import pyarrow.fs as pafs

    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def repair_checkpoint(trial) -> str | None:
    """Point a restored ``trial`` at a checkpoint that exists -> what was done, or None.

    Tune removes a trial's checkpoints beyond ``num_to_keep`` as new ones are registered, and
    saves the experiment state naming the latest only every few seconds: a driver killed in
    between restored a trial whose recorded checkpoint was gone, Tune refused to restore it,
    and every retry failed the same way (the trial ended ERROR). *Decision*: the trial
    continues from the newest checkpoint in its folder (Ray numbers them), or, when there is
    none, starts over; either way the driver says so. The checkpoint manager's
    ``_latest_checkpoint_result`` and ``_checkpoint_results`` and the storage context's
    ``current_checkpoint_index`` are Ray 2.60's attributes."""
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
    on_disk = checkpoint_folders(fs, folder)
    manager._checkpoint_results = [_TrainingResult(checkpoint=Checkpoint(p, filesystem=fs), metrics=latest.metrics)
                                   for p in on_disk]
    manager._latest_checkpoint_result = manager._checkpoint_results[-1] if on_disk else None
    # The trial's next checkpoint is numbered after the newest on disk, not after the one its
    # state named: the next one would have overwritten a checkpoint it restores from, which Tune
    # then deleted as an old one (seen when the test of this window was run 5 times).
    numbers = [int(n) for n in (posixpath.basename(p).rpartition("_")[2] for p in on_disk) if n.isdigit()]
    trial.storage.current_checkpoint_index = max([trial.storage.current_checkpoint_index, *numbers])
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


def scheduler_for(name: str, configs: Mapping[str, Config], space: SearchSpace, num_samples: int = 1,
                  keep: int = 1) -> TrialScheduler:
    """``--scheduler``: ``asha`` (per category, :func:`asha`, keeping ``keep`` searched trials of
    ``num_samples`` to the end) or ``none`` (trials in order)."""
    return asha(configs, space, num_samples, keep) if name == "asha" else ResumingScheduler()



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


class FinalistFloor:
    """The searched trials a category's ASHA may not stop: at each rung, the ``keep`` best
    searched values recorded there (the default and confirmation trials are not counted; they
    are never stopped). The first ``keep`` searched trials to reach a rung pass it, so at least
    ``keep`` searched trials (or all of them, if fewer) train to their end whatever ASHA's
    cutoffs say, and the confirmation round always has its finalists.

    *Decision*: ASHA alone, on a sweep of a few trials, stopped every searched trial of the
    demo's two categories at its first rung (the default's value set the cutoff, and a
    searched trial half-trained is rarely better than the default half-trained): the search
    ended with no finalist. The floor keeps ASHA's saving on the trials behind it."""

    def __init__(self, milestones: list[float], keep: int) -> None:
        self.milestones = sorted(milestones, reverse=True)
        self.keep = keep
        self.recorded: dict[float, dict[str, float]] = {m: {} for m in self.milestones}

    def record(self, trial_id: str, epoch: float, value: float) -> None:
        """``value`` (higher is better) at the highest rung ``epoch`` reached, if not recorded
        there yet (ASHA's own rule: the first value at or past a milestone)."""
        rung = next((m for m in self.milestones if epoch >= m), None)
        if rung is not None:
            self.recorded[rung].setdefault(trial_id, value)

    def keeps(self, trial_id: str, epoch: float) -> bool:
        """Whether ``trial_id`` is among the ``keep`` best at the highest rung it was recorded on."""
        rung = next((m for m in self.milestones if epoch >= m and trial_id in self.recorded[m]), None)
        if rung is None:
            return False
        values = self.recorded[rung]
        return sum(v > values[trial_id] for t, v in values.items() if t != trial_id) < self.keep


class PerCategoryScheduler(ResumingScheduler):
    """A scheduler per category (``make(category)``, e.g. ASHA), fed only that category's
    trials: a weak trial is stopped against its own category's rungs. Trials start in FIFO
    order, as the per-category searchers proposed them. With ``floors`` (category → a
    :class:`FinalistFloor`), a searched trial among its rung's best few is never stopped."""

    def __init__(self, make: Callable[[str], TrialScheduler], categories: list[str],
                 floors: Mapping[str, FinalistFloor] | None = None) -> None:
        super().__init__()
        self.schedulers = {c: make(c) for c in categories}
        self.floors = dict(floors or {})
        self.objective, self.sign = None, 1.0

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[trial.config["category"]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        if metric is not None and mode is not None:
            self.objective, self.sign = metric, (1.0 if mode == "max" else -1.0)
        return all(ok)

    def _floor_of(self, trial) -> FinalistFloor | None:
        searched = not (trial.config.get(DEFAULT_TRIAL) or trial.config.get(CONFIRM_OF))
        return self.floors.get(trial.config["category"]) if searched and self.objective else None

    def _record(self, trial, result: dict) -> None:
        floor = self._floor_of(trial)
        if floor is not None and result.get("epoch") is not None and result.get(self.objective) is not None:
            floor.record(trial.trial_id, result["epoch"], self.sign * result[self.objective])

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        scheduler = self._of(trial)
        scheduler.on_trial_add(tune_controller, trial)
        if restored(trial):
            history = trial_history(trial)
            replay_rungs(scheduler, trial, history)
            for row in history:
                self._record(trial, row)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self._of(trial).on_trial_result(tune_controller, trial, result)
        self._record(trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        # The default trial is the reference the chosen one is compared with: it trains to
        # its end (its results still set the rungs the others are judged on).
        # So does a confirmation trial: its value is compared at the end of training.
        if trial.config.get(DEFAULT_TRIAL) or trial.config.get(CONFIRM_OF):
            return TrialScheduler.CONTINUE
        floor = self._floor_of(trial)
        if floor is not None and floor.keeps(trial.trial_id, result.get("epoch", 0)):
            return TrialScheduler.CONTINUE
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{c}: {s.debug_string()}" for c, s in self.schedulers.items())


def epoch_range(space: SearchSpace, config: Config) -> tuple[int, int]:
    """The fewest and the most epochs a trial of ``config`` can train: ``config.epochs``, or the
    range of ``epochs`` when the space searches it."""
    searched = next((d for d in space.dimensions if d.key == "epochs"), None)
    if searched is None:
        return config.epochs, config.epochs
    values = [int(v) for v in searched.extremes()]
    return min(values), max(values)


MOST_RUNGS = 2   # ASHA's rungs below the last epoch, at most: at a half and a quarter of training


def rungs_for(num_samples: int, keep: int) -> int:
    """How many ASHA rungs (each halving the trials, reduction factor 2) a budget of
    ``num_samples`` searched trials affords while ``keep`` of them still reach the end: the
    rungs halve ``num_samples`` down to ``keep``, at most :data:`MOST_RUNGS`.

    *Decision*: the rungs are at a half and a quarter of training at most (the grace period
    was a quarter before this rule; earlier rungs judge models that have not yet learnt the
    synthetic anomalies, docs/experiments.md). A budget of 4 samples keeping 2 finalists gets
    one rung; 2 samples keeping 2 get none: ASHA stops nothing, as it could only stop a
    finalist."""
    rungs = 0
    while rungs < MOST_RUNGS and num_samples >= keep * 2 ** (rungs + 1):
        rungs += 1
    return rungs


def asha(configs: Mapping[str, Config], space: SearchSpace, num_samples: int = 1,
         keep: int = 1) -> PerCategoryScheduler:
    """ASHA per category (a pills trial is never stopped for being worse than a tiles trial),
    its rungs on each category's own epochs, as many as the budget affords (:func:`rungs_for`),
    with a floor of ``keep`` searched trials trained to the end (:class:`FinalistFloor`). When
    the space searches ``epochs``, ``max_t`` is the most it can sample, so no trial is cut at the
    base config's length (a 800-epoch trial of ``full.yaml`` was stopped at the paper preset's
    600 while ``-best.yaml`` said 800), and the rungs are placed on the fewest."""
    from ray.tune.schedulers import ASHAScheduler

    rungs = rungs_for(num_samples, keep)

    def grace(category: str) -> int:
        # The first rung at 1/2**rungs of the fewest epochs, rounded up to an evaluation (a
        # rung between two is judged at the next one anyway): 30 epochs evaluated every 5 with
        # 2 rungs gives 10 and 20. Rounded down (7), ASHA's doubling fitted a third rung (28).
        fewest, _ = epoch_range(space, configs[category])
        every = configs[category].eval_every
        return min(fewest, every * math.ceil(fewest / 2 ** rungs / every))

    def make(category: str) -> ASHAScheduler:
        return ASHAScheduler(time_attr="epoch", max_t=epoch_range(space, configs[category])[1],
                             grace_period=grace(category), reduction_factor=2)

    def milestones(category: str) -> list[float]:
        most = epoch_range(space, configs[category])[1]
        return [m for m in (grace(category) * 2 ** k for k in range(rungs + 1)) if m < most]

    scheduler = PerCategoryScheduler(make, list(configs),
                                     floors={c: FinalistFloor(milestones(c), keep) for c in configs})
    for category in configs:
        rung_epochs = ", ".join(str(int(m)) for m in sorted(scheduler.floors[category].milestones)) or "none"
        print(f"asha: {category}: rungs at epoch(s) {rung_epochs}; the {keep} best searched trial(s) at each "
              "rung always go on to the end", flush=True)
    return scheduler
