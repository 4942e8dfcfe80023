"""Child processes the commands start and stop themselves (``pouta serve``'s model server,
``pouta bench scale``'s Ray nodes and MLflow server): each in a process group of its own,
asked whether it answers over HTTP, and stopped by its group's id, never by name, waiting for
the whole group (a launcher's workers outlive their leader), with every wait bounded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


def answers(url: str, *, any_status: bool = False) -> bool:
    """``url`` answers 200 (with ``any_status``, any HTTP status: a dashboard answers 401
    without its token)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200 or any_status
    except urllib.error.HTTPError:
        return any_status
    except OSError:   # refused, reset, timed out (URLError is an OSError)
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_groups(procs: Sequence[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM to the process group of each of ``procs`` (each its group's leader), then wait
    for every group, not only the leaders; SIGKILL what is left after ``timeout``, and wait for
    that too (5 s at most)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        alive = [p for p in procs if group_alive(p.pid)]
        if not alive:
            break
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(group_alive(p.pid) for p in alive):
            for p in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(0.05)   # reap the leader, so that its group can end
            time.sleep(0.1)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
