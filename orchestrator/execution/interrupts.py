"""Ctrl-C and SIGTERM stop the whole command, not just the Tune experiment under way.

Ray Tune's own SIGINT handler ends ``Tuner.fit()`` gracefully (it saves the experiment state
one last time and stops the trials) and then *returns*, so a command would go on to register
models and start its next step, and it prints Ray's ``Tuner.restore(...)`` hint. Here the
first SIGINT or SIGTERM records the request and hands it to Tune through SIGUSR1 (which Tune
always treats as "stop gracefully"); :func:`fit` then raises :class:`Interrupted` and the CLI
marks open MLflow runs KILLED and exits 130. A second signal stops at once.

SIGTERM comes from ``ray job stop`` (and Kubernetes), which sends SIGKILL a few seconds later
(``RAY_JOB_STOP_WAIT_TIME_S``, default 3): so on SIGTERM the ``first`` thing done, before
Tune is asked to stop, is what the command must not lose (the CLI marks its MLflow runs
KILLED).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 130
_requested = threading.Event()
_in_tune = threading.Event()    # Tune's loop is running: it stops on SIGUSR1
_first: list[Callable[[], None]] = []   # done first on SIGTERM (stop_on_signals' ``first``)
_active = threading.Event()     # stop_on_signals is in force


class Interrupted(KeyboardInterrupt):
    """The user stopped the command; a KeyboardInterrupt, so no ``except Exception`` keeps going."""


def _handler(signum: int, frame) -> None:
    if _requested.is_set():
        raise Interrupted(f"{signal.Signals(signum).name} received twice")
    _requested.set()
    if signum == signal.SIGTERM:
        for do in _first:
            try:
                do()
            except Exception as exc:   # never let it keep the command from stopping
                log.warning("on SIGTERM: %s", exc)
    # Outside Tune's loop (or before Tune installed its SIGUSR1 handler): stop right here.
    if not _in_tune.is_set() or signal.getsignal(signal.SIGUSR1) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise Interrupted(signal.Signals(signum).name)
    log.warning("%s received: stopping every trial (again to stop at once)", signal.Signals(signum).name)
    os.kill(os.getpid(), signal.SIGUSR1)   # Tune's graceful stop: a last state snapshot, trials stopped


@contextlib.contextmanager
def stop_on_signals(first: Callable[[], None] | None = None) -> Iterator[None]:
    """Within: SIGINT/SIGTERM request a stop (see the module doc); on SIGTERM ``first`` runs
    before anything else. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _first[:] = [first] if first else []
    _active.set()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"   # ours stays installed while Tune runs
    _requested.clear()
    for s in saved:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _active.clear()
        _first.clear()
        for s, h in saved.items():
            signal.signal(s, h)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env


def reclaim_sigterm() -> None:
    """Put our SIGTERM handler back: ``ray.init`` installs its own (``sys.exit``), which would
    end the command with Tune's state unsaved and MLflow's runs left RUNNING. Called right
    after Ray starts or is joined."""
    if _active.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    if _requested.is_set():
        raise Interrupted("stop requested")


def _not_tune_restore_hint(record: logging.LogRecord) -> bool:
    # Tune's "Resume experiment with: Tuner.restore(...)" is not how a pouta user resumes.
    return "Tuner.restore(" not in record.getMessage()


def fit(tuner):
    """``tuner.fit()``, then :class:`Interrupted` if the user asked to stop meanwhile."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # until Tune installs its own: never the default (exit)
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(_not_tune_restore_hint)
    _in_tune.set()
    try:
        results = tuner.fit()
    finally:
        _in_tune.clear()
        tune_log.removeFilter(_not_tune_restore_hint)
    check()
    return results
