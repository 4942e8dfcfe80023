"""The MLflow journal (issue 48) on a real sqlite store, without Ray: records written before
they are sent, sent again after a crash with nothing lost or duplicated, runs a stopped driver
left RUNNING ended, a live driver's journal left alone, a refused password waited out. The
same against a real ``mlflow server`` and real sweeps: test_mlflow_outage.py."""

import json
import threading
import time

import pytest
from mlflow.entities import RunStatus

from orchestrator import tracking
from orchestrator.tracking import journal, outbox, records


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('journal') / 'mlflow.db'}"
    client, exp_id = tracking.setup(uri, "journal")
    return client, exp_id


def trial_records(key: str, epochs: int, *, parent: str | None = None, end: bool = True) -> list[dict]:
    out = [{"op": records.OPEN, "key": key, "name": key.rpartition("/")[2], "tags": {"pouta.kind": "trial"},
            "params": {"lr": "0.001"}, "parent": parent, "known": None, "restored": False}]
    out += [{"op": records.METRICS, "key": key, "epoch": e, "stamp": 1000 + e,
             "metrics": {"loss_total": 1.0 / e, "val_pixel_ap": 0.1 * e}} for e in range(1, epochs + 1)]
    if end:
        out.append({"op": records.COMPLETE, "key": key, "checkpoint": None, "files": []})
    return out


def steps(client, run_id: str, metric: str = "val_pixel_ap") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def parent_run(client, exp_id: str, key: str) -> str:
    return tracking.create_run(client, exp_id, key, name=key, tags={"pouta.kind": "sweep"})


def write(tmp_path, client, exp_id, key, recs, *, deliver_first: int = 0, ack_first: int | None = None):
    """A driver that sent its first ``deliver_first`` records (acknowledging ``ack_first`` of
    them: a crash between a send and its acknowledgement) and then died -> journal path."""
    parent = parent_run(client, exp_id, f"{key}-parent")
    book = journal.Journal(tmp_path / journal.JOURNAL_DIR, {"tracking_uri": "x", "experiment": "journal",
                                                           "parent_key": f"{key}-parent", "parent_run_id": parent})
    state = records.new_state(exp_id)
    for i, rec in enumerate(recs):
        seq = book.append(rec)
        if i < deliver_first:
            extra = records.deliver(client, state, rec)
            if i < (deliver_first if ack_first is None else ack_first):
                book.ack(seq, extra)
    book.close(done=False)   # the driver is gone: its lock with it
    return book.path, parent


def test_a_dead_drivers_records_are_sent_once_and_its_runs_ended(store, tmp_path):
    client, exp_id = store
    key = "sweep:dead/tiles/t1"
    # 6 epochs; 4 records sent, 3 of them acknowledged (the 4th's answer was lost): a replay
    # must send the 4th again without a duplicate step, and the rest for the first time.
    path, parent = write(tmp_path, client, exp_id, key, trial_records(key, 6, end=False), deliver_first=4,
                         ack_first=3)
    done = journal.replay(tmp_path, client, exp_id, by="a test")
    assert (done.delivered, done.left, done.live, done.files) == (4, 0, 0, 1), done
    assert not path.exists()
    run_id = tracking.find_run(client, exp_id, key)
    assert steps(client, run_id) == [1, 2, 3, 4, 5, 6]
    assert steps(client, run_id, "loss_total") == [1, 2, 3, 4, 5, 6]
    # Opened and never ended, and its parent: KILLED, and the tag says why.
    for rid in (run_id, parent):
        run = client.get_run(rid)
        assert run.info.status == "KILLED", rid
        assert "stopped before the run ended" in run.data.tags[tracking.TAG_END_REASON]
    assert done.ended == 2
    # A second replay finds nothing: nothing twice.
    assert journal.replay(tmp_path, client, exp_id, by="a test").delivered == 0
    assert steps(client, run_id) == [1, 2, 3, 4, 5, 6]


def test_a_run_the_dead_driver_created_is_found_not_made_twice(store, tmp_path):
    client, exp_id = store
    key = "sweep:twice/tiles/t1"
    # The open was sent (the run exists) but its acknowledgement never written.
    write(tmp_path, client, exp_id, key, trial_records(key, 2), deliver_first=1, ack_first=0)
    journal.replay(tmp_path, client, exp_id, by="a test")
    found = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_KEY}` = '{key}'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert steps(client, found[0].info.run_id) == [1, 2]


def test_a_live_drivers_journal_is_left_alone(store, tmp_path):
    client, exp_id = store
    live = journal.Journal(tmp_path / journal.JOURNAL_DIR, {"parent_run_id": None})
    live.append(trial_records("sweep:live/tiles/t1", 1)[0])
    try:
        done = journal.replay(tmp_path, client, exp_id, by="a test")
        assert (done.live, done.delivered) == (1, 0)
        assert live.path.exists() and tracking.find_run(client, exp_id, "sweep:live/tiles/t1") is None
    finally:
        live.close(done=False)


def test_a_torn_last_line_is_ignored_and_a_damaged_journal_named(store, tmp_path):
    client, exp_id = store
    key = "sweep:torn/tiles/t1"
    path, _ = write(tmp_path, client, exp_id, key, trial_records(key, 3))
    with path.open("ab") as fh:
        fh.write(b'{"seq": 99, "record": {"op": "metr')   # a write cut short by SIGKILL
    assert journal.read(path).pending[-1][1]["op"] == records.COMPLETE
    damaged = tmp_path / "other" / journal.JOURNAL_DIR
    damaged.mkdir(parents=True)
    lines = path.read_text().splitlines()
    (damaged / "x-1-2.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:3]]) + "\n")
    with pytest.raises(journal.JournalError, match=r"x-1-2\.jsonl: line 2 is not JSON"):
        journal.replay(tmp_path / "other", client, exp_id, by="a test")
    journal.replay(tmp_path, client, exp_id, by="a test")
    assert steps(client, tracking.find_run(client, exp_id, key)) == [1, 2, 3]


class Flaky:
    """A deliver that answers like a server: unreachable, then refusing the password, then fine."""

    def __init__(self, store, answers):
        self.client, self.exp_id = store
        self.answers = list(answers)
        self.lock = threading.Lock()

    def __call__(self, client, state, record):
        with self.lock:
            answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        state["exp_id"] = self.exp_id
        return records.deliver(self.client, state, record)


def test_a_refused_password_keeps_the_records_and_they_go_once_it_is_fixed(store, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(outbox, "RETRY_MAX_S", 0.05)
    client, exp_id = store
    refused = RuntimeError("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200")
    assert outbox.held(refused) and not outbox.transient(refused)
    deliver = Flaky(store, [refused] * 5)
    book = journal.Journal(tmp_path / journal.JOURNAL_DIR, {"parent_run_id": None})
    box = outbox.Outbox(lambda: client, deliver, journal=book, hint="pouta tracking replay --name x")
    box.state.update(records.new_state(exp_id))
    key = "sweep:password/tiles/t1"
    for rec in trial_records(key, 3):
        box.put(rec, rec["op"])
    deadline = time.monotonic() + 30
    while (deliver.answers or book.unacked) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box.close(5) == 0 and book.unacked == 0
    line = [r.getMessage() for r in caplog.records if "refused our credentials" in r.getMessage()]
    assert len(line) == 1 and "pouta tracking replay --name x" in line[0] and str(book.path) in line[0]
    run_id = tracking.find_run(client, exp_id, key)
    assert steps(client, run_id) == [1, 2, 3]
    assert client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.FINISHED)
    book.close(done=True)
    assert not book.path.exists()


def test_an_outbox_halted_by_a_stop_sends_nothing_more_and_keeps_the_rest(store, tmp_path, monkeypatch):
    client, exp_id = store
    gate = threading.Event()

    def slow(c, state, record):
        gate.wait(10)
        return records.deliver(client, state, record)

    book = journal.Journal(tmp_path / journal.JOURNAL_DIR, {"parent_run_id": None})
    box = outbox.Outbox(lambda: client, slow, journal=book)
    box.state.update(records.new_state(exp_id))
    key = "sweep:halt/tiles/t1"
    for rec in trial_records(key, 4):
        box.put(rec, rec["op"])
    box.halt()
    gate.set()
    assert box.close(5) >= 5        # at most the record under way was sent
    book.close(done=True)           # records left: the file stays
    pending = journal.read(book.path).pending
    assert len(pending) >= 5 and json.dumps(pending[-1][1]).count(records.COMPLETE) == 1
    journal.replay(tmp_path, client, exp_id, by="a test")
    assert steps(client, tracking.find_run(client, exp_id, key)) == [1, 2, 3, 4]
