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

With a journal (:mod:`.journal`), every record is written to the driver's journal before it is
queued and acknowledged there once delivered: what the outbox could not deliver by the time the
command stops (an outage that outlasts ``--mlflow-wait``, Ctrl-C, a kill) is delivered by the
next command on the experiment. An MLflow that refuses our credentials (401/403: a password
rotated, a server restarted with an empty user database) is waited out like an outage, with
one line that says what to fix; the records stay in the journal, the sweep goes on training.

Bounded: past ``capacity`` queued records, new ones go to the journal only (without a
journal they are lost; the sweep goes on); :meth:`Outbox.close` waits up to its timeout and
returns how many records were not delivered.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.tracking import quick_requests
from orchestrator.tracking.records import held, transient

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
RETRY_CLOSING_S = 3.0   # once the trials are done, nothing else waits: try more often
REQUEST_TIMEOUT_S = 10   # one HTTP call while the outbox runs (MLflow's default: 120 s, 7 retries)


@dataclass
class Record:
    """One write: ``data`` (a JSON-able record, :mod:`.records`) that the outbox's ``deliver``
    does (and may repeat); ``what`` names it in messages; ``seq``: its number in the journal."""

    data: dict[str, Any]
    what: str
    seq: int | None = None


# Outboxes whose thread runs in this process. A resumed sweep's trials are logged by the
# callback Tune restores from its tuner.pkl, not by the one the command built: so the command
# drains every outbox, not the one it knows.
_running: list[Outbox] = []


@dataclass
class Left:
    """What the outboxes of this process could not deliver when they closed."""

    undelivered: int = 0    # still queued (kept in the journal where there is one)
    lost: int = 0           # neither delivered nor journaled (no journal: dropped for room)
    refused: int = 0        # refused for good (a bad value)
    unreachable: bool = False
    credentials: str = ""   # the refusal's line when MLflow refused our credentials
    journals: list[str] = field(default_factory=list)


def close_all(timeout_s: float) -> Left:
    """Close every outbox started in this process, all within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    left = Left()
    while _running:
        box = _running.pop()
        undelivered = box.close(max(0.0, deadline - time.monotonic()))
        left.refused += box.refused
        if box.journal is None:
            left.lost += undelivered + box.dropped
        else:
            left.undelivered += undelivered + box.dropped
            if undelivered + box.dropped:
                left.journals.append(str(box.journal.path))
        left.unreachable = left.unreachable or box.outage_since is not None
        left.credentials = left.credentials or box.refusal
    return left


def halt_all() -> None:
    """Stop every outbox's thread after the record it is sending (an interrupted command: what
    is queued stays in the journal for the next command, and no run is opened after the
    command has marked its runs KILLED)."""
    for box in list(_running):
        box.halt()


class Outbox:
    """Writes delivered in order by one daemon thread, started on the first :meth:`put`.

    ``client()`` makes the MLflow client (called in the thread); ``deliver(client, state,
    data)`` does one record and returns what its acknowledgement keeps. ``state`` is shared by
    the records (run ids by key, the last step per run). ``journal``: where each record is
    written before it is queued; ``hint``: what to run once MLflow takes us again."""

    def __init__(self, client: Callable[[], Any], deliver: Callable[[Any, dict[str, Any], dict[str, Any]], Any], *,
                 journal: Any = None, hint: str = "", capacity: int = DEFAULT_CAPACITY) -> None:
        self._client = client
        self._deliver = deliver
        self.journal = journal
        self.hint = hint
        self.capacity = capacity
        self.state: dict[str, Any] = {}
        self._queue: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._halted = False
        self._busy = False
        self._deadline: float | None = None
        self._env: contextlib.ExitStack | None = None
        self.dropped = self.refused = 0
        self.outage_since: float | None = None
        self.refusal = ""   # MLflow's refusal of our credentials, while it lasts

    def put(self, data: dict[str, Any], what: str) -> None:
        """Journal and queue a write; never waits on MLflow, never raises."""
        with self._cond:
            seq = None
            if self.journal is not None:
                try:
                    seq = self.journal.append(data)
                except OSError as exc:   # a full or vanished disk: MLflow may still take it
                    log.warning("MLflow journal %s: %s; %s is sent without a copy on disk", self.journal.path,
                                exc, what)
            if self._closing:
                self.dropped += 1
                if not self._halted:   # a halted outbox said so once
                    log.warning("MLflow: %s not sent (the outbox is closed)%s", what,
                                "; it is in the journal" if seq else "")
                return
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow: the outbox holds %d records; further records %s until it drains",
                                self.capacity, "go to the journal only" if seq else "are not logged")
                return
            self._queue.append(Record(data, what, seq))
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
                if not self._queue or self._halted:
                    return
                record = self._queue[0]
                self._busy = True
            extra = None
            try:
                client = client or self._client()
                extra = self._deliver(client, self.state, record.data)
            except Exception as exc:
                if transient(exc) or held(exc):
                    if held(exc):
                        client = None   # a fixed password is read by a new client
                    self._wait_out(exc)
                    with self._cond:
                        if self._halted or (self._closing and self._deadline is not None
                                            and time.monotonic() >= self._deadline):
                            return
                        self._cond.wait(min(wait, max(0.0, (self._deadline or float("inf")) - time.monotonic())))
                    wait = min(wait * 2, RETRY_CLOSING_S if self._closing else RETRY_MAX_S)
                    continue
                with self._cond:
                    self.refused += 1
                extra = {"refused": str(exc).splitlines()[0][:300]}
                log.warning("MLflow refused %s: %s", record.what, extra["refused"])
            else:
                if self.outage_since is not None or self.refusal:
                    log.warning("MLflow %s after %.0f s; sending %d waiting records",
                                "takes us again" if self.refusal else "is back",
                                time.monotonic() - (self.outage_since or time.monotonic()), len(self._queue))
                    self.outage_since, self.refusal = None, ""
                wait = RETRY_FIRST_S
            if self.journal is not None and record.seq is not None:
                try:
                    self.journal.ack(record.seq, extra)
                except OSError as exc:
                    log.warning("MLflow journal %s: %s (a replay sends that record again)", self.journal.path, exc)
            with self._cond:
                self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

    def _wait_out(self, exc: BaseException) -> None:
        """The first failure of an outage (or of a refusal) says so, once."""
        with self._cond:
            self._busy = False
            first = self.outage_since is None
            if first:
                self.outage_since = time.monotonic()
            line = str(exc).splitlines()[0][:200]
            kept = f"kept in {self.journal.path}" if self.journal is not None else "waiting in memory"
            if held(exc) and not self.refusal:
                self.refusal = line
                log.warning("MLflow refused our credentials (%s); training goes on and %d records are %s; fix the "
                            "user or password, then %s", line, len(self._queue), kept,
                            self.hint or "rerun the command")
            elif first and not held(exc):
                log.warning("MLflow unreachable (%s); records wait in the outbox (%d, %s) and are sent when it is "
                            "back", line, len(self._queue), kept)

    def halt(self) -> None:
        """Stop after the record being sent; the rest stays queued (and journaled)."""
        with self._cond:
            self._halted = self._closing = True
            self._deadline = time.monotonic()
            self._cond.notify_all()
            if self._queue and self.journal is not None:
                log.warning("MLflow: %d records not sent before the stop are kept in %s; the next command on this "
                            "experiment sends them", len(self._queue), self.journal.path)

    def close(self, timeout_s: float) -> int:
        """Deliver what is queued, waiting at most ``timeout_s`` -> how many queued records
        were not delivered (they stay in the journal, where there is one)."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s + REQUEST_TIMEOUT_S + 1)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if self._env is not None:
            self._env.close()
            self._env = None
        return left
