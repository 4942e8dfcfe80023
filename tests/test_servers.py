"""The test servers' safety net: a test run that dies without tearing its fixtures down (SIGKILL,
or a SIGTERM the CLI under test takes as its own interrupt) leaves no server behind."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from orchestrator.commands.processes import group_alive

HERE = Path(__file__).parent

OWNER = textwrap.dedent(f"""
    import subprocess, sys, time
    sys.path.insert(0, {str(HERE)!r})
    from servers import reap_with_us
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    reap_with_us(server)
    print(server.pid, flush=True)
    time.sleep(600)
""")


def test_a_killed_test_process_takes_its_servers_with_it():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    server = int(owner.stdout.readline())
    try:
        time.sleep(2)
        assert group_alive(server), "the server must live as long as the process that started it"
        owner.kill()   # SIGKILL: no handler, no fixture teardown runs
        owner.wait(10)
        deadline = time.monotonic() + 30
        while group_alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(server), "the reaper did not stop the server's process group"
    finally:
        owner.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server, signal.SIGKILL)
