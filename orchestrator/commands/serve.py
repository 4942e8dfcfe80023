"""``pouta serve``: the model ``--model`` names behind MLflow's scoring server, on 127.0.0.1 by
default, taking images (:mod:`orchestrator.tracking.serving`).

Whatever ``--model`` names (a registered version, a run, a run folder, a Ray trial), its
checkpoint is saved as the image pyfunc in a temporary folder and that folder is served by
``mlflow models serve --env-manager local`` from this Python (its ``bin`` first on PATH:
MLflow execs ``uvicorn``). The server runs in its own process group, is waited for on
``/ping`` for at most ``--start-timeout`` seconds, and is stopped (by its PID's group) when
this command ends: Ctrl-C, SIGTERM or the server's own exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator.commands.processes import answers, stop_groups
from pouta_core.config import ConfigError


def save_served_model(checkpoint: Path, folder: Path) -> Path:
    """The image pyfunc over ``checkpoint`` saved in ``folder`` (MLflow's model format)."""
    import mlflow

    from orchestrator.tracking.registry import input_example, model_requirements
    from orchestrator.tracking.serving import CHECKPOINT_KEY, MODEL_CODE, SIGNATURE
    from pouta_core import checkpoint as ckpt
    from pouta_core.checkpoint import load_model, require_calibrated

    model, _, state = load_model(checkpoint)
    require_calibrated(model, checkpoint)
    weights = ckpt.save_checkpoint(folder / "weights", ckpt.inference_state(state))
    mlflow.pyfunc.save_model(str(folder / "model"), python_model=MODEL_CODE,
                             artifacts={CHECKPOINT_KEY: str(weights)}, signature=SIGNATURE,
                             input_example=input_example(), pip_requirements=model_requirements())
    return folder / "model"


def curl_example(url: str, image: str | None = None) -> str:
    """A ``curl`` line that works as printed: a 1x1 grey PNG inline, or ``image`` read by ``base64``."""
    from orchestrator.tracking.registry import example_image

    head = f"curl -s {url}/invocations -H 'Content-Type: application/json' -d "
    if image is None:
        body = json.dumps({"inputs": {"image": [example_image(1)]}, "params": {"map_size": 0}})
        return head + f"'{body}'"
    body = json.dumps({"inputs": {"image": ["IMAGE"]}, "params": {"map_size": 0}}).replace('"', '\\"')
    return head + '"' + body.replace("IMAGE", f"$(base64 -w0 {image})") + '"'


@contextlib.contextmanager
def model_server(folder: Path, *, host: str = "127.0.0.1", port: int, workers: int = 1, timeout: int = 60,
                 start_timeout: float = 180, log=None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``mlflow models serve`` of the model in ``folder``, once it answers on ``/ping`` ->
    (its process, its URL); stopped on leaving (by its process group)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "-h", host, "-p", str(port),
           "-w", str(workers), "-t", str(timeout), "--env-manager", "local"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None)
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        deadline = time.monotonic() + start_timeout
        while not answers(f"{url}/ping"):
            if proc.poll() is not None:
                raise ConfigError(f"the model server exited with code {proc.returncode} before it answered on "
                                  f"{url} (is port {port} free? its output is above)")
            if time.monotonic() > deadline:
                raise ConfigError(f"the model server did not answer on {url}/ping within {start_timeout:.0f} s "
                                  "(--start-timeout)")
            time.sleep(0.5)
        yield proc, url
    finally:
        stop_groups([proc])


def serve(ref: str, *, tracking_uri: str | None, host: str, port: int, workers: int, timeout: int,
          start_timeout: float) -> int:
    """Serve ``ref`` until interrupted or the server exits -> the server's exit status."""
    from orchestrator.tracking.models import resolved
    from pouta_core.checkpoint import load_state
    from pouta_core.serving import decision_line

    tmp = Path(tempfile.mkdtemp(prefix="pouta-serve-"))
    try:
        with resolved(ref, tracking_uri) as checkpoint:
            folder = save_served_model(checkpoint, tmp)
            decision = decision_line(load_state(checkpoint))
        with model_server(folder, host=host, port=port, workers=workers, timeout=timeout,
                          start_timeout=start_timeout) as (proc, url):
            print(f"serving {ref} at {url}/invocations (Ctrl-C stops it)\n"
                  f"  decision: {decision} (a request's params.threshold overrides it)\n"
                  f"  try: {curl_example(url)}\n"
                  f"  an image file: {curl_example(url, 'IMAGE.png')}\n"
                  "  each answer: " + json.dumps({"score": 0.0, "anomalous": False, "threshold": 0.0,
                                                  "threshold_policy": "fpr:0.01", "map": None, "error": None}),
                  flush=True)
            return proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
