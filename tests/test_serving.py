"""Serving the registered model (issue 32): encoded images in, per image score, decision,
threshold and anomaly map out. In-process through MLflow's pyfunc, then through a real
``pouta serve`` (MLflow's scoring server) on a free port, asked by a plain urllib client and
by the ``curl`` line it prints, and stopped by its PID."""

import base64
import json
import os
import re
import subprocess
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import small_config
from mlflow.tracking import MlflowClient
from servers import BIN, descendants, free_port, reap_with_us, stop, wait_http
from test_bad_input import bomb

from orchestrator import cli, tracking
from orchestrator.tracking.registry import log_image_model
from pouta_core import api
from pouta_core import checkpoint as ckpt
from pouta_core.data.demo import generate

NAME = "pouta-test-tiles"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny tiles model trained, logged and registered as ``challenger`` in a sqlite store;
    the files to score: two good and two anomalous test images, a corrupt file, a bomb."""
    root = tmp_path_factory.mktemp("serve")
    generate(root / "data", categories=1, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    run = root / "run"
    api.train(small_config(), data_root=root / "data", dataset="mvtec", category="tiles", out=run, device="cpu",
              progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serving", artifact_location=tracking.artifact_root(uri))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=exp):
        info = log_image_model(ckpt.load_state(run), registered_model_name=NAME)
    client.set_registered_model_alias(NAME, "challenger", info.registered_model_version)
    test = root / "data" / "tiles" / "test"
    files = [*sorted((test / "good").glob("*.png"))[:2], *sorted(p for p in test.glob("*/*.png")
                                                                 if p.parent.name != "good")[:2]]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bomb(root / "bomb.png")
    expected = api.predict_paths(run, files, root / "predicted").scored   # what `pouta predict` says
    yield {"root": root, "uri": uri, "client": client, "run": run, "files": files, "expected": expected,
           "model": info}


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def check_answers(answers, served, shapes=True):
    """The first four answers are `pouta predict`'s, the corrupt file and the bomb errors."""
    assert len(answers) == 6
    for answer, want, path in zip(answers, served["expected"], served["files"], strict=False):
        assert answer["error"] is None
        assert answer["score"] == pytest.approx(want["score"], abs=1e-5)
        assert answer["anomalous"] == want["anomalous"] and answer["threshold"] == pytest.approx(want["threshold"])
        if shapes:   # the map at the input's own size
            assert np.asarray(answer["map"]).shape == (48, 48), path
    corrupt, big = answers[4:]
    assert corrupt["score"] is None and "image 4: cannot decode image" in corrupt["error"]
    assert big["score"] is None and "image 5: image of 10,000,000,000 pixels is over the limit" in big["error"]


def test_the_registered_version_takes_images_and_answers_as_predict_does(served, tmp_path, capsys):
    images = [b64(p) for p in served["files"]] + [b64(served["root"] / "corrupt.png"), b64(served["root"] / "bomb.png")]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    check_answers(model.predict(pd.DataFrame({"image": images})), served)
    # The caller chooses the map's size (longer side) or none; and the threshold.
    small = model.predict(pd.DataFrame({"image": images[:1]}), params={"map_size": 12})[0]
    assert np.asarray(small["map"]).shape == (12, 12)
    # A threshold below every score and one above: a tiny model's four scores may lie within a
    # few float32 steps of each other, where one between them would be decided by rounding.
    scores = [a["score"] for a in served["expected"]]
    for threshold, flagged in ((min(scores) - 0.01, True), (max(scores) + 0.01, False)):
        answers = model.predict(pd.DataFrame({"image": images[:4]}), params={"map_size": 0, "threshold": threshold})
        assert [a["anomalous"] for a in answers] == [flagged] * 4
        assert all(a["map"] is None and a["threshold"] == pytest.approx(threshold) for a in answers)
    with pytest.raises(Exception, match="map_size must be >= 0"):
        model.predict(pd.DataFrame({"image": images[:1]}), params={"map_size": -3})
    # Invalid base64 is one image's error too.
    assert "image 0: not valid base64" in model.predict(pd.DataFrame({"image": ["%%%"]}))[0]["error"]

    # A version costs its weights (no optimizer state) and a few kB in MLflow (issue 28).
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "dl"))
    size = sum(p.stat().st_size for p in tmp_path.joinpath("dl").rglob("*") if p.is_file())
    state = ckpt.load_state(served["run"])
    weights = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert "optimizer" not in ckpt.load_state(os.path.join(local, "artifacts", ckpt.CHECKPOINT))
    assert weights < size <= weights + 2 * MB

    # `pouta predict --model models:/...` reads the checkpoint the version carries.
    argv = ["predict", "--model", f"models:/{NAME}@challenger", *map(str, served["files"]), "--out",
            str(tmp_path / "p"), "--tracking-uri", served["uri"], "--json"]
    assert cli.main(argv) == 0
    scored = json.loads(capsys.readouterr().out)["scored"]
    assert [r["score"] for r in scored] == pytest.approx([r["score"] for r in served["expected"]], abs=1e-6)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def user_env() -> dict[str, str]:
    """This environment as a user's shell has it: mlflow.set_tracking_uri (the fixture's) also
    exports MLFLOW_TRACKING_URI, which would hide a store read from MLflow's default."""
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def test_pouta_serve_answers_a_plain_http_client_and_its_printed_curl_line(served, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(BIN / "pouta"), "serve", "--model", f"models:/{NAME}@challenger", "--port", str(port),
                             "--tracking-uri", served["uri"]], cwd=tmp_path, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=user_env())
    reap_with_us(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", 180, proc, log)
        images = [b64(p) for p in served["files"]] + [b64(served["root"] / n) for n in ("corrupt.png", "bomb.png")]
        # Two of MLflow's input formats, the map at the input's size; and no map on request.
        check_answers(post(url, {"inputs": {"image": images}})["predictions"], served)
        split = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}, "params": {"map_size": 0}}
        answers = post(url, split)["predictions"]
        check_answers(answers, served, shapes=False)
        assert all(a["map"] is None for a in answers)
        # The curl line it printed, run as printed: one answer for its 1x1 grey image.
        deadline_text = ""
        for _ in range(60):
            deadline_text = log.read_text()
            if "  try: curl" in deadline_text:
                break
            proc.wait(0.5) if proc.poll() is not None else __import__("time").sleep(0.5)
        line = re.search(r"  try: (curl .*)", deadline_text).group(1)
        assert f"serving models:/{NAME}@challenger at {url}/invocations" in deadline_text
        assert "  decision: threshold " in deadline_text and "set by fpr:0.01 on the validation images" in deadline_text
        out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60, check=True).stdout
        (answer,) = json.loads(out)["predictions"]
        assert answer["error"] is None and isinstance(answer["score"], float) and answer["map"] is None
        assert answer["threshold_policy"] == "fpr:0.01"
        children = descendants(proc.pid)
        assert children, "the server runs in processes of its own"
    finally:
        stop(proc)
    assert proc.returncode is not None
    # It read the store it was given, and nothing else: no ./mlflow.db made by MLflow's default.
    assert not (tmp_path / "mlflow.db").exists() and "Creating initial MLflow database" not in log.read_text()
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"server processes left after pouta serve stopped: {alive}"
