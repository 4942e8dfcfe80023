"""MLflow off Tune's critical path: the trial callback puts its writes in an outbox, and one
background thread delivers them, in order, retrying while the server is unreachable.

Tune calls its callbacks from the driver's loop: a callback that waits on MLflow waits the
whole sweep (MLflow's own retries take minutes per call), and one that raises stops it. Here
``put`` never waits and never raises; the thread keeps the record at the head of the queue
and tries again (1 s, doubling to 30 s; every 3 s once the command is only waiting for it)
until it is delivered, so an outage delays the records and loses none. MLflow's own
retries are off while the outbox runs: it is the retry.

Every write is safe to repeat (the same run is found again by its key, metrics carry the
timestamp they were reported at and MLflow drops exact repeats, artifacts overwrite), so a
write whose answer was lost is simply sent again. Metric steps a run already has (a trial
restarted from a checkpoint reports them again) are skipped at delivery.

Bounded: past ``capacity`` records, new ones are counted as lost (the sweep goes on);
:meth:`Outbox.close` waits up to its timeout and returns how many records were not delivered.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.tracking import quick_requests

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
RETRY_CLOSING_S = 3.0   # once the trials are done, nothing else waits: try more often
REQUEST_TIMEOUT_S = 10   # one HTTP call while the outbox runs (MLflow's default: 120 s, 7 retries)


@dataclass
class Record:
    """One write: ``deliver(client, state)`` does it (and may be repeated); ``what`` names it
    in messages."""

    deliver: Callable[[Any, dict[str, Any]], None]
    what: str


def transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: no connection, a timeout, a 5xx or 429."""
    text = str(exc)
    if isinstance(exc, OSError | TimeoutError):
        return True
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError",
                "NewConnectionError", "RemoteDisconnected", "ProtocolError", "OperationalError"}:
        return True
    for code in ("429", "500", "502", "503", "504"):
        if f"error code {code}" in text or f"status code {code}" in text or f"responses ({code}" in text:
            return True
    return "Max retries exceeded" in text or "Connection refused" in text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


# Outboxes whose thread runs in this process. A resumed sweep's trials are logged by the
# callback Tune restores from its tuner.pkl, not by the one the command built: so the command
# drains every outbox, not the one it knows.
_running: list[Outbox] = []


def close_all(timeout_s: float) -> tuple[int, bool]:
    """Close every outbox started in this process, all within ``timeout_s`` -> (records not
    logged, whether MLflow was unreachable when they closed)."""
    deadline = time.monotonic() + timeout_s
    lost, unreachable = 0, False
    while _running:
        box = _running.pop()
        lost += box.close(max(0.0, deadline - time.monotonic()))
        unreachable = unreachable or box.outage_since is not None
    return lost, unreachable


class Outbox:
    """Writes delivered in order by one daemon thread, started on the first :meth:`put`.

    ``client()`` makes the MLflow client (called in the thread). ``state`` is shared by the
    records (run ids by key, the last step per run)."""

    def __init__(self, client: Callable[[], Any], *, capacity: int = DEFAULT_CAPACITY) -> None:
        self._client = client
        self.capacity = capacity
        self.state: dict[str, Any] = {}
        self._queue: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False
        self._deadline: float | None = None
        self._env: contextlib.ExitStack | None = None
        self.dropped = self.refused = 0
        self.outage_since: float | None = None

    def put(self, deliver: Callable[[Any, dict[str, Any]], None], what: str) -> None:
        """Queue a write; never waits, never raises."""
        with self._cond:
            if self._closing:
                self.dropped += 1
                log.warning("MLflow: %s not logged (the outbox is closed)", what)
                return
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow: the outbox holds %d records; further records are not logged until it "
                                "drains", self.capacity)
                return
            self._queue.append(Record(deliver, what))
            if self._thread is None:
                self._env = contextlib.ExitStack()
                self._env.enter_context(quick_requests(REQUEST_TIMEOUT_S))
                self._thread = threading.Thread(target=self._run, name="pouta-mlflow-outbox", daemon=True)
                self._thread.start()
                _running.append(self)
            self._cond.notify_all()

    def _run(self) -> None:
        client = None
        wait = RETRY_FIRST_S
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                record = self._queue[0]
                self._busy = True
            try:
                client = client or self._client()
                record.deliver(client, self.state)
            except Exception as exc:
                if transient(exc):
                    with self._cond:
                        self._busy = False
                        if self.outage_since is None:
                            self.outage_since = time.monotonic()
                            log.warning("MLflow unreachable (%s); records wait in the outbox (%d) and are sent when "
                                        "it is back", str(exc).splitlines()[0][:200], len(self._queue))
                        if self._closing and self._deadline is not None and time.monotonic() >= self._deadline:
                            return
                        self._cond.wait(min(wait, max(0.0, (self._deadline or float("inf")) - time.monotonic())))
                    wait = min(wait * 2, RETRY_CLOSING_S if self._closing else RETRY_MAX_S)
                    continue
                with self._cond:
                    self.refused += 1
                log.warning("MLflow refused %s: %s", record.what, str(exc).splitlines()[0][:300])
            else:
                if self.outage_since is not None:
                    log.warning("MLflow is back after %.0f s; sending %d waiting records",
                                time.monotonic() - self.outage_since, len(self._queue))
                    self.outage_since = None
                wait = RETRY_FIRST_S
            with self._cond:
                self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

    def close(self, timeout_s: float) -> int:
        """Deliver what is queued, waiting at most ``timeout_s`` -> how many records were not
        logged (still queued, dropped for room, or refused)."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s + REQUEST_TIMEOUT_S + 1)
        with self._cond:
            left = len(self._queue) + (1 if self._busy else 0)
            self._queue.clear()
        if self._env is not None:
            self._env.close()
            self._env = None
        return left + self.dropped + self.refused
