"""What the trial callback asks of MLflow, as data. A record is a JSON-able dict with an ``op``
and what that op needs: it can wait in the outbox (:mod:`.outbox`), be written to the driver's
journal (:mod:`.journal`) before it is sent, and be delivered by a later process (``--resume``,
``pouta tracking replay``) exactly as by the one that made it.

Every op is safe to repeat: a run is found again by its ``pouta.key`` tag (``open``), a metric
step the run already has is skipped (``metrics``: a restarted trial and a replayed journal
report steps MLflow may hold), tags and artifacts overwrite, and ending a run twice ends it
once (``complete``, ``error``). So a record whose answer was lost is simply sent again, and a
replay after a crash duplicates nothing.

``deliver(client, state, record)`` does one record. ``state`` is what the records of one
journal share: ``exp_id``, ``runs`` (key -> run id), ``steps`` (run id -> last step in MLflow),
``run_ids`` (key -> run id, the callback's own map, saved with Tune's state), and ``replay``
(True: every ``open`` looks for its run first, since the process that made it may have created
it). It returns what the journal's acknowledgement keeps (an ``open``'s run id), or None.

What MLflow's failures mean is here too: :func:`transient` (try again later) and :func:`held`
(our credentials refused: kept until someone fixes them); anything else refuses the record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.tracking import client as tracking

log = logging.getLogger(__name__)

OPEN, METRICS, COMPLETE, ERROR = "open", "metrics", "complete", "error"
ENDS = (COMPLETE, ERROR)   # a run's last record: after it the run is FINISHED or FAILED

TAG_CHECKPOINT = "pouta.checkpoint"
TAG_CHECKPOINT_EPOCH = "pouta.checkpoint_epoch"   # the epoch those weights are of
TAG_SCORING = "pouta.scoring."   # + a scoring key: the value the trial chose after training (issue 45)


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


def held(exc: BaseException) -> bool:
    """Whether MLflow refused our credentials or rights (401/403): not the record's fault, and
    fixed outside this process (a password, a user database), so the record is kept."""
    if type(exc).__name__ == "TrackingAccessError":
        return True
    text = " ".join(str(e) for e in _chain(exc))
    return any(f"error code {c}" in text or f"status code {c}" in text or f"responses ({c}" in text
               for c in ("401", "403"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def new_state(exp_id: str | None = None, *, replay: bool = False) -> dict[str, Any]:
    return {"exp_id": exp_id, "runs": {}, "steps": {}, "run_ids": {}, "replay": replay}


def deliver(client, state: dict[str, Any], record: dict[str, Any]) -> dict[str, Any] | None:
    """Do ``record`` in MLflow -> what its acknowledgement keeps."""
    try:
        op = _OPS[record["op"]]
    except KeyError:
        raise ValueError(f"unknown MLflow record op {record.get('op')!r}") from None
    return op(client, state, record)


def run_of(client, state: dict[str, Any], key: str) -> str:
    """The run of ``key``: opened by an earlier record (this process's or the journal's)."""
    run_id = state["runs"].get(key) or state["run_ids"].get(key)
    if run_id is None:
        run_id = tracking.find_run(client, state["exp_id"], key)
        if run_id is None:
            raise LookupError(f"no MLflow run with {tracking.TAG_KEY} = {key}")
        state["runs"][key] = run_id
    return run_id


def _open(client, state: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    key, known = r["key"], r.get("known") or state["run_ids"].get(r["key"])
    if known:
        run_id = tracking.reopen_run(client, known)
    elif r.get("restored") or state.get("replay"):
        run_id = tracking.get_or_create_run(client, state["exp_id"], key, name=r["name"], tags=r["tags"],
                                            parent_id=r.get("parent"))
    else:   # a new trial of this driver: no search across an ever-growing experiment
        run_id = tracking.create_run(client, state["exp_id"], key, name=r["name"], tags=r["tags"],
                                     parent_id=r.get("parent"))
    state["run_ids"][key] = run_id
    tracking.log_params(client, run_id, r["params"])
    fresh = not (known or r.get("restored") or state.get("replay"))
    state["steps"][run_id] = -1 if fresh else tracking.last_step(client, run_id)
    state["runs"][key] = run_id
    return {"run_id": run_id}


def _metrics(client, state: dict[str, Any], r: dict[str, Any]) -> None:
    run_id = run_of(client, state, r["key"])
    if run_id not in state["steps"]:
        state["steps"][run_id] = tracking.last_step(client, run_id)
    if r["epoch"] <= state["steps"][run_id]:
        return    # a restarted trial, or a replay, reports epochs MLflow already has
    tracking.log_metrics(client, run_id, r["metrics"], step=r["epoch"], timestamp_ms=r["stamp"])
    state["steps"][run_id] = r["epoch"]


def _complete(client, state: dict[str, Any], r: dict[str, Any]) -> None:
    run_id = run_of(client, state, r["key"])
    if r.get("checkpoint"):
        client.set_tag(run_id, TAG_CHECKPOINT, r["checkpoint"])
        if r.get("checkpoint_epoch") is not None:   # its metrics.json artifact is that epoch's
            client.set_tag(run_id, TAG_CHECKPOINT_EPOCH, str(r["checkpoint_epoch"]))
    for k, v in (r.get("scoring") or {}).items():
        client.set_tag(run_id, f"{TAG_SCORING}{k}", str(v))
    for file in r.get("files", ()):
        if Path(file).is_file():
            client.log_artifact(run_id, file)
        else:   # a replay long after: the checkpoint may have been removed since
            log.warning("MLflow: %s is gone; not logged to run %s", file, run_id)
    tracking.finish(client, run_id, ok=True)


def _error(client, state: dict[str, Any], r: dict[str, Any]) -> None:
    tracking.finish(client, run_of(client, state, r["key"]), ok=False)


_OPS = {OPEN: _open, METRICS: _metrics, COMPLETE: _complete, ERROR: _error}


def end_left_running(client, state: dict[str, Any], keys: list[str], parent_id: str | None, reason: str) -> int:
    """The runs of ``keys`` (opened, never ended) and ``parent_id`` that MLflow still shows
    RUNNING: KILLED, with ``reason`` in ``pouta.end_reason`` -> how many."""
    count = 0
    for run_id in [*(state["runs"].get(k) or tracking.find_run(client, state["exp_id"], k) for k in keys), parent_id]:
        if not run_id or client.get_run(run_id).info.status != "RUNNING":
            continue
        client.set_tag(run_id, tracking.TAG_END_REASON, reason)
        client.set_terminated(run_id, "KILLED")
        count += 1
    return count
