"""The Tune experiment of a command: the Tuner built (or restored from the plan's experiment
folder) with its callbacks (MLflow, the stall watchdog, the progress lines), and its fit,
stopped by Ctrl-C/SIGTERM and letting a stalled cluster's message through."""

from __future__ import annotations

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


def run(plan: Plan, spec: TrialSpec, param_space: dict[str, Any], tune_config: tune.TuneConfig,
        cb: MlflowTrialCallback, resume: bool):
    """Build (or restore) the command's Tune experiment and fit it -> Tune's ``ResultGrid``."""
    return fit(make_tuner(plan, spec, param_space, tune_config, cb, resume))


def make_tuner(plan: Plan, spec: TrialSpec, param_space: dict[str, Any], tune_config: tune.TuneConfig,
               cb: MlflowTrialCallback, resume: bool) -> tune.Tuner:
    """A new Tuner, or the restored one when ``resume`` (finished trials are not rerun).

    The spec (paths, resources, base config) reaches trials through ``tune.with_parameters``,
    so ``param_space``, which Tune prints and stores per trial, holds only what varies."""
    path = plan.experiment_path
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), spec.resources.trial())
    # The command checked that an existing experiment is resumed as the same one
    # (Plan.check_new_or_resumed) and recorded its definition in the folder before this.
    if resume and path.exists():
        if tune.Tuner.can_restore(str(path)):
            return tune.Tuner.restore(str(path), trainable=trainable, param_space=param_space,
                                      resume_unfinished=True, resume_errored=True)
    watchdog = StallWatchdog(plan.pending_timeout, spec.resources.worker(), spec.resources.workers)
    callbacks: list[Any] = [cb, watchdog]
    if not plan.verbose:
        callbacks.append(ProgressPrinter(plan.metric, plan.mode, plan.categories))
    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                                  callbacks=callbacks,
                                  # --max-failures, for every trial: Tune reruns an errored trial
                                  # from its last checkpoint (a multi-worker trial's run also
                                  # restarts its worker group that often within each attempt).
                                  failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  verbose=None if plan.verbose else 0),
    )


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
