"""The driver's MLflow journal: nothing a sweep measured is lost from MLflow (issue 48).

Every record the trial callback makes (:mod:`.records`) is appended to the journal *before* it
is queued for MLflow, and acknowledged in the same file once MLflow has it. So what was not
delivered when the driver stopped, however it stopped (Ctrl-C, ``ray job stop``, SIGKILL, a lost
head node, an MLflow that stayed down or refused a changed password), is on disk, and the next
command on the same experiment delivers it before anything else (:func:`replay`): ``--resume``,
any later sweep / launch / retrain of the same ``--name``, or ``pouta tracking replay``.

One file per driver, ``<storage-path>/<name>/mlflow-journal/<host>-<pid>-<ms>.jsonl``: a header
line (where the records go, the parent run), then one line per record (``{"seq", "record"}``)
and per acknowledgement (``{"ack", ...}``). Each line is one ``write`` to a file opened for
appending, flushed to the operating system at once (what a killed process wrote is kept; a
machine that loses power may lose the last lines: their records are redelivered from Tune's
state by the resumed trials, and every record is safe to repeat). A torn last line is ignored.
The driver holds an exclusive ``flock`` on its file while it runs: a replay takes only files
whose driver is gone, and two replays never take the same file. A command that ends cleanly
(its parent run finished, every record acknowledged) removes its file.

A replay sends the records not acknowledged, in order, each finding its run by its key (so a
run the dead driver created is found, not made twice) and skipping metric steps MLflow already
has: 0 lost, 0 duplicated. Then every run the journal opened and did not end, and its parent
run, that MLflow still shows RUNNING is marked KILLED with the reason in ``pouta.end_reason``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.tracking import records

log = logging.getLogger(__name__)

JOURNAL_DIR = "mlflow-journal"   # in the Tune experiment's folder, beside pouta-definition.json
VERSION = 1


def _line(obj: dict[str, Any]) -> bytes:
    """One journal line (a value JSON lacks, e.g. a path object, as its text)."""
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


class JournalError(ValueError):
    """A journal file that cannot be read (not a journal, or damaged before its last line)."""


class Journal:
    """One driver's journal file, created and locked at once, appended to by any thread."""

    def __init__(self, folder: Path, header: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        started = int(time.time() * 1000)
        self.driver = f"{socket.gethostname()}-{os.getpid()}"
        self.path = folder / f"{self.driver}-{started}.jsonl"
        self._lock = threading.Lock()
        self._seq = 0
        self._unacked: set[int] = set()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._write({"journal": VERSION, "driver": self.driver, "started": started, **header})

    def _write(self, line: dict[str, Any]) -> None:
        if self._fd is None:
            raise JournalError(f"{self.path}: closed")
        os.write(self._fd, _line(line))

    def append(self, record: dict[str, Any]) -> int:
        """Write ``record`` -> its sequence number (for :meth:`ack`)."""
        with self._lock:
            self._seq += 1
            self._write({"seq": self._seq, "record": record})
            self._unacked.add(self._seq)
            return self._seq

    def ack(self, seq: int, extra: dict[str, Any] | None = None) -> None:
        """MLflow has record ``seq`` (or refused it for good: ``extra={"refused": why}``)."""
        with self._lock:
            self._write({"ack": seq, **(extra or {})})
            self._unacked.discard(seq)

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._unacked)

    def close(self, *, done: bool) -> None:
        """Release the file; ``done`` (the command ended cleanly): remove it when every record
        was acknowledged, since nothing is left to replay."""
        with self._lock:
            if self._fd is None:
                return
            if done and not self._unacked:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


# The journal of this process per experiment folder: a resumed sweep has two trial callbacks
# (the command's and the one Tune restores from tuner.pkl); they share one file.
_journals: dict[str, Journal] = {}
_journals_lock = threading.Lock()


def open_journal(experiment_path: Path, header: dict[str, Any]) -> Journal:
    """This process's journal for the experiment at ``experiment_path`` (created on first call)."""
    folder = Path(experiment_path) / JOURNAL_DIR
    with _journals_lock:
        journal = _journals.get(str(folder))
        if journal is None or journal._fd is None:
            journal = _journals[str(folder)] = Journal(folder, header)
        return journal


def close_journals(*, done: bool) -> None:
    """Release every journal of this process (see :meth:`Journal.close`)."""
    with _journals_lock:
        for journal in _journals.values():
            journal.close(done=done)
        _journals.clear()


@dataclass
class Read:
    """A journal file as read: its header, its records by sequence, what was acknowledged."""

    path: Path
    header: dict[str, Any]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    acks: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        return [(s, r) for s, r in sorted(self.records.items()) if s not in self.acks]


def read(path: Path) -> Read:
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: Read | None = None
    for n, raw in enumerate(lines, 1):
        try:
            line = json.loads(raw)
        except ValueError:
            if n == len(lines):   # the last write of a killed driver, cut short
                break
            raise JournalError(f"{path}: line {n} is not JSON; the journal is damaged") from None
        if out is None:
            if not isinstance(line, dict) or line.get("journal") != VERSION:
                raise JournalError(f"{path}: not a pouta MLflow journal (version {VERSION})")
            out = Read(path, line)
        elif "seq" in line:
            out.records[int(line["seq"])] = line["record"]
        elif "ack" in line:
            out.acks[int(line["ack"])] = line
    if out is None:
        raise JournalError(f"{path}: empty; not a pouta MLflow journal")
    return out


def journals(experiment_path: Path) -> list[Path]:
    """The journal files of an experiment, oldest driver first."""
    folder = Path(experiment_path) / JOURNAL_DIR
    found = folder.glob("*.jsonl") if folder.is_dir() else []
    return sorted(found, key=lambda p: (int(p.stem.rpartition("-")[2]) if p.stem.rpartition("-")[2].isdigit()
                                        else 0, p.name))


@contextlib.contextmanager
def _taken(path: Path) -> Iterator[int | None]:
    """The file, locked for this process -> its descriptor; None while its driver runs (or
    another replay has it)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


@dataclass
class Replayed:
    """What a replay did, over every journal of an experiment."""

    delivered: int = 0      # records MLflow has now
    refused: int = 0        # refused for good (a bad value: logged and acknowledged, not retried)
    left: int = 0           # still not delivered: MLflow unreachable or refusing us (files kept)
    live: int = 0           # journals whose driver still runs (not touched)
    ended: int = 0          # runs found RUNNING with their driver gone: marked KILLED
    files: int = 0          # journals replayed to the end and removed
    problem: str = ""       # why records were left, one line

    @property
    def summary(self) -> str:
        parts = [f"{self.delivered} records delivered"]
        if self.refused:
            parts.append(f"{self.refused} refused")
        if self.ended:
            parts.append(f"{self.ended} runs left RUNNING by a stopped driver marked KILLED")
        if self.live:
            parts.append(f"{self.live} journals of a running driver left alone")
        if self.left:
            parts.append(f"{self.left} records still waiting ({self.problem})")
        return ", ".join(parts)


def begin(experiment_path: Path, header: dict[str, Any], client, exp_id: str, *, by: str) -> Replayed:
    """A command's first MLflow step on an experiment: its own journal opened (and locked), then
    what earlier drivers left replayed (:func:`replay`); the command's parent run
    (``header["parent_run_id"]``), already open, is not ended by it."""
    open_journal(experiment_path, header)
    return replay(experiment_path, client, exp_id, by=by, keep=header.get("parent_run_id"))


def replay(experiment_path: Path, client, exp_id: str, *, by: str, keep: str | None = None) -> Replayed:
    """Deliver what the journals of ``experiment_path`` hold and MLflow lacks, in order, then end
    the runs their drivers left RUNNING (but ``keep``), saying ``by`` found them. Never raises
    for MLflow: what cannot be delivered now stays in its file, counted in ``left``."""
    done = Replayed()
    for path in journals(experiment_path):
        with _taken(path) as fd:
            if fd is None:
                done.live += 1
                continue
            if not _replay_one(path, fd, client, exp_id, by, keep, done):
                continue
        path.unlink(missing_ok=True)
        done.files += 1
    if done.delivered or done.ended or done.left:
        log.warning("MLflow journal of %s: %s", Path(experiment_path).name, done.summary)
    return done


def _replay_one(path: Path, fd: int, client, exp_id: str, by: str, keep: str | None, done: Replayed) -> bool:
    """One dead driver's journal -> whether it is replayed to its end."""
    journal = read(path)

    def acknowledge(seq: int, extra: dict[str, Any] | None) -> None:   # as Journal.ack writes it
        os.write(fd, _line({"ack": seq, **(extra or {})}))

    state = records.new_state(exp_id, replay=True)
    for ack in journal.acks.values():
        rec = journal.records.get(int(ack["ack"]))
        if rec and rec["op"] == records.OPEN and ack.get("run_id"):
            state["runs"][rec["key"]] = ack["run_id"]
    pending = journal.pending
    for i, (seq, rec) in enumerate(pending):
        try:
            extra = records.deliver(client, state, rec)
        except Exception as exc:
            if records.transient(exc) or records.held(exc):
                done.left += len(pending) - i
                done.problem = str(exc).splitlines()[0][:200]
                return False
            log.warning("MLflow refused a journal record (%s): %s", rec.get("op"), str(exc).splitlines()[0][:300])
            extra = {"refused": str(exc).splitlines()[0][:300]}
            done.refused += 1
        else:
            done.delivered += 1
        acknowledge(seq, extra)
    ended = {r["key"] for r in journal.records.values() if r["op"] in records.ENDS}
    left_open = list(dict.fromkeys(r["key"] for r in journal.records.values()
                                   if r["op"] == records.OPEN and r["key"] not in ended))
    parent = journal.header.get("parent_run_id")
    reason = (f"its command (driver {journal.header.get('driver')}) stopped before the run ended: interrupted, "
              f"killed, its node lost, or MLflow unreachable; marked KILLED by {by}")
    try:
        done.ended += records.end_left_running(client, state, left_open, None if parent == keep else parent, reason)
    except Exception as exc:
        if not (records.transient(exc) or records.held(exc)):
            raise
        done.problem = str(exc).splitlines()[0][:200]
        return False
    return True
