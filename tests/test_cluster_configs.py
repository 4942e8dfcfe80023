"""Every file in cluster/ parses, pins the Ray version of constraints.txt, and names real
`pouta` commands that accept their arguments."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser
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


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".yaml"], ids=lambda p: p.name)
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


def test_every_entrypoint_is_a_real_pouta_command_that_accepts_its_arguments(demo, tmp_path):
    commands = [(p, c) for p in FILES for c in pouta_commands(p)]
    assert {p.name for p, _ in commands} >= {"rayjob-sweep.yaml", "retrain-cronjob.yaml", "retrain.cron",
                                             "ray-cluster.yaml"}
    parser = build_parser()
    for path, argv in commands:
        parser.parse_args(argv)                     # unknown flags or bad choices exit here
        local = list(argv)
        for flag, value in (("--data-root", str(demo)), ("--storage-path", str(tmp_path / "ray")),
                            ("--space", None)):
            if flag in local and value is not None:
                local[local.index(flag) + 1] = value
        if "--space" in local:    # cluster files name spaces relative to the repository
            i = local.index("--space") + 1
            local[i] = str(REPO / local[i])
        local = [a for a in local if a != "--resume"] if local[0] == "sweep" else local
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *local, "--dry-run"], capture_output=True,
                             text=True, cwd=tmp_path)
        assert out.returncode == 0, f"{path.name}: pouta {' '.join(local)}\n{out.stderr}"
        assert out.stdout.startswith("would ")


def test_start_local_dry_run_binds_to_loopback():
    out = subprocess.run(["bash", str(CLUSTER / "start_local.sh"), "--dry-run"], capture_output=True, text=True,
                         check=True)
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == "RAY_AUTH_MODE=token"   # token auth on explicitly, token file or not
    assert lines[0].split()[1].endswith("ray") and "--dashboard-host 127.0.0.1" in lines[0]
    assert "mlflow" in lines[1] and "--host 127.0.0.1" in lines[1]
