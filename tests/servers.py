"""Real servers for tests: ``ray start --head`` and ``mlflow server`` on 127.0.0.1, on free
ports, each in its own process group, stopped by that group's id (never by name).

Each group also gets a reaper (:func:`reap_with_us`): a small process of its own that stops the
group if the test process dies first. A test run killed by SIGKILL, or by a SIGTERM that the
code under test takes as its own interrupt (the CLI does), so never tears its fixtures down,
leaves no cluster behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


_handed: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before by this process: the kernel may give a
    port just closed again, and two components of one ``ray start`` on the same port refuse
    to start (seen: client_server and dashboard both on 42919)."""
    for _ in range(100):
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed:
            _handed.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return   # it answers (Ray's dashboard answers 401 without the auth token)
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


_REAPER = """
import os, signal, sys, time
owner, group = int(sys.argv[1]), int(sys.argv[2])
def alive(kill):
    try:
        kill()
        return True
    except ProcessLookupError:
        return False
while alive(lambda: os.kill(owner, 0)) and alive(lambda: os.killpg(group, 0)):
    time.sleep(1)
if alive(lambda: os.killpg(group, signal.SIGTERM)):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and alive(lambda: os.killpg(group, 0)):
        time.sleep(0.5)
    alive(lambda: os.killpg(group, signal.SIGKILL))
"""


def reap_with_us(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s process group (SIGTERM, then SIGKILL after 20 s) once this process is
    gone; the reaper exits by itself when the group ends first (:func:`stop`)."""
    subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(proc.pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group we created, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over a sqlite store in ``root``; :meth:`stop` and
    :meth:`start` again keep its port and store (an outage and a recovery).

    ``by_name``: clients reach it by this machine's host name, allowed the way
    cluster/SECURITY.md starts a server (``--allowed-hosts`` with the name and localhost,
    ``--cors-allowed-origins`` for the UI); else MLflow's default (localhost, private IPs)."""

    def __init__(self, root: Path, *, by_name: bool = False, port: int | None = None,
                 admin: tuple[str, str] | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.admin = admin   # (user, password): MLflow's basic-auth app on, this admin in its user database
        self.host = socket.gethostname() if by_name else "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.by_name = by_name
        self.proc: subprocess.Popen | None = None
        self.log = root / f"mlflow-server-{self.port}.log"

    def start(self, wait: bool = True) -> str:
        """Start the server (and wait until it answers, unless ``wait`` is False: then call
        :meth:`wait`, e.g. after starting something else meanwhile) -> its URL."""
        argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        if self.by_name:
            name = f"{self.host}:{self.port}"
            argv += ["--allowed-hosts", f"{self.host},{name},localhost:*,127.0.0.1:*",
                     "--cors-allowed-origins", f"http://{name}"]
        # MLflow 3's job runner (GenAI evaluation jobs; POUTA starts none) is one more process
        # importing MLflow on a 2-core machine: off.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.admin:   # as cluster/SECURITY.md starts it; the user database survives a restart
            ini = self.root / "basic_auth.ini"
            ini.write_text("[mlflow]\ndefault_permission = READ\n"
                           f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                           f"admin_username = {self.admin[0]}\nadmin_password = {self.admin[1]}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            argv += ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=f"pouta-test-{self.port}")
        self.proc = subprocess.Popen(argv, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        reap_with_us(self.proc)
        if wait:
            self.wait()
        return self.url

    def wait(self) -> None:
        wait_http(f"http://127.0.0.1:{self.port}/health", 120, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def ray_head(root: Path, num_cpus: int = 2, num_gpus: int = 0, cwd: Path | None = None):
    """``ray start --head`` with token auth on and a token of its own (never ~/.ray's).
    ``num_gpus`` simulates GPUs (a logical resource: what the scheduler sees, not a device);
    ``cwd`` is where the head starts, the working directory of a job submitted without one.
    -> address, dashboard URL, and ``env``: what a client of this cluster adds to its environment."""
    # Every port Ray would otherwise take by default is chosen here: another Ray on the machine
    # (another test module's in-process one) holds the defaults, and the job API needs its agent.
    port, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    log = root / "ray-head.log"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # unix socket paths must stay < 108 bytes
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **auth}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent),
         "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--temp-dir", temp_dir, "--disable-usage-stats"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
    reap_with_us(proc)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 180, proc, log)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": auth}
    finally:
        # `ray start --block` spends half a minute stopping its children on SIGTERM; the group
        # (every Ray process it started) is killed after 5 s instead.
        stop(proc, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_worker_node(head: dict, root: Path, name: str, num_cpus: int = 1, hide: Path | None = None,
                    num_gpus: int = 0):
    """A second raylet joining the ``ray_head`` ``head`` (``ray start --address``), as a worker
    machine would. ``hide``: a folder this node does not see (an empty tmpfs over it, in a
    mount namespace of its own: a machine that does not mount the head's disk). -> its
    ``ray start --block`` process; all the node's processes descend from it."""
    log = root / f"ray-{name}.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **head["env"]}
    argv = [str(BIN / "ray"), "start", "--address", head["address"], "--block", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--disable-usage-stats"]
    if hide is not None:
        hide.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs pouta-hidden "{hide}" && exec "$@"', "sh", *argv]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    reap_with_us(proc)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        kill_tree(proc)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: Linux, as Ray's raylet is)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, every descendant and its process group at once: a machine lost."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
