"""Every file in cluster/ parses, pins the Ray version of constraints.txt, and names real
`pouta` commands that accept their arguments."""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser, main
from pouta_core.data.demo import generate

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_PIN = re.search(r"^ray==([\d.]+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def yaml_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)
    else:
        yield obj


def pouta_commands(path):
    """Every `pouta ...` command line in a file (YAML values, embedded YAML, cron, shell)."""
    texts = []
    if path.suffix in (".yaml", ".yml"):
        for doc in yaml_docs(path):
            for value in walk(doc):
                if not isinstance(value, str):
                    continue
                if value.lstrip().startswith(("apiVersion", "kind")):   # an embedded manifest
                    texts.extend(v for d in yaml.safe_load_all(value) for v in walk(d) if isinstance(v, str))
                else:
                    texts.append(value)
        # commands shown in comments (e.g. the `ray job submit` example) must be valid too
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        texts.append("\n".join(comments).replace("\\\n", " "))
    else:
        texts.append(path.read_text())
    commands = []
    for text in texts:
        for m in re.finditer(r"(?:^|[\s/])pouta\s+(launch|sweep|retrain|promote|train|evaluate)\b([^\n>#]*)", text):
            commands.append([m.group(1), *shlex.split(m.group(2))])
    return commands


def test_cluster_folder_has_the_documented_files():
    names = {str(p.relative_to(CLUSTER)) for p in FILES}
    assert {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml",
            "kuberay/retrain-cronjob.yaml", "cron/retrain.cron", "start_local.sh"} <= names


MLFLOW_PIN = re.search(r"^mlflow==([\d.]+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
MLFLOW_SERVERS = [CLUSTER / "kuberay" / "mlflow.yaml"]


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".yaml" and p not in MLFLOW_SERVERS],
                         ids=lambda p: p.name)
def test_yaml_parses_and_pins_the_ray_version(path):
    docs = yaml_docs(path)
    assert docs
    text = path.read_text()
    versions = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    versions |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
    versions |= set(re.findall(r"ray\[[^\]]*\]==(\d+\.\d+\.\d+)", text))
    assert versions == {RAY_PIN}, f"{path.name}: Ray versions {versions} != pinned {RAY_PIN}"


def test_kuberay_manifests_have_the_expected_kinds():
    kinds = {p.name: [d["kind"] for d in yaml_docs(p)] for p in (CLUSTER / "kuberay").glob("*.yaml")}
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    assert kinds["rayjob-sweep.yaml"] == ["RayJob"]
    assert "CronJob" in kinds["retrain-cronjob.yaml"]
    embedded = yaml.safe_load(yaml_docs(CLUSTER / "kuberay" / "retrain-cronjob.yaml")[3]["data"]["rayjob.yaml"])
    assert embedded["kind"] == "RayJob" and embedded["spec"]["rayClusterSpec"]["rayVersion"] == RAY_PIN


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate(root, categories=1, image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    return root


def test_every_entrypoint_is_a_real_pouta_command_that_accepts_its_arguments(demo, tmp_path, monkeypatch, capsys):
    commands = [(p, c) for p in FILES for c in pouta_commands(p)]
    assert {p.name for p, _ in commands} >= {"rayjob-sweep.yaml", "retrain-cronjob.yaml", "retrain.cron",
                                             "ray-cluster.yaml"}
    parser = build_parser()
    for path, argv in commands:
        parser.parse_args(argv)                     # unknown flags or bad choices exit here
        local = list(argv)
        for flag, value in (("--data-root", str(demo)), ("--storage-path", str(tmp_path / "ray"))):
            if flag in local:
                local[local.index(flag) + 1] = value
        local = [a for a in local if a != "--resume"] if local[0] == "sweep" else local
        # From a directory outside the repository, as a job's driver runs: a space named by a
        # path relative to the repository would not be found (a KubeRay job stopped at once).
        # In this process (one import of torch and Ray for all of them, not one each).
        monkeypatch.chdir(tmp_path)
        code = main([*local, "--dry-run"])
        out = capsys.readouterr()
        assert code == 0, f"{path.name}: pouta {' '.join(local)}\n{out.err}"
        assert out.out.startswith("would ")


def test_start_local_dry_run_binds_to_loopback():
    out = subprocess.run(["bash", str(CLUSTER / "start_local.sh"), "--dry-run"], capture_output=True, text=True,
                         check=True)
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == "RAY_AUTH_MODE=token"   # token auth on explicitly, token file or not
    assert lines[0].split()[1].endswith("ray") and "--dashboard-host 127.0.0.1" in lines[0]
    assert "mlflow" in lines[1] and "--host 127.0.0.1" in lines[1]


def ray_containers(obj):
    """Every container (also in embedded manifests) that runs a Ray image."""
    if isinstance(obj, dict):
        if "name" in obj and str(obj.get("image", "")).startswith("rayproject/ray"):   # a Kubernetes container
            yield obj
        for v in obj.values():
            yield from ray_containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from ray_containers(v)
    elif isinstance(obj, str) and obj.lstrip().startswith(("apiVersion", "kind")):
        for doc in yaml.safe_load_all(obj):
            yield from ray_containers(doc)


def test_every_cluster_config_turns_token_auth_on_explicitly():
    starts = 0
    for path in FILES:
        lines = [ln for ln in path.read_text().splitlines() if "ray start" in ln and not ln.lstrip().startswith("#")]
        for line in lines:
            starts += 1
            exported = "export RAY_AUTH_MODE=token" in path.read_text()
            assert "RAY_AUTH_MODE=token" in line or exported, f"{path.name}: {line.strip()}"
        if path.suffix == ".yaml":
            for container in (c for d in yaml_docs(path) for c in ray_containers(d)):
                env = {e["name"]: e for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{path.name}: {container['name']}"
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"
    assert starts >= 3


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state owned by ``pids`` (from ss)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((address.strip("[]").removeprefix("::ffff:"), int(port), pid))
    return found


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


def test_start_local_is_closed_without_a_token_and_binds_its_http_servers_to_loopback(tmp_path):
    import json
    import os
    import shutil
    import socket
    import urllib.error
    import urllib.request

    from servers import free_port

    if shutil.which("ss") is None:
        pytest.skip("needs `ss` (iproute2) to list listening sockets")
    ports = {"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port()}
    token = tmp_path / "secret" / "auth_token"      # no token yet: the script must still turn auth on
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **{k: str(v) for k, v in ports.items()},
           "POUTA_RUN_DIR": str(tmp_path / "run"), "RAY_AUTH_TOKEN_PATH": str(token),
           "VENV": str(Path(sys.executable).parents[1])}
    subprocess.run(["bash", str(CLUSTER / "start_local.sh")], env=env, check=True, capture_output=True, timeout=60)
    try:
        assert token.stat().st_mode & 0o777 == 0o600
        dashboard = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
        deadline = time.monotonic() + 180
        while True:
            request = urllib.request.Request(f"{dashboard}/api/jobs/", method="POST",
                                             data=json.dumps({"entrypoint": "touch /tmp/pwned"}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=5)
                raise AssertionError("an unauthenticated job submission was accepted")
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    break
                assert time.monotonic() < deadline, f"dashboard answered {exc.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "dashboard never came up"
            time.sleep(1)
        while True:   # MLflow starts slower than the dashboard
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "MLflow never came up"
                time.sleep(1)
        assert (tmp_path / "run" / "mlflow.db").is_file()   # state goes where POUTA_RUN_DIR says, not into the repo
        # Reached by this machine's name, as a job would (MLflow's default refuses names: 403).
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(f"http://{socket.gethostname()}:{ports['MLFLOW_PORT']}{api}", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:   # ... and only by the names it lists
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{ports['MLFLOW_PORT']}{api}",
                                                          headers={"Host": "elsewhere.example"}), timeout=10)
        assert refused.value.code == 403
        pids = set()
        for name in ("ray", "mlflow"):
            pids |= descendants(int((tmp_path / "run" / f"{name}.pid").read_text()))
        sockets = listening(pids)
        by_port = {port: address for address, port, _ in sockets}
        assert by_port[ports["DASHBOARD_PORT"]] == "127.0.0.1" and by_port[ports["MLFLOW_PORT"]] == "127.0.0.1"
        # Ray's core ports (GCS, raylet, agents, workers) are the ones cluster/SECURITY.md names as open;
        # nothing the script starts serves HTTP on another address.
        for address, port, pid in sockets:
            if address not in ("127.0.0.1", "::1"):
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                assert name.startswith(("gcs_server", "raylet", "ray::", "python")), (address, port, name)
                assert port not in (ports["DASHBOARD_PORT"], ports["MLFLOW_PORT"])
    finally:
        subprocess.run(["bash", str(CLUSTER / "stop_local.sh")], env=env, capture_output=True, timeout=60)


def test_the_mlflow_server_allows_the_names_its_clients_use_and_the_drivers_carry_credentials():
    """MLflow 3 answers 403 to a Host it does not list: every tracking URI in cluster/ must
    name a host:port of the server manifest's --allowed-hosts (issue 26), and every Ray head
    (where the driver runs) reads the MLflow account from the Secret."""
    server = yaml_docs(MLFLOW_SERVERS[0])
    deployment = next(d for d in server if d["kind"] == "Deployment")
    script = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    allowed = re.search(r'--allowed-hosts "([^"]+)"', script).group(1).split(",")
    assert {"localhost:*", "127.0.0.1:*"} <= set(allowed)
    assert set(re.findall(r"mlflow(?:\[auth\])?==([\d.]+)", script)) == {MLFLOW_PIN}
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":v{MLFLOW_PIN}")
    # MLflow 3.17's auth app does not start without its CSRF key (found starting one in tests)
    server_env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-server"
    # Kubernetes clients reach the manifest's server; the VM cluster (ray-cluster.yaml, cron)
    # the one cluster/SECURITY.md starts.
    documented = re.search(r'--allowed-hosts "([^"]+)"', (CLUSTER / "SECURITY.md").read_text()).group(1).split(",")
    for files, hosts in (([p for p in FILES if p.parent.name == "kuberay"], allowed),
                         ([p for p in FILES if p.parent.name != "kuberay"], documented)):
        uris = {m for p in files for m in re.findall(r"http://(mlflow[\w.-]*:\d+)", p.read_text())}
        assert uris and all(u in hosts for u in uris), (uris, hosts)
    heads = [c for p in (CLUSTER / "kuberay").glob("*.yaml") for d in yaml_docs(p) for c in ray_containers(d)
             if c["name"] == "ray-head"]
    assert len(heads) == 3
    for head in heads:
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in head["env"]}
        assert env["MLFLOW_TRACKING_USERNAME"]["name"] == env["MLFLOW_TRACKING_PASSWORD"]["name"] == "mlflow-client"


def test_rayjobs_give_the_gpus_back_in_minutes_and_retrains_never_overlap():
    jobs = [yaml_docs(CLUSTER / "kuberay" / "rayjob-sweep.yaml")[0],
            yaml.safe_load(yaml_docs(CLUSTER / "kuberay" / "retrain-cronjob.yaml")[3]["data"]["rayjob.yaml"])]
    for job in jobs:
        assert job["spec"]["shutdownAfterJobFinishes"] and job["spec"]["ttlSecondsAfterFinished"] <= 600
        submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        assert {e["name"] for e in submitter["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    retrain = jobs[1]
    assert retrain["metadata"] == {"name": "pouta-retrain"}    # a fixed name: a second one cannot be created
    cron = yaml_docs(CLUSTER / "kuberay" / "retrain-cronjob.yaml")[4]
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "kubectl get rayjob pouta-retrain" in script and "exit 0" in script
    assert retrain["spec"]["activeDeadlineSeconds"] == int(re.search(r"deadline=(\d+)", script).group(1))
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0 and cron["spec"]["concurrencyPolicy"] == "Forbid"


FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$KUBECTL_CALLS"
case "$1" in
  get) [ -n "$RAYJOB" ] && printf '%s' "$RAYJOB" || exit 1 ;;
esac
"""


@pytest.mark.parametrize("existing,age_h,code,calls", [
    (None, 0, 0, ["get", "create"]),                       # the first night
    ("Complete", 30, 0, ["get", "delete", "create"]),       # last night's ended: replaced
    ("Running", 3, 0, ["get"]),                             # still training: left alone, not joined
    ("Initializing", 21, 1, ["get"]),                       # stuck past the deadline: a failed Job
])
def test_the_retrain_submitter_starts_one_replaces_an_ended_one_and_fails_on_a_stuck_one(
        tmp_path, existing, age_h, code, calls):
    """The CronJob's submitter script as written, against a stand-in for kubectl (no cluster
    here): what it asks of Kubernetes and how it exits."""
    import datetime

    cron = yaml_docs(CLUSTER / "kuberay" / "retrain-cronjob.yaml")[4]
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    created = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=age_h)).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECTL_CALLS": str(tmp_path / "calls"),
           "RAYJOB": f"{existing} {created}" if existing else ""}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stdout + done.stderr
    made = [line.split()[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert made == calls, made
    if code:
        assert "stuck" in done.stdout


def test_the_launcher_mounts_shared_storage_on_the_host_and_binds_it_into_the_container():
    """With ``docker:`` set, ``setup_commands`` run inside the container, where an unprivileged
    ``mount -t nfs4`` fails (and the token copy after it): the mount is a host step."""
    config = yaml_docs(CLUSTER / "ray-cluster.yaml")[0]
    assert config["docker"]
    assert any("mount -t nfs4" in c for c in config["initialization_commands"])
    assert not any("mount -t" in c for c in config["setup_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    copy = next(i for i, c in enumerate(config["setup_commands"]) if "ray_auth_token ~/.ray/auth_token" in c)
    check = next(i for i, c in enumerate(config["setup_commands"]) if "test -s /mnt/shared/secrets" in c)
    assert check < copy
