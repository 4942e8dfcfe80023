"""The Tune experiment of a command: the Tuner built (or restored from the plan's experiment
folder) with its callbacks (MLflow, the stall watchdog, the progress lines), and its fit,
stopped by Ctrl-C/SIGTERM and letting a stalled cluster's message through."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

from ray import tune

from orchestrator.errors import ClusterStalled
from orchestrator.execution import interrupts
from orchestrator.execution.progress import ProgressPrinter
from orchestrator.execution.trial import run_trial
from orchestrator.execution.watchdog import StallWatchdog
from orchestrator.plan import Plan
from orchestrator.spec import TrialSpec

if TYPE_CHECKING:
    from orchestrator.tracking.callback import MlflowTrialCallback


# Tune's own setting: seconds between snapshots of the experiment state, or "auto".
SNAPSHOT_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
SNAPSHOT_S_PER_TRIAL = 0.05
SNAPSHOT_MAX_S = 300.0


def snapshot_period(trials: int) -> str:
    """Seconds between Tune's snapshots of the experiment state for an experiment of ``trials``
    trials: Tune's own "auto" (every 10 s, longer when a snapshot takes over 0.5 s) up to 200
    trials, then ``SNAPSHOT_S_PER_TRIAL`` s per trial (48 s at 960), at most 5 minutes.

    *Decision* (issue 28): a snapshot rewrites every trial's state (~16 kB each), so its cost
    grows with the trials; every 10 s, it was what made the driver's cost per trial grow by
    60% over a 960-trial sweep. A period that grows with the trials keeps the snapshots' share
    of the driver's time flat. What it costs: a driver killed without warning resumes from a
    state up to one period old; trials that ran since then continue from their own checkpoints
    (or start over), which at MVTec's trials of minutes to hours is little. Ctrl-C, SIGTERM and
    the end of the sweep always save the state."""
    if trials <= 200:
        return "auto"
    return f"{min(SNAPSHOT_MAX_S, trials * SNAPSHOT_S_PER_TRIAL):g}"


def _grid_size(space: Any) -> int:
    """How many points the ``grid_search`` entries of a param space make."""
    if isinstance(space, dict):
        if set(space) == {"grid_search"}:
            return len(space["grid_search"])
        return math.prod(_grid_size(v) for v in space.values())
    return 1


def run(plan: Plan, spec: TrialSpec, param_space: dict[str, Any], tune_config: tune.TuneConfig,
        cb: MlflowTrialCallback, resume: bool):
    """Build (or restore) the command's Tune experiment and fit it -> Tune's ``ResultGrid``.
    A user's own ``TUNE_GLOBAL_CHECKPOINT_S`` wins over :func:`snapshot_period`."""
    own = SNAPSHOT_PERIOD_ENV in os.environ
    period = snapshot_period(tune_config.num_samples * _grid_size(param_space))
    tuner = make_tuner(plan, spec, param_space, tune_config, cb, resume)
    if own:
        return fit(tuner)
    os.environ[SNAPSHOT_PERIOD_ENV] = period   # read as Tune's loop starts
    try:
        return fit(tuner)
    finally:
        os.environ.pop(SNAPSHOT_PERIOD_ENV, None)


def make_tuner(plan: Plan, spec: TrialSpec, param_space: dict[str, Any], tune_config: tune.TuneConfig,
               cb: MlflowTrialCallback, resume: bool) -> tune.Tuner:
    """A new Tuner, or the restored one when ``resume`` (finished trials are not rerun).

    The spec (paths, resources, base config) reaches trials through ``tune.with_parameters``,
    so ``param_space``, which Tune prints and stores per trial, holds only what varies."""
    path = plan.experiment_path
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), spec.resources.trial())
    watchdog = StallWatchdog(plan.pending_timeout, spec.resources.worker(), spec.resources.workers)
    callbacks: list[Any] = [cb, watchdog]
    if not plan.verbose:
        callbacks.append(ProgressPrinter(plan.metric, plan.mode, plan.categories))
    run_config = tune.RunConfig(name=plan.run_name, storage_path=plan.storage_path, callbacks=callbacks,
                                # --max-failures, for every trial: Tune reruns an errored trial
                                # from its last checkpoint (a multi-worker trial's run also
                                # restarts its worker group that often within each attempt).
                                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                verbose=None if plan.verbose else 0)
    # The command checked that an existing experiment is resumed as the same one
    # (Plan.check_new_or_resumed) and recorded its definition in the folder before this.
    if resume and path.exists() and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=True)
        take_new_settings(tuner, tune_config, run_config)
        return tuner
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def take_new_settings(tuner: tune.Tuner, tune_config: tune.TuneConfig, run_config: tune.RunConfig) -> list[str]:
    """A restored Tuner runs with the settings of *this* command, and says which changed ->
    those lines. Tune restores its ``TuneConfig`` and ``RunConfig`` from ``tuner.pkl``, so a
    resume ignored a new --max-concurrent, --num-samples, --pending-timeout, --max-failures, -v
    or tracking URI (trials kept logging to the old server). The search algorithm is this
    command's: its restore from the experiment folder keeps the studies' state and takes this
    command's trial budget and bound (:class:`orchestrator.execution.tune_parts.StudyTrials`).
    So is the scheduler (Tune never saves one): it rebuilds ASHA's rungs and repairs
    checkpoints as the restored trials are added
    (:class:`orchestrator.execution.schedulers.ResumingScheduler`). *Decision*: ``Tuner.restore``
    takes no configs, so they are set on the Tuner's ``TunerInternal`` (``_tune_config``,
    ``_run_config``, Ray 2.60), before ``fit`` builds the controller from them."""
    internal = tuner._local_tuner
    old_tc, old_rc = internal._tune_config, internal._run_config

    def first(callbacks, kind):
        return next((c for c in callbacks or [] if type(c).__name__ == kind), None)

    said = []
    # Older experiments kept the bound in TuneConfig; this version keeps it in the search algorithm.
    old_slots = getattr(old_tc.search_alg, "max_concurrent", 0) or old_tc.max_concurrent_trials or 0
    new_slots = getattr(tune_config.search_alg, "max_concurrent", 0) or tune_config.max_concurrent_trials or 0
    if old_slots != new_slots:
        said.append(f"--max-concurrent {old_slots} -> {new_slots}")
    old_cb, new_cb = first(old_rc.callbacks, "MlflowTrialCallback"), first(run_config.callbacks, "MlflowTrialCallback")
    if old_cb is not None and new_cb is not None and old_cb.tracking_uri != new_cb.tracking_uri:
        said.append(f"tracking URI {old_cb.tracking_uri} -> {new_cb.tracking_uri}")
    old_wd, new_wd = first(old_rc.callbacks, "StallWatchdog"), first(run_config.callbacks, "StallWatchdog")
    if old_wd is not None and new_wd is not None and old_wd.timeout_s != new_wd.timeout_s:
        said.append(f"--pending-timeout {old_wd.timeout_s:g} -> {new_wd.timeout_s:g}")
    if old_rc.failure_config and old_rc.failure_config.max_failures != run_config.failure_config.max_failures:
        said.append(f"--max-failures {old_rc.failure_config.max_failures} -> {run_config.failure_config.max_failures}")
    internal._tune_config = dataclasses.replace(old_tc, max_concurrent_trials=tune_config.max_concurrent_trials,
                                                search_alg=tune_config.search_alg, scheduler=tune_config.scheduler)
    for key in ("callbacks", "failure_config", "verbose"):
        setattr(old_rc, key, getattr(run_config, key))
    for line in said:
        print(f"resume: {line}", flush=True)
    return said


def fit(tuner: tune.Tuner):
    """``tuner.fit()`` that stops the command on Ctrl-C/SIGTERM (:mod:`orchestrator.execution.interrupts`)
    and lets a stalled cluster's message through Tune's wrapping error."""
    try:
        return interrupts.fit(tuner)
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ClusterStalled):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
